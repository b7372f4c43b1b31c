"""The cache format as code: names, the manifest schema and the group attributes.

`cache_layout.md` is the same contract for people; a change here changes that page and
``FORMAT_VERSION`` with it. This module does no I/O (``shared.cache_io`` does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

FORMAT_NAME = "samcache-embeddings"
FORMAT_VERSION = 2  # 2: rows shared by images and relabels, manifest compaction (cache_layout.md)
READABLE_VERSIONS = (1, 2)  # version 1 is read as is and upgraded in place by the next writer
ATTRS_KEY = "samcache"  # group attributes live under this key of zarr.json
EMBEDDINGS = "embeddings"
VIEW_PREFIX = "embeddings_"  # + a view name (shared.views.VIEWS): the rows of that view
MANIFEST_DIR = "manifest"
LOCK_NAME = "embed.lock"
MANIFEST_POINTER = "_current.json"  # inside manifest/: the compacted base, merged names, free rows
BASE_PREFIX = "base-"  # a compacted manifest file (only the one the pointer names is read)
FRAGMENT_PREFIX = "part-"
# The only names readers take from manifest/; anything else (a sync tool's "part-….parquet.6aF8",
# an editor's backup) is ignored by readers and reported by `embed status` / `embed verify`.
FRAGMENT_PATTERN = r"part-\d{20}-[0-9a-f]{12}\.parquet"
BASE_PATTERN = r"base-\d{20}-[0-9a-f]{12}\.parquet"  # what `embed compact` writes
TEMP_PREFIX = ".tmp-"  # pyarrow datasets ignore names starting with "." or "_"

EMBEDDING_SHAPE = (256, 64, 64)
STORAGE_DTYPES = ("float16", "float32")
TARGET_SIZE = 256
STATUS_OK = "ok"
# One pixel limit for every command that decodes an image (decompression-bomb guard): `embed
# run --max-pixels` (recorded in embed_config), masks, and the images predict / amg draw on.
DEFAULT_MAX_PIXELS = 500_000_000
STATUS_FAILED = "failed"
# Checksum of each row's stored bytes (C order, storage dtype), "<algo>:<hex>" in the manifest's
# ``embedding_checksum``; chosen by bench/bench_checksum.py (cache_layout.md says why).
CHECKSUM_ALGO = "xxh3_64"

# Meta's SamPredictor.set_image, spelled out (cache_layout.md "preprocessing").
PREPROCESSING: dict[str, Any] = {
    "image_size": 1024,
    "resize": "longest_side_pil_bilinear",
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
    "pad": "bottom_right_zeros",
    "color": "RGB8",
    "exif_transpose": True,
}

OBJECT_TYPE = pa.struct(
    [
        ("instance_id", pa.int32()),
        ("category_id", pa.int32()),
        ("category", pa.string()),
        ("bbox", pa.list_(pa.float32(), 4)),  # XYWH, original frame
        ("area", pa.int64()),
        ("rle", pa.string()),  # COCO compressed RLE counts, original frame
        ("target_rle", pa.string()),  # COCO compressed RLE counts, 256 target frame
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("row", pa.int64()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("annotation_sha256", pa.string()),
        ("original_height", pa.int32()),
        ("original_width", pa.int32()),
        ("input_height", pa.int32()),
        ("input_width", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("split", pa.string()),
        ("splits", pa.list_(pa.string())),
        ("source", pa.string()),
        ("has_masks", pa.bool_()),
        ("n_objects", pa.int32()),
        ("objects", pa.list_(OBJECT_TYPE)),
        ("ignore_rle", pa.string()),
        ("ignore_target_rle", pa.string()),
        ("precision", pa.string()),
        ("committed_ns", pa.int64()),
        # format 2; null in version-1 fragments (pyarrow fills a missing column with nulls)
        ("exif_orientation", pa.int32()),  # EXIF orientation applied (1..8); null: unknown
        ("embedding_checksum", pa.string()),  # "<algo>:<hex>" of the row's bytes; null: unverified
        ("coco_image_id", pa.int64()),  # the COCO file's image id (source coco), else null
        # views (`embed run --views`): which views this row has in ``embeddings_<view>`` (same
        # row index) and, in the same order, the checksum of each; null: no views
        ("views", pa.list_(pa.string())),
        ("view_checksums", pa.list_(pa.string())),
    ]
)


class CacheFormatError(ValueError):
    """The store is not a samcache cache this version can read."""


class CacheDamageError(CacheFormatError):
    """An embedding row, a chunk or the manifest is damaged; the message names it and the fix."""


class CacheMismatchError(ValueError):
    """The cache was made with another model or checkpoint than the one given."""


@dataclass(frozen=True)
class CacheAttrs:
    """The group attributes of a cache (``zarr.json`` → ``attributes.samcache``)."""

    model_type: str
    checkpoint_sha256: str
    checkpoint_name: str
    checkpoint_path: str = ""  # where the checkpoint was when the cache was made (a hint)
    dtype: str = "float16"
    samcache_version: str = "0.1.0"
    created_at: str = ""
    embed_config: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(PREPROCESSING))
    embedding_shape: tuple[int, int, int] = EMBEDDING_SHAPE
    target_size: int = TARGET_SIZE
    views: tuple[str, ...] = ()  # views requested so far (`embed run --views`); only grows
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise CacheFormatError(
                f"dtype {self.dtype!r} is not a storage dtype; use one of {STORAGE_DTYPES}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["embedding_shape"] = list(self.embedding_shape)
        out["views"] = list(self.views)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the cache") -> CacheAttrs:
        """Parse and validate; errors name the key, the value found and the value expected."""
        if not isinstance(data, dict) or not data:
            raise CacheFormatError(
                f"{where} has no '{ATTRS_KEY}' attributes: it was not made by `embed run`"
            )
        fmt = data.get("format")
        if fmt != FORMAT_NAME:
            raise CacheFormatError(f"{where}: format is {fmt!r}, expected {FORMAT_NAME!r}")
        version = data.get("format_version")
        if not isinstance(version, int) or version not in READABLE_VERSIONS:
            raise CacheFormatError(
                f"{where}: format_version is {version!r}; this samcache reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Upgrade samcache or re-create the "
                "cache."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        missing = {"model_type", "checkpoint_sha256", "checkpoint_name"} - known.keys()
        if missing:
            raise CacheFormatError(f"{where}: attributes lack {sorted(missing)}")
        shape = tuple(known.get("embedding_shape", EMBEDDING_SHAPE))
        if shape != EMBEDDING_SHAPE:
            raise CacheFormatError(
                f"{where}: embedding_shape is {list(shape)}, expected {list(EMBEDDING_SHAPE)}"
            )
        known["embedding_shape"] = shape
        known["views"] = tuple(str(v) for v in known.get("views") or ())
        return cls(**known)

    @property
    def max_pixels(self) -> int:
        """The pixel limit the cache's images were read under (`embed run --max-pixels`)."""
        value = self.embed_config.get("max_pixels", DEFAULT_MAX_PIXELS)
        return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_PIXELS

    def describe_model(self) -> str:
        return f"{self.model_type} ({self.checkpoint_name}, sha256 {self.checkpoint_sha256[:12]}…)"


def view_array_name(view: str) -> str:
    """The array holding the rows of ``view`` (``embeddings_hflip``, …)."""
    return f"{VIEW_PREFIX}{view}"


def view_checksum(record: dict[str, Any], view: str) -> tuple[bool, str | None]:
    """(does the manifest row have ``view``, its checksum) from ``views`` / ``view_checksums``."""
    views = list(record.get("views") or [])
    if view not in views:
        return False, None
    checksums = list(record.get("view_checksums") or [])
    index = views.index(view)
    return True, checksums[index] if index < len(checksums) else None


def check_same_model(
    attrs: CacheAttrs, model_type: str, checkpoint_sha256: str, checkpoint_name: str, where: str
) -> None:
    """Refuse a model or checkpoint other than the cache's, naming both."""
    if attrs.model_type == model_type and attrs.checkpoint_sha256 == checkpoint_sha256:
        return
    given = f"{model_type} ({checkpoint_name}, sha256 {checkpoint_sha256[:12]}…)"
    raise CacheMismatchError(
        f"{where} was made with {attrs.describe_model()}; the checkpoint given is {given}. "
        "Pass the checkpoint used for `embed run`, or write a new cache with --out."
    )
