"""IoU (numpy and torch), NoC and the mIoU@k summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage2_decoder.metrics import binary_iou, binary_iou_batched, miou_at_clicks, noc, summarize


def test_binary_iou_cases() -> None:
    gt = np.zeros((10, 10), dtype=bool)
    gt[:4, :5] = True  # 20 px
    pred = np.zeros_like(gt)
    pred[:4, :3] = True  # 12 px inside
    pred[9, 9] = True  # 1 px outside
    assert binary_iou(pred, gt) == pytest.approx(12 / 21)
    assert binary_iou(gt, gt) == 1.0
    assert binary_iou(~gt, gt) == 0.0
    empty = np.zeros_like(gt)
    assert binary_iou(empty, empty) == 1.0
    assert binary_iou(pred, empty) == 0.0
    # ignore removes pixels from both masks
    ignore = np.zeros_like(gt)
    ignore[9, 9] = True
    ignore[:4, 3:5] = True
    assert binary_iou(pred, gt, ignore) == 1.0
    assert binary_iou(pred.astype(np.uint8), gt.astype(np.uint8)) == pytest.approx(12 / 21)
    with pytest.raises(ValueError, match="resize"):
        binary_iou(pred[:5], gt)


def test_batched_iou_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 3, 16, 16, generator=g) > 0.5
    gt = torch.rand(5, 16, 16, generator=g) > 0.6
    valid = torch.rand(5, 16, 16, generator=g) > 0.2
    gt[4] = False
    pred[4, 0] = False
    out = binary_iou_batched(pred, gt.unsqueeze(1), valid.unsqueeze(1))
    assert out.shape == (5, 3)
    for b in range(5):
        for m in range(3):
            ref = binary_iou(pred[b, m].numpy(), gt[b].numpy(), (~valid[b]).numpy())
            assert out[b, m].item() == pytest.approx(ref)
    assert out[4, 0].item() == 1.0


def test_noc_ritm_convention() -> None:
    ious = [0.5, 0.8, 0.86, 0.91, 0.95]
    assert noc(ious, 0.85) == 3
    assert noc(ious, 0.90) == 4
    assert noc(ious, 0.5) == 1
    assert noc(ious, 0.99) == 20  # never reached: capped at max_clicks
    assert noc(ious, 0.95, max_clicks=4) == 4  # reached only after max_clicks
    assert noc([], 0.9) == 20


def test_summarize_and_miou_at_clicks() -> None:
    a = [0.5, 0.7, 0.9, 0.92, 0.93, 0.95, 0.95, 0.96, 0.97]
    b = [0.2, 0.4]  # stopped after 2 clicks: later clicks keep 0.4
    per_k = miou_at_clicks([a, b])
    assert list(per_k) == [1, 2, 3, 5, 9]
    assert per_k[1] == pytest.approx(0.35)
    assert per_k[5] == pytest.approx((0.93 + 0.4) / 2)
    assert per_k[9] == pytest.approx((0.97 + 0.4) / 2)
    out = summarize([a, b], max_clicks=20)
    assert out["n_objects"] == 2
    assert out["miou@3"] == pytest.approx((0.9 + 0.4) / 2)
    assert out["noc@85"] == pytest.approx((3 + 20) / 2)
    assert out["noc@90"] == pytest.approx((3 + 20) / 2)
    assert out["nof@90"] == 1
    assert np.isnan(summarize([])["miou@1"])
