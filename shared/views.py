"""Augmented *views* of an image, as pure functions (numpy / torch; no I/O).

A view is a transform of the image in its **original frame** (H, W; after EXIF transpose):

- ``hflip``: ``image[:, ::-1]`` (left ↔ right), size (H, W);
- ``vflip``: ``image[::-1]`` (top ↔ bottom), size (H, W);
- ``rot90``: ``np.rot90(image)``, a quarter turn **counter-clockwise** (the top-right corner
  becomes the top-left one), size (W, H).

The view is then preprocessed like any image (longest side to 1024, zeros bottom/right), so its
``original_size`` and ``input_size`` are its own (rot90 swaps both). Coordinates are continuous
pixel coordinates (pixel ``(i, j)`` spans ``[j, j+1] × [i, i+1]``), so a point maps by
``x → W − x`` under hflip, not ``W − 1 − x``, and the box of a mask maps onto the box of the
mask's view. In the 1024 frame a flip maps ``x → input_w − x`` (the padding stays bottom/right),
not ``1024 − x``. cache_layout.md "Views" is the same contract for people.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from shared.transforms import preprocess_shape

ORIGINAL = "original"  # the image itself (rows of ``embeddings``); not a stored view
VIEWS = ("hflip", "vflip", "rot90")  # canonical order; each stored in ``embeddings_<view>``

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


class ViewError(ValueError):
    """An unknown view name; the message lists the known ones."""


def parse_views(text: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``"rot90,hflip"`` → ``("hflip", "rot90")`` (canonical order, no repeats); "" → ()."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [item.strip() for item in items if item.strip()]
    for name in names:
        if name not in VIEWS:
            raise ViewError(
                f"--views: {name!r} is not a view; use a comma list of {', '.join(VIEWS)}"
            )
    return tuple(v for v in VIEWS if v in names)


def _check(view: str) -> None:
    if view not in VIEWS and view != ORIGINAL:
        raise ViewError(f"{view!r} is not a view; known: {ORIGINAL}, {', '.join(VIEWS)}")


def view_original_size(view: str, original_size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the view of an image of ``original_size`` (H, W): rot90 swaps them."""
    _check(view)
    height, width = original_size
    return (width, height) if view == "rot90" else (height, width)


def view_input_size(view: str, original_size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the view inside its own 1024 frame (``preprocess_shape`` of its size)."""
    return preprocess_shape(view_original_size(view, original_size))


def apply_view(view: str, image: np.ndarray) -> np.ndarray:
    """The view of an H×W or H×W×C array (image or mask) in the original frame, contiguous."""
    _check(view)
    if view == "hflip":
        out = image[:, ::-1]
    elif view == "vflip":
        out = image[::-1]
    elif view == "rot90":
        out = np.rot90(image)
    else:
        out = image
    return np.ascontiguousarray(out)


def invert_view(view: str, image_view: np.ndarray) -> np.ndarray:
    """The original-frame array of an array in the view's frame (inverse of ``apply_view``)."""
    _check(view)
    if view == "rot90":
        return np.ascontiguousarray(np.rot90(image_view, -1))
    return apply_view(view, image_view)  # flips are their own inverse


def _copy_xy(coords: ArrayOrTensor) -> ArrayOrTensor:
    """A float copy (float64 numpy / float32 torch) of …×2 XY coordinates."""
    if isinstance(coords, torch.Tensor):
        return coords.detach().clone().to(torch.float)
    return np.array(coords, dtype=float)


def _map_xy(view: str, coords: ArrayOrTensor, width: float, height: float) -> ArrayOrTensor:
    """Point coordinates (…×2, XY) of a ``width``×``height`` frame to the view's frame."""
    _check(view)
    src, out = _copy_xy(coords), _copy_xy(coords)
    if view == "hflip":
        out[..., 0] = width - src[..., 0]
    elif view == "vflip":
        out[..., 1] = height - src[..., 1]
    elif view == "rot90":  # counter-clockwise: (x, y) → (y, W − x)
        out[..., 0] = src[..., 1]
        out[..., 1] = width - src[..., 0]
    return out


def _unmap_xy(view: str, coords: ArrayOrTensor, width: float, height: float) -> ArrayOrTensor:
    """Inverse of ``_map_xy`` (``width``, ``height`` of the frame *before* the view)."""
    if view != "rot90":
        return _map_xy(view, coords, width, height)  # flips are their own inverse
    src, out = _copy_xy(coords), _copy_xy(coords)
    out[..., 0] = width - src[..., 1]
    out[..., 1] = src[..., 0]
    return out


def _map_boxes(view: str, boxes: ArrayOrTensor, width: float, height: float) -> ArrayOrTensor:
    shape = tuple(boxes.shape)
    if shape[-1:] != (4,):
        raise ValueError(f"boxes must be …×4 (XYXY), got shape {shape}")
    corners = _map_xy(view, boxes.reshape(-1, 2, 2), width, height)
    if isinstance(corners, torch.Tensor):
        low, high = corners.min(dim=1).values, corners.max(dim=1).values
        return torch.cat([low, high], dim=-1).reshape(shape)
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=-1).reshape(shape)


def coords_orig_to_view(
    view: str, coords_orig: ArrayOrTensor, original_size: tuple[int, int]
) -> ArrayOrTensor:
    """``point_coords`` (…×2, XY pixels) from the original frame to the view's original frame."""
    height, width = original_size
    return _map_xy(view, coords_orig, width, height)


def coords_view_to_orig(
    view: str, coords_view: ArrayOrTensor, original_size: tuple[int, int]
) -> ArrayOrTensor:
    """Inverse of ``coords_orig_to_view`` (``original_size`` of the image, not of the view)."""
    height, width = original_size
    return _unmap_xy(view, coords_view, width, height)


def boxes_orig_to_view(
    view: str, boxes_orig: ArrayOrTensor, original_size: tuple[int, int]
) -> ArrayOrTensor:
    """``boxes`` (…×4, XYXY pixels) from the original frame to the view's original frame."""
    height, width = original_size
    return _map_boxes(view, boxes_orig, width, height)


def coords_1024_to_view(
    view: str, coords_1024: ArrayOrTensor, input_size: tuple[int, int]
) -> ArrayOrTensor:
    """``point_coords`` from the image's 1024 frame to the view's 1024 frame.

    ``input_size`` (H, W) is the image's: hflip maps ``x → input_w − x`` (not 1024 − x: the
    padding is not flipped). Equals ``coords_to_1024`` of the view of the original-frame point.
    """
    height, width = input_size
    return _map_xy(view, coords_1024, width, height)


def boxes_1024_to_view(
    view: str, boxes_1024: ArrayOrTensor, input_size: tuple[int, int]
) -> ArrayOrTensor:
    """``boxes`` (…×4, XYXY) from the image's 1024 frame to the view's 1024 frame."""
    height, width = input_size
    return _map_boxes(view, boxes_1024, width, height)
