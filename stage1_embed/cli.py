"""The `embed` command: `embed run`, `embed status`, `embed demo-data`.

Thin: options → EmbedConfig → ``pipeline.run_embed``; known errors become one line and exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

app = typer.Typer(
    help="Stage 1 of samcache: encode images once into a Zarr embedding cache.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
stdout = Console(soft_wrap=True, highlight=False)  # summaries stay one line per fact (greppable)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one line without a traceback (exit code 2)."""
    from shared.cache_format import CacheFormatError, CacheMismatchError
    from shared.storage import CacheLockedError

    try:
        yield
    except (ValueError, OSError, CacheFormatError, CacheMismatchError, CacheLockedError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def progress_bar() -> Iterator:
    columns = (
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, rate="")
            task = bar.tasks[tasks[phase]]
            elapsed = task.elapsed or 0.0
            rate = f"{done / elapsed:.2f} img/s" if elapsed > 0 and phase == "encoding" else ""
            bar.update(tasks[phase], completed=done, total=total, rate=rate)

        yield update


@app.command()
def run(
    images: Annotated[
        Path, typer.Option(help="Folder of images (jpg, jpeg, png, bmp, tif, webp).")
    ],
    out: Annotated[str, typer.Option(help="Cache to create or complete (folder or s3:// URL).")],
    model_type: Annotated[
        str,
        typer.Option(
            help="vit_b, vit_l, vit_h; samcache_tiny (bundled demonstration model trained on "
            "synthetic shapes, NOT a substitute for SAM); vit_tiny_random (NOT pretrained: tests)."
        ),
    ] = "vit_b",
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Official SAM checkpoint (.pth). Default: the cache dir, else download."),
    ] = None,
    recursive: Annotated[bool, typer.Option(help="Look for images in subfolders too.")] = True,
    masks: Annotated[
        Path | None, typer.Option(help="Folder of mask PNGs named like the images.")
    ] = None,
    mask_kind: Annotated[
        str, typer.Option(help="auto, binary or instance (how --masks PNGs are read).")
    ] = "auto",
    coco: Annotated[Path | None, typer.Option(help="COCO instances JSON for the images.")] = None,
    dtype: Annotated[
        str, typer.Option(help="Storage dtype of embeddings: float16 or float32.")
    ] = "float16",
    precision: Annotated[
        str, typer.Option(help="Encoder precision: auto (bf16 where supported), fp32, bf16, fp16.")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[
        int, typer.Option(help="Images per encoder forward (0: 1 on CPU, 8 on CUDA).")
    ] = 0,
    workers: Annotated[
        int,
        typer.Option(help="1: encode in this process; N>1: a local Dask cluster of N processes."),
    ] = 1,
    scheduler: Annotated[
        str | None, typer.Option(help="Address of a running Dask scheduler, e.g. tcp://host:8786.")
    ] = None,
    max_pixels: Annotated[
        int, typer.Option(help="Refuse images larger than this (decompression-bomb guard).")
    ] = 500_000_000,
    download: Annotated[
        bool, typer.Option(help="Download the official checkpoint when it is not found.")
    ] = True,
) -> None:
    """Encode every image of IMAGES once into the cache OUT (resumable; never encodes twice)."""
    from stage1_embed.config import EmbedConfig
    from stage1_embed.pipeline import run_embed

    with user_errors():
        config = EmbedConfig(
            images=str(images),
            out=out,
            model_type=model_type,
            checkpoint=str(checkpoint) if checkpoint else None,
            recursive=recursive,
            masks=str(masks) if masks else None,
            mask_kind=mask_kind,
            coco=str(coco) if coco else None,
            dtype=dtype,
            precision=precision,
            device=device,
            batch_size=batch_size,
            workers=workers,
            scheduler=scheduler,
            max_pixels=max_pixels,
            download=download,
        )
        with progress_bar() as update:
            summary = run_embed(config, progress=update)
    _print_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


def _print_summary(summary) -> None:  # noqa: ANN001 - RunSummary
    out = stdout
    rate = f", {summary.images_per_second:.2f} images/s" if summary.encoded else ""
    out.print(
        f"{summary.cache}: {summary.total} images; {summary.cached_before} already cached, "
        f"{summary.encoded} encoded, {len(summary.failed)} failed in {summary.seconds:.1f} s{rate}"
        + ("" if summary.model_loaded else " (nothing to encode: model not loaded)"),
        highlight=False,
    )
    for image_id, reason in summary.failed[:20]:
        out.print(f"  failed {image_id}: {reason}", highlight=False, soft_wrap=True)
    if len(summary.failed) > 20:
        out.print(f"  … and {len(summary.failed) - 20} more: see `embed status {summary.cache}`")


@app.command()
def status(
    cache: Annotated[str, typer.Argument(help="The cache (folder or URL).")],
    failures: Annotated[int, typer.Option(help="How many failures to list.")] = 20,
) -> None:
    """Counts, failures with reasons, model and checkpoint, size on disk."""
    from stage1_embed.status import cache_status, format_status

    with user_errors():
        report = cache_status(cache)
    stdout.print(format_status(report, max_failures=failures))


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Folder to write a VOCdevkit/VOC2007 layout into.")],
    n_images: Annotated[int, typer.Option(help="Number of images.")] = 24,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    domain: Annotated[
        str,
        typer.Option(
            help="home (what samcache_tiny was pretrained on) or shifted (new shapes, "
            "colours, textures, lighting, noise)."
        ),
    ] = "home",
) -> None:
    """Write a synthetic PASCAL-VOC-layout dataset (shapes with instance masks, void borders)."""
    from stage1_embed.synthetic import make_synthetic_voc

    with user_errors():
        voc = make_synthetic_voc(out, n_images=n_images, seed=seed, domain=domain)
    stdout.print(
        f"wrote {n_images} {domain} images to {voc}; next: embed run --images "
        f"{voc / 'JPEGImages'} --out cache.zarr --model-type samcache_tiny"
    )


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
