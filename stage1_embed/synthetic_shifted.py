"""The *shifted* synthetic domain: what a pretrained model has not seen (demo, tests, bench).

``samcache_tiny`` is pretrained on the *home* domain of ``synthetic.py`` (flat-coloured
ellipses, rectangles, triangles and stars on a pale, low-saturation background). This domain
changes what the seed tutorials' medical and remote-sensing users meet:

====  ==========  =====================================  ==================================
 id   shape       look                                   VOC name the manifest will show
====  ==========  =====================================  ==================================
 1    blob        irregular, lobed outline               aeroplane
 2    ring        annulus (a hole: not convex)           bicycle
 3    crescent    a disc with a bite taken out           bird
 4    hexagon     regular, elongated                     boat
====  ==========  =====================================  ==================================

- **colours**: stain-like purples, pinks, teals and ochres, on a saturated dark background of
  the same palette (low contrast between objects and background);
- **textures**: objects and background carry stripes or speckle at random frequencies;
- **lighting**: a strong vignette and a directional light; a global gamma;
- **noise**: Gaussian pixel noise (std 8–22) and a slight blur, as from a worse sensor.

Same interface as ``synthetic.render_scene``: ``(rgb, instance map, class map)``; occlusion,
void bands and the VOC layout come from ``synthetic.py`` (``make_synthetic_voc(domain=...)``).
"""

from __future__ import annotations

import cv2
import numpy as np

SHIFTED_CLASSES = ("blob", "ring", "crescent", "hexagon")  # class value k is [k - 1]
_PALETTE = np.array(
    [(150, 60, 160), (210, 110, 160), (40, 150, 150), (190, 150, 60), (90, 60, 140)], np.float32
)


def render_shifted_scene(
    rng: np.random.Generator, size_choices: tuple[tuple[int, int], ...], max_instances: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb H×W×3 uint8, instance map H×W uint8 ids 1..n, class map H×W uint8 1..4).

    Later shapes occlude earlier ones (40 % of them are placed near an earlier one).
    """
    from stage1_embed.synthetic import _renumber

    height, width = size_choices[int(rng.integers(len(size_choices)))]
    rgb = _background(rng, height, width)
    objects = np.zeros((height, width), np.uint8)
    classes = np.zeros((height, width), np.uint8)
    centres: list[tuple[float, float]] = []
    for k in range(1, int(rng.integers(1, max_instances + 1)) + 1):
        cls = int(rng.integers(1, len(SHIFTED_CLASSES) + 1))
        centre = (rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height)
        if centres and rng.random() < 0.4:
            near = centres[int(rng.integers(len(centres)))]
            spread = 0.15 * min(height, width)
            centre = (near[0] + rng.normal(0, spread), near[1] + rng.normal(0, spread))
        centres.append(centre)
        inside = _shape_mask(rng, cls, height, width, centre)
        rgb[inside] = _texture(rng, height, width, base=_PALETTE[int(rng.integers(4))])[inside]
        objects[inside], classes[inside] = k, cls
    rgb = _light_and_noise(rng, rgb.astype(np.float32))
    return rgb, *_renumber(objects, classes, min_visible=1)


def _texture(rng: np.random.Generator, height: int, width: int, base: np.ndarray) -> np.ndarray:
    """H×W×3 float: ``base`` colour (jittered) with stripes or speckle."""
    colour = base + rng.uniform(-30, 30, 3).astype(np.float32)
    if rng.random() < 0.5:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 14)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        wave = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
        pattern = wave[..., None] * rng.uniform(12, 30)
    else:
        small = rng.normal(0, 1, (height // 3 + 1, width // 3 + 1, 1)).astype(np.float32)
        pattern = cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)[..., None]
        pattern = pattern * rng.uniform(12, 28)
    return colour + pattern


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Saturated, dark, textured background of the same palette as the objects."""
    base = _PALETTE[int(rng.integers(len(_PALETTE)))] * rng.uniform(0.45, 0.8)
    return _texture(rng, height, width, base=base.astype(np.float32))


def _shape_mask(
    rng: np.random.Generator, cls: int, height: int, width: int, centre: tuple[float, float]
) -> np.ndarray:
    """Bool H×W mask of one shape, radius 7–40 % of the short side (log-uniform)."""
    radius = min(height, width) * float(np.exp(rng.uniform(np.log(0.07), np.log(0.4))))
    cx, cy = centre
    canvas = np.zeros((height, width), np.uint8)
    centre_px = (round(cx), round(cy))
    if cls == 1:  # lobed blob: radius modulated by a few random harmonics
        turns = np.linspace(0, 2 * np.pi, 90, endpoint=False)
        wobble = sum(rng.uniform(0.05, 0.2) * np.cos(h * turns + rng.uniform(0, 2 * np.pi))
                     for h in (2, 3, 5))  # fmt: skip
        r = radius * (1 + wobble)
        points = np.stack([cx + r * np.cos(turns), cy + r * np.sin(turns)], 1)
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    elif cls == 2:  # ring
        cv2.circle(canvas, centre_px, round(radius), 1, -1)
        cv2.circle(canvas, centre_px, round(radius * rng.uniform(0.4, 0.65)), 0, -1)
    elif cls == 3:  # crescent
        cv2.circle(canvas, centre_px, round(radius), 1, -1)
        angle = rng.uniform(0, 2 * np.pi)
        shift = radius * rng.uniform(0.45, 0.8)
        bite = (round(cx + shift * np.cos(angle)), round(cy + shift * np.sin(angle)))
        cv2.circle(canvas, bite, round(radius * rng.uniform(0.7, 0.95)), 0, -1)
    else:  # elongated hexagon
        turns = np.arange(6) * np.pi / 3 + rng.uniform(0, np.pi)
        stretch = rng.uniform(0.5, 1.0)
        corners = np.stack([np.cos(turns), np.sin(turns) * stretch], 1) * radius
        angle = rng.uniform(0, np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        cv2.fillPoly(canvas, [np.round(corners @ rot.T + (cx, cy)).astype(np.int32)], 1)
    return canvas.astype(bool)


def _light_and_noise(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Vignette, directional light, gamma, blur and Gaussian noise; back to uint8."""
    height, width = rgb.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = (xs / width - 0.5), (ys / height - 0.5)
    vignette = 1 - rng.uniform(0.3, 0.7) * (dx**2 + dy**2) * 2
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0.1, 0.35) * (dx * np.cos(angle) + dy * np.sin(angle)) * 2
    lit = np.clip(rgb * (vignette * light)[..., None], 0, 255) / 255.0
    lit = (lit ** rng.uniform(0.7, 1.4)) * 255.0
    lit = cv2.GaussianBlur(lit, (0, 0), rng.uniform(0.5, 1.3))
    lit += rng.normal(0, rng.uniform(8, 22), lit.shape).astype(np.float32)
    return np.clip(lit, 0, 255).astype(np.uint8)
