"""Names of the records exchanged between server and sites (one place for both sides)."""

__all__ = ["SITE_RECORD", "ROUND_OFFSET", "NUM_EXAMPLES"]

# ConfigRecord a site adds to every reply: {"name": <site name>}.
SITE_RECORD = "site"
# ConfigRecord key: rounds completed before this (resumed) server process started.
ROUND_OFFSET = "round-offset"
# MetricRecord key Flower's strategies weight averages by.
NUM_EXAMPLES = "num-examples"
