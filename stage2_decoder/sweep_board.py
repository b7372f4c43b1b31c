"""The sweep's leaderboard: each trial's state read from its run folder, the ranking, the median
early-stop rule, and the files of ``--out`` (``leaderboard.csv``, ``report.md``,
``val_miou.png``, ``best`` → the best trial's run folder, or ``best.txt`` where links fail).

A trial's run folder is an ordinary `decoder train` folder plus ``trial.json`` (written by the
worker, atomically): ``status`` running, done, stopped (early stop) or failed, ``seconds``
(training time over all its attempts), ``steps``, ``error`` and ``attempts`` (the step each
attempt started from). Its val mIoU per epoch comes from ``metrics.jsonl`` (``kind: val``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.files import atomic_write
from stage2_decoder import checkpoints as ck
from stage2_decoder.sweep_config import SWEPT, Trial

TRIALS, TRIAL_JSON = "trials", "trial.json"
LEADERBOARD, REPORT, PLOT, BEST_LINK, BEST_TXT = (
    "leaderboard.csv", "report.md", "val_miou.png", "best", "best.txt")  # fmt: skip
FINISHED = frozenset({"done", "stopped"})  # kept by --resume; failed and running are run again
MEDIAN_MIN_OTHERS = 2  # the median rule needs this many other trials at the epoch


def trial_folder(out: str | Path, trial: Trial) -> Path:
    return Path(out) / TRIALS / trial.name


def read_trial_json(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / TRIAL_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def val_curve(folder: Path) -> dict[int, float]:
    """Epoch → val mIoU from the run's ``metrics.jsonl`` (the latest line of an epoch wins)."""
    curve = {}
    for record in ck.read_metrics(folder / ck.METRICS):
        if record.get("kind") == "val" and isinstance(record.get("miou"), int | float):
            curve[int(record["epoch"])] = float(record["miou"])
    return curve


def best_until(curve: dict[int, float], epoch: int) -> float | None:
    """Best val mIoU of epochs 1..``epoch``; None if the trial has not reached ``epoch``."""
    if epoch not in curve:
        return None
    values = [v for e, v in curve.items() if e <= epoch and math.isfinite(v)]
    return max(values) if values else None


def median_rule(
    epoch: int, best: float, others: Sequence[float], *, grace: int,
    min_others: int = MEDIAN_MIN_OTHERS,
) -> bool:  # fmt: skip
    """Stop a trial after ``epoch`` when its best val mIoU so far is below the median of the
    other trials' best values at that epoch (only trials that reached it); never before
    ``grace`` epochs or with fewer than ``min_others`` such trials."""
    if epoch < grace or len(others) < min_others:
        return False
    return not best >= statistics.median(others)  # a NaN best stops too


def others_at(folders: Sequence[Path], epoch: int) -> list[float]:
    """The other trials' best val mIoU at ``epoch`` (those that reached it)."""
    values = [best_until(val_curve(folder), epoch) for folder in folders]
    return [v for v in values if v is not None]


@dataclass
class TrialRow:
    """One line of the leaderboard."""

    trial: Trial
    folder: Path
    status: str = "pending"
    best_miou: float = math.nan
    best_epoch: int = 0
    steps: int = 0
    seconds: float = 0.0
    error: str = ""
    curve: dict[int, float] = field(default_factory=dict)

    def csv_row(self, out: Path) -> dict[str, Any]:
        miou = f"{self.best_miou:.4f}" if math.isfinite(self.best_miou) else ""
        return {"trial": self.trial.name, **{n: self.trial.options.get(n, "") for n in SWEPT},
                "status": self.status, "best_val_miou": miou, "best_epoch": self.best_epoch or "",
                "steps": self.steps, "seconds": f"{self.seconds:.1f}",
                "run": os.path.relpath(self.folder, out), "error": self.error}  # fmt: skip


def read_row(out: Path, trial: Trial) -> TrialRow:
    folder = trial_folder(out, trial)
    state, curve = read_trial_json(folder), val_curve(folder)
    row = TrialRow(trial, folder, status=state.get("status", "pending"), curve=curve,
                   steps=int(state.get("steps", 0)), seconds=float(state.get("seconds", 0.0)),
                   error=str(state.get("error") or ""))  # fmt: skip
    finite = {e: v for e, v in curve.items() if math.isfinite(v)}
    if finite:
        row.best_epoch = max(finite, key=lambda e: (finite[e], -e))  # the first epoch of the max
        row.best_miou = finite[row.best_epoch]
    if not row.steps:
        records = ck.read_metrics(folder / ck.METRICS)
        row.steps = max((int(r.get("step", 0)) for r in records), default=0)
    return row


def ranked(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Best val mIoU first; trials without one last; ties by trial index."""

    def key(row: TrialRow) -> tuple[float, int]:
        return (-row.best_miou if math.isfinite(row.best_miou) else math.inf, row.trial.index)

    return sorted(rows, key=key)


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The best finished (done or stopped) trial with a val mIoU."""
    finished = [r for r in ranked(rows) if r.status in FINISHED and math.isfinite(r.best_miou)]
    return finished[0] if finished else None


def leaderboard_csv(rows: Sequence[TrialRow], out: Path) -> str:
    buffer = io.StringIO()
    columns = ["rank", *TrialRow(Trial(0, "", {}), out).csv_row(out)]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for rank, row in enumerate(ranked(rows), start=1):
        writer.writerow({"rank": rank, **row.csv_row(out)})
    return buffer.getvalue()


def report_markdown(rows: Sequence[TrialRow], out: Path, swept: Sequence[str]) -> str:
    best = best_row(rows)
    lines = ["# decoder sweep", ""]
    if best is not None:
        lines.append(f"Best trial: **{best.trial.name}**, val mIoU {best.best_miou:.4f} at epoch "
                     f"{best.best_epoch} (`{os.path.relpath(best.folder, out)}`, linked as "
                     "`best`).")  # fmt: skip
    else:
        lines.append("No trial has finished yet.")
    head = ["rank", "trial", *swept, "status", "best val mIoU", "epoch", "steps", "seconds"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, row in enumerate(ranked(rows), start=1):
        miou = f"{row.best_miou:.4f}" if math.isfinite(row.best_miou) else "–"
        cells = [str(rank), row.trial.name, *(str(row.trial.options.get(n, "")) for n in swept),
                 row.status, miou, str(row.best_epoch or "–"), str(row.steps),
                 f"{row.seconds:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![val mIoU per epoch]({PLOT})", ""]
    return "\n".join(lines)


def plot_trials(rows: Sequence[TrialRow], path: Path) -> Path:
    """Val mIoU against the epoch, one line per trial (the best one thick), Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    best = best_row(rows)
    figure = Figure(figsize=(8, 5), dpi=100)
    axis = figure.subplots()
    for row in rows:
        epochs = sorted(row.curve)
        if not epochs:
            continue
        thick = best is not None and row is best
        axis.plot(epochs, [row.curve[e] for e in epochs], marker="o", label=row.trial.name,
                  linewidth=3 if thick else 1, alpha=1.0 if thick else 0.7)  # fmt: skip
    axis.set(xlabel="epoch", ylabel="val mIoU (1 click and box)", title="val mIoU per trial")
    if axis.get_legend_handles_labels()[0] and len(rows) <= 16:
        axis.legend(fontsize="small")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def link_best(out: Path, best: TrialRow) -> Path:
    """``out/best`` → the best run folder (a relative symlink, replaced atomically); where a
    symlink cannot be made (or ``best`` is not ours), ``best.txt`` names the folder."""
    target = os.path.relpath(best.folder, out)
    link = out / BEST_LINK
    if link.is_symlink() or not link.exists():
        temp = out / f".{BEST_LINK}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            os.symlink(target, temp, target_is_directory=True)
            os.replace(temp, link)
            (out / BEST_TXT).unlink(missing_ok=True)
            return link
        except OSError:
            temp.unlink(missing_ok=True)
    text = f"{target}\n"
    return atomic_write(out / BEST_TXT, lambda handle: handle.write(text.encode()))


def write_board(out: Path, trials: Sequence[Trial], swept: Sequence[str]) -> list[TrialRow]:
    """Read every trial's state and rewrite the leaderboard files; returns the rows ranked."""
    rows = [read_row(out, trial) for trial in trials]
    csv_text = leaderboard_csv(rows, out)
    atomic_write(out / LEADERBOARD, lambda handle: handle.write(csv_text.encode()))
    plot_trials(rows, out / PLOT)
    report = report_markdown(rows, out, swept)
    atomic_write(out / REPORT, lambda handle: handle.write(report.encode()))
    best = best_row(rows)
    if best is not None:
        link_best(out, best)
    return ranked(rows)
