"""Train/val split and batches read from a synthetic cache (stage2_decoder.dataset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.cache_format import CacheAttrs
from shared.cache_io import create_cache
from shared.storage import parse_location
from shared.transforms import boxes_to_1024, target_valid_size
from stage2_decoder import dataset as ds
from tests.cache_factory import make_cache

COUNTS = [2, 3, 1, 2, 0, 2, 2, 1]  # objects per image; image 4 has none


@pytest.fixture(scope="module")
def cache(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("dataset") / "cache.zarr"
    return str(make_cache(path, tiny_checkpoint, n_images=8, objects_per_image=COUNTS))


def _ids(table) -> list[str]:
    return table.column("image_id").to_pylist()


def test_random_split_is_seeded_disjoint_and_skips_images_without_objects(cache: str) -> None:
    split = ds.load_split(cache, 0.25, seed=0)
    train, val = set(_ids(split.train)), set(_ids(split.val))
    assert not train & val
    assert train | val == {f"img{i:04d}" for i, c in enumerate(COUNTS) if c > 0}
    assert len(val) == 2  # round(7 · 0.25)
    assert _ids(ds.load_split(cache, 0.25, seed=0).val) == _ids(split.val)
    other = {tuple(_ids(ds.load_split(cache, 0.25, seed=s).val)) for s in range(6)}
    assert len(other) > 1  # the seed matters


def test_voc_split_column_wins(tiny_checkpoint: Path, tmp_path: Path) -> None:
    splits = ["train", "val", "train", "test", "train", None]
    path = make_cache(tmp_path / "c.zarr", tiny_checkpoint, n_images=6, splits=splits)
    split = ds.load_split(str(path), 0.5, seed=0)
    assert _ids(split.train) == ["img0000", "img0002", "img0004"]
    assert _ids(split.val) == ["img0001"]
    assert "split column" in split.how


def test_empty_targets_are_not_trained_but_validated(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = make_cache(tmp_path / "c.zarr", tiny_checkpoint, n_images=3, splits=["train"] * 3)
    # No val images in the split column → random split; make sure the counting handles it.
    split = ds.load_split(str(path), 0.34, seed=0)
    counts, trainable = ds.object_counts(split.train)
    assert (trainable <= counts).all() and (trainable > 0).all()
    assert (
        ds.EMPTY_TARGET_RLE
        == ds.mask_utils.encode(np.zeros((256, 256), np.uint8, order="F"))["counts"].decode()
    )


def test_errors_say_what_to_do(tiny_checkpoint: Path, tmp_path: Path) -> None:
    attrs = CacheAttrs(model_type="vit_tiny_random", checkpoint_sha256="0" * 64,
                       checkpoint_name="x.pth")  # fmt: skip
    create_cache(parse_location(tmp_path / "empty.zarr"), attrs)
    with pytest.raises(ds.DataError, match="no encoded images"):
        ds.load_split(str(tmp_path / "empty.zarr"), 0.1, 0)
    no_masks = make_cache(tmp_path / "nomask.zarr", tiny_checkpoint, n_images=2, with_masks=False)
    with pytest.raises(
        ds.DataError, match=r"was made without masks: run `embed run --masks/--coco`"
    ):
        ds.load_split(str(no_masks), 0.1, 0)
    no_train = make_cache(
        tmp_path / "notrain.zarr", tiny_checkpoint, n_images=3,
        objects_per_image=[0, 2, 0], splits=["train", "val", "train"],
    )  # fmt: skip
    with pytest.raises(ds.DataError, match="the train split .* has no objects"):
        ds.load_split(str(no_train), 0.1, 0)


def _train_batches(cache: str, **kwargs) -> ds.TrainBatches:
    split = ds.load_split(cache, 0.25, seed=0)
    options = {"images_per_step": 2, "objects_per_image": 2, "seed": 3, "epochs": 2, **kwargs}
    return ds.TrainBatches(cache, split.train, **options)


def test_batch_content_frames_and_valid_region(cache: str) -> None:
    data = _train_batches(cache)
    batch = data[0]
    assert batch.image_embeddings.shape == (2, 256, 64, 64)
    assert batch.image_embeddings.dtype == torch.float16
    assert batch.targets.shape == batch.valid.shape == (batch.n_objects, 256, 256)
    assert batch.targets.flatten(1).any(1).all()  # empty targets are skipped
    for k in range(batch.n_objects):
        image = int(batch.image_index[k])
        height, width = target_valid_size(batch.input_sizes[image])
        assert not batch.valid[k, height:].any() and not batch.valid[k, :, width:].any()
        assert batch.valid[k, :height, :width].float().mean() > 0.8  # only the void ring is out
    sizes = batch.object_input_sizes()
    assert sizes.shape == (batch.n_objects, 2)
    assert (batch.boxes_1024[:, 2] <= sizes[:, 1] + 1e-3).all()


def test_box_is_the_manifest_bbox_in_the_1024_frame(cache: str) -> None:
    data = _train_batches(cache, objects_per_image=4, images_per_step=1)
    batch = data[0]
    record = data.reader.image(data.positions(0, 0)[0])
    size = (record["original_height"], record["original_width"])
    expected = []
    for obj in record["objects"]:
        x, y, w, h = obj["bbox"]
        expected.append(boxes_to_1024(np.array([x, y, x + w, y + h]), size))
    got = {tuple(np.round(b, 3)) for b in batch.boxes_1024.numpy()}
    assert got == {tuple(np.round(np.float32(b), 3)) for b in expected}


def test_batches_are_pure_functions_of_seed_epoch_micro(cache: str) -> None:
    data = _train_batches(cache)
    assert data.per_epoch == 3 and len(data) == 6  # 5 train images, 2 per step, 2 epochs
    epoch0 = [data.positions(0, m) for m in range(3)]
    assert sorted(p for step in epoch0 for p in step) == list(range(5))  # each image once
    assert data.positions(1, 0) != data.positions(0, 0) or data.order(1).tolist() != list(
        data.order(0)
    )
    again = _train_batches(cache)
    for index in (4, 1):  # out of order, fresh object
        a, b = data[index], again[index]
        assert (a.epoch, a.micro) == divmod(index, 3)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.image_index, b.image_index)
        assert torch.equal(a.image_embeddings, b.image_embeddings)


def test_batches_do_not_depend_on_worker_count(cache: str) -> None:
    data = _train_batches(cache)
    loaders = [
        torch.utils.data.DataLoader(data, batch_size=None, sampler=range(1, 6), num_workers=n)
        for n in (0, 2)
    ]
    for a, b in zip(*loaders, strict=True):
        assert (a.epoch, a.micro) == (b.epoch, b.micro)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.boxes_1024, b.boxes_1024)
        assert torch.equal(a.image_embeddings, b.image_embeddings)


def test_each_embedding_is_read_once_per_batch(cache: str, monkeypatch) -> None:
    reads: list[list[int]] = []
    original = ds.read_embedding_rows

    def spy(cache, records, view=None):
        assert view is None  # no --views: the images' own rows only
        reads.append([r["row"] for r in records])
        return original(cache, records, view)

    monkeypatch.setattr(ds, "read_embedding_rows", spy)
    data = _train_batches(cache, objects_per_image=3)
    batch = data[0]
    assert len(reads) == 1 and len(reads[0]) == len(set(reads[0])) == 2
    assert batch.n_objects > 2  # several objects share one read embedding


def test_val_batches_keep_every_object_with_full_resolution_masks(cache: str) -> None:
    split = ds.load_split(cache, 0.25, seed=0)
    val = ds.ValBatches(cache, split.val, images_per_batch=8)
    assert len(val) == 1
    batch = val[0]
    assert batch.n_objects == sum(split.val.column("n_objects").to_pylist())
    for k, mask in enumerate(batch.masks_orig):
        assert tuple(mask.shape) == batch.original_sizes[int(batch.image_index[k])]
        assert mask.any()
    assert all(ignore.any() for ignore in batch.ignore_orig)  # the factory's void ring


def test_derived_seeds_differ_by_key() -> None:
    seeds = {ds.derive_seed(0, ds.STREAM_ORDER, e) for e in range(50)}
    assert len(seeds) == 50
    assert ds.derive_seed(1, 2, 3) == ds.derive_seed(1, 2, 3) != ds.derive_seed(1, 3, 2)
