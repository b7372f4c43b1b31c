"""Exact resume after a real `kill -9` of `python -m stage2_decoder.cli train`.

A run of `decoder train` is started in a subprocess with --checkpoint-every 1, killed with
SIGKILL once last.pt holds step >= 2, resumed with --resume, and its final weights compared
with those of a run that was never interrupted (torch.equal, CPU).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stage2_decoder.checkpoints import read_metrics
from tests.cache_factory import make_cache

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "--epochs", "2", "--iterations", "2", "--images-per-step", "2", "--objects-per-image", "1",
    "--num-workers", "0", "--precision", "fp32", "--val-fraction", "0.2", "--log-every", "1",
    "--prompts", "point,box", "--seed", "5",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("resume") / "cache.zarr"
    return str(make_cache(path, tiny_checkpoint, n_images=6, objects_per_image=2))


def _command(cache: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stage2_decoder.cli", "train", "--cache", cache,
            "--out", str(out), *ARGS, *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "COLUMNS": "200"}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _step_of(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:  # not there yet
        return -1


def _kill_after_step(command: list[str], last: Path, step: int, timeout: float = 240.0) -> int:
    """Start ``command``, SIGKILL it once ``last`` holds ``step`` or more; return that step."""
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline, seen, mtime = time.monotonic() + timeout, -1, 0.0
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if last.exists() and last.stat().st_mtime != mtime:
                mtime = last.stat().st_mtime
                seen = _step_of(last)
                if seen >= step:
                    break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"not killed ({process.returncode})"
    return seen


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow  # three `decoder train` processes (110 s on 2 busy cores, load average 5)
def test_kill_9_then_resume_equals_an_uninterrupted_run(cache: str, tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run(_command(cache, whole))
    killed_at = _kill_after_step(_command(cache, broken, "--checkpoint-every", "1"),
                                 broken / "last.pt", step=2)  # fmt: skip
    assert killed_at >= 2
    total = torch.load(whole / "last.pt", weights_only=True)["step"]
    assert killed_at < total, "the run finished before it could be killed; grow the test run"
    resumed = _run(_command(cache, broken, "--resume"))
    assert "warning" not in resumed.stderr.lower()
    a, b = _weights(whole / "last.pt"), _weights(broken / "last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    best_a, best_b = _weights(whole / "best.pt"), _weights(broken / "best.pt")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    # metrics.jsonl: no duplicated lines, the same losses step by step.
    lines = [(r["kind"], r["step"]) for r in read_metrics(broken / "metrics.jsonl")]
    assert len(lines) == len(set(lines))
    losses = {
        folder: [(r["step"], r["loss"]) for r in read_metrics(folder / "metrics.jsonl")
                 if r["kind"] == "train"]
        for folder in (whole, broken)
    }  # fmt: skip
    assert losses[whole] == losses[broken]
