"""PromptableDecoder equals Meta's prompt_encoder + mask_decoder calls (random weights)."""

from __future__ import annotations

import pytest
import torch

from shared.sam_models import sam_modeling
from stage2_decoder.model import PromptableDecoder, build_meta_modules

ATOL = 1e-4
# Most tests use a 16x16 image embedding (input 256x256, masks 64x64) to stay fast on 2 busy
# CPU cores; the arithmetic is the same at 64x64. test_points_only runs SAM's real sizes.
SMALL = 16


def _small_meta_modules() -> tuple[torch.nn.Module, torch.nn.Module]:
    modeling = sam_modeling()
    prompt_encoder = modeling.PromptEncoder(
        embed_dim=256,
        image_embedding_size=(SMALL, SMALL),
        input_image_size=(SMALL * 16, SMALL * 16),
        mask_in_chans=16,
    )
    transformer = modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
    mask_decoder = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=transformer,
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def _randomise(model: PromptableDecoder) -> PromptableDecoder:
    # Default init leaves some embeddings at values that would hide mistakes; randomise them.
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0.0, 0.5)
        model.mask_decoder.iou_token.weight.normal_()
        model.mask_decoder.mask_tokens.weight.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def full() -> PromptableDecoder:
    torch.manual_seed(0)
    return _randomise(PromptableDecoder(*build_meta_modules()))


@pytest.fixture(scope="module")
def decoder() -> PromptableDecoder:
    torch.manual_seed(0)
    prompt_encoder, mask_decoder = _small_meta_modules()
    # Default init leaves some embeddings at values that would hide mistakes; randomise them.
    return _randomise(PromptableDecoder(prompt_encoder, mask_decoder))


def _images(n: int, seed: int = 1, side: int = SMALL) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 256, side, side, generator=g)


def _meta(
    model: PromptableDecoder,
    image: torch.Tensor,
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    masks: torch.Tensor | None,
    both_calls: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's calls for one image; all 4 masks (mask 0 single, 1..3 multimask).

    With both_calls, Meta's `mask_decoder(..., multimask_output=False)` ++ `(...=True)`;
    otherwise its `predict_masks`, which both of those slice (half the CPU time).
    """
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=masks)
    pe = model.prompt_encoder.get_dense_pe()
    if not both_calls:
        return model.mask_decoder.predict_masks(image[None], pe, sparse, dense)
    single = model.mask_decoder(image[None], pe, sparse, dense, multimask_output=False)
    multi = model.mask_decoder(image[None], pe, sparse, dense, multimask_output=True)
    return torch.cat([single[0], multi[0]], dim=1), torch.cat([single[1], multi[1]], dim=1)


def _assert_close(ours: tuple, meta: tuple) -> None:
    assert ours[0].shape == meta[0].shape
    assert ours[1].shape == meta[1].shape
    assert (ours[0] - meta[0]).abs().max().item() <= ATOL
    assert (ours[1] - meta[1]).abs().max().item() <= ATOL


@torch.no_grad()
def test_points_only_full_size(full: PromptableDecoder) -> None:
    decoder = full
    image = _images(1, side=64)
    coords = torch.tensor([[[100.0, 200.0], [500.0, 37.5]], [[900.0, 900.0], [3.0, 1000.0]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    meta = _meta(decoder, image[0], (coords, labels), None, None, both_calls=True)
    # Meta pads a points-only prompt with one (0, 0) point labelled -1.
    ours_coords = torch.cat([coords, torch.zeros(2, 1, 2)], dim=1)
    ours_labels = torch.cat([labels, -torch.ones(2, 1, dtype=torch.long)], dim=1)
    ours = decoder(image, torch.zeros(2, dtype=torch.long), ours_coords, ours_labels)
    _assert_close(ours, meta)


@torch.no_grad()
def test_box_only(decoder: PromptableDecoder) -> None:
    image = _images(1, seed=2)
    boxes = torch.tensor([[10.0, 20.0, 75.0, 100.0], [128.0, 25.0, 250.0, 175.0]])
    meta = _meta(decoder, image[0], None, boxes, None)
    ours = decoder(
        image, torch.zeros(2, dtype=torch.long), boxes.view(2, 2, 2), torch.tensor([[2, 3], [2, 3]])
    )
    _assert_close(ours, meta)


@torch.no_grad()
def test_points_and_box(decoder: PromptableDecoder) -> None:
    image = _images(1, seed=3)
    coords = torch.tensor([[[37.5, 62.5]], [[150.0, 75.0]]])
    labels = torch.tensor([[1], [0]])
    boxes = torch.tensor([[10.0, 20.0, 75.0, 100.0], [128.0, 25.0, 250.0, 175.0]])
    meta = _meta(decoder, image[0], (coords, labels), boxes, None)
    ours_coords = torch.cat([coords, boxes.view(2, 2, 2)], dim=1)
    ours_labels = torch.cat([labels, torch.tensor([[2, 3], [2, 3]])], dim=1)
    ours = decoder(image, torch.zeros(2, dtype=torch.long), ours_coords, ours_labels)
    _assert_close(ours, meta)
    # Token order does not matter (corners first, then the point).
    perm = decoder(
        image,
        torch.zeros(2, dtype=torch.long),
        ours_coords[:, [1, 2, 0]],
        ours_labels[:, [1, 2, 0]],
    )
    _assert_close(perm, meta)


@torch.no_grad()
def test_mask_input_and_mixed_has_mask(decoder: PromptableDecoder) -> None:
    image = _images(1, seed=4)
    g = torch.Generator().manual_seed(5)
    masks = torch.randn(2, 1, SMALL * 4, SMALL * 4, generator=g) * 5
    coords = torch.tensor([[[25.0, 50.0]], [[175.0, 200.0]]])
    labels = torch.tensor([[1], [1]])
    meta_mask = _meta(decoder, image[0], (coords, labels), None, masks)
    meta_none = _meta(decoder, image[0], (coords, labels), None, None)
    pc = torch.cat([coords, torch.zeros(2, 1, 2)], dim=1)
    pl = torch.tensor([[1, -1], [1, -1]])
    idx = torch.zeros(2, dtype=torch.long)
    _assert_close(decoder(image, idx, pc, pl, masks), meta_mask)
    ours = decoder(image, idx, pc, pl, masks, torch.tensor([True, False]))
    _assert_close((ours[0][:1], ours[1][:1]), (meta_mask[0][:1], meta_mask[1][:1]))
    _assert_close((ours[0][1:], ours[1][1:]), (meta_none[0][1:], meta_none[1][1:]))
    assert (meta_mask[0][1] - meta_none[0][1]).abs().max() > 1e-2  # the mask matters


@torch.no_grad()
def test_several_images_mixed_prompts(decoder: PromptableDecoder) -> None:
    # fp16 embeddings as stored in the cache; Meta gets the same rounded values in fp32.
    images = _images(3, seed=6).half()
    box = torch.tensor([[10.0, 15.0, 200.0, 125.0]])
    point = torch.tensor([[[75.0, 75.0]]])
    expected = [
        _meta(decoder, images[2].float(), (point, torch.tensor([[1]])), None, None),
        _meta(decoder, images[0].float(), None, box, None),
        _meta(decoder, images[1].float(), (point, torch.tensor([[0]])), None, None),
    ]
    coords = torch.stack(
        [
            torch.tensor([[75.0, 75.0], [0.0, 0.0]]),
            box.view(2, 2),
            torch.tensor([[75.0, 75.0], [0.0, 0.0]]),
        ]
    )
    labels = torch.tensor([[1, -1], [2, 3], [0, -1]])
    ours = decoder(images, torch.tensor([2, 0, 1]), coords, labels)
    for i in range(3):
        _assert_close((ours[0][i : i + 1], ours[1][i : i + 1]), expected[i])


def test_state_dict_keys_and_pe_cache_refresh() -> None:
    torch.manual_seed(1)
    a = PromptableDecoder(*build_meta_modules())
    torch.manual_seed(2)
    b = PromptableDecoder(*build_meta_modules())
    keys = list(a.state_dict())
    assert all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in keys)
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in keys
    pe_before = a.dense_pe().clone()
    a.load_state_dict(b.state_dict())
    assert not torch.allclose(pe_before, a.dense_pe())
    assert torch.equal(a.dense_pe(), b.prompt_encoder.get_dense_pe())


def test_gradients_reach_decoder_and_prompt_encoder(decoder: PromptableDecoder) -> None:
    image = _images(1, seed=7)
    masks = torch.randn(1, 1, SMALL * 4, SMALL * 4)
    decoder.zero_grad()
    logits, iou = decoder(
        image,
        torch.zeros(1, dtype=torch.long),
        torch.tensor([[[5.0, 9.0]]]),
        torch.tensor([[1]]),
        masks,
    )
    (logits.mean() + iou.mean()).backward()
    assert decoder.mask_decoder.mask_tokens.weight.grad is not None
    assert decoder.prompt_encoder.point_embeddings[1].weight.grad.abs().sum() > 0
    assert decoder.prompt_encoder.mask_downscaling[0].weight.grad.abs().sum() > 0
    decoder.zero_grad()


def test_bad_label_is_refused(decoder: PromptableDecoder) -> None:
    with pytest.raises(ValueError, match="point_labels"):
        decoder.embed_points(torch.zeros(1, 1, 2), torch.tensor([[4]]))
