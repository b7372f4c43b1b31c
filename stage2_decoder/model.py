"""SAM's prompt encoder + mask decoder, batched over objects of many images.

`PromptableDecoder` wraps Meta's `PromptEncoder` and `MaskDecoder` (built by the caller, see
`build_meta_modules`) under their own attribute names, so its state dict holds exactly Meta's
keys `prompt_encoder.*` and `mask_decoder.*` and loads from / exports to a SAM checkpoint.

It differs from Meta's calls in three ways, all numerically equivalent to them:

- a batch is B *objects* of up to I images: each object's image embedding is gathered with
  `image_index` (Meta's `predict_masks` repeats one image's embedding per prompt);
- points and box corners arrive as one list of labelled points per object (label 2 / 3 = box
  top-left / bottom-right corner, embedded exactly as Meta's `_embed_boxes`; -1 = padding,
  embedded as Meta's `not_a_point_embed`), so one batch can mix point, box and point+box
  prompts. Meta's own layouts are: points only -> the points then one -1 pad; box only ->
  the two corners; points + box -> the points then the two corners (no pad). The transformer
  is permutation-equivariant over prompt tokens, so only the multiset of tokens matters;
  extra -1 pads do change the output slightly (as in Meta's model);
- all 4 mask tokens are returned (mask 0 = single-mask output, 1..3 = multimask outputs) and
  the caller picks per object.

`forward` runs Meta's arithmetic token-major, (B, h·w, 256), the layout the transformer works
in (Meta's modules supply every weight; only the order of operations differs, see
`decode_tokens`): the image embedding is made token-major once per image (a view of a
channels-last tensor), the transposed convolutions of `output_upscaling` are matmuls on the
tokens, attention logits are laid out (few tokens, many tokens) (`_attend`). It equals Meta's
calls to ~1e-6 in fp32, gradients included (tests/test_decoder_model.py, test_step_fast.py),
and runs in the dtype of the parameters (bf16 copies for speed, step.py). `_predict_masks`
keeps Meta's own code path (the ONNX export traces it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.sam_models import sam_modeling

LABEL_PAD = -1
LABEL_NEG = 0
LABEL_POS = 1
LABEL_BOX_TL = 2
LABEL_BOX_BR = 3


def build_meta_modules() -> tuple[nn.Module, nn.Module]:
    """Meta's `PromptEncoder` and `MaskDecoder` with SAM's defaults (same for vit_b/l/h).

    Weights are random (PyTorch's default init); load a checkpoint into the wrapper afterwards.
    """
    modeling = sam_modeling()
    prompt_encoder = modeling.PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(1024, 1024),
        mask_in_chans=16,
    )
    mask_decoder = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8
        ),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


class PromptableDecoder(nn.Module):
    """Meta's prompt encoder + mask decoder, one forward for a batch of objects.

    Arguments:
      prompt_encoder: Meta's `PromptEncoder` (kept as attribute `prompt_encoder`).
      mask_decoder: Meta's `MaskDecoder` (kept as attribute `mask_decoder`).
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self._dense_pe_cache: dict[torch.dtype, tuple[tuple, torch.Tensor]] = {}

    def _cached_pe(self, dtype: torch.dtype | None) -> torch.Tensor:
        matrix = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (matrix.data_ptr(), matrix._version, matrix.device, matrix.dtype)
        cached = self._dense_pe_cache.get(dtype)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                pe = self.prompt_encoder.get_dense_pe()
                if dtype is not None:  # token-major (1, h·w, 256) in dtype
                    pe = pe.to(dtype).flatten(2).transpose(1, 2).contiguous()
            cached = self._dense_pe_cache[dtype] = (key, pe)
        return cached[1]

    def dense_pe(self) -> torch.Tensor:
        """`prompt_encoder.get_dense_pe()` (1, 256, 64, 64), cached.

        The cache key is the positional-encoding buffer's identity, version counter, device
        and dtype, so loading a state dict or moving the module recomputes it. The cached
        tensor carries no autograd history (the buffer is not a parameter).
        """
        return self._cached_pe(None)

    def dense_pe_tokens(self, dtype: torch.dtype) -> torch.Tensor:
        """`dense_pe()` token-major, (1, h·w, 256) in ``dtype``, cached like `dense_pe`."""
        return self._cached_pe(dtype)

    def embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """Sparse prompt embeddings (B, N, 256) of labelled points.

        point_coords (B, N, 2): XY pixels in the 1024 frame. point_labels (B, N): 1 fg, 0 bg,
        -1 padding, 2 / 3 box top-left / bottom-right corner. Same arithmetic as Meta's
        `_embed_points` (labels -1, 0, 1) and `_embed_boxes` (labels 2, 3).
        """
        pe_module = self.prompt_encoder
        labels = point_labels.long()
        if labels.numel() and (labels.min() < LABEL_PAD or labels.max() > LABEL_BOX_BR):
            raise ValueError(
                f"point_labels must be in -1..3, got values {labels.unique().tolist()}"
            )
        coords = point_coords.float() + 0.5  # shift to the pixel centre, as Meta
        pe = pe_module.pe_layer.forward_with_coords(coords, pe_module.input_image_size)
        pe = pe.masked_fill((labels == LABEL_PAD).unsqueeze(-1), 0.0)
        table = torch.cat(
            [pe_module.not_a_point_embed.weight]
            + [embedding.weight for embedding in pe_module.point_embeddings],
            dim=0,
        )  # (5, 256): rows for labels -1, 0, 1, 2, 3
        return pe + table[labels + 1]

    def embed_masks(
        self, batch: int, mask_input: torch.Tensor | None, has_mask_input: torch.Tensor | None
    ) -> torch.Tensor:
        """Dense prompt embeddings (B, 256, 64, 64).

        `mask_downscaling(mask_input)` where `has_mask_input`, else `no_mask_embed` (as Meta
        does for a call with masks=None). mask_input (B, 1, 256, 256) logits in the 256 frame.
        """
        pe_module = self.prompt_encoder
        h, w = pe_module.image_embedding_size
        no_mask = pe_module.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        if mask_input is None:
            return no_mask
        dense = pe_module.mask_downscaling(mask_input)
        if has_mask_input is None:
            return dense
        return torch.where(has_mask_input.view(-1, 1, 1, 1), dense, no_mask)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor | None = None,
        has_mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict all 4 masks for each of B objects.

        Arguments:
          image_embeddings (I, 256, 64, 64): image-encoder outputs (any float dtype, cast to
            the decoder's dtype; pass them channels-last in that dtype, as step.py does, and
            making them token-major costs nothing).
          image_index (B,) long: row of `image_embeddings` for each object.
          point_coords (B, N, 2): XY pixels in the 1024 frame (points and box corners).
          point_labels (B, N): 1 fg, 0 bg, -1 padding, 2 / 3 box top-left / bottom-right.
          mask_input (B, 1, 256, 256) | None: previous low-res logits (256 frame).
          has_mask_input (B,) bool | None: which objects use `mask_input` (None: all of them
            when mask_input is given).

        Returns:
          low_res_logits (B, 4, 256, 256): mask logits in the 256 frame; mask 0 is the
            single-mask output, masks 1..3 the multimask outputs.
          iou_predictions (B, 4): predicted IoU of each mask.
        """
        dtype = self.mask_decoder.iou_token.weight.dtype
        sparse = self.embed_points(point_coords, point_labels).to(dtype)
        src = self.embed_tokens(image_embeddings, image_index, mask_input, has_mask_input)
        return self.decode_tokens(src, sparse)

    def embed_tokens(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        mask_input: torch.Tensor | None,
        has_mask_input: torch.Tensor | None,
    ) -> torch.Tensor:
        """Image embedding + dense prompt embedding per object, token-major (B, h·w, 256).

        Same values as `image_embeddings[image_index] + embed_masks(...)` flattened; the last
        1x1 convolution of `mask_downscaling` runs as a matmul on the tokens.
        """
        dtype = self.mask_decoder.iou_token.weight.dtype
        n, channels, h, w = image_embeddings.shape
        images = image_embeddings.to(dtype).permute(0, 2, 3, 1).reshape(n, h * w, channels)
        src = images[image_index]
        no_mask = self.prompt_encoder.no_mask_embed.weight.to(dtype)  # (1, 256)
        if mask_input is None:
            return src + no_mask
        *convs, last = self.prompt_encoder.mask_downscaling  # conv, LN, GELU, conv, LN, GELU, 1x1
        small = mask_input.to(dtype)
        for module in convs:
            small = module(small)  # ends (B, 16, 64, 64)
        tokens = small.permute(0, 2, 3, 1).reshape(small.shape[0], h * w, -1)
        dense = F.linear(tokens, last.weight.flatten(1), last.bias)
        if has_mask_input is not None:
            dense = torch.where(has_mask_input.view(-1, 1, 1), dense, no_mask)
        return src + dense

    def decode_tokens(
        self, src: torch.Tensor, sparse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta's `MaskDecoder.predict_masks` on token-major inputs.

        src (B, h·w, 256): image + dense prompt embedding per object (`embed_tokens`), or
        (1, h·w, 256) shared by all B prompts of one image. sparse (B, N, 256): `embed_points`.
        Returns (B, 4, 4h, 4w) logits and (B, 4) IoUs.
        """
        hs, keys = self.transform_tokens(src, sparse)
        return self.mask_logits(hs, keys), self.iou_predictions(hs)

    def transform_tokens(
        self, src: torch.Tensor, sparse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer of `decode_tokens`: (tokens (B, 5 + N, 256), keys (B, h·w, 256)).

        With src of batch 1 (one image, no mask prompt) the first layer's image-side
        projections broadcast over the B prompts: computed once instead of B times.
        """
        decoder = self.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        tokens = torch.cat((output_tokens, sparse.to(output_tokens.dtype)), dim=1)
        return self._transformer(src, self.dense_pe_tokens(src.dtype), tokens)

    def iou_predictions(self, hs: torch.Tensor) -> torch.Tensor:
        """(B, 4) predicted IoUs from the transformer's output tokens (`transform_tokens`)."""
        return self.mask_decoder.iou_prediction_head(hs[:, 0, :])

    def mask_logits(self, hs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, 4, 4h, 4w) low-res logits from the transformer's outputs (`transform_tokens`)."""
        decoder = self.mask_decoder
        mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        hyper_in = torch.stack(
            [
                mlp(mask_tokens_out[:, i, :])
                for i, mlp in enumerate(decoder.output_hypernetworks_mlps)
            ],
            dim=1,
        )  # (B, 4, 32)
        return self._upscaled_logits(keys, hyper_in)

    def _transformer(
        self, keys: torch.Tensor, key_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta's `TwoWayTransformer.forward` on keys (B, h·w, 256) already token-major."""
        transformer = self.mask_decoder.transformer
        queries = point_embedding
        for layer in transformer.layers:
            queries, keys = _two_way_block(layer, queries, keys, point_embedding, key_pe)
        final = transformer.final_attn_token_to_image
        attn_out = _attention(final, queries + point_embedding, keys + key_pe, keys)
        return transformer.norm_final_attn(queries + attn_out), keys

    def _upscaled_logits(self, keys: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """`output_upscaling` + the hypernetwork product, as Meta's, computed on the tokens.

        A ConvTranspose2d with kernel 2, stride 2 is a matmul per token giving its 2x2 output
        pixels, so both run on (B, h·w, ...) without moving the 64x64 grid; only the (B, 4,
        256, 256) logits are put in image order at the end. keys (B, h·w, 256), hyper_in
        (B, 4, 32).
        """
        up1, norm, act1, up2, act2 = self.mask_decoder.output_upscaling
        batch, n_tokens, _ = keys.shape
        h, w = self.prompt_encoder.image_embedding_size
        x = F.linear(keys, _deconv_matrix(up1.weight), up1.bias.repeat(4))  # (.., (i, j, c))
        x = x.unflatten(-1, (4, up1.out_channels))
        x = act1(F.layer_norm(x, (up1.out_channels,), norm.weight, norm.bias, norm.eps))
        x = act2(F.linear(x, _deconv_matrix(up2.weight), up2.bias.repeat(4)))  # (k, l, c)
        x = x.reshape(batch, n_tokens * 16, up2.out_channels)  # pixels (y, x, i, j, k, l)
        masks = x @ hyper_in.transpose(1, 2)  # (B, pixels, 4): no transposed copy of x
        masks = masks.view(batch, h, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(batch, -1, 4 * h, 4 * w)  # row 4y + 2i + k, column 4x + 2j + l

    def _predict_masks(
        self, src: torch.Tensor, sparse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta's `MaskDecoder.predict_masks` code, image embedding already per object.

        src (B, 256, 64, 64): image embedding + dense prompt embedding. sparse (B, N, 256).
        Meta's own modules and layout: the ONNX export traces this; `forward` uses
        `decode_tokens` (same numbers, faster).
        """
        decoder = self.mask_decoder
        batch, channels, h, w = src.shape
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat((output_tokens, sparse.to(output_tokens.dtype)), dim=1)
        pos_src = self.dense_pe().to(src.dtype).expand(batch, -1, -1, -1)

        hs, src_out = decoder.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]

        upscaled = decoder.output_upscaling(src_out.transpose(1, 2).reshape(batch, channels, h, w))
        hyper_in = torch.stack(
            [
                mlp(mask_tokens_out[:, i, :])
                for i, mlp in enumerate(decoder.output_hypernetworks_mlps)
            ],
            dim=1,
        )
        b, c, uh, uw = upscaled.shape
        low_res_logits = (hyper_in @ upscaled.reshape(b, c, uh * uw)).reshape(b, -1, uh, uw)
        iou_predictions = decoder.iou_prediction_head(iou_token_out)
        return low_res_logits, iou_predictions


def _deconv_matrix(weight: torch.Tensor) -> torch.Tensor:
    """ConvTranspose2d weight (in, out, kh, kw) as a linear weight ((kh, kw, out), in)."""
    c_in, c_out, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * c_out, c_in)


def _attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Meta's `Attention.forward` after the input projections: heads, softmax, out_proj.

    q (B, Nq, d), k and v (B, Nk, d) already projected (d = internal_dim). The logits are
    always laid out (.., few tokens, many tokens), so the softmax of the image-to-token
    attention runs along dim -2 over 4096-long rows (on CPU much faster than 4096 softmaxes
    over a dozen values each, and than `scaled_dot_product_attention` in bf16). The scale
    1/sqrt(d / heads) is a power of two here, so scaling the smaller operand is exact.
    """
    heads = module.num_heads
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5
    # The long operand that is read transposed is made contiguous per head first: the batched
    # matmul then reads it transposed in place, instead of gathering it with a stride of 256.
    if q.shape[2] > k.shape[2]:  # many queries (image), few keys (tokens)
        logits = (k * scale) @ q.contiguous().transpose(-1, -2)  # (B, heads, Nk, Nq)
        out = torch.softmax(logits, dim=-2).transpose(-1, -2) @ v
    else:
        out = torch.softmax((q * scale) @ k.contiguous().transpose(-1, -2), dim=-1) @ v
    return module.out_proj(out.transpose(1, 2).flatten(2))


def _attention(
    module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Meta's `Attention.forward(q, k, v)` (segment_anything/modeling/transformer.py)."""
    return _attend(module, module.q_proj(q), module.k_proj(k), module.v_proj(v))


def _two_way_block(
    layer: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's `TwoWayAttentionBlock.forward`; keys + key_pe is formed once (the keys do not
    change between the two cross attentions that use it) and projected by one matmul."""
    if layer.skip_first_layer_pe:
        queries = _attention(layer.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + _attention(layer.self_attn, q, q, queries)
    queries = layer.norm1(queries)

    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    weight = torch.cat([to_image.k_proj.weight, to_token.q_proj.weight])
    bias = torch.cat([to_image.k_proj.bias, to_token.q_proj.bias])
    k_image, q_image = F.linear(keys + key_pe, weight, bias).split(to_image.internal_dim, -1)
    q = to_image.q_proj(queries + query_pe)
    queries = layer.norm2(queries + _attend(to_image, q, k_image, to_image.v_proj(keys)))
    queries = layer.norm3(queries + layer.mlp(queries))

    q = queries + query_pe
    attn_out = _attend(to_token, q_image, to_token.k_proj(q), to_token.v_proj(queries))
    return queries, layer.norm4(keys + attn_out)
