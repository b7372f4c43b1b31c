"""Image-encoder benchmark: `EncoderRunner` variants against Meta's fp32 forward, in one run.

For each variant prints seconds per image, the speed-up over Meta's fp32 `ImageEncoderViT`
forward measured in the same round, the distance of its embeddings to that reference (max abs,
max abs / std of the reference, relative L2), the IoU of masks decoded from them (random-weight
prompt encoder and mask decoder of the same checkpoint, 8 point prompts per image, logits > 0
in the 256 frame) and the peak RSS of the process that ran it.

    PYTHONPATH=. python bench/bench_encoder.py [--images 2] [--rounds 2] [--threads 2]

Each variant runs in a fresh child process (so peak RSS is its own) that builds the same
random-weight checkpoint (NOT pretrained; Meta's init leaves the rel-pos tables at zero, so they
are filled with N(0, --rel-pos-std) to exercise that path), encodes one warm-up image and then
times --images images. The machine has 2 cores shared with other work: compare the ratios of
one round, and repeat (--rounds) when the load average printed beside them is high.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.checkpoint_files import make_random_checkpoint  # noqa: E402
from shared.sam_models import build_image_encoder, build_prompt_and_mask_decoder  # noqa: E402
from stage1_embed.encoder import EncoderRunner  # noqa: E402

VARIANTS = {
    "meta-fp32": "Meta's ImageEncoderViT forward, fp32 (reference)",
    "runner-fp32": "EncoderRunner fp32 (SDPA attention, rel-pos bias as attn_mask)",
    "meta-bf16-cast": "Meta's module and input cast to bf16 (FACTS baseline)",
    "runner-bf16": "EncoderRunner bf16 (default on this CPU), batch 1",
    "runner-bf16-b2": "EncoderRunner bf16, batches of 2",
}


def synthetic_batch(n: int, seed: int = 0) -> torch.Tensor:
    """n encoder inputs (n×3×1024×1024): smooth random 768×1024 RGB scenes, normalised, padded."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 12, 16, generator=gen) * 255.0
    fine = torch.rand(n, 3, 96, 128, generator=gen) * 40.0
    pixels = torch.nn.functional.interpolate(coarse, size=(768, 1024), mode="bilinear")
    pixels = pixels + torch.nn.functional.interpolate(fine, size=(768, 1024), mode="bilinear")
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    normalised = (pixels.clamp(0, 255).round() - mean) / std
    return torch.nn.functional.pad(normalised, (0, 0, 0, 1024 - 768))


def build_encoder(checkpoint: Path, rel_pos_std: float) -> torch.nn.Module:
    encoder = build_image_encoder("vit_b", checkpoint)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "rel_pos" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * rel_pos_std)
    return encoder


def make_encode_fn(variant: str, encoder: torch.nn.Module):
    """(function batch → B×256×64×64 float32, images per call) for ``variant``."""
    if variant == "meta-fp32":
        return lambda x: encoder(x), 1
    if variant == "meta-bf16-cast":
        encoder.to(torch.bfloat16)
        return lambda x: encoder(x.to(torch.bfloat16)).float(), 1
    runner = EncoderRunner(encoder, "fp32" if variant == "runner-fp32" else "bf16")
    return runner.encode, 2 if variant.endswith("-b2") else 1


def worker(args: argparse.Namespace) -> None:
    """Child process: time one variant, save its embeddings, print one JSON line."""
    torch.set_num_threads(args.threads)
    encode, per_call = make_encode_fn(args.worker, build_encoder(args.checkpoint, args.rel_pos_std))
    images = synthetic_batch(args.images)
    outputs = []
    with torch.inference_mode():
        encode(images[:per_call])  # warm-up: allocations, oneDNN primitives
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, args.images, per_call):
            outputs.append(encode(images[start : start + per_call]))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    torch.save(torch.cat(outputs), args.save)
    result = {
        "s_per_image": wall / args.images,
        "cpu_s_per_image": cpu / args.images,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load": os.getloadavg()[0],
    }
    print(json.dumps(result))


def run_variant(variant: str, args: argparse.Namespace, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--save", str(save)]
    cmd += ["--checkpoint", str(args.checkpoint), "--images", str(args.images)]
    cmd += ["--threads", str(args.threads), "--rel-pos-std", str(args.rel_pos_std)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mask_iou(decoder: tuple, reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Mean IoU of single-mask predictions (8 points per image) from two sets of embeddings."""
    prompt_encoder, mask_decoder = decoder
    grid = torch.tensor([[x, y] for y in (150, 400, 650) for x in (150, 500, 850)][:8])
    coords, labels = grid[:, None, :].float(), torch.ones(8, 1, dtype=torch.int)

    def masks(embedding: torch.Tensor) -> torch.Tensor:
        sparse, dense = prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        dense_pe = prompt_encoder.get_dense_pe()
        logits, _ = mask_decoder(embedding[None], dense_pe, sparse, dense, False)
        return logits > 0

    ious = []
    with torch.inference_mode():
        for ref, emb in zip(reference, embeddings, strict=True):
            a, b = masks(ref), masks(emb)
            inter, union = (a & b).sum(dim=(1, 2, 3)), (a | b).sum(dim=(1, 2, 3))
            ious.append(torch.where(union > 0, inter / union.clamp(min=1), 1.0).mean().item())
    return sum(ious) / len(ious)


def compare(reference: torch.Tensor, embeddings: torch.Tensor) -> dict:
    diff = (embeddings - reference).abs()
    return {
        "max_abs": diff.max().item(),
        "max_abs_over_std": (diff.max() / reference.std()).item(),
        "rel_l2": ((embeddings - reference).norm() / reference.norm()).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2, help="timed images per variant (even)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all variants this often")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--rel-pos-std", type=float, default=0.05)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        args.checkpoint = make_random_checkpoint("vit_b", Path(tmp) / "vit_b_random.pth")
        decoder = build_prompt_and_mask_decoder("vit_b", args.checkpoint)
        variants = ["meta-fp32"] + [v for v in args.variants if v != "meta-fp32"]
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}: ViT-B random weights, {args.images} images, "
                  f"{args.threads} threads")  # fmt: skip
            for v in variants:
                row = run_variant(v, args, Path(tmp) / f"{v}.pt")
                if v == "meta-fp32":
                    reference, base = torch.load(Path(tmp) / f"{v}.pt"), row
                    stored = reference.half().float()  # what an fp16 cache holds (context row)
                    print(format_stored(compare(reference, stored), decoder, reference, stored))
                emb = torch.load(Path(tmp) / f"{v}.pt")
                row |= compare(reference, emb)
                row["speedup"] = base["s_per_image"] / row["s_per_image"]
                row["cpu_speedup"] = base["cpu_s_per_image"] / row["cpu_s_per_image"]
                row["mask_iou"] = mask_iou(decoder, reference, emb)
                print(format_row(v, row), flush=True)


def format_stored(r: dict, decoder: tuple, reference: torch.Tensor, stored: torch.Tensor) -> str:
    iou = mask_iou(decoder, reference, stored)
    return (
        f"  {'(fp16 storage)':15s} of the reference: max_abs {r['max_abs']:.2e} "
        f"(/std {r['max_abs_over_std']:.3f})  rel_l2 {r['rel_l2']:.1e}  mask IoU {iou:.4f}"
    )


def format_row(variant: str, r: dict) -> str:
    return (
        f"  {variant:15s} {r['s_per_image']:6.2f} s/image  x{r['speedup']:4.2f}  "
        f"(CPU {r['cpu_s_per_image']:5.1f} s, x{r['cpu_speedup']:4.2f})  "
        f"max_abs {r['max_abs']:.2e} (/std {r['max_abs_over_std']:.3f})  "
        f"rel_l2 {r['rel_l2']:.1e}  mask IoU {r['mask_iou']:.4f}  "
        f"peak RSS {r['peak_rss_mib']:5.0f} MiB  load {r['load']:.1f}"
    )


if __name__ == "__main__":
    main()
