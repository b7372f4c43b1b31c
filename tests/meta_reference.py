"""Meta's SamPredictor / SamAutomaticMaskGenerator as references for tests and benchmarks.

Meta's ``segment_anything`` imports torchvision for four functions only. Where torchvision
cannot be imported (here: the registry build is a CUDA build that fails at import, or it is not
installed), ``install_torchvision_shim`` registers a minimal fake ``torchvision`` with exactly
those functions: ``transforms.functional.resize`` / ``to_pil_image`` (PIL, as torchvision does
for PIL images) and ``ops.boxes.batched_nms`` / ``box_area`` (pure torch). Reference code only:
the samcache packages never import this module.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.sam_models import import_sam_package


def to_pil_image(pic: Any, mode: str | None = None) -> Image.Image:
    """torchvision's ``to_pil_image`` for uint8 H×W / H×W×C arrays and C×H×W uint8 tensors."""
    if isinstance(pic, torch.Tensor):
        pic = pic.detach().cpu().numpy()
        pic = pic[0] if pic.ndim == 3 and pic.shape[0] == 1 else np.transpose(pic, (1, 2, 0))
    if not isinstance(pic, np.ndarray) or pic.dtype != np.uint8:
        raise TypeError("torchvision shim: to_pil_image supports only uint8 images")
    if pic.ndim == 3 and pic.shape[2] == 1:
        pic = pic[:, :, 0]
    image = Image.fromarray(np.ascontiguousarray(pic))
    return image if mode is None else image.convert(mode)


def resize(
    img: Image.Image,
    size: Sequence[int],
    interpolation: Any = Image.Resampling.BILINEAR,
    max_size: int | None = None,
    antialias: bool | None = True,
) -> Image.Image:
    """torchvision's ``resize`` for a PIL image and ``size`` = (h, w): ``img.resize((w, h))``."""
    if not isinstance(img, Image.Image) or isinstance(size, int) or len(size) != 2:
        raise NotImplementedError("torchvision shim: resize supports PIL images and (h, w) only")
    if max_size is not None:
        raise NotImplementedError("torchvision shim: resize(max_size=…) is not supported")
    if interpolation != Image.Resampling.BILINEAR:
        raise NotImplementedError("torchvision shim: resize supports bilinear only")
    height, width = int(size[0]), int(size[1])
    return img.resize((width, height), Image.Resampling.BILINEAR)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of N×4 XYXY boxes (torchvision.ops.box_area)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS like torchvision's CPU kernel: drop boxes with IoU > threshold to a kept one.

    Returns kept indices (int64) by decreasing score (stable for ties). Builds the N×N IoU matrix
    in the boxes' dtype (fine for the few thousand boxes of one AMG crop).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order]
    areas = box_area(boxes)
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    iou = (inter / (areas[:, None] + areas[None, :] - inter)).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each category ``idxs`` (torchvision.ops.batched_nms, coordinate-offset trick)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _package(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that submodule imports resolve through sys.modules
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def install_torchvision_shim() -> bool:
    """Make ``import torchvision`` work for Meta's code; True if the fake package was installed.

    Uses the real torchvision when it imports; otherwise removes any half-imported
    ``torchvision*`` modules and registers the fake one.
    """
    if getattr(sys.modules.get("torchvision"), "__samcache_shim__", False):
        return True
    try:
        importlib.import_module("torchvision")
        return False
    except Exception:  # ModuleNotFoundError, or RuntimeError from a CUDA-only build
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    functional = _package(
        "torchvision.transforms.functional", resize=resize, to_pil_image=to_pil_image
    )
    transforms = _package("torchvision.transforms", functional=functional)
    boxes = _package("torchvision.ops.boxes", batched_nms=batched_nms, box_area=box_area, nms=nms)
    ops = _package("torchvision.ops", boxes=boxes, batched_nms=batched_nms, nms=nms)
    _package("torchvision", transforms=transforms, ops=ops, __samcache_shim__=True)
    return True


def _meta_module(name: str) -> types.ModuleType:
    install_torchvision_shim()
    import_sam_package()
    return importlib.import_module(f"segment_anything.{name}")


def meta_predictor_class() -> type:
    """``segment_anything.predictor.SamPredictor``."""
    return _meta_module("predictor").SamPredictor


def meta_amg_class() -> type:
    """``segment_anything.automatic_mask_generator.SamAutomaticMaskGenerator``."""
    return _meta_module("automatic_mask_generator").SamAutomaticMaskGenerator


def meta_sam_model_registry() -> dict[str, Any]:
    """Meta's ``sam_model_registry`` (``vit_b``, ``vit_l``, ``vit_h``, ``default``)."""
    return _meta_module("build_sam").sam_model_registry


def meta_resize_longest_side(target_length: int = 1024) -> Any:
    """An instance of Meta's ``ResizeLongestSide``."""
    return _meta_module("utils.transforms").ResizeLongestSide(target_length)
