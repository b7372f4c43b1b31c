"""`decoder amg` speed and memory on one VOC image (500×375), against the code before issue 8.

A one-image cache of tests/data's VOC 000039 (500×375) is embedded here with the tiny random
encoder (fp32). Cases, each in its own child process (so that its peak RSS is its own):

- ``tiny``: the tiny random model's decoder (SAM's full-size prompt encoder + mask decoder,
  random weights), Meta's default thresholds: with random weights no candidate passes the
  predicted-IoU filter, so no mask is upsampled;
- ``tiny-all``: same decoder, thresholds 0: every candidate mask is upsampled and scored (the
  most work a real model can cause, whose masks pass the filters);
- ``vit_b``: the decoder of a random ViT-B checkpoint in Meta's file format (the decoder is the
  same size for every model type; only the weights differ), default thresholds;
- ``old``: the generator before this change (git ``--old-rev``), default thresholds, timed on
  the first ``--old-points`` points of the same grid and scaled to the whole grid (its cost is
  linear in the points: one decoder call and an upsampling per batch); ``new-subset`` times
  today's code on the same points, so ``old / new-subset`` is a like-for-like ratio.

    PYTHONPATH=. python bench/bench_amg.py [--points-per-side 32] [--threads 2]
        [--old-points 64] [--old-rev 1009451] [--cases tiny,tiny-all,vit_b,old]

Numbers vary with the load on the machine: compare the ratio measured in one run. CPU time
(all threads of the case's process) is printed too: with ``--threads 1`` on a loaded machine it
is close to what the wall time would be on an idle core.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "tests/data/voc2007_sample/VOCdevkit/VOC2007/JPEGImages/000039.jpg"


def make_cache(root: Path) -> Path:
    from shared.checkpoint_files import make_random_checkpoint
    from stage1_embed.config import EmbedConfig
    from stage1_embed.pipeline import run_embed

    (root / "images").mkdir()
    shutil.copy(IMAGE, root / "images")
    checkpoint = make_random_checkpoint("vit_tiny_random", root / "tiny.pth", seed=0)
    config = EmbedConfig(
        images=str(root / "images"), out=str(root / "cache.zarr"), model_type="vit_tiny_random",
        checkpoint=str(checkpoint), precision="fp32", dtype="float32", download=False,
    )  # fmt: skip
    run_embed(config)
    make_random_checkpoint("vit_b", root / "vit_b.pth", seed=0)
    return root / "cache.zarr"


def old_module(rev: str):
    """stage2_decoder/amg.py as it was at ``rev``, imported under another name."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:stage2_decoder/amg.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "amg_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("amg_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["amg_old"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_case(args: tuple) -> dict:
    case, root, side, threads, old_points, old_rev = args
    import numpy as np
    import torch

    from shared.cache_io import ok_rows, open_cache, read_embeddings
    from shared.sam_models import build_prompt_and_mask_decoder
    from stage2_decoder import amg
    from stage2_decoder.export import load_models
    from stage2_decoder.model import PromptableDecoder

    torch.set_num_threads(threads)
    cache = open_cache(Path(root) / "cache.zarr")
    record = ok_rows(cache.location).to_pylist()[0]
    embedding = torch.from_numpy(read_embeddings(cache.embeddings, [record["row"]])).float()
    sizes = ((record["input_height"], record["input_width"]),
             (record["original_height"], record["original_width"]))  # fmt: skip
    model = load_models(str(Path(root) / "cache.zarr")).decoders["zero_shot"].eval()
    if case == "vit_b":
        model = PromptableDecoder(*build_prompt_and_mask_decoder("vit_b", Path(root) / "vit_b.pth"))
    config = amg.AmgConfig(points_per_side=side)
    if case == "tiny-all":
        config = amg.AmgConfig(points_per_side=side, pred_iou_thresh=0, stability_score_thresh=0)
    started, cpu_started = time.perf_counter(), time.process_time()
    n_points = side * side
    if case in ("old", "new-subset"):
        height, width = sizes[1]
        points = amg.point_grid(side)[:old_points] * np.array([[width, height]])
        if case == "old":
            old = old_module(old_rev)
            with torch.no_grad():
                for start in range(0, len(points), 64):  # the old default batch
                    old._batch(model, embedding, points[start : start + 64], sizes, old.AmgConfig())
        else:
            resize = amg.resize_matrices(*sizes)
            with torch.no_grad():
                for start in range(0, len(points), config.points_per_batch):
                    batch = points[start : start + config.points_per_batch]
                    amg._batch(model, embedding, batch, resize, sizes[1], config)
        n_points, masks = len(points), None
    else:
        masks = len(amg.find_masks(model, embedding, *sizes, config)[0])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": case, "seconds": seconds, "cpu": cpu, "points": n_points, "masks": masks,
            "rss": rss}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--old-points", type=int, default=64)
    parser.add_argument("--old-rev", default="1009451")
    parser.add_argument("--cases", default="tiny,tiny-all,vit_b,old")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    if "old" in cases:
        cases.insert(cases.index("old") + 1, "new-subset")
    side = args.points_per_side
    with tempfile.TemporaryDirectory() as tmp:
        make_cache(Path(tmp))
        context = multiprocessing.get_context("spawn")
        results = {}
        for case in cases:
            job = (case, tmp, side, args.threads, args.old_points, args.old_rev)
            with context.Pool(1) as pool:
                results[case] = result = pool.apply(run_case, (job,))
            masks = "" if result["masks"] is None else f", {result['masks']} masks"
            print(
                f"{case:10s} {result['seconds']:7.1f} s for {result['points']} points "
                f"({1000 * result['seconds'] / result['points']:.0f} ms/point{masks}), "
                f"CPU {result['cpu']:.1f} s, peak RSS {result['rss']:.0f} MiB",
                flush=True,
            )
    full = side * side
    if "old" in results:
        old, new = results["old"], results["new-subset"]
        print(
            f"old code on the first {old['points']} points: {old['seconds']:.1f} s, today's "
            f"{new['seconds']:.1f} s: {old['seconds'] / new['seconds']:.1f}x faster (CPU time "
            f"{old['cpu'] / new['cpu']:.1f}x); old scaled to {full} points: "
            f"{old['seconds'] * full / old['points']:.0f} s"
        )
    if "tiny" in results:
        print(f"one {side}x{side} grid, tiny model, defaults: {results['tiny']['seconds']:.1f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
