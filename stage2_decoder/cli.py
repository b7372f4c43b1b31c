"""The `decoder` command (stage 2). One function per sub-command; `train` is here so far.

Thin: options → ``TrainConfig`` → ``train.train``; errors a user can fix become one line
(exit 2), a non-finite loss too (exit 3), Ctrl-C says how to resume (exit 130).
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from shared import cli_support

app = typer.Typer(
    help="Stage 2 of samcache: fine-tune SAM's mask decoder from an embedding cache.",
    no_args_is_help=True,
    add_completion=False,
)
console = cli_support.console


def user_errors(out: str | None = None) -> AbstractContextManager[None]:
    """Known errors → one line without a traceback (exit 2; 3 for a non-finite loss).

    ``out``: the run folder of `decoder train`, named in the resume hint after Ctrl-C.
    """
    return cli_support.user_errors(
        {"NonFiniteLossError": 3, "CacheLockedError": 2}, lambda: _resume_hint(out)
    )


def _resume_hint(out: str | None) -> str:
    """How to continue after Ctrl-C: only once a checkpoint exists to continue from."""
    if not out:
        return ""
    if (Path(out) / "last.pt").is_file():
        return f"; continue with `decoder train --out {out} … --resume`"
    return f"; no checkpoint was written yet ({out}/last.pt): start the run again"


class RichProgress:
    """A rich progress bar over optimizer steps showing loss, lr and prompt-iterations/s."""

    def __init__(self) -> None:
        columns = (
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.bar = Progress(*columns, console=console, disable=not console.is_terminal)
        self.task: Any = None

    def start(self, total: int, completed: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=completed, info="")

    def advance(self, step: int, fields: dict[str, float]) -> None:
        info = None
        if "loss" in fields:
            info = (
                f"loss {fields['loss']:.4f}  lr {fields['lr']:.2e}  "
                f"{fields['prompt_it_per_s']:.1f} prompt-it/s"
            )
        self.bar.update(self.task, completed=step, **({"info": info} if info else {}))

    def message(self, text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        self.bar.stop()


_warn = cli_support.warn


@app.callback()
def _decoder() -> None:
    """Stage 2 of samcache: fine-tune SAM's mask decoder from an embedding cache."""


def _explicit_options(ctx: typer.Context) -> set[str]:
    """Names of the options the user typed (or set through the environment)."""
    given = {"COMMANDLINE", "ENVIRONMENT"}  # by name: typer may bring its own click
    return {n for n in ctx.params if getattr(ctx.get_parameter_source(n), "name", "") in given}


@app.command(cls=cli_support.SuggestingCommand)
def train(
    ctx: typer.Context,
    cache: Annotated[str, typer.Option(help="Cache made by `embed run` (with masks).")],
    out: Annotated[
        Path,
        typer.Option(help="Run folder: config.json, metrics.jsonl, last.pt, best.pt, curves.png."),
    ],
    prompts: Annotated[
        str, typer.Option(help="First prompt kinds: point, box or point,box (50/50).")
    ] = "point,box",
    epochs: Annotated[int, typer.Option(help="Passes over the train images.")] = 20,
    iterations: Annotated[
        int,
        typer.Option(help="Prompt iterations per object (SAM: 11 = 1 + 8 clicks + 2 mask-only)."),
    ] = 11,
    images_per_step: Annotated[
        int, typer.Option(help="Images per micro-batch (each embedding read once).")
    ] = 8,
    objects_per_image: Annotated[
        int, typer.Option(help="Objects per image and step (at most).")
    ] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = 0.01,
    warmup_steps: Annotated[
        int, typer.Option(help="Linear warm-up steps; -1: min(250, 5% of steps).")
    ] = -1,
    min_lr_ratio: Annotated[
        float, typer.Option(help="Cosine decay ends at this fraction of --lr.")
    ] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm (0: off).")] = 1.0,
    loss: Annotated[
        str, typer.Option(help="focal_dice (20·focal + dice, SAM) or bce_dice; + IoU-head MSE.")
    ] = "focal_dice",
    precision: Annotated[
        str, typer.Option(help="auto (bf16 where supported), fp32, bf16, fp16 (CUDA).")
    ] = "auto",
    train_prompt_encoder: Annotated[
        bool, typer.Option(help="Also train the prompt encoder (frozen by default).")
    ] = False,
    val_fraction: Annotated[
        float, typer.Option(help="Held-out images when the cache has no train/val split.")
    ] = 0.1,
    seed: Annotated[
        int, typer.Option(help="Seed of every random choice (data order, objects, prompts).")
    ] = 0,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="The SAM checkpoint the cache was made with, if it moved."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    num_workers: Annotated[
        int, typer.Option(help="DataLoader worker processes reading the cache.")
    ] = 2,
    log_every: Annotated[int, typer.Option(help="Write a metrics line every N steps.")] = 10,
    checkpoint_every: Annotated[
        int, typer.Option(help="Also write last.pt every N steps (0: at epoch ends only).")
    ] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last.pt.")
    ] = False,
    allow_partial_cache: Annotated[
        bool,
        typer.Option(help="Train on a cache an `embed run` is still writing (its images so far)."),
    ] = False,
    views: Annotated[
        str,
        typer.Option(
            help="Stored views (`embed run --views`) to train on too, e.g. hflip,vflip,rot90: "
            "each object is seen in the original or one of them, drawn uniformly per step. "
            "Validation stays on the originals."
        ),
    ] = "",
    replay: Annotated[
        str | None,
        typer.Option(
            help="A cache of the model's home domain (same SAM checkpoint) whose train images "
            "are mixed into every step, so the fine-tune forgets less of it."
        ),
    ] = None,
    replay_images: Annotated[
        int,
        typer.Option(
            help="--replay images added to each micro-batch; -1: as many as "
            "--images-per-step (1:1, the measured recipe; README)."
        ),
    ] = -1,
) -> None:
    """Fine-tune the mask decoder on the cache's objects; validate and checkpoint every epoch."""
    from stage2_decoder.config import TrainConfig  # light: bad options fail before torch loads

    progress = RichProgress()
    with user_errors(str(out)):
        config = TrainConfig(
            cache=cache, out=str(out), prompts=prompts, epochs=epochs, iterations=iterations,
            images_per_step=images_per_step, objects_per_image=objects_per_image,
            grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio, grad_clip=grad_clip, loss=loss, precision=precision,
            train_prompt_encoder=train_prompt_encoder, val_fraction=val_fraction, seed=seed,
            checkpoint=str(checkpoint) if checkpoint else None, device=device,
            num_workers=num_workers, log_every=log_every, checkpoint_every=checkpoint_every,
            resume=resume, allow_partial_cache=allow_partial_cache, views=views,
            replay=replay, replay_images=replay_images,
        )  # fmt: skip
        from stage2_decoder.train import train as run_training

        try:
            summary = run_training(
                config, explicit=_explicit_options(ctx), progress=progress, warn=_warn
            )
        finally:
            progress.stop()
    if not summary.is_main:  # ranks > 0 of a torchrun job: rank 0 reports
        return
    Console(soft_wrap=True).print(
        f"{summary.out}: {summary.steps} steps in {summary.seconds:.1f} s; best val mIoU "
        f"{summary.best_miou:.3f}; {summary.prompt_iterations_per_s:.2f} prompt-iterations/s, "
        f"{summary.embeddings_per_s:.0f} embeddings/s read",
        highlight=False,
    )


@app.command()
def serve(
    cache: Annotated[str, typer.Option(help="Cache made by `embed run`.")],
    run: Annotated[
        Path | None, typer.Option(help="Run folder of `decoder train` (shown beside zero-shot).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="The SAM checkpoint the cache was made with, if it moved.")
    ] = None,
    which: Annotated[str, typer.Option(help="best or last checkpoint of --run.")] = "best",
    labels: Annotated[
        Path, typer.Option(help="COCO instances JSON the accepted objects go to (made if absent).")
    ] = Path("labels.json"),
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated classes (default: the cache's classes).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port (0: any free one).")] = 8765,
    threads: Annotated[
        int, typer.Option(help="Torch threads per decoder call (0: torch's default).")
    ] = 0,
) -> None:
    """A click-to-segment labelling page on the cached embeddings (no encoder)."""
    import socket

    import uvicorn

    from stage2_decoder.serve import ServeConfig, build_app

    with user_errors():
        config = ServeConfig(
            cache=cache, run=str(run) if run else None,
            checkpoint=str(checkpoint) if checkpoint else None, which=which, labels=str(labels),
            classes=tuple(c.strip() for c in (classes or "").split(",") if c.strip()),
            host=host, port=port, threads=threads,
        )  # fmt: skip
        web_app = build_app(config)
        sock = socket.create_server((host, port))  # port 0: the system picks a free one
    url = f"http://{host}:{sock.getsockname()[1]}/"
    Console().print(f"labels: {labels.resolve()}\nopen {url}  (Ctrl-C stops)", highlight=False)
    server = uvicorn.Server(uvicorn.Config(web_app, log_level="warning"))
    server.run(sockets=[sock])


# Commands after training, defined in their own modules (registration only).
from stage2_decoder import cli_inference, cli_sweep  # noqa: E402  (declarations only: no torch)

app.command("eval", cls=cli_support.SuggestingCommand)(cli_inference.eval_command)
app.command("predict", cls=cli_support.SuggestingCommand)(cli_inference.predict_command)
app.command("amg", cls=cli_support.SuggestingCommand)(cli_inference.amg_command)
app.command("export", cls=cli_support.SuggestingCommand)(cli_inference.export_command)
app.command("sweep", cls=cli_support.SuggestingCommand)(cli_sweep.sweep_command)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    app()
