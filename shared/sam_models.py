"""SAM model types, checkpoints and builders, using Meta's model code without torchvision.

- ``MODEL_SPECS``: the registry of model types: ``vit_b``, ``vit_l``, ``vit_h`` (Meta's
  ``build_sam.py`` encoder configs and official checkpoints) and ``vit_tiny_random``, a tiny image
  encoder that is NOT pretrained (random weights, for tests and the demo only) with the real
  full-size prompt encoder and mask decoder, so it also yields 256×64×64 embeddings; and
  ``samcache_tiny``, a small convolutional encoder (``shared/tiny_encoder.py``) with SAM's
  prompt encoder and mask decoder, pretrained by ``tools/pretrain_tiny.py`` on synthetic shapes
  and shipped inside the package (a demonstration model, NOT a substitute for SAM).
- ``resolve_checkpoint``: a given path, else the cache dir, else a verified download from Meta.
- ``load_state_dict`` (``weights_only=True``), ``detect_model_type``, ``build_sam``,
  ``build_image_encoder`` and ``build_prompt_and_mask_decoder`` (never builds the image encoder;
  loads through ``decoder_checkpoint_filter``).
- ``make_random_checkpoint``: random weights saved in Meta's official file format.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pickle
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

META_URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
PROMPT_EMBED_DIM = 256  # channels of image embeddings and prompt tokens
IMAGE_SIZE = 1024  # encoder input side (the 1024 frame)
PATCH_SIZE = 16  # 1024 / 16 = 64: embeddings are 256×64×64
MASK_DECODER_PARAMETERS = 4_058_340  # Meta's MaskDecoder, every model type
PROMPT_ENCODER_PARAMETERS = 6_220  # Meta's PromptEncoder, every model type


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or of another model type; the message says what to do."""


def import_sam_package() -> types.ModuleType:
    """Return Meta's ``segment_anything`` package without running its ``__init__``.

    ``segment_anything/__init__.py`` imports the predictor and the automatic mask generator, which
    import torchvision; the model code (``segment_anything.modeling``, ``build_sam``) needs only
    torch. When the real package is already imported we use it; otherwise we register an empty
    package object whose ``__path__`` points at the installed files, so that submodule imports
    (``segment_anything.modeling``) work and the ``__init__`` never runs.
    """
    existing = sys.modules.get("segment_anything")
    if existing is not None:
        return existing
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "segment-anything is not installed; run `pip install segment-anything==1.0`"
        )
    package = types.ModuleType("segment_anything")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules["segment_anything"] = package
    return package


def sam_modeling() -> types.ModuleType:
    """``segment_anything.modeling`` (ImageEncoderViT, PromptEncoder, MaskDecoder, Sam, …)."""
    import_sam_package()
    return importlib.import_module("segment_anything.modeling")


# --------------------------------------------------------------------------- model registry


@dataclass(frozen=True)
class SamModelSpec:
    """One model type: image-encoder config and where its checkpoint comes from.

    ``sha256`` values of Meta's files are the ones published in public code (e.g. micro-sam's
    pooch registry) and agree across many independent projects. ``url`` is None for a model
    with no download (``vit_tiny_random``: generated locally, NOT pretrained; ``samcache_tiny``:
    ``bundled`` in the package). ``arch`` is ``"vit"`` (Meta's ImageEncoderViT) or ``"conv"``
    (``TinyConvEncoder``; ``embed_dim`` / ``depth`` are its width and number of blocks).
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    checkpoint_name: str
    sha256: str | None
    pretrained: bool
    title: str
    arch: str = "vit"
    bundled: bool = False

    @property
    def url(self) -> str | None:
        if self.bundled or not self.pretrained:
            return None
        return META_URL_BASE + self.checkpoint_name


MODEL_SPECS: dict[str, SamModelSpec] = {
    "vit_b": SamModelSpec(
        "vit_b", 768, 12, 12, (2, 5, 8, 11), "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", True, "SAM ViT-B",
    ),
    "vit_l": SamModelSpec(
        "vit_l", 1024, 24, 16, (5, 11, 17, 23), "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", True, "SAM ViT-L",
    ),
    "vit_h": SamModelSpec(
        "vit_h", 1280, 32, 16, (7, 15, 23, 31), "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", True, "SAM ViT-H",
    ),
    "vit_tiny_random": SamModelSpec(
        "vit_tiny_random", 64, 2, 2, (1,), "samcache_vit_tiny_random_seed0.pth",
        None, False, "tiny random ViT, NOT pretrained (tests and demo only; masks are meaningless)",
    ),
    "samcache_tiny": SamModelSpec(
        "samcache_tiny", 128, 6, 0, (), "samcache_tiny.pth", None, True,
        "samcache's tiny conv encoder + SAM decoder, a demonstration model pretrained on "
        "synthetic shapes (tools/pretrain_tiny.py), NOT a substitute for SAM",
        arch="conv", bundled=True,
    ),
}  # fmt: skip
BUNDLED_DIR = Path(__file__).resolve().parent / "weights"  # checkpoints shipped in the package


def bundled_checkpoint_path(model_type: str) -> Path:
    """Where the package keeps the checkpoint of a ``bundled`` model type (no download ever)."""
    return BUNDLED_DIR / get_model_spec(model_type).checkpoint_name


def get_model_spec(model_type: str) -> SamModelSpec:
    """The ``SamModelSpec`` of ``model_type``; a ValueError lists the known types."""
    if model_type not in MODEL_SPECS:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {sorted(MODEL_SPECS)}")
    return MODEL_SPECS[model_type]


def describe_model_type(model_type: str) -> str:
    """One line for help texts and logs: ``vit_b: SAM ViT-B; 768-dim, 12 blocks; Meta's …``."""
    spec = get_model_spec(model_type)
    source = f"Meta's {spec.checkpoint_name}" if spec.pretrained else "random weights, no download"
    if spec.bundled:
        source = f"{spec.checkpoint_name} shipped in the package, no download"
    return f"{spec.name}: {spec.title}; {spec.embed_dim}-dim, {spec.depth} blocks; {source}"


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def check_decoder_parameter_counts(prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
    """Raise CheckpointError unless the modules have Meta's parameter counts (6,220 / 4,058,340)."""
    found = (count_parameters(prompt_encoder), count_parameters(mask_decoder))
    if found != (PROMPT_ENCODER_PARAMETERS, MASK_DECODER_PARAMETERS):
        raise CheckpointError(
            f"prompt encoder / mask decoder have {found[0]:,} / {found[1]:,} parameters; SAM's "
            f"have {PROMPT_ENCODER_PARAMETERS:,} / {MASK_DECODER_PARAMETERS:,}"
        )


# --------------------------------------------------------------------------- module builders


def _new_image_encoder(spec: SamModelSpec) -> nn.Module:
    """Randomly initialised image encoder of ``spec``: Meta's ``ImageEncoderViT`` with Meta's
    arguments, or ``TinyConvEncoder`` for ``arch == "conv"``."""
    if spec.arch == "conv":
        from shared.tiny_encoder import TinyConvEncoder

        return TinyConvEncoder(spec.embed_dim, spec.depth, PROMPT_EMBED_DIM)
    return sam_modeling().ImageEncoderViT(
        depth=spec.depth,
        embed_dim=spec.embed_dim,
        img_size=IMAGE_SIZE,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=spec.num_heads,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=14,
        out_chans=PROMPT_EMBED_DIM,
    )


def _new_prompt_encoder() -> nn.Module:
    side = IMAGE_SIZE // PATCH_SIZE
    return sam_modeling().PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(side, side),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=16,
    )


def _new_mask_decoder() -> nn.Module:
    modeling = sam_modeling()
    transformer = modeling.TwoWayTransformer(
        depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
    )
    return modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=transformer,
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def _new_sam(spec: SamModelSpec) -> nn.Module:
    """Randomly initialised ``Sam`` exactly as Meta's ``_build_sam`` makes it (eval mode)."""
    sam = sam_modeling().Sam(
        image_encoder=_new_image_encoder(spec),
        prompt_encoder=_new_prompt_encoder(),
        mask_decoder=_new_mask_decoder(),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


# --------------------------------------------------------------------------- state dicts


def load_state_dict(path: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, loaded on CPU with ``torch.load(weights_only=True)``.

    Accepts Meta's official format (a plain ``Sam`` state dict) and a dict whose ``"model"`` key
    holds one. A file holding pickled objects other than tensors and containers is refused
    (a pickle can run code). ``mmap=True`` maps the file instead of reading it all (zip format).
    """
    path = _existing_file(Path(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as error:
        if mmap and "mmap" in str(error):  # legacy (non-zip) files cannot be mapped
            return load_state_dict(path, mmap=False)
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"could not read checkpoint {path} ({first})") from error
    except pickle.UnpicklingError as error:  # weights_only refused a non-tensor object
        found = [ln for ln in str(error).splitlines() if "Unsupported global" in ln]
        detail = found[0].split(" was not")[0].split("error: ")[-1] if found else "refused"
        raise CheckpointError(
            f"checkpoint {path} holds pickled objects other than tensors ({detail}); only plain "
            "state dicts are loaded, since a pickle can run code. Re-save it with "
            "torch.save(model.state_dict(), path)"
        ) from error
    except Exception as error:  # EOFError, zip / struct errors: not a torch checkpoint
        raise CheckpointError(
            f"could not read checkpoint {path} ({type(error).__name__}: {error}); "
            "pass a SAM .pth state dict"
        ) from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise CheckpointError(
            f"checkpoint {path} is not a SAM state dict (a dict of tensors, or one under 'model')"
        )
    return dict(loaded)


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing --checkpoint")
    return path


def detect_model_type(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Model type of a ``Sam`` state dict, from the image encoder's width and number of blocks."""
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        raise CheckpointError("checkpoint holds no image encoder (no image_encoder.* keys)")
    embed_dim = int(weight.shape[0])
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for spec in MODEL_SPECS.values():
        if (spec.embed_dim, spec.depth) == (embed_dim, depth):
            return spec.name
    raise CheckpointError(
        f"checkpoint holds an unknown SAM image encoder ({embed_dim} channels, {depth} blocks); "
        f"known model types: {sorted(MODEL_SPECS)}"
    )


def _check_model_type(state_dict: Mapping[str, torch.Tensor], model_type: str, path: Path) -> None:
    found = detect_model_type(state_dict)
    if found != model_type:
        channels = state_dict["image_encoder.patch_embed.proj.weight"].shape[0]
        raise CheckpointError(
            f"checkpoint {path} holds a {found} model (image_encoder.patch_embed has {channels} "
            f"channels); --model-type is {model_type}"
        )


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """``module.load_state_dict(strict=True)``; a mismatch names the first differing keys."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        expected = module.state_dict()
        problems = [f"missing {k}" for k in expected if k not in state_dict]
        problems += [f"unexpected {k}" for k in state_dict if k not in expected]
        problems += [
            f"{k} is {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            for k, v in state_dict.items()
            if k in expected and v.shape != expected[k].shape
        ]
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(module).__name__}: "
            f"{'; '.join(problems[:3]) or error}{more}"
        ) from error


def decoder_checkpoint_filter(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the ``prompt_encoder.*`` and ``mask_decoder.*`` entries of a ``Sam`` state dict.

    Like timm's ``checkpoint_filter_fn``: stage 2 loads the decoder side through this and never
    touches (or builds) the image encoder. Keys keep their prefixes.
    """
    keep = ("prompt_encoder.", "mask_decoder.")
    return {k: v for k, v in state_dict.items() if k.startswith(keep)}


# --------------------------------------------------------------------------- builders


def build_sam(model_type: str, checkpoint_path: str | Path) -> nn.Module:
    """Meta's ``Sam`` of ``model_type`` with the checkpoint's weights (strict), eval mode, CPU."""
    path = Path(checkpoint_path)
    state_dict = load_state_dict(path, mmap=True)  # mapped: no second copy of the weights in RAM
    _check_model_type(state_dict, model_type, path)
    sam = _new_sam(get_model_spec(model_type))
    _load_strict(sam, state_dict, path)
    return sam


def build_image_encoder(model_type: str, checkpoint_path: str | Path) -> nn.Module:
    """Meta's ``ImageEncoderViT`` with the checkpoint's ``image_encoder.*`` weights (eval, CPU).

    Input: the normalised, padded B×3×1024×1024 float tensor; output: B×256×64×64 embeddings.
    """
    path = Path(checkpoint_path)
    state_dict = load_state_dict(path, mmap=True)  # mapped: no second copy of the weights in RAM
    _check_model_type(state_dict, model_type, path)
    encoder = _new_image_encoder(get_model_spec(model_type))
    _load_strict(encoder, _strip_prefix(state_dict, "image_encoder."), path)
    return encoder.eval()


def build_prompt_and_mask_decoder(
    model_type: str, checkpoint_path: str | Path
) -> tuple[nn.Module, nn.Module]:
    """(``PromptEncoder``, ``MaskDecoder``) with the checkpoint's weights; no image encoder.

    The file is memory-mapped and filtered through ``decoder_checkpoint_filter``, so only the
    ~4 M decoder-side parameters are read. ``model_type`` is checked when the file also holds
    an image encoder (a full ``Sam`` checkpoint); a decoder-only state dict is accepted as is.
    """
    get_model_spec(model_type)
    path = Path(checkpoint_path)
    state_dict = load_state_dict(path, mmap=True)
    if "image_encoder.patch_embed.proj.weight" in state_dict:
        _check_model_type(state_dict, model_type, path)
    kept = decoder_checkpoint_filter(state_dict)
    del state_dict
    prompt_encoder, mask_decoder = _new_prompt_encoder(), _new_mask_decoder()
    _load_strict(prompt_encoder, _strip_prefix(kept, "prompt_encoder."), path)
    _load_strict(mask_decoder, _strip_prefix(kept, "mask_decoder."), path)
    return prompt_encoder.eval(), mask_decoder.eval()
