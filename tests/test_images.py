"""read_image: hashing, EXIF, colour modes, and every kind of bad file."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from stage1_embed.images import (
    EXIF_TRANSPOSE,
    ImageReadError,
    orient_array,
    read_image,
)


def _pattern(h: int, w: int) -> np.ndarray:
    """An RGB image where every pixel differs (so any flip or rotation is visible)."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([ys * 7 % 256, xs * 5 % 256, (ys * w + xs) % 251], -1).astype(np.uint8)


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def test_rgb_jpeg_hash_and_shape(tmp_path):
    path = _save(Image.fromarray(_pattern(30, 40)), tmp_path / "a.jpg", quality=95)
    loaded = read_image(path)
    assert loaded.rgb.shape == (30, 40, 3) and loaded.rgb.dtype == np.uint8
    assert loaded.rgb.flags.writeable and loaded.rgb.flags.c_contiguous
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.original_size == loaded.raw_size == (30, 40)
    assert not loaded.exif_transposed and loaded.exif_orientation == 1
    np.testing.assert_array_equal(loaded.rgb, np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil_exif_transpose(tmp_path, orientation):
    im = Image.fromarray(_pattern(20, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(im, tmp_path / "o.png", exif=exif.tobytes())
    loaded = read_image(path)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    np.testing.assert_array_equal(loaded.rgb, expected)
    assert loaded.raw_size == (20, 30)
    assert loaded.original_size == ((30, 20) if orientation >= 5 else (20, 30))
    assert loaded.exif_transposed == (orientation != 1)
    np.testing.assert_array_equal(orient_array(_pattern(20, 30), orientation), expected)


def test_exif_rotated_camera_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held upright: stored landscape, displayed portrait
    path = _save(Image.fromarray(_pattern(30, 40)), tmp_path / "cam.jpg", exif=exif.tobytes())
    loaded = read_image(path)
    assert loaded.raw_size == (30, 40) and loaded.original_size == (40, 30)
    assert loaded.exif_orientation == 6


def test_orient_array_matches_pil_for_masks():
    mask = (_pattern(7, 11)[..., 0] > 100).astype(np.uint8) * 3
    for orientation, method in EXIF_TRANSPOSE.items():
        expected = np.asarray(Image.fromarray(mask).transpose(method))
        np.testing.assert_array_equal(orient_array(mask, orientation), expected)


def test_rgba_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)
    rgba[0, 1] = (200, 100, 50, 0)
    rgba[0, 2] = (200, 100, 50, 128)
    loaded = read_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert tuple(loaded.rgb[0, 0]) == (200, 100, 50)
    assert tuple(loaded.rgb[0, 1]) == (0, 0, 0)
    np.testing.assert_allclose(loaded.rgb[0, 2], (100, 50, 25), atol=1)


def test_la_composited_on_black(tmp_path):
    la = Image.merge("LA", [Image.new("L", (3, 2), 200), Image.new("L", (3, 2), 0)])
    la.putpixel((0, 0), (200, 255))
    loaded = read_image(_save(la, tmp_path / "la.png"))
    assert tuple(loaded.rgb[0, 0]) == (200, 200, 200)
    assert tuple(loaded.rgb[1, 2]) == (0, 0, 0)


def test_palette_with_transparency_composited_on_black(tmp_path):
    im = Image.new("P", (3, 3), 1)
    im.putpalette([10, 20, 30, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    path = _save(im, tmp_path / "p.png", transparency=0)
    loaded = read_image(path)
    assert tuple(loaded.rgb[0, 0]) == (0, 0, 0)  # transparent index, not (10, 20, 30)
    assert tuple(loaded.rgb[1, 1]) == (255, 0, 0)


def test_rgb_png_with_trns_colour_composited_on_black(tmp_path):
    arr = np.full((3, 3, 3), 90, np.uint8)
    arr[0, 0] = (1, 2, 3)
    loaded = read_image(_save(Image.fromarray(arr), tmp_path / "t.png", transparency=(1, 2, 3)))
    assert tuple(loaded.rgb[0, 0]) == (0, 0, 0) and tuple(loaded.rgb[2, 2]) == (90, 90, 90)


def test_16bit_scaled_min_to_max(tmp_path):
    arr = np.array([[1000, 2000, 3000]] * 2, np.uint16)
    loaded = read_image(_save(Image.fromarray(arr), tmp_path / "d.png"))
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    np.testing.assert_array_equal(loaded.rgb[0, :, 0], [0, 128, 255])
    assert (loaded.rgb[..., 0] == loaded.rgb[..., 2]).all()


def test_constant_16bit_image_is_black(tmp_path):
    arr = np.full((4, 5), 4000, np.uint16)
    loaded = read_image(_save(Image.fromarray(arr), tmp_path / "c.png"))
    assert loaded.rgb.shape == (4, 5, 3) and not loaded.rgb.any()


def test_float_tiff_scaled(tmp_path):
    arr = np.array([[-1.0, 0.0, 1.0], [0.5, 0.5, 0.5]], np.float32)
    loaded = read_image(_save(Image.fromarray(arr, "F"), tmp_path / "f.tif"))
    np.testing.assert_array_equal(loaded.rgb[0, :, 1], [0, 128, 255])


def test_animated_gif_first_frame(tmp_path):
    red, blue = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))
    path = tmp_path / "anim.gif"
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    loaded = read_image(path)
    assert tuple(loaded.rgb[3, 3]) == (255, 0, 0)


def test_cmyk_and_gray_jpegs(tmp_path):
    cmyk = read_image(_save(Image.new("CMYK", (9, 7), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    assert cmyk.rgb.shape == (7, 9, 3) and cmyk.rgb[3, 3, 0] > 200 and cmyk.rgb[3, 3, 1] < 50
    gray = read_image(_save(Image.new("L", (9, 7), 120), tmp_path / "g.jpg"))
    assert gray.rgb.shape == (7, 9, 3) and (np.abs(gray.rgb.astype(int) - 120) <= 1).all()


def test_webp_bmp_tiff(tmp_path):
    for name in ("x.webp", "x.bmp", "x.tiff"):
        path = _save(Image.fromarray(_pattern(10, 12)), tmp_path / name)
        assert read_image(path).original_size == (10, 12)


def _raises(path, match: str, **kw) -> ImageReadError:
    with pytest.raises(ImageReadError, match=match) as info:
        read_image(path, **kw)
    assert "\n" not in str(info.value)
    return info.value


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    _raises(tmp_path / "empty.jpg", r"empty \(0 bytes\)")


@pytest.mark.parametrize("keep", [0.5, 0.9, -2, -1])
@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_is_refused(tmp_path, keep, progressive):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(buf, "JPEG", quality=90, progressive=progressive)
    data = buf.getvalue()
    cut = int(len(data) * keep) if keep > 0 else len(data) + keep
    (tmp_path / "t.jpg").write_bytes(data[:cut])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    _raises(tmp_path / "t.jpg", "truncated")


def test_truncated_png_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_pattern(100, 100)).save(buf, "PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _raises(tmp_path / "t.png", "truncated")


def test_load_truncated_images_flag_is_refused(tmp_path, monkeypatch):
    path = _save(Image.fromarray(_pattern(4, 4)), tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _raises(path, "LOAD_TRUNCATED_IMAGES")


def test_not_an_image_despite_extension(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are my notes, not a photo\n")
    _raises(tmp_path / "notes.jpg", "not an image")


def test_directory_named_like_an_image(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    _raises(tmp_path / "x.jpg", "is a directory")


def test_broken_symlink(tmp_path):
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    _raises(tmp_path / "link.jpg", "broken symbolic link")


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.png", "does not exist")


def test_permission_denied(tmp_path, monkeypatch):
    path = _save(Image.fromarray(_pattern(4, 4)), tmp_path / "locked.png")
    if os.geteuid() == 0:  # root reads anything: simulate the OS refusing
        monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError))
    else:
        path.chmod(0)
    _raises(path, "permission denied")


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (5, 1)])
def test_too_small(tmp_path, size):
    path = _save(Image.new("RGB", size), tmp_path / "tiny.png")
    w, h = size
    _raises(path, f"^image is {w}×{h} px; SAM needs at least 2×2 px$")


def test_two_by_two_is_fine(tmp_path):
    assert read_image(_save(Image.new("RGB", (2, 2)), tmp_path / "ok.png")).rgb.shape == (2, 2, 3)


@pytest.mark.parametrize("max_pixels", [1000, 6000])  # PIL raises above 2×, warns above 1×
def test_over_max_pixels(tmp_path, max_pixels):
    path = _save(Image.new("L", (100, 100)), tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = _raises(path, "100×100 px = 0.01 megapixels, over the limit", max_pixels=max_pixels)
    assert "--max-pixels" in str(err)
    assert read_image(path, max_pixels=10_000).original_size == (100, 100)


def test_300_megapixel_image_is_read(tmp_path):
    """20000×15000 is over PIL's default bomb guard (2 × 89 MP) but under our 500 MP."""
    gray = np.zeros((15000, 20000), np.uint8)
    gray[100:200, 300:500] = 200
    gray[-1, -1] = 77
    Image.fromarray(gray).save(tmp_path / "huge.png", compress_level=1)
    del gray
    loaded = read_image(tmp_path / "huge.png")
    assert loaded.original_size == (15000, 20000)
    assert tuple(loaded.rgb[150, 400]) == (200, 200, 200)
    assert tuple(loaded.rgb[-1, -1]) == (77, 77, 77) and not loaded.rgb[0, 0].any()
    assert Image.MAX_IMAGE_PIXELS == 500_000_000
