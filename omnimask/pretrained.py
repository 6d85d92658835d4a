"""The portable model directory: ``OmniModel.save_pretrained(dir)`` and ``omnimask.load(dir)``.

::

    DIR/config.json          format and version, the ModelConfig, head name -> settings,
                             the tokenizer kinds copied in
    DIR/model.safetensors    weights, keys encoder.* and heads.<name>.* (a tied tensor once)
    DIR/omnimask_vocab.json  the shared vocabulary (text ids, image codes, speech units)
    DIR/tokenizers/{text,image,speech}/   the tokenizers' files, copied

The directory alone rebuilds the model and its tokenizers. Loading parses JSON and
safetensors only (no pickle); a missing file is an error naming it. ``load(dir,
heads=...)`` builds other heads on the saved encoder: strict on ``encoder.*``, the heads
the directory lacks initialised fresh and listed (``model.load_report``), timm's
``pretrained_strict=False`` + ``reset_classifier``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from omnimask.errors import ConfigError, OmnimaskError
from omnimask.model import ModelConfig, OmniModel, head_specs
from omnimask.safeio import atomic_write, atomic_write_bytes, versioned_json

FORMAT, FORMAT_VERSION = "omnimask-model", 1
CONFIG, WEIGHTS, VOCAB, TOKENIZERS = ("config.json", "model.safetensors", "omnimask_vocab.json",
                                     "tokenizers")
KINDS = ("text", "image", "speech")
log = logging.getLogger("omnimask.pretrained")


# -- writing ---------------------------------------------------------------------------------
def check_target(directory: str | os.PathLike) -> Path:
    """``directory`` as a place to write a model directory: new, empty, or one already."""
    d = Path(directory)
    if d.exists() and (not d.is_dir() or (any(d.iterdir()) and not (d / CONFIG).is_file())):
        raise OmnimaskError(f"{d} exists and is not a model directory; choose a new or empty "
                            "folder")
    return d


def save_pretrained(model: OmniModel, directory: str | os.PathLike,
                    tokenizers: Mapping[str, str | os.PathLike] | None = None,
                    checked: bool = False) -> Path:
    """Write ``model`` as a model directory (see the module docstring); ``tokenizers``: kind
    -> tokenizer directory to copy in (default: ``model.tokenizer_dirs``). An existing
    folder is only overwritten when it is a model directory (``checked``: the caller
    checked that already)."""
    from omnimask.modalities.vocab import Vocab
    from omnimask.train.trainer import weights

    d = Path(directory) if checked else check_target(directory)
    toks = {k: Path(v) for k, v in (model.tokenizer_dirs if tokenizers is None
                                    else tokenizers).items() if v}
    for kind, src in toks.items():
        if kind not in KINDS:
            raise OmnimaskError(f"unknown tokenizer kind {kind!r}; known: {', '.join(KINDS)}")
        if not src.is_dir():
            raise OmnimaskError(f"tokenizers.{kind}: no tokenizer directory at {src}")
    vocab = model.vocab or Vocab(text_size=model.cfg.trunk.vocab_size)
    if vocab.size != model.cfg.trunk.vocab_size:
        raise OmnimaskError(f"the vocabulary has {vocab.size} ids, the model's trunk "
                            f"{model.cfg.trunk.vocab_size} (model.trunk.vocab_size)")
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG).unlink(missing_ok=True)  # written last: a directory with one is complete
    _save_weights(d / WEIGHTS, {k: v.detach().contiguous().cpu()
                                for k, v in weights(model).items()})
    atomic_write_bytes(d / VOCAB, (json.dumps(vocab.to_dict(), indent=2, sort_keys=True)
                                   + "\n").encode())
    _copy_tokenizers(d / TOKENIZERS, toks)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "model": dataclasses.asdict(model.cfg), "heads": model.head_settings(),
              "tokenizers": sorted(toks)}
    atomic_write_bytes(d / CONFIG, (json.dumps(config, indent=1) + "\n").encode())
    return d


def _save_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _copy_tokenizers(root: Path, toks: dict[str, Path]) -> None:
    """Each tokenizer's files (not its training checkpoints) into ``root/<kind>``, staged
    and swapped in; kinds no longer given are removed. A tokenizer already in place (a
    loaded model saved back into its own folder) stays."""
    root.mkdir(exist_ok=True)
    for kind in KINDS:
        dest = root / kind
        src = toks.get(kind)
        if src is not None and dest.exists() and dest.resolve() == src.resolve():
            continue
        if src is not None:
            stage = root / f".{kind}.tmp{os.getpid()}"
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir()
            for f in sorted(src.iterdir()):
                if f.is_file():
                    shutil.copy2(f, stage / f.name)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(stage, dest)
        elif dest.is_dir():
            shutil.rmtree(dest)


# -- reading ---------------------------------------------------------------------------------
def _require(path: Path, d: Path) -> Path:
    if not path.exists():
        raise OmnimaskError(f"{path} is missing: {d} is not a complete model directory")
    return path


def read_config(directory: str | os.PathLike) -> dict:
    """``config.json`` of a model directory, checked: format, version, its fields."""
    d = Path(directory)
    p = _require(d / CONFIG, d)
    info = versioned_json(p.read_bytes(), str(p), FORMAT, FORMAT_VERSION, "model config")
    for key, kind in (("model", dict), ("heads", dict), ("tokenizers", list)):
        if not isinstance(info.get(key), kind):
            raise OmnimaskError(f"{p}: '{key}' must be a JSON {kind.__name__}")
    bad = [k for k in info["tokenizers"] if k not in KINDS]
    if bad:
        raise OmnimaskError(f"{p}: unknown tokenizer kinds {bad}; known: {', '.join(KINDS)}")
    return info


def _model_config(info: dict, where: Path) -> ModelConfig:
    from omnimask.config import load_config

    try:
        return load_config(ModelConfig, None, **info["model"])
    except ConfigError as e:
        raise OmnimaskError(f"{where}: 'model' {e}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise OmnimaskError(f"{path} cannot be read ({str(e).splitlines()[0] or 'damaged'})"
                            ) from None


def _fit(model: OmniModel, sd: dict[str, torch.Tensor], where: Path, strict_heads: bool
         ) -> dict[str, list[str]]:
    """Load ``sd`` into ``model``: strict on ``encoder.*`` and on every head ``sd`` holds
    (all heads when ``strict_heads``); returns the head keys left fresh and the ones of
    ``sd`` not used."""
    from omnimask.train.trainer import weights

    own = model.state_dict()
    tied = set(own) - set(weights(model))  # aliases stored once (the vocabulary head)
    saved_heads = {k.split(".")[1] for k in sd if k.startswith("heads.")}
    missing = [k for k in own if k not in sd and k not in tied]
    unexpected = [k for k in sd if k not in own]

    def binding(k: str) -> bool:  # the encoder, and every head the file holds
        return strict_heads or not k.startswith("heads.") or k.split(".")[1] in saved_heads

    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    bad_missing = [k for k in missing if binding(k)]
    bad_unexpected = [k for k in unexpected if strict_heads or not k.startswith("heads.")]
    if bad_missing or bad_unexpected or shapes:
        raise OmnimaskError(f"{where} does not fit the model: missing {bad_missing[:5]}, "
                            f"unexpected {bad_unexpected[:5]}, shapes (file vs model) "
                            f"{shapes[:5]}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return {"fresh": [k for k in missing if k not in bad_missing],
            "unused": [k for k in unexpected if k not in bad_unexpected]}


def _report(where: Path, report: dict[str, list[str]]) -> None:
    if report["fresh"]:  # one entry per head: "heads.vqa (4 tensors)"
        by_head: dict[str, int] = {}
        for k in report["fresh"]:
            name = ".".join(k.split(".")[:2]) if k.startswith("heads.") else k
            by_head[name] = by_head.get(name, 0) + 1
        log.warning("%s: initialised fresh (not in the file): %s", where,
                    ", ".join(f"{h} ({n} tensors)" if n > 1 else h for h, n in by_head.items()))
    if report["unused"]:
        heads = sorted({k.split(".")[1] for k in report["unused"]})
        log.info("%s: heads not loaded: %s", where, ", ".join(heads))


def _vocab(d: Path):
    from omnimask.modalities.vocab import Vocab, vocab_file

    path = vocab_file(d)
    try:
        return Vocab.load(_require(path, d))
    except (ValueError, TypeError) as e:
        raise OmnimaskError(f"{path} is not a vocabulary ({e})") from None


def load_tokenizers(directory: Path, kinds: Iterable[str]) -> dict:
    from omnimask.modalities.image.tokenizer import ImageTokenizer
    from omnimask.modalities.speech.tokenizer import SpeechTokenizer
    from omnimask.modalities.text.tokenizer import TextTokenizer

    classes = {"text": TextTokenizer, "image": ImageTokenizer, "speech": SpeechTokenizer}
    return {k: classes[k].load(_require(directory / TOKENIZERS / k, directory)) for k in kinds}


def load(source: str | os.PathLike, heads: Mapping[str, Any] | Iterable[str] | None = None
         ) -> OmniModel:
    """The model a model directory holds (``model.tokenizers`` when it has them);
    ``source`` may also be a zoo name or ``hf://org/repo`` (``omnimask.zoo.resolve``).

    ``heads=None``: the saved heads, every key strict. ``heads`` given (names, or name ->
    settings): the model gets exactly these; the encoder is strict, a saved head of the
    same name loads strictly, the others start fresh; ``model.load_report`` lists the
    fresh keys and the saved ones not used."""
    from omnimask.zoo import resolve

    d = resolve(source)
    info = read_config(d)
    cfg = _model_config(info, d / CONFIG)
    _require(d / WEIGHTS, d)
    vocab = _vocab(d)
    if vocab.size != cfg.trunk.vocab_size:
        raise OmnimaskError(f"{d / VOCAB} has {vocab.size} ids, {d / CONFIG} a trunk of "
                            f"{cfg.trunk.vocab_size}")
    saved = info["heads"]
    specs = saved if heads is None else {
        n: given if given is not None else saved.get(n) for n, given in head_specs(heads).items()}
    model = OmniModel(cfg, specs)
    report = _fit(model, _read_weights(d / WEIGHTS), d / WEIGHTS, strict_heads=heads is None)
    _report(d, report)
    model.load_report = report
    model.vocab = vocab
    if info["tokenizers"]:
        model.tokenizers = load_tokenizers(d, info["tokenizers"])
        model.tokenizer_dirs = {k: str(d / TOKENIZERS / k) for k in info["tokenizers"]}
        check_tokenizers(model.tokenizers, vocab, f"tokenizers in {d / TOKENIZERS}")
    return model


def check_tokenizers(toks: dict, vocab, what: str) -> None:
    """Tokenizers (kind -> loaded tokenizer) give ``vocab``, or ``VocabMismatch`` naming
    ``what`` (a folder assembled by hand, a tokenizer retrained since)."""
    if toks.get("text") is not None and toks.get("image") is not None:
        speech = toks.get("speech")
        got = toks["text"].vocab(toks["image"].size, speech.size if speech else 0)
        vocab.check_compatible(got, what)


IMAGE_ENCODER = "encoder.embedders.image.encoder."


def load_image_encoder(model: OmniModel, source: str | os.PathLike) -> int:
    """The pixel encoder of the model directory (or zoo name) ``source`` into ``model``,
    whose own pixel encoder has the same architecture (every ``model.image_encoder`` field
    but ``frozen``); the rest of ``model`` is untouched. Returns the tensors copied."""
    from dataclasses import asdict

    from omnimask.zoo import resolve

    d = resolve(source)
    cfg = _model_config(read_config(d), d / CONFIG)
    if cfg.image_input != "pixels" or model.cfg.image_input != "pixels":
        raise OmnimaskError(f"{d}: a pixel encoder needs model.image_input=pixels on both "
                            f"sides (there: {cfg.image_input}, here: {model.cfg.image_input})")
    theirs, ours = (
        {k: v for k, v in asdict(c.image_encoder).items() if k != "frozen"}
        for c in (cfg, model.cfg))
    diff = [f"{k}: {theirs[k]} vs {ours[k]}" for k in ours if theirs.get(k) != ours[k]]
    if diff:
        raise OmnimaskError(f"{d / CONFIG}: its model.image_encoder differs from this model's "
                            f"({'; '.join(diff[:3])})")
    sd = {k: v for k, v in _read_weights(_require(d / WEIGHTS, d)).items()
          if k.startswith(IMAGE_ENCODER)}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(IMAGE_ENCODER)}
    if set(sd) != set(own):
        raise OmnimaskError(f"{d / WEIGHTS}: its pixel encoder's tensors differ from this "
                            f"model's ({sorted(set(sd) ^ set(own))[:3]})")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k].to(v.dtype))
    return len(own)


def load_encoder(model: OmniModel, source: str | os.PathLike) -> list[str]:
    """The encoder of the model directory ``source`` into ``model``, strictly; the model's
    head keys stay as they are (fresh) and are returned."""
    d = Path(source)
    if not d.is_dir():
        raise OmnimaskError(f"no model directory at {d}")
    read_config(d)
    vocab = _vocab(d)
    if model.vocab is not None:
        model.vocab.check_compatible(vocab, f"model directory {d}")
    sd = {k: v for k, v in _read_weights(_require(d / WEIGHTS, d)).items()
          if k.startswith("encoder.")}
    report = _fit(model, sd, d / WEIGHTS, strict_heads=False)
    _report(d, report)
    model.vocab = vocab
    return report["fresh"]
