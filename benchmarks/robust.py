"""Malicious sites: final test accuracy under model poisoning, per aggregator, with and without DP.

10 sites share a seeded, stratified 20,000-image subset of Fashion-MNIST's training set
(Dirichlet alpha = 0.5 label skew: sites of 1,119 to 2,840 images at seed 0), 32 px (the
frozen part's outputs are cached once for every cell), 5 rounds, 5,000 test images,
through Flower's simulation engine (as ``fedlens simulate`` runs it). The grid: 0, 1 and 3 attacking sites (partition ids 0 / 0, 1, 2) x FedAvg, FedMedian,
FedTrimmedAvg and Krum x without and with DP-SGD, with the same seed and data in every
cell. DP runs use the DP-SGD defaults (SGD with momentum 0.9, epsilon 8, clipping 1,
rank-16 adapters) at Poisson batches of 64 with lr 0.125 (the default 0.5 scaled to the
batch) and reproducible noise (``dp-reproducible``), so that cells differ only in the
attackers and the aggregator; runs without DP take the non-private settings.

The attack (``--attack``, default ``scale`` with ``attack-scale = -4``): each attacker
trains honestly and sends ``global - 4 x delta``, its own update reversed and scaled.
Every value is finite, the shapes are right and the count is the site's own, so the
validator accepts it unless a norm bound applies: under DP the derived bound is a worst
case over DP-SGD's steps, about 5x an honest update's norm here, and a flip scaled by 4
stays within it (the run records every refusal in ``site_failures``; the table counts
them). ``--attack label-flip`` runs the same grid with label flipping.

Krum tolerates ``krum-byzantine = 3`` attackers (the most in the grid: Krum needs
``n > 2f + 2``, 10 > 8). FedTrimmedAvg keeps ``trim-beta = 0.2``: it trims 2 of 10 values
at each end of every coordinate, so 3 attackers exceed it.

    python benchmarks/robust.py [--quick] [--attack label-flip] [--attackers 0,1,3] [--dp 0,1] [--resume] [--out runs/bench-robust]
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from _common import config, parser, result, setup_logging

from fedlens.shared.config import NON_PRIVATE_SETTINGS, FedConfig
from fedlens.shared.rundir import RunDir
from fedlens.simulations.runner import SimulationFailed, simulate

AGGREGATORS = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
# DP-SGD at Poisson batches of 64 (sites of 1,119-2,840 images, 17-44 steps a round): the
# default lr 0.5 is tuned for batches of 256, and each step's noise grows as the batch shrinks.
PRIVATE = {"dp": True, "batch-size": 64, "lr": 0.125, "dp-reproducible": True}
# The non-private settings `dp = false` takes on the defaults (Adam, lr 1e-3, batch 64).
NON_PRIVATE = {"dp": False, **NON_PRIVATE_SETTINGS}


def _ended(run: RunDir, cfg: FedConfig) -> dict[str, Any] | None:
    """The summary of this very cell if a run ended it: finished, or stopped because the model diverged."""
    if not (run.path / "summary.json").is_file() or run.config() != cfg:
        return None
    summary: dict[str, Any] = run.read_json("summary.json")
    return summary if run.status().get("status") == "finished" or "diverged" in summary else None


def _cell(base: FedConfig, *, strategy: str, dp: bool, attackers: int, attack: str, out: Path, resume: bool) -> dict[str, Any]:
    sites = ",".join(str(i) for i in range(attackers))
    cfg = FedConfig.from_mapping(
        {**(PRIVATE if dp else NON_PRIVATE), "strategy": strategy, "attack": attack if attackers else "none", "attack-sites": sites},
        base=base,
    )
    run = RunDir(out / f"{strategy}-dp{int(dp)}-m{attackers}")
    summary = _ended(run, cfg) if resume else None  # this very cell, ended by an earlier invocation
    for attempt in (1, 2):
        if summary is not None:
            break
        shutil.rmtree(run.path, ignore_errors=True)
        try:
            summary = simulate(cfg, run.path)
        except SimulationFailed as exc:
            # A diverged model stops the run (exit 1): that is the cell's outcome. Anything else
            # (e.g. Ray's node timing out during startup on a loaded machine) gets one more try.
            summary = _ended(run, cfg)
            if summary is None and attempt == 2:
                raise
            if summary is None:
                logging.getLogger("fedlens").warning("%s failed (%s); running it again", run.path.name, exc)
    assert summary is not None
    accuracy = summary["final_accuracy"]
    return {
        # A diverged run publishes its last good model: the accuracy of that round (nan: none).
        "accuracy": float("nan") if accuracy is None else float(accuracy),
        "diverged": (summary.get("diverged") or {}).get("round"),
        "refused": sum(len(v) for v in (summary.get("site_failures") or {}).values()),
        "wall_s": float(summary["wall_seconds"]),
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--attack", default="scale", choices=("scale", "sign-flip", "label-flip"), help="what the attackers do")
    p.add_argument("--attackers", default="0,1,3", help="comma list of attacker counts (sites 0, 1, ... attack)")
    p.add_argument("--dp", default="0,1", help="comma list: 0 = without DP, 1 = with DP-SGD")
    p.add_argument("--resume", action="store_true", help="reuse the cells a run into --out finished with the same config")
    p.add_argument("--quick", action="store_true", help="smoke run: FedAvg and Krum, 0 and 3 attackers, 1 round, 2,000 images")
    args = p.parse_args()
    setup_logging()
    base = config(
        args,
        **{
            "dataset": "fashion-mnist",
            "num-sites": 10,
            "partition": "dirichlet",
            "alpha": 0.5,
            "max-train-images": 2000 if args.quick else 20000,
            "max-test-images": 5000,
            "image-size": 32,
            "num-rounds": 1 if args.quick else 5,
            "site-eval-fraction": 0.0,
            "report-per-class": 0,
            "attack-scale": -4.0,
            "trim-beta": 0.2,
            "krum-byzantine": 3,
            "seed": 0,
        },
    )
    out = Path(args.out)
    aggregators = ("fedavg", "krum") if args.quick else AGGREGATORS
    attackers = (0, 3) if args.quick else tuple(int(m) for m in args.attackers.split(","))
    dps = tuple(int(d) for d in args.dp.split(","))
    cells: dict[str, dict[str, Any]] = {}
    # Every aggregator under the strongest attack and clean first, with and without DP: a grid
    # cut short still compares them all.
    extremes = sorted({min(attackers), max(attackers)}, reverse=True)
    order = [(dp, s, m) for dp in dps for m in extremes for s in aggregators]
    order += [(dp, s, m) for dp in dps for s in aggregators for m in attackers if m not in extremes]
    for dp, strategy, m in order:
        name = f"{strategy}_dp{dp}_m{m}"
        cells[name] = _cell(base, strategy=strategy, dp=bool(dp), attackers=m, attack=args.attack, out=out, resume=args.resume)
        c = cells[name]
        print(f"cell {name}: accuracy {c['accuracy']:.4f}, {c['refused']} refused, diverged in round {c['diverged']}", flush=True)
    attack = f"{args.attack} (attack-scale {base.attack_scale:g})" if args.attack == "scale" else args.attack
    print(
        f"final test accuracy, {base.num_sites} sites, {base.num_rounds} rounds, attack {attack}; (n) = updates refused, "
        "* = the model diverged and the run stopped (the accuracy of the last good round, which it published)"
    )
    print(f"{'aggregator':<15}" + "".join(f"{f'dp={dp} m={m}':>17}" for dp in dps for m in attackers))
    for strategy in aggregators:
        row = [cells[f"{strategy}_dp{dp}_m{m}"] for dp in dps for m in attackers]
        print(f"{strategy:<15}" + "".join(f"{c['accuracy']:>10.4f}{'*' if c['diverged'] else ' '} ({c['refused']:>2})" for c in row))
    result(
        **{f"{s}_dp{dp}_m{m}": cells[f"{s}_dp{dp}_m{m}"]["accuracy"] for dp in dps for s in aggregators for m in attackers},
        refused=sum(c["refused"] for c in cells.values()),
        diverged=sum(1 for c in cells.values() if c["diverged"]),
        attack=args.attack,
        rounds=base.num_rounds,
        wall_s=sum(c["wall_s"] for c in cells.values()),
    )


if __name__ == "__main__":
    main()
