"""The service's Prometheus metrics, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = ["ServeMetrics"]

# Request latency buckets (seconds): CPU inference at batch 1 is a few ms, explanations seconds.
_LATENCY = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Counters, histograms and gauges of one service (``fedlens_serve_*``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fedlens_serve_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("fedlens_serve_request_seconds", "HTTP request latency", ["route"], buckets=_LATENCY, registry=r)
        self.images = Counter("fedlens_serve_images", "images predicted", registry=r)
        self.batch_size = Histogram("fedlens_serve_batch_size", "images per inference batch", buckets=_BATCH, registry=r)
        self.queue_depth = Gauge("fedlens_serve_queue_depth", "requests waiting for the inference worker", registry=r)
        self.rejected = Counter("fedlens_serve_rejected", "requests refused before inference, by reason", ["reason"], registry=r)
        self.reloads = Counter("fedlens_serve_model_reloads", "model reload attempts by outcome", ["outcome"], registry=r)
        self.explaining = Gauge("fedlens_serve_explanations_running", "explanations running now (at most 1)", registry=r)
        self.model = Info("fedlens_serve_model", "the model being served", registry=r)
        self.model_loaded = Gauge("fedlens_serve_model_loaded_timestamp_seconds", "when the served model was loaded", registry=r)
        self.reload_error = Gauge("fedlens_serve_model_reload_error", "1 while the newest model file could not be loaded", registry=r)
