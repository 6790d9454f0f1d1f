"""Local simulation: partitioners, experiment overlays and the runner."""
