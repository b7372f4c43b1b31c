"""Stage 1 benchmark: `embed run` against a plain loop of Meta's SamPredictor, in one run.

Prints images/s for both and their ratio, the fidelity of the cached embeddings (max abs
difference to the fp32 reference and the IoU of masks decoded from them), cache bytes per image,
the time of a rerun over the finished cache next to the time to hash the files, and peak RSS of
`embed run` for n and 3n images of the tiny encoder (memory must not grow with the images).

    python bench/bench_embed.py [--images 4] [--model-type vit_b]

ViT-B has random weights in the official format (no pretrained weights can be downloaded here).
Times vary with the load on the machine: compare the ratio, measured side by side.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.cache_io import open_cache, read_manifest  # noqa: E402
from shared.checkpoint_files import make_random_checkpoint  # noqa: E402
from shared.hashing import file_sha256  # noqa: E402
from shared.sam_models import build_sam  # noqa: E402
from stage1_embed.synthetic import make_synthetic_voc  # noqa: E402
from tests.meta_reference import meta_predictor_class  # noqa: E402


def embed_cli(images: Path, out: Path, model_type: str, checkpoint: Path, *extra: str) -> dict:
    """Run `embed run` in a child process; return wall seconds and the child's peak RSS."""
    args = [
        sys.executable,
        "-m",
        "stage1_embed.cli",
        "run",
        "--images",
        str(images),
        "--out",
        str(out),
        "--model-type",
        model_type,
        "--checkpoint",
        str(checkpoint),
        *extra,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"embed run failed:\n{done.stdout}\n{done.stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "peak_rss_mib": max(peak_kib, before) / 1024, "out": done.stdout}


def reference_loop(predictor, paths: list[Path]) -> tuple[float, list[torch.Tensor]]:
    """Meta's way: for each image, set_image + get_image_embedding, fp32."""
    embeddings = []
    started = time.perf_counter()
    for path in paths:
        predictor.set_image(np.array(Image.open(path).convert("RGB")))
        embeddings.append(predictor.get_image_embedding().clone())
    return time.perf_counter() - started, embeddings


def mask_agreement(predictor, reference: torch.Tensor, cached: torch.Tensor, size) -> float:
    """Mean IoU of masks decoded from the cached vs the reference embedding (9 grid points)."""
    ious = []
    height, width = size
    for fy in (0.25, 0.5, 0.75):
        for fx in (0.25, 0.5, 0.75):
            point = np.array([[fx * width, fy * height]])
            masks = []
            for features in (reference, cached):
                predictor.features = features
                m, _, _ = predictor.predict(point, np.array([1]), multimask_output=False)
                masks.append(m[0])
            union = np.logical_or(*masks).sum()
            ious.append(np.logical_and(*masks).sum() / union if union else 1.0)
    return float(np.mean(ious))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    checkpoint = make_random_checkpoint(args.model_type, work / f"random_{args.model_type}.pth")
    voc = make_synthetic_voc(work / "data", n_images=args.images, seed=1)
    images = voc / "JPEGImages"
    paths = sorted(images.glob("*.jpg"))
    print(
        f"{len(paths)} images, {args.model_type} random weights, torch threads "
        f"{torch.get_num_threads()}, work dir {work}"
    )

    sam = build_sam(args.model_type, checkpoint).eval()
    predictor = meta_predictor_class()(sam)
    ref_seconds, ref_embeddings = reference_loop(predictor, paths)
    ours = embed_cli(images, work / "cache.zarr", args.model_type, checkpoint)
    ref_rate, our_rate = len(paths) / ref_seconds, len(paths) / ours["seconds"]
    print(f"reference  SamPredictor loop fp32 : {ref_rate:.3f} images/s ({ref_seconds:.1f} s)")
    print(
        f"samcache   embed run (default)    : {our_rate:.3f} images/s ({ours['seconds']:.1f} s,"
        f" whole command: start-up, model load, hashing included)"
    )
    print(f"ratio                             : {our_rate / ref_rate:.2f}x")

    cache = open_cache(work / "cache.zarr")
    rows = {r["image_id"]: r for r in read_manifest(cache.location).to_pylist()}
    diffs, ious = [], []
    for path, reference in zip(paths, ref_embeddings, strict=True):
        row = rows[path.stem]
        cached = torch.from_numpy(cache.embeddings[row["row"]].astype(np.float32))[None]
        diffs.append(float((cached - reference).abs().max()))
        size = (row["original_height"], row["original_width"])
        predictor.set_image(np.array(Image.open(path).convert("RGB")))
        ious.append(mask_agreement(predictor, reference, cached, size))
    scale = float(torch.cat(ref_embeddings).std())
    print(
        f"fidelity   max |cached - fp32 ref|  : {max(diffs):.4f} (embedding std {scale:.4f}); "
        f"decoded-mask IoU vs ref: mean {np.mean(ious):.4f}, min {min(ious):.4f}"
    )

    fp32 = embed_cli(
        images,
        work / "fp32.zarr",
        args.model_type,
        checkpoint,
        "--precision",
        "fp32",
        "--dtype",
        "float32",
    )
    cache32 = open_cache(work / "fp32.zarr")
    rows32 = {r["image_id"]: r["row"] for r in read_manifest(cache32.location).to_pylist()}
    diff32 = max(
        float((torch.from_numpy(cache32.embeddings[rows32[p.stem]])[None] - e).abs().max())
        for p, e in zip(paths, ref_embeddings, strict=True)
    )
    print(
        f"--precision fp32 --dtype float32  : max |diff| to reference {diff32:.2e} "
        f"({len(paths) / fp32['seconds']:.3f} images/s)"
    )

    nbytes = sum(f.stat().st_size for f in (work / "cache.zarr").rglob("*") if f.is_file())
    print(f"cache bytes per image             : {nbytes / len(paths) / 2**20:.2f} MiB (float16)")
    hash_started = time.perf_counter()
    for path in paths:
        file_sha256(path)
    hash_seconds = time.perf_counter() - hash_started
    rerun = embed_cli(images, work / "cache.zarr", args.model_type, checkpoint)
    print(
        f"rerun over finished cache         : {rerun['seconds']:.2f} s (hashing the images "
        f"alone: {hash_seconds:.3f} s; the rest is Python start-up and the checkpoint hash)"
    )
    print(
        f"peak RSS embed run ({args.model_type}, {len(paths)} images): "
        f"{ours['peak_rss_mib']:.0f} MiB"
    )
    memory_growth(work)


def memory_growth(work: Path) -> None:
    """Peak RSS of `embed run` (tiny encoder) for n and 3n images: flat if memory does not grow."""
    checkpoint = make_random_checkpoint("vit_tiny_random", work / "tiny.pth")
    for n in (8, 24):
        voc = make_synthetic_voc(work / f"mem{n}", n_images=n, seed=2)
        # each child is measured alone: RUSAGE_CHILDREN keeps the max over children so far
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD_RSS,
                str(voc / "JPEGImages"),
                str(work / f"m{n}.zarr"),
                str(checkpoint),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        print(f"peak RSS embed run (vit_tiny_random, {n:>2} images): {result.stdout.strip()} MiB")


_CHILD_RSS = """
import resource, subprocess, sys
images, out, ckpt = sys.argv[1:4]
subprocess.run([sys.executable, '-m', 'stage1_embed.cli', 'run', '--images', images, '--out', out,
                '--model-type', 'vit_tiny_random', '--checkpoint', ckpt], check=True,
               capture_output=True)
print(round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
"""


if __name__ == "__main__":
    main()
