"""The report as one self-contained HTML file: every figure is an embedded PNG, no network."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np
import torch

__all__ = ["render_html", "overlays", "HEATMAP_CAVEAT", "TRUST_CAVEAT"]

# What a heat map is and is not: the report's wording, also shown next to every overlay `fedlens serve` returns.
HEATMAP_CAVEAT = "Heat maps explain one model's answer; they are not a diagnosis and do not prove the model is right."
TRUST_CAVEAT = (
    "The methods look at the model differently and often disagree. Trust the ones with a good faithfulness score "
    "and no red flag in the explainability report (`fedlens explain`)."
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;line-height:1.45}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #eee;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0} td,th{border:1px solid #ddd;padding:.25rem .55rem;text-align:right}
th{background:#f6f6f6} td.l,th.l{text-align:left}
.flag{color:#b00020;font-weight:600} .ok{color:#1b7f3b;font-weight:600} .muted{color:#666}
.row{display:flex;gap:.5rem;align-items:flex-start;margin:.4rem 0} .row figure{margin:0;text-align:center;font-size:.8rem}
.row img{width:120px;height:120px;image-rendering:pixelated;border:1px solid #ccc}
.wrong{background:#fff3f3} .card{background:#f8f9fb;border:1px solid #e3e6ee;padding:.8rem 1.1rem;border-radius:6px}
.howto li{margin:.3rem 0}
"""

# Reports every image that failed to load and every script error into <body> attributes,
# so an automated check (headless browser) can read them; people see the status line.
_SCRIPT = """
window.__errors = 0;
window.addEventListener('error', function () { window.__errors += 1; document.body.dataset.errors = window.__errors; }, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = ok + '/' + imgs.length;
  document.body.dataset.errors = window.__errors;
  document.getElementById('status').textContent = ok === imgs.length ? '' : (imgs.length - ok) + ' image(s) failed to load';
});
"""


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _tag(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def overlays(images: torch.Tensor, maps: dict[str, torch.Tensor]) -> list[dict[str, str]]:
    """Per example: the image, and each method's map blended over it, as data URLs."""
    from matplotlib import colormaps

    cmap = colormaps["inferno"]
    size = next(iter(maps.values())).shape[-2:] if maps else images.shape[-2:]
    base = torch.nn.functional.interpolate(images.float(), size=tuple(size), mode="bilinear", align_corners=False)
    unit = (base.mean(1) if base.shape[1] != 1 else base[:, 0]).clamp(0, 255).numpy() / 255.0
    out = []
    for i in range(len(images)):
        grey = np.repeat(unit[i][..., None], 3, axis=2)
        row = {"image": _img((grey * 255).astype(np.uint8))}
        for name, m in maps.items():
            heat = m[i].numpy()
            top = np.percentile(heat, 99)
            top = top if top > 0 else heat.max()  # sparse maps: most pixels exactly 0
            heat = np.clip(heat / top, 0, 1) if top > 0 else np.zeros_like(heat)
            colour = cmap(heat)[..., :3]
            blend = 0.45 * grey + 0.55 * colour
            row[name] = _img((blend * 255).astype(np.uint8))
        out.append(row)
    return out


def _confusion(conf: list[list[int]], classes: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(conf, dtype=float)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(classes), 0.8 + 0.5 * len(classes)))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for (r, c), v in np.ndenumerate(m):
        ax.text(c, r, f"{int(v)}", ha="center", va="center", fontsize=7, color="white" if rows[r, c] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _png(fig)


def _roc(roc: dict[str, dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, r in roc.items():
        ax.plot(r["fpr"], r["tpr"], lw=1.2, label=f"{name} (AUC {r['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _curves(trust: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = np.linspace(0, 1, 11)
    for name, t in trust["methods"].items():
        axes[0].plot(xs, t["deletion_curve"], label=name)
        axes[1].plot(xs, t["insertion_curve"], label=name)
    axes[0].set_title("deletion (lower is better)")
    axes[1].set_title("insertion (higher is better)")
    for ax in axes:
        ax.set_xlabel("fraction of pixels removed / inserted")
        ax.set_ylabel("probability of the predicted class")
    axes[1].legend(fontsize=7)
    return _png(fig)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))


# Up to this many sites the model card lists each one; a larger federation gets a summary.
SITE_ROWS = 20


def _site_privacy(sites: dict[str, Any]) -> str:
    """The privacy each site spent: one row per site, or for a large federation its spread and the top spenders.

    A site's value is ``{"epsilon", "delta"}``, or a string (``"not private"``) for a site
    that trained without DP-SGD.
    """
    e = html.escape
    header = "<table><tr><th class='l'>site</th><th>epsilon spent</th><th>delta</th></tr>"

    def row(name: str, v: Any) -> str:
        if not isinstance(v, dict):
            return f"<tr><td class='l'>{e(name)}</td><td colspan=2>{e(str(v))}</td></tr>"
        return f"<tr><td class='l'>{e(name)}</td><td>{v['epsilon']:.3f}</td><td>{v['delta']:.1e}</td></tr>"

    if len(sites) <= SITE_ROWS:
        return header + "".join(row(s, v) for s, v in sites.items()) + "</table>"
    private = {s: v for s, v in sites.items() if isinstance(v, dict)}
    others = len(sites) - len(private)
    text = f"<p>{len(sites)} sites trained"
    text += f"; {others} of them without DP-SGD" if others else ""
    if not private:
        return text + ".</p>"
    eps = np.array([v["epsilon"] for v in private.values()])
    deltas = sorted({v["delta"] for v in private.values()})
    top = sorted(private.items(), key=lambda kv: -kv[1]["epsilon"])[:5]
    return (
        text + f". Epsilon spent: min {eps.min():.3f}, median {np.median(eps):.3f}, max {eps.max():.3f}; "
        f"delta {', '.join(f'{d:.1e}' for d in deltas)}. The five largest spenders:</p>"
        + header
        + "".join(row(s, v) for s, v in top)
        + "</table><p>Every site's figures: <code>summary.json</code> (<code>privacy.sites</code>) in the run folder, "
        "or a site's ledger with <code>fedlens privacy show RUN/sites/SITE</code>.</p>"
    )


def render_html(report: dict[str, Any], images: torch.Tensor, maps: dict[str, torch.Tensor]) -> str:
    """The report page; ``images`` are the explained examples (uint8) in report order."""
    import matplotlib

    matplotlib.use("Agg")
    e = html.escape
    card, perf, trust = report["model"], report["performance"], report["trust"]
    classes = perf["classes"]
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fedlens report: {e(card['backbone'])}</title>",
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
    ]
    parts.append(
        f"<h1>Explainability report</h1><p class='muted'>{e(str(card['file']))} on {e(report['data']['source'])} "
        f"({report['data']['images']} images) · generated in __SECONDS__ s <span id='status'></span></p>"
    )

    parts.append("<h2>How to read this report</h2><div class='card howto'><ul>")
    parts += [
        f"<li>{t}</li>"
        for t in (
            "<b>Performance</b> says how often the model is right on these images, overall and per class. The grid shows which classes it confuses: the darker a square off the diagonal, the more often the row's class is taken for the column's.",
            "<b>Heat maps</b> show which parts of an image the model relied on for its answer: bright = mattered more. Look for whether the bright areas are where the evidence should be (the lesion, the product), not on borders, labels, rulers or background.",
            "The four methods look at the model differently and often disagree. Trust the ones with a <span class='ok'>good faithfulness score</span> and <b>no red flag</b> in the table below.",
            "A <span class='flag'>flag</span> means the method draws almost the same map for a model that learnt nothing (random weights). Its maps then show the image's edges, not the model's reasoning: do not use them to judge the model.",
            "Misclassified examples (pink rows) are shown on purpose: a heat map on the wrong region is a hint of what misled the model.",
            HEATMAP_CAVEAT,
        )
    ]
    parts.append("</ul></div>")

    parts.append("<h2>Model card</h2><table>")
    rows = [
        ("backbone", card["backbone"]),
        ("weights", card["weights"]),
        ("fine-tuned part", f"{card['policy']} (low-rank adapters r={card['lora_rank']})" if card["lora_rank"] else card["policy"]),
        ("rounds", card["rounds"]),
        ("sites", card["sites"]),
        ("strategy", card["strategy"]),
        ("training data", card["dataset"]),
        ("image size", f"{card['image_size']} px"),
    ]
    if card["private"] is None:
        rows.append(("privacy", "unknown (no privacy record next to this model: summary.json missing or older than DP support)"))
    elif card["private"]:
        rows.append(("privacy", "differentially private (DP-SGD at every site)"))
    else:
        rows.append(("privacy", f"NOT private: {card['privacy_reason']}"))
    parts += [f"<tr><th class='l'>{e(k)}</th><td class='l'>{e(str(v))}</td></tr>" for k, v in rows]
    parts.append("</table>")
    if card.get("site_privacy"):
        parts.append(_site_privacy(card["site_privacy"]))

    parts.append("<h2>Performance</h2>")
    parts.append(
        f"<p>accuracy <b>{_fmt(perf['accuracy'])}</b> · macro precision {_fmt(perf['macro_precision'])} · macro recall "
        f"{_fmt(perf['macro_recall'])} · macro F1 <b>{_fmt(perf['macro_f1'])}</b> · macro ROC-AUC {_fmt(perf['roc_auc_macro'])}. "
        f"Hardest classes (lowest F1): {e(', '.join(perf['hardest_classes']))}.</p>"
    )
    parts.append("<table><tr><th class='l'>class</th><th>images</th><th>precision</th><th>recall</th><th>F1</th><th>ROC-AUC</th></tr>")
    for c, name in enumerate(classes):
        parts.append(
            f"<tr><td class='l'>{e(name)}</td><td>{perf['support'][c]}</td><td>{_fmt(perf['precision'][c])}</td><td>{_fmt(perf['recall'][c])}</td>"
            f"<td>{_fmt(perf['f1'][c])}</td><td>{_fmt(perf['roc_auc'][c])}</td></tr>"
        )
    parts.append("</table>")
    parts.append(
        f"<div class='row'><figure>{_tag(_confusion(perf['confusion'], classes), 'confusion matrix').replace('<img ', '<img style=width:auto;height:auto ')}<figcaption>confusion matrix (rows: true class)</figcaption></figure>"
    )
    if perf["roc"]:
        parts.append(
            f"<figure>{_tag(_roc(perf['roc']), 'ROC curves').replace('<img ', '<img style=width:auto;height:auto ')}<figcaption>one-vs-rest ROC curves</figcaption></figure>"
        )
    parts.append("</div>")

    parts.append("<h2>How far to trust each method</h2>")
    parts.append(
        "<p>Faithfulness: how much faster the predicted class's probability falls when the pixels a method ranks highest are removed, and recovers when only they are kept, than with a random ranking (0 = no better than chance). "
        "Randomisation check: rank correlation between the maps of this model and of the same network with random weights (Adebayo et al., 2018); "
        f"at or above {trust['sanity_flag_at']} the method is flagged.</p>"
    )
    parts.append(
        "<table><tr><th class='l'>method</th><th>faithfulness</th><th>deletion AUC</th><th>insertion AUC</th><th>randomisation ρ</th><th class='l'>verdict</th></tr>"
    )
    for name, t in trust["methods"].items():
        verdict = (
            "<span class='flag'>flagged: maps barely depend on the model</span>"
            if t["flagged"]
            else ("<span class='ok'>passes</span>" if t["faithfulness"] > 0 else "no better than chance")
        )
        parts.append(
            f"<tr><td class='l'>{e(report['methods'][name]['title'])}</td><td>{t['faithfulness']:+.3f}</td><td>{t['deletion_auc']:.3f}</td>"
            f"<td>{t['insertion_auc']:.3f}</td><td>{_fmt(t['randomisation_rank_correlation'], 2)}</td><td class='l'>{verdict}</td></tr>"
        )
    parts.append(
        f"</table><p class='muted'>chance level: deletion AUC {trust['chance']['deletion_auc']:.3f}, insertion AUC {trust['chance']['insertion_auc']:.3f}</p>"
    )
    parts.append(
        f"<figure>{_tag(_curves(trust), 'deletion and insertion curves').replace('<img ', '<img style=width:auto;height:auto ')}</figure>"
    )

    parts.append(
        "<h2>What the model looks at</h2><p>"
        + " · ".join(f"<b>{e(m['title'])}</b>: {e(m['summary'])}" for m in report["methods"].values())
        + "</p>"
    )
    rows_html = overlays(images, maps)
    current = None
    for ex, row in zip(report["examples"], rows_html):
        if ex["label"] != current:
            current = ex["label"]
            parts.append(f"<h3>{e(current)}</h3>")
        caption = f"true {ex['label']}<br>predicted {ex['predicted']} ({ex['confidence']:.0%})"
        figs = [f"<figure>{_tag(row['image'], 'image')}<figcaption>{e(caption).replace('&lt;br&gt;', '<br>')}</figcaption></figure>"]
        figs += [f"<figure>{_tag(row[n], n)}<figcaption>{e(report['methods'][n]['title'])}</figcaption></figure>" for n in maps]
        parts.append(f"<div class='row{'' if ex['correct'] else ' wrong'}'>{''.join(figs)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
