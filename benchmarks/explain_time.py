"""Time of a 100-image explainability report (all four methods), and its trust numbers.

Uses the model of a finished run (default: the newest `runs/default-*`, what
`bash .ci/simulate` writes) on the Fashion-MNIST test split, 10 images per class at
the run's resolution, on this machine's CPU cores. The bar is 120 s.

    python benchmarks/explain_time.py [--model RUN_DIR] [--per-class 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import result, setup_logging

from fedlens.shared.explain import ExplainOptions, explain

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="run folder or model.safetensors (default: newest runs/default-*)")
    p.add_argument("--per-class", type=int, default=10)
    args = p.parse_args()
    setup_logging()
    model = args.model
    if model is None:
        runs = sorted((REPO / "runs").glob("default-*/model.safetensors"), key=lambda f: f.stat().st_mtime)
        if not runs:
            raise SystemExit("no runs/default-* model; run `bash .ci/simulate` first or pass --model")
        model = runs[-1].parent
    out = Path(tempfile.mkdtemp(prefix="fedlens-explain-bench-"))
    started = time.monotonic()
    report = explain(model, "fashion-mnist", out, ExplainOptions(per_class=args.per_class))
    wall = time.monotonic() - started
    n = len(report["examples"])
    print(f"model {model}: {n} images explained, {len(report['methods'])} methods, {os.cpu_count()} CPU cores")
    print(f"{'method':<22} {'seconds':>8} {'faithfulness':>13} {'deletion':>9} {'insertion':>10} {'rand. rho':>10}  flagged")
    for name, t in report["trust"]["methods"].items():
        print(
            f"{name:<22} {t['seconds']:>8.1f} {t['faithfulness']:>+13.3f} {t['deletion_auc']:>9.3f} {t['insertion_auc']:>10.3f} "
            f"{t['randomisation_rank_correlation']:>10.2f}  {t['flagged']}"
        )
    chance = report["trust"]["chance"]
    print(
        f"chance: deletion {chance['deletion_auc']:.3f}  insertion {chance['insertion_auc']:.3f}; accuracy {report['performance']['accuracy']:.4f}"
    )
    result(
        images=n,
        report_s=wall,
        bar_s=120,
        ratio_to_bar=wall / 120,
        **{f"{k.replace('-', '_')}_faithfulness": v["faithfulness"] for k, v in report["trust"]["methods"].items()},
        **{f"{k.replace('-', '_')}_rand_rho": v["randomisation_rank_correlation"] for k, v in report["trust"]["methods"].items()},
    )


if __name__ == "__main__":
    main()
