"""Inputs of `decoder predict`: prompts.json, COCO detections, ground-truth boxes; safe names.

Every prompt is in the original frame (pixels of the image as displayed). Schemas and the
mask-choice rule are described in ``stage2_decoder.predict``. Errors are one line naming the
file, the image and the prompt at fault (``PromptFileError``, a ValueError).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from shared.transforms import coords_to_1024
from stage2_decoder.model import LABEL_BOX_BR, LABEL_BOX_TL, LABEL_NEG, LABEL_PAD, LABEL_POS


@dataclass(frozen=True)
class Prompt:
    """One prompt, original frame: points (N, 2) XY, labels (N,) 1/0, box (4,) XYXY or None.

    ``image_key`` is the image id as the input file spelled it (results keep it);
    ``score`` a detection's score (None: the predicted IoU is reported).
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None
    category_id: int = 0
    score: float | None = None
    image_key: str | int | None = None

    @property
    def multimask(self) -> bool:
        return self.box is None and len(self.points) == 1

    def tokens(self, original_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(coords_1024 (T, 2) float32, point_labels (T,) int64) in Meta's layout."""
        coords = [coords_to_1024(self.points.reshape(-1, 2), original_size)]
        labels = [self.labels.astype(np.int64)]
        if self.box is None:
            coords.append(np.zeros((1, 2)))
            labels.append(np.array([LABEL_PAD]))
        else:
            coords.append(coords_to_1024(self.box.reshape(2, 2), original_size))
            labels.append(np.array([LABEL_BOX_TL, LABEL_BOX_BR]))
        return np.concatenate(coords).astype(np.float32), np.concatenate(labels)


# --------------------------------------------------------------------------- input files


class PromptFileError(ValueError):
    """A prompts / detections file that cannot be used; the message names the problem."""


# Bounds on what an input file may ask for (each one a one-line error, never a traceback).
MAX_POINTS = 100  # points of one prompt (SAM is trained with at most ~10 clicks)
MAX_COORDINATE = 1e7  # |x|, |y| in pixels: far beyond any image the pixel limit admits


def load_json(path: str | Path) -> Any:
    """Parsed JSON; a missing file, a syntax error, deep nesting or a huge number becomes one
    PromptFileError line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise PromptFileError(f"cannot read {path} ({reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    except RecursionError:
        raise PromptFileError(
            f"{path} nests arrays/objects too deeply to be a prompts file"
        ) from None
    except ValueError as error:  # e.g. an integer of over 4300 digits
        raise PromptFileError(f"{path} cannot be read as JSON: {str(error)[:200]}") from None


class ImageIds:
    """The manifest's image ids, with lookup of spellings used by input files."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = list(ids)
        self.known = set(ids)
        self.by_int: dict[int, list[str]] = {}
        for image_id in ids:
            if image_id.isdigit():
                self.by_int.setdefault(int(image_id), []).append(image_id)

    def resolve(self, value: Any) -> str | None:
        """The manifest id that ``value`` (string or integer) names, or None."""
        if isinstance(value, str) and value in self.known:
            return value
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str) and value.isdigit() and len(value) <= 19:
            number = int(value)
        found = self.by_int.get(number, []) if number is not None else []
        return found[0] if len(found) == 1 else None

    def unknown_error(self, unknown: list[Any], where: str) -> ValueError:
        shown = ", ".join(repr(u) for u in unknown[:3]) + (" …" if len(unknown) > 3 else "")
        valid = ", ".join(self.ids[:5]) + (" …" if len(self.ids) > 5 else "")
        return ValueError(
            f"{where}: {len(unknown)} unknown image id(s) {shown}; the cache has "
            f"{len(self.ids)} images, e.g. {valid}"
        )


def _is_coordinate(value: Any) -> bool:
    """A finite number within ±MAX_COORDINATE (a huge int never becomes a float here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) <= MAX_COORDINATE and (isinstance(value, int) or math.isfinite(value))


def _number_list(value: Any, length: int | None, what: str) -> np.ndarray:
    ok = isinstance(value, list) and (length is None or len(value) == length)
    if not (ok and all(_is_coordinate(v) for v in value)):
        raise PromptFileError(f"{what}, finite, within ±{MAX_COORDINATE:g} px")
    return np.asarray(value, dtype=np.float64)


def _box(value: Any, where: str) -> np.ndarray:
    box = _number_list(value, 4, f"{where}: 'box' must be 4 numbers (x0, y0, x1, y1)")
    if box[2] < box[0] or box[3] < box[1]:
        raise PromptFileError(f"{where}: box {value} has x1 < x0 or y1 < y0 (XYXY expected)")
    return box


def _points(item: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    raw = item.get("points", [])
    if not isinstance(raw, list):
        raise PromptFileError(f"{where}: 'points' must be a list of (x, y) pairs")
    if len(raw) > MAX_POINTS:
        raise PromptFileError(
            f"{where}: {len(raw)} points in one prompt; at most {MAX_POINTS} (split it into "
            "several prompts)"
        )
    points = [_number_list(p, 2, f"{where}: 'points' must be a list of (x, y) pairs") for p in raw]
    labels_raw = item.get("labels", [1] * len(points))
    if not isinstance(labels_raw, list) or len(labels_raw) != len(points):
        raise PromptFileError(f"{where}: 'labels' must be a list with one label per point")
    if any(label not in (LABEL_POS, LABEL_NEG) or isinstance(label, bool) for label in labels_raw):
        raise PromptFileError(f"{where}: labels must be 1 (foreground) or 0 (background)")
    return np.array(points, np.float64).reshape(-1, 2), np.array(labels_raw, np.int64)


def _prompt(item: Any, where: str, image_key: str) -> Prompt:
    if not isinstance(item, dict):
        raise PromptFileError(f"{where}: a prompt must be an object with points/labels and/or box")
    extra = set(item) - {"points", "labels", "box"}
    if extra:
        raise PromptFileError(f"{where}: unknown key(s) {sorted(extra)}; use points, labels, box")
    points, labels = _points(item, where)
    box = _box(item["box"], where) if item.get("box") is not None else None
    if box is None and len(points) == 0:
        raise PromptFileError(f"{where}: the prompt has neither points nor a box")
    return Prompt(points, labels, box, image_key=image_key)


def _image_prompts(value: Any, where: str, image_key: str) -> list[Prompt]:
    if isinstance(value, list):
        return [_prompt(item, f"{where} prompt {k}", image_key) for k, item in enumerate(value)]
    if not isinstance(value, dict):
        raise PromptFileError(f"{where}: expected a list of prompts or an object")
    extra = set(value) - {"points", "labels", "boxes"}
    if extra:
        raise PromptFileError(f"{where}: unknown key(s) {sorted(extra)}; use points, labels, boxes")
    boxes = value.get("boxes", [])
    if not isinstance(boxes, list):
        raise PromptFileError(f"{where}: 'boxes' must be a list of boxes (x0, y0, x1, y1)")
    prompts = []
    if value.get("points"):
        points = {k: value[k] for k in ("points", "labels") if k in value}
        prompts.append(_prompt(points, where, image_key))
    prompts += [_prompt({"box": box}, f"{where} box {k}", image_key) for k, box in enumerate(boxes)]
    return prompts


def parse_prompts_file(path: str | Path, ids: ImageIds) -> dict[str, list[Prompt]]:
    """The prompts of ``prompts.json`` (schema in the module docstring) by manifest image id."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise PromptFileError(f"{path}: expected an object mapping image ids to prompts")
    out: dict[str, list[Prompt]] = {}
    unknown = []
    for key, value in data.items():
        image_id = ids.resolve(key)
        if image_id is None:
            unknown.append(key)
            continue
        out.setdefault(image_id, []).extend(_image_prompts(value, f"{path}: image {key!r}", key))
    if unknown:
        raise ids.unknown_error(unknown, str(path))
    return out


def _detection_problem(det: Any) -> str | None:
    """Why one COCO detection cannot be a box prompt (None: it can)."""
    if not isinstance(det, dict) or "image_id" not in det or "bbox" not in det:
        return "needs image_id and bbox (x, y, w, h)"
    bbox, score = det["bbox"], det.get("score", 1.0)
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_coordinate, bbox))):
        return f"bbox {str(bbox)[:60]} is not 4 finite numbers (x, y, w, h)"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox {bbox} has a negative width or height"
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        return f"score {str(score)[:30]} is not a finite number"
    category = det.get("category_id", 0)
    if isinstance(category, bool) or not isinstance(category, int) or abs(category) >= 2**31:
        return f"category_id {str(category)[:30]} is not a 32-bit integer"
    return None


def parse_detections_file(
    path: str | Path,
    ids: ImageIds,
    score_threshold: float = 0.0,
    skipped: list[str] | None = None,
) -> dict[str, list[Prompt]]:
    """Box prompts from COCO detection results (``bbox`` XYWH), ``score >= score_threshold``.

    A detection that cannot be used (NaN score, bad bbox, …) is skipped; its index and reason go
    to ``skipped``. A file whose every detection is bad is refused.
    """
    data = load_json(path)
    if not isinstance(data, list):
        raise PromptFileError(f"{path}: expected a list of detections (COCO results format)")
    out: dict[str, list[Prompt]] = {}
    unknown = []
    bad: list[str] = []
    for k, det in enumerate(data):
        problem = _detection_problem(det)
        if problem is not None:
            bad.append(f"detection {k}: {problem}")
            continue
        x, y, w, h = (float(v) for v in det["bbox"])
        score, category = det.get("score", 1.0), det.get("category_id", 0)
        image_id = ids.resolve(det["image_id"])
        if image_id is None:
            unknown.append(det["image_id"])
        elif score >= score_threshold:
            box = np.array([x, y, x + w, y + h])
            out.setdefault(image_id, []).append(
                Prompt(
                    np.zeros((0, 2)),
                    np.zeros(0, np.int64),
                    box,
                    int(category),
                    float(score),
                    image_key=det["image_id"],
                )
            )
    if bad and len(bad) == len(data):
        raise PromptFileError(f"{path}: all {len(bad)} detections are unusable, e.g. {bad[0]}")
    if unknown:
        raise ids.unknown_error(sorted(set(map(str, unknown))), str(path))
    if skipped is not None:
        skipped.extend(bad)
    return out


def ground_truth_prompts(record: dict[str, Any]) -> list[Prompt]:
    """One exact box per object of a manifest row (objects with no pixel are skipped)."""
    if not record.get("has_masks"):
        raise ValueError(
            f"image {record['image_id']} has no ground truth (the cache was made without masks); "
            "pass --boxes or --prompts"
        )
    prompts = []
    for obj in record["objects"]:
        x, y, w, h = obj["bbox"]
        if obj["area"] <= 0:
            continue
        box = np.array([x, y, x + w, y + h], dtype=np.float64)
        prompts.append(Prompt(np.zeros((0, 2)), np.zeros(0, np.int64), box, obj["category_id"]))
    return prompts


def safe_relative(image_id: str) -> PurePosixPath:
    """``image_id`` as a relative path that cannot leave the output folder (else ValueError)."""
    path = PurePosixPath(image_id)
    if (
        not image_id
        or path.is_absolute()
        or "\\" in image_id
        or "\x00" in image_id
        or any(p in ("..", ".", "") for p in image_id.split("/"))
    ):
        raise ValueError(
            f"image id {image_id!r} cannot name an output file (absolute, '..' or odd characters)"
        )
    return path
