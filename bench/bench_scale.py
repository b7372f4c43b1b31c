"""How the cache's bookkeeping scales: 1k, 10k and 100k images (issue 11; README "Scale").

For each size N, a cache is written directly (no encoder): N ``ok`` manifest rows with 3 real
RLE objects each (a 375×500 image, VOC-like), in fragments of 8 rows as `embed run` leaves them
with GPU batches of 8, and an ``embeddings`` array of N rows whose chunks are left unwritten
(they read as the fill value) except for the 64 rows the training measurement uses. Those 64
rows are the only ones with split ``train``/``val``; every other row has split ``test``, which
`decoder train` never reads, so nothing is trained on an unwritten row.

Measured per N (seconds, this machine, one run each; the machine is shared, so compare within a
row rather than across runs):

- ``read frag`` / ``read comp``: ``read_manifest`` of the training columns before and after
  `embed compact`, locally; ``s3 frag`` / ``s3 comp`` the same on the loopback S3 server (moto).
- ``status frag`` / ``status comp``: ``cache_status`` (what `embed status` prints).
- ``compact``: `embed compact` of the fragmented cache.
- ``plan``: the plan step of a rerun on N files of 1 KiB: list the folder, hash every file,
  compare with the manifest (every image cached). Hashing is never skipped (see
  stage1_embed/pipeline.py for why a size + mtime shortcut is unsafe).
- ``train start``: a fresh Python process running `decoder train` on the compacted cache, from
  process start to the end of the first optimizer step, split into imports (torch, and
  ``torch._dynamo``, which ``torch.optim`` imports when the first optimizer is made), set-up
  (manifest, split, model, optimizer) and the first step.
- ``manifest MiB``: Arrow bytes of the whole manifest (all columns) and of the training columns.

Usage: ``python bench/bench_scale.py [--sizes 1000,10000,100000] [--s3-sizes 1000,10000]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.cache_format import FRAGMENT_PREFIX, MANIFEST_DIR, MANIFEST_SCHEMA, CacheAttrs  # noqa: E402
from shared.cache_io import (  # noqa: E402
    allocate_rows,
    create_cache,
    open_cache,
    read_manifest,
    write_embedding,
)
from shared.checkpoint_files import make_random_checkpoint  # noqa: E402
from shared.hashing import file_sha256  # noqa: E402
from shared.storage import parse_location  # noqa: E402
from shared.transforms import mask_to_target, preprocess_shape  # noqa: E402
from stage1_embed.compact import compact_cache  # noqa: E402
from stage1_embed.pipeline import hash_sources, make_plan  # noqa: E402
from stage1_embed.sources import discover_images  # noqa: E402
from stage1_embed.status import cache_status  # noqa: E402
from stage2_decoder.dataset import COLUMNS as TRAIN_COLUMNS  # noqa: E402

HEIGHT, WIDTH = 375, 500
PER_FRAGMENT = 8
TRAINED_ROWS = 64

TRAIN_CHILD = """
import os, sys, time
started = time.time()
import torch._dynamo  # torch.optim imports it on the first optimizer: a fixed cost, kept apart
import stage2_decoder.train as train_module
from stage2_decoder.config import TrainConfig
marks = {"imports": time.time() - started}
real_setup = train_module.setup_run

def setup_run(*args, **kw):
    run = real_setup(*args, **kw)
    marks["setup"] = time.time() - started
    return run

class FirstStep(train_module.NoProgress):
    def advance(self, step, fields):
        marks["step"] = time.time() - started
        print("MARKS", marks["imports"], marks["setup"], marks["step"], flush=True)
        os._exit(0)

train_module.setup_run = setup_run
config = TrainConfig(cache=sys.argv[1], out=sys.argv[2], epochs=1, iterations=1,
                     images_per_step=2, objects_per_image=1, num_workers=0, device="cpu",
                     prompts="box", precision="fp32")
train_module.train(config, progress=FirstStep())
"""


def _rle(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def template_objects() -> list[dict]:
    """3 ellipse objects of a 375×500 image, with real RLEs in both frames."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    input_size = preprocess_shape((HEIGHT, WIDTH))
    objects = []
    for k, (cy, cx, ry, rx) in enumerate(
        [(120, 150, 60, 90), (250, 330, 80, 70), (90, 400, 40, 50)]
    ):
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        ys, xs = np.nonzero(mask)
        x0, y0, w, h = xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1
        objects.append({
            "instance_id": k + 1, "category_id": 1 + k, "category": "thing",
            "bbox": [float(x0), float(y0), float(w), float(h)],
            "area": int(mask.sum()), "rle": _rle(mask),
            "target_rle": _rle(mask_to_target(mask, input_size)),
        })  # fmt: skip
    return objects


def make_images(folder: Path, n: int) -> list[str]:
    """N files of 1 KiB (random bytes: hashed, never decoded); returns their sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"img{i:06d}.jpg").write_bytes(rng.bytes(1024))
    return [file_sha256(folder / f"img{i:06d}.jpg") for i in range(n)]


def make_scale_cache(path: Path, checkpoint: Path, images: Path, shas: list[str]) -> None:
    n = len(shas)
    attrs = CacheAttrs(
        model_type="vit_tiny_random",
        checkpoint_sha256=file_sha256(checkpoint),
        checkpoint_name=checkpoint.name,
        checkpoint_path=str(checkpoint),
    )
    cache = create_cache(parse_location(path), attrs)
    allocate_rows(cache, n)
    rng = np.random.default_rng(1)
    for row in range(TRAINED_ROWS):
        write_embedding(cache.embeddings, row, rng.standard_normal((256, 64, 64)) * 0.5)
    objects = template_objects()
    input_h, input_w = preprocess_shape((HEIGHT, WIDTH))
    start_ns = time.time_ns()
    split = ["train" if i < 48 else "val" if i < TRAINED_ROWS else "test" for i in range(n)]
    columns = {
        "image_id": [f"img{i:06d}" for i in range(n)],
        "row": np.arange(n, dtype=np.int64),
        "path": [str(images / f"img{i:06d}.jpg") for i in range(n)],
        "sha256": shas,
        "annotation_sha256": [""] * n,
        "original_height": np.full(n, HEIGHT, np.int32),
        "original_width": np.full(n, WIDTH, np.int32),
        "input_height": np.full(n, input_h, np.int32),
        "input_width": np.full(n, input_w, np.int32),
        "status": ["ok"] * n,
        "error": [None] * n,
        "split": split,
        "splits": [[s] for s in split],
        "source": ["folder"] * n,
        "has_masks": [True] * n,
        "n_objects": np.full(n, len(objects), np.int32),
        "objects": [objects] * n,
        "ignore_rle": [None] * n,
        "ignore_target_rle": [None] * n,
        "precision": ["bf16"] * n,
        "committed_ns": start_ns + np.arange(n, dtype=np.int64) // PER_FRAGMENT,
        "exif_orientation": np.ones(n, np.int32),
        "embedding_checksum": [None] * n,
    }
    table = pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)
    manifest = path / MANIFEST_DIR
    for start in range(0, n, PER_FRAGMENT):
        name = f"{FRAGMENT_PREFIX}{start_ns + start // PER_FRAGMENT:020d}-{start:012d}.parquet"
        pq.write_table(table.slice(start, PER_FRAGMENT), manifest / name)


def timed(fn, *args, **kw) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn(*args, **kw)
    return time.perf_counter() - started, value


def read_seconds(target: str) -> float:
    return timed(read_manifest, parse_location(target), TRAIN_COLUMNS)[0]


def plan_seconds(images: Path, target: str) -> float:
    def plan() -> int:
        sources = discover_images(images)
        result = make_plan(parse_location(target), sources, hash_sources(sources))
        assert result.cached == len(sources) and not result.todo and not result.relabel
        return result.cached

    return timed(plan)[0]


def train_start(target: str, out: Path) -> str:
    """Seconds from process start to the end of the first step (imports + setup + step)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_CHILD, target, str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = [x for x in result.stdout.splitlines() if x.startswith("MARKS")]
    if not lines:
        raise RuntimeError(f"decoder train did not reach a step:\n{result.stderr[-3000:]}")
    imports, setup, step = (float(v) for v in lines[0].split()[1:])
    return f"{step:.1f} ({imports:.1f}+{setup - imports:.1f}+{step - setup:.1f})"


def upload(local: Path, url: str, only: list[str] | None = None) -> None:
    location = parse_location(url)
    names = only or ["zarr.json", "embeddings/zarr.json", MANIFEST_DIR]
    for name in names:
        source = local / name
        target = f"{location.path}/{name}"
        location.fs.put(str(source), target, recursive=source.is_dir())


def s3_reads(frag: Path, comp: Path, n: int, do_fragmented: bool) -> tuple[str, str]:
    from tests.s3_server import s3_server

    with s3_server() as server:
        server.create_bucket("bench")
        frag_s3 = "-"
        if do_fragmented:
            upload(frag, f"s3://bench/frag{n}.zarr")
            frag_s3 = f"{read_seconds(f's3://bench/frag{n}.zarr'):.2f}"
        upload(comp, f"s3://bench/comp{n}.zarr")
        comp_s3 = f"{read_seconds(f's3://bench/comp{n}.zarr'):.2f}"
    return frag_s3, comp_s3


def measure(n: int, work: Path, checkpoint: Path, s3_fragmented: bool) -> dict[str, str]:
    images = work / f"images{n}"
    frag, comp = work / f"frag{n}.zarr", work / f"comp{n}.zarr"
    shas = make_images(images, n)
    make_scale_cache(frag, checkpoint, images, shas)
    subprocess.run(["cp", "-r", str(frag), str(comp)], check=True)
    row: dict[str, str] = {"images": f"{n:,}"}
    row["fragments"] = f"{len(os.listdir(frag / MANIFEST_DIR)):,}"
    row["read frag"] = f"{read_seconds(str(frag)):.2f}"
    row["status frag"] = f"{timed(cache_status, str(frag))[0]:.2f}"
    row["compact"] = f"{timed(compact_cache, str(comp))[0]:.2f}"
    row["read comp"] = f"{read_seconds(str(comp)):.2f}"
    seconds, status = timed(cache_status, str(comp))
    assert status.ok == n and status.manifest_files == 1
    row["status comp"] = f"{seconds:.2f}"
    row["s3 frag"], row["s3 comp"] = s3_reads(frag, comp, n, s3_fragmented)
    row["plan"] = f"{plan_seconds(images, str(comp)):.2f}"
    row["train start (imports+setup+step)"] = train_start(str(comp), work / f"run{n}")
    everything = read_manifest(parse_location(str(comp)))
    training = everything.select(TRAIN_COLUMNS)
    row["manifest MiB"] = f"{everything.nbytes / 2**20:.0f} / {training.nbytes / 2**20:.0f}"
    assert open_cache(str(comp)).embeddings.shape[0] == n
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument(
        "--s3-fragmented-sizes",
        default="1000,10000",
        help="sizes whose fragmented manifest is also read from S3 (slow setup)",
    )
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    s3_frag = {int(s) for s in args.s3_fragmented_sizes.split(",") if s}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        checkpoint = make_random_checkpoint("vit_tiny_random", work / "tiny.pth", seed=0)
        rows = []
        for n in sizes:
            rows.append(measure(n, work, checkpoint, n in s3_frag))
            print(rows[-1], flush=True)
            for name in (f"images{n}", f"frag{n}.zarr", f"comp{n}.zarr"):
                subprocess.run(["rm", "-rf", str(work / name)], check=True)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row[h] for h in header) + " |")


if __name__ == "__main__":
    main()
