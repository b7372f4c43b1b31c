"""Run SAM's ViT image encoder fast: precision choice, SDPA attention, bf16 blocks.

`EncoderRunner` turns a batch of preprocessed images (``Sam.preprocess`` output: B×3×1024×1024
float32, normalised and zero-padded bottom-right) into image embeddings (B×256×64×64 float32 on
the CPU), what ``SamPredictor.get_image_embedding()`` returns for each image.

Precisions (``resolve_precision``):

- ``fp32``: Meta's semantics. With ``fast_attention`` (default) the attention runs through
  ``scaled_dot_product_attention`` with the decomposed relative-position bias as ``attn_mask``,
  built a few heads at a time in one reused buffer; embeddings equal Meta's to float rounding
  (≈1e-6 relative). With ``fast_attention=False``, ``encode`` is exactly ``encoder(batch)``.
- ``bf16`` / ``fp16``: the blocks' attention and MLP weights are cast to the low dtype; the
  patch embedding, positional embedding, LayerNorms, residual stream and neck stay fp32 (they
  cost little and halve the error of a plain ``.to(bfloat16)``). With relative positions the
  attention uses "augmented" queries and keys, ``q' = [q·scale, rel_h, rel_w]`` and
  ``k' = [k, onehot(row), onehot(col)]``, so that ``q'·k'`` is Meta's biased logit and no N×N
  bias or attention matrix is ever materialised.

Why (bench/bench_encoder.py, ViT-B): Meta's attention spends most of its time adding the rel-pos
bias to, and soft-maxing, 12×4096×4096 matrices in the global blocks; on a 2-core AVX512-BF16/AMX
CPU this runner in bf16 is several times faster than Meta's fp32 forward (see the bench).

Meta's classes are never patched: the runner keeps its own attention wrappers and its own loop
over the blocks. It owns the module it is given (low precisions cast the blocks in place).
Any other encoder module (``samcache_tiny``'s ``TinyConvEncoder``) runs as ``encoder(batch)``,
under ``torch.autocast`` for bf16 / fp16.
"""

from __future__ import annotations

import importlib
import platform
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.sam_models import sam_modeling

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MASK_BUDGET_BYTES = 64 * 2**20  # largest rel-pos bias built at once by FastAttention "mask"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _meta_image_encoder() -> Any:
    """Meta's ``segment_anything.modeling.image_encoder`` module (window/rel-pos helpers)."""
    sam_modeling()
    return importlib.import_module("segment_anything.modeling.image_encoder")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16, AMX or Arm BF16)."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, name, None)
        if check is not None and check():
            return True
    if platform.machine().lower() in ("arm64", "aarch64"):
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Turn ``auto``/``fp32``/``bf16``/``fp16`` into the precision used on ``device``.

    ``auto`` is ``bf16`` on CUDA when supported (else ``fp16``), ``bf16`` on CPUs with native bf16
    and ``fp32`` elsewhere (with a warning saying why). ``fp16`` is refused on the CPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if kind == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if kind != "cpu":
        return "fp32" if precision == "auto" else precision
    if precision == "fp16":
        raise ValueError("fp16 is not supported on the CPU; use --precision bf16 or fp32")
    if precision == "auto":
        if cpu_has_native_bf16():
            return "bf16"
        warnings.warn(
            "this CPU has no native bf16 (AVX512-BF16/AMX); encoding in fp32", stacklevel=2
        )
        return "fp32"
    if precision == "bf16" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bf16; bf16 will be slow here", stacklevel=2)
    return precision


def default_batch_size(device: torch.device | str) -> int:
    """Images per ``encode`` call: 1 on the CPU (no gain from batching there), 8 on CUDA."""
    return 8 if torch.device(device).type == "cuda" else 1


class FastAttention(nn.Module):
    """Meta's image-encoder ``Attention`` computed with ``scaled_dot_product_attention``.

    Shares the parameters of the wrapped module (nothing is copied or patched). Input and output
    are B×H×W×dim tokens, as in Meta's module.

    Args:
        attn: a ``segment_anything.modeling.image_encoder.Attention``.
        rel_pos_mode: ``"mask"`` adds the decomposed relative-position bias as an ``attn_mask``
            (best in fp32); ``"augment"`` folds it into head-dim-extended queries and keys
            (best in bf16/fp16: no N×N tensor is built).
    """

    def __init__(self, attn: nn.Module, rel_pos_mode: str = "mask") -> None:
        super().__init__()
        if rel_pos_mode not in ("mask", "augment"):
            raise ValueError(f"rel_pos_mode must be 'mask' or 'augment', got {rel_pos_mode!r}")
        self.inner = attn
        self.rel_pos_mode = rel_pos_mode
        self._onehots: dict[tuple[Any, ...], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.inner
        batch, height, width, _ = x.shape
        qkv = attn.qkv(x).reshape(batch, height * width, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B×heads×N×head_dim
        if not attn.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        elif self.rel_pos_mode == "mask":
            out = self._masked(q, k, v, height, width)
        else:
            out = self._augmented(q, k, v, height, width)
        out = out.transpose(1, 2).reshape(batch, height, width, -1)
        return attn.proj(out)

    def _rel_terms(self, q: torch.Tensor, height: int, width: int) -> tuple[Any, Any]:
        """Meta's ``add_decomposed_rel_pos`` terms: B×heads×N×height and B×heads×N×width."""
        attn, meta = self.inner, _meta_image_encoder()
        batch, heads, _, head_dim = q.shape
        r_q = q.reshape(batch * heads, height, width, head_dim)
        r_h = meta.get_rel_pos(height, height, attn.rel_pos_h)
        r_w = meta.get_rel_pos(width, width, attn.rel_pos_w)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, r_h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, r_w)
        shape = (batch, heads, height * width)
        return rel_h.reshape(*shape, height), rel_w.reshape(*shape, width)

    def _masked(self, q: Any, k: Any, v: Any, height: int, width: int) -> torch.Tensor:
        """Attention with the rel-pos bias as ``attn_mask``, a few heads at a time.

        The N×N bias of a chunk of (image, head) pairs is built in one reused buffer of at most
        ``MASK_BUDGET_BYTES`` (one head of a global ViT-B layer: 64 MiB in fp32), which is
        faster than one B×heads×N×N mask and keeps memory flat.
        """
        rel_h, rel_w = (t.flatten(0, 1) for t in self._rel_terms(q, height, width))
        batch, heads, tokens, head_dim = q.shape
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B·heads)×N×head_dim
        chunk = max(1, MASK_BUDGET_BYTES // (tokens * tokens * q.element_size()))
        mask = q.new_empty(min(chunk, batch * heads), tokens, height, width)
        out = torch.empty_like(q)
        for start in range(0, batch * heads, chunk):
            part = slice(start, min(start + chunk, batch * heads))
            bias = mask[: part.stop - start]
            torch.add(rel_h[part].unsqueeze(-1), rel_w[part].unsqueeze(-2), out=bias)
            out[part] = F.scaled_dot_product_attention(
                q[None, part], k[None, part], v[None, part],
                attn_mask=bias.flatten(-2)[None], scale=self.inner.scale,
            )[0]  # fmt: skip
        return out.view(batch, heads, tokens, head_dim)

    def _augmented(self, q: Any, k: Any, v: Any, height: int, width: int) -> torch.Tensor:
        """Attention with the rel-pos bias folded into extra query/key dimensions.

        ``q'·k' = scale·q·k + rel_h[kh] + rel_w[kw]``; all three get the same head dim (the CPU
        flash kernel needs it), padded with zeros to a multiple of 8 (faster, and CUDA kernels
        want it).
        """
        rel_h, rel_w = self._rel_terms(q, height, width)
        batch, heads, tokens, head_dim = q.shape
        pad = -(head_dim + height + width) % 8
        zeros = q.new_zeros(()).expand(batch, heads, tokens, height + width + pad)
        q_aug = torch.cat([q, rel_h, rel_w, zeros[..., :pad]], dim=-1)
        q_aug[..., :head_dim] *= self.inner.scale
        onehot = self._onehot(height, width, pad, q.dtype, q.device)
        k_aug = torch.cat([k, onehot.expand(batch, heads, tokens, -1)], dim=-1)
        v_aug = torch.cat([v, zeros], dim=-1)
        out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)
        return out[..., :head_dim]

    def _onehot(self, height: int, width: int, pad: int, dtype: Any, device: Any) -> torch.Tensor:
        """N×(height+width+pad) rows: key j → [onehot(j // width), onehot(j % width), 0…]."""
        key = (height, width, pad, dtype, device)
        if key not in self._onehots:
            rows = torch.eye(height, dtype=dtype, device=device).repeat_interleave(width, dim=0)
            cols = torch.eye(width, dtype=dtype, device=device).repeat(height, 1)
            self._onehots[key] = F.pad(torch.cat([rows, cols], dim=-1), (0, pad))
        return self._onehots[key]


class EncoderRunner:
    """Encode preprocessed images with SAM's ``ImageEncoderViT`` at a chosen precision.

    The runner owns ``encoder``: it moves it to ``device`` and, for ``bf16``/``fp16``, casts the
    blocks' attention and MLP weights in place (the rest stays fp32).

    Args:
        encoder: Meta's ``ImageEncoderViT`` (any size), weights loaded.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see ``resolve_precision``).
        device: where to run, e.g. ``"cpu"`` or ``"cuda:0"``.
        fast_attention: compute attention with ``scaled_dot_product_attention``. ``None`` means
            on for every precision (fp32 results then equal Meta's to ≈1e-6 relative); ``False``
            in fp32 makes ``encode`` exactly ``encoder(batch)``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        precision: str = "auto",
        device: torch.device | str = "cpu",
        fast_attention: bool | None = None,
    ) -> None:
        from shared.tiny_encoder import TinyConvEncoder

        self.is_vit = isinstance(encoder, _meta_image_encoder().ImageEncoderViT)
        if not (self.is_vit or isinstance(encoder, TinyConvEncoder)):
            raise ValueError(
                f"expected Meta's ImageEncoderViT or samcache's TinyConvEncoder, "
                f"got {type(encoder).__name__}"
            )
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = _DTYPES[self.precision]
        self.fast_attention = True if fast_attention is None else fast_attention
        self.encoder = encoder.eval().to(self.device)
        self.img_size: int = encoder.img_size
        if not self.is_vit:  # samcache_tiny's conv encoder: plain forward
            self._attns = []
            return
        if self.dtype != torch.float32:
            for block in self.encoder.blocks:
                block.attn.to(self.dtype)
                block.mlp.to(self.dtype)
        mode = "mask" if self.dtype == torch.float32 else "augment"
        self._attns = [
            FastAttention(block.attn, mode) if self.fast_attention else block.attn
            for block in self.encoder.blocks
        ]

    @property
    def batch_size(self) -> int:
        """Suggested images per ``encode`` call on this device."""
        return default_batch_size(self.device)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a batch.

        Args:
            batch: B×3×1024×1024 float32, normalised and padded as ``Sam.preprocess`` makes it.

        Returns:
            B×256×64×64 float32 image embeddings on the CPU.
        """
        expected = (3, self.img_size, self.img_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(
                f"encoder input must be B×{expected[0]}×{expected[1]}×{expected[2]}, "
                f"got {tuple(batch.shape)}; preprocess images with Sam.preprocess first"
            )
        x = batch.to(self.device, torch.float32)
        with torch.no_grad():
            if not self.is_vit:
                with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != x.dtype):
                    out = self.encoder(x)
            elif self.dtype == torch.float32 and not self.fast_attention:
                out = self.encoder(x)
            else:
                out = self._forward(x)
        return out.float().cpu()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """``ImageEncoderViT.forward`` with our attention and a fp32 residual stream."""
        enc = self.encoder
        # Meta's patch_embed returns a permuted view; a contiguous residual stream makes every
        # later add and LayerNorm read memory in order (same values, 10-20% less time).
        x = enc.patch_embed(x).contiguous()
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for block, attn in zip(enc.blocks, self._attns, strict=True):
            x = self._block(block, attn, x)
        return enc.neck(x.permute(0, 3, 1, 2))

    def _block(self, block: nn.Module, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Meta's ``Block.forward``; norms and residual adds stay fp32, attention/MLP in dtype."""
        meta = _meta_image_encoder()
        h = block.norm1(x).to(self.dtype)
        if block.window_size > 0:
            height, width = h.shape[1], h.shape[2]
            h, pad_hw = meta.window_partition(h, block.window_size)
            h = meta.window_unpartition(attn(h), block.window_size, pad_hw, (height, width))
        else:
            h = attn(h)
        x = x + h
        return x + block.mlp(block.norm2(x).to(self.dtype))
