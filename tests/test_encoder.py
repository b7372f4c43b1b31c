"""Tests for stage1_embed.encoder: fast attention, precisions, batching (tiny random ViTs)."""

from __future__ import annotations

import copy
import importlib
from functools import partial

import pytest
import torch

from shared.sam_models import sam_modeling
from stage1_embed import encoder as enc_mod
from stage1_embed.encoder import EncoderRunner, FastAttention, resolve_precision

IMG = 256  # 16×16 tokens: window 14 pads to 28 (4 windows), one global block


def _image_encoder_module():
    sam_modeling()
    return importlib.import_module("segment_anything.modeling.image_encoder")


def _tiny_encoder(use_rel_pos: bool = True, seed: int = 0) -> torch.nn.Module:
    """A 2-block ViT (block 0 windowed, block 1 global) with random, non-zero rel-pos tables."""
    torch.manual_seed(seed)
    encoder = sam_modeling().ImageEncoderViT(
        img_size=IMG,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=4,
        out_chans=32,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=use_rel_pos,
        global_attn_indexes=(1,),
        window_size=14,
    )
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                param.normal_(std=0.5)
    return encoder.eval()


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMG, IMG, generator=gen)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["mask", "augment"])
@pytest.mark.parametrize("use_rel_pos", [True, False])
@pytest.mark.parametrize("grid,batch", [(16, 1), (14, 4)])
def test_fast_attention_equals_meta_fp32(mode, use_rel_pos, grid, batch):
    meta = _image_encoder_module().Attention(
        64, num_heads=2, use_rel_pos=use_rel_pos, input_size=(grid, grid)
    )
    if use_rel_pos:
        with torch.no_grad():
            meta.rel_pos_h.normal_(std=0.5)
            meta.rel_pos_w.normal_(std=0.5)
    x = torch.randn(batch, grid, grid, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = meta(x)
        got = FastAttention(meta, mode)(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_mask_mode_in_chunks_of_heads_equals_meta(monkeypatch):
    monkeypatch.setattr(enc_mod, "MASK_BUDGET_BYTES", 1)  # one (image, head) pair per chunk
    meta = _image_encoder_module().Attention(64, num_heads=4, use_rel_pos=True, input_size=(9, 9))
    with torch.no_grad():
        meta.rel_pos_h.normal_(std=0.5)
        meta.rel_pos_w.normal_(std=0.5)
    x = torch.randn(3, 9, 9, 64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = meta(x)
        got = FastAttention(meta, "mask")(x)
    assert (got - expected).abs().max().item() < 1e-5


def test_fast_attention_bf16_close_to_fp32():
    meta = _image_encoder_module().Attention(64, num_heads=2, use_rel_pos=True, input_size=(16, 16))
    with torch.no_grad():
        meta.rel_pos_h.normal_(std=0.5)
        meta.rel_pos_w.normal_(std=0.5)
    x = torch.randn(1, 16, 16, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = meta(x)
        got = FastAttention(copy.deepcopy(meta).to(torch.bfloat16), "augment")(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert _rel_l2(got.float(), expected) < 2e-2


def test_rejects_unknown_rel_pos_mode():
    meta = _image_encoder_module().Attention(64, num_heads=2)
    with pytest.raises(ValueError, match="rel_pos_mode"):
        FastAttention(meta, "flash")


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_runner_fp32_reproduces_module(use_rel_pos):
    encoder = _tiny_encoder(use_rel_pos)
    x = _images(1)
    with torch.inference_mode():
        expected = encoder(x)
    exact = EncoderRunner(copy.deepcopy(encoder), "fp32", fast_attention=False).encode(x)
    assert torch.equal(exact, expected)
    fast = EncoderRunner(copy.deepcopy(encoder), "fp32").encode(x)
    assert fast.dtype == torch.float32 and fast.shape == (1, 32, IMG // 16, IMG // 16)
    assert (fast - expected).abs().max().item() < 1e-5


def test_runner_bf16_close_but_not_fp32():
    encoder = _tiny_encoder()
    x = _images(1)
    with torch.inference_mode():
        expected = encoder(x)
    runner = EncoderRunner(copy.deepcopy(encoder), "bf16")
    got = runner.encode(x)
    assert runner.encoder.blocks[0].mlp.lin1.weight.dtype == torch.bfloat16
    assert runner.encoder.blocks[0].norm1.weight.dtype == torch.float32
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    error = _rel_l2(got, expected)
    # measured 0.2% on this model, 0.5% on random-weight ViT-B; an all-fp32 run gives ~1e-7
    assert 1e-4 < error < 2e-2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batch_of_two_equals_two_singles(precision):
    runner = EncoderRunner(_tiny_encoder(), precision)
    x = _images(2)
    both = runner.encode(x)
    singles = torch.cat([runner.encode(x[:1]), runner.encode(x[1:])])
    tol = 1e-5 if precision == "fp32" else 1e-2 * singles.abs().max().item()
    assert (both - singles).abs().max().item() <= tol
    assert not torch.allclose(both[0], both[1])


def test_meta_classes_are_not_patched():
    meta = _image_encoder_module()
    forward_before = meta.Attention.forward
    runner = EncoderRunner(_tiny_encoder(), "bf16")
    runner.encode(_images(1))
    assert meta.Attention.forward is forward_before
    assert type(runner.encoder.blocks[0].attn) is meta.Attention
    assert "forward" not in vars(runner.encoder.blocks[0].attn)


def test_encode_rejects_wrong_shape():
    runner = EncoderRunner(_tiny_encoder(), "fp32")
    with pytest.raises(ValueError, match="Sam.preprocess"):
        runner.encode(torch.zeros(1, 3, IMG, IMG // 2))


def test_runner_rejects_other_modules():
    with pytest.raises(ValueError, match="ImageEncoderViT"):
        EncoderRunner(torch.nn.Linear(2, 2), "fp32")


def test_resolve_precision_cpu(monkeypatch):
    monkeypatch.setattr(enc_mod, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(enc_mod, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        resolve_precision("half", "cpu")


def test_resolve_precision_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    assert enc_mod.default_batch_size("cuda") > 1 and enc_mod.default_batch_size("cpu") == 1
