"""Read one image file robustly: hash its bytes, decode them, apply EXIF, convert to RGB 8-bit.

This follows cache_layout.md "Images are read as":

1. the file's bytes are read once, hashed (sha256, the image's identity for resume) and decoded
   from memory;
2. the EXIF orientation tag is applied (same transposition as ``ImageOps.exif_transpose``), so
   ``original_size`` is the *displayed* orientation;
3. the pixels become an ``H×W×3`` uint8 RGB array: ``RGBA``/``LA``/``PA`` and images carrying a
   ``transparency`` entry (``P``, ``L`` or ``RGB`` with a PNG tRNS chunk) are composited on black;
   16-bit / 32-bit integer and float images are scaled linearly from their own min..max to 0..255
   (constant images → 0) and replicated to 3 channels; everything else goes through PIL's
   ``convert("RGB")``; animated or multi-page files give their first frame;
4. limits: a side < 2 px or more than ``max_pixels`` pixels (default 500 megapixels) fail.

Every failure raises :class:`ImageReadError` with a one-line reason the manifest stores as the
row's ``error``. Truncated files are never accepted: ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay
``False`` (checked) and the whole image is decoded before anything else happens.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from shared.cache_format import DEFAULT_MAX_PIXELS
from shared.hashing import bytes_sha256
from shared.transforms import preprocess_shape

MIN_SIDE = 2
EXIF_ORIENTATION_TAG = 0x0112

# EXIF orientation → the PIL transposition that displays the image upright (as exif_transpose).
EXIF_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_STRIP_BYTES = 1 << 24  # large images are copied out of PIL in ~16 MiB strips


class ImageReadError(ValueError):
    """The file cannot become an image for SAM; the message says why (one line)."""


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image in the original frame.

    rgb: H×W×3 uint8 array, RGB, after the EXIF transposition (writable, C-contiguous).
    sha256: hex sha256 of the file's bytes.
    original_size: (H, W) of ``rgb`` (the original frame of cache_layout.md).
    exif_transposed: True when an EXIF orientation other than 1 was applied.
    raw_size: (H, W) of the stored pixels before the transposition.
    exif_orientation: the EXIF orientation applied (1 when none); see :func:`orient_array`.
    """

    rgb: np.ndarray
    sha256: str
    original_size: tuple[int, int]
    exif_transposed: bool
    raw_size: tuple[int, int]
    exif_orientation: int = 1


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read, hash and decode the image at ``path`` (see the module docstring for the rules).

    Raises ImageReadError for an unreadable, empty, truncated, non-image, too small or too large
    file. PIL's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, process-wide) is set to
    ``max_pixels`` so that PIL's default of 89 megapixels does not refuse large images.
    """
    path = Path(path)
    data = _read_bytes(path)
    sha256 = bytes_sha256(data)
    im = _open(data, path, max_pixels)
    raw_size = (im.height, im.width)
    _check_size(im.width, im.height, max_pixels)
    _load_fully(im, path)
    orientation = _exif_orientation(im)
    if orientation in EXIF_TRANSPOSE:
        im = im.transpose(EXIF_TRANSPOSE[orientation])
    rgb = to_rgb8(im)
    return LoadedImage(
        rgb=rgb,
        sha256=sha256,
        original_size=(rgb.shape[0], rgb.shape[1]),
        exif_transposed=orientation in EXIF_TRANSPOSE,
        raw_size=raw_size,
        exif_orientation=orientation if orientation in EXIF_TRANSPOSE else 1,
    )


def orient_array(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF ``orientation`` (1..8) to an H×W[×C] array exactly as PIL transposes images.

    Used for masks drawn on the stored (un-rotated) pixels. Orientations 1 and unknown values
    return ``array`` unchanged.
    """
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, k=1),
    }
    op = ops.get(orientation)
    return array if op is None else np.ascontiguousarray(op(array))


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ImageReadError(f"{path.name} is a directory, not an image file") from None
    except FileNotFoundError:
        reason = "is a broken symbolic link" if path.is_symlink() else "does not exist"
        raise ImageReadError(f"{path.name} {reason}") from None
    except PermissionError:
        raise ImageReadError(f"{path.name} cannot be read: permission denied") from None
    except OSError as exc:
        raise ImageReadError(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    if not data:
        raise ImageReadError(f"{path.name} is empty (0 bytes)")
    return data


def _open(data: bytes, path: Path, max_pixels: int) -> Image.Image:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageReadError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; samcache refuses to "
            "read images while truncated files would be accepted silently"
        )
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():  # our own size check gives the message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        pass  # over 2 × max_pixels: report the size the header gives
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{path.name} is not an image PIL can read ({len(data)} bytes starting {data[:8]!r})"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageReadError(f"{path.name} cannot be decoded: {exc}") from None
    width, height = _header_size(data, max_pixels)
    _check_size(width, height, max_pixels)
    raise ImageReadError(f"{path.name} is over the decompression-bomb limit")  # pragma: no cover


def _header_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(W, H) from the header alone, with PIL's guard off for this one call (nothing decoded)."""
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(io.BytesIO(data)).size
    finally:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(
            f"image is {width}×{height} px; SAM needs at least {MIN_SIDE}×{MIN_SIDE} px"
        )
    if width * height > max_pixels:
        raise ImageReadError(
            f"image is {width}×{height} px = {_megapixels(width * height)}, over the limit of "
            f"{_megapixels(max_pixels)}; raise --max-pixels to read it"
        )
    if min(preprocess_shape((height, width))) < 1:
        raise ImageReadError(
            f"image is {width}×{height} px: resized to 1024 px on its long side, its short side "
            "would be 0 px; crop or pad it to an aspect ratio under 2048:1"
        )


def _megapixels(pixels: int) -> str:
    return f"{round(pixels / 1e6, 2):g} megapixels"


def _load_fully(im: Image.Image, path: Path) -> None:
    """Decode every pixel of the first frame now, so truncated data fails here."""
    try:
        im.seek(0)
        im.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        text = str(exc)
        if "truncated" in text.lower():
            raise ImageReadError(f"{path.name} is truncated ({text})") from None
        raise ImageReadError(f"{path.name} cannot be decoded: {text}") from None


def _exif_orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 (1 when absent or when the EXIF block itself is unreadable)."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
        return int(value)
    except Exception:  # a damaged EXIF block does not make the pixels unusable
        return 1


def to_rgb8(im: Image.Image) -> np.ndarray:
    """H×W×3 uint8 RGB array from a loaded PIL image, by the rules of the module docstring."""
    if im.mode in _HIGH_DEPTH_MODES:
        return _gray_to_rgb(_scale_to_uint8(np.asarray(im)))
    if im.mode == "L" and "transparency" not in im.info:
        return _gray_to_rgb(_pil_to_numpy(im))
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return _pil_to_numpy(Image.alpha_composite(black, rgba).convert("RGB"))
    try:
        return _pil_to_numpy(im if im.mode == "RGB" else im.convert("RGB"))
    except ValueError as exc:
        raise ImageReadError(f"colour mode {im.mode} cannot be converted to RGB: {exc}") from None


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear min..max → 0..255 (rounded); constant images → 0; NaN/inf pixels → 0."""
    values = values.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    scaled = (values - lo) * np.float32(255.0 / (hi - lo))
    scaled[~finite] = 0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    rgb = np.empty((*gray.shape, 3), np.uint8)
    rgb[...] = gray[..., None]
    return rgb


def _pil_to_numpy(im: Image.Image) -> np.ndarray:
    """A writable numpy copy of ``im`` without holding a second full copy as ``bytes``."""
    channels = len(im.getbands())
    row_bytes = im.width * channels
    if row_bytes * im.height <= _STRIP_BYTES:
        return np.array(im)
    shape = (im.height, im.width, channels) if channels > 1 else (im.height, im.width)
    out = np.empty(shape, np.uint8)
    step = max(1, _STRIP_BYTES // row_bytes)
    for top in range(0, im.height, step):
        bottom = min(im.height, top + step)
        out[top:bottom] = np.asarray(im.crop((0, top, im.width, bottom)))
    return out


def header_orientation(path: str | Path) -> int:
    """EXIF orientation (1..8) from the file's header alone, nothing decoded; 1 when unknown."""
    try:
        with Image.open(path) as im:
            orientation = _exif_orientation(im)
    except Exception:  # unreadable now: the manifest's sizes are still right for upright masks
        return 1
    return orientation if orientation in EXIF_TRANSPOSE else 1
