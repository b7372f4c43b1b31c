"""Reading and writing a samcache cache: the Zarr group, its embeddings and the manifest.

All I/O on the cache goes through here (``cache_layout.md`` is the contract). Local paths use
zarr's ``LocalStore`` (each chunk written to a temp file, then renamed); ``s3://``, ``gs://`` and
other fsspec URLs use ``FsspecStore``, where every object PUT is atomic (see cache_layout.md).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import zarr
import zarr.storage

from shared.cache_format import (
    ATTRS_KEY,
    BASE_PATTERN,
    BASE_PREFIX,
    CHECKSUM_ALGO,
    EMBEDDING_SHAPE,
    EMBEDDINGS,
    FORMAT_VERSION,
    FRAGMENT_PATTERN,
    FRAGMENT_PREFIX,
    MANIFEST_DIR,
    MANIFEST_POINTER,
    MANIFEST_SCHEMA,
    STATUS_OK,
    TEMP_PREFIX,
    CacheAttrs,
    CacheDamageError,
    CacheFormatError,
    view_array_name,
    view_checksum,
)
from shared.files import atomic_write
from shared.storage import Location, parse_location


class CacheNotFoundError(FileNotFoundError):
    """No cache at the given path."""


@dataclass
class Cache:
    """An open cache: where it is, its attributes and its embeddings array."""

    location: Location
    attrs: CacheAttrs
    group: zarr.Group

    @property
    def embeddings(self) -> zarr.Array:
        array = self.group[EMBEDDINGS]
        assert isinstance(array, zarr.Array)
        return array

    @property
    def name(self) -> str:
        return self.location.display

    def array(self, name: str = EMBEDDINGS) -> zarr.Array:
        """``embeddings`` or a view's ``embeddings_<view>`` (CacheFormatError when absent)."""
        if name not in self.group:
            raise CacheFormatError(
                f"{self.name} has no '{name}' array; add the view with `embed run --images DIR "
                f"--out {self.name} --views {name.removeprefix('embeddings_')}`"
            )
        array = self.group[name]
        assert isinstance(array, zarr.Array)
        return array

    def view_array(self, view: str) -> zarr.Array:
        return self.array(view_array_name(view))

    def arrays(self) -> list[zarr.Array]:
        """``embeddings`` and every view array the cache has (all share the row index)."""
        return [self.embeddings] + [
            self.view_array(v) for v in self.attrs.views if view_array_name(v) in self.group
        ]


def _store(location: Location, read_only: bool) -> zarr.abc.store.Store:
    if location.is_local:
        return zarr.storage.LocalStore(location.path, read_only=read_only)
    # zarr runs its own event loop: it needs an ``asynchronous=True`` filesystem (s3fs) or a
    # wrapped sync one; a sync s3fs instance fails with "attached to a different loop".
    return zarr.storage.FsspecStore.from_url(
        location.display, storage_options=dict(location.fs.storage_options), read_only=read_only
    )


def cache_exists(location: Location) -> bool:
    return location.fs.exists(location.join("zarr.json"))


def create_cache(location: Location, attrs: CacheAttrs) -> Cache:
    """Create an empty cache (0 rows) with its attributes; refuse to overwrite anything."""
    if cache_exists(location):
        raise FileExistsError(f"{location.display} already holds a Zarr group")
    location.fs.makedirs(location.path, exist_ok=True)
    group = zarr.create_group(
        store=_store(location, read_only=False), attributes={ATTRS_KEY: attrs.to_dict()}
    )
    group.create_array(
        EMBEDDINGS,
        shape=(0, *EMBEDDING_SHAPE),
        chunks=(1, *EMBEDDING_SHAPE),
        dtype=attrs.dtype,
        compressors=None,
        fill_value=0,
    )
    location.fs.makedirs(location.join(MANIFEST_DIR), exist_ok=True)
    return Cache(location, attrs, group)


def ensure_view_arrays(cache: Cache, views: Sequence[str]) -> Cache:
    """Create ``embeddings_<view>`` for ``views`` (as many rows as ``embeddings``) and record
    the views in the attributes; the cache's views only grow. Coordinator only (holds the lock).
    """
    for view in views:
        name = view_array_name(view)
        if name not in cache.group:
            cache.group.create_array(
                name,
                shape=cache.embeddings.shape,
                chunks=(1, *EMBEDDING_SHAPE),
                dtype=cache.attrs.dtype,
                compressors=None,
                fill_value=0,
            )
    from shared.views import parse_views

    merged = parse_views([*cache.attrs.views, *views])
    if merged != cache.attrs.views:
        cache.attrs = replace(cache.attrs, views=merged)
        cache.group.update_attributes({ATTRS_KEY: cache.attrs.to_dict()})
    return cache


def open_cache(
    target: str | Path | Location, *, read_only: bool = True, check_rows: bool = True
) -> Cache:
    """Open an existing cache, validating its format (errors name what was found).

    ``check_rows``: refuse an ``embeddings`` array smaller than the manifest's rows (off only
    for `embed verify`, which reports it).
    """
    location = target if isinstance(target, Location) else parse_location(target)
    if location.is_local and not os.path.exists(location.path):
        raise CacheNotFoundError(
            f"{location.display} does not exist; check the path, or create a cache there with "
            "`embed run --images DIR --out PATH`"
        )
    if not cache_exists(location):
        raise CacheNotFoundError(
            f"{location.display} is not a samcache cache (no zarr.json); "
            "create one with `embed run --images DIR --out PATH`"
        )
    try:
        group = zarr.open_group(store=_store(location, read_only), mode="r" if read_only else "r+")
    except Exception as exc:  # zarr raises several types for a broken zarr.json
        raise CacheFormatError(f"{location.display}: cannot open the Zarr group ({exc})") from exc
    attrs = CacheAttrs.from_dict(dict(group.attrs).get(ATTRS_KEY, {}), where=location.display)
    if EMBEDDINGS not in group:
        raise CacheFormatError(f"{location.display}: has no '{EMBEDDINGS}' array")
    cache = Cache(location, attrs, group)
    array = cache.embeddings
    if array.shape[1:] != EMBEDDING_SHAPE or str(array.dtype) != attrs.dtype:
        raise CacheFormatError(
            f"{location.display}: embeddings are {array.shape[1:]} {array.dtype}, "
            f"expected {EMBEDDING_SHAPE} {attrs.dtype}"
        )
    if check_rows:
        check_rows_fit(cache)
    return cache


def manifest_rows_needed(location: Location) -> int:
    """max(row) + 1 over every committed manifest row (0 for an empty manifest)."""
    rows = read_manifest_all(location, ["row"]).column("row")
    largest = pc.max(rows).as_py() if len(rows) else None
    return 0 if largest is None else max(0, int(largest) + 1)


def check_rows_fit(cache: Cache) -> None:
    """Refuse an ``embeddings`` array smaller than the manifest says (an edited zarr.json):
    writing or reading it would overwrite or mis-read rows of ``ok`` images."""
    needed = manifest_rows_needed(cache.location)
    have = int(cache.embeddings.shape[0])
    if have < needed:
        raise CacheDamageError(
            f"{cache.name}: embeddings has {have} rows but the manifest uses rows up to "
            f"{needed - 1} ({needed} rows needed); embeddings/zarr.json was edited or replaced. "
            f"Restore its shape to at least ({needed}, 256, 64, 64), then run `embed verify "
            f"{cache.name}`"
        )


def grow_embeddings(cache: Cache, n_new: int) -> range:
    """Append ``n_new`` rows and return their indices. Coordinator only (see cache_layout.md)."""
    array = cache.embeddings
    start = array.shape[0]
    if n_new > 0:
        _resize_all(cache, start + n_new)
    return range(start, start + n_new)


def _resize_all(cache: Cache, n_rows: int) -> None:
    """Give ``embeddings`` and every view array at least ``n_rows`` rows (same row index)."""
    for array in cache.arrays():
        if array.shape[0] < n_rows:
            array.resize((n_rows, *EMBEDDING_SHAPE))


def upgrade_format(cache: Cache) -> bool:
    """Mark a version-1 cache as version 2 (call while holding the lock); True if it changed.

    Version 1 is a subset of version 2 (no compaction pointer, no shared rows), so nothing but
    the attribute changes; afterwards a samcache that reads only version 1 refuses the cache.
    """
    if cache.attrs.format_version >= FORMAT_VERSION:
        return False
    cache.attrs = replace(cache.attrs, format_version=FORMAT_VERSION)
    cache.group.update_attributes({ATTRS_KEY: cache.attrs.to_dict()})
    return True


def allocate_rows(cache: Cache, n_new: int) -> list[int]:
    """``n_new`` rows for new embeddings, growing the array when needed. Coordinator only.

    The manifest decides, not the array's shape alone (a stale handle can revert a resize):
    rows that the last compaction freed and no manifest row uses come first, then rows after
    both the array's end and the largest row any manifest row names. Free rows handed out are
    taken off the free list first, so rows of a killed run that were never committed are not
    handed out again (a Dask task of that run may still be writing them); `embed compact`
    frees them.
    """
    if n_new <= 0:
        return []
    state = read_manifest_state(cache.location)
    used = read_manifest_all(cache.location, ["row"]).column("row").to_numpy(zero_copy_only=False)
    in_use = set(used[used >= 0].tolist())
    free = [r for r in state.free_rows if r not in in_use]
    rows = free[:n_new]
    if rows:  # off the free list before anything is written: never handed out twice
        write_manifest_state(cache.location, replace(state, free_rows=tuple(free[n_new:])))
    array = cache.embeddings
    named = int(used.max()) + 1 if len(used) else 0
    start = max(array.shape[0], named, max(state.free_rows, default=-1) + 1)
    rows += range(start, start + n_new - len(rows))
    _resize_all(cache, max(rows) + 1)
    return rows


def free_rows_on_disk(cache: Cache, rows: Sequence[int]) -> None:
    """Delete the chunks of ``rows`` in ``embeddings`` and every view array (a row of fill
    values is not stored: zarr removes it)."""
    for array in cache.arrays():
        zeros = np.zeros((1, *EMBEDDING_SHAPE), dtype=array.dtype)
        for row in sorted(rows):
            if row < array.shape[0]:
                array[row : row + 1] = zeros


def stored_rows(cache: Cache, name: str = EMBEDDINGS) -> set[int]:
    """Rows whose chunk exists in the store (unwritten and deleted rows read as the fill value),
    of ``embeddings`` or of a view array ``name``."""
    array = cache.array(name)
    key = array.metadata.encode_chunk_key((0,) * array.ndim)  # e.g. "c/0/0/0/0"
    prefix, tail = key.split("/", 1)[0], key.split("/", 2)[2]
    root = cache.location.join(name, prefix)
    if cache.location.is_local:
        if not os.path.isdir(root):
            return set()
        names = [n for n in os.listdir(root) if n.isdigit()]
        return {int(n) for n in names if os.path.exists(os.path.join(root, n, tail))}
    found = cache.location.fs.find(root)
    rows = set()
    for path in found:
        part = path[len(root.rstrip("/")) + 1 :].split("/", 1)
        if part[0].isdigit() and len(part) == 2 and part[1] == tail:
            rows.add(int(part[0]))
    return rows


def write_embedding(array: zarr.Array, row: int, embedding: np.ndarray) -> str:
    """Write one row (one whole chunk) in the array's dtype; returns its checksum
    (``embedding_checksum`` of the manifest row)."""
    stored = np.ascontiguousarray(np.asarray(embedding, dtype=array.dtype).reshape(EMBEDDING_SHAPE))
    array[row] = stored
    return embedding_checksum(stored)


def chunk_problem(cache: Cache, row: int, name: str = EMBEDDINGS) -> str | None:
    """Why row ``row``'s chunk file (of ``embeddings`` or of the view array ``name``) is not a
    whole chunk: missing or of the wrong size."""
    array = cache.array(name)
    key = array.metadata.encode_chunk_key((int(row), 0, 0, 0))
    path = cache.location.join(name, *key.split("/"))
    expected = int(np.prod(EMBEDDING_SHAPE)) * array.dtype.itemsize
    fs = cache.location.fs
    if not fs.exists(path):
        return "its chunk file is missing (it would read as zeros)"
    size = int(fs.size(path))
    if size != expected:
        return f"its chunk file is {size} bytes, expected {expected} (truncated or damaged)"
    return None


def _checksum_functions() -> dict[str, Callable[[Any], int]]:
    """algo name → function of a C-contiguous buffer, for the libraries importable here."""
    import zlib

    import google_crc32c  # a dependency of zarr

    found: dict[str, Callable[[Any], int]] = {
        "crc32": zlib.crc32,
        "crc32c": lambda buffer: google_crc32c.value(bytes(buffer)),
    }
    try:
        import xxhash

        found["xxh3_64"] = xxhash.xxh3_64_intdigest
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    return found


_CHECKSUMS = _checksum_functions()
CHECKSUM_ALGOS = tuple(_CHECKSUMS)  # the algorithms this samcache can verify


def embedding_checksum(embedding: np.ndarray, algo: str = CHECKSUM_ALGO) -> str:
    """``"<algo>:<hex>"`` of the row's bytes in C order (``embedding`` in storage dtype)."""
    data = np.ascontiguousarray(embedding)
    return f"{algo}:{_CHECKSUMS[algo](data.data.cast('B')):x}"


def row_checksum_problem(embedding: np.ndarray, expected: str | None) -> str | None:
    """Why ``embedding`` does not match ``expected`` (None: it matches, or nothing to check)."""
    if not expected:
        return None  # a row written before checksums existed: unverified
    algo = expected.split(":", 1)[0]
    if algo not in _CHECKSUMS:
        return f"its checksum {expected!r} uses {algo!r}, which this samcache cannot compute"
    found = embedding_checksum(embedding, algo)
    if found == expected:
        return None
    zeros = not np.any(embedding)
    hint = " (the row reads as all zeros: its chunk file is missing)" if zeros else ""
    return f"checksum {found} differs from the manifest's {expected}{hint}"


def damage_message(
    where: str, row: int, image_id: str | None, problem: str, what: str = "the embedding"
) -> str:
    image = f"image {image_id!r}" if image_id else "an image"
    return (
        f"{where}: {what} of {image} (row {row}) is damaged: {problem}. List all damage "
        f"with `embed verify {where}`; re-encode the damaged rows with `embed run --images DIR "
        f"--out {where} --repair`"
    )


def read_embeddings(
    array: zarr.Array,
    rows: Sequence[int],
    *,
    checksums: Sequence[str | None] | None = None,
    image_ids: Sequence[str] | None = None,
    where: str = "the cache",
    what: str = "the embedding",
) -> np.ndarray:
    """Rows as (len(rows), 256, 64, 64) in storage dtype; one chunk read per row.

    With ``checksums`` (the manifest's ``embedding_checksum`` per row) every row is verified;
    a row that cannot be read (a truncated chunk) or does not match (a flipped byte, a deleted
    chunk read as zeros) raises CacheDamageError naming the image, the row and the repair.
    """
    out = np.empty((len(rows), *EMBEDDING_SHAPE), dtype=array.dtype)
    for i, row in enumerate(rows):
        problem = read_row_into(array, int(row), out[i])
        if problem is None and checksums is not None:
            problem = row_checksum_problem(out[i], checksums[i])
        if problem is not None:
            image_id = image_ids[i] if image_ids is not None else None
            raise CacheDamageError(damage_message(where, int(row), image_id, problem, what))
    return out


def read_row_into(array: zarr.Array, row: int, out: np.ndarray) -> str | None:
    """Read row ``row`` into ``out``; why it cannot be read (None: it was)."""
    try:
        out[...] = array[row]
    except Exception as exc:  # a truncated or garbled chunk, a row past the end
        return f"its chunk cannot be read ({type(exc).__name__}: {exc})"
    return None


def read_embedding_rows(
    cache: Cache, records: Sequence[Mapping[str, Any]], view: str | None = None
) -> np.ndarray:
    """The verified embeddings of manifest records (``row``, ``image_id``,
    ``embedding_checksum``): the one read path of stage 2 (training, eval, predict, amg).

    ``view`` (``hflip``, …; None: the image itself): the rows of ``embeddings_<view>``, each
    verified against its checksum in ``view_checksums``; a record without the view is refused.
    """
    if view is None:
        array, checksums = cache.embeddings, [r.get("embedding_checksum") for r in records]
    else:
        array, checksums = cache.view_array(view), []
        for record in records:
            has, checksum = view_checksum(dict(record), view)
            if not has:
                raise CacheFormatError(
                    f"{cache.name}: image {record['image_id']!r} has no {view} view; add it "
                    f"with `embed run --images DIR --out {cache.name} --views {view}`"
                )
            checksums.append(checksum)
    return read_embeddings(
        array,
        [int(r["row"]) for r in records],
        checksums=checksums,
        image_ids=[str(r["image_id"]) for r in records],
        where=cache.name,
        what="the embedding" if view is None else f"the {view} view",
    )


# --- the manifest ---------------------------------------------------------------------------


def manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the manifest columns but ``committed_ns``) as a manifest table."""
    now = time.time_ns()
    filled = [{**row, "committed_ns": now} for row in rows]
    return pa.Table.from_pylist(filled, schema=MANIFEST_SCHEMA)


def commit_fragment(location: Location, table: pa.Table) -> str:
    """Durably add ``table`` to the manifest; returns the fragment's name.

    Local: written to ``.tmp-…`` (ignored by readers), fsynced, then ``os.replace``d and the
    directory fsynced, so a crash leaves either no fragment or a whole one. Object stores: one
    PUT of the final name, which is atomic (the object appears whole or not at all).
    """
    stamp = int(table.column("committed_ns")[0].as_py()) if table.num_rows else time.time_ns()
    name = f"{FRAGMENT_PREFIX}{stamp:020d}-{uuid.uuid4().hex[:12]}.parquet"
    manifest_dir = location.join(MANIFEST_DIR)
    if not location.is_local:
        # Serialise first, then one PUT: a failure while writing Parquet uploads nothing (an
        # fsspec file handle would upload the partial bytes when its ``with`` block exits).
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        location.fs.pipe_file(f"{manifest_dir}/{name}", sink.getvalue().to_pybytes())
        return name
    atomic_write(
        Path(manifest_dir) / name,
        lambda handle: pq.write_table(table, handle),
        temp_prefix=TEMP_PREFIX,
    )
    return name


def write_base(location: Location, table: pa.Table) -> str:
    """Write a compacted manifest file ``base-<ns>-<uuid>.parquet`` (unread until the pointer
    names it); returns its name."""
    name = f"{BASE_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
    path = location.join(MANIFEST_DIR, name)
    if not location.is_local:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        location.fs.pipe_file(path, sink.getvalue().to_pybytes())
        return name
    atomic_write(path, lambda handle: pq.write_table(table, handle), temp_prefix=TEMP_PREFIX)
    return name


def remove_manifest_file(location: Location, name: str) -> None:
    """Delete one file of ``manifest/``; a file already gone is fine."""
    try:
        location.fs.rm_file(location.join(MANIFEST_DIR, name))
    except FileNotFoundError:
        pass


def remove_stale_temps(location: Location) -> int:
    """Delete ``.tmp-`` fragments left by a killed writer. Call only while holding the lock."""
    manifest_dir = location.join(MANIFEST_DIR)
    if not location.is_local or not os.path.isdir(manifest_dir):
        return 0
    stale = [name for name in os.listdir(manifest_dir) if name.startswith(TEMP_PREFIX)]
    for name in stale:
        os.remove(os.path.join(manifest_dir, name))
    return len(stale)


@dataclass(frozen=True)
class ManifestState:
    """``manifest/_current.json``, written by `embed compact` (absent before any compaction).

    base: the compacted file holding every winning row up to the compaction (None: none yet).
    merged: files merged into ``base`` that may still exist (a compaction killed before deleting
    them); readers skip them. free_rows: embedding rows the compaction freed (chunks deleted),
    reused by the next `embed run` before the array grows.
    """

    base: str | None = None
    merged: tuple[str, ...] = ()
    free_rows: tuple[int, ...] = ()
    compacted_at: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


def _read_pointer(location: Location) -> bytes:
    path = location.join(MANIFEST_DIR, MANIFEST_POINTER)
    try:
        if location.is_local:
            return Path(path).read_bytes()
        location.fs.invalidate_cache(path)
        return bytes(location.fs.cat_file(path))
    except FileNotFoundError:
        return b""


def _parse_pointer(raw: bytes, where: str) -> ManifestState:
    if not raw:
        return ManifestState()
    try:
        data = json.loads(raw)
        return ManifestState(
            base=data.get("base"),
            merged=tuple(data.get("merged", ())),
            free_rows=tuple(int(r) for r in data.get("free_rows", ())),
            compacted_at=str(data.get("compacted_at", "")),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise CacheFormatError(
            f"{where}: {MANIFEST_DIR}/{MANIFEST_POINTER} is unreadable ({exc})"
        ) from None


def read_manifest_state(location: Location) -> ManifestState:
    return _parse_pointer(_read_pointer(location), location.display)


def write_manifest_state(location: Location, state: ManifestState) -> None:
    """Replace the pointer in one step (``os.replace`` locally, one PUT on object stores)."""
    path = location.join(MANIFEST_DIR, MANIFEST_POINTER)
    if location.is_local:
        atomic_write(path, lambda handle: handle.write(state.to_json()), temp_prefix=TEMP_PREFIX)
    else:
        location.fs.pipe_file(path, state.to_json())


def manifest_names(location: Location) -> list[str]:
    """Names of every file in ``manifest/`` (fragments, bases, temps, the pointer)."""
    manifest_dir = location.join(MANIFEST_DIR)
    if location.is_local:
        return sorted(os.listdir(manifest_dir)) if os.path.isdir(manifest_dir) else []
    location.fs.invalidate_cache(manifest_dir)  # other processes commit fragments too
    if not location.fs.exists(manifest_dir):
        return []
    listed = location.fs.ls(manifest_dir, detail=False)
    return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in listed)


_FRAGMENT_NAME = re.compile(FRAGMENT_PATTERN)
_BASE_NAME = re.compile(BASE_PATTERN)


def stray_manifest_names(names: Sequence[str]) -> list[str]:
    """Names in ``manifest/`` that the format does not name (a sync tool's
    ``part-….parquet.6aF8``, a copy): never read, reported by `embed status` and `embed verify`.

    The format names fragments (``part-<20 digits>-<12 hex>.parquet``), compacted bases
    (``base-<20 digits>-<12 hex>.parquet``), the pointer and writers' temp files (``.tmp-…``).
    """
    return [
        n
        for n in names
        if not (_FRAGMENT_NAME.fullmatch(n) or _BASE_NAME.fullmatch(n))
        and n != MANIFEST_POINTER
        and not n.startswith(TEMP_PREFIX)
    ]


def manifest_files(location: Location) -> tuple[list[str], list[str]]:
    """(live manifest paths, stray names): what readers read, and what they ignore."""
    names = manifest_names(location)
    live = live_manifest_files(names, read_manifest_state(location))
    return [location.join(MANIFEST_DIR, n) for n in live], stray_manifest_names(names)


def live_manifest_files(names: Sequence[str], state: ManifestState) -> list[str]:
    """The files that make the manifest: the pointer's base, then fragments not merged into it.

    Only names the format gives are read (``part-<20 digits>-<12 hex>.parquet``): a stray file
    that merely starts with ``part-`` is ignored.
    """
    merged = set(state.merged)
    parts = [n for n in names if _FRAGMENT_NAME.fullmatch(n) and n not in merged]
    return ([state.base] if state.base else []) + parts


def read_manifest_files(
    location: Location, names: Sequence[str], columns: list[str] | None = None
) -> pa.Table:
    """The rows of the named ``manifest/`` files (see ``live_manifest_files``)."""
    if not names:
        return MANIFEST_SCHEMA.empty_table().select(columns or MANIFEST_SCHEMA.names)
    dataset = pds.dataset(
        [location.join(MANIFEST_DIR, n) for n in names],
        format="parquet",
        schema=MANIFEST_SCHEMA,
        filesystem=None if location.is_local else location.fs,
        exclude_invalid_files=False,
    )
    return dataset.to_table(columns=columns)


def read_manifest_all(location: Location, columns: list[str] | None = None) -> pa.Table:
    """Every committed row, superseded ones included (for `embed status` history).

    A compaction may switch the manifest while this reads it: the pointer is read before and
    after the files, and the read is redone when it changed (or a file vanished), so a reader
    gets the manifest before or after a compaction, never a mix.
    """
    for _ in range(10):
        raw = _read_pointer(location)
        names = live_manifest_files(manifest_names(location), _parse_pointer(raw, location.display))
        try:
            table = read_manifest_files(location, names, columns)
        except OSError:
            if _read_pointer(location) == raw:
                raise  # not a compaction: a real error
            continue  # a compaction switched the manifest and removed what it merged
        if _read_pointer(location) == raw:
            return table
    raise CacheFormatError(
        f"{location.display}: the manifest kept changing while being read; "
        "is `embed compact` running in a loop? Try again."
    )


def winning_rows(table: pa.Table) -> pa.Table:
    """The row with the largest ``committed_ns`` per ``image_id``, sorted by ``image_id``.

    Only the two key columns are sorted; a manifest that already is one row per image in order
    (a compacted one) is returned without copying its (large) ``objects`` column.
    """
    if table.num_rows == 0:
        return table
    keys = table.select(["image_id", "committed_ns"])
    order = pc.sort_indices(keys, [("image_id", "ascending"), ("committed_ns", "ascending")])
    ids = pc.take(keys.column("image_id"), order)
    last_of_run = pc.not_equal(ids.slice(0, len(ids) - 1), ids.slice(1))
    keep = pa.concat_arrays([last_of_run.combine_chunks(), pa.array([True])])
    chosen = pc.filter(order, keep)
    if (
        len(chosen) == table.num_rows
        and pc.all(pc.equal(chosen, pa.array(np.arange(table.num_rows, dtype=np.uint64)))).as_py()
    ):
        return table
    return table.take(chosen)


def read_manifest(location: Location, columns: list[str] | None = None) -> pa.Table:
    """The winning row per ``image_id`` (largest ``committed_ns``), sorted by ``image_id``."""
    wanted = None if columns is None else sorted({*columns, "image_id", "committed_ns"})
    table = winning_rows(read_manifest_all(location, wanted))
    return table if columns is None else table.select(columns)


def ok_rows(location: Location, columns: list[str] | None = None) -> pa.Table:
    """Winning rows whose status is ``ok`` (what stage 2 reads)."""
    table = read_manifest(location, None if columns is None else sorted({*columns, "status"}))
    is_ok = pc.equal(table.column("status"), STATUS_OK)
    if not pc.all(is_ok).as_py():  # filtering copies every column: only when some row fails
        table = table.filter(is_ok)
    return table if columns is None else table.select(columns)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
