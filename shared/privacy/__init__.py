"""Differential privacy: DP-SGD, accounting, the site's budget, its ledger, its audit log, and the round that ties them."""

from .accounting import ACCOUNTANTS, calibrate_noise, check_privacy_params, composed_epsilon, epsilon_of
from .audit import AUDIT_FILE, ROUND_OUTCOMES, SiteAudit, update_fingerprint
from .budget import BudgetExceeded, DPRequest, RoundPlan, SiteBudget, SiteGuarantee, SiteRefusal, plan_round, refusals, site_guarantee
from .dpsgd import DPSGD, resolve_dp_mode
from .ledger import LEDGER_FILE, LedgerEntry, PrivacyLedger
from .site import SitePrivacy, SiteUpdate

__all__ = [
    "ACCOUNTANTS",
    "AUDIT_FILE",
    "BudgetExceeded",
    "DPRequest",
    "DPSGD",
    "LEDGER_FILE",
    "LedgerEntry",
    "PrivacyLedger",
    "ROUND_OUTCOMES",
    "RoundPlan",
    "SiteAudit",
    "SiteBudget",
    "SiteGuarantee",
    "SitePrivacy",
    "SiteRefusal",
    "SiteUpdate",
    "calibrate_noise",
    "check_privacy_params",
    "composed_epsilon",
    "epsilon_of",
    "plan_round",
    "refusals",
    "resolve_dp_mode",
    "site_guarantee",
    "update_fingerprint",
]
