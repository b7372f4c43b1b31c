"""Does fine-tuning the decoder from the cache help? samcache_tiny on home vs shifted data.

``samcache_tiny`` is a demonstration model pretrained on synthetic shapes (the *home* domain,
``tools/pretrain_tiny.py``); it is NOT a substitute for SAM. This script builds, embeds with it
and evaluates with ``decoder eval``'s code (``run_eval``; box prompt and 1/3/5 RITM clicks):

- ``home``: home-domain images (seed 100) the pretraining never drew (it uses seed 0);
- ``shifted``: the shifted domain (``synthetic_shifted.py``, seed 1), VOC train/val split;
  ``decoder train`` fine-tunes on its train images, evaluation uses its val images;
- ``unseen``: a second shifted set (seed 2) that neither training nor the lr choice saw;
- ``replay``: other home images (seed 101) that ``decoder train --replay`` mixes into every
  step (``--n-replay``, 0: a plain fine-tune); never evaluated on.

Then it prints one table: zero-shot and fine-tuned mIoU on each set (fine-tuned on home is the
forgetting), with the issue's targets checked: zero-shot home box mIoU >= 0.70; fine-tuned
shifted >= zero-shot shifted + 0.10 (box and 1 click), on ``shifted`` and on ``unseen``; home
drops <= 0.05. ``--compare-lr`` also fine-tunes with several learning rates (everything else
the same) and prints the val mIoU of each (the comparison recorded in the README).

    PYTHONPATH=. nice -n 10 python bench/bench_finetune.py [--work DIR] [--epochs 8]
        [--lr 3e-4] [--n-replay 32] [--compare-lr 1e-5,1e-4,3e-4,1e-3] [--n-shifted 48]

The defaults are the recipe that met every target (README, "Fine-tuning samcache_tiny"):
8 epochs (72 steps) at lr 3e-4 with 32 home images replayed 1:1 (4 shifted + 4 home images per
step). Decoder training here uses few prompt iterations (``--iterations``, default 3) to fit a
shared 2-core CPU; every other option is ``decoder train``'s default unless given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stage1_embed.config import EmbedConfig  # noqa: E402
from stage1_embed.pipeline import run_embed  # noqa: E402
from stage1_embed.synthetic import make_synthetic_voc  # noqa: E402
from stage2_decoder.config import TrainConfig  # noqa: E402
from stage2_decoder.eval_report import run_eval  # noqa: E402
from stage2_decoder.evaluate import EvalConfig  # noqa: E402
from stage2_decoder.export import FINE_TUNED, ZERO_SHOT  # noqa: E402
from stage2_decoder.train import train  # noqa: E402

MODEL = "samcache_tiny"
PROTOCOLS = (("box", "box_miou"), ("1 click", "miou@1"), ("3 clicks", "miou@3"),
             ("5 clicks", "miou@5"))  # fmt: skip
SETS = {"home": ("home", 100), "shifted": ("shifted", 1), "unseen": ("shifted", 2)}
REPLAY = ("home", 101)  # home images for ``--n-replay`` (never evaluated on)


def make_cache(work: Path, name: str, n_images: int, checkpoint: str | None = None) -> str:
    """Synthetic VOC set ``name`` (see SETS) embedded with samcache_tiny (the bundled weights,
    or ``checkpoint``); returns the cache."""
    domain, seed = SETS.get(name, REPLAY)
    voc = make_synthetic_voc(work / name, n_images=n_images, seed=seed, domain=domain)
    cache = work / f"{name}.zarr"
    summary = run_embed(EmbedConfig(
        images=str(voc / "JPEGImages"), out=str(cache), model_type=MODEL, precision="fp32",
        download=False, checkpoint=checkpoint,
    ))  # fmt: skip
    if not summary.encoded:
        print(f"  {name}: {n_images} images already in {cache} (--work reused)", flush=True)
    else:
        print(f"  {name}: {n_images} images embedded at {summary.images_per_second:.2f} "
              "images/s (JPEG decode and preprocessing included)", flush=True)  # fmt: skip
    return str(cache)


def encode_seconds(checkpoint: str | None, repeats: int = 5) -> float:
    """Median seconds of ``EncoderRunner.encode`` (fp32) on one 1024×1024 input."""
    import torch

    from shared.checkpoint_files import resolve_checkpoint
    from shared.sam_models import build_image_encoder
    from stage1_embed.encoder import EncoderRunner

    path = resolve_checkpoint(MODEL, checkpoint, download=False)
    runner = EncoderRunner(build_image_encoder(MODEL, path), precision="fp32")
    batch = torch.randn(1, 3, 1024, 1024)
    runner.encode(batch)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.encode(batch)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def fine_tune(cache: str, out: Path, args: argparse.Namespace, **overrides: object) -> TrainConfig:
    """``decoder train`` on ``cache`` with the defaults, except the CPU-budget options."""
    config = TrainConfig(
        cache=cache, out=str(out), epochs=args.epochs, iterations=args.iterations,
        images_per_step=args.images_per_step, objects_per_image=args.objects_per_image,
        num_workers=0, seed=args.seed, replay=args.replay_cache,
        replay_images=args.replay_images if args.replay_cache else -1,
        **overrides,  # type: ignore[arg-type]
    )  # fmt: skip
    summary = train(config)
    print(f"  fine-tuned {out.name}: {summary.steps} steps, best val mIoU {summary.best_miou:.3f}, "
          f"{summary.seconds:.0f} s", flush=True)  # fmt: skip
    return config


def evaluate(cache: str, run: Path | None, split: str, out: Path) -> dict[str, dict[str, float]]:
    """Zero-shot (and fine-tuned with ``run``) summaries of ``decoder eval`` on ``split``."""
    config = EvalConfig(cache=cache, out=str(out), run=str(run) if run else None, split=split,
                        clicks=(1, 3, 5), max_clicks=5, noc_thresholds=(0.85,))  # fmt: skip
    return run_eval(config).summaries


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per protocol, one column per (set, model)."""
    columns = [("home", ZERO_SHOT), ("shifted", ZERO_SHOT), ("shifted", FINE_TUNED),
               ("home", FINE_TUNED), ("unseen", ZERO_SHOT), ("unseen", FINE_TUNED)]  # fmt: skip
    names = {ZERO_SHOT: "zero-shot", FINE_TUNED: "fine-tuned"}
    head = [f"{names[m]} {s}" for s, m in columns]
    lines = ["| protocol | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, key in PROTOCOLS:
        cells = [f"{results[s][m][key]:.3f}" for s, m in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    counts = [f"{int(results[s][m]['n_objects'])}" for s, m in columns]
    lines.append("| objects | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def targets(results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The issue's targets, each with its numbers and PASS / MISS."""

    def gain(name: str, key: str) -> float:
        return results[name][FINE_TUNED][key] - results[name][ZERO_SHOT][key]

    checks = [("zero-shot home box mIoU >= 0.70", results["home"][ZERO_SHOT]["box_miou"], 0.70)]
    for name in ("shifted", "unseen"):
        for label, key in (("box", "box_miou"), ("1 click", "miou@1")):
            text = f"{name}: fine-tuned - zero-shot {label} >= +0.10"
            checks.append((text, gain(name, key), 0.10))
    drop = -gain("home", "box_miou")
    lines = [f"{'PASS' if value >= goal else 'MISS'}  {text}: {value:+.3f}"
             for text, value, goal in checks]  # fmt: skip
    lines.append(f"{'PASS' if drop <= 0.05 else 'MISS'}  home box drop <= 0.05: {drop:+.3f}")
    return lines


def compare_lr(cache: str, work: Path, args: argparse.Namespace) -> list[str]:
    """Val mIoU (box and 1 click, from ``decoder eval``) after fine-tuning at each lr; the run
    at ``--lr``, when compared, is reused as the main run."""
    lines = ["| lr | val box mIoU | val 1-click mIoU | seconds |", "|---|---|---|---|"]
    for lr in [float(v) for v in args.compare_lr.split(",") if v]:
        started = time.perf_counter()
        run = work / ("run" if lr == args.lr else f"run_lr{lr:g}")
        fine_tune(cache, run, args, lr=lr)
        ft = evaluate(cache, run, "val", work / f"report_lr{lr:g}")[FINE_TUNED]
        seconds = time.perf_counter() - started
        lines.append(f"| {lr:g} | {ft['box_miou']:.3f} | {ft['miou@1']:.3f} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    return lines


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="Folder (default: a temp dir).")
    parser.add_argument("--n-home", type=int, default=16)
    parser.add_argument("--n-shifted", type=int, default=48)
    parser.add_argument("--n-unseen", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--images-per-step", type=int, default=4)
    parser.add_argument("--objects-per-image", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--compare-lr", default="", help="e.g. 1e-5,1e-4,3e-4,1e-3")
    parser.add_argument("--n-replay", type=int, default=32,
                        help="Home images (seed 101) mixed into fine-tuning (decoder train "
                        "--replay); 0: none.")  # fmt: skip
    parser.add_argument("--replay-images", type=int, default=-1, help="decoder train's.")
    parser.add_argument("--seed", type=int, default=0, help="decoder train --seed.")
    parser.add_argument("--checkpoint", default=None, help="Default: the bundled weights.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shared CPU).")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"{MODEL}: a demonstration model trained on synthetic shapes, NOT a substitute for "
              f"SAM. Work folder {work}", flush=True)  # fmt: skip
        print(f"  encoder: {encode_seconds(args.checkpoint):.3f} s per 1024x1024 image (fp32, "
              f"{torch_threads()} threads, median of 5)", flush=True)  # fmt: skip
        caches = {name: make_cache(work, name, getattr(args, f"n_{name}"), args.checkpoint)
                  for name in SETS}  # fmt: skip
        args.replay_cache = (make_cache(work, "replay", args.n_replay, args.checkpoint)
                             if args.n_replay else None)  # fmt: skip
        if args.compare_lr:
            print("\n".join(compare_lr(caches["shifted"], work, args)))
        run = work / "run"
        if args.lr not in [float(v) for v in args.compare_lr.split(",") if v]:
            fine_tune(caches["shifted"], run, args, lr=args.lr)
        splits = {"home": "all", "shifted": "val", "unseen": "all"}
        results = {name: evaluate(caches[name], run, splits[name], work / f"report_{name}")
                   for name in SETS}  # fmt: skip
        replay = f", replaying {args.n_replay} home images" if args.n_replay else ""
        print(f"\nfine-tuned on shifted train ({args.epochs} epochs, {args.iterations} prompt "
              f"iterations, lr {args.lr:g}{replay}); mIoU:\n")  # fmt: skip
        print(table(results))
        print()
        print("\n".join(targets(results)))


if __name__ == "__main__":
    main()
