"""Stage-2 training speed: samcache's step against a plain per-prompt loop, in one run.

One cache is built here: synthetic VOC images (stage1_embed.synthetic) embedded by stage 1 with
the tiny random encoder; the decoder is SAM's full-size prompt encoder + mask decoder with random
weights (NOT pretrained). Everything below runs on that cache, its train split, in one process:

1. Throughput in prompt-iterations/s (forward + backward, data loading from the cache included):
   (a) reference: a plain loop calling Meta's ``prompt_encoder`` and ``mask_decoder`` once per
       prompt in fp32, loss + backward per prompt, AdamW step (clip 1.0) per batch; batches read
       in-process with ``TrainBatches``; SAM's recipe (11 iterations) on the same batches, from
       the same weights and the same random prompt streams as samcache;
   (b) samcache: ``TrainBatches`` through a DataLoader (2 workers) + ``interactive_step`` +
       the same AdamW step, with the default settings (precision ``auto`` = bf16 here) and
       samcache fp32. Rounds alternate (a) and (b) so that both see the same machine load; the
       ratio is taken within a round. Then variants (objects per decoder call, autocast, Meta's
       layout, the code before this change, threads), each timed right after the default.
   Loss agreement: per-object losses and gradients of (a) and samcache fp32 / bf16 on fixed
   prompts; the training losses of (a) and (b) are printed beside their speeds.
2. An epoch (1 iteration per object) from the cache against the tutorial way: per image, read
   the JPEG, Meta's preprocessing and the ViT-B image encoder (random weights, official file
   format, fp32), then the plain decoder loop. The encoder is timed on --encoder-images images
   and multiplied by the number of images; the decoder part is timed over the whole epoch.
3. The reader: embeddings/s read from the cache beside the embeddings/s training consumes; peak
   RSS of a full pass over two caches of different sizes (child processes).

    PYTHONPATH=. python bench/bench_train.py [--images 24] [--rounds 2] [--threads 2]
        [--iterations 11] [--variant-iterations 3] [--skip loss,throughput,variants,epoch,rss]

The machine's 2 cores are shared: compare ratios of one round; repeat when the load is high.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.checkpoint_files import make_random_checkpoint  # noqa: E402
from shared.sam_models import build_sam  # noqa: E402
from shared.transforms import prepare_image  # noqa: E402
from stage1_embed.config import EmbedConfig  # noqa: E402
from stage1_embed.pipeline import run_embed  # noqa: E402
from stage1_embed.synthetic import make_synthetic_voc  # noqa: E402
from stage2_decoder import step as step_module  # noqa: E402
from stage2_decoder.config import TrainConfig  # noqa: E402
from stage2_decoder.dataset import STREAM_PROMPTS, TrainBatches, generator_for, load_split  # noqa: E402
from stage2_decoder.losses import dice_loss, focal_loss, iou_of_logits, sam_loss  # noqa: E402
from stage2_decoder.model import LABEL_BOX_BR, LABEL_BOX_TL, LABEL_PAD, PromptableDecoder  # noqa: E402
from stage2_decoder.prompts import sample_error_clicks, sample_first_prompts  # noqa: E402
from stage2_decoder.setup import build_model, make_optimizer, resolve_precision  # noqa: E402
from stage2_decoder.step import (  # noqa: E402
    StepSettings,
    call_decoder,
    interactive_step,
    mask_only_iterations,
)

CPU = torch.device("cpu")
DEFAULT = TrainConfig(cache="-", out="-")  # the documented defaults


def log(*parts: object) -> None:
    print(*parts, flush=True)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- the reference


def meta_prompt(
    coords: torch.Tensor, labels: torch.Tensor
) -> tuple[tuple | None, torch.Tensor | None]:
    """One object's samcache prompt row (N, 2) / (N,) as Meta's ``points`` and ``boxes``.

    Box corners (labels 2, 3) become ``boxes`` (1, 4); the other tokens are points. Without a box
    Meta appends one -1 pad itself, so the pad of the row layout is dropped: both then embed the
    same multiset of tokens (the transformer is permutation-equivariant over them).
    """
    is_box = labels >= LABEL_BOX_TL
    boxes = None
    keep = ~is_box
    if bool(is_box.any()):
        corners = [coords[labels == LABEL_BOX_TL][0], coords[labels == LABEL_BOX_BR][0]]
        boxes = torch.cat(corners).view(1, 4)
    else:
        keep[torch.nonzero(labels == LABEL_PAD).flatten()[0]] = False
    points = (coords[keep][None], labels[keep][None]) if bool(keep.any()) else None
    return points, boxes


def reference_object(
    pe: torch.nn.Module, md: torch.nn.Module, dense_pe: torch.Tensor, embedding: torch.Tensor,
    coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor | None,
    multimask: bool, target: torch.Tensor, valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Meta's calls for one prompt and SAM's loss (= ``sam_loss`` of that object).

    Returns the loss (scalar, with graph) and the mask fed to the next iteration (1, 1, 256,
    256), detached: the highest predicted IoU of a multimask answer, else the single mask.
    """
    points, boxes = meta_prompt(coords, labels)
    sparse, dense = pe(points=points, boxes=boxes, masks=mask_input)
    masks, iou = md(image_embeddings=embedding[None], image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                    multimask_output=multimask)  # fmt: skip
    t, v = target[None], valid[None]
    pixel, dice = focal_loss(masks, t, v), dice_loss(masks, t, v)  # (1, M)
    chosen = int((20.0 * pixel + dice).detach().argmin(1))
    iou_mse = ((iou - iou_of_logits(masks, t, v)) ** 2).mean()
    loss = 20.0 * pixel[0, chosen] + dice[0, chosen] + iou_mse
    return loss, masks[:, int(iou.argmax(1))].unsqueeze(1).detach()


def reference_step(
    pe: torch.nn.Module, md: torch.nn.Module, batch, settings: StepSettings, generator
) -> float:  # noqa: ANN001
    """SAM's interactive recipe with one Meta call per prompt; same random stream as
    ``interactive_step`` (first prompts, mask-only draw, then one click batch per iteration)."""
    targets, valid, n = batch.targets, batch.valid, batch.n_objects
    rows = {"rows": batch.object_rows, "rows_total": batch.rows_total} if batch.rows_total else {}
    coords, labels, multimask = sample_first_prompts(
        targets, valid, batch.boxes_1024, generator,
        mode=settings.prompt_mode, input_size=batch.object_input_sizes(), **rows,
    )  # fmt: skip
    mask_only = mask_only_iterations(settings.iterations, generator)
    dense_pe, embeddings = pe.get_dense_pe(), batch.image_embeddings.float()
    fed: list = [None] * n
    total = 0.0
    for k in range(settings.iterations):
        for b in range(n):
            loss, fed[b] = reference_object(
                pe, md, dense_pe, embeddings[batch.image_index[b]], coords[b], labels[b],
                fed[b], bool(multimask[b]), targets[b], valid[b],
            )  # fmt: skip
            (loss / (n * settings.iterations)).backward()
            total += loss.item()
        if k + 1 == settings.iterations:
            break
        if k + 1 not in mask_only:
            new_coords, new_labels = sample_error_clicks(torch.cat(fed)[:, 0] > 0, targets,
                                                         valid, generator, **rows)  # fmt: skip
            coords, labels = torch.cat([coords, new_coords], 1), torch.cat([labels, new_labels], 1)
        multimask = torch.zeros_like(multimask)
    return total / (n * settings.iterations)


# --------------------------------------------------------------------------- segments


@dataclass
class Segment:
    """One timed run over some micro-batches."""

    seconds: float = 0.0
    prompt_iterations: int = 0
    embeddings: int = 0
    read_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.prompt_iterations / self.seconds


@dataclass
class Setup:
    cache: str
    split: object
    checkpoint: Path
    workers: int
    initial: dict = field(default_factory=dict)  # the weights every segment starts from

    def dataset(self, epochs: int = 1) -> TrainBatches:
        return TrainBatches(self.cache, self.split.train, images_per_step=DEFAULT.images_per_step,
                            objects_per_image=DEFAULT.objects_per_image, seed=DEFAULT.seed,
                            epochs=epochs)  # fmt: skip

    def model(self) -> PromptableDecoder:
        model = build_model("vit_tiny_random", self.checkpoint, train_prompt_encoder=False)
        if self.initial:
            model.load_state_dict(self.initial)
        return model.train()


def _optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, DEFAULT.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_reference(setup: Setup, micros: range, settings: StepSettings) -> Segment:
    model = setup.model()
    optimizer, data, seg = make_optimizer(model, DEFAULT), setup.dataset(), Segment()
    start = time.perf_counter()
    for micro in micros:
        batch = data[micro]
        generator = generator_for(DEFAULT.seed, STREAM_PROMPTS, batch.epoch, batch.micro)
        seg.losses.append(reference_step(model.prompt_encoder, model.mask_decoder, batch,
                                         settings, generator))  # fmt: skip
        _optimizer_step(model, optimizer)
        seg.prompt_iterations += batch.n_objects * settings.iterations
        seg.embeddings += batch.image_embeddings.shape[0]
        seg.read_seconds += batch.read_seconds
    seg.seconds = time.perf_counter() - start
    return seg


def run_samcache(setup: Setup, micros: range, settings: StepSettings, precision: str) -> Segment:
    model = setup.model()
    optimizer, data, seg = make_optimizer(model, DEFAULT), setup.dataset(), Segment()
    start = time.perf_counter()
    loader = DataLoader(data, batch_size=None, sampler=micros, num_workers=setup.workers,
                        prefetch_factor=2 if setup.workers else None)  # fmt: skip
    for batch in loader:
        generator = generator_for(DEFAULT.seed, STREAM_PROMPTS, batch.epoch, batch.micro)
        result = interactive_step(model, batch, settings, generator, device=CPU,
                                  precision=precision)  # fmt: skip
        _optimizer_step(model, optimizer)
        seg.losses.append(result.loss)
        seg.prompt_iterations += result.prompt_iterations
        seg.embeddings += batch.image_embeddings.shape[0]
        seg.read_seconds += batch.read_seconds
    seg.seconds = time.perf_counter() - start
    return seg


@contextlib.contextmanager
def autocast_bf16() -> Iterator[None]:
    """Variant: ``precision bf16`` through ``torch.autocast`` on the fp32 model."""

    def call(model, precision, device, *args):  # noqa: ANN001, ANN202
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(*args)

    saved = step_module.call_decoder, step_module.decoder_dtype
    step_module.call_decoder, step_module.decoder_dtype = call, lambda *_: torch.float32
    try:
        yield
    finally:
        step_module.call_decoder, step_module.decoder_dtype = saved


@contextlib.contextmanager
def meta_layout() -> Iterator[None]:
    """Variant: ``forward`` through Meta's own transformer/upscaling code (``_predict_masks``)."""

    def forward(self, image_embeddings, image_index, point_coords, point_labels,
                mask_input=None, has_mask_input=None):  # noqa: ANN001, ANN202  # fmt: skip
        dtype = self.mask_decoder.iou_token.weight.dtype
        sparse = self.embed_points(point_coords, point_labels)
        masks = None if mask_input is None else mask_input.to(dtype)
        dense = self.embed_masks(sparse.shape[0], masks, has_mask_input).to(dtype)
        src = image_embeddings[image_index].to(dtype).contiguous() + dense
        return self._predict_masks(src, sparse)

    saved = PromptableDecoder.forward
    PromptableDecoder.forward = forward
    try:
        yield
    finally:
        PromptableDecoder.forward = saved


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Variant: ``torch.set_num_threads(n)`` for the run."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def before_this_change() -> Iterator[None]:
    """Variant: what samcache did before (autocast bf16, Meta's layout); with a whole batch."""
    with autocast_bf16(), meta_layout():
        yield


def variants() -> dict[str, tuple[str, int, Callable[[], contextlib.AbstractContextManager]]]:
    """name -> (precision, objects per decoder call, context), each against the default."""
    per_call, null = StepSettings().objects_per_call, contextlib.nullcontext
    table = {
        "bf16, 1 object/call": ("bf16", 1, null),
        "bf16, 2 objects/call": ("bf16", 2, null),
        "bf16, 8 objects/call": ("bf16", 8, null),
        "bf16, whole batch per call": ("bf16", 1000, null),
        f"bf16 autocast (fp32 weights), {per_call} objects/call": ("bf16", per_call,
                                                                  autocast_bf16),
        f"bf16 copies, Meta's layout (_predict_masks), {per_call}/call": ("bf16", per_call,
                                                                         meta_layout),
        "before this change: autocast bf16, Meta's layout, whole batch": ("bf16", 1000,
                                                                         before_this_change),
    }  # fmt: skip
    if torch.get_num_threads() > 1:
        table[f"default with 1 thread ({torch.get_num_threads()} elsewhere)"] = (
            "bf16", per_call, lambda: threads(1))  # fmt: skip
    return table


# --------------------------------------------------------------------------- 1. loss, throughput


def _flat_grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def loss_agreement(setup: Setup, n_objects: int = 8) -> None:
    """Per-object losses and gradients: Meta's calls (fp32) vs samcache fp32 / bf16, on fixed
    prompts. Iteration 0: first prompts; iteration 1: + the reference's mask + one click."""
    model = setup.model()
    ref = copy.deepcopy(model)
    batch = setup.dataset()[0]
    part = slice(0, n_objects)
    index, targets, valid = batch.image_index[part], batch.targets[part], batch.valid[part]
    n, generator = len(index), generator_for(1, 2, 3)
    coords, labels, multimask = sample_first_prompts(
        targets, valid, batch.boxes_1024[part], generator, mode="point,box",
        input_size=batch.object_input_sizes()[part],
    )  # fmt: skip
    embeddings = batch.image_embeddings.float().contiguous(memory_format=torch.channels_last)
    mask_input = None
    log(f"\nloss agreement on {n} objects of batch 0, fixed prompts, same weights")
    for iteration in range(2):
        ref.zero_grad()
        losses, fed = [], []
        for b in range(n):
            loss, mask = reference_object(
                ref.prompt_encoder, ref.mask_decoder, ref.prompt_encoder.get_dense_pe(),
                embeddings[index[b]], coords[b], labels[b],
                None if mask_input is None else mask_input[b : b + 1], bool(multimask[b]),
                targets[b], valid[b],
            )  # fmt: skip
            (loss / n).backward()
            losses.append(loss.detach())
            fed.append(mask)
        ref_losses, ref_grads = torch.stack(losses), _flat_grads(ref.mask_decoder)
        line = f"  iteration {iteration}: reference (Meta, fp32) mean loss {ref_losses.mean():.6f}"
        for precision in ("fp32", "bf16"):
            model.zero_grad()
            logits, iou = call_decoder(model, precision, CPU, embeddings, index, coords, labels,
                                       mask_input)  # fmt: skip
            out = sam_loss(logits, iou, targets, valid, multimask)
            out.loss.backward()
            grads = _flat_grads(model.mask_decoder)
            dloss = (out.per_object.detach() - ref_losses).abs().max()
            dgrad = (grads - ref_grads).abs().max() / ref_grads.abs().max()
            cosine = torch.nn.functional.cosine_similarity(grads.double(), ref_grads.double(), 0)
            line += (f"\n    samcache {precision}: mean loss {out.loss.item():.6f}, max |Δloss| "
                     f"per object {dloss:.2e}, gradients: max |Δ| / max |g| {dgrad:.2e}, "
                     f"cosine {cosine:.6f}")  # fmt: skip
        log(line)
        mask_input = torch.cat(fed)
        new_coords, new_labels = sample_error_clicks(mask_input[:, 0] > 0, targets, valid,
                                                     generator)  # fmt: skip
        coords, labels = torch.cat([coords, new_coords], 1), torch.cat([labels, new_labels], 1)
        multimask = torch.zeros_like(multimask)


def _row(name: str, seg: Segment, ratio: float | None) -> str:
    shown = f"{ratio:6.2f}x" if ratio is not None else "   1.00x"
    losses = " ".join(f"{x:.5f}" for x in seg.losses)
    return (f"  {name:44s} {seg.seconds:7.1f} s {seg.rate:7.2f} prompt-it/s {shown}  "
            f"loss {losses}  (load {load()})")  # fmt: skip


def _settings(iterations: int, per_call: int | None = None) -> StepSettings:
    per_call = per_call or StepSettings().objects_per_call
    return StepSettings(",".join(DEFAULT.prompts), iterations, DEFAULT.loss, per_call)


def throughput(setup: Setup, args: argparse.Namespace) -> Segment:
    """Rounds of: reference, samcache default, samcache fp32 (same batches, same weights)."""
    settings, micros = _settings(args.iterations), range(args.batches)
    precision, per_call = resolve_precision(DEFAULT.precision, CPU), settings.objects_per_call
    runs = {f"samcache default ({precision}, {per_call} objects/call)": precision,
            f"samcache fp32, {per_call} objects/call": "fp32"}  # fmt: skip
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    log(f"\nthroughput: {args.batches} micro-batch(es) of the default config "
        f"({DEFAULT.images_per_step} images x <= {DEFAULT.objects_per_image} objects, "
        f"{args.iterations} prompt iterations each), data loading included")  # fmt: skip
    default = Segment()
    for r in range(args.rounds):
        log(f" round {r + 1}")
        ref = run_reference(setup, micros, settings)
        log(_row("reference: Meta per prompt, fp32", ref, None))
        for name, run_precision in runs.items():
            seg = run_samcache(setup, micros, settings, run_precision)
            ratios[name].append(seg.rate / ref.rate)
            log(_row(name, seg, ratios[name][-1]))
            default = seg if run_precision == precision else default
    for name, values in ratios.items():
        log(f" {name}: median {np.median(values):.2f}x the reference "
            f"(rounds: {', '.join(f'{v:.2f}' for v in values)})")  # fmt: skip
    return default


def variant_comparison(setup: Setup, args: argparse.Namespace) -> None:
    """Each variant right after a run of the default on the same batch: ratio to the default."""
    precision, micros = resolve_precision(DEFAULT.precision, CPU), range(args.batches)
    log(f"\nvariants, {args.variant_iterations} prompt iterations, each timed right after the "
        "default on the same batch (x = its speed / the default's)")  # fmt: skip
    for name, (run_precision, per_call, context) in variants().items():
        base = run_samcache(setup, micros, _settings(args.variant_iterations), precision)
        with context():
            seg = run_samcache(setup, micros, _settings(args.variant_iterations, per_call),
                               run_precision)  # fmt: skip
        log(f"  {name:62s} {seg.rate:6.2f} prompt-it/s, default {base.rate:6.2f}: "
            f"{seg.rate / base.rate:5.2f}x  (load {load()})")  # fmt: skip


# --------------------------------------------------------------------------- 2. epoch


def encoder_seconds(voc: Path, image_ids: list[str], checkpoint: Path) -> list[float]:
    """The tutorial's per-image cost: JPEG read, Meta's preprocessing, ViT-B forward (fp32)."""
    sam = build_sam("vit_b", checkpoint)

    def encode(image_id: str) -> None:
        rgb = np.asarray(Image.open(voc / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
        tensor, _ = prepare_image(rgb)
        with torch.no_grad():
            sam.image_encoder(tensor[None])

    encode(image_ids[0])  # warm-up, not timed
    times = []
    for image_id in image_ids:
        start = time.perf_counter()
        encode(image_id)
        times.append(time.perf_counter() - start)
    return times


def epoch_comparison(setup: Setup, voc: Path, work: Path, args: argparse.Namespace) -> None:
    """Whole epochs (1 iteration per object), samcache and the plain decoder loop alternating
    for --rounds rounds (medians); the tutorial adds the ViT-B encoder for every image."""
    settings = StepSettings(",".join(DEFAULT.prompts), iterations=1, loss=DEFAULT.loss)
    micros, n_images = range(setup.dataset().per_epoch), setup.split.train.num_rows
    precision = resolve_precision(DEFAULT.precision, CPU)
    log(f"\nepoch over the cache, 1 prompt iteration per object ({n_images} train images, "
        f"{len(micros)} micro-batches), {args.rounds} alternating rounds")  # fmt: skip
    ours, ref = [], []
    for _ in range(args.rounds):
        ours.append(run_samcache(setup, micros, settings, precision))
        ref.append(run_reference(setup, micros, settings))
        log(f"  samcache default ({precision}) {ours[-1].seconds:.1f} s for "
            f"{ours[-1].prompt_iterations} objects | plain decoder loop (Meta per prompt, fp32) "
            f"{ref[-1].seconds:.1f} s  (load {load()})")  # fmt: skip
    ours_s = float(np.median([seg.seconds for seg in ours]))
    ref_s = float(np.median([seg.seconds for seg in ref]))
    checkpoint = make_random_checkpoint("vit_b", work / "random_vit_b.pth")
    ids = setup.split.train.column("image_id").to_pylist()[: args.encoder_images]
    times = encoder_seconds(voc, ids, checkpoint)
    per_image = float(np.mean(times))
    tutorial = n_images * per_image + ref_s
    log(
        f"  ViT-B image encoder fp32 (read + preprocess + forward), timed on {len(times)} "
        f"images: {', '.join(f'{t:.1f}' for t in times)} s -> mean {per_image:.1f} s/image"
    )
    log(
        f"  tutorial epoch = {n_images} images x {per_image:.1f} s + decoder loop (median) "
        f"{ref_s:.1f} s = {tutorial:.1f} s (encoder extrapolated, decoder measured)"
    )
    log(f"  samcache epoch (median) {ours_s:.1f} s -> {tutorial / ours_s:.1f}x less time "
        f"(decoder part alone: {ref_s / ours_s:.2f}x)")  # fmt: skip


# --------------------------------------------------------------------------- 3. reader, memory


def reader_rates(setup: Setup, default: Segment) -> None:
    data = setup.dataset()
    start, read, embeddings = time.perf_counter(), 0.0, 0
    for micro in range(data.per_epoch):
        batch = data[micro]
        read += batch.read_seconds
        embeddings += batch.image_embeddings.shape[0]
    total = time.perf_counter() - start
    log(f"\nreader, one process: {embeddings / read:.0f} embeddings/s from zarr; "
        f"{embeddings / total:.0f} embeddings/s as complete batches (RLE targets included); "
        f"training loads it with {setup.workers} such worker processes")  # fmt: skip
    if default.seconds:
        log(
            f"training (samcache default) consumes {default.embeddings / default.seconds:.2f} "
            f"embeddings/s at {default.rate:.2f} prompt-iterations/s; reading them took "
            f"{default.read_seconds:.2f} s of its {default.seconds:.1f} s (in the workers)"
        )


class _ChildrenPeak(threading.Thread):
    """Samples the RSS of this process's children (DataLoader workers) every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = 0.0, threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.done.wait(0.05):
            for child in me.children():
                with contextlib.suppress(psutil.Error):
                    self.peak = max(self.peak, child.memory_info().rss / 2**20)


def _peak_rss_mb() -> float:
    """VmHWM of this process (unlike ru_maxrss, not inherited from the parent at fork/exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) / 1024


def rss_probe(cache: str, checkpoint: str, workers: int) -> None:
    """Child: read every embedding of ``cache`` through the DataLoader (2 training micro-steps
    on the way); print the peak RSS of this process and of its largest worker (MB) as JSON."""
    setup = Setup(cache, load_split(cache, DEFAULT.val_fraction, DEFAULT.seed),
                  Path(checkpoint), workers)  # fmt: skip
    model = setup.model()
    optimizer, data = make_optimizer(model, DEFAULT), setup.dataset()
    children = _ChildrenPeak()
    children.start()
    loader = DataLoader(data, batch_size=None, sampler=range(len(data)), num_workers=workers,
                        prefetch_factor=2 if workers else None)  # fmt: skip
    settings, precision, read = StepSettings(iterations=2), resolve_precision("auto", CPU), 0
    for i, batch in enumerate(loader):
        read += batch.image_embeddings.shape[0]
        if i < 2:
            interactive_step(model, batch, settings, generator_for(0, i), device=CPU,
                             precision=precision)  # fmt: skip
            _optimizer_step(model, optimizer)
    children.done.set()
    children.join()
    print(json.dumps({"read": read, "main": _peak_rss_mb(), "workers": children.peak}))


def rss_comparison(work: Path, checkpoint: Path, args: argparse.Namespace) -> None:
    from tests.cache_factory import make_cache

    log("\npeak RSS over a full pass of the reader (+ 2 training micro-steps), by cache size")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for n in args.rss_sizes:
        path = make_cache(work / f"rss_{n}.zarr", checkpoint, n_images=n, objects_per_image=3)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        done = subprocess.run(
            [sys.executable, __file__, "--rss-probe", str(path), "--checkpoint", str(checkpoint),
             "--workers", str(args.workers), "--threads", str(args.threads)],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        peak = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"  cache of {n} images ({size:.0f} MiB on disk): {peak['read']} embeddings read; "
            f"peak RSS main process {peak['main']:.0f} MB, largest DataLoader worker "
            f"{peak['workers']:.0f} MB")  # fmt: skip


# --------------------------------------------------------------------------- main


def build_voc_cache(work: Path, n_images: int) -> tuple[Path, Path, Path]:
    """Synthetic VOC images embedded by stage 1 (tiny random encoder, fp32): (voc, ckpt, cache)."""
    voc = make_synthetic_voc(work / "voc", n_images=n_images, seed=0)
    checkpoint = make_random_checkpoint("vit_tiny_random", work / "tiny.pth")
    cache = work / "cache.zarr"
    run_embed(EmbedConfig(images=str(voc), out=str(cache), model_type="vit_tiny_random",
                          checkpoint=str(checkpoint), precision="fp32", device="cpu"))  # fmt: skip
    return voc, checkpoint, cache


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24, help="synthetic VOC images")
    parser.add_argument("--batches", type=int, default=1, help="micro-batches per segment")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=DEFAULT.iterations)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--workers", type=int, default=DEFAULT.num_workers)
    parser.add_argument("--variant-iterations", type=int, default=3)
    parser.add_argument("--encoder-images", type=int, default=2)
    parser.add_argument("--rss-sizes", type=int, nargs=2, default=(24, 240))
    parser.add_argument("--skip", default="", help="any of: loss,throughput,variants,epoch,rss")
    parser.add_argument("--rss-probe", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_probe:
        return rss_probe(args.rss_probe, args.checkpoint, args.workers)
    log(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"default precision {resolve_precision(DEFAULT.precision, CPU)}, load {load()}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        voc, checkpoint, cache = build_voc_cache(work, args.images)
        split = load_split(str(cache), DEFAULT.val_fraction, DEFAULT.seed)
        setup = Setup(str(cache), split, checkpoint, args.workers)
        setup.initial = copy.deepcopy(setup.model().state_dict())
        data = setup.dataset()
        objects = sum(data[m].n_objects for m in range(data.per_epoch))
        log(f"cache: {args.images} images ({split.train.num_rows} train, {objects} objects "
            f"trained per epoch, {data.per_epoch} micro-batches), built in "
            f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        default = Segment()
        if "loss" not in args.skip:
            loss_agreement(setup)
        if "throughput" not in args.skip:
            default = throughput(setup, args)
        if "variants" not in args.skip:
            variant_comparison(setup, args)
        reader_rates(setup, default)
        if "epoch" not in args.skip:
            epoch_comparison(setup, voc, work, args)
        if "rss" not in args.skip:
            rss_comparison(work, checkpoint, args)


if __name__ == "__main__":
    main()
