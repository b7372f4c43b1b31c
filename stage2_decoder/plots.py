"""Training curves as a PNG: train loss, val loss and val mIoU against the optimizer step.

Drawn from ``metrics.jsonl`` with matplotlib's Agg backend (no display needed) and written
atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from stage2_decoder.checkpoints import atomic_write, read_metrics

CURVES = "curves.png"


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list, list]:
    rows = [r for r in records if r.get("kind") == kind and r.get(key) is not None]
    return [r["step"] for r in rows], [r[key] for r in rows]


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Draw the curves of ``metrics_path`` into ``out_png`` (atomic write); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    figure = Figure(figsize=(10, 4), dpi=100)
    loss_ax, iou_ax = figure.subplots(1, 2)
    for kind, key, label in (("train", "loss", "train loss"), ("val", "val_loss", "val loss")):
        steps, values = _series(records, kind, key)
        if steps:
            loss_ax.plot(steps, values, label=label, marker="o" if kind == "val" else None)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    for key, label in (("miou", "mean"), ("miou_click", "1 click"), ("miou_box", "box")):
        steps, values = _series(records, "val", key)
        if steps:
            iou_ax.plot(steps, values, label=label, marker="o")
    iou_ax.set(xlabel="step", ylabel="mIoU (original resolution)", title="val mIoU", ylim=(0, 1))
    for axis in (loss_ax, iou_ax):
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write(out_png, lambda handle: handle.write(buffer.getvalue()))
