"""The `embed` CLI through typer's CliRunner, and resume after a real `kill -9`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shared.cache_io import open_cache, read_manifest, read_manifest_all
from shared.checkpoint_files import make_random_checkpoint
from shared.storage import parse_location
from stage1_embed.cli import app
from stage1_embed.synthetic import make_synthetic_voc

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_run_status_and_exit_codes(tmp_path, voc_sample_dir, tiny_checkpoint) -> None:
    out = tmp_path / "c.zarr"
    base = [
        "run",
        "--images",
        str(voc_sample_dir / "JPEGImages"),
        "--out",
        str(out),
        "--model-type",
        "vit_tiny_random",
        "--checkpoint",
        str(tiny_checkpoint),
    ]
    result = _run(*base)
    assert result.exit_code == 0, result.output
    assert "5 encoded, 0 failed" in result.output
    result = _run(*base)
    assert result.exit_code == 0 and "nothing to encode: model not loaded" in result.output
    status = _run("status", str(out))
    assert status.exit_code == 0, status.output
    assert "5 ok, 0 failed" in status.output and "vit_tiny_random" in status.output
    assert "per ok image" in status.output


def test_failures_give_exit_code_1(tmp_path, voc_sample_dir, tiny_checkpoint) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.jpg").write_bytes((voc_sample_dir / "JPEGImages" / "000032.jpg").read_bytes())
    (images / "broken.jpg").write_bytes(b"")
    result = _run(
        "run",
        "--images",
        str(images),
        "--out",
        str(tmp_path / "c.zarr"),
        "--model-type",
        "vit_tiny_random",
        "--checkpoint",
        str(tiny_checkpoint),
    )
    assert result.exit_code == 1, result.output
    assert "failed broken" in result.output and "1 failed" in result.output


@pytest.mark.parametrize(
    "case", ["missing_images", "unwritable_out", "wrong_model_type", "bad_option"]
)
def test_user_errors_are_one_line(case, tmp_path, voc_sample_dir, tiny_checkpoint) -> None:
    images, out = str(voc_sample_dir / "JPEGImages"), str(tmp_path / "c.zarr")
    model, ckpt = "vit_tiny_random", str(tiny_checkpoint)
    if case == "missing_images":
        images = str(tmp_path / "nope")
    elif case == "unwritable_out":
        (tmp_path / "file").write_text("x")
        out = str(tmp_path / "file" / "c.zarr")  # under a regular file: cannot be created
    elif case == "wrong_model_type":
        model = "vit_b"
    args = ["run", "--images", images, "--out", out, "--model-type", model, "--checkpoint", ckpt]
    if case == "bad_option":
        args += ["--precision", "fp8"]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(error_lines) <= 3 and "error" in result.output.lower(), result.output


def test_resume_after_kill_9(tmp_path) -> None:
    """Kill a real `embed run` mid-way; the rerun completes with every image encoded once."""
    voc = make_synthetic_voc(tmp_path / "data", n_images=14, seed=5)
    checkpoint = make_random_checkpoint("vit_tiny_random", tmp_path / "tiny.pth", seed=0)
    out = tmp_path / "c.zarr"
    args = [
        sys.executable,
        "-m",
        "stage1_embed.cli",
        "run",
        "--images",
        str(voc / "JPEGImages"),
        "--out",
        str(out),
        "--model-type",
        "vit_tiny_random",
        "--checkpoint",
        str(checkpoint),
        "--precision",
        "fp32",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    manifest = out / "manifest"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.is_dir() and len(list(manifest.glob("part-*.parquet"))) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = read_manifest(parse_location(out)).num_rows
    assert 3 <= done_before < 14, "the kill must land mid-run for this test to mean anything"

    finished = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    location = parse_location(out)
    history = read_manifest_all(location, ["image_id", "status"]).to_pylist()
    ok_counts: dict[str, int] = {}
    for row in history:
        ok_counts[row["image_id"]] = ok_counts.get(row["image_id"], 0) + (row["status"] == "ok")
    assert len(ok_counts) == 14 and set(ok_counts.values()) == {1}  # nothing encoded twice
    assert not list(manifest.glob(".tmp-*"))

    clean = subprocess.run(
        [*args[:7], str(tmp_path / "clean.zarr"), *args[8:]],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert clean.returncode == 0, clean.stderr
    resumed, reference = open_cache(out), open_cache(tmp_path / "clean.zarr")
    rows_r = {r["image_id"]: r["row"] for r in read_manifest(resumed.location).to_pylist()}
    rows_c = {r["image_id"]: r["row"] for r in read_manifest(reference.location).to_pylist()}
    for image_id, row in rows_r.items():
        np.testing.assert_array_equal(
            resumed.embeddings[row], reference.embeddings[rows_c[image_id]]
        )
