"""Named model sizes as data (``omnimask.registry.MODELS``), and ``create_model``.

Each variant is a ``ModelConfig``; what depends on the tokenizers and data (vocabulary
size, feature sizes, code and unit counts) keeps the defaults until a pretraining run or
an override sets it. ``create_model(name, heads=..., **overrides)`` takes overrides as
nested dicts (``trunk={"layers": 2}``) or dotted keys (``**{"trunk.layers": 2}``),
checked like a config file: an unknown key or a wrong type names the key.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from omnimask.config import load_config
from omnimask.fusion.trunk import TrunkConfig
from omnimask.model import ModelConfig, OmniModel
from omnimask.registry import MODELS


def _variant(trunk: dict, **model: Any) -> ModelConfig:
    return ModelConfig(trunk=TrunkConfig(**trunk), **model)


# pre-LN with BERT/UNITER's embedding LayerNorm; images from pixels, VQ codes entering like
# the VQ latents; BatchNorm before the ITC projections: the settings
# configs/pretrain/shapes_tiny.yaml learned with
_PRE_LN = {"norm_eps": 1e-6, "embed_norm": True, "max_positions": 512}
_SHAPES = {"image_input": "pixels", "image_code_input": "features", "itc_batchnorm": True}


@MODELS.register("omnimask-tiny")
def omnimask_tiny() -> ModelConfig:
    """configs/pretrain/shapes_tiny.yaml's model: d=128, 4 layers, 4 heads (0.8M in blocks)."""
    return _variant({"dim": 128, "layers": 4, "heads": 4, "ffn_dim": 512, **_PRE_LN}, **_SHAPES)


@MODELS.register("omnimask-small")
def omnimask_small() -> ModelConfig:
    """d=256, 6 layers, 4 heads (~4.7M in blocks)."""
    return _variant({"dim": 256, "layers": 6, "heads": 4, "ffn_dim": 1024, **_PRE_LN}, **_SHAPES)


@MODELS.register("omnimask-base")
def omnimask_base() -> ModelConfig:
    """BERT-base's shape and post-LN layout, so ``Trunk.from_hf_bert`` weights fit every
    BERT parameter (the modality and 2-D grid embeddings stay new, zero/random)."""
    return _variant({"dim": 768, "layers": 12, "heads": 12, "ffn_dim": 3072,
                     "max_positions": 512, "norm_eps": 1e-12, "prenorm": False,
                     "token_type_embedding": True, "type_vocab_size": 2, "embed_norm": True})


def list_models() -> list[str]:
    """The names ``create_model`` knows."""
    return MODELS.names()


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(
            out.get(k), dict) else v
    return out


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """Variant ``name``'s ``ModelConfig`` with ``overrides`` (nested or dotted keys)."""
    base = dataclasses.asdict(MODELS.get(name)())
    dotted = [f"{k}={json.dumps(v)}" for k, v in overrides.items() if "." in k]
    nested = {k: v for k, v in overrides.items() if "." not in k}
    return load_config(ModelConfig, None, dotted, **_merge(base, nested))


def create_model(name: str, heads: Mapping[str, Any] | Iterable[str] | None = None,
                 **overrides: Any) -> OmniModel:
    """A freshly initialised model of variant ``name`` with ``heads`` (names, or name ->
    settings: ``{"vqa": {"num_answers": 10}}``); see ``list_models()``."""
    return OmniModel(model_config(name, **overrides), heads)
