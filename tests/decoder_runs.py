"""A fake `decoder train` run folder for tests of the commands after training.

``make_run`` writes ``best.pt`` / ``last.pt`` in the trainer's checkpoint format (E's
``checkpoints.save_checkpoint``) holding the cache checkpoint's prompt encoder and mask decoder
with seeded perturbations of the mask decoder, so "fine-tuned" masks differ from zero-shot ones
without a training run. Pure function of its arguments.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.cache_io import open_cache
from shared.sam_models import build_prompt_and_mask_decoder
from stage2_decoder import checkpoints as ck
from stage2_decoder.config import TrainConfig
from stage2_decoder.model import PromptableDecoder


def perturbed_decoder(
    model_type: str, checkpoint: str | Path, *, scale: float = 0.5, seed: int = 1
) -> PromptableDecoder:
    """The checkpoint's decoder with N(0, scale·std) noise added to every mask_decoder tensor."""
    model = PromptableDecoder(*build_prompt_and_mask_decoder(model_type, checkpoint))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("mask_decoder.") and parameter.numel() > 1:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * scale * parameter.std())
    return model.eval()


def make_run(
    run: str | Path,
    cache: str | Path,
    checkpoint: str | Path,
    *,
    scale: float = 0.5,
    seed: int = 1,
    which: tuple[str, ...] = ("best.pt", "last.pt"),
    step: int = 7,
) -> PromptableDecoder:
    """Write a run folder for ``cache`` and return its "fine-tuned" decoder."""
    attrs = open_cache(cache).attrs
    model = perturbed_decoder(attrs.model_type, checkpoint, scale=scale, seed=seed)
    config = TrainConfig(cache=str(cache), out=str(run), checkpoint=str(checkpoint))
    state = {
        "model": model.state_dict(),
        "optimizer": {},
        "scaler": None,
        "schedule": {"step": step, "warmup": 0, "total": step},
        "rng": ck.rng_state(),
        "epoch": 1,
        "step": step,
        "best_metric": 0.5,
        "config": config.to_dict(),
        "cache": {
            "model_type": attrs.model_type,
            "checkpoint_sha256": attrs.checkpoint_sha256,
            "checkpoint_name": attrs.checkpoint_name,
        },
    }
    Path(run).mkdir(parents=True, exist_ok=True)
    for name in which:
        ck.save_checkpoint(Path(run) / name, state)
    ck.write_json(Path(run) / ck.CONFIG, config.to_dict())
    return model
