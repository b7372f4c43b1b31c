"""`decoder train --replay`: home-domain images of a second cache mixed into every step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.checkpoint_files import make_random_checkpoint
from stage2_decoder import train as train_module
from stage2_decoder.config import ConfigError, TrainConfig
from stage2_decoder.dataset import TrainBatches, load_split
from stage2_decoder.replay import REPLAY_PREFIX, MixedBatches, ReplayBatches, join_batches
from stage2_decoder.train import train
from tests.cache_factory import make_cache

SPLITS = ["train"] * 6 + ["val"] * 2  # the replay cache's own split: val is never replayed


@pytest.fixture(scope="module")
def caches(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(main cache, replay cache): same checkpoint, other images (seeds), 2 objects each."""
    folder = tmp_path_factory.mktemp("replay")
    main = make_cache(folder / "main.zarr", tiny_checkpoint, n_images=5, objects_per_image=2)
    home = make_cache(folder / "home.zarr", tiny_checkpoint, n_images=8, objects_per_image=2,
                      splits=SPLITS, seed=7)  # fmt: skip
    return str(main), str(home)


def _config(cache: str, out: Path, **kwargs) -> TrainConfig:
    options = {
        "epochs": 2, "iterations": 1, "images_per_step": 2, "objects_per_image": 2,
        "num_workers": 0, "precision": "fp32", "val_fraction": 0.2, "log_every": 1, "seed": 4,
    }  # fmt: skip
    return TrainConfig(cache=cache, out=str(out), **{**options, **kwargs})


def _replay(home: str, seed: int = 4, images: int = 2, **kwargs) -> ReplayBatches:
    split = load_split(home, 0.2, seed)
    return ReplayBatches(home, split.train, images_per_step=images, objects_per_image=2,
                         seed=seed, **kwargs)  # fmt: skip


def test_replay_options_are_checked_and_the_default_mixes_one_to_one() -> None:
    assert TrainConfig("c", "o").replay_images_per_step == 0
    assert TrainConfig("c", "o", replay="h", images_per_step=8).replay_images_per_step == 8
    assert TrainConfig("c", "o", replay="h", images_per_step=1).replay_images_per_step == 1
    assert TrainConfig("c", "o", replay="h", replay_images=3).replay_images_per_step == 3
    with pytest.raises(ConfigError, match="--replay-images 2: give --replay CACHE"):
        TrainConfig("c", "o", replay_images=2)
    with pytest.raises(ConfigError, match="--replay-images 0"):
        TrainConfig("c", "o", replay="h", replay_images=0)
    with pytest.raises(ConfigError, match="--replay-images must be >= -1"):
        TrainConfig("c", "o", replay="h", replay_images=-2)
    saved = TrainConfig("c", "o", replay="h", replay_images=3)
    assert TrainConfig.from_dict(saved.to_dict()) == saved


def test_replay_draws_train_images_only_as_a_pure_function_of_epoch_and_micro(
    caches: tuple[str, str],
) -> None:
    _, home = caches
    first, again = _replay(home), _replay(home)
    draws = {(e, m): tuple(first.micro_batch(e, m)) for e in range(3) for m in range(4)}
    assert draws == {(e, m): tuple(again.micro_batch(e, m)) for e, m in draws}
    assert len(set(draws.values())) > 4  # drawn afresh per step
    assert all(len(set(d)) == 2 for d in draws.values())  # without replacement in a step
    seen = {REPLAY_PREFIX + i for e, m in draws for i in first.batch(e, m).image_ids}
    train_ids = {REPLAY_PREFIX + f"img{i:04d}" for i, s in enumerate(SPLITS) if s == "train"}
    assert seen <= train_ids and len(seen) >= 4  # never the val images img0006, img0007
    other_seed = _replay(home, seed=5)
    assert draws != {(e, m): tuple(other_seed.micro_batch(e, m)) for e, m in draws}


def test_ranks_share_a_replay_draw_without_overlap(caches: tuple[str, str]) -> None:
    _, home = caches
    whole = _replay(home, images=3).batch(1, 2)
    parts = [_replay(home, images=3, rank=r, world_size=2).batch(1, 2) for r in range(2)]
    assert sorted(parts[0].image_ids + parts[1].image_ids) == sorted(whole.image_ids)
    rows = torch.cat([p.object_rows for p in parts])
    assert sorted(rows.tolist()) == list(range(whole.rows_total))
    assert all(p.rows_total == whole.rows_total for p in parts)


def test_joined_batch_keeps_each_object_with_its_own_embedding(caches: tuple[str, str]) -> None:
    main_cache, home = caches
    main = TrainBatches(main_cache, load_split(main_cache, 0.2, 4).train, images_per_step=2,
                        objects_per_image=2, seed=4, epochs=1)  # fmt: skip
    replay = _replay(home)
    mixed = MixedBatches(main, replay)
    assert len(mixed) == len(main) and mixed.per_epoch == main.per_epoch
    expected = f"replay: 2 of the 6 train images of {home} in every micro-batch of 2"
    assert mixed.describe() == expected
    ours, theirs, joined = main.batch(0, 1), replay.batch(0, 1), mixed[1]
    assert joined.n_objects == ours.n_objects + theirs.n_objects > ours.n_objects
    assert (joined.epoch, joined.micro) == (0, 1)
    assert joined.rows_total == ours.rows_total + theirs.rows_total
    assert sorted(joined.object_rows.tolist()) == list(range(joined.rows_total))
    assert joined.image_ids == ours.image_ids + [REPLAY_PREFIX + i for i in theirs.image_ids]
    for k in range(joined.n_objects):  # embedding, target and box travel together
        mine = k < ours.n_objects
        source, j = (ours, k) if mine else (theirs, k - ours.n_objects)
        expected = source.image_embeddings[source.image_index[j]]
        assert torch.equal(joined.image_embeddings[joined.image_index[k]], expected)
        assert torch.equal(joined.targets[k], source.targets[j])
        assert torch.equal(joined.boxes_1024[k], source.boxes_1024[j])
    assert joined.object_input_sizes().shape == (joined.n_objects, 2)
    fp32 = replay.batch(0, 1)
    fp32.image_embeddings = fp32.image_embeddings.float()  # a replay cache stored in float32
    assert join_batches(ours, fp32).image_embeddings.dtype == ours.image_embeddings.dtype


def test_train_with_replay_steps_on_both_caches_and_resumes_exactly(
    caches: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main_cache, home = caches
    seen: list[list[str]] = []
    step = train_module.interactive_step

    def spy(model, batch, *args, **kwargs):
        seen.append(list(batch.image_ids))
        return step(model, batch, *args, **kwargs)

    monkeypatch.setattr(train_module, "interactive_step", spy)
    whole = train(_config(main_cache, tmp_path / "whole", replay=home, replay_images=1))
    assert whole.steps == len(seen) == 4  # 4 train images, 2 per step, 2 epochs
    assert all(sum(i.startswith(REPLAY_PREFIX) for i in ids) == 1 for ids in seen)
    assert all(sum(not i.startswith(REPLAY_PREFIX) for i in ids) == 2 for ids in seen)
    config = _config(main_cache, tmp_path / "split", replay=home, replay_images=1)
    stopped = train(config, should_stop=lambda epoch, miou, best: True)
    assert stopped.stopped_early and stopped.steps == 2
    train(TrainConfig(**{**config.__dict__, "resume": True}))
    resumed = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    reference = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_a_replay_cache_of_another_model_is_refused(
    caches: tuple[str, str], tmp_path: Path
) -> None:
    main_cache, _ = caches
    other = make_random_checkpoint("vit_tiny_random", tmp_path / "other.pth", seed=11)
    foreign = make_cache(tmp_path / "foreign.zarr", other, n_images=4)
    with pytest.raises(ConfigError, match="cannot be mixed. Embed the replay images"):
        train(_config(main_cache, tmp_path / "run", replay=str(foreign)))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_cli_replays_with_worker_processes_and_errors_in_one_line(
    caches: tuple[str, str], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from stage2_decoder.cli import app

    main_cache, home = caches
    fast = ["--epochs", "1", "--iterations", "1", "--images-per-step", "2",
            "--objects-per-image", "1", "--val-fraction", "0.2", "--precision", "fp32"]  # fmt: skip
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--cache", main_cache, "--out", str(out), *fast,
                                      "--replay", home, "--num-workers", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"replay: 2 of the 6 train images of {home} in every micro-batch of 2" in text
    saved = torch.load(out / "last.pt", weights_only=True)["config"]
    assert saved["replay"] == home and saved["replay_images"] == -1
    bad = CliRunner().invoke(app, ["train", "--cache", main_cache, "--out", str(tmp_path / "b"),
                                   *fast, "--replay-images", "2"])  # fmt: skip
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "--replay-images 2: give --replay CACHE" in " ".join(bad.output.split())
