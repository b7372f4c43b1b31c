"""The `embed` command: `embed run`, `labels`, `compact`, `status`, `demo-data`.

Thin: options → EmbedConfig → ``pipeline.run_embed``; known errors become one line and exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Annotated

import typer

from shared import cli_support

app = typer.Typer(
    help="Stage 1 of samcache: encode images once into a Zarr embedding cache.",
    no_args_is_help=True,
    add_completion=False,
)
console, stdout = cli_support.console, cli_support.stdout


def user_errors() -> AbstractContextManager[None]:
    """Turn the errors a user can fix into one line without a traceback (exit code 2)."""
    from shared.storage import CacheLockedError

    return cli_support.user_errors({CacheLockedError: 2})


@contextmanager
def progress_bar() -> Iterator:
    with cli_support.progress(*cli_support.progress_columns(info="{task.fields[rate]}")) as bar:
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, rate="")
            task = bar.tasks[tasks[phase]]
            elapsed = task.elapsed or 0.0
            rate = f"{done / elapsed:.2f} img/s" if elapsed > 0 and phase == "encoding" else ""
            bar.update(tasks[phase], completed=done, total=total, rate=rate)

        yield update


@app.command(cls=cli_support.SuggestingCommand)
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
    ] = 500_000_000,  # shared.cache_format.DEFAULT_MAX_PIXELS
    download: Annotated[
        bool, typer.Option(help="Download the official checkpoint when it is not found.")
    ] = True,
    repair: Annotated[
        bool,
        typer.Option(help="Re-encode the images `embed verify` finds damaged (into their rows)."),
    ] = False,
    views: Annotated[
        str,
        typer.Option(
            help="Augmented views to store too, encoded once each: comma list of hflip, vflip, "
            "rot90 (rot90 = counter-clockwise). On an existing cache only missing views are "
            "encoded; the cache keeps every view asked so far."
        ),
    ] = "",
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
            repair=repair,
            views=views,
        )
        with progress_bar() as update:
            summary = run_embed(config, progress=update)
    _print_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


def _print_summary(summary) -> None:  # noqa: ANN001 - RunSummary
    out = stdout
    rate = f", {summary.images_per_second:.2f} images/s" if summary.encoded else ""
    if summary.repaired or summary.unrepaired:
        out.print(f"{summary.cache}: repaired {summary.repaired} damaged image(s)", highlight=False)
        for image_id, reason in summary.unrepaired:
            out.print(f"  not repaired {image_id}: {reason}", highlight=False, soft_wrap=True)
    out.print(
        f"{summary.cache}: {summary.total} images; {summary.cached_before} already cached, "
        + (f"{summary.relabelled} relabelled, " if summary.relabelled else "")
        + f"{summary.encoded} encoded, {len(summary.failed)} failed in {summary.seconds:.1f} s"
        + rate
        + ("" if summary.model_loaded else " (nothing to encode: model not loaded)"),
        highlight=False,
    )
    if summary.views:
        out.print(
            f"  views {','.join(summary.views)}: added to {summary.views_added} cached image(s)",
            highlight=False,
        )
    for image_id, note in summary.notes[:20]:
        out.print(f"  note {image_id}: {note}", highlight=False, soft_wrap=True)
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


@app.command()
def labels(
    cache: Annotated[str, typer.Option(help="The cache whose images get new annotations.")],
    masks: Annotated[
        Path | None, typer.Option(help="Folder of mask PNGs named <image_id>.png.")
    ] = None,
    mask_kind: Annotated[
        str, typer.Option(help="auto, binary or instance (how --masks PNGs are read).")
    ] = "auto",
    coco: Annotated[Path | None, typer.Option(help="COCO instances JSON.")] = None,
    voc: Annotated[
        Path | None, typer.Option(help="A VOC2007 folder (SegmentationObject/, ImageSets/).")
    ] = None,
) -> None:
    """Re-read annotations for images already in CACHE: no image file, no encoder needed."""
    from stage1_embed.config import LabelsConfig
    from stage1_embed.relabel import run_labels

    with user_errors():
        config = LabelsConfig(
            cache=cache,
            masks=str(masks) if masks else None,
            mask_kind=mask_kind,
            coco=str(coco) if coco else None,
            voc=str(voc) if voc else None,
        )
        with progress_bar() as update:
            summary = run_labels(config, progress=update)
    stdout.print(
        f"{summary.cache}: {summary.cached} cached images, {summary.named} named by the "
        f"annotations; {summary.relabelled} relabelled, {summary.unchanged} unchanged, "
        f"{len(summary.failed)} failed, 0 encoded in {summary.seconds:.1f} s",
        highlight=False,
    )
    for image_id, reason in summary.failed[:20]:
        stdout.print(f"  failed {image_id}: {reason}", highlight=False, soft_wrap=True)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def compact(
    cache: Annotated[str, typer.Argument(help="The cache (folder or URL).")],
) -> None:
    """Merge manifest fragments, drop superseded rows, free embedding rows nothing uses."""
    from stage1_embed.compact import compact_cache

    with user_errors():
        summary = compact_cache(cache)
    stdout.print(
        f"{summary.cache}: {summary.files_before} manifest files -> 1, "
        f"{summary.rows_dropped} superseded manifest rows dropped, {summary.rows_freed} "
        f"embedding rows freed ({summary.chunks_deleted} chunks deleted) in "
        f"{summary.seconds:.1f} s",
        highlight=False,
    )


@app.command()
def verify(
    cache: Annotated[str, typer.Argument(help="The cache (folder or URL).")],
) -> None:
    """Check every row: chunk whole, checksum, rows two images claim (exit 1: damaged)."""
    from stage1_embed.verify import format_report, verify_cache

    with user_errors(), progress_bar() as update:
        report = verify_cache(cache, progress=update)
    stdout.print(format_report(report))
    if not report.ok:
        raise typer.Exit(1)


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
