"""A site's private round as one object owns it: re-send, plan, train, record, keep."""

from __future__ import annotations

import fcntl

import pytest
import torch

from fedlens.shared.errors import TrainingDiverged
from fedlens.shared.privacy import DPSGD, BudgetExceeded, PrivacyLedger, SiteBudget, SitePrivacy, epsilon_of, plan_round
from fedlens.shared.privacy import budget as budget_module

from .dp_requests import dp_request

N = 3200  # images at the site: q = 64 / 3200, 50 steps per round


class _Training:
    """Stands in for local training: records the mechanism it was handed, returns a fixed update."""

    def __init__(self, fail: bool = False) -> None:
        self.mechanisms: list[DPSGD] = []
        self.fail = fail

    def __call__(self, dp: DPSGD) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        self.mechanisms.append(dp)
        if self.fail:
            raise RuntimeError("the site's GPU fell over")
        return {"w": torch.full((3,), float(len(self.mechanisms)))}, N, {"dp": 1.0}


def _site(tmp_path, max_epsilon: float = 3.0) -> SitePrivacy:
    return SitePrivacy(SiteBudget(max_epsilon=max_epsilon), PrivacyLedger(tmp_path / "state"), site="clinic-a")


def _snapshot(privacy: SitePrivacy) -> tuple[bytes | None, bytes | None]:
    ledger, outbox = privacy.ledger.path, privacy.outbox.path
    return (ledger.read_bytes() if ledger.is_file() else None, outbox.read_bytes() if outbox.is_file() else None)


def test_a_trained_round_is_recorded_once_at_the_epsilon_its_plan_computed(tmp_path, monkeypatch):
    privacy, train, model = _site(tmp_path), _Training(), {"w": torch.zeros(3)}
    planned = plan_round(privacy.ledger, privacy.budget, dp_request(), num_examples=N, site="clinic-a")  # planning records nothing
    calls = []
    real = budget_module.epsilon_of
    monkeypatch.setattr(budget_module, "epsilon_of", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    state, n, metrics = privacy.run_round(request=dp_request(), round=1, global_state=model, num_examples=N, train=train)

    entries = privacy.ledger.entries()
    assert len(entries) == 1 and entries[0].round == 1
    assert entries[0].epsilon == planned.epsilon_after == metrics["epsilon"]
    assert len(calls) == 1  # the round's epsilon is computed once, by its plan
    assert entries[0].epsilon == pytest.approx(epsilon_of(privacy.ledger.history("run-a"), delta=1e-5, accountant="rdp"), rel=1e-9)
    assert train.mechanisms == [planned.dp]  # training ran the planned mechanism
    assert metrics["noise-multiplier"] == entries[0].noise_multiplier and metrics["dp-steps"] == entries[0].steps == 50
    assert metrics["dp"] == 1.0 and n == N and torch.equal(state["w"], torch.ones(3))


def test_a_round_whose_training_fails_records_nothing(tmp_path):
    privacy = _site(tmp_path)
    privacy.run_round(request=dp_request(), round=1, global_state={"w": torch.zeros(3)}, num_examples=N, train=_Training())
    before = _snapshot(privacy)

    with pytest.raises(RuntimeError, match="fell over"):
        privacy.run_round(request=dp_request(), round=2, global_state={"w": torch.ones(3)}, num_examples=N, train=_Training(fail=True))

    assert _snapshot(privacy) == before  # neither the ledger nor the outbox moved
    privacy.run_round(request=dp_request(), round=2, global_state={"w": torch.ones(3)}, num_examples=N, train=_Training())
    assert [e.round for e in privacy.ledger.entries()] == [1, 2]  # the lock was released; the retry is one spend


def _diverges_after(steps: int):
    def train(dp: DPSGD) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        raise TrainingDiverged("training diverged: the weights turned non-finite", steps=steps)

    return train


def test_a_round_that_diverged_after_private_steps_is_recorded_as_spent_and_sends_nothing(tmp_path):
    privacy = _site(tmp_path)
    planned = plan_round(privacy.ledger, privacy.budget, dp_request(), num_examples=N, site="clinic-a")

    with pytest.raises(TrainingDiverged):
        privacy.run_round(request=dp_request(), round=1, global_state={"w": torch.zeros(3)}, num_examples=N, train=_diverges_after(7))

    (entry,) = privacy.ledger.entries()  # the 7 noisy steps ran and the site said so: that is spent
    assert entry.round == 1 and entry.steps == planned.steps and entry.epsilon == planned.epsilon_after  # as planned: an upper bound
    assert not privacy.outbox.path.is_file()  # nothing was sent, nothing kept to re-send
    (record,) = privacy.audit.entries()
    assert record["outcome"] == "failed" and "diverged after 7 DP-SGD steps" in record["reason"]
    assert record["epsilon_after"] == pytest.approx(entry.site_epsilon)


def test_a_round_that_diverged_before_any_step_spends_nothing(tmp_path):
    privacy = _site(tmp_path)
    with pytest.raises(TrainingDiverged):
        privacy.run_round(request=dp_request(), round=1, global_state={"w": torch.zeros(3)}, num_examples=N, train=_diverges_after(0))
    assert privacy.ledger.entries() == []


def test_a_re_asked_round_is_re_sent_without_a_new_ledger_entry(tmp_path):
    privacy, model = _site(tmp_path), {"w": torch.zeros(3)}
    first = privacy.run_round(request=dp_request(), round=1, global_state=model, num_examples=N, train=_Training())
    ledger_before = privacy.ledger.path.read_bytes()

    retrain = _Training()
    again = SitePrivacy(privacy.budget, PrivacyLedger(tmp_path / "state"), site="clinic-a").run_round(  # a restarted site process
        request=dp_request(), round=1, global_state={"w": torch.zeros(3)}, num_examples=N, train=retrain
    )

    assert retrain.mechanisms == [] and privacy.ledger.path.read_bytes() == ledger_before
    assert torch.equal(again[0]["w"], first[0]["w"]) and again[1:] == first[1:]
    # Another global model is another round of training, and another spend.
    privacy.run_round(request=dp_request(), round=1, global_state={"w": torch.ones(3)}, num_examples=N, train=_Training())
    assert len(privacy.ledger.entries()) == 2


def test_an_exhausted_budget_refuses_before_training(tmp_path):
    privacy, train = _site(tmp_path, max_epsilon=1.0), _Training()
    old = epsilon_of([(0.5, 0.02, 500)], delta=1e-5, accountant="rdp")  # an earlier run spent more than the site now allows
    privacy.ledger.record(
        run_id="run-old", round=1, noise_multiplier=0.5, sample_rate=0.02, steps=500, delta=1e-5, accountant="rdp", epsilon=old
    )
    before = _snapshot(privacy)

    with pytest.raises(BudgetExceeded, match="Nothing was trained"):
        privacy.run_round(request=dp_request(), round=1, global_state={"w": torch.zeros(3)}, num_examples=N, train=train)

    assert train.mechanisms == [] and _snapshot(privacy) == before


def test_the_budget_is_locked_while_the_round_trains(tmp_path):
    privacy = _site(tmp_path)
    seen = []

    def train(dp: DPSGD):
        with open(privacy.ledger.state_dir / ".ledger.lock", "a+") as other:  # another run sharing this site
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                seen.append("locked")
            else:
                fcntl.flock(other, fcntl.LOCK_UN)
        return {"w": torch.zeros(3)}, N, {}

    privacy.run_round(request=dp_request(), round=1, global_state={"w": torch.zeros(3)}, num_examples=N, train=train)
    assert seen == ["locked"]
