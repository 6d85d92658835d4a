"""``publish``: a model directory (or a run's) into a zoo folder with its manifest entry.

::

    TO/manifest.json                 entries; file URLs relative to it (or --base-url)
    TO/<org>/<model>/config.json ... the portable model directory, weights optionally fp16

A file identical to one another entry already serves (the shared tokenizers) is not
written twice: the entry points at the existing copy. Everything is staged and renamed
into place; the manifest is written last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import torch

from omnimask.errors import OmnimaskError
from omnimask.safeio import atomic_write_bytes, sha256_file

from .manifest import NAME_RE, ZooEntry, ZooFile, dump_manifest, read_manifest_file

DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
MANIFEST = "manifest.json"


def model_dir_of(source: Path) -> Path | None:
    """The model directory ``source`` is or holds (``RUN/model``); None for a run that
    was never exported."""
    for d in (source, source / "model"):
        if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
            return d
    return None


def _architecture(config: dict) -> str:
    """The ``MODELS`` variant whose trunk the model has, else ``custom``."""
    from omnimask.registry import MODELS

    keys = ("dim", "layers", "heads", "ffn_dim")
    trunk = config.get("model", {}).get("trunk", {})
    for name in MODELS.names():
        t = dataclasses.asdict(MODELS.get(name)().trunk)
        if all(t[k] == trunk.get(k) for k in keys):
            return name
    return "custom"


def _tasks(config: dict) -> list[str]:
    """The tasks the model's heads serve (``refer`` rides on ``segment``), or ``encoder``
    for a pretraining model."""
    from omnimask.train.tasks.base import TASKS

    heads = set(config.get("heads", {}))
    out = [t for t in TASKS.names() if TASKS.get(t).head_name in heads]
    return out or ["encoder"]


def _git_commit() -> str:
    """The commit of the omnimask source that publishes (a git checkout), else ''."""
    from importlib import resources

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=10, cwd=str(resources.files("omnimask")))
        return r.stdout.strip() if r.returncode == 0 else ""
    except OSError:
        return ""


def _summary(source: Path) -> dict:
    try:
        s = json.loads((source / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return s if isinstance(s, dict) else {}


def _run_facts(summary: dict) -> dict:
    """Steps and training seconds of a run's ``summary.json``."""
    return {k: summary[k] for k in ("step", "train_seconds") if k in summary}


def _pretrain_metrics(summary: dict) -> list[dict]:
    """A pretraining run's final validation loss per objective (and its ratio to step 0),
    as an eval-JSON-shaped record."""
    val = summary.get("val")
    if not isinstance(val, dict) or not all(isinstance(v, dict) and "final" in v
                                            for v in val.values()):
        return []
    m = {f"{k}_loss": v["final"] for k, v in val.items()}
    m |= {f"{k}_ratio": v["ratio"] for k, v in val.items() if "ratio" in v}
    return [{"task": "pretrain", "split": "val", "metrics": m}]


def _read_evals(paths: Iterable[str | os.PathLike]) -> list[dict]:
    out = []
    for p in map(Path, paths):
        try:
            ev = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise OmnimaskError(f"--eval {p} is not an eval JSON ({e})") from None
        if not isinstance(ev, dict) or not {"task", "metrics"} <= set(ev):
            raise OmnimaskError(f"--eval {p} is not an eval JSON (no task and metrics; "
                                "write one with omnimask eval ... --out FILE)")
        out.append({k: ev[k] for k in ("task", "split", "n", "metrics") if k in ev})
    return out


def _copy_weights(src: Path, dst: Path, dtype: torch.dtype | None) -> None:
    if dtype is None:
        shutil.copy2(src, dst)
        return
    from safetensors.torch import load_file, save_file

    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(src).items()}
    save_file(sd, dst, metadata={"format": "pt"})


def publish(source: str | os.PathLike, name: str, to: str | os.PathLike, *,
            evals: Iterable[str | os.PathLike] = (), description: str = "",
            license: str = "", recipe: dict | None = None, dtype: str = "float32",
            base_url: str | None = None) -> ZooEntry:
    """Publish ``source`` (a model directory, a run directory with ``model/``, or a
    pretraining run, exported here) as zoo entry ``name`` into ``to``."""
    if not NAME_RE.match(name):
        raise OmnimaskError(f"--name {name!r} is not 'org/model' (lowercase letters, digits, "
                            "'.', '_', '-')")
    if dtype not in DTYPES:
        raise OmnimaskError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    src, to = Path(source), Path(to)
    if not src.is_dir():
        raise OmnimaskError(f"{src} is not a directory (a model or run directory)")
    manifest = to / MANIFEST
    known = read_manifest_file(manifest) if manifest.is_file() else []
    evals = _read_evals(evals)
    to.mkdir(parents=True, exist_ok=True)
    org, short = name.split("/")
    final = to / org / short
    stage = to / org / f".{short}.tmp{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = model_dir_of(src)
        if model is None:
            if not (src / "config.yaml").is_file():
                raise OmnimaskError(f"{src} is neither a model directory nor a run directory")
            from omnimask.train.export import export_run

            model = export_run(src, stage / "export")
        from omnimask.pretrained import read_config

        config = read_config(model)
        stage.mkdir(exist_ok=True)
        for f in sorted(model.rglob("*")):
            rel = f.relative_to(model)
            if not f.is_file() or any(p.startswith(".") for p in rel.parts):
                continue  # locks, temporaries
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.as_posix() == "model.safetensors":
                _copy_weights(f, stage / rel, DTYPES[dtype])
            else:
                shutil.copy2(f, stage / rel)
        shutil.rmtree(stage / "export", ignore_errors=True)
        files, reused = _files(stage, final, to, known, name, base_url)
        for rel in reused:  # another entry already serves this very file
            (stage / rel).unlink()
        mine = {f.url: f.sha256 for f in files}
        for e in known:  # files other entries take from this entry's folder must stay
            for f in e.files:
                if e.name != name and f.url.startswith(f"{org}/{short}/") and (
                        mine.get(f.url) != f.sha256):
                    raise OmnimaskError(f"{e.name} uses {f.url} of {name}, which this "
                                        "publication changes; publish to another name")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _prune_empty(final)
    summary = _summary(src) if model != src else {}  # a run directory's
    facts = _run_facts(summary)
    evals = evals or _pretrain_metrics(summary)
    entry = ZooEntry(name=name, files=tuple(files), description=description,
                     tasks=tuple(_tasks(config)), architecture=_architecture(config),
                     license=license, metrics=tuple(evals),
                     recipe={**facts, "weights_dtype": dtype, "commit": _git_commit(),
                             **(recipe or {})},
                     source=str(manifest.resolve()))
    rest = [e for e in known if e.name != name]
    atomic_write_bytes(manifest, dump_manifest([*rest, entry]).encode())
    return entry


def _files(stage: Path, final: Path, to: Path, known: list[ZooEntry], name: str,
           base_url: str | None) -> tuple[list[ZooFile], list[str]]:
    """The staged files as manifest rows; URLs relative to the manifest, or under
    ``base_url``; a file identical to one another entry serves reuses that URL."""
    own = final.relative_to(to).as_posix() + "/"  # files in this entry's folder are rewritten
    served = {f.sha256: f.url for e in known if e.name != name for f in e.files
              if "://" not in f.url and not f.url.startswith(own) and (to / f.url).is_file()}
    rows, reused = [], []
    for f in sorted(p for p in stage.rglob("*") if p.is_file()):
        rel = f.relative_to(stage).as_posix()
        sha = sha256_file(f)
        url = served.get(sha) or (final / rel).relative_to(to).as_posix()
        if sha in served:
            reused.append(rel)
        if base_url:
            url = base_url.rstrip("/") + "/" + url
        rows.append(ZooFile(rel, url, sha, f.stat().st_size))
    return rows, reused


def _prune_empty(d: Path) -> None:
    for p in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()

