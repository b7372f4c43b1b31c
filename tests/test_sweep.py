"""`decoder sweep`: the pure parts (axes, grid, random draws, names, ranking, median rule), the
train hook it uses, and two end-to-end sweeps on a tiny random model under faults:

- a 2×2 sweep on a real cluster of 2 worker processes (its own process group, as in
  test_dask_faults.py) during which the worker training a trial is SIGKILLed just after that
  trial wrote ``last.pt`` at step 1 (a Dask preload holds it there): Dask runs the task again
  and the trial continues from step 1;
- `decoder sweep` as a subprocess, SIGKILLed (client, cluster, workers: the whole process
  group) once a trial is done, then ``--resume``: the done trial is not trained again.

No timing assertions: waits are on files, bounded only to fail instead of hanging.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stage2_decoder import sweep_board as board
from stage2_decoder.config import ConfigError
from stage2_decoder.sweep_config import (
    Axis,
    SweepConfig,
    Trial,
    draw,
    expand,
    merge_resumed,
    parse_axis,
    short_number,
    trial_name,
)
from tests.cache_factory import make_cache

REPO = Path(__file__).resolve().parents[1]
WAIT = 300.0  # seconds; only guards against a hang

# --------------------------------------------------------------------------- pure parts


def test_parse_axis_lists_ranges_and_prompt_lists() -> None:
    assert parse_axis("lr", "1e-5, 3e-5,1e-4") == Axis("lr", (1e-5, 3e-5, 1e-4))
    assert parse_axis("iterations", "1,11") == Axis("iterations", (1, 11))
    assert parse_axis("lr", "1e-5:1e-3") == Axis("lr", low=1e-5, high=1e-3)
    prompts = parse_axis("prompts", "point;box;box,point")
    assert prompts.values == ("point", "box", "point,box") and prompts.describe() == (
        "point;box;point,box"
    )
    assert parse_axis("loss", "focal_dice,bce_dice").values == ("focal_dice", "bce_dice")
    for name, text, words in [
        ("lr", "-1", "--lr"),
        ("lr", "fast", "'fast' is not a number"),
        ("iterations", "1.5", "not an integer"),
        ("lr", "1e-3:1e-5", "low < high"),
        ("prompts", "point;mask", "'mask'"),
        ("loss", "l2", "--loss 'l2'"),
        ("epochs", "1,2", "cannot be swept"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_axis(name, text)


def _config(**kw) -> SweepConfig:
    return SweepConfig(cache="c.zarr", out="sweeps/x", **kw)


def test_grid_expands_every_combination_with_names() -> None:
    config = _config(axes=(parse_axis("iterations", "1,11"), parse_axis("lr", "1e-4,3e-5"),
                           parse_axis("loss", "bce_dice")))  # fmt: skip
    trials = expand(config)
    assert [t.name for t in trials] == ["t000-lr1e-4-it1", "t001-lr1e-4-it11",
                                        "t002-lr3e-5-it1", "t003-lr3e-5-it11"]  # fmt: skip
    assert trials[3].options == {"lr": 3e-5, "iterations": 11, "loss": "bce_dice"}
    assert config.train_config("r", trials[3].options).loss == "bce_dice"
    assert config.train_config("r").num_workers == 0  # a trial runs inside one worker
    with pytest.raises(ConfigError, match="--random N"):
        _config(axes=(parse_axis("lr", "1e-5:1e-3"),))


def test_trial_names_and_short_numbers() -> None:
    assert [short_number(v) for v in (1e-4, 3.5e-5, 0.01, 0.1, 11, 1e-3, 0.0)] == [
        "1e-4", "3.5e-5", "0.01", "0.1", "11", "1e-3", "0"]  # fmt: skip
    options = {"lr": 1e-4, "prompts": "point,box", "weight_decay": 0.01, "loss": "focal_dice"}
    name = trial_name(7, options, ["lr", "prompts", "weight_decay", "loss"])
    assert name == "t007-lr1e-4-point+box-wd0.01-focal_dice"


def test_random_draws_are_seeded_within_ranges_and_log_uniform() -> None:
    axes = (parse_axis("lr", "1e-5:1e-3"), parse_axis("iterations", "1:3"),
            parse_axis("prompts", "point;box"), parse_axis("weight_decay", "0:0.1"))  # fmt: skip
    config = _config(axes=axes, random=200, seed=3)
    trials = expand(config)
    assert trials == expand(config) and trials != expand(_config(axes=axes, random=200, seed=4))
    lrs = [t.options["lr"] for t in trials]
    assert all(1e-5 <= lr <= 1e-3 for lr in lrs)
    below = sum(lr < 1e-4 for lr in lrs)  # log-uniform: half below the geometric mean
    assert 70 <= below <= 130, below  # fixed seed: a deterministic count, not a chance check
    assert {t.options["iterations"] for t in trials} == {1, 2, 3}
    assert {t.options["prompts"] for t in trials} == {"point", "box"}
    assert all(0 <= t.options["weight_decay"] <= 0.1 for t in trials)
    assert trials[0].name.startswith("t000-lr") and len({t.name for t in trials}) == 200
    import random

    assert draw(Axis("lr", low=1e-5, high=1e-3), random.Random(0)) == draw(
        Axis("lr", low=1e-5, high=1e-3), random.Random(0)
    )


def test_resume_refuses_conflicting_options_and_takes_operational_ones() -> None:
    saved = _config(axes=(parse_axis("lr", "1e-4,3e-4"),), epochs=3, workers=2)
    given = _config(axes=(parse_axis("lr", "1e-5"),), epochs=3, workers=4)
    merged = merge_resumed(saved, given, {"workers", "resume"})
    assert merged.workers == 4 and merged.axes == saved.axes
    with pytest.raises(ConfigError, match=r"--lr 1e-05 \(sweep.json: 0.0001,0.0003\)"):
        merge_resumed(saved, given, {"lr", "workers"})
    with pytest.raises(ConfigError, match=r"--epochs 5 \(sweep.json: 3\)"):
        merge_resumed(saved, _config(epochs=5), {"epochs"})
    assert SweepConfig.from_dict(json.loads(json.dumps(saved.to_dict()))) == saved


def test_median_rule() -> None:
    rule = board.median_rule
    assert rule(2, 0.3, [0.4, 0.5, 0.6], grace=1)  # below the median
    assert not rule(2, 0.5, [0.4, 0.5, 0.6], grace=1)  # at the median: kept
    assert not rule(1, 0.1, [0.4, 0.5], grace=2)  # within the grace epochs
    assert not rule(3, 0.1, [0.4], grace=1)  # too few other trials at that epoch
    assert rule(3, float("nan"), [0.4, 0.5], grace=1)
    curve = {1: 0.2, 2: 0.5, 3: 0.4}
    assert board.best_until(curve, 3) == 0.5 and board.best_until(curve, 1) == 0.2
    assert board.best_until(curve, 4) is None  # not reached: not counted


def _fake_trial(out: Path, trial: Trial, status: str, curve: dict[int, float]) -> None:
    folder = board.trial_folder(out, trial)
    folder.mkdir(parents=True)
    lines = [{"kind": "val", "epoch": e, "step": 2 * e, "miou": v} for e, v in curve.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if status != "pending":
        state = {"status": status, "steps": 2 * max(curve, default=0), "seconds": 1.5}
        (folder / board.TRIAL_JSON).write_text(json.dumps(state))


def test_leaderboard_ranks_and_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    trials = [Trial(i, f"t00{i}", {"lr": lr}) for i, lr in enumerate((1e-4, 3e-4, 1e-3, 3e-3))]
    _fake_trial(out, trials[0], "done", {1: 0.3, 2: 0.5})
    _fake_trial(out, trials[1], "stopped", {1: 0.2})
    _fake_trial(out, trials[2], "running", {1: 0.7})  # higher, but not finished
    _fake_trial(out, trials[3], "pending", {})
    rows = board.write_board(out, trials, ["lr"])
    assert [r.trial.name for r in rows] == ["t002", "t000", "t001", "t003"]
    assert math.isnan(rows[-1].best_miou)
    assert board.best_row(rows).trial.name == "t000"
    assert (rows[1].best_miou, rows[1].best_epoch, rows[1].steps) == (0.5, 2, 4)
    table = list(csv.DictReader((out / board.LEADERBOARD).open()))
    assert [(r["trial"], r["status"], r["best_val_miou"]) for r in table] == [
        ("t002", "running", "0.7000"), ("t000", "done", "0.5000"), ("t001", "stopped", "0.2000"),
        ("t003", "pending", "")]  # fmt: skip
    assert table[1]["run"] == "trials/t000" and table[1]["lr"] == "0.0001"
    report = (out / board.REPORT).read_text()
    assert "Best trial: **t000**" in report and "![val mIoU per epoch](val_miou.png)" in report
    assert (out / board.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.readlink(out / "best") == "trials/t000"  # relative
    assert (out / "best" / "metrics.jsonl").is_file()


def test_best_falls_back_to_a_text_file(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    trial = Trial(0, "t000", {})
    _fake_trial(out, trial, "done", {1: 0.4})
    (out / "best").mkdir()  # not ours to replace
    board.write_board(out, [trial], [])
    assert (out / board.BEST_TXT).read_text() == "trials/t000\n"


# --------------------------------------------------------------------------- tiny runs

TRAIN = dict(iterations=1, images_per_step=2, objects_per_image=1, precision="fp32",
             val_fraction=0.34, log_every=1, checkpoint_every=1)  # fmt: skip


@pytest.fixture(scope="module")
def cache(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """6 images of 1 object: 4 train (2 steps per epoch), 2 val."""
    path = tmp_path_factory.mktemp("sweep") / "cache.zarr"
    return str(make_cache(path, tiny_checkpoint, n_images=6, objects_per_image=1))


def test_train_should_stop_ends_the_run_cleanly(cache: str, tmp_path: Path) -> None:
    from stage2_decoder.checkpoints import load_checkpoint, read_metrics
    from stage2_decoder.config import TrainConfig
    from stage2_decoder.train import train

    asked = []
    config = TrainConfig(cache=cache, out=str(tmp_path / "run"), epochs=3, num_workers=0,
                         **TRAIN)  # fmt: skip
    summary = train(config, should_stop=lambda *args: asked.append(args) or len(asked) == 1)
    assert summary.stopped_early and summary.steps == 2 and len(asked) == 1
    assert asked[0][0] == 1 and asked[0][1] == asked[0][2]  # epoch 1: its mIoU is the best
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["kind"] == "stopped"


def test_sweep_help_and_one_line_errors(cache: str, tmp_path: Path) -> None:
    from stage2_decoder.cli import app

    wide = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["sweep", "--help"])
    assert wide.exit_code == 0 and "--early-stop" in wide.output and "median" in wide.output
    result = CliRunner().invoke(app, ["sweep", "--cache", cache, "--out", str(tmp_path / "s"),
                                      "--lr", "1e-5:1e-3"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--random N" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path / "none"), "--resume"])
    assert result.exit_code == 2 and "no sweep.json" in " ".join(result.output.split())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _wait(condition, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert process is None or process.poll() is None, f"exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _sweep_config(cache: str, out: Path, **kw) -> SweepConfig:
    axes = (parse_axis("lr", "1e-4,3e-4"), parse_axis("prompts", "point;box"),
            parse_axis("iterations", "1"), parse_axis("images_per_step", "2"),
            parse_axis("objects_per_image", "1"))  # fmt: skip
    return SweepConfig(cache=cache, out=str(out), axes=axes, epochs=2, precision="fp32",
                       val_fraction=0.34, log_every=1, checkpoint_every=1, **kw)  # fmt: skip


def _check_finished_sweep(out: Path) -> list[dict]:
    table = list(csv.DictReader((out / board.LEADERBOARD).open()))
    assert len(table) == 4 and {r["status"] for r in table} == {"done"}, table
    assert all(r["steps"] == "4" for r in table)
    best = max(table, key=lambda r: float(r["best_val_miou"]))
    assert table[0] == best and os.readlink(out / "best") == best["run"]
    assert f"Best trial: **{best['trial']}**" in (out / board.REPORT).read_text()
    assert (out / board.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return table


PLUGIN = '''
"""Test-only: hold the first trial that writes last.pt at step 1 (a Dask preload module)."""
import json, os, time
from pathlib import Path

import stage2_decoder.checkpoints as ck

CONTROL = Path({control!r})
_save = getattr(ck.save_checkpoint, "original", ck.save_checkpoint)


def save_checkpoint(path, state):
    written = _save(path, state)
    flag = CONTROL / "hold"
    if Path(path).name == "last.pt" and state["step"] == 1 and flag.exists():
        temp = CONTROL / f".held-{{os.getpid()}}"
        temp.write_text(json.dumps({{"pid": os.getpid(), "run": str(Path(path).parent)}}))
        try:
            os.link(temp, CONTROL / "held")  # atomic and exclusive: one worker holds
        except FileExistsError:
            return written
        deadline = time.time() + 600
        while flag.exists() and time.time() < deadline:
            time.sleep(0.02)
    return written


save_checkpoint.original = _save
ck.save_checkpoint = save_checkpoint
'''

CLUSTER_SCRIPT = """
import json, os, sys, time
import dask
from dask.distributed import LocalCluster

settings, plugin, ready = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
with dask.config.set(settings):
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, preload=[plugin])
    with open(ready + ".tmp", "w") as f:
        f.write(cluster.scheduler_address)
    os.replace(ready + ".tmp", ready)
    while True:  # ended by the test (SIGKILL of the whole process group)
        time.sleep(3600)
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """2 one-thread worker processes with the hold plugin, in their own process group."""
    from shared.dask_cluster import LOCAL_CLUSTER_CONFIG

    control = tmp_path / "control"
    control.mkdir()
    plugin = control / "samcache_sweep_hold.py"
    plugin.write_text(PLUGIN.format(control=str(control)))
    ready = control / "scheduler-address"
    process = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_SCRIPT, json.dumps(LOCAL_CLUSTER_CONFIG), str(plugin),
         str(ready)], env=_env(), start_new_session=True,
    )  # fmt: skip
    try:
        _wait(ready.exists, "the Dask cluster", process)
        yield ready.read_text(), control
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # scheduler, nannies and workers at once
        process.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sweep_on_dask_survives_a_killed_worker(cache: str, cluster, tmp_path: Path) -> None:
    from stage2_decoder.sweep import prepare, run_sweep

    address, control = cluster
    out = tmp_path / "sweep"
    config, trials = prepare(_sweep_config(cache, out, scheduler=address), resume=False)
    assert [t.name for t in trials] == ["t000-lr1e-4-point", "t001-lr1e-4-box",
                                        "t002-lr3e-4-point", "t003-lr3e-4-box"]  # fmt: skip
    (control / "hold").write_text("")
    box: dict = {}

    def target() -> None:
        try:
            box["rows"] = run_sweep(config, trials)
        except BaseException as exc:  # reported below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    _wait(lambda: (control / "held").exists() or not thread.is_alive(), "a held trial")
    assert (control / "held").exists(), repr(box.get("error"))
    held = json.loads((control / "held").read_text())
    os.kill(held["pid"], signal.SIGKILL)  # the worker, mid-trial (last.pt at step 1 written)
    (control / "hold").unlink()
    thread.join(timeout=WAIT * 2)
    assert not thread.is_alive(), "the sweep did not finish after the kill"
    assert "error" not in box, repr(box.get("error"))

    _check_finished_sweep(out)
    killed = Path(held["run"])
    state = json.loads((killed / board.TRIAL_JSON).read_text())
    assert state["status"] == "done" and state["attempts"] == [{"start_step": 0},
                                                               {"start_step": 1}]  # fmt: skip
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # not from 0
    others = [f for f in (out / "trials").iterdir() if f != killed]
    assert all(len(json.loads((f / board.TRIAL_JSON).read_text())["attempts"]) == 1
               for f in others)  # fmt: skip


def _sweep_command(cache: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stage2_decoder.cli", "sweep", "--cache", cache, "--out",
            str(out), "--lr", "1e-4,3e-4", "--prompts", "point;box", "--iterations", "1",
            "--images-per-step", "2", "--objects-per-image", "1", "--epochs", "2",
            "--precision", "fp32", "--val-fraction", "0.34", "--log-every", "1",
            "--checkpoint-every", "1", "--workers", "2", *extra]  # fmt: skip


def _done_trials(out: Path) -> list[Path]:
    folders = sorted((out / "trials").iterdir()) if (out / "trials").is_dir() else []
    return [f for f in folders if board.read_trial_json(f).get("status") == "done"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_sweep_resumes_without_redoing_finished_trials(cache: str, tmp_path: Path) -> None:
    out, log = tmp_path / "sweep", tmp_path / "sweep.log"
    with log.open("wb") as sink:  # a file, not a pipe nobody reads (it would fill and block)
        process = subprocess.Popen(
            _sweep_command(cache, out), cwd=REPO, env=_env(), stdout=sink, stderr=sink,
            start_new_session=True,
        )  # fmt: skip
    try:
        _wait(lambda: bool(_done_trials(out)) or process.poll() is not None,
              f"a finished trial (log: {log})")  # fmt: skip
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the client, its cluster and its workers
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    finished = {f.name: (f / "best.pt").stat().st_mtime_ns for f in _done_trials(out)}
    assert finished and len(finished) < 4

    again = subprocess.run(
        [sys.executable, "-m", "stage2_decoder.cli", "sweep", "--out", str(out), "--resume",
         "--workers", "2"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=WAIT * 2,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    table = _check_finished_sweep(out)
    assert "decoder sweep" in again.stdout and table[0]["trial"] in again.stdout
    for name, mtime in finished.items():  # not trained again
        folder = out / "trials" / name
        assert (folder / "best.pt").stat().st_mtime_ns == mtime
        assert len(json.loads((folder / board.TRIAL_JSON).read_text())["attempts"]) == 1
    conflict = subprocess.run(
        [sys.executable, "-m", "stage2_decoder.cli", "sweep", "--out", str(out), "--resume",
         "--epochs", "5"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert conflict.returncode == 2 and "--epochs 5 (sweep.json: 2)" in conflict.stderr
