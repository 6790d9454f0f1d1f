"""The explainability report of a 10-site run vs a 1,000-site run: same structure, same time.

Reads the run folders `benchmarks/scale.py` wrote (``--runs``, its ``--out``) and writes
each run's report with `fedlens explain --model RUN --data fashion-mnist`, one run after
the other, timing each command. It compares what the reports hold: the sections of
``report.json``, the rows of the model card's site table, and the size of the HTML.

    python benchmarks/scale.py --out /tmp/bench/scale
    python benchmarks/report_scale.py --runs /tmp/bench/scale [--per-class 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import result


def _report(run: Path, per_class: int) -> dict[str, object]:
    out = run / "report"
    started = time.monotonic()
    subprocess.run(
        [str(Path(sys.executable).parent / "fedlens"), "explain", "--model", str(run), "--data", "fashion-mnist"]
        + ["--out", str(out), "--per-class", str(per_class)],
        check=True,
        capture_output=True,
    )
    seconds = time.monotonic() - started
    data = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()
    return {
        "s": seconds,
        "keys": sorted(data),
        "html_kb": len(html.encode()) / 1e3,
        "sites_trained": len(json.loads((run / "summary.json").read_text())["sites"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="the --out folder of benchmarks/scale.py")
    p.add_argument("--sites", default="10,1000", help="the two federation sizes to compare")
    p.add_argument("--per-class", type=int, default=3)
    args = p.parse_args()
    small_n, large_n = (int(n) for n in args.sites.split(","))
    small, large = (_report(Path(args.runs) / f"sites-{n}", args.per_class) for n in (small_n, large_n))
    for n, r in ((small_n, small), (large_n, large)):
        print(f"{n:>5} sites ({r['sites_trained']} trained): report in {r['s']:.1f} s, {r['html_kb']:.0f} kB of HTML", flush=True)
    result(
        report_ratio=float(large["s"]) / float(small["s"]),  # type: ignore[arg-type]
        html_ratio=float(large["html_kb"]) / float(small["html_kb"]),  # type: ignore[arg-type]
        same_sections=int(small["keys"] == large["keys"]),
        **{f"report_s_{small_n}": small["s"], f"report_s_{large_n}": large["s"]},
        **{f"sites_trained_{small_n}": small["sites_trained"], f"sites_trained_{large_n}": large["sites_trained"]},
    )


if __name__ == "__main__":
    main()
