"""``TinyConvEncoder``: the CPU-fast image encoder of ``samcache_tiny`` (a demonstration model).

Same interface as Meta's ``ImageEncoderViT``: input the normalised, zero-padded B×3×1024×1024
tensor that ``Sam.preprocess`` makes, output B×256×64×64 image embeddings. Layout:

- ``patch_embed.proj``: a stride-16 16×16 convolution (3 → ``embed_dim``), as SAM's patch
  embedding, so every embedding cell sees exactly its 16×16 pixels of the 1024 frame;
- ``blocks``: ``depth`` ConvNeXt-style blocks at 64×64 (depthwise 7×7 conv, LayerNorm2d,
  pointwise MLP ×4, residual); blocks with an odd index use dilation 3 to widen the view
  (6 blocks see ≈ 85 cells, the whole 64×64 grid);
- ``neck``: SAM's neck, 1×1 conv to 256, LayerNorm2d, 3×3 conv, LayerNorm2d.

State-dict keys ``patch_embed.proj.weight`` and ``blocks.<i>.*`` follow Meta's names, so
``detect_model_type`` tells the model types apart by width and number of blocks. About 1.5 M
parameters; one 1024×1024 image costs ≈ 6 GFLOP (SAM ViT-B: 972). It has no positional
embedding (the decoder's dense positional encoding gives positions). Weights come from
``tools/pretrain_tiny.py``: synthetic shapes only, NOT a substitute for SAM.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.sam_models import sam_modeling

IMG_SIZE = 1024
OUT_CHANS = 256


class _PatchEmbed(nn.Module):
    """Stride-16 patch embedding (B×3×1024×1024 → B×C×64×64, channels first)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=16, stride=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ConvBlock(nn.Module):
    """ConvNeXt block: depthwise k×k (dilated) → LayerNorm2d → 1×1 (×4) → GELU → 1×1, residual."""

    def __init__(self, dim: int, kernel_size: int = 7, dilation: int = 1) -> None:
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.dwconv = nn.Conv2d(
            dim, dim, kernel_size, padding=padding, dilation=dilation, groups=dim
        )
        self.norm = sam_modeling().common.LayerNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma * h


class TinyConvEncoder(nn.Module):
    """A small convolutional image encoder with SAM's input and output (see module docstring).

    Args:
        embed_dim: channels of the patch embedding and the blocks.
        depth: number of ConvBlocks at 64×64.
        out_chans: embedding channels (256, as SAM).
    """

    def __init__(self, embed_dim: int = 128, depth: int = 6, out_chans: int = OUT_CHANS) -> None:
        super().__init__()
        self.img_size = IMG_SIZE  # read by Sam.preprocess
        self.patch_embed = _PatchEmbed(embed_dim)
        self.blocks = nn.ModuleList(
            ConvBlock(embed_dim, dilation=3 if i % 2 else 1) for i in range(depth)
        )
        layer_norm = sam_modeling().common.LayerNorm2d
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            layer_norm(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            layer_norm(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×3×1024×1024 normalised, padded images → B×256×64×64 embeddings (contiguous).

        Runs channels-last inside (depthwise convolutions are ≈ 10× faster so on a CPU).
        """
        x = self.patch_embed(x).contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = block(x)
        return self.neck(x).contiguous()
