"""The `decoder` commands that use a trained decoder: eval, predict, amg, export.

Declarations only (options → config → the module that does the work, imported inside each
command), so that `decoder … --help` and a refused option answer without importing torch.
Registered on the `decoder` app by ``stage2_decoder.cli``; nothing imports this module but it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from shared import cli_support

console = cli_support.console
SPLITS_HELP = "train, val, test (the manifest's split column, else the run's split) or all"


def user_errors() -> AbstractContextManager[None]:
    """Errors a user can fix → one line (exit 2), as for every samcache command."""
    return cli_support.user_errors({"CacheLockedError": 2})


def eval_command(
    cache: Annotated[str, typer.Option(help="Cache made by `embed run` with masks.")],
    out: Annotated[Path, typer.Option(help="Report folder: metrics.json, objects.csv, …")],
    run: Annotated[
        Path | None, typer.Option(help="Run folder of `decoder train`: adds the fine-tuned model.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="The SAM checkpoint the cache was made with, if it moved.")
    ] = None,
    which: Annotated[str, typer.Option(help="best or last checkpoint of --run.")] = "best",
    split: Annotated[str, typer.Option(help=SPLITS_HELP)] = "val",
    protocols: Annotated[str, typer.Option(help="box, clicks or box,clicks.")] = "box,clicks",
    clicks: Annotated[str, typer.Option(help="Report mIoU after these clicks.")] = "1,2,3,5,9",
    max_clicks: Annotated[int, typer.Option(help="Click budget per object (NoC cap).")] = 20,
    noc: Annotated[str, typer.Option(help="NoC IoU thresholds.")] = "0.85,0.90",
    box_jitter: Annotated[
        float, typer.Option(help="Box noise: ±fraction of the side (max 20 px); 0 = exact box.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the box jitter.")] = 0,
    images_per_batch: Annotated[int, typer.Option(help="Images read together.")] = 16,
    objects_per_call: Annotated[int, typer.Option(help="Objects per decoder call (memory).")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (CUDA).")] = "fp32",
) -> None:
    """Zero-shot vs fine-tuned decoder: box and interactive clicks, at the original resolution."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from stage2_decoder.eval_report import EvalConfig, _numbers, rich_table, run_eval

    columns = ("eval", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=console, disable=not console.is_terminal)
    with user_errors(), bar:
        task = bar.add_task("eval", total=None)
        config = EvalConfig(
            cache=cache, out=str(out), run=str(run) if run else None,
            checkpoint=str(checkpoint) if checkpoint else None, which=which, split=split,
            protocols=tuple(p.strip() for p in protocols.split(",") if p.strip()),
            clicks=_numbers(clicks, int, "--clicks"), max_clicks=max_clicks,
            noc_thresholds=_numbers(noc, float, "--noc"), box_jitter=box_jitter, seed=seed,
            images_per_batch=images_per_batch, objects_per_call=objects_per_call,
            device=device, precision=precision,
        )  # fmt: skip
        report = run_eval(config, lambda done, total: bar.update(task, completed=done, total=total))
    Console().print(rich_table(report))
    files = ", ".join(path.name for path in report.written)
    Console().print(f"wrote {out}/ ({files}) in {report.seconds:.1f} s", highlight=False)


def predict_command(
    cache: Annotated[str, typer.Option(help="Cache made by `embed run`.")],
    out: Annotated[Path, typer.Option(help="Folder for masks/, overlays/ and results_*.json.")],
    run: Annotated[
        Path | None, typer.Option(help="Run folder of `decoder train` (fine-tuned decoder).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="The SAM checkpoint the cache was made with, if it moved.")
    ] = None,
    which: Annotated[str, typer.Option(help="best or last checkpoint of --run.")] = "best",
    images: Annotated[
        str | None, typer.Option(help="Comma-separated image ids (default: all with prompts).")
    ] = None,
    boxes: Annotated[
        Path | None, typer.Option(help="COCO detection results JSON: box prompts.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts JSON: points/labels and/or boxes per image.")
    ] = None,
    score_threshold: Annotated[
        float, typer.Option(help="--boxes: keep detections with score >= this.")
    ] = 0.0,
    compare: Annotated[
        bool, typer.Option(help="Zero-shot and fine-tuned side by side (needs --run).")
    ] = False,
    overlays: Annotated[bool, typer.Option(help="Draw overlay pictures.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Masks for prompts (ground-truth boxes by default) on cached images; COCO RLE results."""
    from rich.console import Console

    from stage2_decoder.predict import PredictConfig, run_predict

    with user_errors():
        config = PredictConfig(
            cache=cache, out=str(out), run=str(run) if run else None,
            checkpoint=str(checkpoint) if checkpoint else None, which=which,
            images=tuple(i.strip() for i in (images or "").split(",") if i.strip()),
            boxes=str(boxes) if boxes else None, prompts=str(prompts) if prompts else None,
            score_threshold=score_threshold, compare=compare, overlays=overlays, device=device,
        )  # fmt: skip
        summary = run_predict(config)
    skipped = f"; {len(summary.skipped)} image(s) had no prompt" if summary.skipped else ""
    if summary.bad_detections:
        skipped += f"; {len(summary.bad_detections)} detection(s) skipped"
    for line in summary.bad_detections[:10]:
        Console(stderr=True).print(f"skipped {line}", highlight=False, soft_wrap=True)
    Console().print(
        f"{out}: {summary.masks} masks for {summary.images} images "
        f"({', '.join(p.name for p in summary.results)}){skipped}",
        highlight=False,
    )


def amg_command(
    cache: Annotated[str, typer.Option(help="Cache made by `embed run`.")],
    out: Annotated[Path, typer.Option(help="Folder for amg_<model>.json and overlays/.")],
    images: Annotated[str | None, typer.Option(help="Comma-separated image ids.")] = None,
    run: Annotated[Path | None, typer.Option(help="Fine-tuned decoder of this run.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="The cache's SAM checkpoint.")] = None,
    which: Annotated[str, typer.Option(help="best or last checkpoint of --run.")] = "best",
    points_per_side: Annotated[int, typer.Option(help="Grid of points_per_side² prompts.")] = 32,
    points_per_batch: Annotated[
        int, typer.Option(help="Points decoded together (memory: ~25 MiB each).")
    ] = 16,
    pred_iou_thresh: Annotated[float, typer.Option(help="Keep predicted IoU above.")] = 0.88,
    stability_score_thresh: Annotated[float, typer.Option(help="Keep masks this stable.")] = 0.95,
    stability_score_offset: Annotated[float, typer.Option(help="Stability logit offset.")] = 1.0,
    box_nms_thresh: Annotated[float, typer.Option(help="Box IoU of duplicates (NMS).")] = 0.7,
    min_mask_region_area: Annotated[int, typer.Option(help="Remove holes/islands below (px).")] = 0,
    crop_n_layers: Annotated[int, typer.Option(help="0 only: no crop embeddings cached.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    overlays: Annotated[bool, typer.Option(help="Draw overlay pictures.")] = True,
) -> None:
    """Segment everything (Meta's SamAutomaticMaskGenerator, no crops) from cached embeddings."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from stage2_decoder.amg import AmgConfig, run_amg

    columns = ("amg points", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=console, disable=not console.is_terminal)
    with user_errors(), bar:
        task = bar.add_task("amg", total=None)
        config = AmgConfig(
            points_per_side=points_per_side, points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
            min_mask_region_area=min_mask_region_area, crop_n_layers=crop_n_layers,
        )  # fmt: skip
        ids = tuple(i.strip() for i in (images or "").split(",") if i.strip())
        path, n_images, stats = run_amg(
            cache, out, config, images=ids, run=str(run) if run else None,
            checkpoint=str(checkpoint) if checkpoint else None, which=which, device=device,
            overlays=overlays,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    summary = f"{path}: {stats.kept} masks for {n_images} images"
    if stats.kept:
        summary += f" (of {stats.candidates} candidates dropped: {stats.dropped(config)})"
    else:
        summary += f": {stats.why_none(config)}"
    Console().print(summary, highlight=False, soft_wrap=True)


def export_command(
    run: Annotated[
        Path, typer.Option(help="Run folder of `decoder train` (holds best.pt, last.pt).")
    ],
    out: Annotated[Path, typer.Option(help="File to write (.pth, or .onnx with --onnx).")],
    which: Annotated[str, typer.Option(help="best (best val mIoU) or last checkpoint.")] = "best",
    decoder_only: Annotated[
        bool, typer.Option(help="Write only the mask_decoder.* tensors (as tutorials save them).")
    ] = False,
    onnx: Annotated[
        bool, typer.Option(help="Write the decoder as ONNX with Meta's inputs (needs onnx extra).")
    ] = False,
    return_single_mask: Annotated[
        bool, typer.Option(help="ONNX: return the one best mask (Meta's export option).")
    ] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 17,
    checkpoint: Annotated[
        Path | None, typer.Option(help="The SAM checkpoint the cache was made with, if it moved.")
    ] = None,
    cache: Annotated[
        str | None, typer.Option(help="The run's cache, if it moved (finds the checkpoint).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace --out if it exists (never an input of the run).")
    ] = False,
) -> None:
    """Export the fine-tuned decoder: a full SAM checkpoint, mask_decoder.* only, or ONNX."""
    from rich.console import Console

    from stage2_decoder.export import (
        ONNX_TOLERANCE,
        WHICH,
        check_onnx,
        decoder_from_state,
        export_onnx,
        export_sam_checkpoint,
        load_run_state,
    )
    from stage2_decoder.guards import check_export_out, export_inputs

    with user_errors():
        if onnx and decoder_only:
            raise ValueError("--onnx and --decoder-only exclude each other; choose one")
        given = str(checkpoint) if checkpoint else None
        files, folders = export_inputs(run, load_run_state(run, which), given, cache)
        check_export_out(out, files, folders, overwrite=overwrite)
        if onnx:
            model = decoder_from_state(load_run_state(run, which))
            export_onnx(model, out, return_single_mask=return_single_mask, opset=opset)
            error = check_onnx(model, out, return_single_mask=return_single_mask)
            if not error <= ONNX_TOLERANCE:
                raise RuntimeError(f"{out}: onnxruntime differs from torch by {error:.2e}")
            detail = f"ONNX decoder (onnxruntime matches torch to {error:.1e})"
        else:
            export_sam_checkpoint(
                run, out, which=which, decoder_only=decoder_only, checkpoint=given, cache=cache
            )
            detail = "mask_decoder.* tensors" if decoder_only else "full SAM checkpoint"
    Console().print(f"wrote {out}: {detail} from {run / WHICH[which]}", highlight=False)
