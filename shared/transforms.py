"""Meta's SAM preprocessing and coordinate frames as pure functions (numpy, PIL, OpenCV, torch).

Frames (see cache_layout.md): the *original* frame (H, W of the image after EXIF transpose), the
*1024 frame* (longest side resized to 1024 = ``input_size``, zero padding bottom/right to
1024×1024) and the *target frame* (the 1024 frame downsampled 4× to 256×256: ``low_res_logits``,
``mask_input`` and training targets). Every function here equals the matching step of Meta's
``SamPredictor`` / ``Sam`` / ``ResizeLongestSide``; the tests compare them. No I/O, no torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import cv2
import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

IMAGE_SIZE = 1024  # side of the padded encoder input (the 1024 frame)
TARGET_SIZE = 256  # side of low_res_logits / mask_input (the 256 target frame)
PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, on 0..255 values (Meta's Sam.pixel_mean)
PIXEL_STD = (58.395, 57.12, 57.375)  # RGB (Meta's Sam.pixel_std)

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def preprocess_shape(
    original_size: tuple[int, int], long_side: int = IMAGE_SIZE
) -> tuple[int, int]:
    """(H, W) inside the 1024 frame for an image of ``original_size`` (H, W).

    Same arithmetic as Meta's ``ResizeLongestSide.get_preprocess_shape``.
    """
    oldh, oldw = original_size
    scale = long_side * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    return int(newh + 0.5), int(neww + 0.5)


def _check_rgb8(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an H×W×3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}"
        )


def resize_longest_side(image: np.ndarray, long_side: int = IMAGE_SIZE) -> np.ndarray:
    """Resize an H×W×3 uint8 RGB image so its longest side is ``long_side`` (PIL bilinear).

    Returns ``input_size + (3,)`` uint8. Equals Meta's ``ResizeLongestSide.apply_image``
    (torchvision ``resize(to_pil_image(img), (h, w))`` is PIL ``Image.resize((w, h), BILINEAR)``).
    """
    _check_rgb8(image)
    height, width = preprocess_shape(image.shape[:2], long_side)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.array(resized)  # a writable copy, as Meta's apply_image returns


def normalize_and_pad(image_1024: np.ndarray, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Encoder input (3, 1024, 1024) float32 from a resized H×W×3 uint8 image (max side ≤ 1024).

    ``(pixel - PIXEL_MEAN) / PIXEL_STD`` per RGB channel, then zeros at the bottom and right:
    exactly Meta's ``Sam.preprocess``.
    """
    _check_rgb8(image_1024)
    height, width = image_1024.shape[:2]
    if max(height, width) > image_size:
        raise ValueError(f"image is {height}×{width} px; resize it to at most {image_size} first")
    pixels = (
        torch.from_numpy(np.require(image_1024, requirements=["C", "W"])).permute(2, 0, 1).float()
    )
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(-1, 1, 1)
    pixels = (pixels - mean) / std
    return F.pad(pixels, (0, image_size - width, 0, image_size - height))


def prepare_image(image_rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """(encoder input (3, 1024, 1024) float32, ``input_size`` (H, W)) for an H×W×3 uint8 image.

    What ``SamPredictor.set_image`` feeds the image encoder (after ``Sam.preprocess``).
    """
    resized = resize_longest_side(image_rgb)
    input_size = (int(resized.shape[0]), int(resized.shape[1]))
    return normalize_and_pad(resized), input_size


def prepare_images(images_rgb: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Batched ``prepare_image``: (B, 3, 1024, 1024) float32 and one ``input_size`` per image."""
    prepared = [prepare_image(image) for image in images_rgb]
    if not prepared:
        return torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE), []
    return torch.stack([tensor for tensor, _ in prepared]), [size for _, size in prepared]


def _scale_xy(coords: ArrayOrTensor, scale_x: float, scale_y: float) -> ArrayOrTensor:
    """Copy of ``coords`` (…×2, XY) as float (float64 numpy / float32 torch), X and Y scaled."""
    if isinstance(coords, torch.Tensor):
        out = coords.detach().clone().to(torch.float)
    else:
        out = np.array(coords, dtype=float)
    out[..., 0] = out[..., 0] * scale_x
    out[..., 1] = out[..., 1] * scale_y
    return out


def coords_to_1024(coords_orig: ArrayOrTensor, original_size: tuple[int, int]) -> ArrayOrTensor:
    """Point coordinates (…×2, XY pixels) from the original frame to the 1024 frame.

    numpy → float64, torch → float32 (a copy). Equals ``ResizeLongestSide.apply_coords`` /
    ``apply_coords_torch``.
    """
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(original_size)
    return _scale_xy(coords_orig, new_w / old_w, new_h / old_h)


def coords_from_1024(coords_1024: ArrayOrTensor, original_size: tuple[int, int]) -> ArrayOrTensor:
    """Point coordinates (…×2, XY pixels) from the 1024 frame back to the original frame."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(original_size)
    return _scale_xy(coords_1024, old_w / new_w, old_h / new_h)


def boxes_to_1024(boxes_orig: ArrayOrTensor, original_size: tuple[int, int]) -> ArrayOrTensor:
    """Boxes (…×4, XYXY pixels) from the original frame to the 1024 frame; leading shape kept.

    For B×4 input this equals ``ResizeLongestSide.apply_boxes`` / ``apply_boxes_torch``.
    """
    shape = tuple(boxes_orig.shape)
    if shape[-1:] != (4,):
        raise ValueError(f"boxes must be …×4 (XYXY), got shape {shape}")
    return coords_to_1024(boxes_orig.reshape(-1, 2, 2), original_size).reshape(shape)


def postprocess_low_res(
    low_res_logits: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    image_size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """Mask logits (B, C, H, W) in the original frame from ``low_res_logits`` (B, C, 256, 256).

    Bilinear upsampling to 1024×1024, crop to ``input_size``, bilinear resize to
    ``original_size``: exactly Meta's ``Sam.postprocess_masks``. Threshold at 0 for masks.
    """
    masks = F.interpolate(
        low_res_logits, (image_size, image_size), mode="bilinear", align_corners=False
    )
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


def target_valid_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the valid (non-padding) top-left part of the 256 target frame."""
    return math.ceil(input_size[0] / 4), math.ceil(input_size[1] / 4)


def soft_mask_to_target(mask_orig: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """A mask (H×W, bool or float 0..1, original frame) as float32 256×256 in the target frame.

    Float bilinear resize (``cv2.INTER_LINEAR``) to ``input_size``, zero padding to 1024×1024,
    area averaging (``cv2.INTER_AREA``) to 256×256. Values stay in 0..1.
    """
    if mask_orig.ndim != 2:
        raise ValueError(f"expected an H×W mask, got shape {mask_orig.shape}")
    height, width = input_size
    resized = cv2.resize(
        mask_orig.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
    padded = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    padded[:height, :width] = resized
    return cv2.resize(padded, (TARGET_SIZE, TARGET_SIZE), interpolation=cv2.INTER_AREA)


def mask_to_target(mask_orig: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """A bool H×W mask (original frame) as a bool 256×256 training target (target frame).

    ``soft_mask_to_target(...) >= 0.5`` (cache_layout.md, "target frame"). The same rule makes
    ``ignore_target_rle`` from the void region: a target pixel is void when its value is ≥ 0.5.
    """
    return soft_mask_to_target(mask_orig, input_size) >= 0.5
