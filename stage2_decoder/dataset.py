"""Batches of objects read from a cache: the train/val split, training and validation batches.

A *training batch* is one micro-step: ``images_per_step`` images in the epoch's order, each image
embedding read once, and up to ``objects_per_image`` objects of each (B objects in all, gathered
by ``image_index``). It is a pure function of ``(seed, epoch, micro)``: the image order comes
from ``(seed, epoch)`` and each image's objects from ``(seed, epoch, image)``, so the batches do
not depend on the number of DataLoader workers, nor on where a run was resumed. With several
processes the micro-batch's images are shared out by rank (``rank::world_size``); each object
keeps its *global row* (its index in the whole micro-batch), so whatever draws per object can
key on it and not on the rank that holds the object. Only the manifest
columns (Arrow, shared copy-on-write by forked workers) stay in memory; embeddings are read per
batch, so memory does not grow with the cache.

Frames: targets and valid masks are in the 256 target frame, ``boxes_1024`` XYXY in the 1024
frame, ``masks_orig`` in the original frame (see cache_layout.md). With ``views`` (training only)
each object is seen in one view of its image drawn per step from ``(seed, epoch, image)``: the
original or a stored view; its embedding, sizes and frames are then the view's
(``stage2_decoder.view_targets``), and ``image_embeddings`` holds one row per (image, view) used.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pycocotools import mask as mask_utils

from shared.cache_format import TARGET_SIZE
from shared.cache_io import ok_rows, open_cache, read_embedding_rows
from shared.transforms import boxes_to_1024, target_valid_size
from shared.views import ORIGINAL
from stage2_decoder import view_targets
from stage2_decoder.view_targets import decode_rle

COLUMNS = [
    "image_id", "row", "original_height", "original_width", "input_height", "input_width",
    "split", "has_masks", "n_objects", "objects", "ignore_rle", "ignore_target_rle",
    "embedding_checksum", "views", "view_checksums",
]  # fmt: skip
STREAM_SPLIT, STREAM_ORDER, STREAM_OBJECTS, STREAM_PROMPTS, STREAM_VIEWS = 1, 2, 3, 4, 5
STREAM_REPLAY = 6  # replay.py
EMPTY_TARGET_RLE = mask_utils.encode(np.zeros((TARGET_SIZE, TARGET_SIZE), np.uint8, order="F"))[
    "counts"
].decode("ascii")


class DataError(ValueError):
    """The cache cannot give what training needs; the message says what to do."""


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``keys`` (numpy's SeedSequence): no history."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def generator_for(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by ``derive_seed(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


# --------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class Split:
    """Images of each split (manifest rows, ``COLUMNS``) and how the split was made."""

    train: pa.Table
    val: pa.Table
    how: str


def object_counts(images: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per image: number of objects, number with a non-empty 256 target (trainable)."""
    objects = images.column("objects").combine_chunks()
    counts = pc.fill_null(pc.list_value_length(objects), 0).to_numpy(zero_copy_only=False)
    target = pc.struct_field(pc.list_flatten(objects), "target_rle")
    trainable = pc.fill_null(pc.not_equal(target, EMPTY_TARGET_RLE), False).to_numpy(
        zero_copy_only=False
    )
    ends = np.cumsum(counts).astype(np.int64)
    cumulative = np.concatenate([[0], np.cumsum(trainable.astype(np.int64))])
    per_image = cumulative[ends] - cumulative[ends - counts]
    return counts.astype(np.int64), np.asarray(per_image, dtype=np.int64)


def load_split(cache_path: str, val_fraction: float, seed: int) -> Split:
    """Train and val images of a cache; errors say what to do.

    The manifest's ``split`` column decides when it names both ``train`` and ``val`` images
    (PASCAL VOC); otherwise a seeded ``val_fraction`` of the images with objects is held out.
    Train keeps images with at least one non-empty target; val every image with an object
    (objects too small for the 256 frame are still evaluated at full resolution).
    """
    cache = open_cache(cache_path)
    table = ok_rows(cache.location, COLUMNS)
    if table.num_rows == 0:
        raise DataError(
            f"{cache.name} holds no encoded images (no `ok` rows); "
            f"run `embed run --images DIR --out {cache.name}` first"
        )
    table = table.filter(pc.fill_null(table.column("has_masks"), False))
    if table.num_rows == 0:
        raise DataError(
            f"{cache.name} was made without masks: run `embed run --masks/--coco` "
            "or use a VOC layout"
        )
    counts, trainable = object_counts(table)
    split = table.column("split").to_pylist()
    if "train" in split and "val" in split:
        train_mask = np.array([s == "train" for s in split])
        val_mask = np.array([s == "val" for s in split])
        how = "the manifest's split column (train / val)"
    else:
        train_mask, val_mask = _random_split(counts > 0, val_fraction, seed)
        how = f"a random {val_fraction:.0%} of the images (seed {seed})"
    train = table.filter(pa.array(train_mask & (trainable > 0)))
    val = table.filter(pa.array(val_mask & (counts > 0)))
    for name, part in (("train", train), ("val", val)):
        if part.num_rows == 0:
            raise DataError(
                f"the {name} split of {cache.name} has no objects ({how}; {int(counts.sum())} "
                "objects in all): add annotated images or change --val-fraction"
            )
    return Split(train, val, how)


def _random_split(has_objects: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Disjoint train / val masks over images with objects; ``max(1, round(n·fraction))`` val."""
    candidates = np.flatnonzero(has_objects)
    if len(candidates) < 2:
        raise DataError(
            f"{len(candidates)} image(s) with objects: at least 2 are needed to hold out a "
            "validation split"
        )
    n_val = min(len(candidates) - 1, max(1, round(len(candidates) * fraction)))
    order = torch.randperm(len(candidates), generator=generator_for(seed, STREAM_SPLIT)).numpy()
    val = np.zeros(len(has_objects), dtype=bool)
    val[candidates[order[:n_val]]] = True
    return has_objects & ~val, val


# --------------------------------------------------------------------------- batches


@dataclass
class ObjectBatch:
    """B objects of I images in the target frame; what training and validation feed the model.

    image_embeddings (I, 256, 64, 64) in storage dtype; image_index (B,) int64; targets and
    valid (B, 256, 256) bool; boxes_1024 (B, 4) float32 XYXY (exact, from the manifest bbox);
    per image ``input_sizes`` and ``original_sizes`` (H, W). Validation batches also carry
    ``masks_orig`` (H, W) bool per object and ``ignore_orig`` (H, W) bool per image.
    Training batches carry ``object_rows`` (B,) int64, each object's row in the micro-batch of
    all ranks, and ``rows_total``, that micro-batch's number of rows (objects of every rank;
    B = rows_total with one process). B may be 0 on a rank whose share of images is empty.
    """

    image_embeddings: torch.Tensor
    image_index: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    boxes_1024: torch.Tensor
    epoch: int = 0
    micro: int = 0
    read_seconds: float = 0.0
    object_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    rows_total: int = 0
    input_sizes: list[tuple[int, int]] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    masks_orig: list[torch.Tensor] = field(default_factory=list)
    ignore_orig: list[torch.Tensor] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)  # of image_embeddings' rows (messages)

    @property
    def n_objects(self) -> int:
        return int(self.image_index.shape[0])

    def object_input_sizes(self) -> torch.Tensor:
        """(B, 2) int64: the input_size (H, W) of each object's image."""
        return torch.tensor(self.input_sizes, dtype=torch.int64).reshape(-1, 2)[self.image_index]

    def pin_memory(self) -> ObjectBatch:  # DataLoader(pin_memory=True) calls this
        self.image_embeddings = self.image_embeddings.pin_memory()
        return self


class _CacheReader:
    """Reads embedding rows; opens the cache once per process (forked workers reopen it)."""

    def __init__(self, cache_path: str, images: pa.Table) -> None:
        self.cache_path = cache_path
        self.images = images.combine_chunks()
        self._cache = None
        self._pid = -1

    def embeddings(self, positions: list[int]) -> tuple[torch.Tensor, float]:
        """Rows of ``positions``, each verified against its manifest checksum (a damaged row
        raises ``CacheDamageError`` naming the image and the repair; never trained on)."""
        return self.view_embeddings([(p, ORIGINAL) for p in positions])

    def view_embeddings(self, entries: list[tuple[int, str]]) -> tuple[torch.Tensor, float]:
        """Rows of (position, view) ``entries`` in that order, from ``embeddings`` or
        ``embeddings_<view>``, each verified (``read_embedding_rows``)."""
        if self._cache is None or self._pid != os.getpid():
            self._cache, self._pid = open_cache(self.cache_path), os.getpid()
        keys = ["row", "image_id", "embedding_checksum", "views", "view_checksums"]
        if not entries:
            return torch.from_numpy(read_embedding_rows(self._cache, [])), 0.0
        start = time.perf_counter()
        out: list[np.ndarray | None] = [None] * len(entries)
        for view in dict.fromkeys(v for _, v in entries):
            slots = [i for i, (_, v) in enumerate(entries) if v == view]
            records = [
                {k: self.images.column(k)[entries[i][0]].as_py() for k in keys} for i in slots
            ]
            rows = read_embedding_rows(self._cache, records, None if view == ORIGINAL else view)
            for i, row in zip(slots, rows, strict=True):
                out[i] = row
        return torch.from_numpy(np.stack(out)), time.perf_counter() - start

    def image(self, position: int) -> dict:
        return self.images.slice(position, 1).to_pylist()[0]


def _valid_region(record: dict) -> np.ndarray:
    """Bool 256×256: inside the top-left ceil(input/4) region and not void."""
    size = (record["input_height"], record["input_width"])
    valid = np.zeros((TARGET_SIZE, TARGET_SIZE), dtype=bool)
    height, width = target_valid_size(size)
    valid[:height, :width] = True
    return valid & ~decode_rle(record["ignore_target_rle"], TARGET_SIZE, TARGET_SIZE)


def _box_1024(bbox: list[float], original_size: tuple[int, int]) -> np.ndarray:
    x, y, w, h = bbox
    return boxes_to_1024(np.array([x, y, x + w, y + h], dtype=np.float64), original_size)


def _stack(batch_parts: dict[str, list], embeddings: torch.Tensor, seconds: float) -> dict:
    def stacked(name: str, shape: tuple[int, ...], dtype: type) -> torch.Tensor:
        parts = batch_parts[name]
        array = np.stack(parts).astype(dtype) if parts else np.zeros((0, *shape), dtype)
        return torch.from_numpy(array)

    return {
        "image_embeddings": embeddings,
        "image_index": torch.tensor(batch_parts["image_index"], dtype=torch.int64),
        "targets": stacked("targets", (TARGET_SIZE, TARGET_SIZE), bool),
        "valid": stacked("valid", (TARGET_SIZE, TARGET_SIZE), bool),
        "boxes_1024": stacked("boxes", (4,), np.float32),
        "read_seconds": seconds,
    }


class TrainBatches(torch.utils.data.Dataset):
    """Item ``g`` = micro-batch ``g % per_epoch`` of epoch ``g // per_epoch`` (an ObjectBatch).

    A micro-batch is ``images_per_step`` images of the epoch's order, shared by all ranks: rank
    ``r`` of ``world_size`` keeps every ``world_size``-th of them from ``r`` (possibly none), so
    the ranks read disjoint images and together exactly those one process would read.
    """

    def __init__(
        self, cache_path: str, images: pa.Table, *, images_per_step: int,
        objects_per_image: int, seed: int, epochs: int, rank: int = 0, world_size: int = 1,
        views: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        self.reader = _CacheReader(cache_path, images)
        self.images_per_step, self.objects_per_image = images_per_step, objects_per_image
        self.seed, self.epochs, self.rank, self.world_size = seed, epochs, rank, world_size
        self.views = tuple(views)  # stored views objects may be seen in (() : originals only)
        self.per_epoch = math.ceil(images.num_rows / images_per_step)
        self.trainable = object_counts(self.reader.images)[1]  # per image
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.per_epoch * self.epochs

    def order(self, epoch: int) -> np.ndarray:
        """Positions of the train images in ``epoch``'s order (from ``(seed, epoch)`` only)."""
        if self._order is None or self._order[0] != epoch:
            generator = generator_for(self.seed, STREAM_ORDER, epoch)
            n_images = self.reader.images.num_rows
            self._order = (epoch, torch.randperm(n_images, generator=generator).numpy())
        return self._order[1]

    def micro_batch(self, epoch: int, micro: int) -> np.ndarray:
        """Positions of the images of a micro-batch, every rank's."""
        span = self.images_per_step
        return self.order(epoch)[micro * span : (micro + 1) * span]

    def positions(self, epoch: int, micro: int) -> list[int]:
        """Positions of this rank's images of a micro-batch."""
        return [int(p) for p in self.micro_batch(epoch, micro)[self.rank :: self.world_size]]

    def view_choices(self, record: dict) -> tuple[str, ...]:
        """The views one object of ``record`` is drawn from: the original, then each view
        asked for (``views``) that the image's row has, in canonical order."""
        have = set(record.get("views") or ())
        return (ORIGINAL, *(v for v in self.views if v in have))

    def __getitem__(self, index: int) -> ObjectBatch:
        return self.batch(*divmod(int(index), self.per_epoch))

    def batch(self, epoch: int, micro: int) -> ObjectBatch:
        """Micro-batch ``micro`` of ``epoch``: this rank's images of it and their objects."""
        chosen = self.micro_batch(epoch, micro)
        counts = np.minimum(self.trainable[chosen], self.objects_per_image)
        first_row = np.concatenate([[0], np.cumsum(counts)])  # of each image, all ranks
        parts: dict[str, list] = {"image_index": [], "targets": [], "valid": [], "boxes": []}
        rows: list[int] = []
        entries: dict[tuple[int, str], int] = {}  # (position, view) → row of image_embeddings
        sizes: dict[str, list] = {"input_sizes": [], "original_sizes": [], "image_ids": []}

        def entry(position: int, record: dict, view: str) -> int:
            if (position, view) not in entries:
                entries[(position, view)] = len(entries)
                original_size, input_size = view_targets.view_sizes(record, view)
                suffix = "" if view == ORIGINAL else f" ({view})"
                sizes["image_ids"].append(record["image_id"] + suffix)
                sizes["input_sizes"].append(input_size)
                sizes["original_sizes"].append(original_size)
            return entries[(position, view)]

        for slot in range(self.rank, len(chosen), self.world_size):
            position = int(chosen[slot])
            record = self.reader.image(position)
            if not self.views:  # every image of the share has its row (as before views)
                entry(position, record, ORIGINAL)
            trainable = [o for o in record["objects"] if o["target_rle"] != EMPTY_TARGET_RLE]
            generator = generator_for(self.seed, STREAM_OBJECTS, epoch, position)
            pick = torch.randperm(len(trainable), generator=generator)[: self.objects_per_image]
            views = self._draw_views(record, epoch, position, len(pick))
            valid: dict[str, np.ndarray] = {}
            for j, (k, view) in enumerate(zip(pick.tolist(), views, strict=True)):
                target, box = _object_in_view(trainable[k], record, view)
                if not target.any():  # a non-canonical empty RLE: skip (its row stays unused)
                    continue
                if view not in valid:
                    valid[view] = (
                        view_targets.view_valid_region(record, view)
                        if view != ORIGINAL
                        else _valid_region(record)
                    )
                parts["image_index"].append(entry(position, record, view))
                parts["targets"].append(target)
                parts["valid"].append(valid[view])
                parts["boxes"].append(box)
                rows.append(int(first_row[slot]) + j)
        embeddings, seconds = self.reader.view_embeddings(list(entries))
        return ObjectBatch(
            **_stack(parts, embeddings, seconds), epoch=epoch, micro=micro,
            object_rows=torch.tensor(rows, dtype=torch.int64), rows_total=int(first_row[-1]),
            **sizes,
        )  # fmt: skip

    def _draw_views(self, record: dict, epoch: int, position: int, n: int) -> list[str]:
        """One view per picked object, uniform over ``view_choices`` (from ``(seed, epoch,
        image)``); all the original, with no draw, when there is nothing else."""
        choices = self.view_choices(record)
        if len(choices) == 1:
            return [ORIGINAL] * n
        generator = generator_for(self.seed, STREAM_VIEWS, epoch, position)
        return [choices[i] for i in torch.randint(len(choices), (n,), generator=generator).tolist()]


def _object_in_view(obj: dict, record: dict, view: str) -> tuple[np.ndarray, np.ndarray]:
    """(bool 256×256 target, XYXY box in the 1024 frame) of ``obj`` in ``view`` of its image."""
    if view == ORIGINAL:
        original_size = (record["original_height"], record["original_width"])
        target = decode_rle(obj["target_rle"], TARGET_SIZE, TARGET_SIZE)
        return target, _box_1024(obj["bbox"], original_size)
    return view_targets.view_target(obj, record, view), view_targets.view_box_1024(
        obj, record, view
    )


class ValBatches(torch.utils.data.Dataset):
    """Item ``i`` = the ``i``-th group of ``images_per_batch`` val images, every object.

    Deterministic (no randomness). Objects with an empty 256 target are included (their
    ``targets`` are all False); validation leaves them out of the loss, not out of the mIoU.
    """

    def __init__(self, cache_path: str, images: pa.Table, images_per_batch: int) -> None:
        self.reader = _CacheReader(cache_path, images)
        self.images_per_batch = images_per_batch

    def __len__(self) -> int:
        return math.ceil(self.reader.images.num_rows / self.images_per_batch)

    def __getitem__(self, index: int) -> ObjectBatch:
        if not 0 <= index < len(self):  # ends iteration (``list(val)``): never an empty batch
            raise IndexError(f"val batch {index} of {len(self)}")
        start = index * self.images_per_batch
        positions = list(range(start, min(start + self.images_per_batch, len(self.reader.images))))
        parts: dict[str, list] = {"image_index": [], "targets": [], "valid": [], "boxes": []}
        extra: dict[str, list] = {k: [] for k in ("input", "original", "masks", "ignore")}
        for i, position in enumerate(positions):
            record = self.reader.image(position)
            h, w = record["original_height"], record["original_width"]
            valid = _valid_region(record)
            extra["input"].append((record["input_height"], record["input_width"]))
            extra["original"].append((h, w))
            extra["ignore"].append(torch.from_numpy(decode_rle(record["ignore_rle"], h, w)))
            for obj in record["objects"]:
                parts["image_index"].append(i)
                parts["targets"].append(decode_rle(obj["target_rle"], TARGET_SIZE, TARGET_SIZE))
                parts["valid"].append(valid)
                parts["boxes"].append(_box_1024(obj["bbox"], (h, w)))
                extra["masks"].append(torch.from_numpy(decode_rle(obj["rle"], h, w)))
        embeddings, seconds = self.reader.embeddings(positions)
        return ObjectBatch(
            **_stack(parts, embeddings, seconds), input_sizes=extra["input"],
            original_sizes=extra["original"], masks_orig=extra["masks"],
            ignore_orig=extra["ignore"],
            image_ids=[self.reader.image(p)["image_id"] for p in positions],
        )  # fmt: skip
