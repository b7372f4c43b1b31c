"""Prompt samplers: seeded reproducibility, where points land, box noise, eval clicks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage2_decoder.prompts import (
    box_noise,
    center_click,
    next_click,
    sample_error_clicks,
    sample_first_prompts,
    sample_points_from_mask,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _targets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 objects: a rectangle, a thin L shape, a small square; valid = top-left 200x240."""
    t = torch.zeros(3, 256, 256, dtype=torch.bool)
    t[0, 40:120, 30:90] = True
    t[1, 10:100, 150:153] = True
    t[1, 97:100, 150:230] = True
    t[2, 180:184, 5:9] = True
    valid = torch.zeros_like(t)
    valid[:, :200, :240] = True
    valid[0, 60:70, :] = False  # an ignore band across object 0
    boxes = torch.tensor(
        [[120.0, 160.0, 360.0, 480.0], [600.0, 40.0, 920.0, 400.0], [20.0, 720.0, 36.0, 736.0]]
    )
    return t, valid, boxes


def _target_pixels(coords_1024: torch.Tensor) -> torch.Tensor:
    return torch.floor(coords_1024 / 4).long()


def test_points_land_inside_masks_and_are_reproducible() -> None:
    t, _, _ = _targets()
    a = sample_points_from_mask(t, 50, _gen(0))
    b = sample_points_from_mask(t, 50, _gen(0))
    c = sample_points_from_mask(t, 50, _gen(1))
    assert a.shape == (3, 50, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    xy = _target_pixels(a)
    for obj in range(3):
        assert t[obj, xy[obj, :, 1], xy[obj, :, 0]].all()
    # continuous inside the 4x4 square: not all on the grid
    assert (a % 4 != 0).any()
    # uniform over the rectangle: both halves of object 0 are hit
    many = _target_pixels(sample_points_from_mask(t[:1], 2000, _gen(2)))[0]
    left = (many[:, 0] < 60).float().mean().item()
    assert 0.4 < left < 0.6


def test_erosion_keeps_points_off_the_boundary_and_falls_back() -> None:
    t, _, _ = _targets()
    pts = _target_pixels(sample_points_from_mask(t, 200, _gen(3), erode=3))
    x, y = pts[0, :, 0], pts[0, :, 1]
    assert ((x >= 33) & (x < 87) & (y >= 43) & (y < 117)).all()
    # the 3-px-wide L and the 4x4 square vanish under erosion: fall back to the whole mask
    for obj in (1, 2):
        assert t[obj, pts[obj, :, 1], pts[obj, :, 0]].all()


def test_box_noise_bounds_and_clamp() -> None:
    boxes = torch.tensor([[100.0, 100.0, 150.0, 600.0]] * 500)
    noisy = box_noise(boxes, _gen(4))
    d = noisy - boxes
    # x side 50 px -> ±5; y side 500 px -> ±20 (capped)
    assert d[:, [0, 2]].abs().max() <= 5.0 + 1e-4
    assert d[:, [1, 3]].abs().max() <= 20.0 + 1e-4
    assert d[:, [1, 3]].abs().max() > 15.0  # uses the range
    assert torch.equal(noisy, box_noise(boxes, _gen(4)))
    # clamped to each object's input size (H, W)
    edge = torch.tensor([[0.0, 0.0, 700.0, 1023.0], [0.0, 0.0, 1023.0, 500.0]])
    clamped = box_noise(edge, _gen(5), image_hw=torch.tensor([[1024, 700], [500, 1024]]))
    assert (clamped >= 0).all()
    assert clamped[0, 2] <= 699 and clamped[1, 3] <= 499 and clamped[0, 3] <= 1023


def test_first_prompts_point_mode() -> None:
    t, valid, _ = _targets()
    coords, labels, multi = sample_first_prompts(t, valid, None, _gen(6), mode="point")
    assert coords.shape == (3, 2, 2)
    assert labels.tolist() == [[1, -1]] * 3  # Meta's layout: the point, then a pad
    assert multi.tolist() == [True] * 3
    coords, labels, multi = sample_first_prompts(
        t, valid, None, _gen(6), mode="point", n_pos=2, n_neg=3
    )
    assert labels.tolist() == [[1, 1, 0, 0, 0, -1]] * 3
    assert not multi.any()
    xy = _target_pixels(coords)
    for obj in range(3):
        pos, neg = xy[obj, :2], xy[obj, 2:5]
        assert t[obj, pos[:, 1], pos[:, 0]].all()
        assert (~t[obj, neg[:, 1], neg[:, 0]]).all()
        assert valid[obj, neg[:, 1], neg[:, 0]].all()  # negatives stay in the valid region


def test_first_prompts_negative_region_empty_gives_pad() -> None:
    t = torch.ones(1, 256, 256, dtype=torch.bool)
    _, labels, multi = sample_first_prompts(t, t, None, _gen(0), mode="point", n_neg=1)
    assert labels.tolist() == [[1, -1, -1]]
    assert multi.tolist() == [True]  # one real point


def test_first_prompts_box_mode() -> None:
    t, valid, boxes = _targets()
    coords, labels, multi = sample_first_prompts(t, valid, boxes, _gen(7), mode="box")
    assert labels.tolist() == [[2, 3]] * 3
    assert not multi.any()
    assert (coords.view(3, 4) - boxes).abs().max() <= 20.0 + 1e-4
    with pytest.raises(ValueError, match="boxes_1024"):
        sample_first_prompts(t, valid, None, _gen(7), mode="box")


def test_first_prompts_mixed_mode_pinned_and_proportions() -> None:
    t, valid, boxes = _targets()
    a = sample_first_prompts(t, valid, boxes, _gen(0), mode="point,box")
    b = sample_first_prompts(t, valid, boxes, _gen(0), mode="point,box")
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(
        a[0], sample_first_prompts(t, valid, boxes, _gen(1), mode="point,box")[0]
    )
    # Pinned: the exact prompts for seed 0 (changes only if the sampler's draws change).
    assert a[1].tolist() == PINNED_LABELS_SEED0
    assert torch.allclose(a[0], torch.tensor(PINNED_COORDS_SEED0), atol=1e-3)
    big_t = torch.zeros(1200, 16, 16, dtype=torch.bool)  # any H x W works; small is fast
    big_t[:, 4:12, 4:12] = True
    big_v = torch.ones_like(big_t)
    coords, labels, multi = sample_first_prompts(
        big_t, big_v, boxes.repeat(400, 1), _gen(9), mode="point,box", p_box=0.45, p_both=0.1
    )
    is_box = (labels == 2).any(1)
    has_point = (labels == 1).any(1)
    assert labels.shape[1] == 3
    both = (is_box & has_point).float().mean().item()
    box_only = (is_box & ~has_point).float().mean().item()
    assert 0.07 < both < 0.13 and 0.40 < box_only < 0.50
    assert torch.equal(multi, has_point & ~is_box)
    # point+box rows keep Meta's order: points first, then the corners
    rows = is_box & has_point
    assert (labels[rows] == torch.tensor([1, 2, 3])).all()
    assert (coords[labels == -1] == 0).all()


PINNED_LABELS_SEED0 = [[2, 3], [1, -1], [2, 3]]
PINNED_COORDS_SEED0 = [
    [[100.893, 146.754], [351.756, 480.741]],
    [[605.823, 246.529], [0.0, 0.0]],
    [[20.581, 721.329], [35.671, 737.197]],
]


def test_error_clicks_land_in_errors_with_right_labels() -> None:
    t, valid, _ = _targets()
    pred = t.clone()
    pred[0] = False
    pred[0, 40:120, 30:60] = True  # object 0: false negatives only (right half missing)
    pred[1, 150:190, 10:50] = True  # object 1: false positives only
    # object 2: perfect
    g = _gen(10)
    for _ in range(10):
        coords, labels = sample_error_clicks(pred, t, valid, g)
        assert coords.shape == (3, 1, 2) and labels.shape == (3, 1)
        xy = _target_pixels(coords[:, 0])
        assert labels[:, 0].tolist() == [1, 0, -1]
        assert xy[0, 0] >= 60 and t[0, xy[0, 1], xy[0, 0]] and valid[0, xy[0, 1], xy[0, 0]]
        assert pred[1, xy[1, 1], xy[1, 0]] and not t[1, xy[1, 1], xy[1, 0]]
        assert coords[2].abs().sum() == 0
    # errors only inside the ignore band -> nothing to click
    pred2 = t.clone()
    pred2[0, 60:70, 100:110] = True
    _, labels = sample_error_clicks(pred2, t, valid, _gen(11))
    assert labels[0, 0] == -1


def test_error_clicks_mix_fn_and_fp_uniformly() -> None:
    t = torch.zeros(1, 32, 32, dtype=torch.bool)
    t[0, :, :16] = True
    pred = torch.zeros_like(t)
    pred[0, :, 16:] = True  # FN area == FP area
    valid = torch.ones_like(t)
    labels = sample_error_clicks(
        pred.repeat(1000, 1, 1), t.repeat(1000, 1, 1), valid.repeat(1000, 1, 1), _gen(12)
    )[1]
    assert 0.4 < labels.float().mean().item() < 0.6


def test_center_click_is_distance_transform_max() -> None:
    mask = np.zeros((60, 100), dtype=bool)
    mask[10:31, 20:81] = True  # 21 rows x 61 cols: centre row 20; the max spans columns
    x, y = center_click(mask)
    assert y == 20 and 30 <= x <= 70
    # touching the image border: the border counts as boundary (zero padding)
    edge = np.zeros((50, 50), dtype=bool)
    edge[0:11, 0:11] = True
    assert center_click(edge) == (5, 5)
    with pytest.raises(ValueError):
        center_click(np.zeros((5, 5), dtype=bool))
    # ignore region is excluded
    ign = np.zeros_like(edge)
    ign[:, :6] = True
    assert center_click(edge, ign)[0] >= 6


def test_next_click_picks_largest_error_region() -> None:
    gt = np.zeros((100, 100), dtype=bool)
    gt[10:90, 10:90] = True
    pred = gt.copy()
    pred[20:30, 20:30] = False  # FN square 10x10
    pred[60:80, 60:80] = False  # FN square 20x20 (largest)
    pred[0:5, 95:100] = True  # small FP
    x, y, label = next_click(pred, gt)
    assert label == 1 and 60 <= x < 80 and 60 <= y < 80
    pred2 = gt.copy()
    pred2[0:40, 0:100] = True  # FP band 10 px tall on top: depth 5
    pred2[50:54, 50:54] = False  # FN 4x4: depth 2
    x, y, label = next_click(pred2, gt)
    assert label == 0 and y < 10
    # the FP band is ignored -> the FN is next
    ign = pred2 & ~gt
    x, y, label = next_click(pred2, gt, ign)
    assert label == 1 and 50 <= x < 54 and 50 <= y < 54
    # exclude the clicked pixel -> a different pixel
    excl = np.zeros_like(gt)
    excl[y, x] = True
    x2, y2, _ = next_click(pred2, gt, ign, exclude=excl)
    assert (x2, y2) != (x, y)
    assert next_click(gt, gt) == (0, 0, -1)
