"""Do stored views (`embed run --views`) help when there are few training images? And what do
they cost?

For each training-set size (``--sizes``, default 8,16,32 images) a shifted-domain synthetic VOC
set (``make_synthetic_voc(..., domain="shifted")``, seed 1) is embedded twice with
``samcache_tiny`` (the bundled weights; a demonstration model, NOT a substitute for SAM): once
plain, once with ``--views`` (default hflip,vflip,rot90). The decoder is fine-tuned on each for
the same number of steps (the steps depend only on the number of images), once without and once
with ``decoder train --views``, and evaluated with ``decoder eval``'s code (``run_eval``: box
and 1 click) on an unseen shifted set (seed 2, ``--n-val`` images, originals only). The table
also gives the cost: cache size on disk and embedding time without and with views.

    PYTHONPATH=. nice -n 10 python bench/bench_views.py [--work DIR] [--sizes 8,16,32]
        [--views hflip,vflip,rot90] [--n-val 16] [--epochs 4] [--iterations 3]

Smoke run (seconds to a few minutes on a loaded 2-core CPU):
    PYTHONPATH=. python bench/bench_views.py --sizes 4 --n-val 4 --epochs 1 --iterations 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.cache_io import ok_rows, open_cache  # noqa: E402
from stage1_embed.config import EmbedConfig  # noqa: E402
from stage1_embed.pipeline import run_embed  # noqa: E402
from stage1_embed.synthetic import make_synthetic_voc  # noqa: E402
from stage2_decoder.config import TrainConfig  # noqa: E402
from stage2_decoder.eval_report import run_eval  # noqa: E402
from stage2_decoder.evaluate import EvalConfig  # noqa: E402
from stage2_decoder.export import FINE_TUNED, ZERO_SHOT  # noqa: E402
from stage2_decoder.train import train  # noqa: E402

MODEL = "samcache_tiny"
VAL_FRACTION = 0.2  # of each training set's images, held out for train()'s own validation


def embed(images: Path, cache: Path, views: str, checkpoint: str | None) -> tuple[float, int]:
    """Embed ``images`` into ``cache`` (with ``views``); (seconds, bytes on disk)."""
    summary = run_embed(EmbedConfig(
        images=str(images), out=str(cache), model_type=MODEL, precision="fp32", download=False,
        checkpoint=checkpoint, views=views,
    ))  # fmt: skip
    location = open_cache(cache).location
    return summary.seconds, int(location.fs.du(location.path, total=True))


def n_train_images(cache: Path) -> int:
    splits = ok_rows(open_cache(cache).location, ["split"]).column("split").to_pylist()
    return sum(s == "train" for s in splits)


def fine_tune(cache: Path, out: Path, args: argparse.Namespace, views: str) -> int:
    """``decoder train`` (CPU budget options, seed 0); returns its number of steps."""
    config = TrainConfig(
        cache=str(cache), out=str(out), epochs=args.epochs, iterations=args.iterations,
        images_per_step=args.images_per_step, objects_per_image=args.objects_per_image,
        num_workers=0, seed=0, views=views,
    )  # fmt: skip
    return train(config).steps


def evaluate(val_cache: Path, run: Path, out: Path) -> dict[str, dict[str, float]]:
    config = EvalConfig(cache=str(val_cache), out=str(out), run=str(run), split="all",
                        clicks=(1,), max_clicks=1, noc_thresholds=(0.85,))  # fmt: skip
    return run_eval(config).summaries


def one_size(n: int, val_cache: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    """Embed, fine-tune without and with views, evaluate: one row of the table."""
    total = max(2, round(n / (1 - VAL_FRACTION)))
    voc = make_synthetic_voc(work / f"train{n}", n_images=total, seed=1, domain="shifted",
                             val_fraction=VAL_FRACTION)  # fmt: skip
    plain, viewed = work / f"train{n}.zarr", work / f"train{n}_views.zarr"
    plain_s, plain_bytes = embed(voc / "JPEGImages", plain, "", args.checkpoint)
    views_s, views_bytes = embed(voc / "JPEGImages", viewed, args.views, args.checkpoint)
    steps = fine_tune(plain, work / f"run{n}", args, "")
    steps_views = fine_tune(viewed, work / f"run{n}_views", args, args.views)
    base = evaluate(val_cache, work / f"run{n}", work / f"report{n}")
    with_views = evaluate(val_cache, work / f"run{n}_views", work / f"report{n}_views")
    row = {
        "n": n_train_images(plain), "steps": f"{steps}/{steps_views}",
        "zs_box": base[ZERO_SHOT]["box_miou"], "zs_1": base[ZERO_SHOT]["miou@1"],
        "box": base[FINE_TUNED]["box_miou"], "click": base[FINE_TUNED]["miou@1"],
        "v_box": with_views[FINE_TUNED]["box_miou"], "v_click": with_views[FINE_TUNED]["miou@1"],
        "bytes": plain_bytes, "v_bytes": views_bytes, "s": plain_s, "v_s": views_s,
    }  # fmt: skip
    print(f"  {n}: done ({row})", flush=True)
    return row


def table(rows: list[dict[str, object]], views: str) -> str:
    head = ["train images", "steps (plain/views)", "zero-shot box", "zero-shot 1 click",
            "fine-tuned box", "+ views box", "fine-tuned 1 click", "+ views 1 click",
            "cache MiB (plain → views)", "embed s (plain → views)"]  # fmt: skip
    lines = [f"views: {views}", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [
            str(r["n"]), str(r["steps"]), f"{r['zs_box']:.3f}", f"{r['zs_1']:.3f}",
            f"{r['box']:.3f}", f"{r['v_box']:.3f}", f"{r['click']:.3f}", f"{r['v_click']:.3f}",
            f"{r['bytes'] / 2**20:.1f} → {r['v_bytes'] / 2**20:.1f}",
            f"{r['s']:.1f} → {r['v_s']:.1f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="Folder (default: a temp dir).")
    parser.add_argument("--sizes", default="8,16,32", help="Training-set sizes (images).")
    parser.add_argument("--views", default="hflip,vflip,rot90")
    parser.add_argument("--n-val", type=int, default=16, help="Images of the unseen eval set.")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--images-per-step", type=int, default=4)
    parser.add_argument("--objects-per-image", type=int, default=4)
    parser.add_argument("--checkpoint", default=None, help="Default: the bundled weights.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shared CPU).")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"{MODEL}: a demonstration model, NOT a substitute for SAM. Work folder {work}")
        val_voc = make_synthetic_voc(work / "unseen", n_images=args.n_val, seed=2,
                                     domain="shifted")  # fmt: skip
        val_cache = work / "unseen.zarr"
        embed(val_voc / "JPEGImages", val_cache, "", args.checkpoint)
        rows = [one_size(int(n), val_cache, work, args) for n in args.sizes.split(",") if n]
        print(f"\nmIoU on {args.n_val} unseen shifted images ({args.epochs} epochs, "
              f"{args.iterations} prompt iterations, seed 0):\n")  # fmt: skip
        print(table(rows, args.views))


if __name__ == "__main__":
    main()
