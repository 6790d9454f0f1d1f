import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedlens.shared.errors import ConfigError, FedlensError
from fedlens.shared.privacy import PrivacyLedger, calibrate_noise, check_privacy_params, epsilon_of

Q, STEPS_PER_ROUND, ROUNDS, DELTA = 0.01, 100, 5, 1e-5


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_noise_calibrated_once_ends_just_inside_the_target(target):
    sigma = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=Q, steps=ROUNDS * STEPS_PER_ROUND, accountant="rdp")
    spent = epsilon_of([(sigma, Q, STEPS_PER_ROUND)] * ROUNDS, delta=DELTA, accountant="rdp")
    assert 0.9 * target <= spent <= target


def test_calibration_does_not_warn_about_its_own_search_probes():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigma = calibrate_noise(target_epsilon=8.0, delta=DELTA, sample_rate=0.2, steps=160, accountant="rdp")
    assert sigma > 0
    assert not [w for w in caught if "largest alpha" in str(w.message)]


def test_history_composes_like_one_long_run():
    sigma = 1.1
    per_round = [(sigma, Q, STEPS_PER_ROUND)] * 3

    def eps(history):
        return epsilon_of(history, delta=DELTA, accountant="rdp")

    assert eps(per_round) == pytest.approx(eps([(sigma, Q, 3 * STEPS_PER_ROUND)]))
    assert eps(per_round) > eps(per_round[:1])
    assert eps([]) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_compacted_history_gives_what_opacus_gives_for_the_raw_history(accountant):
    from opacus.accountants import create_accountant

    from fedlens.shared.privacy.accounting import _epsilon_kwargs, compact_history

    # A resumed run: rounds at one noise, a re-calibrated stretch, then the first noise again.
    raw = [(1.1, Q, 40), (1.1, Q, 40), (1.3, 2 * Q, 25), (1.1, Q, 40), (1.3, 2 * Q, 0)]
    assert compact_history(raw) == [(1.1, Q, 120), (1.3, 2 * Q, 25)]
    reference = create_accountant(accountant)
    reference.history = [h for h in raw if h[2] > 0]
    expected = reference.get_epsilon(DELTA, **_epsilon_kwargs(accountant))
    assert epsilon_of(raw, delta=DELTA, accountant=accountant) == pytest.approx(expected, rel=1e-6)


def test_second_accountant_agrees_within_known_slack():
    history = [(1.0, Q, STEPS_PER_ROUND)] * ROUNDS
    rdp, prv = epsilon_of(history, delta=DELTA, accountant="rdp"), epsilon_of(history, delta=DELTA, accountant="prv")
    # RDP is an upper bound; PRV is near-tight. They differ by tens of percent, not more.
    assert prv <= rdp <= 1.5 * prv


def test_budget_parameters_are_checked():
    with pytest.raises(ConfigError, match="epsilon"):
        check_privacy_params(epsilon=0.0, delta=DELTA)
    with pytest.raises(ConfigError, match="delta"):
        check_privacy_params(epsilon=1.0, delta=1.0)
    assert check_privacy_params(epsilon=1.0, delta=1e-3, dataset_size=5000)  # delta >= 1/n warns
    assert not check_privacy_params(epsilon=1.0, delta=1e-5, dataset_size=5000)


def _record(ledger: PrivacyLedger, rnd: int, run_id: str = "r1"):
    """Record one round at the epsilon its plan would compute: the run's history plus this round."""
    epsilon = epsilon_of(ledger.history(run_id) + [(1.0, Q, STEPS_PER_ROUND)], delta=DELTA, accountant="rdp")
    return ledger.record(
        run_id=run_id, round=rnd, noise_multiplier=1.0, sample_rate=Q, steps=STEPS_PER_ROUND, delta=DELTA, accountant="rdp", epsilon=epsilon
    )


def test_ledger_survives_reopening_and_counts_a_retrained_round_twice(tmp_path):
    ledger = PrivacyLedger(tmp_path / "state")
    first = _record(ledger, 1)
    second = _record(ledger, 2)
    assert second.epsilon > first.epsilon
    reopened = PrivacyLedger(tmp_path / "state")
    assert reopened.spent("r1") == second.epsilon and reopened.spent("other") == 0.0
    assert reopened.history("r1") == [(1.0, Q, STEPS_PER_ROUND)] * 2
    # A resumed server may re-run round 2: the site trained it twice, so it spent it twice.
    again = _record(reopened, 2)
    assert again.epsilon > second.epsilon and reopened.steps("r1") == 3 * STEPS_PER_ROUND
    assert not list((tmp_path / "state").glob("*.tmp"))


def test_ledger_refuses_an_epsilon_below_what_the_run_already_spent(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    _record(ledger, 1)
    spent = _record(ledger, 2).epsilon
    before = ledger.path.read_bytes()
    with pytest.raises(FedlensError, match="planned from an older history"):  # a plan made outside the lock
        ledger.record(
            run_id="r1",
            round=3,
            noise_multiplier=1.0,
            sample_rate=Q,
            steps=STEPS_PER_ROUND,
            delta=DELTA,
            accountant="rdp",
            epsilon=spent / 2,
        )
    assert ledger.path.read_bytes() == before


def test_privacy_parameters_have_no_silent_defaults():
    from fedlens.shared.privacy import DPSGD, DPRequest

    with pytest.raises(TypeError, match="accountant"):
        epsilon_of([(1.0, Q, 10)], delta=DELTA)
    with pytest.raises(TypeError, match="accountant"):
        calibrate_noise(target_epsilon=1.0, delta=DELTA, sample_rate=Q, steps=10)
    with pytest.raises(TypeError, match="accountant"):
        DPRequest(
            run_id="r",
            target_epsilon=1.0,
            delta=DELTA,
            max_grad_norm=1.0,
            num_rounds=1,
            local_epochs=1,
            batch_size=8,
            secure_rng=False,
            reproducible=False,
        )
    with pytest.raises(TypeError, match="reproducible"):
        DPRequest(
            run_id="r",
            target_epsilon=1.0,
            delta=DELTA,
            max_grad_norm=1.0,
            num_rounds=1,
            local_epochs=1,
            batch_size=8,
            accountant="rdp",
            secure_rng=False,
        )
    with pytest.raises(TypeError, match="secure_rng"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=Q, expected_batch_size=8)
    with pytest.raises(ConfigError, match="unknown accountant"):
        DPRequest(
            run_id="r",
            target_epsilon=1.0,
            delta=DELTA,
            max_grad_norm=1.0,
            num_rounds=1,
            local_epochs=1,
            batch_size=8,
            accountant="gdp",
            secure_rng=False,
            reproducible=False,
        )


def test_corrupt_ledger_is_an_error_not_a_fresh_start(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    ledger.path.write_text("{not json")
    with pytest.raises(FedlensError, match="unreadable"):
        ledger.spent("r1")


_WRITER = """
import sys
from fedlens.shared.privacy import PrivacyLedger, epsilon_of
ledger = PrivacyLedger(sys.argv[1])
for r in range(1, 100000):
    eps = epsilon_of([(1.0, 0.01, 10 * r)], delta=1e-5, accountant="rdp")
    ledger.record(run_id="r", round=r, noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5, accountant="rdp", epsilon=eps)
    print(r, flush=True)
"""


def test_killing_the_writer_never_loses_or_corrupts_spent_epsilon(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        reported = 0
        deadline = time.monotonic() + 120
        while reported < 15 and time.monotonic() < deadline:
            reported = int(proc.stdout.readline() or reported)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    entries = PrivacyLedger(tmp_path).entries()  # parses: never half-written
    rounds = [e.round for e in entries]
    assert rounds == list(range(1, len(rounds) + 1))
    assert len(rounds) >= reported >= 15  # everything reported as written is there
    assert entries[-1].epsilon == pytest.approx(epsilon_of([(1.0, 0.01, 10)] * len(rounds), delta=1e-5, accountant="rdp"))
    assert json.loads(PrivacyLedger(tmp_path).path.read_text())["format"].startswith("fedlens")
