"""Flower ServerApp: strategy selection, failure guard and per-round recording."""
