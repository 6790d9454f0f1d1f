"""fedlens core: the Flower-free machine-learning pieces of the platform.

Nothing in this package imports Flower. The client and server packages wrap these
functions into Flower handlers; the simulation package drives them locally.
"""

__version__ = "0.1.0"
