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
"""

from __future__ import annotations

import torch
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
        self._dense_pe_cache: tuple[tuple, torch.Tensor] | None = None

    def dense_pe(self) -> torch.Tensor:
        """`prompt_encoder.get_dense_pe()` (1, 256, 64, 64), cached.

        The cache key is the positional-encoding buffer's identity, version counter, device
        and dtype, so loading a state dict or moving the module recomputes it. The cached
        tensor carries no autograd history (the buffer is not a parameter).
        """
        matrix = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (matrix.data_ptr(), matrix._version, matrix.device, matrix.dtype)
        if self._dense_pe_cache is None or self._dense_pe_cache[0] != key:
            with torch.no_grad():
                self._dense_pe_cache = (key, self.prompt_encoder.get_dense_pe())
        return self._dense_pe_cache[1]

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
          image_embeddings (I, 256, 64, 64): image-encoder outputs (any float dtype; cast to
            the decoder's dtype after gathering).
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
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_masks(sparse.shape[0], mask_input, has_mask_input)
        src = image_embeddings[image_index].to(dense.dtype) + dense
        return self._predict_masks(src, sparse)

    def _predict_masks(
        self, src: torch.Tensor, sparse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta's `MaskDecoder.predict_masks` with the image embedding already per object.

        src (B, 256, 64, 64): image embedding + dense prompt embedding. sparse (B, N, 256).
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
