"""Flower ClientApp: the site side. Handlers only; the ML lives in ``shared``."""
