"""`decoder serve`: a click-to-segment labelling page on one cache (Starlette + uvicorn).

The decoders run in this process on the cached embeddings (``interactive.Labeller``); the page
(``stage2_decoder/static``: plain HTML, JS and CSS, no build step) calls the JSON API below.
Image ids travel in query strings or JSON bodies and are looked up in the manifest; a file is
only ever read from the manifest's ``path`` of a known id, never from a client-given path.
Every error is a JSON ``{"error": "..."}`` with a 4xx status (5xx only for a bug).

API (coordinates in the original frame, pixels of the image as displayed):

- ``GET /api/info``: cache, decoders, labels file, classes.
- ``GET /api/images``: every manifest image: id, split, size, #objects, status, error, labelled.
- ``GET /api/image?id=`` JPEG of the image (EXIF applied); ``/api/thumb?id=`` a small JPEG.
- ``GET /api/detail?id=``: ground-truth and labelled objects as outlines (polygons); loads the
  embedding so the first click is fast.
- ``POST /api/predict`` ``{"image_id", "points": [[x, y]], "labels": [1|0], "box": [x0, y0, x1,
  y1] | null, "decoders": [...]?}`` → per decoder the masks offered (PNG, base64, 0/255), their
  predicted IoU, stability score and IoU against the best-matching ground-truth object.
- ``POST /api/objects`` ``{prompt as above, "decoder", "mask": k, "category"}``: the mask is
  decoded again here and added to the labels file (``labels_store``); ``DELETE
  /api/objects?id=&object=`` removes one. ``POST /api/categories`` ``{"name"}`` adds a class.
- ``GET /api/next?limit=``: unlabelled images, most uncertain first (``interactive``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stage2_decoder.interactive import Labeller, best_gt_iou, decode_rle
from stage2_decoder.labels_store import LabelsStore, coco_file_name
from stage2_decoder.prompt_files import Prompt
from stage2_decoder.serve_io import ApiError, jpeg, json_body, outline, parse_prompt, png_base64
from stage2_decoder.visualize import read_image_rgb

STATIC = Path(__file__).resolve().parent / "static"
THUMB_SIDE = 160
NEXT_BUDGET = 16  # images newly scored per /api/next call at most (more on later calls)


@dataclass(frozen=True)
class ServeConfig:
    """Options of `decoder serve`."""

    cache: str
    run: str | None = None
    checkpoint: str | None = None
    which: str = "best"
    labels: str = "labels.json"
    classes: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8765
    threads: int = 0  # torch threads per decoder call; 0: torch's default (the cores)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"--threads {self.threads} must be >= 0 (0: torch's default)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a TCP port (0..65535)")
        if self.which not in ("best", "last"):
            raise ValueError(f"--which {self.which!r} is not one of best, last")


# --------------------------------------------------------------------------- the app


class LabellingApp:
    """The routes, bound to one ``Labeller`` and one ``LabelsStore``."""

    def __init__(self, labeller: Labeller, store: LabelsStore, info: dict[str, Any]) -> None:
        self.labeller, self.store, self.info = labeller, store, info
        self._thumbs: dict[str, bytes] = {}
        self._last_image: tuple[str, bytes] | None = None

    def image_id(self, value: Any, *, ok: bool = True) -> str:
        """A known image id (404 otherwise; 400 for a path-like or non-string id)."""
        if not isinstance(value, str) or not value:
            raise ApiError(400, 'give the image id (?id=… or "image_id")')
        if value.startswith("/") or "\\" in value or ".." in value.split("/"):
            raise ApiError(400, f"image id {value!r} looks like a path; ids come from /api/images")
        record = self.labeller.records.get(value)
        if record is None:
            raise ApiError(404, f"unknown image id {value!r}")
        if ok and not self.labeller.ok(value):
            raise ApiError(409, f"image {value!r} failed in `embed run`: {record['error']}")
        return value

    def file_name(self, image_id: str) -> str:
        return coco_file_name(image_id, self.labeller.records[image_id]["path"])

    # ------------------------------------------------------------------ routes

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def api_info(self, request: Request) -> Response:
        return JSONResponse({**self.info, "categories": self.store.categories()})

    async def api_images(self, request: Request) -> Response:
        counts = self.store.labelled_counts()
        rows = [
            {
                "image_id": image_id,
                "split": r["split"],
                "status": r["status"],
                "error": r["error"],
                "n_objects": r["n_objects"] or 0,
                "has_masks": bool(r["has_masks"]),
                "width": r["original_width"],
                "height": r["original_height"],
                "labelled": counts.get(self.file_name(image_id), 0),
            }  # fmt: skip
            for image_id, r in sorted(self.labeller.records.items())
        ]
        return JSONResponse({"images": rows})

    def _image_bytes(self, image_id: str) -> bytes:
        if self._last_image is not None and self._last_image[0] == image_id:
            return self._last_image[1]
        record = self.labeller.records[image_id]
        image, _ = read_image_rgb(
            record["path"],
            self.labeller.sizes(image_id)[0],
            self.labeller.models.cache.attrs.max_pixels,
        )
        data = jpeg(image)
        self._last_image = (image_id, data)
        return data

    async def api_image(self, request: Request) -> Response:
        image_id = self.image_id(request.query_params.get("id"))
        data = await run_in_threadpool(self._image_bytes, image_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    def _thumb_bytes(self, image_id: str) -> bytes:
        if image_id not in self._thumbs:
            record = self.labeller.records[image_id]
            size = (record["original_height"] or 64, record["original_width"] or 64)
            image, _ = read_image_rgb(
                record["path"], size, self.labeller.models.cache.attrs.max_pixels
            )
            scale = THUMB_SIDE / max(image.shape[:2])
            small = cv2.resize(image, (max(1, round(image.shape[1] * scale)),
                                       max(1, round(image.shape[0] * scale))),
                               interpolation=cv2.INTER_AREA)  # fmt: skip
            self._thumbs[image_id] = jpeg(small, 80)
        return self._thumbs[image_id]

    async def api_thumb(self, request: Request) -> Response:
        image_id = self.image_id(request.query_params.get("id"), ok=False)
        data = await run_in_threadpool(self._thumb_bytes, image_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    def _objects(self, image_id: str) -> list[dict[str, Any]]:
        names = {c["id"]: c["name"] for c in self.store.categories()}
        out = []
        for ann in self.store.objects(self.file_name(image_id)):
            segmentation = ann.get("segmentation")
            polygons: list = []
            if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
                size = tuple(segmentation["size"])
                polygons = outline(decode_rle(segmentation["counts"], size))
            out.append({"id": ann["id"], "category": names.get(ann["category_id"], "?"),
                        "category_id": ann["category_id"], "area": ann.get("area"),
                        "outline": polygons})  # fmt: skip
        return out

    def _detail(self, image_id: str) -> dict[str, Any]:
        record = self.labeller.records[image_id]
        ground_truth = self.labeller.prepare(image_id).ground_truth
        objects = [o for o in record["objects"] or [] if o.get("rle")]
        return {
            "image_id": image_id, "width": record["original_width"],
            "height": record["original_height"], "split": record["split"],
            "ground_truth": [{"category": o["category"], "outline": outline(mask)}
                             for o, mask in zip(objects, ground_truth, strict=True)],
            "objects": self._objects(image_id),
        }  # fmt: skip

    async def api_detail(self, request: Request) -> Response:
        image_id = self.image_id(request.query_params.get("id"))
        return JSONResponse(await run_in_threadpool(self._detail, image_id))

    def _predict(self, image_id: str, prompt: Prompt, names: list[str]) -> dict[str, Any]:
        start = time.perf_counter()
        found = self.labeller.predict(image_id, prompt, names)
        ground_truth = self.labeller.ground_truth(image_id)
        decoders = {}
        for name, options in found.items():
            masks = [
                {
                    "png": png_base64(c.mask),
                    "index": c.index,
                    "predicted_iou": c.predicted_iou,
                    "stability": c.stability,
                    "area": int(c.mask.sum()),
                    "gt_iou": best_gt_iou(c.mask, ground_truth),
                }  # fmt: skip
                for c in options
            ]
            best = int(np.argmax([c.predicted_iou for c in options]))
            decoders[name] = {"masks": masks, "best": best}
        clicks = len(prompt.points) + (prompt.box is not None)
        return {"image_id": image_id, "clicks": clicks, "decoders": decoders,
                "ms": round(1000 * (time.perf_counter() - start), 1)}  # fmt: skip

    def _decoder_names(self, body: dict[str, Any]) -> list[str]:
        names = body.get("decoders") or list(self.labeller.decoders)
        if not isinstance(names, list) or any(n not in self.labeller.decoders for n in names):
            raise ApiError(400, f"decoders must be a list of {list(self.labeller.decoders)}")
        return names

    async def api_predict(self, request: Request) -> Response:
        body = await json_body(request)
        image_id = self.image_id(body.get("image_id"))
        prompt = parse_prompt(body, self.labeller.sizes(image_id)[0])
        names = self._decoder_names(body)
        return JSONResponse(await run_in_threadpool(self._predict, image_id, prompt, names))

    def _accept(self, image_id: str, prompt: Prompt, name: str, k: int, category: str) -> dict:
        options = self.labeller.predict(image_id, prompt, [name])[name]
        if not 0 <= k < len(options):
            raise ApiError(400, f"mask must be 0..{len(options) - 1} for this prompt, got {k}")
        if not options[k].mask.any():
            raise ApiError(400, "the chosen mask is empty; click again before accepting")
        size = self.labeller.sizes(image_id)[0]
        added = self.store.add_object(self.file_name(image_id), size, options[k].mask, category)
        return {"object": {"id": added["id"], "area": added["area"]},
                "objects": self._objects(image_id)}  # fmt: skip

    async def api_accept(self, request: Request) -> Response:
        body = await json_body(request)
        image_id = self.image_id(body.get("image_id"))
        prompt = parse_prompt(body, self.labeller.sizes(image_id)[0])
        name = body.get("decoder") or next(iter(self.labeller.decoders))
        if name not in self.labeller.decoders:
            raise ApiError(400, f"decoder must be one of {list(self.labeller.decoders)}")
        k, category = body.get("mask", 0), body.get("category")
        if not isinstance(k, int) or isinstance(k, bool):
            raise ApiError(400, f"mask must be an integer, got {k!r}")
        if not isinstance(category, str) or not category.strip():
            raise ApiError(400, 'give the object\'s class ("category")')
        answer = await run_in_threadpool(self._accept, image_id, prompt, name, k, category)
        return JSONResponse(answer)

    async def api_delete(self, request: Request) -> Response:
        image_id = self.image_id(request.query_params.get("id"))
        try:
            object_id = int(request.query_params.get("object", ""))
        except ValueError:
            raise ApiError(400, "give the object id as ?object=<integer>") from None
        if not self.store.delete_object(self.file_name(image_id), object_id):
            raise ApiError(404, f"image {image_id!r} has no object {object_id}")
        return JSONResponse({"objects": await run_in_threadpool(self._objects, image_id)})

    async def api_categories(self, request: Request) -> Response:
        body = await json_body(request)
        name = body.get("name")
        if not isinstance(name, str):
            raise ApiError(400, 'give the class as {"name": "..."}')
        try:
            self.store.add_category(name)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        return JSONResponse({"categories": self.store.categories()})

    def _next(self, limit: int) -> dict[str, Any]:
        counts = self.store.labelled_counts()
        todo = [i for i in sorted(self.labeller.records)
                if self.labeller.ok(i) and not counts.get(self.file_name(i))]  # fmt: skip
        scored = [i for i in todo if i in self.labeller._uncertainty]
        for image_id in [i for i in todo if i not in self.labeller._uncertainty][:NEXT_BUDGET]:
            self.labeller.uncertainty(image_id)
            scored.append(image_id)
        ranked = sorted(scored, key=lambda i: -self.labeller.uncertainty(i))[:limit]
        return {"images": [{"image_id": i, "uncertainty": round(self.labeller.uncertainty(i), 4)}
                           for i in ranked],
                "scored": len(scored), "unlabelled": len(todo)}  # fmt: skip

    async def api_next(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "10"))
        except ValueError:
            raise ApiError(400, "limit must be an integer") from None
        return JSONResponse(await run_in_threadpool(self._next, max(1, min(limit, 1000))))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "no such page" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


def create_app(labeller: Labeller, store: LabelsStore, info: dict[str, Any]) -> Starlette:
    """The Starlette app of the page and its API."""
    app = LabellingApp(labeller, store, info)
    routes = [
        Route("/", app.index),
        Route("/api/info", app.api_info),
        Route("/api/images", app.api_images),
        Route("/api/image", app.api_image),
        Route("/api/thumb", app.api_thumb),
        Route("/api/detail", app.api_detail),
        Route("/api/predict", app.api_predict, methods=["POST"]),
        Route("/api/objects", app.api_accept, methods=["POST"]),
        Route("/api/objects", app.api_delete, methods=["DELETE"]),
        Route("/api/categories", app.api_categories, methods=["POST"]),
        Route("/api/next", app.api_next),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]


def build_app(config: ServeConfig) -> Starlette:
    """Load the decoders and the labels file for ``config`` (errors are one line)."""
    import torch

    from stage2_decoder.export import load_models

    if config.threads:
        torch.set_num_threads(config.threads)
    models = load_models(config.cache, run=config.run, checkpoint=config.checkpoint,
                         which=config.which)  # fmt: skip
    labeller = Labeller(models)
    classes = list(config.classes) or sorted(
        {o["category"] for r in labeller.records.values() for o in r["objects"] or []
         if o.get("category")}
    )  # fmt: skip
    store = LabelsStore(config.labels, classes)
    info = {
        "cache": models.cache.name, "model_type": models.cache.attrs.model_type,
        "decoders": list(models.decoders), "labels": str(Path(config.labels).resolve()),
        "run": config.run,
    }  # fmt: skip
    return create_app(labeller, store, info)
