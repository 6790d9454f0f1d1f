"""Federated vs centralized accuracy on the Fashion-MNIST test set.

Federated: 10 sites, Dirichlet alpha = 0.5, FedAvg, no DP (Adam, batch 64, the head
convolution trained fully: the best non-private settings). Centralized: the same model
and config on the pooled training data, with the same number of passes over the data
(num-rounds x local-epochs). Both are evaluated on the same 10,000 test images.

    python benchmarks/accuracy.py [--set num-rounds=10] [--out runs/bench-accuracy]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from _common import config, parser, result, setup_logging

from fedlens.simulations.runner import centralized, simulate


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup_logging()
    cfg = config(
        args,
        **{
            "dataset": "fashion-mnist",
            "num-sites": 10,
            "partition": "dirichlet",
            "alpha": 0.5,
            "strategy": "fedavg",
            "dp": False,
            # the non-private settings this figure was first measured with
            "optimizer": "adam",
            "lr": 0.001,
            "batch-size": 64,
            "lora-rank": 0,
            "num-rounds": 20,
        },
    )
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t = time.monotonic()
    fed = simulate(cfg, out / "federated")
    fed_wall = time.monotonic() - t
    t = time.monotonic()
    cen = centralized(cfg, out / "centralized")
    cen_wall = time.monotonic() - t
    result(
        federated_accuracy=fed["final_accuracy"],
        centralized_accuracy=cen["final_accuracy"],
        ratio=fed["final_accuracy"] / cen["final_accuracy"],
        federated_macro_f1=fed["final_macro_f1"],
        federated_wall_s=fed_wall,
        centralized_wall_s=cen_wall,
        rounds=cfg.num_rounds,
        policy=cfg.policy,
        image_size=cfg.image_size,
    )


if __name__ == "__main__":
    main()
