"""Typed configs: dataclass defaults, then a YAML file, then dotted ``key=value`` overrides.

Unknown keys and values of the wrong type fail at load time with a message naming the key.
The resolved config is written into every run directory (``config.yaml``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

T = TypeVar("T")


@dataclass
class DataConfig:
    """The shard reader (``omnimask.train.data.pipeline``)."""

    shards: list[str] = field(default_factory=list)  # paths, globs or {000..009} patterns
    keys: list[str] | None = None  # keys every sample must have; None: the manifest's keys
    processors: list[str] = field(default_factory=lambda: ["image", "masks", "text"])
    batch_size: int = 32
    drop_last: bool = False
    num_workers: int = 0
    shuffle_buffer: int = 1000  # samples; 0 keeps shard order
    shuffle_shards: bool = True
    resampled: bool = False  # True: an endless stream of shards drawn with replacement
    seed: int = 0
    image_size: int | None = None  # resize images to this side; None keeps the stored size
    # images above width x height are bad samples (too_large), refused from the PNG header
    max_image_pixels: int = 4096 * 4096


@dataclass
class DemoConfig:
    """``omnimask demo``: the main job on ShapesWorld."""

    out: str = "runs/demo"
    seed: int = 0
    image_size: int = 64
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 200
    num_test_novel: int = 200
    shard_size: int = 500
    workers: int = 0
    vq_minutes: float = 5.0  # image tokenizer training budget (quick: a tenth)
    speech_units: int = 500  # k-means units
    pretrain_minutes: float = 4.0  # multi-task pretraining budget (quick: 10 steps)


def _wrap(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    where = f" key '{key}'" if key else ""
    return ConfigError(f"config error in {source}:{where}: {msg}")


def load_config(schema: type[T], path: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = (), **values: Any) -> T:
    """Build ``schema`` from defaults, then ``path`` (YAML), then ``values``, then overrides.

    ``overrides`` are dotted ``key=value`` strings, e.g. ``data.batch_size=64``.
    """
    base = OmegaConf.structured(schema)
    layers: list[tuple[Any, str]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        layers.append((OmegaConf.create(loaded), str(p)))
    if values:
        layers.append((OmegaConf.create(values), "arguments"))
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        layers.append((OmegaConf.from_dotlist([ov]), f"override {ov!r}"))
    cfg = base
    for layer, source in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise _wrap(e, source) from None
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _wrap(e, "config") from None
    except ValueError as e:  # a dataclass's own check (__post_init__)
        raise ConfigError(f"config error: {e}") from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config as ``run_dir/config.yaml`` (atomically)."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
    return path
