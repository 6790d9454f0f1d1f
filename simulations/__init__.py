"""Local simulation: the runner and the experiment overlays."""

from pathlib import Path

# One TOML overlay per experiment: adding an experiment means adding a file.
EXPERIMENTS_DIR = Path(__file__).parent / "experiments"
