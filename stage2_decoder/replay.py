"""Replay: mix images of a second cache (the model's *home* data) into every training step.

Fine-tuning a pretrained decoder on a new domain makes it forget the old one (measured on
``samcache_tiny``: README, "Fine-tuning samcache_tiny"). The usual remedy is rehearsal: keep
showing the model some of what it was good at. ``decoder train --replay home.zarr`` adds
``--replay-images`` images of that cache to each micro-batch, so a step's loss is the mean over
the objects of both. The replay cache must be made with the very SAM checkpoint of ``--cache``
(its embeddings are then comparable); it is only trained on, never validated on, and only its
*train* split is used (the manifest's, or the same ``--val-fraction`` and ``--seed``), so
``decoder eval --cache home.zarr --split val`` measures forgetting on images replay never showed.

Exact resume holds: replay micro-batch ``(epoch, micro)`` draws its images from
``(seed, STREAM_REPLAY, epoch, micro)`` without replacement (with replacement across steps), and
their objects from streams of the replay seed ``derive_seed(seed, STREAM_REPLAY)``. With several
processes the replay images are shared out by rank like the main ones. Views (``--views``)
apply to the main cache only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from shared.cache_format import CacheAttrs
from shared.cache_io import open_cache
from stage2_decoder.config import ConfigError, TrainConfig
from stage2_decoder.dataset import (
    STREAM_REPLAY,
    ObjectBatch,
    TrainBatches,
    derive_seed,
    generator_for,
    load_split,
)
from stage2_decoder.guards import check_cache_finished

REPLAY_PREFIX = "replay:"  # before the image ids of replayed images (in messages)


class ReplayBatches(TrainBatches):
    """Replay micro-batches: ``images_per_step`` images drawn afresh for each (epoch, micro)."""

    def __init__(
        self, cache_path: str, images: pa.Table, *, images_per_step: int, objects_per_image: int,
        seed: int, rank: int = 0, world_size: int = 1,
    ) -> None:  # fmt: skip
        super().__init__(
            cache_path, images, images_per_step=images_per_step,
            objects_per_image=objects_per_image, seed=derive_seed(seed, STREAM_REPLAY),
            epochs=1, rank=rank, world_size=world_size,
        )  # fmt: skip
        self.draw_seed = seed

    def micro_batch(self, epoch: int, micro: int) -> np.ndarray:
        """Positions of the replay images of (epoch, micro), every rank's."""
        generator = generator_for(self.draw_seed, STREAM_REPLAY, epoch, micro)
        n_images = self.reader.images.num_rows
        return torch.randperm(n_images, generator=generator)[: self.images_per_step].numpy()


class MixedBatches(torch.utils.data.Dataset):
    """Item ``g`` = micro-batch ``g`` of ``main`` joined with the replay batch of its
    (epoch, micro). ``per_epoch`` and length are ``main``'s."""

    def __init__(self, main: TrainBatches, replay: ReplayBatches) -> None:
        self.main, self.replay = main, replay
        self.per_epoch = main.per_epoch

    def __len__(self) -> int:
        return len(self.main)

    def describe(self) -> str:
        """One line for the user: what is replayed, how much per step."""
        reader = self.replay.reader
        return (
            f"replay: {self.replay.images_per_step} of the {reader.images.num_rows} train images "
            f"of {reader.cache_path} in every micro-batch of {self.main.images_per_step}"
        )

    def __getitem__(self, index: int) -> ObjectBatch:
        epoch, micro = divmod(int(index), self.per_epoch)
        return join_batches(self.main.batch(epoch, micro), self.replay.batch(epoch, micro))


def join_batches(main: ObjectBatch, extra: ObjectBatch) -> ObjectBatch:
    """One training batch holding ``main``'s objects, then ``extra``'s (their image indices and
    global rows moved past ``main``'s); embeddings in ``main``'s dtype; (epoch, micro) of main."""
    offset = main.image_embeddings.shape[0]
    return ObjectBatch(
        image_embeddings=torch.cat(
            [main.image_embeddings, extra.image_embeddings.to(main.image_embeddings.dtype)]
        ),
        image_index=torch.cat([main.image_index, extra.image_index + offset]),
        targets=torch.cat([main.targets, extra.targets]),
        valid=torch.cat([main.valid, extra.valid]),
        boxes_1024=torch.cat([main.boxes_1024, extra.boxes_1024]),
        epoch=main.epoch,
        micro=main.micro,
        read_seconds=main.read_seconds + extra.read_seconds,
        object_rows=torch.cat([main.object_rows, extra.object_rows + main.rows_total]),
        rows_total=main.rows_total + extra.rows_total,
        input_sizes=main.input_sizes + extra.input_sizes,
        original_sizes=main.original_sizes + extra.original_sizes,
        image_ids=main.image_ids + [REPLAY_PREFIX + i for i in extra.image_ids],
    )


def replay_images(
    config: TrainConfig, main: CacheAttrs, warn: Callable[[str], None], is_main: bool = True
) -> pa.Table | None:
    """The images replay draws from (the train split of ``config.replay``; None without it).
    Refuses a replay cache made with another SAM checkpoint than ``--cache``, or one with
    nothing to train on; errors say what to do."""
    if not config.replay:
        return None
    replay = open_cache(config.replay)
    if is_main:
        check_cache_finished(replay, config.allow_partial_cache, warn)
    if replay.attrs.checkpoint_sha256 != main.checkpoint_sha256:
        raise ConfigError(
            f"--replay {replay.name} was made with {replay.attrs.describe_model()}, --cache with "
            f"{main.describe_model()}: embeddings of two encoders cannot be mixed. Embed the "
            "replay images with the same checkpoint (`embed run --images DIR --out NEW.zarr "
            "--checkpoint …`)"
        )
    # DataError when the replay cache has no train objects
    return load_split(config.replay, config.val_fraction, config.seed).train


def with_replay(
    data: TrainBatches, config: TrainConfig, images: pa.Table | None
) -> TrainBatches | MixedBatches:
    """``data`` joined with batches of the replay ``images`` (``data`` itself without them)."""
    if images is None:
        return data
    replay = ReplayBatches(
        config.replay, images, images_per_step=config.replay_images_per_step,
        objects_per_image=config.objects_per_image, seed=config.seed, rank=data.rank,
        world_size=data.world_size,
    )  # fmt: skip
    return MixedBatches(data, replay)
