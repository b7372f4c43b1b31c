"""Shared pytest fixtures: random-weight SAM checkpoints and the VOC 2007 sample (tests/data).

Fixtures here are the ones several test files need; keep topic-specific fixtures in their own
test files. No fixture downloads anything: every checkpoint is random (NOT pretrained).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from shared.checkpoint_files import make_random_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
VOC_SAMPLE = Path(__file__).resolve().parent / "data/voc2007_sample/VOCdevkit/VOC2007"

# Tests are sized for a 2-core CPU; more threads than cores only adds contention.
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when CUDA is unavailable."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seed-0 ``vit_tiny_random`` checkpoint (Meta's file format, ~20 MB, < 1 s)."""
    path = tmp_path_factory.mktemp("checkpoints") / "samcache_vit_tiny_random_seed0.pth"
    return make_random_checkpoint("vit_tiny_random", path, seed=0)


@pytest.fixture(scope="session")
def vit_b_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-size random ViT-B in Meta's official format (~375 MB on disk, a few seconds)."""
    path = tmp_path_factory.mktemp("checkpoints") / "random_vit_b_seed0.pth"
    return make_random_checkpoint("vit_b", path, seed=0)


@pytest.fixture(scope="session")
def voc_sample_dir() -> Path:
    """``VOCdevkit/VOC2007`` of the VOC 2007 sample that ships in ``tests/data`` (never skipped)."""
    assert (VOC_SAMPLE / "JPEGImages").is_dir(), f"the VOC 2007 sample is missing at {VOC_SAMPLE}"
    return VOC_SAMPLE
