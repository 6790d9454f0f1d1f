"""Names of the records exchanged between server and sites (one place for both sides)."""

__all__ = ["SITE_RECORD", "ROUND_OFFSET", "NUM_EXAMPLES", "RUN_ID", "UNIT_WEIGHT"]

# ConfigRecord a site adds to every reply: {"name": <site name>}.
SITE_RECORD = "site"
# ConfigRecord key: rounds completed before this (resumed) server process started.
ROUND_OFFSET = "round-offset"
# MetricRecord key Flower's strategies weight averages by.
NUM_EXAMPLES = "num-examples"
# ConfigRecord key: the fedlens run id (stable across server restarts); sites key
# their privacy ledgers by it.
RUN_ID = "run-id"
# MetricRecord key every site sets to 1: central DP weights sites equally by it.
UNIT_WEIGHT = "unit-weight"
