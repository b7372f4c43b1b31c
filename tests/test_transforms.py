"""shared.transforms equals Meta's SamPredictor / Sam / ResizeLongestSide step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from shared import transforms as T
from shared.sam_models import build_image_encoder, build_sam
from tests.meta_reference import (
    batched_nms,
    meta_amg_class,
    meta_predictor_class,
    meta_resize_longest_side,
)

SIZES = [(375, 500), (500, 333), (1200, 701), (1024, 1024), (7, 3), (2, 1500)]


class _RecordingEncoder(nn.Module):
    """Stands in for the image encoder: records its input, returns zeros (fast)."""

    img_size = 1024

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return torch.zeros(x.shape[0], 256, 64, 64)


@pytest.fixture(scope="module")
def tiny_sam(tiny_checkpoint):
    return build_sam("vit_tiny_random", tiny_checkpoint)


def _image(size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _meta_encoder_input(sam: nn.Module, image: np.ndarray) -> tuple[torch.Tensor, object]:
    recorder = _RecordingEncoder()
    original, sam.image_encoder = sam.image_encoder, recorder
    try:
        predictor = meta_predictor_class()(sam)
        predictor.set_image(image)
    finally:
        sam.image_encoder = original
    return recorder.seen, predictor


@pytest.mark.parametrize("size", SIZES)
def test_prepare_image_equals_meta_set_image(tiny_sam, size):
    image = _image(size, seed=sum(size))
    expected, predictor = _meta_encoder_input(tiny_sam, image)
    ours, input_size = T.prepare_image(image)
    assert ours.dtype == torch.float32 and ours.shape == (3, 1024, 1024)
    assert torch.equal(ours, expected[0])
    assert input_size == predictor.input_size == T.preprocess_shape(size)
    assert predictor.original_size == size


def test_prepare_image_equals_meta_on_voc_image(tiny_sam, voc_sample_dir):
    path = sorted((voc_sample_dir / "JPEGImages").glob("*.jpg"))[0]
    image = np.asarray(Image.open(path).convert("RGB"))
    expected, _ = _meta_encoder_input(tiny_sam, image)
    assert torch.equal(T.prepare_image(image)[0], expected[0])


def test_embedding_equals_predictor(tiny_sam, tiny_checkpoint):
    image = _image((300, 451), seed=1)
    predictor = meta_predictor_class()(tiny_sam)
    predictor.set_image(image)
    encoder = build_image_encoder("vit_tiny_random", tiny_checkpoint)
    with torch.no_grad():
        ours = encoder(T.prepare_image(image)[0][None])
    expected = predictor.get_image_embedding()
    assert ours.shape == expected.shape == (1, 256, 64, 64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0  # the comparison is not between zeros


def test_prepare_images_stacks_singles():
    images = [_image((40, 90), 2), _image((90, 40), 3)]
    batch, sizes = T.prepare_images(images)
    assert batch.shape == (2, 3, 1024, 1024)
    assert sizes == [(455, 1024), (1024, 455)]
    assert torch.equal(batch[1], T.prepare_image(images[1])[0])


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        T.resize_longest_side(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        T.prepare_image(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="at most 1024"):
        T.normalize_and_pad(np.zeros((1025, 10, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES)
def test_coords_and_boxes_equal_resize_longest_side(size):
    meta = meta_resize_longest_side()
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, max(size), (5, 3, 2))
    boxes = rng.uniform(0, max(size), (6, 4))
    for ours, theirs in [
        (T.coords_to_1024(coords, size), meta.apply_coords(coords, size)),
        (T.boxes_to_1024(boxes, size), meta.apply_boxes(boxes, size)),
    ]:
        assert ours.dtype == theirs.dtype == np.float64
        np.testing.assert_array_equal(ours, theirs)
    coords_t, boxes_t = torch.from_numpy(coords).float(), torch.from_numpy(boxes).float()
    for ours, theirs in [
        (T.coords_to_1024(coords_t, size), meta.apply_coords_torch(coords_t, size)),
        (T.boxes_to_1024(boxes_t, size), meta.apply_boxes_torch(boxes_t, size)),
    ]:
        assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(ours, theirs)
    back = T.coords_from_1024(T.coords_to_1024(coords, size), size)
    np.testing.assert_allclose(back, coords, rtol=1e-12)
    assert coords_t.dtype == torch.float32 and not np.shares_memory(back, coords)


def test_box_shape_is_checked():
    with pytest.raises(ValueError, match="XYXY"):
        T.boxes_to_1024(np.zeros((2, 3)), (10, 10))


@pytest.mark.parametrize("size", [(375, 500), (1200, 701), (9, 5)])
def test_postprocess_equals_sam_postprocess_masks(tiny_sam, size):
    logits = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    input_size = T.preprocess_shape(size)
    expected = tiny_sam.postprocess_masks(logits, input_size, size)
    ours = T.postprocess_low_res(logits, input_size, size)
    assert ours.shape == (2, 3, *size)
    assert torch.equal(ours, expected)


def test_target_valid_size():
    assert T.target_valid_size((768, 1024)) == (192, 256)
    assert T.target_valid_size((683, 1024)) == (171, 256)
    assert T.target_valid_size((1, 1024)) == (1, 256)


def test_mask_to_target_is_block_average_threshold():
    """With input_size == original size the resize is the identity: target = 4×4 mean ≥ 0.5."""
    rng = np.random.default_rng(0)
    mask = rng.random((768, 1024)) < 0.5
    soft = T.soft_mask_to_target(mask, (768, 1024))
    blocks = mask.reshape(192, 4, 256, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(soft[:192], blocks, atol=1e-6)
    assert not soft[192:].any()
    target = T.mask_to_target(mask, (768, 1024))
    assert target.dtype == bool and target.shape == (256, 256)
    np.testing.assert_array_equal(target[:192], blocks >= 0.5)
    assert 0.3 < target[:192].mean() < 0.7  # both classes present: the check can fail


def test_full_mask_covers_exactly_the_valid_region():
    original, input_size = (375, 500), T.preprocess_shape((375, 500))
    assert input_size == (768, 1024)
    target = T.mask_to_target(np.ones(original, dtype=bool), input_size)
    expected = np.zeros((256, 256), dtype=bool)
    expected[: T.target_valid_size(input_size)[0], : T.target_valid_size(input_size)[1]] = True
    np.testing.assert_array_equal(target, expected)


def test_small_object_target_lands_where_the_object_is():
    mask = np.zeros((375, 500), dtype=bool)
    mask[100:200, 300:400] = True
    target = T.mask_to_target(mask, T.preprocess_shape(mask.shape))
    rows, cols = np.nonzero(target)
    # ×2.048 then ÷4: rows 51.2..102.4 and cols 153.6..204.8 in the target frame; a target pixel
    # is on when the object covers at least half of it (row 102 and col 153 are 40% covered).
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (51, 101, 154, 204)


def test_batched_nms_shim():
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float
    )
    scores = torch.tensor([0.9, 0.8, 0.95, 0.1])
    same_class = torch.zeros(4, dtype=torch.int64)
    assert batched_nms(boxes, scores, same_class, 0.5).tolist() == [2, 3]
    classes = torch.tensor([0, 0, 1, 0])
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [2, 0, 3]
    assert batched_nms(boxes, scores, same_class, 0.9).tolist() == [2, 1, 3]  # IoU(1, 2) = 0.81


def test_meta_automatic_mask_generator_runs_on_the_shim(tiny_sam):
    generator = meta_amg_class()(
        tiny_sam, points_per_side=2, pred_iou_thresh=-10.0, stability_score_thresh=0.0
    )
    records = generator.generate(_image((120, 160), seed=4))
    assert records and all(r["segmentation"].shape == (120, 160) for r in records)
