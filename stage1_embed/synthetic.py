"""A synthetic dataset of coloured shapes in a real PASCAL VOC layout (demo, tests, benchmarks).

Each image has a textured, noisy, low-saturation background and 1–``max_instances`` shapes of
four classes, each class with its own colour family so a small decoder can learn them:

====  =========  ==============  =====================================
 id   shape      colour family   VOC name the manifest will show (id)
====  =========  ==============  =====================================
 1    ellipse    reds            aeroplane
 2    rectangle  greens          bicycle
 3    triangle   blues           bird
 4    star       yellows         boat
====  =========  ==============  =====================================

The class values are written into ``SegmentationClass`` as VOC values 1..4, so the VOC reader
names them with the VOC classes (right column); :data:`SHAPE_CLASSES` has the shape names.
Shapes overlap (later ones occlude earlier ones) and range from small to large. Like VOC, a
void band (value 255) ~5 px wide covers every label boundary, and occluded slivers that would
be too small to annotate are void too. Everything is deterministic for a seed: image ``i`` is
drawn from ``numpy.random.default_rng([seed, i])`` whatever ``n_images`` is.

This is the *home* domain that ``samcache_tiny`` is pretrained on (``tools/pretrain_tiny.py``);
``domain="shifted"`` draws the scenes of ``synthetic_shifted.py`` instead (other shapes,
colours, textures, lighting and noise) in the same VOC layout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from stage1_embed.annotations import VOC_PALETTE, VOID

SHAPE_CLASSES = ("ellipse", "rectangle", "triangle", "star")  # class value k is [k - 1]
_FAMILIES = np.array([(205, 45, 40), (45, 170, 60), (40, 75, 205), (225, 200, 45)], np.float32)
_MARKER = ".samcache-synthetic"
_MIN_VISIBLE = 120  # px; occluded remainders smaller than this become void
DEFAULT_SIZES = ((375, 500), (500, 375), (333, 500), (500, 333))
DOMAINS = ("home", "shifted")


def make_synthetic_voc(
    out_dir: str | Path,
    *,
    n_images: int = 24,
    seed: int = 0,
    size_choices: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    max_instances: int = 5,
    val_fraction: float = 0.25,
    jpeg_quality: int = 90,
    domain: str = "home",
) -> Path:
    """Write ``<out_dir>/VOCdevkit/VOC2007`` and return that path.

    size_choices: (H, W) image sizes drawn per image. Writes JPEGImages/<id>.jpg,
    SegmentationObject/<id>.png and SegmentationClass/<id>.png (palette PNGs, VOC palette) and
    ImageSets/Segmentation/{train,val,trainval}.txt (last line without a newline). Ids are
    ``000001``…; about ``val_fraction`` of them are in val. A folder this function wrote before
    is replaced; any other non-empty VOC2007 folder there is refused. ``domain``: ``home``
    (this module's shapes) or ``shifted`` (``synthetic_shifted.py``).
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if domain not in DOMAINS:
        raise ValueError(f"--domain {domain!r} is not one of {', '.join(DOMAINS)}")
    render = render_scene
    if domain == "shifted":
        from stage1_embed.synthetic_shifted import render_shifted_scene as render
    voc = _fresh_dir(Path(out_dir) / "VOCdevkit" / "VOC2007")
    folders = [voc / n for n in ("JPEGImages", "SegmentationObject", "SegmentationClass")]
    for folder in [*folders, voc / "ImageSets" / "Segmentation"]:
        folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{i + 1:06d}" for i in range(n_images)]
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, i])
        rgb, objects, classes = render(rng, size_choices, max_instances)
        objects, classes = add_void(objects, classes)
        _save(Image.fromarray(rgb), folders[0] / f"{image_id}.jpg", quality=jpeg_quality)
        _save(_palette_png(objects), folders[1] / f"{image_id}.png")
        _save(_palette_png(classes), folders[2] / f"{image_id}.png")
    _write_splits(voc / "ImageSets" / "Segmentation", ids, seed, val_fraction)
    return voc


def make_synthetic_folder(
    out_dir: str | Path,
    *,
    n_images: int = 8,
    seed: int = 0,
    kind: str = "binary",
    size_choices: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    max_instances: int = 5,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/images/<id>.jpg`` and ``<out_dir>/masks/<id>.png`` for ``--masks``.

    kind "binary": masks hold 0 and 255 (every shape is foreground); "instance": mode-L maps
    with instance ids 1..n and 0 for background (no void). Returns (images_dir, masks_dir).
    """
    if kind not in ("binary", "instance"):
        raise ValueError(f"kind must be 'binary' or 'instance', got {kind!r}")
    images, masks = Path(out_dir) / "images", Path(out_dir) / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        rgb, objects, _ = render_scene(rng, size_choices, max_instances)
        mask = np.where(objects > 0, 255, 0).astype(np.uint8) if kind == "binary" else objects
        _save(Image.fromarray(rgb), images / f"{i + 1:06d}.jpg", quality=90)
        _save(Image.fromarray(mask), masks / f"{i + 1:06d}.png")
    return images, masks


def render_scene(
    rng: np.random.Generator, size_choices: tuple[tuple[int, int], ...], max_instances: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb H×W×3 uint8, instance map H×W uint8 with ids 1..n, class map H×W uint8 1..4).

    Later shapes occlude earlier ones (a shape is placed near an earlier one 40% of the time, so
    occlusion is common); ids are consecutive in drawing order among the shapes still visible.
    """
    height, width = size_choices[int(rng.integers(len(size_choices)))]
    rgb = _background(rng, height, width)
    objects = np.zeros((height, width), np.uint8)
    classes = np.zeros((height, width), np.uint8)
    centres: list[tuple[float, float]] = []
    for k in range(1, int(rng.integers(1, max_instances + 1)) + 1):
        cls = int(rng.integers(1, len(SHAPE_CLASSES) + 1))
        centre = (rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height)
        if centres and rng.random() < 0.4:  # overlap an earlier shape
            near = centres[int(rng.integers(len(centres)))]
            spread = 0.15 * min(height, width)
            centre = (near[0] + rng.normal(0, spread), near[1] + rng.normal(0, spread))
        centres.append(centre)
        inside = _shape_mask(rng, cls, height, width, centre)
        _paint(rng, rgb, inside, cls)
        objects[inside], classes[inside] = k, cls
    return rgb, *_renumber(objects, classes, min_visible=1)


def add_void(objects: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VOC-style void: a ~5 px band (255) on every label boundary; tiny remainders become void."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    band = cv2.dilate(objects, kernel) != cv2.erode(objects, kernel)
    objects, classes = objects.copy(), classes.copy()
    objects[band], classes[band] = VOID, VOID
    counts = np.bincount(objects.ravel(), minlength=256)
    tiny = (counts > 0) & (counts < _MIN_VISIBLE)
    tiny[0] = tiny[VOID] = False
    sliver = tiny[objects]
    objects[sliver], classes[sliver] = VOID, VOID
    return _renumber(objects, classes, min_visible=1)


def _renumber(
    objects: np.ndarray, classes: np.ndarray, min_visible: int
) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids made consecutive 1..n (instances under ``min_visible`` px → background)."""
    counts = np.bincount(objects.ravel(), minlength=256)
    keep = [v for v in range(1, VOID) if counts[v] >= min_visible]
    lut = np.zeros(256, np.uint8)
    lut[VOID] = VOID
    lut[keep] = np.arange(1, len(keep) + 1)
    renumbered = lut[objects]
    return renumbered, np.where(renumbered == 0, 0, classes).astype(np.uint8)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation texture: smooth blotches + a gradient + pixel noise, values ~50..190."""
    base = rng.uniform(80, 160)
    coarse = rng.normal(0, 18, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3))
    coarse += rng.normal(0, 10, (1, 1, 3))  # a faint overall tint
    smooth = cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    ramp = np.linspace(-1, 1, width, dtype=np.float32)[None, :, None] * rng.uniform(-25, 25)
    noise = rng.integers(-17, 18, (height, width, 3), dtype=np.int16)  # uniform, std ≈ 10
    return np.clip(base + smooth + ramp + noise, 0, 255).astype(np.uint8)


def _shape_mask(
    rng: np.random.Generator, cls: int, height: int, width: int, centre: tuple[float, float]
) -> np.ndarray:
    """Bool H×W mask of one shape of class ``cls`` at ``centre`` (x, y), radius 6–45% of the
    short side (log-uniform: small shapes are as common as large ones)."""
    side = min(height, width)
    radius = side * float(np.exp(rng.uniform(np.log(0.06), np.log(0.45))))
    cx, cy = centre
    angle = rng.uniform(0, 2 * np.pi)
    canvas = np.zeros((height, width), np.uint8)
    if cls == 1:
        axes = (round(radius), round(radius * rng.uniform(0.45, 1.0)))
        cv2.ellipse(canvas, (round(cx), round(cy)), axes, np.degrees(angle), 0, 360, 1, -1)
        return canvas.astype(bool)
    if cls == 2:
        aspect = rng.uniform(0.4, 1.0)
        corners = np.array([(-1, -aspect), (1, -aspect), (1, aspect), (-1, aspect)]) * radius
    elif cls == 3:
        turns = np.array([0.0, 1 / 3, 2 / 3]) * 2 * np.pi + rng.uniform(-0.35, 0.35, 3)
        corners = np.stack([np.cos(turns), np.sin(turns)], 1) * radius
    else:
        turns = np.arange(10) * np.pi / 5
        lengths = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5)) * radius
        corners = np.stack([np.cos(turns), np.sin(turns)], 1) * lengths[:, None]
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = corners @ rot.T + (cx, cy)
    cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def _paint(rng: np.random.Generator, rgb: np.ndarray, inside: np.ndarray, cls: int) -> None:
    """Fill ``inside`` with a jittered colour of the class family, shaded and noisy."""
    colour = _FAMILIES[cls - 1] + rng.uniform(-25, 25, 3).astype(np.float32)
    ys, xs = np.nonzero(inside)
    if ys.size == 0:
        return
    direction = rng.normal(size=2)
    shade = (ys * direction[0] + xs * direction[1]).astype(np.float32)
    shade = (shade - shade.mean()) / (np.ptp(shade) + 1.0) * rng.uniform(10, 40)
    noise = rng.standard_normal((ys.size, 3), dtype=np.float32) * 7
    rgb[ys, xs] = np.clip(colour + shade[:, None] + noise, 0, 255).astype(np.uint8)


def _palette_png(values: np.ndarray) -> Image.Image:
    im = Image.fromarray(values)  # mode L; putpalette makes it P with the same indices
    im.putpalette(list(VOC_PALETTE))
    return im


def _write_splits(folder: Path, ids: list[str], seed: int, val_fraction: float) -> None:
    """train/val/trainval lists, sorted, without a final newline (like some real VOC files)."""
    n_val = min(len(ids) - 1, max(1, round(len(ids) * val_fraction))) if len(ids) > 1 else 0
    order = np.random.default_rng([seed, 1 << 30]).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    for name, members in (("train", train), ("val", val), ("trainval", sorted(ids))):
        _write_bytes(folder / f"{name}.txt", "\n".join(members).encode())


def _fresh_dir(voc: Path) -> Path:
    if voc.exists() and any(voc.iterdir()):
        if not (voc / _MARKER).exists():
            raise ValueError(f"{voc} exists and was not written by samcache; choose another --out")
        shutil.rmtree(voc)
    voc.mkdir(parents=True, exist_ok=True)
    (voc / _MARKER).write_text("written by samcache stage1_embed.synthetic\n")
    return voc


def _save(im: Image.Image, path: Path, **options: object) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as handle:
        im.save(handle, format="JPEG" if path.suffix == ".jpg" else "PNG", **options)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
