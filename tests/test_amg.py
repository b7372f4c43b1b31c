"""`decoder amg` equals Meta's SamAutomaticMaskGenerator (crop_n_layers=0) on a real VOC image.

With random weights every mask is speckle spread over the whole image, so all boxes are the
full image and box NMS at 0.7 keeps exactly one mask; the comparison therefore runs twice: with
NMS (one mask) and with NMS off and the IoU / stability filters and small-region removal active
(many masks). NMS itself is compared with torchvision's semantics on random boxes.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from shared.cache_io import ok_rows, open_cache, read_embeddings
from shared.sam_models import build_sam, import_sam_package
from shared.transforms import postprocess_low_res
from stage1_embed.config import EmbedConfig
from stage1_embed.pipeline import run_embed
from stage2_decoder import amg
from stage2_decoder.amg import (
    AmgConfig,
    batched_nms,
    find_masks,
    generate,
    masks_to_boxes,
    point_grid,
    remove_small_regions,
    resize_matrices,
    stability_score,
)
from stage2_decoder.cli import app
from stage2_decoder.export import load_models
from stage2_decoder.grid_decoder import transform_points
from stage2_decoder.model import LABEL_PAD, LABEL_POS, PromptableDecoder, build_meta_modules
from tests import meta_reference

runner = CliRunner()


def meta_amg_utils():
    import_sam_package()
    return importlib.import_module("segment_anything.utils.amg")


@pytest.fixture(scope="module")
def one_image_cache(tmp_path_factory, voc_sample_dir, tiny_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("amg")
    (root / "images").mkdir()
    shutil.copy(voc_sample_dir / "JPEGImages" / "000032.jpg", root / "images")
    config = EmbedConfig(
        images=str(root / "images"), out=str(root / "cache.zarr"), model_type="vit_tiny_random",
        checkpoint=str(tiny_checkpoint), precision="fp32", dtype="float32", download=False,
    )  # fmt: skip
    assert run_embed(config).encoded == 1
    return root / "cache.zarr"


def test_pieces_equal_meta() -> None:
    utils = meta_amg_utils()
    assert np.array_equal(point_grid(5), utils.build_point_grid(5))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, 50, generator=generator) * 3
    assert torch.allclose(stability_score(logits, 0.0, 1.0),
                          utils.calculate_stability_score(logits, 0.0, 1.0))  # fmt: skip
    masks = logits > 1.5
    masks[2] = False
    assert torch.equal(masks_to_boxes(masks), utils.batched_mask_to_box(masks))
    for mask in (masks[0].numpy(), masks[3].numpy()):
        for mode in ("holes", "islands"):
            ours, changed = remove_small_regions(mask, 8, mode)
            theirs, changed_meta = utils.remove_small_regions(mask, 8, mode)
            assert changed == changed_meta and np.array_equal(ours, theirs)
    xy = torch.randint(0, 60, (300, 2), generator=generator).float()
    boxes = torch.cat([xy, xy + torch.randint(1, 40, (300, 2), generator=generator)], dim=1)
    scores = torch.randint(0, 20, (300,), generator=generator).float()  # many ties
    categories = torch.randint(0, 3, (300,), generator=generator)
    for threshold in (0.3, 0.7):
        expected = meta_reference.batched_nms(boxes, scores, categories, threshold)
        assert torch.equal(batched_nms(boxes, scores, categories, threshold), expected)
    low_res = torch.randn(5, 256, 256, generator=generator) * 4
    for sizes in (((768, 1024), (375, 500)), ((1024, 683), (1500, 1000)), ((64, 1024), (3, 48))):
        rows, columns = resize_matrices(*sizes)
        expected = postprocess_low_res(low_res.unsqueeze(1), *sizes)[:, 0]  # Meta's postprocess
        assert torch.allclose(rows @ low_res @ columns, expected, atol=2e-5)


def test_grid_transformer_equals_the_batched_decoder() -> None:
    """One image, many point prompts: `transform_points` = `transform_tokens` (Meta's maths)."""
    generator = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = PromptableDecoder(*build_meta_modules()).eval()
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    for n_points in (1, 3):  # batch 1: every layer folded; batch 3: the first layer shared
        coords = torch.rand(n_points, 2, 2, generator=generator) * 1024
        labels = torch.tensor([[LABEL_POS, LABEL_PAD]]).expand(n_points, 2)
        sparse = model.embed_points(coords, labels)
        src = model.embed_tokens(embedding, torch.zeros(n_points, dtype=torch.int64), None, None)
        with torch.no_grad():
            tokens, keys = model.transform_tokens(src, sparse)
            ours, our_keys = transform_points(model, embedding, sparse)
            index = torch.zeros(n_points, dtype=torch.int64)
            low_res, iou = model(embedding, index, coords, labels)
        assert torch.allclose(ours, tokens, atol=1e-4) and torch.allclose(our_keys, keys, atol=1e-4)
        assert torch.allclose(model.iou_predictions(ours), iou, atol=1e-5)
        assert torch.allclose(model.mask_logits(ours, our_keys), low_res, atol=1e-3)


def _decode(segmentation: dict) -> np.ndarray:
    counts = segmentation["counts"]
    rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str)
           else counts}  # fmt: skip
    return mask_utils.decode(rle).astype(bool)


def _matched(ours: list[dict], meta: list[dict]) -> None:
    """Same number of masks, each matched one-to-one with IoU >= 0.99 and equal scores."""
    assert len(ours) == len(meta) > 0
    a = np.stack([_decode(r["segmentation"]) for r in ours]).reshape(len(ours), -1)
    b = np.stack([_decode(r["segmentation"]) for r in meta]).reshape(len(meta), -1)
    inter = a.astype(np.float64) @ b.T.astype(np.float64)
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    iou = inter / np.maximum(union, 1)
    partner = iou.argmax(axis=1)
    assert len(set(partner.tolist())) == len(ours)
    assert iou.max(axis=1).min() >= 0.99
    for i, j in enumerate(partner):
        assert ours[i]["predicted_iou"] == pytest.approx(meta[j]["predicted_iou"], abs=1e-4)
        assert ours[i]["stability_score"] == pytest.approx(meta[j]["stability_score"], abs=1e-2)
        assert ours[i]["point_coords"][0] == pytest.approx(meta[j]["point_coords"][0])


def _gap_threshold(values: list[float]) -> float:
    """A threshold in the widest gap among the middle values (robust to float noise)."""
    v = sorted(values)
    lo, hi = len(v) // 4, 3 * len(v) // 4
    i = max(range(lo, hi), key=lambda k: v[k + 1] - v[k])
    return (v[i] + v[i + 1]) / 2


def test_generate_equals_meta_amg(one_image_cache, tiny_checkpoint) -> None:
    cache = open_cache(one_image_cache)
    record = ok_rows(cache.location).to_pylist()[0]
    embedding = torch.from_numpy(read_embeddings(cache.embeddings, [record["row"]]))
    model = load_models(str(one_image_cache)).decoders["zero_shot"]
    sizes = ((record["input_height"], record["input_width"]),
             (record["original_height"], record["original_width"]))  # fmt: skip
    image = np.array(Image.open(record["path"]).convert("RGB"))
    meta = meta_reference.meta_amg_class()
    sam = build_sam("vit_tiny_random", tiny_checkpoint)

    with_nms = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    ours = generate(model, embedding, *sizes, AmgConfig(**with_nms))
    _matched(ours, meta(sam, output_mode="coco_rle", **with_nms).generate(image))

    loose = {**with_nms, "box_nms_thresh": 1.0, "stability_score_offset": 0.05}
    everything = generate(model, embedding, *sizes, AmgConfig(**loose))
    assert len(everything) == 12
    iou_thresh = _gap_threshold([r["predicted_iou"] for r in everything])
    kept = [r["stability_score"] for r in everything if r["predicted_iou"] > iou_thresh]
    filtered = {**loose, "pred_iou_thresh": iou_thresh, "min_mask_region_area": 30}
    filtered["stability_score_thresh"] = _gap_threshold(kept)
    ours = generate(model, embedding, *sizes, AmgConfig(**filtered))
    assert 2 <= len(ours) < len(kept) < 12
    _matched(ours, meta(sam, output_mode="coco_rle", **filtered).generate(image))


def test_nothing_found_says_why(one_image_cache, tmp_path, monkeypatch) -> None:
    """Random weights predict low IoUs: Meta's default thresholds keep nothing, and the command
    says which filter dropped the candidates and what to lower; so does the overlay title."""
    titles = []
    draw = amg.overlay
    monkeypatch.setattr(amg, "overlay", lambda *a: titles.append(a[-1]) or draw(*a))
    args = ["amg", "--cache", str(one_image_cache), "--out", str(tmp_path / "amg"),
            "--points-per-side", "3"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "0 masks for 1 images" in text and "none of 27 candidate masks was kept" in text
    assert "27 predicted IoU <= 0.88 (best 0." in text and "0 stability < 0.95" in text
    assert "lower --pred-iou-thresh" in text and "--stability-score-thresh" in text
    assert titles == ["000032 zero-shot: 0 masks (27/27 pred. IoU <= 0.88, 0 stability < 0.95)"]


def test_progress_and_stats(one_image_cache) -> None:
    cache = open_cache(one_image_cache)
    record = ok_rows(cache.location).to_pylist()[0]
    embedding = torch.from_numpy(read_embeddings(cache.embeddings, [record["row"]]))
    model = load_models(str(one_image_cache)).decoders["zero_shot"]
    sizes = ((record["input_height"], record["input_width"]),
             (record["original_height"], record["original_width"]))  # fmt: skip
    loose = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
             "stability_score_offset": 0.05, "box_nms_thresh": 1.0}  # fmt: skip
    stabilities = [r["stability_score"] for r in generate(model, embedding, *sizes,
                                                          AmgConfig(**loose))]  # fmt: skip
    threshold = _gap_threshold(stabilities)
    done = []
    config = AmgConfig(**{**loose, "stability_score_thresh": threshold, "points_per_batch": 3})
    found, stats = find_masks(model, embedding, *sizes, config, done.append)
    assert done == [3, 4]
    unstable = sum(s < threshold for s in stabilities)
    assert (stats.candidates, stats.low_iou, stats.unstable) == (12, 0, unstable)
    assert stats.kept == len(found) == 12 - unstable and stats.duplicates == 0
    assert stats.best_stability == pytest.approx(max(stabilities))


def test_amg_cli(one_image_cache, tmp_path) -> None:
    out = tmp_path / "amg"
    args = ["amg", "--cache", str(one_image_cache), "--out", str(out), "--points-per-side", "2",
            "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    entries = json.loads((out / "amg_zero_shot.json").read_text())
    assert len(entries) == 1 and entries[0]["image_id"] == 32  # integer, as COCO tools expect
    assert set(entries[0]) >= {"segmentation", "bbox", "area", "score", "stability_score"}
    assert Image.open(out / "overlays" / "000032.png").size[0] == 500
    result = runner.invoke(app, [*args, "--crop-n-layers", "1"])
    assert result.exit_code == 2 and "crops need embeddings of image crops" in result.output
    result = runner.invoke(app, [*args, "--images", "000099"])
    assert result.exit_code == 2 and "'000099'" in result.output and "000032" in result.output
