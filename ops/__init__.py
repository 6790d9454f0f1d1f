"""Operator tooling above the Flower apps: the ``fedlens`` command, certificates, and
starting and talking to Flower's SuperLink and SuperNode processes."""
