"""SAM's two-way transformer for many prompts on one image (the `decoder amg` point grid).

`transform_points` returns what `PromptableDecoder.transform_tokens` returns for B prompts that
share one image embedding and no mask prompt, from the same weights, with the arithmetic
regrouped so that the per-prompt work on the 4096 image tokens is small:

- the first layer's keys are the image embedding itself, the same for every prompt: its
  projections are computed once and broadcast over the prompts;
- in later layers the keys differ per prompt, and a projection of the 4096 image tokens is
  folded into the few prompt tokens instead (associativity of the matmuls): e.g. the logits
  q · (W_k k + b_k) are computed as (q W_k) · k + q · b_k, and the values as
  (A k) W_vᵀ + b_v (softmax rows sum to 1); the output projection of the image-to-token
  attention is folded into its values the same way.

This is about 2.3x fewer multiply-adds per prompt than Meta's order (~0.41 G instead of ~0.94 G
for a single-point prompt) and no per-prompt copies of projected image tokens. Results equal
`transform_tokens` to float rounding (~1e-6, tests/test_amg.py). Meta's modules supply every
weight (`segment_anything/modeling/transformer.py`); inference only (no autograd needed).
"""

from __future__ import annotations

import torch
from torch import nn

from stage2_decoder.model import PromptableDecoder


@torch.no_grad()
def transform_points(
    model: PromptableDecoder, image_embedding: torch.Tensor, sparse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, 5 + N, 256), keys (B, h·w, 256)) of B prompts on one image.

    image_embedding (1, 256, 64, 64); sparse (B, N, 256) from `model.embed_points`. Feed the
    outputs to `model.iou_predictions` and `model.mask_logits` (for the rows you need).
    """
    decoder = model.mask_decoder
    transformer = decoder.transformer
    index = torch.zeros(1, dtype=torch.int64, device=image_embedding.device)
    keys = model.embed_tokens(image_embedding, index, None, None)
    key_pe = model.dense_pe_tokens(keys.dtype)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
    point_embedding = torch.cat((output_tokens, sparse.to(output_tokens.dtype)), dim=1)
    queries = point_embedding
    for layer in transformer.layers:
        queries, keys = _two_way_block(layer, queries, keys, point_embedding, key_pe)
    final = transformer.final_attn_token_to_image
    attn_out = _token_to_image(final, queries + point_embedding, keys, key_pe)
    return transformer.norm_final_attn(queries + attn_out), keys


def _two_way_block(
    layer: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's `TwoWayAttentionBlock.forward`; keys (1 or B, h·w, 256), queries (B, T, 256)."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    attn_out = _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys, key_pe)
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    to_token = layer.cross_attn_image_to_token
    keys = _image_to_token(to_token, keys, key_pe, queries + query_pe, queries)  # keys + attn
    return queries, layer.norm4(keys)


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads·d) → (heads, B·T, d): one matrix per head over all prompts' tokens."""
    batch, n_tokens, _ = x.shape
    return x.unflatten(-1, (heads, -1)).permute(2, 0, 1, 3).reshape(heads, batch * n_tokens, -1)


def _against_image(rows: torch.Tensor, image: torch.Tensor, key_pe: torch.Tensor) -> torch.Tensor:
    """``rows @ (image + key_pe)ᵀ``: (B, R, h·w) for rows (B, R, 256), image (B, h·w, 256).

    ``image + key_pe`` is never formed (a pass over B·h·w·256 values): the position term is
    one matmul for all prompts (key_pe (1, h·w, 256) is shared), the image term is added to it.
    """
    batch, n_rows, _ = rows.shape
    position = (rows.flatten(0, 1) @ key_pe[0].T).view(batch, n_rows, -1)
    return torch.baddbmm(position, rows, image.transpose(1, 2))


def _image_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Projected image tokens (1, h·w, heads·d) → (heads, d, h·w), a view."""
    return x[0].unflatten(-1, (heads, -1)).permute(1, 2, 0)


def _token_to_image(
    module: nn.Module, tokens: torch.Tensor, image: torch.Tensor, key_pe: torch.Tensor
) -> torch.Tensor:
    """Meta's ``module(q=tokens, k=image + key_pe, v=image)``: (B, T, 256).

    tokens (B, T, 256); image (1 or B, h·w, 256), key_pe (1, h·w, 256). Batch 1: the image side is
    projected once and shared; batch B: the key and value projections are folded into the
    tokens (the key bias adds a constant per token to the logits of one softmax: dropped).
    """
    heads, dim = module.num_heads, module.internal_dim // module.num_heads
    batch, n_tokens, _ = tokens.shape
    q = _heads_first(module.q_proj(tokens), heads) * dim**-0.5  # a power of two (d = 16): exact
    if image.shape[0] == 1 < batch:
        k = _image_heads(module.k_proj(image + key_pe), heads)  # (heads, d, h·w)
        v = _image_heads(module.v_proj(image), heads).transpose(1, 2)  # (heads, h·w, d)
        out = torch.softmax(q @ k, dim=-1) @ v  # (heads, B·T, d)
    else:
        folded = q @ module.k_proj.weight.view(heads, dim, -1)  # (heads, B·T, 256)
        folded = folded.unflatten(1, (batch, n_tokens)).transpose(0, 1).flatten(1, 2)
        logits = _against_image(folded, image, key_pe)  # (B, heads·T, h·w)
        mixed = torch.softmax(logits, dim=-1) @ image  # (B, heads·T, 256)
        mixed = mixed.unflatten(1, (heads, n_tokens)).transpose(0, 1).flatten(1, 2)
        v_weight = module.v_proj.weight.view(heads, dim, -1).transpose(1, 2)  # (heads, 256, d)
        out = mixed @ v_weight + module.v_proj.bias.view(heads, 1, dim)  # (heads, B·T, d)
    out = out.unflatten(1, (batch, n_tokens)).permute(1, 2, 0, 3).flatten(2)
    return module.out_proj(out)


def _image_to_token(
    module: nn.Module,
    image: torch.Tensor,
    key_pe: torch.Tensor,
    tokens_pe: torch.Tensor,
    tokens: torch.Tensor,
) -> torch.Tensor:
    """``image + module(q=image + key_pe, k=tokens_pe, v=tokens)`` (the residual): (B, h·w, 256).

    image (1 or B, h·w, 256), key_pe (1, h·w, 256); tokens_pe and tokens (B, T, 256). The softmax
    runs over the T tokens; the output projection is folded into the values (its bias too:
    each head's weights sum to 1, so bias / heads per value row adds the bias once), so the
    per-prompt work on the image tokens is two matmuls with heads·T columns.
    """
    heads, dim = module.num_heads, module.internal_dim // module.num_heads
    batch, n_tokens, _ = tokens.shape
    k = _heads_first(module.k_proj(tokens_pe), heads) * dim**-0.5  # (heads, B·T, d)
    if image.shape[0] == 1 < batch:
        logits = k @ _image_heads(module.q_proj(image + key_pe), heads)  # (heads, B·T, h·w)
        logits = logits.unflatten(1, (batch, n_tokens))
        attn = torch.softmax(logits, dim=-2).transpose(0, 1).flatten(1, 2)
    else:
        bias = (k @ module.q_proj.bias.view(heads, dim, 1)).unflatten(1, (batch, n_tokens))
        folded = (k @ module.q_proj.weight.view(heads, dim, -1)).unflatten(1, (batch, n_tokens))
        fold = lambda x: x.transpose(0, 1).flatten(1, 2)  # noqa: E731  (B, heads·T, …)
        logits = _against_image(fold(folded), image, key_pe) + fold(bias)
        attn = torch.softmax(logits.unflatten(1, (heads, n_tokens)), dim=-2).flatten(1, 2)
    v = _heads_first(module.v_proj(tokens), heads)  # (heads, B·T, d)
    out_weight = module.out_proj.weight.view(-1, heads, dim).permute(1, 2, 0)  # (heads, d, 256)
    values = v @ out_weight + module.out_proj.bias / heads  # (heads, B·T, 256)
    values = values.unflatten(1, (batch, n_tokens)).transpose(0, 1).flatten(1, 2)
    return torch.baddbmm(image, attn.transpose(1, 2), values)  # (B, h·w, 256)
