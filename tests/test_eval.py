"""`decoder eval`: protocols equal a loop driving Meta's SamPredictor; reports; clear errors.

Synthetic caches (tests/cache_factory.py: small images, ellipse objects, a void ring) keep this
fast; the reference sets SamPredictor's features to the cached embedding, so only the decoder
side and the protocol are compared.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from shared.cache_io import ok_rows, open_cache, read_embeddings
from shared.checkpoint_files import make_random_checkpoint
from shared.sam_models import build_sam
from stage2_decoder.cli import app
from stage2_decoder.dataset import COLUMNS, decode_rle
from stage2_decoder.evaluate import EvalConfig, evaluate_objects, object_boxes_1024
from stage2_decoder.export import load_models
from stage2_decoder.metrics import binary_iou
from stage2_decoder.prompts import center_click, next_click
from tests.cache_factory import make_cache
from tests.decoder_runs import make_run
from tests.meta_reference import meta_predictor_class

runner = CliRunner()
FAST = ["--clicks", "1,2", "--max-clicks", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_checkpoint) -> Path:
    path = tmp_path_factory.mktemp("eval") / "cache.zarr"
    return make_cache(path, tiny_checkpoint, n_images=3, objects_per_image=[1, 2, 1],
                      splits=["train", "val", "val"])  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache, tiny_checkpoint) -> Path:
    path = tmp_path_factory.mktemp("run") / "voc"
    make_run(path, cache, tiny_checkpoint)
    return path


def evaluate(*args: str):
    return runner.invoke(app, ["eval", *args])


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, text


def meta_clicks(predictor, gt: np.ndarray, ignore: np.ndarray, n: int) -> list[float]:
    """The click protocol driven through Meta's SamPredictor.predict, one call per click."""
    x, y = center_click(gt, ignore)
    clicks, clicked = [(x, y, 1)], np.zeros_like(gt)
    clicked[y, x] = True
    ious, previous = [], None
    for k in range(n):
        points = np.array([(cx, cy) for cx, cy, _ in clicks], dtype=np.float64)
        labels = np.array([label for _, _, label in clicks])
        masks, scores, low_res = predictor.predict(
            points, labels, mask_input=previous, multimask_output=k == 0
        )
        best = int(np.argmax(scores)) if k == 0 else 0
        previous = low_res[best][None]
        ious.append(binary_iou(masks[best], gt, ignore))
        x, y, label = next_click(masks[best], gt, ignore, exclude=clicked)
        if label == -1:
            break
        clicks.append((x, y, label))
        clicked[y, x] = True
    return ious


def test_protocols_equal_meta_predictor(cache, tiny_checkpoint) -> None:
    config = EvalConfig(cache=str(cache), out="unused", split="val", clicks=(1, 2),
                        max_clicks=2, images_per_batch=2, objects_per_call=2)  # fmt: skip
    images = ok_rows(open_cache(cache).location, COLUMNS)
    images = images.filter(pa.array([s == "val" for s in images.column("split").to_pylist()]))
    model = load_models(str(cache)).decoders["zero_shot"]
    results, skipped = evaluate_objects({"zero_shot": model}, str(cache), images, config,
                                        torch.device("cpu"))  # fmt: skip
    assert skipped == 0 and len(results) == 3
    predictor = meta_predictor_class()(build_sam("vit_tiny_random", tiny_checkpoint))
    embeddings = read_embeddings(open_cache(cache).embeddings, images.column("row").to_pylist())
    by_object = {(r.image_id, r.index): r for r in results}
    for record, embedding in zip(images.to_pylist(), embeddings, strict=True):
        h, w = record["original_height"], record["original_width"]
        predictor.features = torch.from_numpy(embedding).float()[None]
        predictor.original_size, predictor.is_image_set = (h, w), True
        predictor.input_size = (record["input_height"], record["input_width"])
        ignore = decode_rle(record["ignore_rle"], h, w)
        for k, obj in enumerate(record["objects"]):
            gt = decode_rle(obj["rle"], h, w)
            result = by_object[(record["image_id"], k)]
            expected = meta_clicks(predictor, gt, ignore, 2)
            assert result.click_ious["zero_shot"] == pytest.approx(expected, abs=1e-3)
            x, y, bw, bh = obj["bbox"]
            masks, _, _ = predictor.predict(box=np.array([x, y, x + bw, y + bh]),
                                            multimask_output=False)  # fmt: skip
            assert result.box_iou["zero_shot"] == pytest.approx(
                binary_iou(masks[0], gt, ignore), abs=1e-3
            )


def test_eval_cli_both_models_and_reports(cache, run, tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "report"
    result = evaluate("--cache", str(cache), "--run", str(run), "--split", "val", "--out",
                      str(out), *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "zero-shot" in result.output and "fine-tuned" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    zero, tuned = metrics["models"]["zero_shot"], metrics["models"]["fine_tuned"]
    assert metrics["n_objects"] == 3 and metrics["n_skipped"] == 0
    for key in ("box_miou", "miou@1", "miou@2", "noc@85", "noc@90", "nof@90"):
        assert metrics["difference"][key] == pytest.approx(tuned[key] - zero[key])
    assert zero["box_miou"] != tuned["box_miou"]  # two different decoders were evaluated
    assert len(zero["miou_curve"]) == 2 and zero["miou_curve"][0] == zero["miou@1"]
    rows = list(csv.DictReader((out / "objects.csv").open()))
    assert len(rows) == 3 and {r["image_id"] for r in rows} == {"img0001", "img0002"}
    assert np.mean([float(r["fine_tuned_iou@2"]) for r in rows]) == pytest.approx(tuned["miou@2"])
    table = (out / "report.md").read_text()
    assert "| box mIoU |" in table and "difference" in table
    assert (out / "miou_vs_clicks.png").stat().st_size > 1000
    assert "miou_vs_clicks.png" in result.output
    # zero-shot alone (from the checkpoint) gives the same numbers: same objects, deterministic
    alone = tmp_path / "zero"
    result = evaluate("--cache", str(cache), "--checkpoint", str(tiny_checkpoint), "--split",
                      "val", "--out", str(alone), *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    again = json.loads((alone / "metrics.json").read_text())
    assert list(again["models"]) == ["zero_shot"] and again["difference"] == {}
    for key in ("box_miou", "miou@1", "miou@2", "noc@85"):
        assert again["models"]["zero_shot"][key] == zero[key]


def test_box_jitter_is_seeded(cache) -> None:
    images = ok_rows(open_cache(cache).location, COLUMNS)
    exact = object_boxes_1024(images, 0.0, 0)
    same = object_boxes_1024(images, 0.1, 3)
    assert torch.equal(same, object_boxes_1024(images, 0.1, 3))
    assert not torch.equal(same, object_boxes_1024(images, 0.1, 4))
    sides = (exact[:, 2:] - exact[:, :2]).repeat(1, 2)
    moved = (same - exact).abs()
    assert (moved > 0).any() and (moved <= torch.clamp(0.1 * sides, max=20.0) + 1e-4).all()


def test_split_from_the_run_when_the_manifest_has_none(tmp_path, tiny_checkpoint) -> None:
    cache = make_cache(tmp_path / "c.zarr", tiny_checkpoint, n_images=3, objects_per_image=1)
    result = evaluate("--cache", str(cache), "--out", str(tmp_path / "r"), *FAST)
    one_line_error(result, "--split val", "names no val images", "--split all")
    run = tmp_path / "run"
    make_run(run, cache, tiny_checkpoint)
    result = evaluate("--cache", str(cache), "--run", str(run), "--out", str(tmp_path / "r"),
                      "--protocols", "box")  # fmt: skip
    assert result.exit_code == 0, result.output
    # the box protocol draws no click curve: the summary line lists only the files written
    assert "report.md" in result.output and "miou_vs_clicks" not in result.output
    written = (tmp_path / "r").iterdir()
    assert sorted(p.name for p in written if not p.name.startswith(".")) == [
        "metrics.json",
        "objects.csv",
        "report.md",
    ]
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["n_objects"] == 1 and "the run's val images" in metrics["selection"]
    assert "miou@1" not in metrics["models"]["fine_tuned"]


def test_errors_are_one_line(cache, run, tmp_path, tiny_checkpoint) -> None:
    out = str(tmp_path / "r")
    no_masks = make_cache(tmp_path / "plain.zarr", tiny_checkpoint, n_images=2, with_masks=False)
    one_line_error(evaluate("--cache", str(no_masks), "--out", out), "without masks", "--masks")
    one_line_error(evaluate("--cache", str(cache), "--split", "test", "--out", out),
                   "names no test images", "train, val")  # fmt: skip
    empty = make_cache(tmp_path / "e.zarr", tiny_checkpoint, n_images=2, objects_per_image=[1, 0],
                       splits=["train", "val"])  # fmt: skip
    one_line_error(evaluate("--cache", str(empty), "--out", out), "has no objects")
    (tmp_path / "norun").mkdir()
    one_line_error(evaluate("--cache", str(cache), "--run", str(tmp_path / "norun"), "--out", out),
                   "holds no best.pt", "decoder train")  # fmt: skip
    other = make_random_checkpoint("vit_tiny_random", tmp_path / "other.pth", seed=1)
    one_line_error(evaluate("--cache", str(cache), "--checkpoint", str(other), "--out", out),
                   "was made with vit_tiny_random", "other.pth")  # fmt: skip
    one_line_error(evaluate("--cache", str(cache), "--out", out, "--clicks", "1,30"),
                   "--max-clicks 20")  # fmt: skip
    last_only = tmp_path / "last"
    make_run(last_only, cache, tiny_checkpoint, which=("last.pt",))
    one_line_error(evaluate("--cache", str(cache), "--run", str(last_only), "--out", out),
                   "--which last")  # fmt: skip
    foreign = make_cache(tmp_path / "f.zarr", other, n_images=2, splits=["train", "val"])
    one_line_error(evaluate("--cache", str(foreign), "--run", str(run), "--out", out),
                   "was made with", "the run's")  # fmt: skip
