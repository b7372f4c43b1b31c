"""`decoder sweep`: declarations only (options → ``SweepConfig`` → ``sweep.run_sweep``, imported
inside the command), so that `decoder sweep --help` answers without importing torch or dask.
Registered on the `decoder` app by ``stage2_decoder.cli``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from shared import cli_support

LIST = "comma list (a,b,c) or, with --random, a range low:high"


def _axis_help(what: str, ranges: bool = True) -> Any:
    return typer.Option(help=f"{what}: {LIST if ranges else 'comma list'}.")


def sweep_command(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option(help="Sweep folder: sweep.json, trials/, leaderboard.csv, report.md.")
    ],
    cache: Annotated[
        str | None, typer.Option(help="Cache made by `embed run` (with masks); --resume reads it.")
    ] = None,
    lr: Annotated[str | None, _axis_help("Peak learning rates (a range is log-uniform)")] = None,
    prompts: Annotated[
        str | None,
        typer.Option(help='Prompt kinds, values separated by ";": "point;box;point,box".'),
    ] = None,
    iterations: Annotated[str | None, _axis_help("Prompt iterations per object")] = None,
    weight_decay: Annotated[str | None, _axis_help("AdamW weight decays")] = None,
    warmup_steps: Annotated[str | None, _axis_help("Warm-up steps (-1: the default)")] = None,
    images_per_step: Annotated[str | None, _axis_help("Images per micro-batch")] = None,
    objects_per_image: Annotated[str | None, _axis_help("Objects per image and step")] = None,
    loss: Annotated[str | None, _axis_help("Losses (focal_dice, bce_dice)", False)] = None,
    random: Annotated[
        int, typer.Option(help="Draw N trials (lists uniformly, ranges as said); 0: the grid.")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the draws and of every trial.")] = 0,
    epochs: Annotated[int, typer.Option(help="Epochs of every trial.")] = 10,
    early_stop: Annotated[
        str,
        typer.Option(
            help="none, or median: after an epoch >= --grace-epochs, stop a trial whose best val "
            "mIoU is below the median of the other trials' best at that epoch (needs 2 others)."
        ),
    ] = "none",
    grace_epochs: Annotated[int, typer.Option(help="No early stop before this epoch.")] = 1,
    val_fraction: Annotated[
        float, typer.Option(help="Held-out images when the cache has no train/val split.")
    ] = 0.1,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16, fp16 (CUDA).")] = "auto",
    checkpoint_every: Annotated[
        int, typer.Option(help="Trials write last.pt every N steps (a killed trial loses less).")
    ] = 20,
    log_every: Annotated[int, typer.Option(help="Trials write a metrics line every N steps.")] = 10,
    checkpoint: Annotated[
        Path | None, typer.Option(help="The SAM checkpoint the cache was made with, if it moved.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[
        int, typer.Option(help="Worker processes of the local Dask cluster (one trial each).")
    ] = 2,
    scheduler: Annotated[
        str | None, typer.Option(help="Run on this Dask scheduler (tcp://host:8786) instead.")
    ] = None,
    threads: Annotated[int, typer.Option(help="Torch threads per trial.")] = 1,
    resume: Annotated[
        bool, typer.Option(help="Continue the sweep in --out: finished trials are kept.")
    ] = False,
) -> None:
    """Sweep `decoder train` options on Dask; leaderboard, report and plot in --out."""
    from stage2_decoder.sweep_config import SweepConfig, parse_axis

    given = {
        "lr": lr, "prompts": prompts, "iterations": iterations, "loss": loss,
        "weight_decay": weight_decay, "warmup_steps": warmup_steps,
        "images_per_step": images_per_step, "objects_per_image": objects_per_image,
    }  # fmt: skip
    with cli_support.user_errors({"CacheLockedError": 2}):
        config = SweepConfig(
            cache=cache or "", out=str(out),
            axes=tuple(parse_axis(name, text) for name, text in given.items() if text is not None),
            random=random, seed=seed, epochs=epochs, early_stop=early_stop,
            grace_epochs=grace_epochs, val_fraction=val_fraction, precision=precision,
            checkpoint_every=checkpoint_every, log_every=log_every,
            checkpoint=str(checkpoint) if checkpoint else None, device=device, workers=workers,
            scheduler=scheduler, threads=threads,
        )  # fmt: skip
        _run(config, resume, cli_support.explicit_options(ctx))


def _run(config: Any, resume: bool, explicit: set[str]) -> None:
    from stage2_decoder.sweep import prepare, run_sweep

    config, trials = prepare(config, resume=resume, explicit=explicit)
    columns = cli_support.progress_columns("trials", "{task.fields[info]}")
    bar = cli_support.progress(*columns)

    def on_trial(done: int, total: int, row: Any) -> None:
        info = "" if row is None else f"{row.trial.name} {row.status}"
        bar.update(task, completed=done, total=total, info=info)
        if row is not None:
            miou = f"best val mIoU {row.best_miou:.4f}" if row.best_miou == row.best_miou else ""
            cli_support.console.print(
                f"{row.trial.name}: {row.status} {miou} {row.error}".rstrip(), highlight=False
            )

    try:
        with bar:
            task = bar.add_task("trials", total=len(trials), info="")
            rows = run_sweep(config, trials, on_trial)
    except KeyboardInterrupt:
        cli_support.console.print(
            f"interrupted; continue with `decoder sweep --out {config.out} --resume`"
        )
        raise typer.Exit(130) from None
    cli_support.stdout.print(_table(rows, [axis.name for axis in config.axes if axis.varies]))
    cli_support.stdout.print(f"wrote {config.out}/ (leaderboard.csv, report.md, val_miou.png)")


def _table(rows: list, swept: list[str]) -> Any:
    from rich.table import Table

    table = Table(title="decoder sweep")
    for column in ("rank", "trial", *swept, "status", "best val mIoU", "epoch", "steps", "s"):
        table.add_column(column)
    for rank, row in enumerate(rows, start=1):
        miou = f"{row.best_miou:.4f}" if row.best_miou == row.best_miou else "–"
        table.add_row(str(rank), row.trial.name, *(str(row.trial.options.get(n)) for n in swept),
                      row.status, miou, str(row.best_epoch or "–"), str(row.steps),
                      f"{row.seconds:.0f}")  # fmt: skip
    return table
