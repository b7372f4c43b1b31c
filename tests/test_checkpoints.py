"""Training checkpoints, RNG states and metrics.jsonl (stage2_decoder.checkpoints)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from stage2_decoder import checkpoints as ck
from stage2_decoder.config import TrainConfig
from stage2_decoder.model import PromptableDecoder, build_meta_modules


def _state() -> dict:
    torch.manual_seed(0)
    model = PromptableDecoder(*build_meta_modules())
    model.prompt_encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = sum(p.float().square().sum() for p in model.mask_decoder.parameters())
    loss.backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    config = TrainConfig(cache="c.zarr", out="runs/x", prompts="box")
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "schedule": {"step": 3, "warmup": 1, "total": 10},
        "rng": ck.rng_state(),
        "epoch": 1,
        "step": 3,
        "best_metric": float("-inf"),
        "config": config.to_dict(),
        "cache": {"model_type": "vit_b", "checkpoint_sha256": "ab" * 32, "checkpoint_name": "x"},
    }


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path: Path) -> None:
    state = _state()
    path = ck.save_checkpoint(tmp_path / "run" / ck.LAST, state)
    assert [p.name for p in path.parent.iterdir()] == [ck.LAST]  # no temp file left
    raw = torch.load(path, weights_only=True)  # plain torch.load, the safe way
    assert raw["format"] == ck.CHECKPOINT_FORMAT and raw["step"] == 3
    loaded = ck.load_checkpoint(path)
    assert set(loaded["model"]) == set(state["model"])
    assert all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in loaded["model"])
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    assert TrainConfig.from_dict(loaded["config"]).prompts == ("box",)
    model = PromptableDecoder(*build_meta_modules())
    model.load_state_dict(ck.decoder_weights(loaded))
    optimizer = torch.optim.AdamW(list(model.mask_decoder.parameters()), lr=1e-3)
    optimizer.load_state_dict(loaded["optimizer"])  # same layout as saved


def test_load_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ck.ResumeError, match="no checkpoint at .*run without --resume"):
        ck.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ck.ResumeError, match="cannot read checkpoint"):
        ck.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ck.ResumeError, match="not a `decoder train` checkpoint"):
        ck.load_checkpoint(tmp_path / "other.pt")


def test_rng_state_round_trip() -> None:
    state = ck.rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(7)  # move every generator on
    ck.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_metric_sink_truncates_after_the_checkpoint_step(tmp_path: Path) -> None:
    sink = ck.MetricSink(tmp_path / ck.METRICS)
    for step in (1, 2, 3, 4):
        sink.write({"kind": "train", "step": step, "loss": 1.0 / step})
    sink.write({"kind": "val", "step": 4, "miou": 0.5})
    sink.close()
    with open(tmp_path / ck.METRICS, "a") as handle:
        handle.write('{"kind": "train", "st')  # a line torn by kill -9
    assert ck.MetricSink(tmp_path / ck.METRICS).truncate_after(2) == 4
    records = ck.read_metrics(tmp_path / ck.METRICS)
    assert [r["step"] for r in records] == [1, 2]
    assert ck.MetricSink(tmp_path / "absent.jsonl").truncate_after(0) == 0


def test_write_json_is_atomic_and_readable(tmp_path: Path) -> None:
    ck.write_json(tmp_path / "config.json", {"b": 1, "a": [1, 2]})
    ck.write_json(tmp_path / "config.json", {"c": 2})
    assert json.loads((tmp_path / "config.json").read_text()) == {"c": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
