"""Bytes a site sends per round vs the full model, for each fine-tune policy.

The per-round payload is measured as Flower serialises it (``ArrayRecord.count_bytes``
of the trainable state a site returns), next to the full model's state dict.

    python benchmarks/traffic.py
"""

from __future__ import annotations

from _common import config, parser, result
from flwr.app import ArrayRecord

from fedlens.shared.config import FedConfig
from fedlens.shared.task import Task

POLICIES = ("head", "last-1", "last-2", "last-4", "full")


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    base = config(args)
    default = FedConfig().policy
    ratios = {}
    print(f"{'policy':<8} {'sent/round (bytes)':>20} {'full model (bytes)':>20} {'ratio':>7}")
    for policy in dict.fromkeys((default, *POLICIES)):
        task = Task(FedConfig.from_mapping({"policy": policy}, base=base), num_classes=10)
        sent = ArrayRecord(task.trainable_state()).count_bytes()
        full = task.full_model_bytes()
        ratios[policy] = sent / full
        print(f"{policy:<8} {sent:>20,} {full:>20,} {sent / full:>7.3f}")
    result(default_policy=default, default_ratio=ratios[default], **{f"ratio_{p.replace('-', '')}": r for p, r in ratios.items()})


if __name__ == "__main__":
    main()
