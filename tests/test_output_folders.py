"""Nothing clobbered, nothing silent: output folders, resume hints, option suggestions and the
cache read before any checkpoint is looked up (the "first hour" issue)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.output_folders import MARKER, OutputFolderError, claim_output_folder
from stage1_embed.cli import app as embed_app
from stage2_decoder.cli import _resume_hint
from stage2_decoder.cli import app as decoder_app
from tests.cache_factory import make_cache

FAST = ["--epochs", "1", "--iterations", "1", "--images-per-step", "2", "--objects-per-image",
        "1", "--num-workers", "0", "--val-fraction", "0.25"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("outdirs") / "cache.zarr"
    return str(make_cache(path, tiny_checkpoint, n_images=4, objects_per_image=1))


def _text(result) -> str:  # noqa: ANN001 - click Result
    return " ".join(result.output.split())


def test_claim_accepts_new_empty_and_own_folders(tmp_path: Path) -> None:
    new = claim_output_folder(tmp_path / "a" / "b", "decoder eval")
    assert json.loads((new / MARKER).read_text()) == {"command": "decoder eval"}
    (new / "metrics.json").write_text("{}")
    assert claim_output_folder(new, "decoder eval") == new  # a rerun overwrites its own files
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_output_folder(empty, "decoder amg") == empty


def test_claim_refuses_foreign_files_and_other_commands(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("users own")
    with pytest.raises(OutputFolderError, match=r"not empty .*config\.json"):
        claim_output_folder(mine, "decoder train")
    assert (mine / "config.json").read_text() == "users own" and not (mine / MARKER).exists()
    report = claim_output_folder(tmp_path / "report", "decoder eval")
    with pytest.raises(OutputFolderError, match="holds the output of `decoder eval`"):
        claim_output_folder(report, "decoder predict")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        claim_output_folder(tmp_path / "file", "decoder amg")


def test_train_refuses_a_folder_with_a_users_config(cache: str, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    result = CliRunner().invoke(decoder_app, ["train", "--cache", cache, "--out", str(out), *FAST])
    assert result.exit_code == 2, result.output
    assert "not empty" in _text(result) and "config.json" in _text(result)
    assert (out / "config.json").read_text() == '{"mine": true}'


@pytest.mark.parametrize("command", ["eval", "predict", "amg"])
def test_after_training_commands_refuse_foreign_folders(
    command: str, cache: str, tmp_path: Path
) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not ours")
    result = CliRunner().invoke(decoder_app, [command, "--cache", cache, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "holiday.jpg" in _text(result) and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def _one_image(folder: Path, voc: Path) -> Path:
    folder.mkdir()
    (folder / "000032.jpg").write_bytes((voc / "JPEGImages" / "000032.jpg").read_bytes())
    return folder


def test_embed_run_refuses_a_non_cache_folder(
    tmp_path: Path, tiny_checkpoint: Path, voc_sample_dir: Path
) -> None:
    images, out = _one_image(tmp_path / "images", voc_sample_dir), tmp_path / "documents"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    result = CliRunner().invoke(embed_app, ["run", "--images", str(images), "--out", str(out),
                                            "--model-type", "vit_tiny_random",
                                            "--checkpoint", str(tiny_checkpoint)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "not a samcache cache" in _text(result) and "thesis.tex" in _text(result)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_embed_run_reads_the_cache_before_looking_for_a_checkpoint(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, voc_sample_dir: Path
) -> None:
    import shared.checkpoint_files as files

    def no_download(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a checkpoint download was attempted")

    monkeypatch.setattr(files, "_download_checkpoint", no_download)
    images = _one_image(tmp_path / "images", voc_sample_dir)
    result = CliRunner().invoke(embed_app, ["run", "--images", str(images), "--out", cache])
    assert result.exit_code == 2, result.output
    text = _text(result)
    assert "vit_tiny_random" in text and "--model-type vit_tiny_random" in text


def test_resume_hint_only_once_a_checkpoint_exists(tmp_path: Path) -> None:
    assert "start the run again" in _resume_hint(str(tmp_path))
    assert "--resume" not in _resume_hint(str(tmp_path))
    (tmp_path / "last.pt").write_bytes(b"x")
    assert "--resume" in _resume_hint(str(tmp_path))


def test_resume_says_where_it_continues(cache: str, tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    first = CliRunner().invoke(decoder_app, ["train", "--cache", cache, "--out", out, *FAST])
    assert first.exit_code == 0, first.output
    extend = ["--epochs", "2"]  # one more epoch: the resumed run has steps left
    again = CliRunner().invoke(
        decoder_app, ["train", "--cache", cache, "--out", out, "--resume", *extend]
    )
    assert again.exit_code == 0, again.output
    assert "resuming from step" in _text(again)


def test_unknown_options_suggest_the_option_meant(cache: str, tmp_path: Path) -> None:
    args = ["train", "--cache", cache, "--out", str(tmp_path / "r"), "--batch-size", "4"]
    result = CliRunner().invoke(decoder_app, args)
    assert result.exit_code == 2
    assert "--images-per-step" in _text(result) and "--cache?" not in _text(result)
    result = CliRunner().invoke(embed_app, ["run", "--images", ".", "--out", "x", "--bs", "2"])
    assert result.exit_code == 2 and "--batch-size" in _text(result)


@pytest.mark.parametrize("module", ["stage1_embed.cli", "stage2_decoder.cli"])
def test_help_needs_no_torch(module: str) -> None:
    """`--help` and refused options answer at once: the CLIs import torch only in commands."""
    import subprocess
    import sys

    heavy = "('torch', 'zarr', 'cv2')"
    code = f"import sys, {module}; print(sorted(m for m in {heavy} if m in sys.modules))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", found.stdout
