"""`decoder train` through typer's CliRunner: a smoke run, resume warnings and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stage2_decoder.cli import app
from tests.cache_factory import make_cache

FAST = ["--epochs", "1", "--iterations", "1", "--images-per-step", "2", "--objects-per-image",
        "1", "--num-workers", "0", "--val-fraction", "0.25", "--log-every", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cli") / "cache.zarr"
    return str(make_cache(path, tiny_checkpoint, n_images=4, objects_per_image=1))


def _invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:"), text
    return text


def test_help_lists_the_train_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "train" in result.output
    wide = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["train", "--help"])
    assert "--train-prompt-encoder" in wide.output and "--resume" in wide.output


def test_train_smoke_then_resume_keeps_the_checkpoints_options(cache: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _invoke("--cache", cache, "--out", str(out), "--prompts", "box", *FAST)
    assert result.exit_code == 0, result.output
    assert "prompt-iterations/s" in result.output and "embeddings/s read" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["prompts"] == ["box"] and config["iterations"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "val"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    torch.load(out / "best.pt", weights_only=True)

    again = _invoke("--cache", cache, "--out", str(out), "--resume", "--prompts", "point",
                    "--lr", "0.5", "--num-workers", "1")  # fmt: skip
    assert again.exit_code == 0, again.output
    text = " ".join(again.output.split())
    assert "warning:" in text and "--prompts point (checkpoint: box)" in text
    assert "--lr 0.5 (checkpoint: 0.0001)" in text
    assert "--num-workers" not in text and "--epochs" not in text  # operational / not typed
    assert json.loads((out / "config.json").read_text())["num_workers"] == 1


def test_errors_are_one_line(cache: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    text = _one_line_error(_invoke("--cache", cache, "--out", str(tmp_path / "r"), "--prompts",
                                   "mask"))  # fmt: skip
    assert "--prompts: 'mask'" in text
    text = _one_line_error(_invoke("--cache", cache, "--out", str(tmp_path / "r"), "--resume"))
    assert "no checkpoint at" in text and "run without --resume" in text
    no_masks = make_cache(tmp_path / "plain.zarr", tiny_checkpoint, n_images=2, with_masks=False)
    text = _one_line_error(_invoke("--cache", str(no_masks), "--out", str(tmp_path / "r"), *FAST))
    assert "was made without masks: run `embed run --masks/--coco` or use a VOC layout" in text
    text = _one_line_error(_invoke("--cache", str(tmp_path / "none.zarr"), "--out",
                                   str(tmp_path / "r")))  # fmt: skip
    assert "does not exist" in text and "embed run" in text
