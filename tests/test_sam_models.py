"""shared.sam_models: registry, checkpoint files, loading, builders (random weights only)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import urllib.error
from pathlib import Path

import pytest
import torch

from shared import checkpoint_files as cf
from shared import sam_models as sm
from shared.hashing import file_sha256
from tests.meta_reference import meta_sam_model_registry

_UNPICKLED: list[str] = []


def _record_unpickling() -> None:
    _UNPICKLED.append("code ran")


def _refuse(*args, **kwargs):
    raise AssertionError("the image encoder was built")


class _Payload:
    """Unpickling this runs ``_record_unpickling``: what weights_only loading must refuse."""

    def __reduce__(self):
        return (_record_unpickling, ())


# ---------------------------------------------------------------- registry


def test_encoder_configs_equal_meta_build_sam(monkeypatch):
    sm.import_sam_package()
    meta = importlib.import_module("segment_anything.build_sam")
    seen: dict[str, dict] = {}
    for name in ("vit_b", "vit_l", "vit_h"):
        monkeypatch.setattr(meta, "_build_sam", lambda n=name, **kw: seen.setdefault(n, kw))
        meta.sam_model_registry[name]()
    for name, kwargs in seen.items():
        spec = sm.MODEL_SPECS[name]
        assert (spec.embed_dim, spec.depth, spec.num_heads) == (
            kwargs["encoder_embed_dim"],
            kwargs["encoder_depth"],
            kwargs["encoder_num_heads"],
        )
        assert list(spec.global_attn_indexes) == list(kwargs["encoder_global_attn_indexes"])


def test_official_checkpoint_names_urls_and_hashes():
    for name, short in [("vit_b", "01ec64"), ("vit_l", "0b3195"), ("vit_h", "4b8939")]:
        spec = sm.MODEL_SPECS[name]
        assert spec.checkpoint_name == f"sam_{name}_{short}.pth" and spec.pretrained
        assert spec.url == f"https://dl.fbaipublicfiles.com/segment_anything/sam_{name}_{short}.pth"
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
    assert sm.MODEL_SPECS["vit_b"].sha256.startswith("ec2df627")  # cache_layout.md's example
    published = [spec.sha256 for spec in sm.MODEL_SPECS.values() if spec.sha256]
    assert len(set(published)) == len(published) == 3


def test_tiny_model_is_labelled_not_pretrained():
    spec = sm.MODEL_SPECS["vit_tiny_random"]
    assert not spec.pretrained and spec.url is None and spec.sha256 is None
    assert "NOT pretrained" in sm.describe_model_type("vit_tiny_random")
    assert "NOT pretrained" in (sm.__doc__ or "")
    assert "sam_vit_b_01ec64.pth" in sm.describe_model_type("vit_b")
    with pytest.raises(ValueError, match="unknown model type 'vit_x'"):
        sm.describe_model_type("vit_x")


# ---------------------------------------------------------------- random checkpoints


def test_random_checkpoint_is_deterministic_and_leaves_global_rng(tmp_path, tiny_checkpoint):
    state = torch.get_rng_state()
    again = cf.make_random_checkpoint("vit_tiny_random", tmp_path / "a.pth", seed=0)
    other = cf.make_random_checkpoint("vit_tiny_random", tmp_path / "b.pth", seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert file_sha256(again) == file_sha256(tiny_checkpoint) != file_sha256(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth"]  # no temp files


def test_tiny_model_outputs_real_embedding_shape(tiny_checkpoint):
    sam = sm.build_sam("vit_tiny_random", tiny_checkpoint)
    encoder = sm.build_image_encoder("vit_tiny_random", tiny_checkpoint)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedding = encoder(x)
        assert embedding.shape == (1, 256, 64, 64)
        assert torch.equal(embedding, sam.image_encoder(x))
    assert sm.count_parameters(sam.image_encoder) < 2_000_000


def test_parameter_counts(tiny_checkpoint):
    sam = sm.build_sam("vit_tiny_random", tiny_checkpoint)
    assert sm.count_parameters(sam.mask_decoder) == 4_058_340 == sm.MASK_DECODER_PARAMETERS
    assert sm.count_parameters(sam.prompt_encoder) == 6_220 == sm.PROMPT_ENCODER_PARAMETERS
    sm.check_decoder_parameter_counts(sam.prompt_encoder, sam.mask_decoder)
    with pytest.raises(sm.CheckpointError, match="4,058,340"):
        sm.check_decoder_parameter_counts(sam.prompt_encoder, torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- loading


def test_detect_model_type(tiny_checkpoint):
    state_dict = sm.load_state_dict(tiny_checkpoint)
    assert sm.detect_model_type(state_dict) == "vit_tiny_random"
    with pytest.raises(sm.CheckpointError, match="no image encoder"):
        sm.detect_model_type(sm.decoder_checkpoint_filter(state_dict))
    state_dict = {k: v for k, v in state_dict.items() if ".blocks.1." not in k}
    with pytest.raises(sm.CheckpointError, match="64 channels, 1 blocks"):
        sm.detect_model_type(state_dict)


def test_wrong_model_type_names_both(tiny_checkpoint):
    expected = (
        f"checkpoint {tiny_checkpoint} holds a vit_tiny_random model "
        "(image_encoder.patch_embed has 64 channels); --model-type is vit_b"
    )
    for build in (sm.build_sam, sm.build_image_encoder, sm.build_prompt_and_mask_decoder):
        with pytest.raises(sm.CheckpointError) as error:
            build("vit_b", tiny_checkpoint)
        assert str(error.value) == expected


def test_weights_only_refuses_pickled_objects(tmp_path, tiny_checkpoint):
    state_dict = sm.load_state_dict(tiny_checkpoint)
    path = tmp_path / "evil.pth"
    torch.save({**state_dict, "payload": _Payload()}, path)
    with pytest.raises(sm.CheckpointError, match="holds pickled objects other than tensors"):
        sm.build_sam("vit_tiny_random", path)
    assert _UNPICKLED == []


def test_model_key_and_bad_files(tmp_path, tiny_checkpoint):
    state_dict = sm.load_state_dict(tiny_checkpoint)
    torch.save({"model": state_dict, "epoch": 3}, tmp_path / "wrapped.pth")
    assert sm.load_state_dict(tmp_path / "wrapped.pth").keys() == state_dict.keys()
    torch.save({"epoch": 3}, tmp_path / "not_sam.pth")
    with pytest.raises(sm.CheckpointError, match="not a SAM state dict"):
        sm.load_state_dict(tmp_path / "not_sam.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(sm.CheckpointError, match="junk.pth"):
        sm.load_state_dict(tmp_path / "junk.pth")
    with pytest.raises(sm.CheckpointError, match="does not exist"):
        sm.load_state_dict(tmp_path / "missing.pth")
    del state_dict["mask_decoder.iou_token.weight"]
    torch.save(state_dict, tmp_path / "partial.pth")
    with pytest.raises(
        sm.CheckpointError, match="does not fit Sam: missing mask_decoder.iou_token.weight$"
    ):
        sm.build_sam("vit_tiny_random", tmp_path / "partial.pth")


def test_decoder_builder_never_builds_the_image_encoder(monkeypatch, tmp_path, tiny_checkpoint):
    monkeypatch.setattr(sm.sam_modeling().ImageEncoderViT, "__init__", _refuse)
    state_dict = sm.load_state_dict(tiny_checkpoint)
    prompt_encoder, mask_decoder = sm.build_prompt_and_mask_decoder(
        "vit_tiny_random", tiny_checkpoint
    )
    assert not prompt_encoder.training and not mask_decoder.training
    for key, value in mask_decoder.state_dict().items():
        assert torch.equal(value, state_dict[f"mask_decoder.{key}"])
    for key, value in prompt_encoder.state_dict().items():
        assert torch.equal(value, state_dict[f"prompt_encoder.{key}"])
    kept = sm.decoder_checkpoint_filter(state_dict)
    assert kept and all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in kept)
    assert len(kept) == len(prompt_encoder.state_dict()) + len(mask_decoder.state_dict())
    torch.save(kept, tmp_path / "decoder_only.pth")  # a decoder-only file is accepted too
    sm.build_prompt_and_mask_decoder("vit_b", tmp_path / "decoder_only.pth")
    with pytest.raises(AssertionError, match="image encoder was built"):
        sm.build_sam("vit_tiny_random", tiny_checkpoint)  # the patch is really in effect


# ---------------------------------------------------------------- full-size ViT-B


@pytest.mark.slow
def test_vit_b_round_trip_into_meta_registry(vit_b_checkpoint):
    meta_sam = meta_sam_model_registry()["vit_b"](checkpoint=str(vit_b_checkpoint))  # strict
    ours = sm.build_sam("vit_b", vit_b_checkpoint)
    theirs = meta_sam.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    for key in ("image_encoder.patch_embed.proj.weight", "mask_decoder.iou_token.weight"):
        assert torch.equal(ours.state_dict()[key], theirs[key])
    assert sm.detect_model_type(theirs) == "vit_b"
    assert sm.count_parameters(ours.image_encoder) == 89_670_912


@pytest.mark.slow
def test_vit_b_wrong_type_and_decoder_only(monkeypatch, vit_b_checkpoint):
    with pytest.raises(sm.CheckpointError) as error:
        sm.build_image_encoder("vit_l", vit_b_checkpoint)
    assert str(error.value).endswith(
        "holds a vit_b model (image_encoder.patch_embed has 768 channels); --model-type is vit_l"
    )
    monkeypatch.setattr(sm.sam_modeling().ImageEncoderViT, "__init__", _refuse)
    prompt_encoder, mask_decoder = sm.build_prompt_and_mask_decoder("vit_b", vit_b_checkpoint)
    sm.check_decoder_parameter_counts(prompt_encoder, mask_decoder)


# ---------------------------------------------------------------- resolve_checkpoint


def test_default_checkpoint_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SAMCACHE_HOME", str(tmp_path / "home"))
    assert cf.default_checkpoint_dir() == tmp_path / "home" / "checkpoints"
    monkeypatch.delenv("SAMCACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cf.default_checkpoint_dir() == tmp_path / ".cache" / "samcache" / "checkpoints"


def test_resolve_given_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SAMCACHE_HOME", str(tmp_path))
    given = tmp_path / "mine.pth"
    given.write_bytes(b"x")
    assert cf.resolve_checkpoint("vit_b", given) == given
    with pytest.raises(sm.CheckpointError, match="missing.pth does not exist"):
        cf.resolve_checkpoint("vit_b", tmp_path / "missing.pth")
    cached = tmp_path / "checkpoints" / "sam_vit_l_0b3195.pth"
    cached.parent.mkdir()
    cached.write_bytes(b"y")
    assert cf.resolve_checkpoint("vit_l", None) == cached
    with pytest.raises(sm.CheckpointError, match="downloading is off"):
        cf.resolve_checkpoint("vit_h", None, download=False)


def test_resolve_offline_says_what_to_pass(monkeypatch, tmp_path):
    def offline(url, out, timeout_s=60.0):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(cf, "_download_url", offline)
    directory = tmp_path / "ckpts"
    with pytest.raises(sm.CheckpointError) as error:
        cf.resolve_checkpoint("vit_b", None, directory=directory)
    url = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert str(error.value) == (
        "could not download sam_vit_b_01ec64.pth (<urlopen error Temporary failure in name "
        f"resolution>); download it from {url} and pass --checkpoint PATH, or put it in {directory}"
    )
    assert list(directory.iterdir()) == []  # the partial download is gone


def test_download_is_verified_before_it_appears(monkeypatch, tmp_path):
    payload = b"pretend checkpoint bytes"
    monkeypatch.setattr(cf, "_download_url", lambda url, out, timeout_s=60.0: out.write(payload))
    with pytest.raises(sm.CheckpointError, match="has sha256 .*expected ec2df627"):
        cf.resolve_checkpoint("vit_b", None, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []
    spec = dataclasses.replace(sm.MODEL_SPECS["vit_b"], sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(sm.MODEL_SPECS, "vit_b", spec)
    path = cf.resolve_checkpoint("vit_b", None, directory=tmp_path)
    assert path == tmp_path / "sam_vit_b_01ec64.pth" and path.read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == ["sam_vit_b_01ec64.pth"]


def test_tiny_checkpoint_is_generated_not_downloaded(monkeypatch, tmp_path, tiny_checkpoint):
    monkeypatch.setattr(cf, "_download_url", None)  # any download attempt would fail loudly
    monkeypatch.setenv("SAMCACHE_HOME", str(tmp_path))
    path = cf.resolve_checkpoint("vit_tiny_random", None)
    assert path == tmp_path / "checkpoints" / "samcache_vit_tiny_random_seed0.pth"
    assert file_sha256(path) == file_sha256(tiny_checkpoint)
    stamp = path.stat().st_mtime_ns
    assert cf.ensure_random_checkpoint("vit_tiny_random") == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert isinstance(sm.build_sam("vit_tiny_random", Path(path)), torch.nn.Module)
