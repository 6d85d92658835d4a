"""Typed configs: dataclass defaults, then a YAML file, then dotted ``key=value`` overrides.

Unknown keys and values of the wrong type fail at load time with a message naming the key.
The resolved config is written into every run directory (``config.yaml``). A config is a
file path or the name of one that ships in the package (``configs/`` in the repository,
installed as ``omnimask.configs``): ``pretrain/shapes_tiny``, ``shapes_tiny``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

T = TypeVar("T")

# a dotted key of identifiers, then "=": trainer.max_steps=5, objectives.mix.cm3=0
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")

# the ranges ``check_fields`` knows: rule -> (test, words for the message)
_RULES = {
    ">=0": (lambda v: v >= 0, ">= 0"),
    ">=1": (lambda v: v >= 1, ">= 1"),
    ">0": (lambda v: v > 0, "> 0"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "(0,1)": (lambda v: 0 < v < 1, "in (0, 1)"),
    "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


def check_fields(obj: Any, rule: str, *names: str, prefix: str = "") -> None:
    """Raise ``ValueError("PREFIXNAME must be RULE, got V")`` for the first field of ``obj``
    in ``names`` outside ``rule`` (a key of ``_RULES``); None is left to the type check.
    Dataclass ``__post_init__``s call it with their usual place in a config as ``prefix``
    (``trainer.``); ``load_config`` puts the key's path in front where it differs."""
    ok, words = _RULES[rule]
    for name in names:
        v = getattr(obj, name)
        if v is None:
            continue
        if not (math.isfinite(v) and ok(v)):
            raise ValueError(f"{prefix}{name} must be {words}, got {v}")


def check_choice(obj: Any, name: str, allowed, prefix: str = "") -> None:
    """Raise ``ValueError("PREFIXNAME must be A|B|C, got 'V'")`` when field ``name`` of
    ``obj`` is not one of ``allowed``."""
    v = getattr(obj, name)
    if v not in allowed:
        raise ValueError(f"{prefix}{name} must be {'|'.join(map(str, allowed))}, got {v!r}")


# what a training loop computes in: fp32, bf16 autocast, or auto (each setting says where
# auto means bf16)
PRECISIONS = ("fp32", "bf16", "auto")


def check_override(ov: str) -> None:
    """A ``key=value`` override with a dotted key of identifiers, or a ConfigError naming it."""
    if not OVERRIDE.match(ov):
        raise ConfigError(f"override {ov!r} is not of the form key=value (a dotted key of "
                          "letters, digits and _, e.g. trainer.max_steps=50)")


IMAGE_FITS = ("crop", "pad", "stretch")  # how an image meets a square (image/processor.py)


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
    image_size: int | None = None  # fit images to this side; None keeps the stored size
    image_fit: str = "crop"  # crop (centre), pad or stretch, when image_size resizes
    # images above width x height are bad samples (too_large), refused from the PNG header
    max_image_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        check_fields(self, ">=1", "batch_size", "image_size")
        check_fields(self, ">=0", "num_workers", "shuffle_buffer")
        if self.image_fit not in IMAGE_FITS:
            raise ValueError(f"image_fit must be {', '.join(IMAGE_FITS[:-1])} or "
                             f"{IMAGE_FITS[-1]}, got {self.image_fit!r}")


# the demo's task runs in order (omnimask.demo_tasks.RUNS), named by run_settings
TASK_RUNS = ("multitask", "vqa", "final", "segment")


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
    # each training scene's question programs drawn this many times (repeats dropped):
    # more questions per image for VQA; the evaluation splits keep one round
    train_question_rounds: int = 1
    workers: int = 0
    speech_units: int = 500  # k-means units
    # training stages are sized in steps, so a busy machine takes longer but learns the
    # same; stage_max_minutes only stops a stuck one (the report says when it cut a stage)
    vq_steps: int = 3000  # the image tokenizer (quick: a tenth)
    # codes per level: more reconstruct better, fewer make learnable MIM targets (MIM and MRC
    # read the first level)
    vq_codes: int = 256
    # residual levels per position (rq: its reconstructions keep the shapes); 1: a plain VQ
    vq_depth: int = 4
    # the VQ trains on random crops of this side in pixels (0: whole images): a step costs
    # the crop's share of the pixels, and the codes are local to a few patches
    vq_crop: int = 32
    # the pixel encoder's region-label warm-up before pretraining, then frozen (0: shapes_tiny
    # as it is, the encoder trained end to end); quick: 5
    encoder_warmup_steps: int = 1000
    pretrain_steps: int = 900  # multi-task pretraining, shapes_tiny's schedule (quick: 10)
    finetune_vqa_steps: int = 1300  # the VQA head, after the two below (quick: 10)
    finetune_steps: int = 600  # the retrieval and caption heads, together (quick: 10)
    # ITM trained beside ITC in that run, re-ranking each query's top 16; off, ITC alone
    # ranks: at the demo's budget ITM's pairs cost much of the run and lowered captions
    retrieval_itm: bool = False
    # what the VQA run starts from: the retrieval + caption run's model ("multitask":
    # captioning teaches the trunk to bind colours to shapes) or the pretrained one
    vqa_init: str = "multitask"
    # the retrieval and caption heads again, from the VQA model (the retrieval and caption
    # models served; quick: 10; 0: none, the first run's are served)
    finetune_final_steps: int = 300
    finetune_segment_steps: int = 200  # the segmentation head (quick: 10; 0: none)
    # what the segmentation run starts from: the last model of the chain above ("chain")
    # or the pretrained one (its warm-up encoder; the chain's VQA-trained one segments worse)
    segment_init: str = "pretrained"
    # more key=value settings of configs/finetune/shapes_tasks for a run of the task chain,
    # by run: multitask (the first retrieval + caption run), vqa, final, segment. Default:
    # VQA trains the pixel encoder on its hue-turned images (shape apart from colour, for
    # test-novel's unseen pairs); the final run keeps that encoder as it is
    run_settings: dict[str, list[str]] = field(default_factory=lambda: {
        "vqa": ["train_image_encoder=true"], "final": ["freeze_image_encoder=true"]})
    stage_max_minutes: float = 30.0
    # the convolutional nets' training arithmetic (the VQ tokenizer's and the pixel encoder's
    # warm-up): fp32, bf16 (autocast) or auto (bf16 where the CPU computes it natively: ~1.6x
    # faster there; elsewhere emulated bf16 is slower than fp32). The trunk's steps stay fp32
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self, ">=1", "num_train", "num_val", "num_test", "num_test_novel",
                     "shard_size", "train_question_rounds", "speech_units", "vq_codes", "vq_steps",
                     "vq_depth", "pretrain_steps",
                     "finetune_vqa_steps", "finetune_steps")
        check_fields(self, ">=0", "workers", "encoder_warmup_steps", "finetune_segment_steps",
                     "finetune_final_steps", "vq_crop")
        check_fields(self, ">0", "stage_max_minutes")
        if self.vq_crop % 8 or self.vq_crop > self.image_size:  # the demo VQ's 8-pixel codes
            raise ValueError(f"vq_crop must be 0 or a multiple of 8 (the VQ's patch) up to "
                             f"image_size {self.image_size}, got {self.vq_crop}")
        for key, allowed in (("vqa_init", ("multitask", "pretrained")),
                             ("segment_init", ("chain", "pretrained")),
                             ("precision", PRECISIONS)):
            check_choice(self, key, allowed)
        for name, settings in self.run_settings.items():
            if name not in TASK_RUNS:
                raise ValueError(f"run_settings: no task run named {name!r} (runs: "
                                 f"{', '.join(TASK_RUNS)})")
            bad = [x for x in settings if not OVERRIDE.match(str(x))]  # as check_override
            if bad:
                raise ValueError(f"run_settings.{name}: settings are key=value overrides (a "
                                 f"dotted key, e.g. trainer.lr=1e-3), got {bad[0]!r}")
        if self.image_size < 16:  # ShapesWorld draws at least 16 pixels a side
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")


def _wrap(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    where = f" key '{key}'" if key else ""
    return ConfigError(f"config error in {source}:{where}: {msg}")


PACKAGED = "omnimask.configs"  # the package the example configs are installed as


def packaged_configs() -> list[str]:
    """The names of the configs that ship in the package, ``group/name``, sorted."""
    try:
        root = resources.files(PACKAGED)
    except ModuleNotFoundError:  # an editable install made before configs/ was mapped
        raise ConfigError(f"the packaged configs ({PACKAGED}) are not installed: reinstall "
                          "omnimask (pip install -e .)") from None
    return sorted(f"{g.name}/{f.name.removesuffix('.yaml')}" for g in root.iterdir()
                  if g.is_dir() for f in g.iterdir() if f.name.endswith(".yaml"))


def _matches(name: str) -> list[str]:
    """The packaged names ``name`` means: ``group/name``, ``name`` alone when its group is
    left out, with or without ``.yaml`` and the repository's ``configs/`` in front."""
    key = name.removeprefix("configs/").removesuffix(".yaml")
    names = packaged_configs()
    return [n for n in names if key == n or ("/" not in key and n.split("/", 1)[1] == key)]


def _resource(name: str) -> Traversable:
    group, stem = name.split("/", 1)
    return resources.files(PACKAGED) / group / f"{stem}.yaml"


def packaged_config(name: str) -> Traversable:
    """The packaged config ``name`` (see ``_matches``), read through ``importlib.resources``
    (a wheel or zip install works too); else a ConfigError listing the packaged names."""
    found = _matches(name)
    if len(found) > 1:
        raise ConfigError(f"config name {name!r} is ambiguous: {', '.join(found)}")
    if not found:
        raise ConfigError(f"no packaged config {name!r}; packaged: "
                          f"{', '.join(packaged_configs())}")
    return _resource(found[0])


def find_config(spec: str | os.PathLike | Traversable) -> Path | Traversable:
    """A config file: ``spec`` as a path when that file exists, else the packaged config of
    that name, else a ConfigError naming it and the packaged names."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec  # already a packaged resource
    p = Path(spec)
    if p.is_file():
        return p
    found = _matches(str(spec))
    if len(found) == 1:
        return _resource(found[0])
    why = (f"packaged name ambiguous: {', '.join(found)}" if found else
           f"nor a packaged config: {', '.join(packaged_configs())}")
    raise ConfigError(f"config file not found: {p} ({why})")


def load_config(schema: type[T], path: str | os.PathLike | Traversable | None = None,
                overrides: list[str] | tuple[str, ...] = (), **values: Any) -> T:
    """Build ``schema`` from defaults, then ``path`` (a YAML file, or a packaged config's
    name: ``find_config``), then ``values``, then overrides.

    ``overrides`` are dotted ``key=value`` strings, e.g. ``data.batch_size=64``.
    """
    base = OmegaConf.structured(schema)
    layers: list[tuple[Any, str, str | None]] = []  # (layer, its source, the override)
    if path is not None:
        p = find_config(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        layers.append((OmegaConf.create(loaded), str(p), None))
    if values:
        layers.append((OmegaConf.create(values), "arguments", None))
    for ov in overrides:
        check_override(ov)
        layers.append((OmegaConf.from_dotlist([ov]), f"override {ov!r}", ov))
    cfg = base
    for layer, source, override in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
            if override is not None:
                _replace_maps(cfg, override)
        except OmegaConfBaseException as e:
            raise _wrap(e, source) from None
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _wrap(e, "config") from None
    except ValueError as e:  # a dataclass's own check (__post_init__): name the key's path
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        prefix = _failing_prefix(cfg) or ""
        raise ConfigError(f"config error: {msg if msg.startswith(prefix) else prefix + msg}"
                          ) from None


def _replace_maps(cfg: Any, override: str) -> None:
    """``key={...}`` on a free-form mapping (``objectives.mix``, ``heads``) means exactly
    that mapping: keys the override leaves out are dropped, not kept from the layers below.
    ``key.sub=v`` still sets one entry, and ``key={...}`` on a settings block (a dataclass)
    still merges field by field."""
    key, _, raw = override.partition("=")
    if not raw.lstrip().startswith("{"):
        return
    node = OmegaConf.select(cfg, key)
    if OmegaConf.is_dict(node) and not dataclasses.is_dataclass(OmegaConf.get_type(node)):
        OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([override]), key),
                         merge=False)


def _failing_prefix(node: Any, prefix: str = "") -> str | None:
    """The dotted path (``model.trunk.``) of the innermost dataclass node whose construction
    raises ValueError; children are tried first, so the deepest check names the key."""
    for key in node:
        child = node[key]
        if OmegaConf.is_dict(child) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            found = _failing_prefix(child, f"{prefix}{key}.")
            if found is not None:
                return found
    try:
        OmegaConf.to_object(node)
    except OmegaConfBaseException:  # a type error, reported by its own path elsewhere
        return None
    except ValueError:
        return prefix
    return None


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
