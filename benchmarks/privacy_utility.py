"""Privacy-utility table: Fashion-MNIST test accuracy per per-site epsilon (real Flower simulation).

10 sites, Dirichlet alpha = 0.5, delta = 1e-5, 20 rounds (or the --config file's
``num-rounds``; --set overrides both), every site running DP-SGD with the
given target epsilon (its own budget = the target), plus the non-private run with
the same settings. Each cell is a full ``fedlens simulate`` run; wall times include
everything but the shared feature cache (warmed first).

    python benchmarks/privacy_utility.py [--epsilons 1,3,8] [--no-baseline] [--out runs/bench-privacy]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from _common import config, parser, result, setup_logging

from fedlens.shared.config import FedConfig
from fedlens.shared.data import load_dataset
from fedlens.shared.task import Task
from fedlens.simulations.runner import simulate


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epsilons", default="1,3,8")
    p.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    args = p.parse_args()
    setup_logging()
    fixed = {"dataset": "fashion-mnist", "num-sites": 10, "partition": "dirichlet", "alpha": 0.5, "delta": 1e-5}
    cfg = config(args, defaults={"num-rounds": 20}, **fixed)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    train, test = load_dataset(cfg)  # warm the feature cache once
    task = Task(cfg, train.num_classes)
    task.prepare(train, for_training=True)
    task.prepare(test, for_training=False)
    del task
    cells = [float(e) for e in args.epsilons.split(",")] + ([] if args.no_baseline else [0.0])
    rows = []
    for eps in cells:
        run_cfg = FedConfig.from_mapping({"dp": eps > 0, **({"target-epsilon": eps} if eps > 0 else {})}, base=cfg)
        t = time.monotonic()
        summary = simulate(run_cfg, out / (f"eps-{eps:g}" if eps > 0 else "non-private"))
        spent = summary["privacy"]["max_site_epsilon"]
        rows.append((eps, summary["final_accuracy"], spent, time.monotonic() - t))
        print(
            f"epsilon {eps if eps > 0 else 'inf':>5}: accuracy {summary['final_accuracy']:.4f}  "
            f"max site epsilon spent {spent if spent is not None else '-'}  wall {rows[-1][3]:.0f}s",
            flush=True,
        )
    print(f"{'epsilon':>8} {'accuracy':>9} {'spent':>8} {'wall s':>7}")
    for eps, acc, spent, wall in rows:
        print(f"{eps if eps > 0 else 'inf':>8} {acc:>9.4f} {spent if spent is not None else float('nan'):>8.3f} {wall:>7.0f}")
    values = {f"acc_eps{eps:g}" if eps > 0 else "acc_nonprivate": acc for eps, acc, _s, _w in rows}
    values.update({f"wall_eps{eps:g}" if eps > 0 else "wall_nonprivate": wall for eps, _a, _s, wall in rows})
    result(**values, rounds=cfg.num_rounds, policy=cfg.policy, batch_size=cfg.batch_size, optimizer=cfg.optimizer)


if __name__ == "__main__":
    main()
