"""`decoder export`: full SAM checkpoints load strictly into Meta's models and predict as samcache
does; decoder-only files; ONNX with Meta's interface, matching torch and Meta's SamOnnxModel."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from shared.cache_io import ok_rows, open_cache
from shared.sam_models import build_sam, import_sam_package, load_state_dict
from stage2_decoder.cli import app
from stage2_decoder.export import ONNX_INPUTS, check_onnx, decoder_from_state, load_run_state
from tests.cache_factory import make_cache
from tests.decoder_runs import make_run
from tests.meta_reference import meta_predictor_class, meta_sam_model_registry
from tests.test_predict import build_voc_cache, iou, read_mask

runner = CliRunner()


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory, voc_sample_dir, tiny_checkpoint) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    cache = build_voc_cache(root / "cache.zarr", voc_sample_dir, tiny_checkpoint)
    make_run(root / "run", cache, tiny_checkpoint)
    return cache, root / "run"


def export(*args: str):
    return runner.invoke(app, ["export", *args])


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_full_checkpoint_predicts_like_samcache(voc_run, tiny_checkpoint, tmp_path) -> None:
    cache, run = voc_run
    out = tmp_path / "sam_tiny_voc.pth"
    result = export("--run", str(run), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert no_temp_files(tmp_path)
    exported, original = load_state_dict(out), load_state_dict(tiny_checkpoint)
    assert list(exported) == list(original)
    tuned = load_run_state(run)["model"]
    for key, value in exported.items():
        source = tuned[key] if key in tuned else original[key]
        assert torch.equal(value, source), key
    assert not torch.equal(exported["mask_decoder.iou_token.weight"],
                           original["mask_decoder.iou_token.weight"])  # fmt: skip
    sam = build_sam("vit_tiny_random", out)  # Meta's Sam class, load_state_dict(strict=True)
    predictor = meta_predictor_class()(sam)
    preds = tmp_path / "preds"
    result = runner.invoke(app, ["predict", "--cache", str(cache), "--run", str(run),
                                 "--images", "000032", "--out", str(preds)])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = next(r for r in ok_rows(open_cache(cache).location).to_pylist()
                  if r["image_id"] == "000032")  # fmt: skip
    predictor.set_image(np.array(Image.open(record["path"]).convert("RGB")))
    for k, obj in enumerate(record["objects"]):
        x, y, w, h = obj["bbox"]
        masks, _, _ = predictor.predict(box=np.array([x, y, x + w, y + h]), multimask_output=False)
        ours = read_mask(preds / "masks" / "fine_tuned" / "000032" / f"{k:03d}.png")
        assert iou(ours, masks[0]) >= 0.99, k


def test_decoder_only(voc_run, tmp_path) -> None:
    _, run = voc_run
    out = tmp_path / "decoder.pth"
    result = export("--run", str(run), "--out", str(out), "--decoder-only", "--which", "last")
    assert result.exit_code == 0, result.output
    tensors = torch.load(out, weights_only=True)
    tuned = load_run_state(run, "last")["model"]
    expected = {k: v for k, v in tuned.items() if k.startswith("mask_decoder.")}
    assert list(tensors) == list(expected) and len(tensors) > 10
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    state = torch.load(run / "best.pt", weights_only=True)
    state["config"]["train_prompt_encoder"] = True
    torch.save(state, tmp_path / "best.pt")
    (tmp_path / "run2").mkdir()
    (tmp_path / "best.pt").rename(tmp_path / "run2" / "best.pt")
    other = tmp_path / "decoder2.pth"  # `out` exists: it would need --overwrite
    result = export("--run", str(tmp_path / "run2"), "--out", str(other), "--decoder-only")
    assert result.exit_code == 2 and "also trained the prompt encoder" in result.output


def test_onnx_matches_torch_and_meta(voc_run, tiny_checkpoint, tmp_path) -> None:
    _, run = voc_run
    out = tmp_path / "decoder.onnx"
    result = export("--run", str(run), "--out", str(out), "--onnx", "--return-single-mask")
    assert result.exit_code == 0, result.output
    assert "onnxruntime matches torch" in result.output and no_temp_files(tmp_path)
    model = decoder_from_state(load_run_state(run))
    assert check_onnx(model, out, return_single_mask=True, seed=5) < 1e-3
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(ONNX_INPUTS)
    # Meta's own SamOnnxModel on a Sam holding the same decoder gives the same outputs.
    import_sam_package()
    onnx_module = importlib.import_module("segment_anything.utils.onnx")
    sam = build_sam("vit_tiny_random", tiny_checkpoint)  # Meta's Sam; only its decoder is used
    sam.prompt_encoder.load_state_dict(model.prompt_encoder.state_dict())
    sam.mask_decoder.load_state_dict(model.mask_decoder.state_dict())
    meta = onnx_module.SamOnnxModel(sam.eval(), return_single_mask=True)
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, 256, 64, 64, generator=generator),
        torch.tensor([[[400.0, 300.0], [0.0, 0.0]]]),
        torch.tensor([[1.0, -1.0]]),
        torch.randn(1, 1, 256, 256, generator=generator),
        torch.tensor([1.0]),
        torch.tensor([480.0, 321.0]),  # not the export's example size: the crop is dynamic
    )
    got = session.run(None, {k: v.numpy() for k, v in zip(ONNX_INPUTS, inputs, strict=True)})
    expected = meta(*inputs)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == tuple(b.shape)
        assert np.abs(a - b.numpy()).max() < 1e-3


@pytest.mark.slow
def test_vit_b_loads_into_meta_registry(tmp_path, vit_b_checkpoint) -> None:
    cache = make_cache(tmp_path / "c.zarr", vit_b_checkpoint, n_images=1, model_type="vit_b")
    make_run(tmp_path / "run", cache, vit_b_checkpoint)
    out = tmp_path / "sam_vit_b_voc.pth"
    result = export("--run", str(tmp_path / "run"), "--out", str(out))
    assert result.exit_code == 0, result.output
    sam = meta_sam_model_registry()["vit_b"](checkpoint=str(out))  # strict=True inside
    tuned = load_run_state(tmp_path / "run")["model"]
    assert torch.equal(sam.mask_decoder.iou_token.weight, tuned["mask_decoder.iou_token.weight"])


def test_errors(voc_run, tmp_path) -> None:
    _, run = voc_run
    (tmp_path / "empty").mkdir()
    for args, needle in [
        (["--run", str(tmp_path / "empty"), "--out", str(tmp_path / "x.pth")], "holds no best.pt"),
        (["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x.pth")], "does not exist"),
        (["--run", str(run), "--out", str(tmp_path / "x"), "--onnx", "--decoder-only"],
         "exclude each other"),
    ]:  # fmt: skip
        result = export(*args)
        assert result.exit_code == 2 and needle in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    config = json.loads((run / "config.json").read_text())
    assert config["cache"]  # the run knows its cache: no --cache / --checkpoint needed above
