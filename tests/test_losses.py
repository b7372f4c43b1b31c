"""SAM losses: valid-pixel masking, mask choice, gradients, IoU head target, feedback mask."""

from __future__ import annotations

import pytest
import torch

from stage2_decoder.losses import (
    dice_loss,
    focal_loss,
    iou_of_logits,
    mask_for_next_iteration,
    sam_loss,
)

H = 32  # the losses work for any H x W; small keeps the tests fast


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.zeros(2, H, H, dtype=torch.bool)
    t[0, 4:20, 6:18] = True
    t[1, 10:30, 2:12] = True
    valid = torch.ones_like(t)
    valid[:, 28:, :] = False  # padding
    valid[0, 4:8, 6:10] = False  # ignore patch over object 0
    return t, valid


def _perfect(t: torch.Tensor, scale: float = 30.0) -> torch.Tensor:
    return (t.float() * 2 - 1) * scale


def test_zero_loss_for_perfect_confident_logits() -> None:
    t, valid = _case()
    logits = _perfect(t)
    assert focal_loss(logits, t, valid).max() < 1e-9
    # dice's +1 smoothing leaves ~0 for a perfect mask
    assert dice_loss(logits, t, valid).max() < 1e-6
    assert torch.equal(iou_of_logits(logits, t, valid), torch.ones(2))
    wrong = -logits
    assert focal_loss(wrong, t, valid).min() > 1.0
    assert dice_loss(wrong, t, valid).min() > 0.9


def test_invalid_pixels_do_not_change_losses() -> None:
    t, valid = _case()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, H, H, generator=g) * 3
    changed = logits.clone()
    changed[~valid] = torch.randn(int((~valid).sum()), generator=g) * 50
    flipped = t.clone()
    flipped[~valid] = ~flipped[~valid]
    for fn in (focal_loss, dice_loss, iou_of_logits):
        base = fn(logits, t, valid)
        assert torch.allclose(base, fn(changed, t, valid), atol=1e-6)
        assert torch.allclose(base, fn(logits, flipped, valid), atol=1e-6)
        assert not torch.allclose(base, fn(changed, t, torch.ones_like(valid)), atol=1e-3)


def test_focal_is_mean_over_valid_pixels_and_alpha_weights_positives() -> None:
    t = torch.zeros(1, 4, 4, dtype=torch.bool)
    t[0, 0, 0] = True
    valid = torch.zeros_like(t)
    valid[0, 0, :2] = True  # one positive, one negative pixel count
    logits = torch.zeros(1, 4, 4)
    # at p = 0.5: ce = ln 2, (1 - p_t)^2 = 1/4; alpha 0.25 for the positive, 0.75 negative
    expected = (0.25 + 0.75) * torch.log(torch.tensor(2.0)) * 0.25 / 2
    assert torch.allclose(focal_loss(logits, t, valid), expected.view(1))


def test_iou_of_logits_cases() -> None:
    t = torch.zeros(1, 8, 8, dtype=torch.bool)
    t[0, :4, :4] = True  # 16 px
    valid = torch.ones_like(t)
    logits = torch.full((1, 8, 8), -1.0)
    logits[0, :4, :2] = 1.0  # 8 px, inside
    logits[0, 6:, 6:] = 1.0  # 4 px outside
    assert iou_of_logits(logits, t, valid).item() == pytest.approx(8 / 20)
    empty = torch.zeros_like(t)
    assert iou_of_logits(torch.full((1, 8, 8), -1.0), empty, valid).item() == 1.0


def _four_masks(t: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W): mask 0 poor, mask 2 best, masks 1 and 3 poor."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(t.shape[0], 4, H, H, generator=g)
    logits = noise * 4
    logits[:, 2] = _perfect(t, 5.0) + noise[:, 2] * 0.5
    return logits.requires_grad_(True)


def test_lowest_loss_mask_is_chosen_and_only_it_gets_gradient() -> None:
    t, valid = _case()
    logits = _four_masks(t)
    iou_pred = torch.full((2, 4), 0.5, requires_grad=True)
    multimask = torch.tensor([True, False])
    out = sam_loss(logits, iou_pred, t, valid, multimask)
    assert out.chosen.tolist() == [2, 0]  # single-mask object always uses mask 0
    assert out.per_object.shape == (2,)
    assert out.loss.shape == ()
    assert torch.allclose(out.loss, out.per_object.mean())
    out.loss.backward()
    grad_norm = logits.grad.flatten(2).abs().sum(-1)  # (B, 4)
    assert grad_norm[0, 2] > 0 and grad_norm[0, [0, 1, 3]].sum() == 0
    assert grad_norm[1, 0] > 0 and grad_norm[1, 1:].sum() == 0
    # IoU head: all candidates of the multimask object, mask 0 of the single one
    assert (iou_pred.grad[0, 1:] != 0).all() and iou_pred.grad[0, 0] == 0
    assert iou_pred.grad[1, 0] != 0 and (iou_pred.grad[1, 1:] == 0).all()


def test_loss_parts_and_weights() -> None:
    t, valid = _case()
    logits = _four_masks(t).detach()
    true_iou = iou_of_logits(logits, t, valid)
    multimask = torch.tensor([True, True])
    out = sam_loss(logits, true_iou.clone(), t, valid, multimask)  # perfect IoU head
    assert out.parts["iou_mse"].item() == pytest.approx(0.0, abs=1e-12)
    focal = focal_loss(logits, t, valid)
    dice = dice_loss(logits, t, valid)
    rows = torch.arange(2)
    expected = 20 * focal[rows, out.chosen] + dice[rows, out.chosen]
    assert torch.allclose(out.per_object, expected)
    assert set(out.parts) == {"focal", "dice", "iou_mse", "iou"}
    only_chosen = sam_loss(
        logits, torch.zeros(2, 4), t, valid, multimask, supervise_all_iou=False, focal_weight=0
    )
    assert torch.allclose(
        only_chosen.per_object, dice[rows, out.chosen] + true_iou[rows, out.chosen] ** 2
    )
    bce = sam_loss(logits, true_iou, t, valid, multimask, kind="bce_dice", focal_weight=1.0)
    assert "bce" in bce.parts and bce.loss > 0
    with pytest.raises(ValueError, match="kind"):
        sam_loss(logits, true_iou, t, valid, multimask, kind="l2")  # type: ignore[arg-type]


def test_mask_for_next_iteration_picks_highest_predicted_iou() -> None:
    logits = torch.arange(3 * 4, dtype=torch.float).view(3, 4, 1, 1).expand(3, 4, 2, 2)
    iou_pred = torch.tensor([[0.9, 0.1, 0.8, 0.3], [0.9, 0.1, 0.8, 0.3], [0.0, 0.7, 0.2, 0.1]])
    multimask = torch.tensor([True, False, True])
    fed = mask_for_next_iteration(logits.clone().requires_grad_(True), iou_pred, multimask)
    assert fed.shape == (3, 1, 2, 2)
    # object 0: best of masks 1..3 is 2 (mask 0's 0.9 does not count); 1: single -> 0; 2: 1
    assert fed[:, 0, 0, 0].tolist() == [2.0, 4.0, 9.0]
    assert not fed.requires_grad
