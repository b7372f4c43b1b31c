"""`decoder eval` end to end: load the decoders, run ``evaluate``'s protocols, write reports.

Files written into ``--out``:

- ``metrics.json``: the config, how the images were chosen, the cache's model, and per model
  (``zero_shot``, ``fine_tuned``) every summary number, the mIoU curve after 1..max_clicks
  clicks, where its weights came from; ``difference`` = fine-tuned − zero-shot per number.
- ``objects.csv``: one row per object: image id, object index, instance / category, area, and
  per model the box IoU, IoU after each reported click count, NoC per threshold and the number
  of clicks evaluated.
- ``report.md``: the table zero-shot | fine-tuned | difference (also printed with rich).
- ``miou_vs_clicks.png``: mIoU vs clicks for both models, box mIoU dashed (clicks protocol only).

All files are written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from shared.output_folders import claim_output_folder
from stage2_decoder.checkpoints import atomic_write, write_json
from stage2_decoder.dataset import DataError
from stage2_decoder.evaluate import (
    EvalConfig,
    ObjectResult,
    evaluate_objects,
    select_images,
    summarize_model,
)
from stage2_decoder.export import FINE_TUNED, WHICH, ZERO_SHOT, Models, load_models
from stage2_decoder.metrics import miou_at_clicks, noc
from stage2_decoder.setup import resolve_device, resolve_precision
from stage2_decoder.visualize import plot_miou_vs_clicks

METRICS, OBJECTS, REPORT, PLOT = "metrics.json", "objects.csv", "report.md", "miou_vs_clicks.png"
TITLES = {"zero_shot": "zero-shot", "fine_tuned": "fine-tuned"}


@dataclass
class EvalReport:
    """Everything `decoder eval` found; ``summaries[model][key]`` as ``summarize_model`` gives."""

    config: EvalConfig
    selection: str
    cache: dict[str, str]
    sources: dict[str, str]
    summaries: dict[str, dict[str, float]]
    results: list[ObjectResult]
    skipped: int
    seconds: float = 0.0
    curves: dict[str, list[float]] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)  # files `write_reports` wrote

    @property
    def models(self) -> list[str]:
        return list(self.summaries)

    def difference(self) -> dict[str, float]:
        """fine-tuned − zero-shot for every number both have (empty with one model)."""
        if set(self.summaries) != {"zero_shot", "fine_tuned"}:
            return {}
        zero, tuned = self.summaries["zero_shot"], self.summaries["fine_tuned"]
        return {k: tuned[k] - zero[k] for k in zero if k in tuned and k != "n_objects"}

    def to_dict(self) -> dict[str, Any]:
        models = {}
        for name, summary in self.summaries.items():
            source, curve = self.sources.get(name, ""), self.curves.get(name, [])
            models[name] = {"source": source, **summary, "miou_curve": curve}
        return {
            "config": self.config.to_dict(), "selection": self.selection, "cache": self.cache,
            "n_objects": len(self.results), "n_skipped": self.skipped, "models": models,
            "difference": self.difference(), "seconds": self.seconds,
        }  # fmt: skip


def curves(results: list[ObjectResult], models: list[str], max_clicks: int) -> dict[str, list]:
    """mIoU after 1..max_clicks clicks per model (an object that stopped keeps its last IoU)."""
    out = {}
    for name in models:
        ious = [r.click_ious[name] for r in results if name in r.click_ious]
        if ious:
            out[name] = list(miou_at_clicks(ious, range(1, max_clicks + 1)).values())
    return out


def _label(key: str) -> str:
    if key == "box_miou":
        return "box mIoU"
    kind, _, value = key.partition("@")
    names = {
        "miou": f"mIoU @ {value} click" + ("s" if value != "1" else ""),
        "noc": f"NoC@{value} (lower is better)",
        "nof": f"NoF@{value} (never reached)",
    }
    return names.get(kind, key)


def table_rows(report: EvalReport) -> list[list[str]]:
    """Rows [label, value per model…, difference] of the summary table."""
    diff = report.difference()
    first = report.summaries[report.models[0]]
    rows = []
    for key in (k for k in first if k != "n_objects"):
        integer = key.startswith(("noc", "nof"))
        fmt = "{:.2f}" if integer else "{:.4f}"
        row = [_label(key)] + [fmt.format(report.summaries[m][key]) for m in report.models]
        if diff:
            row.append(("{:+.2f}" if integer else "{:+.4f}").format(diff[key]))
        rows.append(row)
    return rows


def headers(report: EvalReport) -> list[str]:
    names = [TITLES.get(m, m) for m in report.models]
    return ["metric", *names] + (["difference"] if report.difference() else [])


def markdown(report: EvalReport) -> str:
    """The summary table as Markdown, with a line on what was evaluated."""
    head = headers(report)
    lines = [
        f"# decoder eval: {report.cache.get('model_type', '?')}, {len(report.results)} objects",
        "",
        f"Images: {report.selection}; {report.skipped} object(s) skipped (all void). "
        "IoU at the original resolution, void excluded.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    if report.cache.get("model_type") == "samcache_tiny":
        lines += ["", "samcache_tiny is a demonstration model trained on synthetic shapes, "
                  "not a substitute for SAM."]  # fmt: skip
    return "\n".join(lines) + "\n"


def rich_table(report: EvalReport) -> Table:
    table = Table(title=f"decoder eval: {len(report.results)} objects ({report.selection})")
    for i, name in enumerate(headers(report)):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in table_rows(report):
        table.add_row(*row)
    return table


def _csv_text(report: EvalReport) -> str:
    config, buffer = report.config, io.StringIO()
    columns = ["image_id", "object_index", "instance_id", "category_id", "category", "area"]
    for m in report.models:
        columns += [f"{m}_box_iou"] if "box" in config.protocols else []
        if "clicks" in config.protocols:
            columns += [f"{m}_iou@{k}" for k in config.clicks]
            columns += [f"{m}_noc@{round(t * 100)}" for t in config.noc_thresholds]
            columns += [f"{m}_clicks_evaluated"]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in report.results:
        row: list[Any] = [r.image_id, r.index, r.instance_id, r.category_id, r.category, r.area]
        for m in report.models:
            row += [f"{r.box_iou[m]:.6f}"] if "box" in config.protocols else []
            if "clicks" in config.protocols:
                seq = r.click_ious[m]
                row += [f"{seq[min(k, len(seq)) - 1]:.6f}" for k in config.clicks]
                row += [noc(seq, t, config.max_clicks) for t in config.noc_thresholds]
                row += [len(seq)]
        writer.writerow(row)
    return buffer.getvalue()


def write_reports(report: EvalReport, out: str | Path) -> list[Path]:
    """Write the reports into ``out`` (created); returns the paths written.

    ``miou_vs_clicks.png`` only when the clicks protocol ran (there is no curve otherwise).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_text, md_text = _csv_text(report), markdown(report)
    written = [
        write_json(out / METRICS, report.to_dict()),
        atomic_write(out / OBJECTS, lambda handle: handle.write(csv_text.encode())),
        atomic_write(out / REPORT, lambda handle: handle.write(md_text.encode())),
    ]
    if report.curves:
        summaries = report.summaries.items()
        box = {TITLES.get(m, m): s["box_miou"] for m, s in summaries if "box_miou" in s}
        named = {TITLES.get(m, m): values for m, values in report.curves.items()}
        written.append(plot_miou_vs_clicks(named, box, out / PLOT))
    return written


# --------------------------------------------------------------------------- running


def run_eval(config: EvalConfig, progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Load the decoders, evaluate the split's objects, write the reports into ``config.out``."""
    started = time.perf_counter()
    claim_output_folder(config.out, "decoder eval")
    models = load_models(
        config.cache, run=config.run, checkpoint=config.checkpoint, which=config.which
    )
    device = resolve_device(config.device)
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))
    models.to(device)
    images, how = select_images(models.cache, config.split, models.run_state)
    results, skipped = evaluate_objects(
        models.decoders, config.cache, images, config, device, progress
    )
    if not results:
        raise DataError(f"every object of --split {config.split} lies in the void region")
    names = list(models.decoders)
    attrs = models.cache.attrs
    report = EvalReport(
        config=config,
        selection=how,
        cache={
            "path": models.cache.name,
            "model_type": attrs.model_type,
            "checkpoint_name": attrs.checkpoint_name,
            "checkpoint_sha256": attrs.checkpoint_sha256,
        },
        sources=_sources(models, config.which),
        summaries={name: summarize_model(results, name, config) for name in names},
        results=results,
        skipped=skipped,
        curves=curves(results, names, config.max_clicks),
    )
    report.seconds = time.perf_counter() - started
    report.written = write_reports(report, config.out)
    return report


def _sources(models: Models, which: str) -> dict[str, str]:
    sources = {}
    if models.sam_checkpoint is not None:
        sources[ZERO_SHOT] = f"{models.sam_checkpoint} (the cache's checkpoint)"
    if models.run is not None and models.run_state is not None:
        step = models.run_state.get("step", "?")
        sources[FINE_TUNED] = f"{models.run / WHICH[which]} (step {step})"
    return sources


# --------------------------------------------------------------------------- the command


def _numbers(text: str, kind: type, option: str) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated numbers") from None
