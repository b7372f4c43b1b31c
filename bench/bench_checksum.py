"""What verifying an embedding row's checksum costs next to reading the row.

Writes a small cache of random float16 rows (one chunk per row, as `embed run` does), then reads
them back with ``read_embeddings`` with and without checksums, and times each candidate
algorithm on the rows' bytes (2 MiB per float16 row):

    python bench/bench_checksum.py [--rows 64] [--repeats 3]

Prints MiB/s per algorithm and the verification cost as a share of the read time; the algorithm
samcache uses (``shared.cache_format.CHECKSUM_ALGO``) is marked. Times vary with the load on the
machine: compare numbers measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.cache_format import CHECKSUM_ALGO, CacheAttrs  # noqa: E402
from shared.cache_io import (  # noqa: E402
    create_cache,
    embedding_checksum,
    grow_embeddings,
    read_embeddings,
    write_embedding,
)
from shared.storage import parse_location  # noqa: E402


def candidates() -> dict[str, object]:
    """name → function(bytes-like) -> int, for the libraries importable here."""
    found: dict[str, object] = {"zlib.crc32": zlib.crc32}
    try:
        import google_crc32c

        found["crc32c (google-crc32c)"] = google_crc32c.value
    except ImportError:
        pass
    try:
        import xxhash

        found["xxh3_64 (xxhash)"] = xxhash.xxh3_64_intdigest
    except ImportError:
        pass
    return found


def best_of(repeats: int, fn) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
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
        plain = best_of(args.repeats, lambda: read_embeddings(array, rows))
        checked = best_of(
            args.repeats, lambda: read_embeddings(array, rows, checksums=sums, image_ids=ids)
        )
        data = read_embeddings(array, rows)
    mib = data.nbytes / 2**20
    print(f"{args.rows} float16 rows ({mib:.0f} MiB): read {plain:.3f} s "
          f"({mib / plain:.0f} MiB/s, best of {args.repeats})")  # fmt: skip
    for name, fn in candidates().items():
        seconds = best_of(args.repeats, lambda fn=fn: [fn(memoryview(r).cast("B")) for r in data])
        mark = "  <- used" if name.split(" ")[0].startswith(CHECKSUM_ALGO) else ""
        print(f"  {name:24s} {mib / seconds:8.0f} MiB/s  {seconds / plain:6.1%} of read time{mark}")
    print(f"read_embeddings with verification ({CHECKSUM_ALGO}): {checked:.3f} s, "
          f"+{(checked - plain) / plain:.1%} over the plain read")  # fmt: skip


if __name__ == "__main__":
    main()
