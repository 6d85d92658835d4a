"""The one training loop (pretraining, the VQ image tokenizer, the shape judge): mixed
precision, accumulation, clipping, AdamW or Adam, warmup + cosine by steps or by time, EMA,
checkpoints that survive SIGKILL, signals, non-finite losses, and logs.

The loop asks ``make_batch(step, micro)`` for its data and ``loss_fn(name, batch)`` for a
loss dict; it knows nothing about objectives. Every step re-seeds the global RNGs from
(seed, step), and ``make_batch`` draws from generators seeded the same way, so step ``s``
computes the same thing whether the run was resumed or not: a resumed run repeats the
losses of an unbroken one exactly (tested with SIGKILL). A data source that keeps state
instead (``data=``: ``make_batch`` plus ``state_dict``/``load_state_dict``) has that state
stored in every checkpoint and restored on resume.

Data parallel (``parallel``: ddp | fsdp, under torchrun or ``omnimask submit``): every rank
runs ``make_batch(step, rank * accumulate + micro)``, so W ranks with accumulation A
compute exactly what one process with accumulation W*A does; losses are averaged over
ranks for the logs; rank 0 alone writes metrics, TensorBoard and checkpoints, which hold
whole (unsharded) tensors, so a run resumes on any number of ranks. Ranks agree every
step on stopping (a signal on any rank, the time budget of rank 0's clock) and on a
non-finite loss, so they save and stop at the same step. The loss function must call the
model through ``trainer.forward_model`` (the DDP/FSDP entry point; attributes are the
module's).

Hooks: ``parallelize(model)`` wraps the model before the optimizer is built (after
``parallel``'s wrapper, identity by default), ``after_step(step, outputs)`` runs
after each applied optimizer step with the micro-batches' loss dicts and may return extra
metrics for that step's row (the VQ's codebook usage).

Checkpoints (``train/checkpoint.py``): weights as safetensors; optimizer, schedule
(warmup, total steps, by steps or time and the time budget: a resumed run keeps the
schedule it started with), step, EMA, the data source's state,
counters and every RNG state in ``state.safetensors`` (no pickle); written to a temporary
folder, fsynced, renamed into place, ``COMPLETE`` marker (with checksums) last; the last
``keep`` are kept; a damaged newest one is skipped for the previous. Saved every
``checkpoint_every`` steps, at the end, and at the next step boundary after SIGUSR2 or
SIGTERM (the handler only sets a flag). A non-finite loss or gradient skips the step
(no update) and is counted; after ``max_nonfinite`` in a row the run stops with an error
naming the step and the last good checkpoint, which is left intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from omnimask.config import PRECISIONS, check_choice, check_fields
from omnimask.errors import ConfigError, OmnimaskError
from omnimask.runlock import RunLock
from omnimask.safeio import atomic_write_bytes
from omnimask.stopsignals import StopSignals

from . import checkpoint as ckpt
from . import distributed as dist

log = logging.getLogger("omnimask.trainer")


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # with schedule_by=time: a cap, 0 for none
    max_minutes: float = 0.0  # > 0: stop (with a checkpoint) after this much training time
    schedule_by: str = "steps"  # steps | time (the cosine follows elapsed / max_minutes)
    optimizer: str = "adamw"  # adamw | adam (weight_decay is then an L2 penalty)
    batch_size: int = 32
    accumulate: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    # < 1: layer-wise learning-rate decay (BEiT's fine-tuning): a parameter at depth d of
    # the model's D (its ``layer_depths()``: embeddings 0, block i i + 1, heads D) trains at
    # lr * layer_decay ** (D - d), so the lower layers keep more of what pretraining taught
    layer_decay: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    clip: float = 5.0  # max gradient norm; 0 disables
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    ema: float = 0.0  # > 0: keep an exponential moving average of the weights
    checkpoint_every: int = 500
    keep: int = 2
    eval_every: int = 200  # 0: only at the end (and the start, with eval_first)
    eval_first: bool = True  # a fresh run validates before its first step too
    log_every: int = 10  # progress bar and TensorBoard; metrics.jsonl gets every step
    max_nonfinite: int = 5
    resume: str = "auto"  # auto (newest complete checkpoint, if any) | never | PATH
    # a resumed run keeps its checkpoint's schedule; extend=true takes this config's
    # max_steps (and max_minutes) instead: a finished run trains on, its cosine stretched
    extend: bool = False
    seed: int = 0
    threads: int = 0  # torch threads; 0 keeps torch's default
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tensorboard: bool = True
    parallel: str = "none"  # none | ddp | fsdp (with more than one process: torchrun, submit)
    # torch.compile the trunk's blocks (same maths, fused kernels); the first step compiles
    compile: bool = False

    def __post_init__(self) -> None:
        p = "trainer."  # where it sits in a pretraining config: errors name the full key
        for key, allowed in (("precision", PRECISIONS),
                             ("schedule_by", ("steps", "time")), ("optimizer", ("adamw", "adam")),
                             ("parallel", dist.PARALLEL)):
            check_choice(self, key, allowed, prefix=p)
        check_fields(self, ">=1", "batch_size", "accumulate", "checkpoint_every",
                     "keep", "log_every", "max_nonfinite", prefix=p)
        check_fields(self, ">=0", "max_steps", "max_minutes", "warmup_steps", "weight_decay",
                     "clip", "eval_every", "threads", prefix=p)
        if self.schedule_by == "steps" and self.max_steps < 1:
            raise ValueError(f"{p}max_steps must be >= 1 with schedule_by=steps, got "
                             f"{self.max_steps}")
        if self.schedule_by == "time" and not self.max_minutes > 0:
            raise ValueError(f"{p}max_minutes must be > 0 with schedule_by=time, got "
                             f"{self.max_minutes}")
        check_fields(self, ">0", "lr", prefix=p)
        check_fields(self, "[0,1]", "min_lr_ratio", prefix=p)
        check_fields(self, "(0,1]", "layer_decay", prefix=p)
        check_fields(self, "[0,1)", "ema", prefix=p)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{p}betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.compile and self.parallel == "fsdp":
            raise ValueError(f"{p}compile is not supported with {p}parallel=fsdp; use ddp")
        if self.parallel == "fsdp" and self.ema > 0:
            raise ValueError(f"{p}ema is not supported with {p}parallel=fsdp (the average "
                             "would need whole weights on every rank); use ddp")
        problem = device_problem(self.device)
        if problem:
            raise ValueError(f"{p}device {problem}")


class NonFiniteLoss(OmnimaskError):
    """Too many non-finite losses in a row."""


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """One 63-bit seed per (run seed, step, micro-batch): the whole data/RNG story."""
    return (seed * 1_000_003 + step * 4099 + micro) % (2**63 - 1)


def lr_at(cfg: TrainerConfig, step: int, total: int, warmup: int,
          progress: float | None = None) -> float:
    """Linear warmup over ``warmup`` steps, then cosine to ``lr * min_lr_ratio`` over the
    steps up to ``total``, or by ``progress`` (elapsed / budget) for a time schedule."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup) if progress is None else progress
    t = min(1.0, t)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model: torch.nn.Module, weight_decay: float,
                 layer_decay: float = 1.0) -> list[dict]:
    """No weight decay on norms, biases, embeddings and other vectors. Embedding tables are
    the weights of ``nn.Embedding`` modules and the parameters a module names in its
    ``no_weight_decay()`` (timm's convention; names relative to that module), e.g. a plain
    ``nn.Parameter`` indexed or scored against as a table. ``layer_decay`` < 1: one group
    per (depth, decay), each with its ``lr_scale`` (``TrainerConfig.layer_decay``)."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for m in model.modules():
        if callable(getattr(m, "no_weight_decay", None)):
            emb |= {id(m.get_parameter(name)) for name in m.no_weight_decay()}
    depths, top = {}, 0
    if layer_decay < 1:
        if not callable(getattr(model, "layer_depths", None)):
            raise ConfigError(f"trainer.layer_decay={layer_decay}: {type(model).__name__} "
                              "does not name its layers' depths (layer_depths()); use 1")
        depths, top = model.layer_depths()
    groups: dict[tuple[int, bool], list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decays = not (p.ndim < 2 or id(p) in emb)
        groups.setdefault((depths.get(name, top), decays), []).append(p)
    if layer_decay == 1:  # the two groups, in this order, as checkpoints have them
        return [{"params": groups.get((0, d), []), "weight_decay": weight_decay if d else 0.0}
                for d in (True, False)]
    return [{"params": ps, "weight_decay": weight_decay if d else 0.0,
             "lr_scale": layer_decay ** (top - depth)}
            for (depth, d), ps in sorted(groups.items(),
                                         key=lambda kv: (kv[0][0], not kv[0][1]))]


def compile_trunks(model: torch.nn.Module) -> int:
    """``compile_blocks`` on every trunk inside ``model``; how many there were."""
    trunks = [m for m in model.modules() if callable(getattr(m, "compile_blocks", None))]
    for t in trunks:
        t.compile_blocks()
    if not trunks:
        log.warning("trainer.compile: the model has no trunk to compile; it runs eagerly")
    return len(trunks)


def fusable(model: torch.nn.Module) -> bool:
    """Whether the fused (one kernel for all tensors) Adam implementation takes these
    parameters: floating point, on CPU or CUDA (FSDP shards included)."""
    ps = [p for p in model.parameters() if p.requires_grad]
    return bool(ps) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in ps)


def make_optimizer(cfg: TrainerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or Adam (decay as an L2 penalty) over ``param_groups``;
    fused where ``fusable`` (the same update as the per-tensor loop, fewer passes)."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr,
               betas=tuple(cfg.betas), fused=fusable(model) or None)


def _scalar(v) -> bool:
    """A loss-dict entry the rows log: a number or a one-element tensor."""
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():  # saved where more GPUs were visible:
        torch.cuda.set_rng_state_all(st["cuda"][:torch.cuda.device_count()])  # those seen


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX
    (elsewhere bf16 matmuls and convolutions are emulated, slower than fp32)."""
    if torch.device(device).type == "cuda":
        return True
    cpu = torch.cpu
    return any(bool(getattr(cpu, f, lambda: False)())
               for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def warn_emulated_bf16(setting: str, device: str | torch.device) -> None:
    """A warning where ``setting`` asks bf16 of a device that only emulates it (a CPU
    without AVX512-BF16 or AMX: bf16 matmuls there run ~100x slower than fp32)."""
    if not native_bf16(device):
        log.warning("%s=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is "
                    "emulated here, far slower than fp32 (auto picks fp32)", setting)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def device_problem(name: str) -> str | None:
    """Why ``name`` (auto | cpu | cuda | cuda:N | mps) cannot be used here, or None."""
    m = re.fullmatch(r"auto|cpu|mps|cuda(?::(\d+))?", name)
    if m is None:
        return f"must be auto, cpu, cuda, cuda:N or mps, got {name!r}"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"is {name!r} but no CUDA GPU is available here; use cpu or auto"
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            return (f"is {name!r} but this machine has {torch.cuda.device_count()} CUDA "
                    "GPU(s), numbered from 0")
    if name == "mps" and not torch.backends.mps.is_available():
        return "is 'mps' but MPS is not available here; use cpu or auto"
    return None


def resolve_device(name: str) -> torch.device:
    """The torch device of ``trainer.device``; a ConfigError naming it if unusable here
    (a config loaded on a GPU machine, run on one without)."""
    problem = device_problem(name)
    if problem:
        raise ConfigError(f"trainer.device {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def aliases(model: torch.nn.Module) -> dict[str, str]:
    """State-dict keys that name a tensor an earlier key already names (tied embeddings)
    -> that earlier key."""
    out, first = {}, {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in first:
            out[k] = first[key]
        else:
            first[key] = k
    return out


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared tensors (tied embeddings) stored once each: safetensors
    refuses aliases. ``load_weights`` restores them through the module's own ties."""
    tied = aliases(model)
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(model.state_dict()) - set(weights(model))
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise OmnimaskError(f"{what}: weights do not fit the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")


class Trainer:
    """``make_batch(step, micro) -> (name, batch)`` (a pure function of the step), or
    ``data``: an object with that ``make_batch`` and ``state_dict()``/``load_state_dict()``,
    its state kept in the checkpoints. ``loss_fn(name, batch)`` returns ``loss``, optionally
    ``units`` (counted for the throughput, ``<units>_per_s``), scalar metrics (logged,
    averaged over micro-batches) and anything else (not logged; ``after_step`` sees it).
    ``parallelize(model) -> model`` runs once, after the move to the device and before the
    optimizer is built: what it returns is trained, clipped and checkpointed (identity by
    default; the distributed issue fills it). ``desc`` labels the progress bar."""

    def __init__(self, cfg: TrainerConfig, run_dir: str | os.PathLike, model: torch.nn.Module,
                 make_batch: Callable[[int, int], tuple[str, dict]] | None = None,
                 loss_fn: Callable[[str, dict], dict] | None = None,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None,
                 progress: bool = True, *, data=None,
                 parallelize: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 after_step: Callable[[int, list[dict]], dict | None] | None = None,
                 desc: str = "pretrain", units: str = "tokens", local: bool = False) -> None:
        if (make_batch is None) == (data is None):
            raise TypeError("Trainer needs exactly one of make_batch and data")
        if data is not None and not all(callable(getattr(data, a, None)) for a in
                                        ("make_batch", "state_dict", "load_state_dict")):
            raise TypeError(f"data ({type(data).__name__}) needs make_batch, state_dict and "
                            "load_state_dict")
        if loss_fn is None:
            raise TypeError("Trainer needs loss_fn")
        self.cfg, self.run = cfg, Path(run_dir)
        self.run.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = dist.device_for_rank(resolve_device(cfg.device))
        if cfg.precision == "bf16":
            warn_emulated_bf16("trainer.precision", self.device)
        # local: a helper this process trains alone (the shape judge on rank 0)
        self.rank, self.world = (0, 1) if local else dist.rank_and_world()
        if self.world > 1 and cfg.parallel == "none":
            raise ConfigError(f"launched as {self.world} processes but trainer.parallel=none "
                              "(each would train alone): set trainer.parallel=ddp or fsdp")
        if self.world > 1:
            dist.setup(self.device)
        model = model.to(self.device)
        if cfg.compile:
            compile_trunks(model)
        self._aliases = aliases(model)  # tied weights, known before FSDP shards them
        # FSDP: 0-d parameters become 1-element vectors; checkpoints keep them 0-d
        self._lifted = (dist.lift_scalars(model) if cfg.parallel == "fsdp" and self.world > 1
                        else [])
        model = dist.wrap(model, cfg.parallel, self.device)
        self.model = parallelize(model) if parallelize is not None else model
        self.module = dist.unwrap(self.model)  # the plain module: weights, EMA, checkpoints
        self.fsdp = dist.is_fsdp(self.module)
        self.forward_model = dist.Forward(self.module, self.model)
        self.data = data
        self.make_batch = data.make_batch if data is not None else make_batch
        self.loss_fn, self.evaluate, self.after_step = loss_fn, evaluate, after_step
        self.progress, self.desc, self.units = progress, desc, units
        self.opt = make_optimizer(cfg, self.module)
        self.ema = ({k: v.detach().clone().float() for k, v in weights(self.module).items()
                     if v.is_floating_point()} if cfg.ema > 0 else None)
        self.step = 0
        self.schedule = {"warmup": cfg.warmup_steps, "total": cfg.max_steps,
                         "by": cfg.schedule_by, "minutes": cfg.max_minutes}
        self.nonfinite = {"total": 0, "in_a_row": 0}
        self.elapsed = 0.0
        self.clock = time.perf_counter  # tests substitute a fake clock
        self._stop: StopSignals | None = None
        self._val_logged: set[int] = set()  # steps whose validation row metrics.jsonl holds
        self._last_val: dict | None = None  # the last validation row (TensorBoard HParams)
        self.restored: Path | None = None  # the checkpoint this run resumed from
        self.tb = None
        self.finishing = False  # True during the last evaluation (evaluators add examples)

    # -- precision ---------------------------------------------------------------------------
    def autocast(self):
        p = self.cfg.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" else "fp32"
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- schedule ----------------------------------------------------------------------------
    @property
    def budget_s(self) -> float:
        """The training-time budget in seconds (0: none): the schedule's own with
        schedule_by=time, else ``max_minutes`` of this run's config."""
        by_time = self.schedule["by"] == "time"
        return 60 * (self.schedule["minutes"] if by_time else self.cfg.max_minutes)

    def lr(self) -> float:
        s = self.schedule
        progress = self.elapsed / self.budget_s if s["by"] == "time" else None
        return lr_at(self.cfg, self.step, s["total"], s["warmup"], progress)

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.run / "checkpoints"

    def state(self) -> dict:
        data = {"seed": self.cfg.seed, "step": self.step}
        if self.data is not None:
            data["source"] = self.data.state_dict()
        return {"step": self.step, "optimizer": self._optimizer_state(),
                "schedule": dict(self.schedule), "nonfinite": dict(self.nonfinite),
                "elapsed": self.elapsed, "rng": rng_state(), "ema": self.ema,
                "data": data, "config": asdict(self.cfg)}

    def _optimizer_state(self) -> dict:
        """The optimizer's state as one process holds it (parameters numbered in group
        order): under FSDP gathered whole from the shards (every rank calls this)."""
        if not self.fsdp:
            return self.opt.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        full = get_optimizer_state_dict(self.module, self.opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        mine = self.opt.state_dict()
        names = self._param_names()
        state = {}
        for i, name in enumerate(n for g in names for n in g):
            if name in full.get("state", {}):
                state[i] = {k: (v.reshape(()) if name in self._lifted and k != "step" else v)
                            for k, v in full["state"][name].items()}
        return {"state": state, "param_groups": mine["param_groups"]}

    def _param_names(self) -> list[list[str]]:
        """Each optimizer group's parameter names, in the optimizer's order."""
        by_id = {id(p): n for n, p in self.module.named_parameters()}
        return [[by_id[id(p)] for p in g["params"]] for g in self.opt.param_groups]

    def _check_groups(self, sd: dict, path: Path) -> None:
        """Refuses a checkpoint whose optimizer groups (sizes, lr scales) are not this run's:
        loading would take the checkpoint's scales, or fail inside torch."""
        mine = [(len(g["params"]), g.get("lr_scale")) for g in self.opt.param_groups]
        theirs = [(len(g["params"]), g.get("lr_scale")) for g in sd["param_groups"]]
        if mine != theirs:
            raise OmnimaskError(f"{path}: its optimizer groups differ from this run's "
                                "(trainer.layer_decay or the trainable parameters changed): "
                                "resume with the run's settings, or start a new run")

    def _load_optimizer(self, sd: dict) -> None:
        if not self.fsdp:
            self.opt.load_state_dict(sd)
            self._match_state_layout()
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        names = [n for g in self._param_names() for n in g]
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
        full = {"state": {names[int(i)]: {
            k: (t.reshape(1) if names[int(i)] in self._lifted and k != "step" else t)
            for k, t in v.items()} for i, v in sd["state"].items()}, "param_groups": groups}
        # parameters that never had a gradient (an unused modality) have no state
        set_optimizer_state_dict(self.module, self.opt, full,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        self._match_state_layout()

    def _match_state_layout(self) -> None:
        """Loaded moments take their parameter's memory layout (a channels-last conv keeps
        channels-last moments, as a fresh run creates them): the fused kernel steps over
        parameter, gradient and moments as one flat layout."""
        for p, st in self.opt.state.items():
            for k, t in st.items():
                if (isinstance(t, torch.Tensor) and t.shape == p.shape and t.dim()
                        and t.stride() != p.stride()):
                    st[k] = torch.empty_like(p, dtype=t.dtype).copy_(t)

    def _weights(self) -> dict[str, torch.Tensor]:
        """Whole weights (every rank calls this; under FSDP only rank 0 gets them)."""
        if not self.fsdp:
            return weights(self.module)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        return {k: (v.reshape(()) if k in self._lifted else v) for k, v in full.items()
                if k not in self._aliases}

    def _load_weights(self, sd: dict[str, torch.Tensor], what: str) -> None:
        if not self.fsdp:
            load_weights(self.module, sd, what)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        names = set(self.module.state_dict())
        missing, unexpected = names - set(sd) - set(self._aliases), set(sd) - names
        if missing or unexpected:
            raise OmnimaskError(f"{what}: weights do not fit the model: missing "
                                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        sd = {k: (v.reshape(1) if k in self._lifted else v) for k, v in sd.items()}
        # tied aliases are left out: the shared parameter is loaded once, by its first name
        set_model_state_dict(self.module, sd, options=StateDictOptions(full_state_dict=True,
                                                                       strict=False))

    def save(self) -> Path:
        """Every rank calls this (FSDP gathers); rank 0 writes; all return its path."""
        w, st = self._weights(), self.state()
        path = None
        if self.rank == 0:
            path = ckpt.save(self.ckpt_dir, self.step, w, st, keep=self.cfg.keep)
            log.info("checkpoint %s", path)
        return Path(self._broadcast(str(path)))

    def restore(self) -> bool:
        r = self.cfg.resume
        if r == "never":
            return False
        if r == "auto":
            # rank 0 picks (the newest complete one, past a damaged newest); all load it
            found = ckpt.load_newest(self.ckpt_dir) if self.rank == 0 else None
            chosen = self._broadcast(str(found[0]) if found else "")
            if not chosen:
                return False
            path = Path(chosen)
            sd, st = (found[1], found[2]) if found else ckpt.load(path)
        else:
            path = Path(r)
            if not (path / ckpt.MARKER).is_file():
                raise OmnimaskError(f"trainer.resume: no complete checkpoint at {path}")
            sd, st = ckpt.load(path)
        if st["data"]["seed"] != self.cfg.seed:
            raise OmnimaskError(f"{path} was trained with seed {st['data']['seed']}, this run "
                                f"has trainer.seed={self.cfg.seed}")
        if (self.data is not None) != ("source" in st["data"]):
            raise OmnimaskError(f"{path} was trained {'with' if self.data is None else 'without'}"
                                " a stateful data source, this run has "
                                f"{'none' if self.data is None else 'one'}: start a new run")
        self._load_weights(sd, str(path))
        self._check_groups(st["optimizer"], path)
        self._load_optimizer(st["optimizer"])
        self.step = st["step"]
        self.schedule = {"by": "steps", "minutes": 0.0, **st["schedule"]}  # older: by steps
        self.nonfinite, self.elapsed = st["nonfinite"], st["elapsed"]
        self.ema = None if st["ema"] is None else {  # loaded on the CPU; the model may not be
            k: v.to(self.device) for k, v in st["ema"].items()}
        if self.data is not None:
            self.data.load_state_dict(st["data"]["source"])
        want = {"total": self.cfg.max_steps, "by": self.cfg.schedule_by}
        if self.cfg.schedule_by == "time":
            want["minutes"] = self.cfg.max_minutes
        if self.cfg.extend and self.schedule["by"] == want["by"] and any(
                self.schedule[k] != v for k, v in want.items()):
            log.warning("trainer.extend: the schedule goes from %s to %s at step %d",
                        _schedule_words(self.schedule), _schedule_words(want), self.step)
            self.schedule.update(want)
        elif any(self.schedule[k] != v for k, v in want.items()):
            log.warning("resuming with the schedule of the checkpoint (%s), not this config's "
                        "(%s); trainer.extend=true takes the config's", _schedule_words(
                            self.schedule), _schedule_words(want))
        set_rng_state(st["rng"])
        self.restored = path
        self._truncate_metrics(self.step)
        log.warning("resumed from %s at step %d", path, self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Rows a killed run logged after its last checkpoint are replayed: drop them, and a
        line torn by the kill. Remembers which steps already have a validation row."""
        p = self.run / "metrics.jsonl"
        self._barrier()  # every rank has read the checkpoint's choice before rank 0 rewrites
        if not p.is_file():
            return
        keep = []
        for n, ln in enumerate(p.read_text(errors="replace").splitlines(), 1):
            try:
                row = json.loads(ln)
            except ValueError:
                if ln.strip():
                    log.warning("%s:%d is not a JSON row (torn by a kill?); dropped", p, n)
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(ln)
                if row.get("split") == "val":
                    self._val_logged.add(row.get("step"))
        if self.rank == 0:
            atomic_write_bytes(p, "".join(ln + "\n" for ln in keep).encode())
        self._barrier()

    # -- logging -----------------------------------------------------------------------------
    def log_row(self, row: dict) -> None:
        if row.get("split") == "val":
            self._val_logged.add(row["step"])
            self._last_val = row
        if self.rank != 0:
            return
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            split = row.get("split", "train")
            if split == "train" and row.get("objective") and isinstance(row.get("loss"), float):
                # one series per objective: train/loss alone switches among them step by step
                self.tb.add_scalar(f"train/loss_by_objective/{row['objective']}", row["loss"],
                                   row["step"])
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{split}/{k}", v, row["step"])
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)):
                            self.tb.add_scalar(f"{row.get('split')}/{k}/{kk}", vv, row["step"])

    def _open_tb(self) -> None:
        if not self.cfg.tensorboard or self.rank != 0:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run / "tb"))
            config = self.run / "config.yaml"
            if config.is_file():  # the run's whole config, as TensorBoard's text tab shows it
                self.tb.add_text("config", "```yaml\n" + config.read_text() + "\n```",
                                 self.step)
        except ImportError:
            log.warning("tensorboard is not installed: no tb/ logs")

    def _tb_hparams(self) -> None:
        """The trainer's settings against the last validation's numbers (HParams tab)."""
        if self.tb is None:
            return
        hp = {k: v for k, v in asdict(self.cfg).items()
              if isinstance(v, (int, float, str, bool)) and v is not None}
        metrics = {}
        for k, v in (self._last_val or {}).items():
            items = v.items() if isinstance(v, dict) else [("", v)]
            for kk, vv in items:
                if isinstance(vv, (int, float)) and not isinstance(vv, bool) and k != "step":
                    metrics[f"hparam/{k}/{kk}" if kk else f"hparam/{k}"] = float(vv)
        self.tb.add_hparams(hp, metrics or {"hparam/steps": float(self.step)}, run_name=".")

    def run_eval(self) -> dict:
        """Rank 0 evaluates the plain module while the others wait; under FSDP every rank
        evaluates (the shards need each other), rank 0 logs."""
        if self.evaluate is None:
            return {}
        if self.rank != 0 and not self.fsdp:
            self._val_logged.add(self.step)  # rank 0 logs this step's row
            self._barrier()
            return {}
        backup = None
        if self.ema is not None:
            # copied into the tensors themselves: a tied alias (the vocabulary head's
            # embedding) then shows the EMA too; load_state_dict let the live alias win
            live = self.module.state_dict()  # the module's names (DDP's carry "module.")
            backup = {k: live[k].clone() for k in self.ema}
            with torch.no_grad():
                for k, v in self.ema.items():
                    live[k].copy_(v)
        was = self.module.training
        self.module.eval()
        units = self._unshard_all() if self.fsdp else []
        try:
            with torch.no_grad(), self.autocast():
                out = self.evaluate(self.module)
        finally:  # the live weights come back even when the evaluation fails
            self.module.train(was)
            if units:
                self._reshard_all(units)
            if backup is not None:
                with torch.no_grad():
                    for k, v in backup.items():
                        live[k].copy_(v)
        self.log_row({"step": self.step, "split": "val", **out})
        if not self.fsdp:
            self._barrier()
        return out

    def _unshard_all(self) -> list:
        """FSDP: every unit's whole weights, kept through the evaluation (no resharding
        after each forward), so that evaluation code may call submodules and methods that
        are not the root's forward (the encoder alone, ``Trunk.step`` decoding) and run
        loops of any length without collectives. The root is initialised first: a unit run
        on its own before it would take itself for the root."""
        from torch.distributed.fsdp import FSDPModule

        self.module._get_fsdp_state()._lazy_init()
        self.module.set_reshard_after_forward(False)
        units = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.unshard()
        return units

    def _reshard_all(self, units: list) -> None:
        for m in units:
            m.reshard()
        self.module.set_reshard_after_forward(True)  # the units as fully_shard left them,
        self.module.set_reshard_after_forward(False, recurse=False)  # the root kept whole

    # -- the loop ----------------------------------------------------------------------------
    def _train_step(self) -> dict:
        cfg = self.cfg
        lr = self.lr()
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        logs: dict = {}
        outputs: list[dict] = []
        count, finite, name = 0, True, ""
        for micro in range(cfg.accumulate):
            gm = self.rank * cfg.accumulate + micro  # the micro-batch's index over all ranks
            seed_everything(step_seed(cfg.seed, self.step, gm))  # dropout etc.: per micro-batch
            name, batch = self.make_batch(self.step, gm)
            if self.fsdp:  # the root's own parameters, for calls that bypass its forward
                self.module.unshard()
            with self._no_sync(micro), self.autocast():
                out = self.loss_fn(name, batch)
            loss = out["loss"].float()
            if self.world > 1:  # all ranks skip together, or none does
                finite = dist.all_max([0.0 if torch.isfinite(loss) else 1.0])[0] == 0.0
            elif not torch.isfinite(loss):
                finite = False
            if not finite:
                break
            with self._no_sync(micro):
                (loss / cfg.accumulate).backward()
            outputs.append(out)
            count += int(out.get(self.units, 0))
            for k, v in out.items():
                if k not in ("loss", self.units) and _scalar(v):
                    logs[k] = logs.get(k, 0.0) + float(v) / cfg.accumulate
            logs["loss"] = logs.get("loss", 0.0) + float(loss.detach()) / cfg.accumulate
        gnorm = None
        if finite:
            params = [p for g in self.opt.param_groups for p in g["params"]]
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else
                                                   float("inf"))
            if hasattr(gnorm, "full_tensor"):  # FSDP: a DTensor replicated on every rank
                gnorm = gnorm.full_tensor()
            finite = bool(torch.isfinite(gnorm))
            if self.world > 1:
                keys = sorted(logs)  # the same objective, so the same keys, on every rank
                logs = dict(zip(keys, dist.all_mean([logs[k] for k in keys]), strict=True))
                count = int(round(dist.all_mean([float(count)])[0] * self.world))
        extra = None
        if finite:
            self.opt.step()
            self._update_ema()
            self.nonfinite["in_a_row"] = 0
            if self.after_step is not None:
                extra = self.after_step(self.step + 1, outputs)
        else:
            self.nonfinite["total"] += 1
            self.nonfinite["in_a_row"] += 1
        self.opt.zero_grad(set_to_none=True)
        row = {"step": self.step + 1, "split": "train", "objective": name, "lr": lr,
               self.units: count, **({k: round(v, 6) for k, v in logs.items()} if finite else
                                     {"skipped": "non-finite loss or gradient"})}
        if gnorm is not None and finite:
            row["grad_norm"] = round(float(gnorm), 4)
        return {**row, **(extra or {})}

    def _no_sync(self, micro: int):
        """DDP: no gradient all-reduce on the micro-batches before the last one."""
        if micro < self.cfg.accumulate - 1 and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        for k, v in self.module.state_dict().items():
            if k in self.ema:
                self.ema[k].mul_(self.cfg.ema).add_(v.detach().float(), alpha=1 - self.cfg.ema)

    def fit(self) -> dict:
        """Train to the schedule's end (or the time budget, or a signal); returns a summary."""
        if self.rank != 0:  # rank 0 holds the run directory's lock for all of them
            out = self._fit()
        else:
            with RunLock(self.run):
                out = self._fit()
        self._barrier()  # not on an error: the launcher stops the other ranks
        return out

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _broadcast(self, text: str) -> str:
        return dist.broadcast_str(text) if self.world > 1 else text

    def _agreed_stop(self) -> str:
        """Why every rank stops before this step ("" to go on): a stop signal on any rank,
        or the time budget by rank 0's clock; one collective per step with several ranks."""
        codes = {"SIGTERM": 1, "SIGUSR2": 2}
        sig = codes.get(self._stop.signal or "", 3 if self._stop.signal else 0)
        over = float(bool(self.budget_s and self.elapsed >= self.budget_s and self.rank == 0))
        if self.world > 1:
            sig, over = dist.all_max([float(sig), over])
        if sig:
            name = self._stop.signal or {1: "SIGTERM", 2: "SIGUSR2"}.get(int(sig), "a signal")
            return f"interrupted by {name}"
        return "time budget reached" if over else ""

    def _bar(self) -> tuple[tqdm, Callable[[], int]]:
        """The progress bar and where it stands: steps, or seconds of the budget for a time
        schedule without a step cap."""
        by_time = self.schedule["by"] == "time" and not self.schedule["total"]
        bar = tqdm(total=int(self.budget_s) if by_time else self.schedule["total"],
                   initial=int(self.elapsed) if by_time else self.step, desc=self.desc,
                   unit="s" if by_time else "step", disable=not self.progress or self.rank != 0,
                   dynamic_ncols=True)
        self.bar = bar
        return bar, (lambda: int(self.elapsed)) if by_time else (lambda: self.step)

    def _cap_bar(self, bar: tqdm, steps_per_s: float) -> None:
        """A step bar under a time budget ends where the budget will: its total becomes
        the step the budget reaches at the current rate, when that comes first, so the
        bar's ETA is the time left, not the steps'."""
        total = self.schedule["total"]
        if not (self.budget_s and total) or steps_per_s <= 0:
            return
        reach = self.step + int(steps_per_s * max(self.budget_s - self.elapsed, 0.0))
        capped = max(min(total, reach), self.step)
        if capped != bar.total:
            bar.total = capped
            bar.refresh()

    def _fit(self) -> dict:
        cfg = self.cfg
        resumed = self.restore()
        self.model.train()
        status, last_good = "done", self.restored
        total = self.schedule["total"]  # 0: none (a time schedule)
        per = f"{self.units}_per_s"
        kill_at = int(os.environ.get("OMNIMASK_TEST_SIGKILL_AT", "-1"))  # tests: a preemption
        # tests: slow steps in a fresh run, so a signal finds it mid-run; a resumed run goes
        # at full speed and ends before a requeued job's own time-limit signal
        nap = 0.0 if resumed else float(os.environ.get("OMNIMASK_TEST_STEP_SLEEP", "0"))
        bar = None
        self._stop = StopSignals()  # restored in `finally`, whatever raises after this
        try:
            self._open_tb()
            if not resumed and cfg.eval_first:
                self.run_eval()
            bar, at = self._bar()
            t_start = self.clock() - self.elapsed
            count_window, t_window = 0, self.clock()
            first_step = True
            while not total or self.step < total:
                stop = self._agreed_stop()
                if stop:
                    status = stop
                    break
                t_step = self.clock()
                row = self._train_step()
                if cfg.compile and first_step:
                    row["first_step_s"] = round(self.clock() - t_step, 2)
                    log.info("trainer.compile: the first step took %.1f s (compilation "
                             "included)", row["first_step_s"])
                first_step = False
                self.step += 1
                self.elapsed = self.clock() - t_start
                count_window += row[self.units]
                if "skipped" in row:
                    log.warning("step %d: non-finite loss (%s); skipped (%d in a row)", self.step,
                                row["objective"], self.nonfinite["in_a_row"])
                    if self.nonfinite["in_a_row"] >= cfg.max_nonfinite:
                        raise NonFiniteLoss(
                            f"{self.nonfinite['in_a_row']} non-finite losses in a row up to "
                            f"step {self.step} (objective {row['objective']}); stopped. Last "
                            f"good checkpoint: {last_good or 'none'} (left intact)")
                if self.step % cfg.log_every == 0 or self.step == total:
                    dt = self.clock() - t_window
                    row[per] = round(count_window / dt, 1) if dt > 0 else 0.0
                    self._cap_bar(bar, cfg.log_every / dt if dt > 0 else 0.0)
                    row["elapsed_s"] = round(self.elapsed, 1)
                    count_window, t_window = 0, self.clock()
                    bar.set_postfix(obj=row["objective"], loss=f"{row.get('loss', float('nan')):.3f}",
                                    **{per: f"{row[per]:.0f}"})
                self.log_row(row)
                bar.update(at() - bar.n)
                if nap:
                    time.sleep(nap)
                if kill_at == self.step:
                    os.kill(os.getpid(), signal.SIGKILL)  # tests: die like a preempted node
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != total:
                    self.run_eval()
                if self.step % cfg.checkpoint_every == 0 and self.step != total:
                    last_good = self.save()
            bar.close()  # before the final evaluation prints anything
            if not status.startswith("interrupted") and self.step not in self._val_logged:
                self.finishing = True
                self.run_eval()
            if (last_good is None or last_good.parent != self.ckpt_dir
                    or ckpt.step_of(last_good) != self.step):
                last_good = self.save()
            self._tb_hparams()
        finally:
            if bar is not None:
                bar.close()
            self._stop.restore()
            if self.tb is not None:
                self.tb.close()
        return {"status": status, "step": self.step, "elapsed_s": round(self.elapsed, 1),
                "checkpoint": str(last_good), "nonfinite_skipped": self.nonfinite["total"]}


def tb_add(run: str | Path, step: int, images: dict[str, str | Path] | None = None,
           texts: dict[str, str] | None = None, writer=None) -> None:
    """PNG files (figures) and text into a run's TensorBoard: through ``writer`` (a trainer's
    open one) or a new writer on ``run/tb`` (TensorBoard reads every event file there)."""
    import numpy as np
    from PIL import Image

    own = writer is None
    if own:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        writer = SummaryWriter(str(Path(run) / "tb"))
    try:
        for tag, path in (images or {}).items():
            with Image.open(path) as im:
                writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        for tag, text in (texts or {}).items():
            writer.add_text(tag, text, step)
    finally:
        if own:
            writer.close()


def _schedule_words(s: dict) -> str:
    if s.get("by") == "time":
        cap = f", at most {s['total']} steps" if s.get("total") else ""
        return f"{s['minutes']:g} minutes{cap}"
    return f"{s['total']} steps"
