"""Find the images of `embed run` and where their annotations are (VOC, --masks, --coco).

``plan_sources`` is the one entry point the pipeline calls. It returns one :class:`ImageSource`
per image, sorted by ``image_id`` (the path relative to the images folder, POSIX separators,
without extension). Nothing here decodes an image or a mask; that happens per image in
``images.read_image`` and ``annotations.load_annotations`` (on Dask workers, hence picklable
sources).

How the annotation source is chosen:

- ``--masks DIR``: ``DIR/<image_id>.png`` per image, read as ``mask_kind`` (auto|binary|instance);
- ``--coco instances.json``: COCO annotations matched by ``file_name`` relative to the images
  folder, else by basename when that basename is unique on both sides;
- otherwise a VOC layout is detected: the images folder has a sibling ``SegmentationObject/``
  (``…/VOC2007/JPEGImages``), or is a VOC root holding ``JPEGImages/`` and
  ``SegmentationObject/`` (then ``JPEGImages/`` is used);
- otherwise plain images without annotations (``source="folder"``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_KINDS = ("auto", "binary", "instance")
SPLIT_ORDER = ("train", "val", "trainval", "test")
SPECIFIC_SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """The images or annotations given cannot be used; the message says what to do."""


@dataclass(frozen=True)
class CocoRef:
    """One COCO image entry and its annotations (the JSON dicts, segmentation untouched)."""

    file_name: str
    coco_image_id: int
    height: int
    width: int
    matched_by: str  # "file_name" (relative to the images folder) or "basename"
    categories: tuple[tuple[int, str], ...]  # (category_id, name) of the categories used here
    annotations: tuple[dict[str, Any], ...] = field(default=(), hash=False)


@dataclass(frozen=True)
class ImageSource:
    """One image to encode and where its annotation is.

    path: absolute path of the image file. source: folder | voc | masks | coco.
    split: train | val | test when known; splits: every split list naming the image.
    mask_path: VOC ``SegmentationObject`` PNG or the ``--masks`` PNG (None: no mask).
    class_mask_path: VOC ``SegmentationClass`` PNG. mask_kind: "voc" for VOC masks, else the
    ``--mask-kind`` (auto|binary|instance). coco: the COCO entry when ``source == "coco"``.
    """

    image_id: str
    path: Path
    source: str = "folder"
    split: str | None = None
    splits: tuple[str, ...] = ()
    mask_path: Path | None = None
    class_mask_path: Path | None = None
    mask_kind: str = "auto"
    coco: CocoRef | None = None
    name_error: str | None = None  # why the file's name cannot be stored (the image fails)

    @property
    def has_masks(self) -> bool:
        """True when an annotation exists (zero objects in it is then a real answer)."""
        return self.mask_path is not None or self.coco is not None


def plan_sources(
    images_dir: str | Path,
    *,
    recursive: bool = True,
    masks_dir: str | Path | None = None,
    mask_kind: str = "auto",
    coco_json: str | Path | None = None,
) -> list[ImageSource]:
    """All images under ``images_dir`` with their annotation references, sorted by image_id."""
    if masks_dir is not None and coco_json is not None:
        raise SourceError("give either --masks or --coco, not both")
    if mask_kind not in MASK_KINDS:
        raise SourceError(f"--mask-kind {mask_kind!r} is not one of {', '.join(MASK_KINDS)}")
    images_dir = _check_dir(images_dir, "images folder", "--images")
    if masks_dir is not None:
        masks_dir = _check_dir(masks_dir, "masks folder", "--masks")
        images = discover_images(images_dir, recursive=recursive, exclude=(masks_dir,))
        return attach_masks(images, masks_dir, mask_kind)
    if coco_json is not None:
        return attach_coco(discover_images(images_dir, recursive=recursive), images_dir, coco_json)
    voc_root = detect_voc(images_dir)
    if voc_root is not None:
        voc_images = images_dir if images_dir.parent == voc_root else voc_root / "JPEGImages"
        return plan_voc(voc_root, images_dir=voc_images, recursive=recursive)
    return discover_images(images_dir, recursive=recursive)


def discover_images(
    images_dir: str | Path, *, recursive: bool = True, exclude: tuple[Path, ...] = ()
) -> list[ImageSource]:
    """Image files under ``images_dir`` (hidden files and folders skipped), sorted by image_id.

    Raises SourceError when the folder holds no image or two files share an image_id
    (same stem, different extensions, in one folder).
    """
    root = _check_dir(images_dir, "images folder", "--images")
    skip = {os.path.abspath(p) for p in exclude}
    found: dict[str, Path] = {}
    clashes: list[str] = []
    for folder, names in _walk(root, recursive, skip):
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = folder / name
            image_id = storable(path.relative_to(root).with_suffix("").as_posix())
            if image_id in found:
                clashes.append(f"{found[image_id].relative_to(root)} and {path.relative_to(root)}")
            found[image_id] = path
    if clashes:
        raise SourceError(
            f"{len(clashes)} image id(s) are used by two files ({'; '.join(clashes[:3])}); "
            "an image id is the path without extension: rename or remove one of each pair"
        )
    if not found:
        raise SourceError(
            f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found in {root}"
            f"{' or its subfolders' if recursive else ' (not recursive)'}; "
            "pass --images with the folder that holds them"
        )
    return [ImageSource(i, found[i], name_error=_name_error(found[i])) for i in sorted(found)]


def storable(text: str) -> str:
    """``text`` as valid UTF-8: bytes of a non-UTF-8 file name (surrogate escapes) are written
    as ``\\xe9`` (the manifest's strings must be UTF-8; the name is kept recognisable)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _name_error(path: Path) -> str | None:
    if storable(path.name) == path.name:
        return None
    return (
        f"file name {storable(path.name)} is not valid UTF-8 (the odd bytes shown as \\x..); "
        "rename it to UTF-8 (e.g. `convmv -f latin1 -t utf8`)"
    )


def detect_voc(images_dir: str | Path) -> Path | None:
    """The VOC root (…/VOC2007) when ``images_dir`` is its JPEGImages folder or the root itself."""
    images_dir = Path(images_dir)
    if (images_dir.parent / "SegmentationObject").is_dir():
        return images_dir.parent
    if (images_dir / "JPEGImages").is_dir() and (images_dir / "SegmentationObject").is_dir():
        log.info("%s is a VOC root: using its JPEGImages folder", images_dir)
        return images_dir
    return None


def plan_voc(
    voc_root: str | Path, *, images_dir: str | Path | None = None, recursive: bool = True
) -> list[ImageSource]:
    """Sources for a VOC root: masks from SegmentationObject, classes and splits alongside.

    ``images_dir`` defaults to ``<voc_root>/JPEGImages``. Images without a SegmentationObject
    PNG (most VOC JPEGs) get no mask (``has_masks`` False).
    """
    voc_root = Path(os.path.abspath(voc_root))
    images_dir = voc_root / "JPEGImages" if images_dir is None else Path(images_dir)
    sources = attach_voc(discover_images(images_dir, recursive=recursive), voc_root)
    n_masks = sum(s.has_masks for s in sources)
    log.info("VOC layout at %s: %d images, %d with masks", voc_root, len(sources), n_masks)
    return sources


def attach_voc(images: list[ImageSource], voc_root: Path) -> list[ImageSource]:
    """Give each image its VOC ``SegmentationObject``/``SegmentationClass`` PNGs and splits.

    Only the annotation files are looked at, never the images (`embed labels` has none).
    """
    splits = read_voc_splits(voc_root / "ImageSets" / "Segmentation")
    sources = []
    for src in images:
        obj = voc_root / "SegmentationObject" / f"{src.image_id}.png"
        cls = voc_root / "SegmentationClass" / f"{src.image_id}.png"
        names = splits.get(src.image_id, ())
        sources.append(
            replace(
                src,
                source="voc",
                split=next((s for s in SPECIFIC_SPLITS if s in names), None),
                splits=names,
                mask_path=obj if obj.is_file() else None,
                class_mask_path=cls if cls.is_file() else None,
                mask_kind="voc",
            )
        )
    return sources


def read_voc_splits(folder: Path) -> dict[str, tuple[str, ...]]:
    """image_id → the split lists naming it (train, val, trainval, test, then others by name).

    Lines are stripped (CRLF, a missing final newline and blank lines are fine); only the first
    token of a line counts (``ImageSets/Main`` lists add a flag after the id).
    """
    if not folder.is_dir():
        return {}
    files = sorted(folder.glob("*.txt"), key=lambda p: _split_rank(p.stem))
    named: dict[str, list[str]] = {}
    for file in files:
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                named.setdefault(line.split()[0], []).append(file.stem)
    return {image_id: tuple(dict.fromkeys(names)) for image_id, names in named.items()}


def attach_masks(images: list[ImageSource], masks_dir: Path, mask_kind: str) -> list[ImageSource]:
    """Give each image its ``<masks_dir>/<image_id>.png`` (``.PNG`` accepted) when it exists."""
    out = []
    for src in images:
        mask = next(
            (p for ext in (".png", ".PNG") if (p := masks_dir / f"{src.image_id}{ext}").is_file()),
            None,
        )
        out.append(replace(src, source="masks", mask_path=mask, mask_kind=mask_kind))
    n_masks = sum(s.mask_path is not None for s in out)
    if n_masks == 0:
        raise SourceError(
            f"none of the {len(out)} images has a mask in {masks_dir}: masks must be named "
            f"<image_id>.png, e.g. {masks_dir / (out[0].image_id + '.png')}"
        )
    log.info("--masks %s: %d of %d images have a mask", masks_dir, n_masks, len(out))
    return out


def attach_coco(
    images: list[ImageSource], images_dir: Path, coco_json: str | Path
) -> list[ImageSource]:
    """Match images to COCO entries by file_name relative to ``images_dir``, else by basename."""
    coco = _load_coco(coco_json)
    by_name: dict[str, dict[str, Any]] = {}
    by_base: dict[str, list[dict[str, Any]]] = {}
    for entry in coco.imgs.values():
        name = Path(str(entry.get("file_name", ""))).as_posix().removeprefix("./")
        by_name[name] = entry
        by_base.setdefault(name.rsplit("/", 1)[-1], []).append(entry)
    local_bases: dict[str, int] = {}
    for src in images:
        local_bases[src.path.name] = local_bases.get(src.path.name, 0) + 1
    out, counts = [], {"file_name": 0, "basename": 0}
    for src in images:
        rel = src.path.relative_to(images_dir).as_posix()
        entry, how = by_name.get(rel), "file_name"
        if entry is None and len(by_base.get(src.path.name, ())) == 1:
            if local_bases[src.path.name] == 1:
                entry, how = by_base[src.path.name][0], "basename"
        ref = None if entry is None else _coco_ref(coco, entry, how)
        counts[how] += entry is not None
        out.append(replace(src, source="coco", coco=ref))
    matched = counts["file_name"] + counts["basename"]
    if matched == 0:
        example = next(iter(by_name), "(no images in the JSON)")
        raise SourceError(
            f"no image under {images_dir} matches a file_name in {Path(coco_json).name} "
            f"(e.g. {example!r}); pass --images with the folder those file names are relative to"
        )
    log.info(
        "--coco %s: %d images matched by file_name relative to %s, %d by basename, "
        "%d without an entry; %d JSON images not found",
        Path(coco_json).name,
        counts["file_name"],
        images_dir,
        counts["basename"],
        len(out) - matched,
        len(coco.imgs) - matched,
    )
    return out


def _coco_ref(coco: Any, entry: dict[str, Any], matched_by: str) -> CocoRef:
    anns = tuple(
        {k: a[k] for k in ("id", "category_id", "segmentation", "iscrowd") if k in a}
        for a in coco.imgToAnns.get(entry["id"], [])
    )
    used = sorted({int(a.get("category_id", 0)) for a in anns})
    names = tuple((c, str(coco.cats.get(c, {}).get("name", ""))) for c in used)
    return CocoRef(
        file_name=str(entry["file_name"]),
        coco_image_id=int(entry["id"]),
        height=int(entry["height"]),
        width=int(entry["width"]),
        matched_by=matched_by,
        categories=names,
        annotations=anns,
    )


def _load_coco(coco_json: str | Path) -> Any:
    from pycocotools.coco import COCO

    path = Path(coco_json)
    if not path.is_file():
        raise SourceError(f"COCO file {path} does not exist; pass --coco with an instances.json")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
            coco = COCO(str(path))
    except Exception as exc:
        raise SourceError(f"{path.name} is not a COCO instances file: {exc}") from None
    for entry in coco.imgs.values():
        missing = [k for k in ("id", "file_name", "height", "width") if k not in entry]
        if missing:
            raise SourceError(f"{path.name}: image entry {entry!r:.80} lacks {', '.join(missing)}")
    return coco


def _walk(root: Path, recursive: bool, skip: set[str]):
    """(folder, sorted file names) for ``root`` and, when recursive, its non-hidden subfolders."""
    if not recursive:
        yield root, sorted(e.name for e in os.scandir(root) if not e.is_dir())
        return

    def warn(exc: OSError) -> None:
        log.warning("skipping %s: %s", exc.filename, exc.strerror)

    seen = {os.path.realpath(root)}  # symlinked folders are followed once (no cycles)
    for folder, dirs, files in os.walk(root, onerror=warn, followlinks=True):
        keep = []
        for d in sorted(dirs):
            full = os.path.join(folder, d)
            real = os.path.realpath(full)
            if d.startswith(".") or full in skip or real in skip or real in seen:
                continue
            seen.add(real)
            keep.append(d)
        dirs[:] = keep
        yield Path(folder), sorted(files)


def _check_dir(path: str | Path, what: str, option: str) -> Path:
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if not path.exists():
        raise SourceError(f"{what} {path} does not exist; pass {option} with an existing folder")
    if not path.is_dir():
        raise SourceError(f"{what} {path} is a file, not a folder; pass {option} with a folder")
    return path


def _split_rank(name: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)
