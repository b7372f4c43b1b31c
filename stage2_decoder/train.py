"""`decoder train`: fine-tune SAM's mask decoder from a cache of image embeddings.

Layering (sam2's launcher → trainer): ``train(config)`` prepares a ``Run`` (``setup_run``: the
run folder, resume, the cache's split, the model from the cache's own SAM checkpoint, optimizer)
and ``fit`` is the loop, read top to bottom in phases: lr, forward/backward, step, log,
eval + checkpoint. Checkpoint writer, metric sink and progress bar are small objects passed in.

Recipe (defaults; FACTS.md "SAM's training recipe"): SAM's interactive prompts (step.py),
20·focal + dice + IoU-head MSE at 256 (losses.py), AdamW with lr 1e-4 (the top of the 1e-5..1e-4
range of decoder-only fine-tunes; SAM's 8e-4 was for training from scratch with the encoder)
and weight decay 0.01 on matrices only (biases and norms get none). SAM's 0.1 decays towards
zero, which for a short fine-tune of pretrained weights mostly erases what we start from; 0.01
is AdamW's usual default. Warm-up ``min(250, 5 % of steps)``, cosine to 10 %, gradient norm
clipped at 1.0; bf16 autocast where the hardware has it (fp16 + GradScaler on request).

Exact resume: every random number of optimizer step s is derived from ``(seed, epoch, micro)``
(prompts), ``(seed, epoch, image)`` (objects) and ``(seed, epoch)`` (data order); the lr is a
pure function of s; model, optimizer and scaler states are restored. So a run killed at any
point and resumed from ``last.pt`` ends with the same weights as one that never stopped (tested
on CPU with a real ``kill -9``).

Several processes (``torchrun``; ``Distributed`` in setup.py is the one place that knows rank
and world size): ``--images-per-step`` is the micro-batch of all ranks together, whose images
``TrainBatches`` shares out by rank. The prompt iterations run on the plain module (as under
DDP's ``no_sync``: gradients only accumulate, however many forward/backward calls step.py
makes); once per optimizer step every rank, also one that got no image, has DDP all-reduce the
summed gradients (``setup.average_gradients``), so no rank waits for a collective the others
never reach. Each rank's loss is scaled by ``world_size · n / N``
(its n of the micro-batch's N objects), so DDP's average is the one-process mean over the N
objects. Logged losses and validation sums are added over the ranks; only rank 0 writes files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from stage2_decoder import checkpoints as ck
from stage2_decoder.config import TrainConfig
from stage2_decoder.dataset import STREAM_PROMPTS, TrainBatches, ValBatches, derive_seed
from stage2_decoder.guards import run_folder_lock
from stage2_decoder.plots import CURVES, plot_curves
from stage2_decoder.replay import MixedBatches, with_replay
from stage2_decoder.schedule import lr_at
from stage2_decoder.setup import Distributed, Run, average_gradients, setup_run
from stage2_decoder.step import StepSettings, interactive_step
from stage2_decoder.validate import ValResult, validate


class Progress(Protocol):
    """What the loop tells a progress bar (cli.py has a rich one; ``NoProgress`` is silent)."""

    def start(self, total: int, completed: int) -> None: ...
    def advance(self, step: int, fields: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...


class NoProgress:
    def start(self, total: int, completed: int) -> None:
        pass

    def advance(self, step: int, fields: dict[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        pass


@dataclass
class Summary:
    """What a finished ``train`` returns (the CLI prints it)."""

    out: str
    steps: int
    epochs: int
    best_miou: float
    last_val: dict[str, float] = field(default_factory=dict)
    prompt_iterations_per_s: float = 0.0
    embeddings_per_s: float = 0.0
    seconds: float = 0.0
    is_main: bool = True  # False on ranks > 0 of a distributed run (they print nothing)
    stopped_early: bool = False  # ``should_stop`` ended the run before its last epoch


# Asked after each validation with (epoch, its val mIoU, the best val mIoU so far); True ends
# the run there (last.pt is saved, metrics.jsonl gets a ``{"kind": "stopped"}`` line).
ShouldStop = Callable[[int, float, float], bool]


def train(
    config: TrainConfig,
    *,
    explicit: set[str] | None = None,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    should_stop: ShouldStop | None = None,
) -> Summary:
    """Run (or, with ``config.resume``, continue) a training run; see the module docstring.

    ``explicit``: options the user typed (for the resume warning; None: all differences).
    ``warn`` receives one line per warning (default: ``progress.message``). ``should_stop``
    (`decoder sweep`'s early stop) may end the run after a validation. Started by torchrun
    (``WORLD_SIZE`` > 1), this process is one rank of a data-parallel run; ranks > 0 report
    nothing through ``progress`` and ``warn``.
    """
    progress = progress or NoProgress()
    dist = Distributed.from_env()
    if not dist.is_main:
        progress, warn = NoProgress(), _silent
    with dist.started(dist.device(config.device)), run_folder_lock(Path(config.out), dist):
        run = setup_run(config, explicit=explicit, warn=warn or progress.message, dist=dist)
        return fit(run, progress, should_stop)


def _silent(text: str) -> None:
    pass


def _generator(device: torch.device, seed: int, *keys: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))


def _loader(dataset: Any, items: range, config: TrainConfig, device: torch.device) -> DataLoader:
    """``items`` in order; each item is a whole batch (batch_size=None)."""
    workers = config.num_workers
    return DataLoader(
        dataset, batch_size=None, sampler=items, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
    )  # fmt: skip


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _optimizer_step(run: Run) -> float:
    """Unscale, clip, step, zero the gradients; returns the gradient norm before clipping."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    limit = run.config.grad_clip if run.config.grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm


def _state(run: Run, step: int, epoch: int) -> dict[str, Any]:
    """Everything a checkpoint holds (checkpoints.py lists the keys)."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "schedule": {"step": step, "warmup": run.warmup, "total": run.total_steps},
        "rng": ck.rng_state(),
        "epoch": epoch,
        "step": step,
        "best_metric": run.best_metric,
        "config": run.config.to_dict(),
        "cache": run.cache_identity,
        "world_size": run.dist.world_size,
    }


class _Window:
    """Running sums between two log lines (loss, parts, prompt iterations, read time).

    ``add`` takes this rank's share of values that ``record`` adds up over the ranks;
    ``add_shared`` takes values every rank has equal (the gradient norm after the reduction).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.shared: dict[str, float] = {}
        self.steps, self.prompt_iterations, self.embeddings, self.read_s = 0, 0, 0, 0.0
        self.started = time.perf_counter()

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def add_shared(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.shared[key] = self.shared.get(key, 0.0) + value

    def record(self, dist: Distributed) -> dict[str, float]:
        """Means per step, rates of all ranks together (a collective: every rank calls it)."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        counts = {"#prompt_it": self.prompt_iterations, "#emb": self.embeddings,
                  "#read_s": self.read_s}  # fmt: skip
        total = dist.sum({**self.sums, **counts})
        steps = max(self.steps, 1)
        out = {k: v / steps for k, v in total.items() if not k.startswith("#")}
        out.update({k: v / steps for k, v in self.shared.items()})
        out["prompt_it_per_s"] = total["#prompt_it"] / elapsed
        read_s = total["#read_s"] / dist.world_size  # the ranks read at the same time
        out["emb_per_s"] = total["#emb"] / read_s if read_s > 0 else 0.0
        return out


def _micro_steps(
    run: Run, batches: Any, settings: StepSettings, micros: range, step: int, windows: list
) -> None:
    """Forward/backward of one optimizer step's micro-batches; adds the results to windows.

    This rank holds n of the N objects of a micro-batch (``rows_total``): its mean loss is
    scaled by ``world_size · n / N / len(micros)``, its logged values by ``n / N / len(micros)``.
    """
    epoch, world = step // run.steps_per_epoch, run.dist.world_size
    for micro in micros:
        batch = next(batches)
        if (batch.epoch, batch.micro) != (epoch, micro):
            raise RuntimeError(f"data out of step: got {batch.epoch, batch.micro}, expected "
                               f"{epoch, micro}; this is a bug")  # fmt: skip
        generator = _generator(run.device, run.config.seed, STREAM_PROMPTS, epoch, micro)
        share = batch.n_objects / max(batch.rows_total, 1) / len(micros)
        result = interactive_step(
            run.model, batch, settings, generator, device=run.device, precision=run.precision,
            loss_scale=world * share, scaler=run.scaler,
            where=f"step {step + 1} (epoch {epoch + 1}, micro-batch {micro}, images "
                  f"{_named(batch.image_ids)})",
        )  # fmt: skip
        values = {"loss": result.loss, **result.parts}
        for window in windows:
            window.add({k: v * share for k, v in values.items()})
            window.prompt_iterations += result.prompt_iterations
            window.embeddings += batch.image_embeddings.shape[0]
            window.read_s += batch.read_seconds
    if run.ddp is not None:
        average_gradients(run.ddp)


def _named(image_ids: list[str], most: int = 8) -> str:
    """Image ids for a message: the first ``most`` of them, then how many more."""
    more = f" and {len(image_ids) - most} more" if len(image_ids) > most else ""
    return ", ".join(image_ids[:most]) + more if image_ids else "none"


def fit(run: Run, progress: Progress, should_stop: ShouldStop | None = None) -> Summary:
    """The training loop, from ``run.start_step`` to ``run.total_steps`` (or an early stop)."""
    config, dist = run.config, run.dist
    main = dist.is_main
    settings = StepSettings(",".join(config.prompts), config.iterations, config.loss)
    data = TrainBatches(
        config.cache, run.split.train, images_per_step=config.images_per_step,
        objects_per_image=config.objects_per_image, seed=config.seed, epochs=config.epochs,
        rank=dist.rank, world_size=dist.world_size, views=config.views,
    )  # fmt: skip
    data = with_replay(data, config, run.replay_images)  # + --replay images in every micro-batch
    if isinstance(data, MixedBatches) and main:
        progress.message(data.describe())
    val_data = ValBatches(config.cache, run.split.val, config.images_per_step)
    accum = config.grad_accum  # micro-batches per optimizer step (fewer in an epoch's last)
    start_epoch, start_in_epoch = divmod(run.start_step, run.steps_per_epoch)
    first_micro = start_epoch * data.per_epoch + start_in_epoch * accum
    batches = iter(_loader(data, range(first_micro, len(data)), config, run.device))
    sink = ck.MetricSink(run.out / ck.METRICS, enabled=main)
    window, totals, last_val = _Window(), _Window(), run.last_val
    end_step = run.total_steps
    if run.start_step and main:
        where = (
            f"epoch {start_epoch + 1} of {config.epochs}"
            if run.start_step < run.total_steps
            else "the run is complete: nothing left to train"
        )
        progress.message(
            f"resuming from step {run.start_step} of {run.total_steps} ({where}) in {run.out}"
        )
    progress.start(run.total_steps, run.start_step)
    run.model.train()
    for step in range(run.start_step, run.total_steps):
        epoch, in_epoch = divmod(step, run.steps_per_epoch)
        # --- lr
        lr = lr_at(step, lr=config.lr, warmup=run.warmup, total=run.total_steps,
                   min_lr_ratio=config.min_lr_ratio)  # fmt: skip
        _set_lr(run.optimizer, lr)
        # --- forward / backward (gradients accumulate over iterations and micro-batches)
        micros = range(in_epoch * accum, min((in_epoch + 1) * accum, data.per_epoch))
        _micro_steps(run, batches, settings, micros, step, [window, totals])
        # --- optimizer step
        window.add_shared({"grad_norm": _optimizer_step(run)})
        window.steps, totals.steps, done = window.steps + 1, totals.steps + 1, step + 1
        epoch_end = in_epoch == run.steps_per_epoch - 1
        # --- log
        record: dict[str, Any] = {}
        if done % config.log_every == 0 or epoch_end:
            record = {"kind": "train", "step": done, "epoch": epoch + 1, "lr": lr}
            record.update(window.record(dist))
            sink.write(record)
            window = _Window()
        progress.advance(done, record)
        # --- eval + checkpoint
        if epoch_end:
            mine = range(dist.rank, len(val_data), dist.world_size)  # this rank's val batches
            val = validate(run.model, _loader(val_data, mine, config, run.device),
                           device=run.device, precision=run.precision, loss_kind=config.loss,
                           reduce=dist.sum)  # fmt: skip
            last_val = _after_validation(run, sink, val, done, epoch + 1)
            progress.message(_describe_val(epoch + 1, val))
            if done < run.total_steps and _asked_to_stop(run, should_stop, epoch + 1, val):
                sink.write({"kind": "stopped", "step": done, "epoch": epoch + 1,
                            "reason": "early stop"})  # fmt: skip
                progress.message(f"stopped early after epoch {epoch + 1} (last.pt kept)")
                end_step = done
                break
        elif config.checkpoint_every and done % config.checkpoint_every == 0 and main:
            _save(run, ck.LAST, done, epoch)
        if window.steps == 0:  # rates of the next log line count training time only
            window = _Window()
    sink.close()
    run.check_frozen()
    rates = totals.record(dist)
    return Summary(
        out=str(run.out), steps=end_step, epochs=config.epochs,
        best_miou=run.best_metric, last_val=last_val,
        prompt_iterations_per_s=rates["prompt_it_per_s"], embeddings_per_s=rates["emb_per_s"],
        seconds=time.perf_counter() - totals.started, is_main=main,
        stopped_early=end_step < run.total_steps,
    )  # fmt: skip


def _asked_to_stop(run: Run, should_stop: ShouldStop | None, epoch: int, val: ValResult) -> bool:
    """``should_stop``'s answer, decided on rank 0 and sent to every rank (they stop together)."""
    if should_stop is None:
        return False
    return bool(run.dist.from_main(lambda: should_stop(epoch, val.miou, run.best_metric)))


def _after_validation(
    run: Run, sink: ck.MetricSink, val: ValResult, step: int, epoch: int
) -> dict[str, float]:
    """Log the val line, redraw the curves, save best.pt (if better) and last.pt (rank 0)."""
    record = {"kind": "val", "step": step, "epoch": epoch, **val.to_dict()}
    better = math.isfinite(val.miou) and val.miou > run.best_metric
    if better:  # every rank: the val sums are those of all ranks
        run.best_metric = val.miou
    if not run.dist.is_main:
        return record
    sink.write(record)
    plot_curves(run.out / ck.METRICS, run.out / CURVES)
    if better:
        _save(run, ck.BEST, step, epoch)
    _save(run, ck.LAST, step, epoch)
    return record


def _save(run: Run, name: str, step: int, epoch: int) -> None:
    """Write a checkpoint; a failed write (a full disk: torch raises OSError or RuntimeError)
    leaves the previous file whole and ends the run with one line saying what was kept."""
    try:
        ck.save_checkpoint(run.out / name, _state(run, step, epoch))
    except (OSError, RuntimeError) as error:
        last = run.out / ck.LAST
        kept = (f"the last good checkpoint is {last} (step {run.saved_step})"
                if last.is_file() and run.saved_step else "no checkpoint was kept")  # fmt: skip
        raise ck.CheckpointWriteError(
            f"cannot write {run.out / name} at step {step} ({_reason(error)}); {kept}. Free "
            f"space (or use another --out), then continue with `decoder train --out {run.out} "
            "--resume`"
        ) from None
    if name == ck.LAST:
        run.saved_step = step


def _reason(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return text.splitlines()[0][:200] if text else type(error).__name__


def _describe_val(epoch: int, val: ValResult) -> str:
    return (
        f"epoch {epoch}: val loss {val.val_loss:.4f}, mIoU 1-click {val.miou_click:.3f}, "
        f"box {val.miou_box:.3f} ({val.n_objects} objects, {val.seconds:.1f} s)"
    )
