"""Explainability of the global model (Captum): attribution methods, how far to trust
them, and a self-contained HTML report. Plotting lives in :mod:`.render` only."""

from .methods import MethodOptions, attribute, get_method, method_names
from .report import DEFAULT_METHODS, ExplainOptions, explain
from .trust import deletion_insertion, randomized_copy, rank_correlation

__all__ = [
    "DEFAULT_METHODS",
    "ExplainOptions",
    "MethodOptions",
    "attribute",
    "deletion_insertion",
    "explain",
    "get_method",
    "method_names",
    "randomized_copy",
    "rank_correlation",
]
