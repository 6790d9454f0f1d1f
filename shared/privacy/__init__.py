"""Differential-privacy accounting and the per-site privacy ledger."""

from .accounting import ACCOUNTANTS, calibrate_noise, check_privacy_params, epsilon_of
from .ledger import LEDGER_FILE, LedgerEntry, PrivacyLedger

__all__ = ["ACCOUNTANTS", "LEDGER_FILE", "LedgerEntry", "PrivacyLedger", "calibrate_noise", "check_privacy_params", "epsilon_of"]
