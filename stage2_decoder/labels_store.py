"""The labels file of `decoder serve`: COCO instances JSON, one accepted object per annotation.

The file is what ``embed run --coco labels.json --images DIR`` reads (stage 1 matches an image
to a COCO entry by ``file_name`` relative to the images folder): each image entry has
``file_name`` = the cache's ``image_id`` plus the extension of its file (the path relative to
the folder `embed run` was given), ``height`` / ``width`` of the original frame (after EXIF
transpose, as the cache); each annotation a compressed RLE ``segmentation`` ``{"size": [H, W],
"counts": str}``, ``bbox`` XYWH, ``area``, ``iscrowd`` 0 and a ``category_id`` of
``categories``.

Edits are operations, never whole-file replacements from a client: ``add_object``,
``delete_object``, ``add_category``. Each runs under one lock, applies to the in-memory document
and rewrites the file atomically (``shared.files.atomic_write``) before it returns, so two
tabs saving at once both land and a crash or a closed tab loses nothing accepted. A second
server on the same file is refused (a lock file beside it). Other keys
of a file opened here (``info``, ``licenses``, annotations' extra keys) are kept as they are.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from pycocotools import mask as mask_utils

from shared.files import atomic_write

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one server per labels file is on the user
    fcntl = None  # type: ignore[assignment]

DEFAULT_CATEGORY = "object"


class LabelsFileError(ValueError):
    """The labels file is not a COCO instances JSON this store can extend."""


def coco_file_name(image_id: str, path: str | None) -> str:
    """``file_name`` for an image: its id plus its file's extension (``.jpg`` when unknown)."""
    suffix = PurePosixPath(str(path or "")).suffix or ".jpg"
    return f"{image_id}{suffix}"


def empty_document(categories: list[str]) -> dict[str, Any]:
    names = list(dict.fromkeys(c for c in categories if c)) or [DEFAULT_CATEGORY]
    return {
        "info": {"description": "labels drawn with `decoder serve` (samcache)"},
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(names)],
    }


def check_coco(document: Any, where: str) -> dict[str, Any]:
    """Refuse anything but a COCO instances document (errors name the first problem)."""
    if not isinstance(document, dict):
        raise LabelsFileError(f"{where} is not a COCO instances JSON (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise LabelsFileError(
                f"{where} is not a COCO instances JSON (no '{key}' list); pass another --labels"
            )
    needs = {
        "images": ("id", "file_name", "height", "width"),
        "annotations": ("id", "image_id", "category_id"),
        "categories": ("id", "name"),
    }
    for key, fields in needs.items():
        for entry in document[key]:
            if not isinstance(entry, dict) or any(f not in entry for f in fields):
                raise LabelsFileError(
                    f"{where}: an entry of '{key}' lacks one of {list(fields)} ({str(entry)[:80]})"
                )
    return document


def _read_coco(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LabelsFileError(
            f"{path} is not a COCO instances JSON ({error}); pass another --labels"
        ) from None
    return check_coco(document, str(path))


def _claim(path: Path) -> IO[bytes] | None:
    """Hold an exclusive lock on ``<labels>.lock`` while this store lives (POSIX only).

    Edits merge per operation inside one server; a second server on the same file would
    overwrite the first one's accepts, so it is refused.
    """
    if fcntl is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path.with_name(path.name + ".lock"), "ab")  # noqa: SIM115 - held open
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise LabelsFileError(
            f"{path} is open in another `decoder serve`; stop it or pass another --labels"
        ) from None
    return handle


class LabelsStore:
    """The COCO labels file, edited by operations under a lock and saved on each one."""

    def __init__(self, path: str | Path, categories: list[str] | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        document = _read_coco(self.path) if self.path.exists() else None  # refuse non-COCO
        self._owner = _claim(self.path)
        if document is not None:
            self.doc = document
            for name in categories or []:
                self._category_id(name)
        else:
            self.doc = empty_document(categories or [])
            self._save()

    def close(self) -> None:
        """Release the lock file (the process exiting does the same)."""
        if self._owner is not None:
            self._owner.close()
            self._owner = None

    # ------------------------------------------------------------------ reading

    def categories(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"id": c["id"], "name": c["name"]} for c in self.doc["categories"]]

    def labelled_counts(self) -> dict[str, int]:
        """file_name → number of annotations (images without any are absent)."""
        with self._lock:
            names = {e["id"]: e["file_name"] for e in self.doc["images"]}
            counts: dict[str, int] = {}
            for ann in self.doc["annotations"]:
                name = names.get(ann["image_id"])
                if name is not None:
                    counts[name] = counts.get(name, 0) + 1
            return counts

    def objects(self, file_name: str) -> list[dict[str, Any]]:
        """The annotations of one image (copies), oldest first."""
        with self._lock:
            entry = self._image_entry(file_name)
            if entry is None:
                return []
            return [dict(a) for a in self.doc["annotations"] if a["image_id"] == entry["id"]]

    # ------------------------------------------------------------------ operations

    def add_object(
        self, file_name: str, size: tuple[int, int], mask: np.ndarray, category: str
    ) -> dict[str, Any]:
        """Add one object (bool mask (H, W), original frame); returns its annotation."""
        if mask.shape != tuple(size):
            raise ValueError(f"mask is {mask.shape}, the image is {tuple(size)}")
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        with self._lock:
            image = self._image_entry(file_name) or self._new_image(file_name, size)
            annotation = {
                "id": 1 + max((int(a["id"]) for a in self.doc["annotations"]), default=0),
                "image_id": image["id"],
                "category_id": self._category_id(category),
                "segmentation": {
                    "size": [int(s) for s in size],
                    "counts": rle["counts"].decode("ascii"),
                },  # fmt: skip
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
            self.doc["annotations"].append(annotation)
            self._save()
            return dict(annotation)

    def delete_object(self, file_name: str, annotation_id: int) -> bool:
        """Remove one annotation of that image; False when it is not there (already gone)."""
        with self._lock:
            image = self._image_entry(file_name)
            if image is None:
                return False
            kept = [
                a for a in self.doc["annotations"]
                if not (a["id"] == annotation_id and a["image_id"] == image["id"])
            ]  # fmt: skip
            if len(kept) == len(self.doc["annotations"]):
                return False
            self.doc["annotations"] = kept
            self._save()
            return True

    def add_category(self, name: str) -> dict[str, Any]:
        """The category called ``name`` (added when new)."""
        with self._lock:
            category_id = self._category_id(name)
            self._save()
            return {"id": category_id, "name": name.strip()}

    # ------------------------------------------------------------------ internals (locked)

    def _image_entry(self, file_name: str) -> dict[str, Any] | None:
        return next((e for e in self.doc["images"] if e["file_name"] == file_name), None)

    def _new_image(self, file_name: str, size: tuple[int, int]) -> dict[str, Any]:
        entry = {
            "id": 1 + max((int(e["id"]) for e in self.doc["images"]), default=0),
            "file_name": file_name,
            "height": int(size[0]),
            "width": int(size[1]),
        }
        self.doc["images"].append(entry)
        return entry

    def _category_id(self, name: str) -> int:
        name = name.strip()
        if not name or len(name) > 100:
            raise ValueError("a class name must have 1 to 100 characters")
        for category in self.doc["categories"]:
            if category["name"] == name:
                return int(category["id"])
        new_id = 1 + max((int(c["id"]) for c in self.doc["categories"]), default=0)
        self.doc["categories"].append({"id": new_id, "name": name, "supercategory": ""})
        return new_id

    def _save(self) -> None:
        text = json.dumps(self.doc, indent=1).encode("utf-8")
        atomic_write(self.path, lambda handle: handle.write(text))
