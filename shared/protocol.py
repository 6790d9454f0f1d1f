"""What server and sites agree on to talk through Flower: record names and the
environment every Flower process of fedlens runs with (one place for all sides).
Constants only: nothing here imports Flower."""

__all__ = [
    "SITE_RECORD",
    "CLASSES",
    "ROUND_OFFSET",
    "NUM_EXAMPLES",
    "RUN_ID",
    "UNIT_WEIGHT",
    "PARAM_NAMES_KEY",
    "FLOWER_ENV",
    "SITE_REGISTRY_ENV",
    "PRIVACY_METRICS",
]

# Flower must neither phone home nor install packages at run time (runtime dependency
# installation runs `uv sync` into a fresh environment and pulls a CUDA build of torch).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

# ConfigRecord a site adds to every reply: {"name": <site name>}. What a site says it is
# called: a deployed server with a site registry (SITE_REGISTRY_ENV) ignores it and names
# the site by its registered key; simulations (`site-N`) and --insecure servers use it.
SITE_RECORD = "site"
# ConfigRecord key: rounds completed before this (resumed) server process started.
ROUND_OFFSET = "round-offset"
# MetricRecord key Flower's strategies weight averages by.
NUM_EXAMPLES = "num-examples"
# ConfigRecord key: the fedlens run id (stable across server restarts); sites key
# their privacy ledgers by it.
RUN_ID = "run-id"
# ConfigRecord key of every train and evaluate message: the federation's label set, the
# list of class names in label order. Sites map their own class names onto it by name
# (fedlens.shared.data.labels) and build their classifier with one output per name.
CLASSES = "classes"
# MetricRecord key every site sets to 1: central DP weights sites equally by it.
UNIT_WEIGHT = "unit-weight"
# MetricRecord keys of a private round's accounting, next to "dp" = 1 (shared.privacy.site.privacy_metrics):
# the server's run summary reads them, and a DP run's server refuses an update without them.
PRIVACY_METRICS = ("epsilon", "delta", "noise-multiplier", "sample-rate", "dp-steps")
# SecAgg+ train-config key carrying the parameter names, in order: the legacy
# ``Parameters`` SecAgg+ travels in are a bare list of arrays.
PARAM_NAMES_KEY = "secagg-param-names"
# Environment variable `fedlens server start` gives the SuperLink, and through it every
# ServerApp process it starts: the path of the server's site registry (`sites.json`,
# written by `fedlens server add-site`: {"<site name>": {"node_id": "<id>", ...}}). The
# ServerApp names sites by it, never by what a site says about itself.
SITE_REGISTRY_ENV = "FEDLENS_SITE_REGISTRY"
