"""PNG plots of a run's per-round metrics (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_rounds"]


def plot_rounds(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``accuracy.png`` and ``loss.png`` (server test set and site evaluation) per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    written = []
    for key, title in (("accuracy", "Accuracy"), ("loss", "Loss")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        rounds = [r["round"] for r in records]
        server = [r["server"].get(key) for r in records]
        ax.plot(rounds, server, marker="o", label="global model, server test set")
        fed = [(r["round"], r["federated_eval"][key]) for r in records if r.get("federated_eval", {}).get(key) is not None]
        if fed:
            ax.plot(*zip(*fed), marker="s", linestyle="--", label="global model, site evaluation (weighted)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(key)
        ax.set_title(f"{title} per round")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
