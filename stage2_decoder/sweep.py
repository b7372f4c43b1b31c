"""`decoder sweep`: trials of `decoder train` as Dask tasks, a leaderboard rewritten as they end.

The client (``run_sweep``) writes ``sweep.json`` (the config and its trials), holds
``sweep.lock`` (one sweep per folder), submits one task per unfinished trial to its own
``LocalCluster`` (``--workers`` one-thread processes; ``GPU=1`` each on CUDA) or to
``--scheduler``, and rewrites the leaderboard files (sweep_board.py) whenever a trial ends.

A task (``run_trial``, in a worker) is an ordinary ``train.train`` into
``<out>/trials/<name>`` with ``num_workers=0``, ``--threads`` torch threads and ``last.pt``
every ``checkpoint_every`` steps. It records its state in ``trial.json``; a trial already done
or stopped returns at once, any other resumes from its ``last.pt``. So a worker killed
mid-trial loses at most ``checkpoint_every`` steps: Dask runs the task again elsewhere (a dead
process's ``train.lock`` is released by the OS) and it continues from ``last.pt``; a killed
sweep continues the same way with ``--resume``. An error in a trial (a non-finite loss at a
high lr…) fails that trial only; ``--resume`` tries failed trials again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.dask_cluster import dask_client
from shared.files import atomic_write
from shared.output_folders import claim_output_folder
from shared.storage import CacheLock, parse_location
from stage2_decoder import checkpoints as ck
from stage2_decoder import sweep_board as board
from stage2_decoder.config import ConfigError
from stage2_decoder.sweep_config import SweepConfig, Trial, expand, merge_resumed

SWEEP_JSON, SWEEP_LOCK = "sweep.json", "sweep.lock"
COMMAND = "decoder sweep"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialTask:
    """What a Dask task gets: the trial's `decoder train` config and the early-stop rule."""

    name: str
    config: dict[str, Any]  # TrainConfig.to_dict() (resume decided in the worker)
    others: tuple[str, ...]  # the other trials' run folders (median rule)
    early_stop: str = "none"
    grace_epochs: int = 1
    threads: int = 1


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / board.TRIAL_JSON, lambda handle: handle.write(text.encode()))


def _start_step(folder: Path) -> int:
    try:
        return int(ck.load_checkpoint(folder / ck.LAST)["step"])
    except ck.ResumeError:
        return 0


def run_trial(task: TrialTask) -> dict[str, Any]:
    """Train (or continue) one trial; returns its final ``trial.json`` (also for a failure)."""
    import torch

    from stage2_decoder.config import TrainConfig
    from stage2_decoder.train import train

    folder = Path(task.config["out"])
    state = board.read_trial_json(folder)
    if state.get("status") in board.FINISHED:
        return state  # Dask re-ran a finished task (its result was lost with a worker)
    torch.set_num_threads(task.threads)
    resume = (folder / ck.LAST).is_file()
    before = float(state.get("seconds", 0.0))
    attempts = [*state.get("attempts", []), {"start_step": _start_step(folder) if resume else 0}]
    state = {"trial": task.name, "status": "running", "seconds": before, "attempts": attempts}
    claim_output_folder(folder, "decoder train")  # a run folder: `decoder eval/export` read it
    _write_state(folder, state)
    started = time.monotonic()
    others = [Path(other) for other in task.others]

    def should_stop(epoch: int, miou: float, best: float) -> bool:
        _write_state(folder, {**state, "seconds": before + time.monotonic() - started})
        if task.early_stop != "median":
            return False
        return board.median_rule(epoch, best, board.others_at(others, epoch),
                                 grace=task.grace_epochs)  # fmt: skip

    try:
        config = TrainConfig.from_dict({**task.config, "resume": resume})
        summary = train(config, warn=lambda text: log.warning("%s: %s", task.name, text),
                        should_stop=should_stop)  # fmt: skip
    except Exception as error:  # this trial fails, the sweep goes on
        state.update(status="failed", error=f"{type(error).__name__}: {error}"[:500])
    else:
        state.update(status="stopped" if summary.stopped_early else "done", steps=summary.steps,
                     best_miou=summary.best_miou)  # fmt: skip
    state["seconds"] = before + time.monotonic() - started
    _write_state(folder, state)
    return state


def prepare(
    config: SweepConfig, *, resume: bool, explicit: set[str] | None = None
) -> tuple[SweepConfig, list[Trial]]:
    """The config and trials of a new sweep (``sweep.json`` written) or of a resumed one (read
    back; typed options that differ from it are refused)."""
    out = Path(config.out)
    saved_path = out / SWEEP_JSON
    if resume:
        if not saved_path.is_file():
            raise ConfigError(f"no {SWEEP_JSON} in {out} to resume; start the sweep without "
                              "--resume")  # fmt: skip
        saved = json.loads(saved_path.read_text())
        merged = merge_resumed(SweepConfig.from_dict(saved["config"]), config, explicit or set())
        return merged, [Trial.from_dict(t) for t in saved["trials"]]
    if not config.cache:
        raise ConfigError("--cache is required to start a sweep (only --resume reads it back)")
    claim_output_folder(out, COMMAND)
    if saved_path.exists():
        raise ConfigError(f"{out} already holds a sweep ({SWEEP_JSON}); pass --resume to "
                          "continue it, or choose another --out")  # fmt: skip
    trials = expand(config)
    for trial in trials:  # every trial's options are valid `decoder train` options
        config.train_config("-", trial.options)
    ck.write_json(saved_path, {"config": config.to_dict(),
                               "trials": [t.to_dict() for t in trials]})  # fmt: skip
    return config, trials


def _tasks(config: SweepConfig, trials: list[Trial]) -> dict[str, TrialTask]:
    folders = {t.name: str(board.trial_folder(config.out, t)) for t in trials}
    tasks = {}
    for trial in trials:
        train_config = config.train_config(folders[trial.name], trial.options)
        others = tuple(folder for name, folder in folders.items() if name != trial.name)
        tasks[trial.name] = TrialTask(
            trial.name, train_config.to_dict(), others, config.early_stop, config.grace_epochs,
            config.threads,
        )  # fmt: skip
    return tasks


def _uses_gpu(device: str) -> bool:
    if device == "cuda":
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


OnTrial = Callable[[int, int, "board.TrialRow | None"], None]  # (done, total, row that ended)


def run_sweep(config: SweepConfig, trials: list[Trial], on_trial: OnTrial | None = None) -> list:
    """Run every unfinished trial; returns the leaderboard rows, best first."""
    out = Path(config.out)
    swept = [axis.name for axis in config.axes if axis.varies]
    on_trial = on_trial or (lambda done, total, row: None)
    lock = CacheLock(parse_location(out), SWEEP_LOCK, writer="`decoder sweep`",
                     hint="Wait for it to finish (or stop it), then --resume it.")  # fmt: skip
    with lock:
        rows = board.write_board(out, trials, swept)
        todo = [r.trial for r in rows if r.status not in board.FINISHED]
        done = len(trials) - len(todo)
        on_trial(done, len(trials), None)
        if not todo:
            return rows
        tasks = _tasks(config, trials)
        by_name = {t.name: t for t in trials}
        with dask_client(config.workers, config.scheduler, gpu=_uses_gpu(config.device)) as client:
            for name in _as_finished(client, [tasks[t.name] for t in sorted(todo, key=_order)]):
                done += 1
                rows = board.write_board(out, trials, swept)
                on_trial(done, len(trials), next(r for r in rows if r.trial is by_name[name]))
    return rows


def _order(trial: Trial) -> int:
    return trial.index


def _as_finished(client: Any, tasks: list[TrialTask]):  # noqa: ANN202 - a generator of names
    """Submit every task (``retries=1``; a dead worker's task is re-run by Dask); yield each
    trial's name as it ends. A task Dask gave up on (``KilledWorker``) fails its trial."""
    from dask.distributed import as_completed

    resources = {"GPU": 1} if _uses_gpu(tasks[0].config["device"]) else None
    futures = []
    for task in tasks:
        future = client.submit(run_trial, task, pure=False, retries=1, resources=resources)
        future.samcache_task = task  # type: ignore[attr-defined]
        futures.append(future)
    for future in as_completed(futures):
        task = future.samcache_task  # type: ignore[attr-defined]
        try:
            future.result()
        except Exception as error:  # the worker died too often, or the task could not start
            folder = Path(task.config["out"])
            state = board.read_trial_json(folder)
            state.update(trial=task.name, status="failed",
                         error=f"{type(error).__name__}: {error}"[:500])  # fmt: skip
            folder.mkdir(parents=True, exist_ok=True)
            _write_state(folder, state)
        future.release()  # a result the client holds would be recomputed if its worker died
        yield task.name
