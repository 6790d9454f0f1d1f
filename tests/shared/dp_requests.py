"""The DP request the privacy tests send a site, with the defaults they share."""

from __future__ import annotations

from fedlens.shared.privacy import DPRequest


def dp_request(run_id: str = "run-a", **overrides: object) -> DPRequest:
    """A run asking for epsilon 3 at delta 1e-5 over 5 rounds of batch 64; ``overrides`` change any field."""
    base: dict[str, object] = dict(
        run_id=run_id,
        target_epsilon=3.0,
        delta=1e-5,
        max_grad_norm=1.0,
        num_rounds=5,
        local_epochs=1,
        batch_size=64,
        accountant="rdp",
        secure_rng=False,
        reproducible=False,
    )
    return DPRequest(**{**base, **overrides})  # type: ignore[arg-type]
