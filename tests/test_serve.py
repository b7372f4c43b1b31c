"""`decoder serve`: the JSON API on a real VOC cache (Starlette's TestClient, no socket).

The cache is made by stage 1 in-process (tiny random encoder); the run is a perturbed copy of
its decoder (tests/decoder_runs.py), so zero-shot and fine-tuned masks differ. Random weights:
masks are meaningless, but they must equal the batch predictor's and land in the labels file.
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from shared.cache_io import commit_fragment, manifest_table, ok_rows, open_cache
from stage1_embed.config import EmbedConfig
from stage1_embed.pipeline import run_embed
from stage2_decoder.cli import app as cli_app
from stage2_decoder.export import load_models
from stage2_decoder.interactive import Labeller
from stage2_decoder.labels_store import LabelsFileError, LabelsStore
from stage2_decoder.predict import predict_image
from stage2_decoder.prompt_files import Prompt
from stage2_decoder.serve import ServeConfig, build_app
from tests.decoder_runs import make_run
from tests.test_predict import build_voc_cache

with warnings.catch_warnings():  # starlette >= 1.x suggests httpx2; httpx works the same
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx`:DeprecationWarning")
BOX = [60.0, 40.0, 300.0, 260.0]  # inside 000032 (500×281)


@pytest.fixture(scope="module")
def voc_cache(tmp_path_factory, voc_sample_dir, tiny_checkpoint) -> Path:
    cache = build_voc_cache(tmp_path_factory.mktemp("serve") / "cache.zarr", voc_sample_dir,
                            tiny_checkpoint)  # fmt: skip
    row = ok_rows(open_cache(cache).location).to_pylist()[0]
    failed = {**row, "image_id": "broken", "row": -1, "status": "failed",
              "error": "cannot identify image file", "objects": [], "n_objects": 0}  # fmt: skip
    commit_fragment(open_cache(cache).location, manifest_table([failed]))
    return cache


@pytest.fixture(scope="module")
def run_dir(voc_cache, tiny_checkpoint, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    make_run(run, voc_cache, tiny_checkpoint)
    return run


@pytest.fixture()
def client(voc_cache, run_dir, tmp_path):
    config = ServeConfig(cache=str(voc_cache), run=str(run_dir), labels=str(tmp_path / "l.json"))
    with TestClient(build_app(config)) as test_client:
        yield test_client


def test_images_info_and_files(client):
    info = client.get("/api/info").json()
    assert info["decoders"] == ["zero_shot", "fine_tuned"]
    assert "person" in [c["name"] for c in info["categories"]]  # classes from the cache
    images = {im["image_id"]: im for im in client.get("/api/images").json()["images"]}
    assert len(images) == 6
    assert images["000032"]["split"] and images["000032"]["n_objects"] == 4
    assert images["broken"]["status"] == "failed"
    assert images["broken"]["error"] == "cannot identify image file"
    page = client.get("/")
    assert page.status_code == 200 and "app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    image = client.get("/api/image", params={"id": "000032"})
    assert image.headers["content-type"] == "image/jpeg" and image.content[:2] == b"\xff\xd8"
    thumb = client.get("/api/thumb", params={"id": "000032"})
    assert thumb.status_code == 200 and len(thumb.content) < len(image.content)
    detail = client.get("/api/detail", params={"id": "000032"}).json()
    assert (detail["width"], detail["height"]) == (500, 281)
    assert len(detail["ground_truth"]) == 4 and all(g["outline"] for g in detail["ground_truth"])


def test_predict_equals_batch_predictor(client, voc_cache, run_dir):
    models = load_models(str(voc_cache), run=str(run_dir))
    labeller = Labeller(models)
    embedding = labeller.load("000032").embedding
    original, input_size = labeller.sizes("000032")
    point = {"image_id": "000032", "points": [[180.0, 150.0]], "labels": [1]}
    answer = client.post("/api/predict", json=point).json()
    assert answer["clicks"] == 1
    for name, result in answer["decoders"].items():
        assert [m["index"] for m in result["masks"]] == [1, 2, 3]  # multimask for one click
        ious = [m["predicted_iou"] for m in result["masks"]]
        assert result["best"] == int(np.argmax(ious))
        expected = predict_image(models.decoders[name], embedding,
                                 [Prompt(np.array([[180.0, 150.0]]), np.array([1]))],
                                 input_size, original)[0]  # fmt: skip
        png = result["masks"][result["best"]]["png"]
        ours = decode_png(png)
        assert ours.shape == (281, 500)
        assert np.array_equal(ours, expected.mask), name
        assert result["masks"][result["best"]]["gt_iou"] is not None
    both = client.post(
        "/api/predict",
        json={"image_id": "000032", "box": BOX, "points": [[100, 100]], "labels": [0]},
    ).json()
    assert [len(r["masks"]) for r in both["decoders"].values()] == [1, 1]
    assert both["clicks"] == 2
    zs, ft = (decode_png(r["masks"][0]["png"]) for r in both["decoders"].values())
    assert not np.array_equal(zs, ft)  # the run's decoder is another one
    one = client.post(
        "/api/predict", json={"image_id": "000032", "box": BOX, "decoders": ["fine_tuned"]}
    ).json()
    assert list(one["decoders"]) == ["fine_tuned"]


def decode_png(data: str) -> np.ndarray:
    import base64

    import cv2

    image = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_GRAYSCALE)
    return image > 127


def accept(client, image_id="000032", category="person", **prompt):
    body = {"image_id": image_id, "box": BOX, "decoder": "fine_tuned", "mask": 0,
            "category": category, **prompt}  # fmt: skip
    return client.post("/api/objects", json=body)


def test_accept_delete_and_labels_file(client, tmp_path):
    first = accept(client)
    assert first.status_code == 200, first.text
    second = accept(client, category="a new class", box=[10.0, 10.0, 200.0, 200.0])
    objects = second.json()["objects"]
    assert [o["category"] for o in objects] == ["person", "a new class"]
    document = json.loads((tmp_path / "l.json").read_text())
    assert [i["file_name"] for i in document["images"]] == ["000032.jpg"]
    assert (document["images"][0]["height"], document["images"][0]["width"]) == (281, 500)
    ann = document["annotations"][0]
    mask = mask_utils.decode({"size": ann["segmentation"]["size"],
                              "counts": ann["segmentation"]["counts"].encode()})  # fmt: skip
    assert mask.sum() == ann["area"] > 0
    predicted = client.post(
        "/api/predict", json={"image_id": "000032", "box": BOX, "decoders": ["fine_tuned"]}
    ).json()
    assert np.array_equal(mask.astype(bool), decode_png(predicted["decoders"]["fine_tuned"]
                                                        ["masks"][0]["png"]))  # fmt: skip
    images = {im["image_id"]: im for im in client.get("/api/images").json()["images"]}
    assert images["000032"]["labelled"] == 2
    gone = client.delete("/api/objects", params={"id": "000032", "object": ann["id"]})
    assert [o["category"] for o in gone.json()["objects"]] == ["a new class"]
    again = client.delete("/api/objects", params={"id": "000032", "object": ann["id"]})
    assert again.status_code == 404 and "no object" in again.json()["error"]
    assert len(json.loads((tmp_path / "l.json").read_text())["annotations"]) == 1


def test_concurrent_accepts_lose_nothing(client, tmp_path):
    answers: list[int] = []

    def worker(k: int) -> None:
        answers.append(accept(client, box=[10.0 + k, 10.0, 200.0 + k, 200.0]).status_code)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == [200] * 6
    document = json.loads((tmp_path / "l.json").read_text())
    assert len(document["annotations"]) == 6
    assert len({a["id"] for a in document["annotations"]}) == 6


def test_label_next_ranks_unlabelled(client):
    first = client.get("/api/next", params={"limit": 10}).json()
    ids = [im["image_id"] for im in first["images"]]
    assert sorted(ids) == ["000032", "000033", "000039", "000068", "009436"]  # not "broken"
    scores = [im["uncertainty"] for im in first["images"]]
    assert scores == sorted(scores, reverse=True) and all(s >= 0 for s in scores)
    accept(client, image_id=ids[0], box=[5.0, 5.0, 100.0, 100.0])
    after = client.get("/api/next").json()
    assert ids[0] not in [im["image_id"] for im in after["images"]]
    assert after["unlabelled"] == 4


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "words"),
    [
        ("get", "/api/detail", {"params": {"id": "../x"}}, 400, "looks like a path"),
        ("get", "/api/image", {"params": {"id": "/etc/passwd"}}, 400, "looks like a path"),
        ("get", "/api/image", {"params": {"id": "nope"}}, 404, "unknown image id"),
        ("get", "/api/image", {}, 400, "give the image id"),
        ("get", "/api/detail", {"params": {"id": "broken"}}, 409, "cannot identify"),
        ("post", "/api/predict", {"content": b"{not json"}, 400, "not valid JSON"),
        ("post", "/api/predict", {"json": [1, 2]}, 400, "JSON object"),
        ("post", "/api/predict", {"json": {"image_id": "000032"}}, 400, "at least one point"),
        (
            "post",
            "/api/predict",
            {"json": {"image_id": "000032", "points": [[501, 10]]}},
            400,
            "outside",
        ),
        (
            "post",
            "/api/predict",
            {"json": {"image_id": "000032", "points": [[-1, 10]]}},
            400,
            "outside",
        ),
        (
            "post",
            "/api/predict",
            {"json": {"image_id": "000032", "box": [0, 0, 10, 300]}},
            400,
            "outside",
        ),
        (
            "post",
            "/api/predict",
            {"json": {"image_id": "000032", "points": [["a", 1]]}},
            400,
            "finite number",
        ),
        (
            "post",
            "/api/predict",
            {"json": {"image_id": "000032", "points": [[1, 1]], "labels": [7]}},
            400,
            "0 or 1",
        ),
        (
            "post",
            "/api/predict",
            {"json": {"image_id": "000032", "points": [[1, 1]], "decoders": ["x"]}},
            400,
            "decoders",
        ),
        (
            "post",
            "/api/objects",
            {"json": {"image_id": "000032", "box": BOX, "mask": 5, "category": "c"}},
            400,
            "mask must be",
        ),
        ("post", "/api/objects", {"json": {"image_id": "000032", "box": BOX}}, 400, "class"),
        ("delete", "/api/objects", {"params": {"id": "000032", "object": "x"}}, 400, "integer"),
        ("post", "/api/categories", {"json": {"name": ""}}, 400, "1 to 100"),
        ("get", "/api/next", {"params": {"limit": "many"}}, 400, "integer"),
        ("get", "/no/such/page", {}, 404, "no such page"),
    ],
)
def test_bad_input_gets_a_clear_4xx(client, method, path, kwargs, status, words):
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert client.get("/api/info").status_code == 200  # still serving


def test_labels_file_that_is_not_coco_is_refused(voc_cache, tmp_path):
    bad = tmp_path / "bad.json"
    for text in ("[1, 2]", "{not json", json.dumps({"images": []})):
        bad.write_text(text)
        with pytest.raises(LabelsFileError, match="not a COCO instances JSON"):
            LabelsStore(bad)
    result = CliRunner().invoke(cli_app, ["serve", "--cache", str(voc_cache), "--labels",
                                          str(bad), "--port", "0"])  # fmt: skip
    assert result.exit_code == 2
    assert "not a COCO instances JSON" in result.output and "Traceback" not in result.output


def test_labels_keep_other_keys_and_grow(tmp_path):
    path = tmp_path / "labels.json"
    document = {"info": {"x": 1}, "licenses": [{"id": 1}], "images": [
        {"id": 7, "file_name": "a.jpg", "height": 4, "width": 5}],
        "annotations": [], "categories": [{"id": 3, "name": "cat"}]}  # fmt: skip
    path.write_text(json.dumps(document))
    store = LabelsStore(path, ["dog"])
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True
    added = store.add_object("a.jpg", (4, 5), mask, "cat")
    store.add_object("b.png", (4, 5), mask, "dog")
    saved = json.loads(path.read_text())
    assert saved["info"] == {"x": 1} and saved["licenses"] == [{"id": 1}]
    assert added["image_id"] == 7 and added["category_id"] == 3 and added["bbox"] == [2, 1, 2, 2]
    assert [i["id"] for i in saved["images"]] == [7, 8]
    assert [c["name"] for c in saved["categories"]] == ["cat", "dog"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file
    with pytest.raises(LabelsFileError, match="open in another `decoder serve`"):
        LabelsStore(path)  # a second server on the same file would lose the first one's accepts
    store.close()
    assert len(LabelsStore(path).objects("a.jpg")) == 1


def test_embed_run_reads_the_labels(client, voc_sample_dir, tiny_checkpoint, tmp_path):
    """Labels drawn on the page make a new cache through `embed run --coco` (stage 1)."""
    accept(client, category="person")
    accept(client, image_id="000033", category="dog", box=[20.0, 20.0, 200.0, 200.0])
    labels = json.loads((tmp_path / "l.json").read_text())
    config = EmbedConfig(
        images=str(voc_sample_dir / "JPEGImages"), out=str(tmp_path / "relabelled.zarr"),
        model_type="vit_tiny_random", checkpoint=str(tiny_checkpoint), precision="fp32",
        dtype="float32", download=False, coco=str(tmp_path / "l.json"),
    )  # fmt: skip
    run_embed(config)
    rows = {r["image_id"]: r for r in ok_rows(open_cache(tmp_path / "relabelled.zarr").location)
            .to_pylist()}  # fmt: skip
    assert rows["000032"]["n_objects"] == 1 and rows["000033"]["n_objects"] == 1
    assert rows["000039"]["n_objects"] == 0
    for row, ann in zip((rows["000032"], rows["000033"]), labels["annotations"], strict=True):
        assert row["objects"][0]["rle"] == ann["segmentation"]["counts"]
        assert row["objects"][0]["category"] == ("person" if row is rows["000032"] else "dog")


def test_cached_first_block_equals_forward(voc_cache, run_dir):
    """The per-image cache of the first block changes no number of the decoder's forward."""
    import torch

    from stage2_decoder.interactive import decode_low_res, image_state

    labeller = Labeller(load_models(str(voc_cache), run=str(run_dir)))
    embedding = labeller.load("000033").embedding
    original, _ = labeller.sizes("000033")
    prompts = [
        Prompt(np.array([[100.0, 80.0]]), np.array([1])),
        Prompt(np.array([[100.0, 80.0], [10.0, 10.0]]), np.array([1, 0])),
        Prompt(np.zeros((0, 2)), np.zeros(0, np.int64), np.array([20.0, 30.0, 200.0, 180.0])),
    ]
    with torch.inference_mode():
        for model in labeller.decoders.values():
            state = image_state(model, embedding)
            for prompt in prompts:
                coords, labels = prompt.tokens(original)
                expected, expected_iou = model(
                    embedding, torch.zeros(1, dtype=torch.int64),
                    torch.from_numpy(coords)[None], torch.from_numpy(labels)[None],
                )  # fmt: skip
                logits, iou = decode_low_res(model, state, prompt, original)
                torch.testing.assert_close(logits, expected[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(iou, expected_iou[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("original", [(281, 500), (500, 281), (640, 640), (37, 1000), (1, 3)])
def test_cropped_upsampling_equals_meta_postprocess(original):
    import torch

    from shared.transforms import postprocess_low_res, preprocess_shape
    from stage2_decoder.interactive import upsample_cropped

    low = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 4
    input_size = preprocess_shape(original)
    expected = postprocess_low_res(low, input_size, original)
    assert torch.equal(upsample_cropped(low, input_size, original), expected)
