"""What `decoder serve` reads from requests and writes into answers (no app state).

- ``ApiError``: a refused request, answered as JSON ``{"error": message}`` with its status;
- ``parse_prompt`` / ``json_body``: a prompt from a JSON body, every coordinate checked
  against the image (original frame), bad JSON and wrong types refused with a 400;
- ``png_base64`` (masks), ``outline`` (polygons around a mask), ``jpeg`` (images, thumbnails).
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import cv2
import numpy as np
from starlette.requests import Request

from stage2_decoder.prompt_files import Prompt

MAX_POINTS = 64


class ApiError(Exception):
    """A request the server refuses: JSON ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------- encoding


def png_base64(mask: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    return base64.b64encode(data.tobytes()).decode("ascii")


def outline(mask: np.ndarray) -> list[list[list[int]]]:
    """Polygons (lists of [x, y]) around a bool mask's regions, slightly simplified."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polygons = [cv2.approxPolyDP(c, 0.7, True).reshape(-1, 2).tolist() for c in contours]
    return [p for p in polygons if len(p) >= 2]


def jpeg(image_rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    assert ok
    return data.tobytes()


# --------------------------------------------------------------------------- request parsing


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"{what} must be a finite number, got {value!r}")
    return float(value)


def parse_prompt(body: dict[str, Any], size: tuple[int, int]) -> Prompt:
    """A ``Prompt`` from JSON, every coordinate inside the image (0..W, 0..H)."""
    height, width = size
    points, labels, box = body.get("points") or [], body.get("labels"), body.get("box")
    if not isinstance(points, list) or len(points) > MAX_POINTS:
        raise ApiError(400, f"points must be a list of at most {MAX_POINTS} [x, y] pairs")
    labels = [1] * len(points) if labels is None else labels
    if not isinstance(labels, list) or len(labels) != len(points):
        raise ApiError(400, "labels must be a list as long as points (1 positive, 0 negative)")
    if any(label not in (0, 1) or isinstance(label, bool) for label in labels):
        raise ApiError(400, f"labels must be 0 or 1, got {labels}")
    xy = []
    for point in points:
        if not isinstance(point, list) or len(point) != 2:
            raise ApiError(400, f"a point must be [x, y], got {point!r}")
        x, y = _number(point[0], "x"), _number(point[1], "y")
        if not (0 <= x <= width and 0 <= y <= height):
            raise ApiError(400, f"point ({x:g}, {y:g}) is outside the {width}×{height} image")
        xy.append((x, y))
    box_array = None
    if box is not None:
        if not isinstance(box, list) or len(box) != 4:
            raise ApiError(400, f"box must be [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (_number(v, "a box coordinate") for v in box)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ApiError(400, f"box {box} is empty or outside the {width}×{height} image")
        box_array = np.array([x0, y0, x1, y1], dtype=np.float64)
    if not xy and box_array is None:
        raise ApiError(400, "a prompt needs at least one point or a box")
    return Prompt(np.array(xy, dtype=np.float64).reshape(-1, 2),
                  np.array(labels, dtype=np.int64), box_array)  # fmt: skip


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body
