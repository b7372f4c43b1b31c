"""TrainConfig, the lr schedule, the interactive step (overfit one batch) and train()'s errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from shared.cache_format import CacheMismatchError
from shared.cache_io import open_cache
from shared.checkpoint_files import make_random_checkpoint
from shared.sam_models import CheckpointError
from stage2_decoder import step as step_module
from stage2_decoder.config import ConfigError, TrainConfig, merge_resumed
from stage2_decoder.dataset import TrainBatches, ValBatches, generator_for, load_split
from stage2_decoder.losses import LossOutput
from stage2_decoder.schedule import default_warmup, lr_at
from stage2_decoder.setup import build_model, find_sam_checkpoint, make_optimizer
from stage2_decoder.step import NonFiniteLossError, StepSettings, interactive_step
from stage2_decoder.train import train
from stage2_decoder.validate import validate
from tests.cache_factory import make_cache

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("train") / "cache.zarr"
    return str(make_cache(path, tiny_checkpoint, n_images=4, objects_per_image=1))


# --------------------------------------------------------------------------- config


def test_config_validates_and_names_the_option() -> None:
    assert TrainConfig(cache="c", out="o", prompts="box,point").prompts == ("point", "box")
    bad = {
        "prompts": ("mask", "--prompts: 'mask'"),
        "iterations": (0, "--iterations must be >= 1"),
        "lr": (-1.0, "--lr must be a positive number"),
        "val_fraction": (1.0, "--val-fraction must be in"),
        "loss": ("l2", "--loss 'l2' is not one of"),
        "precision": ("fp8", "--precision 'fp8'"),
        "grad_accum": (0, "--grad-accum must be >= 1"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            TrainConfig(cache="c", out="o", **{name: value})
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        TrainConfig(cache="c", out="o", precision="fp16", device="cpu")


def test_config_round_trip_and_resume_merge() -> None:
    saved = TrainConfig(cache="c", out="o", epochs=3, lr=3e-4, prompts="point")
    assert TrainConfig.from_dict(saved.to_dict()) == saved
    given = TrainConfig(cache="moved", out="o", epochs=5, lr=3e-4, num_workers=0, resume=True)
    merged, conflicts = merge_resumed(saved, given, explicit={"epochs", "lr", "num_workers"})
    assert (merged.epochs, merged.prompts, merged.cache, merged.num_workers) == (
        3, ("point",), "moved", 0,
    )  # fmt: skip
    assert merged.resume
    assert conflicts == ["--epochs 5 (checkpoint: 3)"]  # lr equal; num_workers operational
    _, all_conflicts = merge_resumed(saved, given)
    assert "--prompts point,box (checkpoint: point)" in all_conflicts


# --------------------------------------------------------------------------- schedule


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    assert default_warmup(100) == 5 and default_warmup(100_000) == 250 and default_warmup(9, 3) == 3
    rates = [lr_at(s, lr=1.0, warmup=5, total=100, min_lr_ratio=0.1) for s in range(100)]
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert rates[5] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:], strict=False))


def test_mask_only_iterations_follow_sams_recipe() -> None:
    for seed in range(20):
        chosen = step_module.mask_only_iterations(11, generator_for(seed, 7))
        assert 10 in chosen and len(chosen) == 2 and all(1 <= k <= 10 for k in chosen)
    draws = {min(step_module.mask_only_iterations(11, generator_for(s, 7))) for s in range(60)}
    assert len(draws) > 4  # the random position varies
    assert step_module.mask_only_iterations(1, generator_for(0)) == set()
    assert step_module.mask_only_iterations(2, generator_for(0)) == set()
    assert step_module.mask_only_iterations(3, generator_for(0)) == {2}


# --------------------------------------------------------------------------- model and step


def test_only_the_mask_decoder_is_trainable_by_default(tiny_checkpoint: Path) -> None:
    model = build_model("vit_tiny_random", tiny_checkpoint, train_prompt_encoder=False)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mask_decoder"}
    both = build_model("vit_tiny_random", tiny_checkpoint, train_prompt_encoder=True)
    assert all(p.requires_grad for p in both.parameters())


def test_sam_checkpoint_is_found_by_sha256_and_another_is_refused(
    cache: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    attrs = open_cache(cache).attrs
    assert find_sam_checkpoint(attrs, None, "c.zarr") == Path(attrs.checkpoint_path)
    moved = tmp_path / "moved.pth"
    moved.write_bytes(tiny_checkpoint.read_bytes())
    assert find_sam_checkpoint(attrs, str(moved), "c.zarr") == moved
    other = make_random_checkpoint("vit_tiny_random", tmp_path / "other.pth", seed=1)
    with pytest.raises(CacheMismatchError, match=r"c.zarr was made with vit_tiny_random .*given"):
        find_sam_checkpoint(attrs, str(other), "c.zarr")
    with pytest.raises(CheckpointError, match="does not exist"):
        find_sam_checkpoint(attrs, str(tmp_path / "nope.pth"), "c.zarr")


def test_overfit_one_batch(cache: str, tiny_checkpoint: Path) -> None:
    """One object, a fixed box prompt, single shot: the loss must fall below 20 % of its start."""
    torch.manual_seed(0)
    split = load_split(cache, 0.25, seed=0)
    data = TrainBatches(cache, split.train, images_per_step=1, objects_per_image=1, seed=0,
                        epochs=1)  # fmt: skip
    batch = data[0]
    model = build_model("vit_tiny_random", tiny_checkpoint, train_prompt_encoder=False)
    config = TrainConfig(cache=cache, out="-", lr=1e-3, weight_decay=0.0)
    optimizer = make_optimizer(model, config)
    settings = StepSettings(prompt_mode="box", iterations=1)
    losses = []
    for step in range(40):
        for group in optimizer.param_groups:  # 1e-3, then 1e-4 for the last 10 steps
            group["lr"] = 1e-3 if step < 30 else 1e-4
        result = interactive_step(model, batch, settings, generator_for(0, 1), device=CPU)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(result.loss)
    print("overfit losses:", " ".join(f"{v:.3f}" for v in losses))
    assert losses[-1] < 0.2 * losses[0], losses
    assert result.parts["iou"] > 0.8
    # The same object, evaluated at the original resolution with its exact box, is found too.
    image = split.train.slice(data.positions(0, 0)[0], 1)
    val = validate(model, [ValBatches(cache, image, 1)[0]], device=CPU)
    assert val.n_objects == 1 and val.miou_box > 0.8, val


def test_iterations_add_clicks_and_backward_each(cache: str, tiny_checkpoint: Path) -> None:
    split = load_split(cache, 0.25, seed=0)
    batch = TrainBatches(cache, split.train, images_per_step=1, objects_per_image=1, seed=0,
                         epochs=1)[0]  # fmt: skip
    model = build_model("vit_tiny_random", tiny_checkpoint, train_prompt_encoder=False)
    calls: list[tuple[int, bool]] = []
    forward = model.forward

    def spy(embeddings, index, coords, labels, mask_input=None, has_mask_input=None):
        calls.append((coords.shape[1], mask_input is not None))
        return forward(embeddings, index, coords, labels, mask_input, has_mask_input)

    model.forward = spy  # type: ignore[method-assign]
    settings = StepSettings(prompt_mode="point", iterations=4)
    result = interactive_step(model, batch, settings, generator_for(0, 2), device=CPU)
    mask_only = step_module.mask_only_iterations(4, generator_for(0, 2))
    widths = [w for w, _ in calls]
    assert [m for _, m in calls] == [False, True, True, True]
    assert widths[-1] == widths[0] + 3 - len(mask_only)  # one click per non-mask-only iteration
    assert result.prompt_iterations == 4 * batch.n_objects
    assert any(p.grad is not None for p in model.mask_decoder.parameters())
    assert all(p.grad is None for p in model.prompt_encoder.parameters())


# --------------------------------------------------------------------------- train()


def _config(cache: str, out: Path, **kwargs) -> TrainConfig:
    options = {
        "epochs": 1, "iterations": 1, "images_per_step": 2, "objects_per_image": 1,
        "num_workers": 0, "precision": "fp32", "val_fraction": 0.25, "log_every": 1,
    }  # fmt: skip
    return TrainConfig(cache=cache, out=str(out), **{**options, **kwargs})


def test_non_finite_loss_stops_with_step_and_parts(cache: str, tmp_path: Path, monkeypatch) -> None:
    def nan_loss(logits, *args, **kwargs) -> LossOutput:
        nan = logits.sum() * float("nan")
        return LossOutput(nan, nan.reshape(1), torch.zeros(1, dtype=torch.long),
                          {"focal": nan.detach(), "dice": torch.tensor(0.5)})  # fmt: skip

    monkeypatch.setattr(step_module, "sam_loss", nan_loss)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 1 .*focal=nan, dice=0\.5"):
        train(_config(cache, tmp_path / "run"))


def test_train_writes_the_run_folder_and_keeps_frozen_parts(cache: str, tmp_path: Path) -> None:
    summary = train(_config(cache, tmp_path / "run", epochs=2))
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == [".samcache-output.json", "best.pt", "config.json", "curves.png", "last.pt",
                     "metrics.jsonl", "train.lock"]  # fmt: skip
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == summary.steps == 4 and state["epoch"] == 2
    assert state["cache"]["model_type"] == "vit_tiny_random"
    reference = build_model("vit_tiny_random", Path(open_cache(cache).attrs.checkpoint_path), False)
    same = {n: torch.equal(state["model"][n], t) for n, t in reference.state_dict().items()}
    assert all(v for n, v in same.items() if n.startswith("prompt_encoder."))  # frozen
    assert not all(v for n, v in same.items() if n.startswith("mask_decoder."))  # trained
    assert 0.0 <= summary.best_miou <= 1.0 and summary.prompt_iterations_per_s > 0
    with pytest.raises(ValueError, match="already holds a run .*--resume"):
        train(_config(cache, tmp_path / "run"))
    with pytest.raises(ValueError, match="no checkpoint at .*last.pt"):
        train(_config(cache, tmp_path / "fresh", resume=True))
    assert dataclasses.asdict(_config(cache, tmp_path))["iterations"] == 1
