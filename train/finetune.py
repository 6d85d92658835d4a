"""``omnimask finetune TASK``: config, build (model from a model directory or from scratch,
corpora, tasks), run, and the best model exported.

``init``: a model directory (``omnimask export`` of a pretraining run, or a fine-tuned
model) or ``scratch`` (a fresh model of ``model`` settings for ``tokenizers``). The task
heads a directory lacks start fresh; its encoder loads strictly. ``task=multitask`` trains
every task with a positive ``mix`` ratio on one encoder, one task per optimizer step drawn
by the ratios (as pretraining mixes objectives). Validation runs each task's own
evaluation on the first ``data.val_limit`` validation images; whenever the score
(``metric``: the task's, or for multitask the mean of the tasks' metrics) beats the best
so far, the model is written to ``RUN/model/`` (a model directory with only the task
heads), with ``RUN/model/metrics.json`` saying which step and score it holds.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from omnimask.config import check_choice, check_fields, save_config
from omnimask.errors import ConfigError, OmnimaskError
from omnimask.model import ModelConfig
from omnimask.safeio import atomic_write_bytes

from . import distributed as dist
from .pretrain import TokenizerPaths, build_model, load_tokenizers
from .tasks.base import TASKS, TaskContext, task_config
from .trainer import Trainer, TrainerConfig, load_weights, seed_everything, step_seed

log = logging.getLogger("omnimask.finetune")
TASK_NAMES = ("vqa", "retrieval", "caption", "segment")
BEST = "metrics.json"  # in RUN/model: the step and score of the exported weights


@dataclass
class FinetuneData:
    train: list[str] = field(default_factory=list)  # shard paths / globs
    val: list[str] = field(default_factory=list)
    val_limit: int = 256  # validation images each evaluation reads (the first ones)

    def __post_init__(self) -> None:
        check_fields(self, ">=1", "val_limit", prefix="data.")


@dataclass
class FinetuneConfig:
    out: str = "runs/finetune"
    task: str = "vqa"  # vqa | retrieval | caption | segment | multitask
    init: str = "scratch"  # a model directory, or scratch (model + tokenizers below)
    mix: dict[str, float] = field(default_factory=lambda: {"vqa": 1.0, "retrieval": 1.0,
                                                          "caption": 1.0})  # multitask
    data: FinetuneData = field(default_factory=FinetuneData)
    tokenizers: TokenizerPaths = field(default_factory=TokenizerPaths)  # scratch only
    model: ModelConfig = field(default_factory=ModelConfig)  # scratch only
    tasks: dict[str, Any] = field(default_factory=dict)  # tasks.<name>.<key>: task settings
    # heads.<name>.<key>: head settings over the head's own (fresh, or as the model directory
    # saved it), e.g. heads.retrieval.speech_itm=false
    heads: dict[str, Any] = field(default_factory=dict)
    # fine-tune the pixel encoder too when the model directory keeps it frozen
    # (model.image_encoder.frozen, as the demo's warm-up leaves it); the export says so
    train_image_encoder: bool = False
    # keep the pixel encoder as the init left it even when the model directory trains it
    # (a chain's later runs after one that trained it); the export says frozen
    freeze_image_encoder: bool = False
    # a model directory or zoo name whose pixel encoder replaces the init's (same
    # architecture), e.g. one a segmentation run trained on hue-turned images: shape features
    # learned apart from colour, for colour-shape pairs training never shows
    image_encoder_from: str = ""
    # a shape-blind colour path of this width added to the model's pixel tokens (fresh; see
    # model.image_color_path); 0: the model's own (none, unless its directory has one)
    image_color_path: int = 0
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        max_steps=500, batch_size=16, lr=5e-4, warmup_steps=50, eval_every=100,
        checkpoint_every=100))

    def __post_init__(self) -> None:
        check_fields(self, ">=0", "image_color_path")
        if self.train_image_encoder and self.freeze_image_encoder:
            raise ValueError("train_image_encoder and freeze_image_encoder are both true; "
                             "set one")
        check_choice(self, "task", (*TASK_NAMES, "multitask"))
        for name, v in self.mix.items():
            if name not in TASK_NAMES:
                raise ValueError(f"mix.{name}: unknown task; known: {', '.join(TASK_NAMES)}")
            if not float(v) >= 0:
                raise ValueError(f"mix.{name} must be >= 0, got {v}")
        for key in ("tasks", "heads"):
            for name, v in getattr(self, key).items():
                if name not in TASK_NAMES:
                    raise ValueError(f"{key}.{name}: unknown task; known: "
                                     f"{', '.join(TASK_NAMES)}")
                if key == "heads" and not isinstance(v, dict):
                    raise ValueError(f"heads.{name} must be a mapping of head settings, got "
                                     f"{v!r}")

    @property
    def task_names(self) -> list[str]:
        if self.task != "multitask":
            return [self.task]
        names = sorted(n for n, v in self.mix.items() if float(v) > 0)
        if not names:
            raise ConfigError("mix: no task has a positive ratio (task=multitask)")
        return names


def flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric metrics with nested ones named by their path (``per_type.color``)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class Finetuning:
    """Everything ``omnimask finetune`` builds, usable from Python and tests."""

    def __init__(self, cfg: FinetuneConfig, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.names = cfg.task_names
        self.task_cfgs = {n: task_config(n, cfg.tasks.get(n)) for n in self.names}
        self.run = Path(cfg.out)
        self._fwd = None  # the trainer's forward entry (DDP/FSDP) while training
        with dist.rank0_first(cfg.trainer.parallel, cfg.trainer.device):
            self.lock = dist.run_lock(self.run)  # rank 0 holds it for all
            try:
                self._build()
            except BaseException:
                self.lock.release()
                raise

    # -- build -------------------------------------------------------------------------------
    def _tokenizers(self) -> tuple[dict, dict[str, str]]:
        """Loaded tokenizers and their directories: the model directory's, or the config's."""
        from omnimask.pretrained import KINDS, TOKENIZERS, read_config
        from omnimask.pretrained import load_tokenizers as dir_tokenizers

        init = self.cfg.init
        if init == "scratch":
            tc = self.cfg.tokenizers
            dirs = {"text": tc.text, "image": tc.image, "speech": tc.speech}
            return load_tokenizers(tc), {k: v for k, v in dirs.items() if v}
        d = self.init_dir
        kinds = [k for k in read_config(d)["tokenizers"] if k in KINDS]
        for k in ("text", "image"):
            if k not in kinds:
                raise ConfigError(f"init: {d} carries no {k} tokenizer; fine-tuning needs it")
        toks = dir_tokenizers(d, kinds)
        toks.setdefault("speech", None)
        return toks, {k: str(d / TOKENIZERS / k) for k in kinds}

    def _resolve_init(self, init: str) -> Path:
        """``init``'s model directory: a folder, or a zoo name / ``hf://`` downloaded."""
        from omnimask.zoo import resolve

        try:
            return resolve(init, progress=self.progress)
        except OmnimaskError as e:
            raise ConfigError(f"init: {e} (or use init=scratch)") from None

    def _head(self, name: str, base: Any) -> Any:
        """Head ``name``'s settings: ``base`` (a dict, dataclass or None) with
        ``heads.<name>`` over it, validated by the head's schema (errors name the key)."""
        from dataclasses import asdict, is_dataclass

        from omnimask.model import head_config
        from omnimask.registry import HEADS

        over = self.cfg.heads.get(name)
        if not over:
            return base
        given = asdict(base) if is_dataclass(base) else dict(base or {})
        try:
            return head_config(HEADS.get(name), name, given | over)
        except ConfigError as e:
            raise ConfigError(f"heads.{name}: {str(e).removeprefix(f'head {name!r}: ')}"
                              ) from None

    def _build(self) -> None:
        from omnimask.pretrained import load, read_config

        from .corpus import load_or_build

        cfg = self.cfg
        self.init_dir = None if cfg.init == "scratch" else self._resolve_init(cfg.init)
        self.toks, tk = self._tokenizers()
        text, image, speech = self.toks["text"], self.toks["image"], self.toks.get("speech")
        self.vocab = text.vocab(image.size, speech.size if speech else 0)
        if cfg.init != "scratch":
            mc = read_config(self.init_dir)["model"]
            image_input = mc.get("image_input", "vq_latents")
        else:
            image_input = cfg.model.image_input
        if image_input == "patch_encoder":
            raise ConfigError("fine-tuning reads pixels or VQ latents; this model reads "
                              "patch-encoder features (model.image_input=patch_encoder)")
        self.train = load_or_build(self.run / "corpus-train.safetensors", cfg.data.train, tk,
                                   self.toks, "vq", progress=self.progress)
        self.val = load_or_build(self.run / "corpus-val.safetensors", cfg.data.val, tk,
                                 self.toks, "vq", progress=self.progress)
        self.ctx = TaskContext(vocab=self.vocab, text=text, pixels=image_input == "pixels",
                               speech=speech)
        self.tasks = {n: TASKS.create(n, self.ctx, self.task_cfgs[n]) for n in self.names}
        for n, t in self.tasks.items():
            t.check(self.train, f"data.train ({n})")
            t.check(self.val, f"data.val ({n})")
        if cfg.init == "scratch":
            heads = {n: self._head(n, t.head_config(self.train)) for n, t in self.tasks.items()}
            self.model = build_model(cfg.model, self.toks, self.vocab, self.train, heads, tk,
                                     cfg.trainer.seed)
        else:
            saved = read_config(self.init_dir)["heads"]
            heads = {n: self._head(n, saved[n] if n in saved else t.head_config(self.train))
                     for n, t in self.tasks.items()}
            seed_everything(cfg.trainer.seed)  # fresh heads: a function of the seed alone
            self.model = load(self.init_dir, heads=heads)
            self.model.tokenizer_dirs = tk
            for n in self.names:  # a fresh head that can start from pretraining heads does
                hook = getattr(self.model.heads[n], "init_from_directory", None)
                if n not in saved and hook is not None:
                    done = hook(self.init_dir)
                    if done:
                        log.info("heads.%s starts from the pretraining heads: %s", n,
                                 ", ".join(done))
        if cfg.image_encoder_from:
            self._swap_image_encoder(cfg.image_encoder_from)
        if cfg.image_color_path:
            self._add_color_path(cfg.image_color_path)
        if cfg.train_image_encoder or cfg.freeze_image_encoder:
            self._set_image_encoder_frozen(cfg.freeze_image_encoder)
        for t in self.tasks.values():
            t.bind(self.model)
        self.vocab.save(self.run / "vocab.json")
        save_config(cfg, self.run)
        self.best = self._read_best()

    def _swap_image_encoder(self, source: str) -> None:
        from omnimask.pretrained import load_image_encoder

        try:
            n = load_image_encoder(self.model, source)
        except OmnimaskError as e:
            raise ConfigError(f"image_encoder_from: {e}") from None
        log.info("the pixel encoder (%d tensors) comes from %s", n, source)

    def _add_color_path(self, width: int) -> None:
        from omnimask.modalities.image.embedder import ColorPath

        self._need_pixels("image_color_path")
        mc, emb = self.model.cfg, self.model.encoder.embedders["image"]
        if mc.image_color_path not in (0, width):
            raise ConfigError(f"image_color_path: the model has one of width "
                              f"{mc.image_color_path} already, got {width}")
        if emb.color is None:
            emb.color = ColorPath(width, mc.trunk.dim, mc.image_encoder.grid)
            mc.image_color_path = width

    def _need_pixels(self, setting: str) -> None:
        if self.model.cfg.image_input != "pixels":
            raise ConfigError(f"{setting}: this model reads no pixels "
                              f"(model.image_input={self.model.cfg.image_input})")

    def _set_image_encoder_frozen(self, frozen: bool) -> None:
        self._need_pixels("freeze_image_encoder" if frozen else "train_image_encoder")
        mc = self.model.cfg
        enc = self.model.encoder.embedders["image"].encoder
        enc.freeze(frozen)
        enc.cfg = replace(enc.cfg, frozen=frozen)
        mc.image_encoder = replace(mc.image_encoder, frozen=frozen)

    def _read_best(self) -> dict:
        p = self.run / "model" / BEST
        try:
            return json.loads(p.read_text()) if p.is_file() else {}
        except ValueError:
            return {}

    # -- data --------------------------------------------------------------------------------
    def make_batch(self, step: int, micro: int) -> tuple[str, dict]:
        seed = self.cfg.trainer.seed
        g = torch.Generator().manual_seed(step_seed(seed, step))
        if len(self.names) > 1:
            w = torch.tensor([float(self.cfg.mix[n]) for n in self.names])
            name = self.names[int(torch.multinomial(w, 1, generator=g))]
        else:
            name = self.names[0]
        # `micro` counts micro-batches over all ranks: each rank draws its own samples
        gd = torch.Generator().manual_seed(step_seed(seed + 7919, step, micro))
        n = min(self.cfg.trainer.batch_size, len(self.train))
        idx = torch.randperm(len(self.train), generator=gd)[:n].tolist()
        return name, self.tasks[name].batch(self.train, idx, gd)

    def loss(self, name: str, batch: dict) -> dict:
        return self.tasks[name].loss(self._fwd or self.model, batch)

    # -- validation and the best model --------------------------------------------------------
    def evaluate(self, model) -> dict:
        metrics: dict[str, float] = {}
        scores = []
        trainer = getattr(self, "trainer", None)
        # the last evaluation also draws each task's examples, for TensorBoard
        shown = (self.run / "examples" if trainer is not None and trainer.finishing
                 and trainer.tb is not None else None)
        for n, t in self.tasks.items():
            m = t.evaluate(model, self.val, self.cfg.data.val_limit, shown)
            scores.append(float(m[t.metric]))
            for k, v in flat(m).items():
                metrics[k if len(self.tasks) == 1 else f"{n}.{k}"] = round(v, 5)
        score = sum(scores) / len(scores)
        metrics["score"] = round(score, 5)
        step = self.trainer.step if hasattr(self, "trainer") else 0
        if shown is not None and shown.is_dir():
            from .trainer import tb_add

            tb_add(self.run, step, {f"examples/{p.stem}": p for p in sorted(shown.glob("*.png"))},
                   writer=trainer.tb)
        better = step > 0 and score > self._best_score()
        if trainer is not None and trainer.fsdp:  # every rank evaluated: they agree (one
            better = dist.all_max([float(better)])[0] > 0  # gathering alone would hang)
        if better:
            self._export(step, score, metrics)
        return {"metrics": metrics}

    def _best_score(self) -> float:
        """The exported model's validation score; -inf when it has none (a run stopped
        before validating exports its last weights unscored: any later validation beats it)."""
        best = self.best.get("score")
        return best if isinstance(best, (int, float)) and math.isfinite(best) else float("-inf")

    def _export(self, step: int, score: float | None, metrics: dict) -> None:
        """The model (task heads only) as ``RUN/model``, replaced whole: written beside it,
        then swapped in."""
        from omnimask.model import OmniModel

        trainer = getattr(self, "trainer", None)
        # under FSDP every rank evaluates and gathers the weights; rank 0 writes
        sd = trainer._weights() if trainer is not None and trainer.fsdp else None
        # every rank keeps the best score: under FSDP they all decide when to gather
        self.best = {"step": step, "score": score, "metric": self.metric_name,
                     "metrics": metrics}
        if not dist.is_main():
            return
        out, tmp = self.run / "model", self.run / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        m = self.model
        heads = {n: m.head_configs[n] for n in self.names}
        slim = OmniModel(m.cfg, heads)
        sd = sd if sd is not None else m.state_dict()
        load_weights(slim, {k: v for k, v in sd.items()
                            if k.startswith("encoder.") or k.split(".")[1] in heads},
                     "the fine-tuned weights")
        slim.vocab, slim.tokenizer_dirs = m.vocab, m.tokenizer_dirs
        slim.save_pretrained(tmp)
        atomic_write_bytes(tmp / BEST, (json.dumps(self.best, indent=1) + "\n").encode())
        old = self.run / "model.old"
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)

    @property
    def metric_name(self) -> str:
        if len(self.tasks) == 1:
            return next(iter(self.tasks.values())).metric
        return "mean of " + ", ".join(f"{n}.{t.metric}" for n, t in self.tasks.items())

    # -- run ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        t0 = time.perf_counter()
        self.trainer = Trainer(self.cfg.trainer, self.run, self.model, self.make_batch,
                               self.loss, self.evaluate, self.progress,
                               desc=f"finetune {self.cfg.task}")
        self._fwd = self.trainer.forward_model
        try:
            summary = self.trainer.fit()
            self._fwd = None
            summary["train_seconds"] = round(time.perf_counter() - t0, 1)
            if not (self.run / "model").is_dir():  # nothing validated yet: keep the last
                self._export(self.trainer.step, None, {})
            if not dist.is_main():
                return summary
            summary["best"] = self._read_best()
            summary["model"] = str(self.run / "model")
            atomic_write_bytes(self.run / "summary.json", json.dumps(summary, indent=1).encode())
        finally:
            self.lock.release()
        return summary
