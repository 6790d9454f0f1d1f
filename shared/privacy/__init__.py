"""Differential privacy: DP-SGD, accounting, the site's budget, its ledger, and the round that ties them."""

from .accounting import ACCOUNTANTS, calibrate_noise, check_privacy_params, epsilon_of
from .budget import BudgetExceeded, DPRequest, RoundPlan, SiteBudget, SiteRefusal, plan_round
from .dpsgd import DPSGD, resolve_dp_mode
from .ledger import LEDGER_FILE, LedgerEntry, PrivacyLedger
from .site import SitePrivacy, SiteUpdate

__all__ = [
    "ACCOUNTANTS",
    "BudgetExceeded",
    "DPRequest",
    "DPSGD",
    "LEDGER_FILE",
    "LedgerEntry",
    "PrivacyLedger",
    "RoundPlan",
    "SiteBudget",
    "SitePrivacy",
    "SiteRefusal",
    "SiteUpdate",
    "calibrate_noise",
    "check_privacy_params",
    "epsilon_of",
    "plan_round",
    "resolve_dp_mode",
]
