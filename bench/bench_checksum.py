"""What verifying an embedding row's checksum costs next to reading the row.

Writes a small cache of random float16 rows (one chunk per row, as `embed run` does), then reads
them back with ``read_embeddings`` with and without checksums, and times each candidate
algorithm on the rows' bytes (2 MiB per float16 row):

    python bench/bench_checksum.py [--rows 64] [--repeats 3]

Prints MiB/s per algorithm (zlib.crc32, crc32c from google-crc32c, xxh3_64 from xxhash) and the
verification cost as a share of the read time; the algorithm samcache uses
(``shared.cache_format.CHECKSUM_ALGO``) is marked. Times vary with the load on the
machine: compare numbers measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.cache_format import CHECKSUM_ALGO, CacheAttrs  # noqa: E402
from shared.cache_io import (  # noqa: E402
    CHECKSUM_ALGOS,
    create_cache,
    embedding_checksum,
    grow_embeddings,
    read_embeddings,
    write_embedding,
)
from shared.storage import parse_location  # noqa: E402


def median_times(repeats: int, fns: dict[str, object]) -> dict[str, float]:
    """Median seconds of each function, the functions run in turn within each repeat (so a load
    that comes and goes on the machine hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = create_cache(
            parse_location(Path(tmp) / "c.zarr"),
            CacheAttrs(model_type="vit_b", checkpoint_sha256="0" * 64, checkpoint_name="x.pth"),
        )
        rows = list(grow_embeddings(cache, args.rows))
        sums = []
        for row in rows:
            embedding = rng.standard_normal((256, 64, 64)).astype(np.float16)
            write_embedding(cache.embeddings, row, embedding)
            sums.append(embedding_checksum(embedding))
        array = cache.embeddings
        ids = [f"img{r}" for r in rows]
        data = read_embeddings(array, rows)
        fns = {
            "read": lambda: read_embeddings(array, rows),
            "read+verify": lambda: read_embeddings(array, rows, checksums=sums, image_ids=ids),
            **{algo: (lambda a=algo: [embedding_checksum(r, a) for r in data])
               for algo in CHECKSUM_ALGOS},  # as samcache computes them (crc32c copies)
        }  # fmt: skip
        seconds = median_times(args.repeats, fns)
    mib = data.nbytes / 2**20
    plain = seconds["read"]
    print(f"{args.rows} float16 rows ({mib:.0f} MiB): read {plain:.3f} s "
          f"({mib / plain:.0f} MiB/s, median of {args.repeats})")  # fmt: skip
    for algo in CHECKSUM_ALGOS:
        mark = "  <- used" if algo == CHECKSUM_ALGO else ""
        print(f"  {algo:8s} {mib / seconds[algo]:8.0f} MiB/s  {seconds[algo] / plain:6.1%} of "
              f"read time{mark}")  # fmt: skip
    checked = seconds["read+verify"]
    print(f"read_embeddings with verification ({CHECKSUM_ALGO}): {checked:.3f} s, "
          f"+{(checked - plain) / plain:.1%} over the plain read")  # fmt: skip


if __name__ == "__main__":
    main()
