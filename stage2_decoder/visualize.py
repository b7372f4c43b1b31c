"""Pictures of results: mask overlays with their prompts (predict, amg) and the eval plot.

Overlays are drawn with OpenCV on the original image (read from the manifest's ``path`` the way
stage 1 reads it: EXIF transpose, then RGB), in the original frame; when the file is gone or no
longer has the cached size, a grey canvas of that size stands in (and the title says so). Every
PNG is written atomically (temp file, fsync, ``os.replace``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from shared.cache_format import DEFAULT_MAX_PIXELS
from stage2_decoder.checkpoints import atomic_write

# Distinct, saturated RGB colours (tab10 without grey), reused cyclically.
PALETTE = np.array(
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
     [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207]], dtype=np.uint8,
)  # fmt: skip
POSITIVE, NEGATIVE = (0, 255, 0), (255, 0, 0)  # click colours (RGB)
TITLE_HEIGHT = 22


@dataclass(frozen=True)
class DrawnPrompt:
    """One prompt to draw, original frame: points (N, 2) XY with labels (N,), box XYXY or None."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None


def read_image_rgb(
    path: str | None, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, str]:
    """(H×W×3 uint8 RGB image, note) for the manifest ``path`` expected at ``size`` (H, W).

    The note is "" when the file was read, else why a grey canvas stands in for it.
    ``max_pixels``: the pixel limit the cache's images were read under (``CacheAttrs.max_pixels``),
    so an image `embed run` cached is drawn here too, and a larger file is never decoded.
    """
    height, width = size
    grey = np.full((height, width, 3), 128, np.uint8)
    Image.MAX_IMAGE_PIXELS = max_pixels  # process-wide, as stage 1 sets it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(str(path)) as opened:
                if opened.width * opened.height > max_pixels:
                    return grey, "image file is over the pixel limit"
                image = ImageOps.exif_transpose(opened).convert("RGB")
    except Image.DecompressionBombError:
        return grey, "image file is over the pixel limit"
    except (OSError, ValueError, TypeError):
        return grey, "image file not found"
    array = np.asarray(image)
    if array.shape[:2] != (height, width):
        return np.full((height, width, 3), 128, np.uint8), "image file changed size"
    return np.ascontiguousarray(array), ""


def color(index: int) -> tuple[int, int, int]:
    r, g, b = PALETTE[index % len(PALETTE)]
    return int(r), int(g), int(b)


def draw_masks(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.45) -> np.ndarray:
    """Blend each bool (H, W) mask onto an RGB copy of ``image`` in its colour, with a contour."""
    out = image.astype(np.float32)
    for i, mask in enumerate(masks):
        out[mask] = (1 - alpha) * out[mask] + alpha * np.array(color(i), np.float32)
    out = out.astype(np.uint8)
    for i, mask in enumerate(masks):
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(out, contours, -1, color(i), 1)
    return out


def draw_prompts(image: np.ndarray, prompts: Sequence[DrawnPrompt | None]) -> np.ndarray:
    """Boxes (in the mask's colour) and clicks (green star fg, red cross bg) on a copy."""
    out = image.copy()
    marker = max(8, min(out.shape[:2]) // 40)
    for i, prompt in enumerate(prompts):
        if prompt is None:
            continue
        if prompt.box is not None:
            x0, y0, x1, y1 = (int(round(float(v))) for v in prompt.box)
            cv2.rectangle(out, (x0, y0), (x1, y1), color(i), 2)
        for (x, y), label in zip(prompt.points, prompt.labels, strict=True):
            if label not in (0, 1):
                continue
            kind = cv2.MARKER_STAR if label == 1 else cv2.MARKER_TILTED_CROSS
            centre = (int(round(float(x))), int(round(float(y))))
            cv2.drawMarker(out, centre, (0, 0, 0), kind, marker + 2, 3)
            cv2.drawMarker(out, centre, POSITIVE if label == 1 else NEGATIVE, kind, marker, 1)
    return out


def titled(image: np.ndarray, title: str) -> np.ndarray:
    """``image`` with a white band above it holding ``title``."""
    band = np.full((TITLE_HEIGHT, image.shape[1], 3), 255, np.uint8)
    cv2.putText(band, title, (4, TITLE_HEIGHT - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)  # fmt: skip
    return np.concatenate([band, image], axis=0)


def side_by_side(panels: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Panels of equal height next to each other with a white gap."""
    spacer = np.full((panels[0].shape[0], gap, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for panel in panels:
        parts += [panel, spacer]
    return np.concatenate(parts[:-1], axis=1)


def overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    prompts: Sequence[DrawnPrompt | None],
    title: str,
) -> np.ndarray:
    """One titled panel: masks blended on the image, then the prompts that made them."""
    return titled(draw_prompts(draw_masks(image, masks), prompts), title)


def _png_bytes(image_rgb: np.ndarray) -> bytes:
    array = image_rgb if image_rgb.ndim == 2 else cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OSError("could not encode a PNG")
    return encoded.tobytes()


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """An RGB (H, W, 3) or grey (H, W) uint8 image as PNG, atomically."""
    data = _png_bytes(image)
    return atomic_write(path, lambda handle: handle.write(data))


def write_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    """A bool (H, W) mask as an 8-bit PNG (0 background, 255 mask), atomically."""
    return write_png(path, mask.astype(np.uint8) * 255)


def plot_miou_vs_clicks(
    curves: Mapping[str, Sequence[float]],
    box_miou: Mapping[str, float],
    out_png: str | Path,
    title: str = "mIoU vs clicks",
) -> Path:
    """mIoU after k = 1.. clicks per model (solid) and its box mIoU (dashed); atomic PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6, 4), dpi=100)
    axis = figure.subplots()
    for i, (name, values) in enumerate(curves.items()):
        colour = tuple(c / 255 for c in color(i))
        axis.plot(range(1, len(values) + 1), values, marker="o", color=colour, label=name)
        if name in box_miou:
            axis.axhline(box_miou[name], color=colour, linestyle="--", label=f"{name} (box)")
    axis.set(xlabel="clicks", ylabel="mIoU (original resolution)", title=title, ylim=(0, 1))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write(out_png, lambda handle: handle.write(buffer.getvalue()))
