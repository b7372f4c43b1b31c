"""Stage 2 never loses what it was given: one writer per run folder, no silent training on a
half-written cache, a full disk ends in one line, orphan temp files are cleaned, and `decoder
export` never replaces an input."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shared.cache_format import LOCK_NAME
from shared.cache_io import open_cache
from shared.output_folders import claim_output_folder
from shared.storage import CacheLock, CacheLockedError, parse_location
from stage2_decoder import checkpoints as ck
from stage2_decoder import train as train_module
from stage2_decoder.cli import app
from tests.cache_factory import make_cache
from tests.decoder_runs import make_run

FAST = ["--epochs", "1", "--iterations", "1", "--images-per-step", "2", "--objects-per-image",
        "1", "--num-workers", "0", "--val-fraction", "0.25", "--log-every", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("safety") / "cache.zarr"
    return str(make_cache(path, tiny_checkpoint, n_images=4, objects_per_image=1))


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error:"), result.output
    return " ".join(result.output[result.output.index("error:") :].split())


def _run_lock(out: Path) -> CacheLock:
    claim_output_folder(out, "decoder train")  # as a running `decoder train` has done
    return CacheLock(parse_location(out), "train.lock")


@pytest.fixture()
def no_fit(monkeypatch) -> list:
    """Replace the training loop (setup_run still runs in full): records, for each call,
    whether the run folder's lock was held while it ran."""
    seen: list = []

    def fit(run, progress, should_stop=None):  # noqa: ANN001, ANN202
        try:
            with _run_lock(run.out):
                seen.append("lock was free")
        except CacheLockedError:
            seen.append("lock held")
        return train_module.Summary(out=str(run.out), steps=0, epochs=0, best_miou=0.0)

    monkeypatch.setattr(train_module, "fit", fit)
    return seen


def test_second_train_and_resume_of_a_running_run_are_refused(cache, tmp_path, no_fit) -> None:
    out = tmp_path / "run"
    with _run_lock(out):  # what a running `decoder train` holds
        text = _one_line_error(_train("--cache", cache, "--out", str(out), *FAST))
        assert "is being written by another `decoder train`" in text
        assert not (out / "config.json").exists()
        text = _one_line_error(_train("--cache", cache, "--out", str(out), "--resume", *FAST))
        assert "then --resume it" in text
    assert no_fit == []
    done = _train("--cache", cache, "--out", str(out), *FAST)
    assert done.exit_code == 0, done.output  # released with its holder
    assert no_fit == ["lock held"]  # held by train for the whole loop


def test_training_on_a_cache_being_written_says_so(cache: str, tmp_path, no_fit) -> None:
    with CacheLock(parse_location(cache), LOCK_NAME):  # an `embed run` at work
        text = _one_line_error(_train("--cache", cache, "--out", str(tmp_path / "a"), *FAST))
        assert "being written by an `embed run`" in text and "4 images are committed" in text
        assert "--allow-partial-cache" in text
        result = _train("--cache", cache, "--out", str(tmp_path / "b"), "--allow-partial-cache",
                        *FAST)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "training on those 4 (--allow-partial-cache)" in " ".join(result.output.split())
    assert no_fit == ["lock held"]


def test_full_disk_ends_in_one_line_naming_the_last_good_checkpoint(
    cache: str, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, handle, *args, **kwargs):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] > 1:  # step 1 wrote last.pt; then the disk is full
            handle.write(b"x" * 1000)  # torch wraps the OSError of a full disk like this:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing "
                f"file data/3: file write failed ({os.strerror(errno.ENOSPC)})"
            )
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    result = _train("--cache", cache, "--out", str(out), "--checkpoint-every", "1", *FAST)
    text = _one_line_error(result)
    assert "file write failed (No space left on device)" in text
    assert f"the last good checkpoint is {out}" in text
    assert "(step 1)" in text and "--resume" in text
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1  # still whole
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_orphan_temp_of_a_killed_checkpoint_write_is_removed(cache, tmp_path, no_fit) -> None:
    out = claim_output_folder(tmp_path / "run", "decoder train")  # a run killed at step 0
    orphan = out / ".last.pt.0123456789ab.tmp"  # what atomic_write leaves after a kill -9
    orphan.write_bytes(b"\0" * 4096)
    keep = out / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    result = _train("--cache", cache, "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert not orphan.exists() and keep.exists()
    assert "removed 1 temp file(s) left by a killed write" in " ".join(result.output.split())


def _export(*args: str):
    return CliRunner().invoke(app, ["export", *args])


def test_export_never_replaces_an_input(tiny_checkpoint, tmp_path) -> None:
    checkpoint = tmp_path / "sam.pth"
    shutil.copy(tiny_checkpoint, checkpoint)
    cache = make_cache(tmp_path / "c.zarr", checkpoint, n_images=2, objects_per_image=1)
    run = tmp_path / "run"
    make_run(run, cache, checkpoint)
    before = {p: p.read_bytes() for p in (run / "best.pt", run / "last.pt", checkpoint)}
    assert Path(open_cache(cache).attrs.checkpoint_path) == checkpoint.resolve()
    for out in (run / "best.pt", run / "last.pt", checkpoint):
        for extra in ([], ["--overwrite"], ["--decoder-only"]):
            result = _export("--run", str(run), "--out", str(out), *extra)
            assert result.exit_code == 2, result.output
            assert "an input of this export" in result.output
    result = _export("--run", str(run), "--out", str(cache / "x.pth"))
    assert result.exit_code == 2 and "inside the cache" in result.output
    assert {p: p.read_bytes() for p in before} == before
    target = tmp_path / "exported.pth"
    assert _export("--run", str(run), "--out", str(target), "--decoder-only").exit_code == 0
    again = _export("--run", str(run), "--out", str(target), "--decoder-only")
    assert again.exit_code == 2 and "pass --overwrite" in again.output
    forced = _export("--run", str(run), "--out", str(target), "--decoder-only", "--overwrite")
    assert forced.exit_code == 0, forced.output


def test_non_finite_loss_names_the_images_of_the_batch(cache: str, tmp_path, monkeypatch) -> None:
    from stage2_decoder import step as step_module
    from stage2_decoder.losses import LossOutput

    def nan_loss(logits, *args, **kwargs) -> LossOutput:  # noqa: ANN001
        nan = logits.sum() * float("nan")
        return LossOutput(nan, nan.reshape(1), torch.zeros(1, dtype=torch.long),
                          {"focal": nan.detach()})  # fmt: skip

    monkeypatch.setattr(step_module, "sam_loss", nan_loss)
    result = _train("--cache", cache, "--out", str(tmp_path / "run"), "--precision", "fp32", *FAST)
    text = _one_line_error(result, code=3)
    assert "loss is nan at step 1 (epoch 1, micro-batch 0, images img" in text, text
    assert "embed verify" in text
