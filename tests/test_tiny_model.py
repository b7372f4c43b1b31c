"""samcache_tiny: the bundled, pretrained demonstration model.

A test that a few dozen fine-tuning steps raise val mIoU on the shifted domain belongs here; with
the shipped weights (208 pretraining steps, README "Fine-tuning samcache_tiny: measured") it
failed, so it is not in the suite until better weights make it pass (issue 10 stays open).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.checkpoint_files import resolve_checkpoint
from shared.hashing import file_sha256
from shared.sam_models import (
    build_image_encoder,
    build_sam,
    bundled_checkpoint_path,
    describe_model_type,
    detect_model_type,
    load_state_dict,
)
from stage1_embed.config import EmbedConfig
from stage1_embed.pipeline import run_embed
from stage1_embed.synthetic import make_synthetic_voc
from stage2_decoder.dataset import ValBatches, load_split
from stage2_decoder.setup import build_model
from stage2_decoder.validate import validate

MODEL = "samcache_tiny"
CPU = torch.device("cpu")


def test_bundled_checkpoint_is_small_plain_and_found_without_download() -> None:
    path = resolve_checkpoint(MODEL, None, download=False)
    assert path == bundled_checkpoint_path(MODEL) and path.is_file()
    assert path.stat().st_size <= 20 * 2**20
    state_dict = load_state_dict(path)  # torch.load(weights_only=True)
    assert detect_model_type(state_dict) == MODEL
    prefixes = {key.split(".")[0] for key in state_dict}
    assert prefixes == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert "NOT a substitute for SAM" in describe_model_type(MODEL)


def test_samcache_tiny_has_sams_interface() -> None:
    path = bundled_checkpoint_path(MODEL)
    sam = build_sam(MODEL, path)
    assert next(sam.parameters()).dtype == torch.float32  # fp16 on disk, fp32 once loaded
    encoder = build_image_encoder(MODEL, path)
    with torch.no_grad():
        embedding = encoder(torch.zeros(1, 3, 1024, 1024))
    assert embedding.shape == (1, 256, 64, 64) and torch.isfinite(embedding).all()


@pytest.fixture(scope="module")
def shifted_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """10 shifted-domain images (VOC split: 6 train, 4 val) embedded with samcache_tiny."""
    root = tmp_path_factory.mktemp("shifted")
    voc = make_synthetic_voc(root, n_images=10, seed=3, domain="shifted", val_fraction=0.4)
    cache = root / "cache.zarr"
    run_embed(EmbedConfig(images=str(voc / "JPEGImages"), out=str(cache), model_type=MODEL,
                          precision="fp32", download=False))  # fmt: skip
    return str(cache)


def test_cache_records_the_bundled_checkpoint(shifted_cache: str) -> None:
    from shared.cache_io import open_cache

    attrs = open_cache(shifted_cache).attrs
    assert attrs.model_type == MODEL
    assert attrs.checkpoint_sha256 == file_sha256(bundled_checkpoint_path(MODEL))


def test_pretrained_tiny_is_better_than_random_on_home_data(tmp_path: Path) -> None:
    """Zero-shot 1-click mIoU on a few home images: far above the all-background (0) of a random
    decoder (bench_finetune measured 0.30 on 25 home objects; the shipped weights' single-mask
    output, used for boxes, is still empty: README, "Fine-tuning samcache_tiny: measured")."""
    voc = make_synthetic_voc(tmp_path, n_images=4, seed=5, val_fraction=0.5)
    cache = tmp_path / "home.zarr"
    run_embed(EmbedConfig(images=str(voc / "JPEGImages"), out=str(cache), model_type=MODEL,
                          precision="fp32", download=False))  # fmt: skip
    model = build_model(MODEL, bundled_checkpoint_path(MODEL), train_prompt_encoder=False)
    split = load_split(str(cache), 0.25, 0)
    result = validate(model, list(ValBatches(str(cache), split.val, 8)), device=CPU)
    assert result.miou_click > 0.15, result


def test_shifted_domain_is_deterministic_and_reads_as_voc(tmp_path: Path) -> None:
    from stage1_embed.sources import plan_sources

    first = make_synthetic_voc(tmp_path / "a", n_images=3, seed=7, domain="shifted")
    again = make_synthetic_voc(tmp_path / "b", n_images=3, seed=7, domain="shifted")
    home = make_synthetic_voc(tmp_path / "c", n_images=3, seed=7, domain="home")
    for name in ("000001.jpg", "000002.jpg"):
        shifted_bytes = (first / "JPEGImages" / name).read_bytes()
        assert shifted_bytes == (again / "JPEGImages" / name).read_bytes()
        assert shifted_bytes != (home / "JPEGImages" / name).read_bytes()
    sources = plan_sources(first / "JPEGImages")
    assert len(sources) == 3 and all(s.mask_path is not None for s in sources)
    with pytest.raises(ValueError, match="--domain 'moon'"):
        make_synthetic_voc(tmp_path / "d", n_images=1, domain="moon")
