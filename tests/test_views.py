"""Views (`embed run --views`, `decoder train --views`): geometry, the stored view rows against
the model, training on views, and compaction / verify / relabel / old caches with views."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.cache_format import CacheDamageError, view_array_name
from shared.cache_io import (
    chunk_problem,
    open_cache,
    read_embedding_rows,
    read_manifest,
    stored_rows,
)
from shared.sam_models import build_prompt_and_mask_decoder, build_sam
from shared.transforms import (
    boxes_to_1024,
    coords_to_1024,
    mask_to_target,
    prepare_image,
    preprocess_shape,
)
from shared.views import (
    VIEWS,
    ViewError,
    apply_view,
    boxes_1024_to_view,
    boxes_orig_to_view,
    coords_1024_to_view,
    coords_orig_to_view,
    coords_view_to_orig,
    invert_view,
    parse_views,
    view_input_size,
    view_original_size,
)
from stage1_embed.compact import compact_cache
from stage1_embed.config import EmbedConfig
from stage1_embed.images import read_image
from stage1_embed.pipeline import run_embed
from stage1_embed.status import cache_status, format_status
from stage1_embed.synthetic import make_synthetic_voc
from stage1_embed.verify import verify_cache
from stage2_decoder.config import ConfigError, TrainConfig
from stage2_decoder.dataset import TrainBatches, ValBatches, decode_rle, load_split
from stage2_decoder.model import PromptableDecoder
from stage2_decoder.train import train
from stage2_decoder.validate import validate
from tests.cache_factory import make_cache

SIZES = [(300, 500), (500, 300)]  # (H, W): landscape and portrait
ALL = ",".join(VIEWS)


def _disk(height: int, width: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Pixels whose centre lies in the ellipse (continuous coordinates, XY)."""
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _bbox_xyxy(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


# --------------------------------------------------------------------------- geometry


def test_parse_views_is_canonical_and_names_the_bad_one() -> None:
    assert parse_views("rot90, hflip,hflip") == ("hflip", "rot90")
    assert parse_views("") == () and parse_views(None) == ()
    with pytest.raises(ViewError, match="'flip' is not a view"):
        parse_views("flip")
    with pytest.raises(ConfigError, match="'rot180'"):
        TrainConfig(cache="c", out="o", views="rot180")
    assert TrainConfig.from_dict(TrainConfig(cache="c", out="o", views="vflip").to_dict()).views


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("view", VIEWS)
def test_points_and_boxes_round_trip(view: str, size: tuple[int, int]) -> None:
    height, width = size
    points = np.array([[0.0, 0.0], [width, height], [12.5, 250.25], [width - 3.0, 7.0]])
    mapped = coords_orig_to_view(view, points, size)
    np.testing.assert_allclose(coords_view_to_orig(view, mapped, size), points, atol=1e-9)
    torch_mapped = coords_orig_to_view(view, torch.tensor(points, dtype=torch.float32), size)
    np.testing.assert_allclose(torch_mapped.numpy(), mapped, atol=1e-3)
    view_h, view_w = view_original_size(view, size)
    assert (view_h, view_w) == ((width, height) if view == "rot90" else size)
    assert mapped[:, 0].min() >= 0 and mapped[:, 0].max() <= view_w
    assert mapped[:, 1].min() >= 0 and mapped[:, 1].max() <= view_h
    box = np.array([[10.0, 20.0, 110.0, 70.0]])
    once = boxes_orig_to_view(view, box, size)
    assert np.all(once[:, :2] < once[:, 2:])  # still XYXY with x0 < x1, y0 < y1
    back = boxes_orig_to_view(view, boxes_orig_to_view(view, box, size), (view_h, view_w))
    if view != "rot90":  # flips are involutions; four quarter turns come back
        np.testing.assert_allclose(back, box)
    else:
        turns, shape = box, size
        for _ in range(4):
            turns, shape = boxes_orig_to_view(view, turns, shape), view_original_size(view, shape)
        np.testing.assert_allclose(turns, box)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("view", VIEWS)
def test_mask_transformed_by_the_view_equals_the_mask_drawn_in_the_view(view, size) -> None:
    height, width = size
    cx, cy, rx, ry = 130.25, 90.75, 60.0, 35.0
    mask = _disk(height, width, cx, cy, rx, ry)
    ((vcx, vcy),) = coords_orig_to_view(view, np.array([[cx, cy]]), size)
    vrx, vry = (ry, rx) if view == "rot90" else (rx, ry)
    drawn = _disk(*view_original_size(view, size), vcx, vcy, vrx, vry)
    np.testing.assert_array_equal(apply_view(view, mask), drawn)
    np.testing.assert_array_equal(invert_view(view, drawn), mask)
    np.testing.assert_array_equal(
        boxes_orig_to_view(view, _bbox_xyxy(mask), size), _bbox_xyxy(drawn)
    )
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    assert apply_view(view, image).shape[:2] == view_original_size(view, size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("view", VIEWS)
def test_1024_frame_mapping_uses_the_input_size_not_1024(view, size) -> None:
    input_size = preprocess_shape(size)
    assert max(input_size) == 1024 and min(input_size) < 1024  # there is padding
    points = np.array([[37.5, 12.25], [290.0, 199.5]])
    box = np.array([40.0, 30.0, 200.0, 150.0])
    via_orig = coords_to_1024(
        coords_orig_to_view(view, points, size), view_original_size(view, size)
    )
    direct = coords_1024_to_view(view, coords_to_1024(points, size), input_size)
    np.testing.assert_allclose(direct, via_orig, atol=1e-9)
    boxes_via = boxes_to_1024(boxes_orig_to_view(view, box, size), view_original_size(view, size))
    np.testing.assert_allclose(
        boxes_1024_to_view(view, boxes_to_1024(box, size), input_size), boxes_via, atol=1e-9
    )
    assert view_input_size(view, size) == preprocess_shape(view_original_size(view, size))
    in_h, in_w = input_size
    x, y = coords_to_1024(points, size)[0]
    expected = {"hflip": (in_w - x, y), "vflip": (x, in_h - y), "rot90": (y, in_w - x)}[view]
    np.testing.assert_allclose(direct[0], expected, atol=1e-9)
    if view == "hflip" and in_w < 1024:  # the flipped axis is padded: 1024 − x is wrong
        assert not np.isclose(direct[0, 0], 1024 - x)
    if view == "vflip" and in_h < 1024:
        assert not np.isclose(direct[0, 1], 1024 - y)


# --------------------------------------------------------------------------- against the model


def _config(images: Path, out: Path, checkpoint: Path, **kw) -> EmbedConfig:
    options = dict(model_type="vit_tiny_random", checkpoint=str(checkpoint), download=False,
                   precision="fp32", dtype="float32")  # fmt: skip
    return EmbedConfig(images=str(images), out=str(out), **{**options, **kw})


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    sizes = ((90, 150), (150, 90))
    return make_synthetic_voc(tmp_path_factory.mktemp("syn"), n_images=6, size_choices=sizes,
                              max_instances=2, seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, voc: Path, tiny_checkpoint: Path) -> Path:
    out = tmp_path_factory.mktemp("views") / "cache.zarr"
    summary = run_embed(_config(voc / "JPEGImages", out, tiny_checkpoint, views=ALL))
    assert summary.encoded == 6 and not summary.failed and summary.views == VIEWS
    return out


def _records(cache: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in read_manifest(open_cache(cache).location).to_pylist()}


def test_view_rows_equal_encoding_the_transformed_image(view_cache, voc, tiny_checkpoint) -> None:
    cache = open_cache(view_cache)
    assert cache.attrs.views == VIEWS
    encoder = build_sam("vit_tiny_random", tiny_checkpoint).eval().image_encoder
    records = _records(view_cache)
    for image_id in sorted(records)[:2]:
        record = records[image_id]
        assert record["views"] == list(VIEWS) and len(record["view_checksums"]) == 3
        rgb = read_image(voc / "JPEGImages" / f"{image_id}.jpg").rgb
        assert rgb.shape[0] != rgb.shape[1]
        for view in VIEWS:
            tensor, input_size = prepare_image(apply_view(view, rgb))
            assert input_size == view_input_size(view, rgb.shape[:2])
            with torch.no_grad():
                expected = encoder(tensor[None])[0].numpy()
            got = read_embedding_rows(cache, [record], view)[0]
            np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def _decode(model: PromptableDecoder, embedding: torch.Tensor, box_1024) -> torch.Tensor:
    coords = torch.as_tensor(np.asarray(box_1024, dtype=np.float32)).reshape(1, 2, 2)
    with torch.no_grad():
        logits, _ = model(embedding[None].float(), torch.zeros(1, dtype=torch.long), coords,
                          torch.tensor([[2, 3]]))  # fmt: skip
    return logits > 0


def test_dataset_batches_of_a_view_are_the_transformed_ones(view_cache, tiny_checkpoint) -> None:
    """Targets, valid regions and boxes of the batch equal those built by hand from the
    transformed original-frame masks; masks decoded from the batch equal those decoded from the
    view's row with the box mapped by hand."""
    split = load_split(str(view_cache), 0.25, seed=0)
    data = TrainBatches(str(view_cache), split.train, images_per_step=1, objects_per_image=1,
                        seed=0, epochs=6, views=VIEWS)  # fmt: skip
    model = PromptableDecoder(*build_prompt_and_mask_decoder("vit_tiny_random", tiny_checkpoint))
    model.eval()
    cache, records = open_cache(view_cache), _records(view_cache)
    seen = set()
    for index in range(len(data)):
        batch = data[index]
        name = batch.image_ids[0]
        if " (" not in name:
            continue
        image_id, view = name[:-1].split(" (")
        seen.add(view)
        record = records[image_id]
        size = (record["original_height"], record["original_width"])
        view_input = view_input_size(view, size)
        assert batch.input_sizes == [view_input]
        assert batch.original_sizes == [view_original_size(view, size)]
        matches = []
        for obj in record["objects"]:
            mask = apply_view(view, decode_rle(obj["rle"], *size))
            if np.array_equal(mask_to_target(mask, view_input), batch.targets[0].numpy()):
                matches.append((obj, mask))
        assert matches, f"no object of {image_id} gives the batch's {view} target"
        obj, mask = matches[0]
        x, y, w, h = obj["bbox"]
        box = boxes_1024_to_view(view, boxes_to_1024(np.array([x, y, x + w, y + h]), size),
                                 preprocess_shape(size))  # fmt: skip
        np.testing.assert_allclose(batch.boxes_1024[0].numpy(), box, atol=1e-3)
        np.testing.assert_allclose(  # the box of the transformed mask
            boxes_to_1024(_bbox_xyxy(mask), view_original_size(view, size)), box, atol=1e-3
        )
        void = apply_view(view, decode_rle(record["ignore_rle"], *size))
        valid = np.zeros((256, 256), bool)
        valid[: -(-view_input[0] // 4), : -(-view_input[1] // 4)] = True
        np.testing.assert_array_equal(
            batch.valid[0].numpy(), valid & ~mask_to_target(void, view_input)
        )
        own_row = torch.from_numpy(np.asarray(cache.view_array(view)[record["row"]]))
        np.testing.assert_array_equal(batch.image_embeddings[0].numpy(), own_row.numpy())
        assert torch.equal(
            _decode(model, batch.image_embeddings[0], batch.boxes_1024[0]),
            _decode(model, own_row, box),
        )
    assert seen == set(VIEWS)


def test_view_draws_are_seeded_and_cover_the_original(view_cache) -> None:
    split = load_split(str(view_cache), 0.25, seed=0)

    def names(seed: int) -> list[list[str]]:
        data = TrainBatches(str(view_cache), split.train, images_per_step=2, objects_per_image=2,
                            seed=seed, epochs=4, views=VIEWS)  # fmt: skip
        return [data[i].image_ids for i in range(len(data))]

    first = names(0)
    assert first == names(0) and first != names(1)
    flat = [n for batch in first for n in batch]
    assert any(" (" not in n for n in flat) and any(" (" in n for n in flat)
    plain = TrainBatches(str(view_cache), split.train, images_per_step=2, objects_per_image=2,
                         seed=0, epochs=1)  # fmt: skip
    assert all(" (" not in n for n in plain[0].image_ids)  # no --views: originals only


def _train_config(cache: Path, out: Path, **kwargs) -> TrainConfig:
    options = {
        "epochs": 2, "iterations": 2, "images_per_step": 2, "objects_per_image": 2,
        "num_workers": 0, "precision": "fp32", "log_every": 1, "device": "cpu", "seed": 4,
    }  # fmt: skip
    return TrainConfig(cache=str(cache), out=str(out), **{**options, **kwargs})


def test_train_with_views_is_reproducible_and_validates_on_originals(
    view_cache: Path, tmp_path: Path
) -> None:
    first = train(_train_config(view_cache, tmp_path / "a", views=ALL))
    train(_train_config(view_cache, tmp_path / "b", views=ALL))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["config"]["views"] == list(VIEWS)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    plain = torch.load(_run(train, _train_config(view_cache, tmp_path / "c")), weights_only=True)
    assert not all(torch.equal(a["model"][k], plain["model"][k]) for k in a["model"])
    assert 0.0 <= first.best_miou <= 1.0
    # validation reads only the originals: it still runs with every view row damaged
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(view_cache, copy)
    for view in VIEWS:
        shutil.rmtree(copy / view_array_name(view) / "c")
    split = load_split(str(copy), 0.25, seed=4)
    model = PromptableDecoder(*build_prompt_and_mask_decoder(
        "vit_tiny_random", open_cache(copy).attrs.checkpoint_path))  # fmt: skip
    result = validate(model, list(ValBatches(str(copy), split.val, 2)), device=torch.device("cpu"))
    assert 0.0 <= result.miou_box <= 1.0
    data = TrainBatches(str(copy), split.train, images_per_step=2, objects_per_image=2, seed=0,
                        epochs=2, views=VIEWS)  # fmt: skip
    with pytest.raises(CacheDamageError, match="view of image"):
        [data[i] for i in range(len(data))]


def _run(fn, config: TrainConfig) -> Path:
    fn(config)
    return Path(config.out) / "last.pt"


# --------------------------------------------------------------------------- cache upkeep


def test_views_added_later_encode_only_the_views(tmp_path, voc, tiny_checkpoint) -> None:
    out = tmp_path / "later.zarr"
    images = voc / "JPEGImages"
    run_embed(_config(images, out, tiny_checkpoint))
    before = _records(out)
    assert all(r["views"] is None for r in before.values())
    added = run_embed(_config(images, out, tiny_checkpoint, views="hflip"))
    assert added.encoded == 0 and added.views_added == 6
    after = _records(out)
    for image_id, record in after.items():
        assert record["embedding_checksum"] == before[image_id]["embedding_checksum"]
        assert record["row"] == before[image_id]["row"] and record["views"] == ["hflip"]
        assert record["objects"] == before[image_id]["objects"]
    again = run_embed(_config(images, out, tiny_checkpoint, views="rot90"))
    assert again.views == ("hflip", "rot90") and again.views_added == 6
    assert not run_embed(_config(images, out, tiny_checkpoint)).model_loaded  # nothing missing
    status = format_status(cache_status(str(out)))
    assert "hflip 6/6, rot90 6/6" in status
    assert verify_cache(str(out)).ok and verify_cache(str(out)).views_checked == 12


def test_verify_finds_a_damaged_view_row_and_repair_fixes_it(
    tmp_path, view_cache, voc, tiny_checkpoint
) -> None:
    copy = tmp_path / "cache.zarr"
    shutil.copytree(view_cache, copy)
    record = sorted(_records(copy).values(), key=lambda r: r["image_id"])[0]
    cache = open_cache(copy)
    array = cache.view_array("vflip")
    key = array.metadata.encode_chunk_key((record["row"], 0, 0, 0))
    chunk = copy / view_array_name("vflip") / key
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify_cache(str(copy))
    assert not report.ok and len(report.damaged) == 1
    damage = report.damaged[0]
    assert damage.image_id == record["image_id"] and "vflip view" in damage.problem
    with pytest.raises(CacheDamageError, match="the vflip view of image"):
        read_embedding_rows(cache, [record], "vflip")
    read_embedding_rows(cache, [record], "hflip")  # the other views are fine
    fixed = run_embed(_config(voc / "JPEGImages", copy, tiny_checkpoint, repair=True))
    assert fixed.repaired == 1 and verify_cache(str(copy)).ok


def test_compaction_frees_view_rows_with_their_image_rows(tmp_path, voc, tiny_checkpoint) -> None:
    images = tmp_path / "images"
    shutil.copytree(voc, images / "VOC2007")
    jpegs = images / "VOC2007" / "JPEGImages"
    out = tmp_path / "cache.zarr"
    run_embed(_config(jpegs, out, tiny_checkpoint, views="hflip,rot90"))
    first = sorted(_records(out))[0]
    old_row = _records(out)[first]["row"]
    picture = Image.open(jpegs / f"{first}.jpg")
    picture.save(jpegs / f"{first}.jpg", quality=50)  # new bytes: encoded into a new row
    summary = run_embed(_config(jpegs, out, tiny_checkpoint))
    assert summary.encoded == 1
    new = _records(out)[first]
    assert new["row"] != old_row and new["views"] == ["hflip", "rot90"]
    cache = open_cache(out)
    assert old_row in stored_rows(cache, view_array_name("rot90"))
    result = compact_cache(str(out))
    assert result.rows_freed == 1
    cache = open_cache(out)
    for name in ("embeddings", view_array_name("hflip"), view_array_name("rot90")):
        assert old_row not in stored_rows(cache, name)
        assert chunk_problem(cache, new["row"], name) is None
    assert _records(out)[first]["view_checksums"] == new["view_checksums"]
    assert verify_cache(str(out)).ok
    reused = run_embed(_config(jpegs, out, tiny_checkpoint, views="hflip,rot90"))
    assert reused.encoded == 0 and verify_cache(str(out)).ok


def test_relabel_keeps_the_view_rows(tmp_path, voc, tiny_checkpoint) -> None:
    root = tmp_path / "VOC2007"
    shutil.copytree(voc, root)
    out = tmp_path / "cache.zarr"
    run_embed(_config(root / "JPEGImages", out, tiny_checkpoint, views="vflip"))
    before = _records(out)
    image_id = sorted(before)[0]
    mask_path = root / "SegmentationObject" / f"{image_id}.png"
    mask = np.array(Image.open(mask_path))
    mask[mask == 1] = 0  # drop instance 1
    edited = Image.fromarray(mask, mode="P")
    edited.putpalette(Image.open(mask_path).getpalette())
    edited.save(mask_path)
    summary = run_embed(_config(root / "JPEGImages", out, tiny_checkpoint))
    assert summary.relabelled == 1 and summary.encoded == 0
    after = _records(out)[image_id]
    assert after["n_objects"] != before[image_id]["n_objects"]
    for column in ("row", "embedding_checksum", "views", "view_checksums"):
        assert after[column] == before[image_id][column]
    assert verify_cache(str(out)).ok


def test_an_old_cache_without_views_trains_and_refuses_views(tmp_path, tiny_checkpoint) -> None:
    cache = make_cache(tmp_path / "old.zarr", tiny_checkpoint, n_images=4, objects_per_image=1)
    assert open_cache(cache).attrs.views == ()
    with pytest.raises(ConfigError, match=r"stores no views\. Add them with `embed run"):
        train(_train_config(cache, tmp_path / "refused", views="hflip", val_fraction=0.25))
    summary = train(_train_config(cache, tmp_path / "run", epochs=1, val_fraction=0.25))
    assert summary.steps > 0
