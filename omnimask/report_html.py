"""The demo's report as one self-contained HTML page, and its training-curve figure.

``render_html(markdown_text, base)`` renders the report's Markdown with Python-Markdown
(tables included) and embeds every local image as a data URI, so ``report.html`` opens
anywhere on its own; wide figures shrink to the page. ``training_curves(run, out)`` draws
the loss curves ``metrics.jsonl`` holds: pretraining per objective (train, smoothed, and
validation), and each fine-tuning run's train loss.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}
td.pass{color:#0a7d28;font-weight:600}td.short{color:#b00020;font-weight:600}
img{max-width:100%;height:auto;display:block;margin:.6em 0;border:1px solid #ddd}
strong{color:#a40000}code{background:#f3f3f3;padding:0 .2em}
"""
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def _embed(src: str, base: Path) -> str:
    """A data URI for a local image under ``base``; anything else stays as it was."""
    p = (base / src).resolve()
    if "://" in src or not p.is_file() or p.suffix.lower() not in MIME:
        return src
    data = base64.b64encode(p.read_bytes()).decode()
    return f"data:{MIME[p.suffix.lower()]};base64,{data}"


def render_html(markdown_text: str, base: str | Path, title: str = "omnimask demo") -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    body = re.sub(r'<img([^>]*?) src="([^"]+)"',
                  lambda m: f'<img{m.group(1)} src="{_embed(html.unescape(m.group(2)), Path(base))}"',
                  body)
    body = re.sub(r"<td>(pass|short)</td>", r'<td class="\1">\1</td>', body)
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def _rows(path: Path) -> list[dict]:
    out = []
    if not path.is_file():
        return out
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:  # a line torn by a kill
            continue
    return out


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], None
    a = 2.0 / (k + 1)
    for y in ys:
        acc = y if acc is None else a * y + (1 - a) * acc
        out.append(acc)
    return out


def training_curves(run: str | Path, out: str | Path,
                    finetune: dict[str, str] | None = None) -> Path | None:
    """``run/pretrain/metrics.jsonl`` (and ``finetune``: label -> run directory) as one
    PNG of loss curves; None when there is nothing to draw."""
    from .train.tasks.base import pyplot, save_figure

    plt = pyplot()
    pre = _rows(Path(run) / "pretrain" / "metrics.jsonl")
    ft = {k: _rows(Path(v) / "metrics.jsonl") for k, v in (finetune or {}).items()}
    ft = {k: v for k, v in ft.items() if any(r.get("split") == "train" for r in v)}
    if not pre and not ft:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    train = [r for r in pre if r.get("split") == "train" and "objective" in r]
    for obj in sorted({r["objective"] for r in train}):
        rs = [r for r in train if r["objective"] == obj and obj in r]
        if rs:
            axes[0].plot([r["step"] for r in rs], _smooth([r[obj] for r in rs], 20), label=obj)
    axes[0].set(title="pretraining: train loss per objective (smoothed)", xlabel="step",
                ylabel="loss", yscale="log")
    val = [r for r in pre if r.get("split") == "val" and "losses" in r]
    if val:
        first = val[0]["losses"]
        for obj in sorted(first):
            pts = [(r["step"], r["losses"][obj] / first[obj]) for r in val
                   if obj in r["losses"] and first[obj]]
            axes[1].plot(*zip(*pts, strict=True), marker="o", label=obj)
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].set(title="pretraining: validation loss / step 0", xlabel="step",
                ylabel="ratio (lower is better)")
    for label, rows in ft.items():  # one curve per task a run trains
        rows = [r for r in rows if r.get("split") == "train" and "loss" in r]
        for obj in sorted({r.get("objective", label) for r in rows}):
            rs = [r for r in rows if r.get("objective", label) == obj]
            axes[2].plot([r["step"] for r in rs], _smooth([r["loss"] for r in rs], 20),
                         label=obj if obj == label else f"{label}: {obj}")
    axes[2].set(title="fine-tuning: train loss (smoothed)", xlabel="step", ylabel="loss",
                yscale="log")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, Path(out), dpi=90)
