"""``fedlens serve``: the model behind an HTTP API and a page for people.

One module per job: :mod:`.app` (routes, errors, the token and size guard),
:mod:`.batching` (the request queue and the inference thread), :mod:`.reload` (the
served model and its hot reload), :mod:`.images` (uploads through the training
decoder), :mod:`.explain` (attribution overlays on request), :mod:`.metrics`
(Prometheus) and :mod:`.page` (the HTML page).
"""

from .app import ServeOptions, Service, build_app

__all__ = ["ServeOptions", "Service", "build_app"]
