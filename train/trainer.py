"""The training loop: mixed precision, accumulation, clipping, AdamW, cosine schedule, EMA,
checkpoints that survive SIGKILL, signals, non-finite losses, and logs.

The loop asks ``make_batch(step, micro)`` for its data and ``loss_fn(name, batch)`` for a
loss dict; it knows nothing about objectives. Every step re-seeds the global RNGs from
(seed, step), and ``make_batch`` draws from generators seeded the same way, so step ``s``
computes the same thing whether the run was resumed or not: a resumed run repeats the
losses of an unbroken one exactly (tested with SIGKILL).

Checkpoints (``train/checkpoint.py``): weights as safetensors; optimizer, schedule
(warmup and total steps: a resumed run keeps the schedule it started with), step, EMA,
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

from omnimask.config import check_fields
from omnimask.errors import ConfigError, OmnimaskError
from omnimask.runlock import RunLock
from omnimask.safeio import atomic_write_bytes

from . import checkpoint as ckpt

log = logging.getLogger("omnimask.trainer")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_minutes: float = 0.0  # > 0: stop (with a checkpoint) after this much training time
    batch_size: int = 32
    accumulate: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    clip: float = 5.0  # max gradient norm; 0 disables
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    ema: float = 0.0  # > 0: keep an exponential moving average of the weights
    checkpoint_every: int = 500
    keep: int = 2
    eval_every: int = 200  # 0: only at the start and the end
    log_every: int = 10  # progress bar and TensorBoard; metrics.jsonl gets every step
    max_nonfinite: int = 5
    resume: str = "auto"  # auto (newest complete checkpoint, if any) | never | PATH
    seed: int = 0
    threads: int = 0  # torch threads; 0 keeps torch's default
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tensorboard: bool = True

    def __post_init__(self) -> None:
        p = "trainer."  # where it sits in a pretraining config: errors name the full key
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"{p}precision must be auto|fp32|bf16, got {self.precision!r}")
        check_fields(self, ">=1", "max_steps", "batch_size", "accumulate", "checkpoint_every",
                     "keep", "log_every", "max_nonfinite", prefix=p)
        check_fields(self, ">=0", "max_minutes", "warmup_steps", "weight_decay", "clip",
                     "eval_every", "threads", prefix=p)
        check_fields(self, ">0", "lr", prefix=p)
        check_fields(self, "[0,1]", "min_lr_ratio", prefix=p)
        check_fields(self, "[0,1)", "ema", prefix=p)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{p}betas must be two numbers in [0, 1), got {list(self.betas)}")
        problem = device_problem(self.device)
        if problem:
            raise ValueError(f"{p}device {problem}")


class NonFiniteLoss(OmnimaskError):
    """Too many non-finite losses in a row."""


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """One 63-bit seed per (run seed, step, micro-batch): the whole data/RNG story."""
    return (seed * 1_000_003 + step * 4099 + micro) % (2**63 - 1)


def lr_at(cfg: TrainerConfig, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings and other vectors. Embedding tables are
    the weights of ``nn.Embedding`` modules and the parameters a module names in its
    ``no_weight_decay()`` (timm's convention; names relative to that module), e.g. a plain
    ``nn.Parameter`` indexed or scored against as a table."""
    decay, no_decay = [], []
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for m in model.modules():
        if callable(getattr(m, "no_weight_decay", None)):
            emb |= {id(m.get_parameter(name)) for name in m.no_weight_decay()}
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in emb else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


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
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


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


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared tensors (tied embeddings) stored once each: safetensors
    refuses aliases. ``load_weights`` restores them through the module's own ties."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(model.state_dict()) - set(weights(model))
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise OmnimaskError(f"{what}: weights do not fit the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")


class Trainer:
    def __init__(self, cfg: TrainerConfig, run_dir: str | os.PathLike, model: torch.nn.Module,
                 make_batch: Callable[[int, int], tuple[str, dict]],
                 loss_fn: Callable[[str, dict], dict],
                 evaluate: Callable[[torch.nn.Module], dict] | None = None,
                 progress: bool = True) -> None:
        self.cfg, self.run = cfg, Path(run_dir)
        self.run.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.make_batch, self.loss_fn, self.evaluate = make_batch, loss_fn, evaluate
        self.progress = progress
        self.opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                     betas=tuple(cfg.betas))
        self.ema = ({k: v.detach().clone().float() for k, v in weights(model).items()
                     if v.is_floating_point()} if cfg.ema > 0 else None)
        self.step = 0
        self.schedule = {"warmup": cfg.warmup_steps, "total": cfg.max_steps}
        self.nonfinite = {"total": 0, "in_a_row": 0}
        self.elapsed = 0.0
        self._signal: str | None = None
        self._val_logged: set[int] = set()  # steps whose validation row metrics.jsonl holds
        self.restored: Path | None = None  # the checkpoint this run resumed from
        self.tb = None

    # -- precision ---------------------------------------------------------------------------
    def autocast(self):
        p = self.cfg.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" else "fp32"
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.run / "checkpoints"

    def state(self) -> dict:
        return {"step": self.step, "optimizer": self.opt.state_dict(),
                "schedule": dict(self.schedule), "nonfinite": dict(self.nonfinite),
                "elapsed": self.elapsed, "rng": rng_state(), "ema": self.ema,
                "data": {"seed": self.cfg.seed, "step": self.step},
                "config": asdict(self.cfg)}

    def save(self) -> Path:
        path = ckpt.save(self.ckpt_dir, self.step, weights(self.model), self.state(),
                         keep=self.cfg.keep)
        log.info("checkpoint %s", path)
        return path

    def restore(self) -> bool:
        r = self.cfg.resume
        if r == "never":
            return False
        if r == "auto":
            found = ckpt.load_newest(self.ckpt_dir)
            if found is None:
                return False
            path, sd, st = found
        else:
            path = Path(r)
            if not (path / ckpt.MARKER).is_file():
                raise OmnimaskError(f"trainer.resume: no complete checkpoint at {path}")
            sd, st = ckpt.load(path)
        load_weights(self.model, sd, str(path))
        self.opt.load_state_dict(st["optimizer"])
        self.step, self.schedule = st["step"], st["schedule"]
        self.nonfinite, self.elapsed = st["nonfinite"], st["elapsed"]
        self.ema = st["ema"]
        if st["data"]["seed"] != self.cfg.seed:
            raise OmnimaskError(f"{path} was trained with seed {st['data']['seed']}, this run "
                                f"has trainer.seed={self.cfg.seed}")
        if self.cfg.max_steps != self.schedule["total"]:
            log.warning("resuming with the schedule of the checkpoint (%d steps), not "
                        "trainer.max_steps=%d", self.schedule["total"], self.cfg.max_steps)
        set_rng_state(st["rng"])
        self.restored = path
        self._truncate_metrics(self.step)
        log.warning("resumed from %s at step %d", path, self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Rows a killed run logged after its last checkpoint are replayed: drop them, and a
        line torn by the kill. Remembers which steps already have a validation row."""
        p = self.run / "metrics.jsonl"
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
        atomic_write_bytes(p, "".join(ln + "\n" for ln in keep).encode())

    # -- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._signal = signal.Signals(signum).name

    def _install(self) -> dict:
        old = {}
        for s in (signal.SIGUSR2, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: cannot catch here
                old[s] = signal.signal(s, self._on_signal)
        return old

    # -- logging -----------------------------------------------------------------------------
    def log_row(self, row: dict) -> None:
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if row.get("split") == "val":
            self._val_logged.add(row["step"])
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row["step"])
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)):
                            self.tb.add_scalar(f"{row.get('split')}/{k}/{kk}", vv, row["step"])

    def _open_tb(self) -> None:
        if not self.cfg.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run / "tb"))
        except ImportError:
            log.warning("tensorboard is not installed: no tb/ logs")

    def run_eval(self) -> dict:
        if self.evaluate is None:
            return {}
        backup = None
        if self.ema is not None:
            # copied into the tensors themselves: a tied alias (the vocabulary head's
            # embedding) then shows the EMA too; load_state_dict let the live alias win
            live = self.model.state_dict()
            backup = {k: live[k].clone() for k in self.ema}
            with torch.no_grad():
                for k, v in self.ema.items():
                    live[k].copy_(v)
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                out = self.evaluate(self.model)
        finally:  # the live weights come back even when the evaluation fails
            self.model.train(was)
            if backup is not None:
                with torch.no_grad():
                    for k, v in backup.items():
                        live[k].copy_(v)
        self.log_row({"step": self.step, "split": "val", **out})
        return out

    # -- the loop ----------------------------------------------------------------------------
    def _train_step(self) -> dict:
        cfg = self.cfg
        seed_everything(step_seed(cfg.seed, self.step))
        lr = lr_at(cfg, self.step, self.schedule["total"], self.schedule["warmup"])
        for g in self.opt.param_groups:
            g["lr"] = lr
        logs: dict = {}
        tokens, finite, name = 0, True, ""
        for micro in range(cfg.accumulate):
            name, batch = self.make_batch(self.step, micro)
            with self.autocast():
                out = self.loss_fn(name, batch)
            loss = out["loss"].float()
            if not torch.isfinite(loss):
                finite = False
                break
            (loss / cfg.accumulate).backward()
            tokens += int(out.get("tokens", 0))
            for k, v in out.items():
                if k not in ("loss", "tokens"):
                    logs[k] = logs.get(k, 0.0) + float(v) / cfg.accumulate
            logs["loss"] = logs.get("loss", 0.0) + float(loss.detach()) / cfg.accumulate
        gnorm = None
        if finite:
            params = [p for g in self.opt.param_groups for p in g["params"]]
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else
                                                   float("inf"))
            finite = bool(torch.isfinite(gnorm))
        if finite:
            self.opt.step()
            self._update_ema()
            self.nonfinite["in_a_row"] = 0
        else:
            self.nonfinite["total"] += 1
            self.nonfinite["in_a_row"] += 1
        self.opt.zero_grad(set_to_none=True)
        row = {"step": self.step + 1, "split": "train", "objective": name, "lr": lr,
               "tokens": tokens, **({k: round(v, 6) for k, v in logs.items()} if finite else
                                    {"skipped": "non-finite loss or gradient"})}
        if gnorm is not None and finite:
            row["grad_norm"] = round(float(gnorm), 4)
        return row

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        for k, v in self.model.state_dict().items():
            if k in self.ema:
                self.ema[k].mul_(self.cfg.ema).add_(v.detach().float(), alpha=1 - self.cfg.ema)

    def fit(self) -> dict:
        """Train to ``max_steps`` (or the time budget, or a signal); returns a summary."""
        with RunLock(self.run):
            return self._fit()

    def _fit(self) -> dict:
        cfg = self.cfg
        resumed = self.restore()
        self._open_tb()
        old = self._install()
        self.model.train()
        status, last_good = "done", self.restored
        if not resumed:
            self.run_eval()
        total = self.schedule["total"]
        bar = tqdm(total=total, initial=self.step, desc="pretrain", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        t_start, tok_window, t_window = time.perf_counter() - self.elapsed, 0, time.perf_counter()
        kill_at = int(os.environ.get("OMNIMASK_TEST_SIGKILL_AT", "-1"))  # tests: a preemption
        try:
            while self.step < total:
                if self._signal:
                    status = f"interrupted by {self._signal}"
                    break
                if cfg.max_minutes and self.elapsed >= cfg.max_minutes * 60:
                    status = "time budget reached"
                    break
                row = self._train_step()
                self.step += 1
                self.elapsed = time.perf_counter() - t_start
                tok_window += row["tokens"]
                if "skipped" in row:
                    log.warning("step %d: non-finite loss (%s); skipped (%d in a row)", self.step,
                                row["objective"], self.nonfinite["in_a_row"])
                    if self.nonfinite["in_a_row"] >= cfg.max_nonfinite:
                        raise NonFiniteLoss(
                            f"{self.nonfinite['in_a_row']} non-finite losses in a row up to "
                            f"step {self.step} (objective {row['objective']}); stopped. Last "
                            f"good checkpoint: {last_good or 'none'} (left intact)")
                if self.step % cfg.log_every == 0 or self.step == total:
                    dt = time.perf_counter() - t_window
                    row["tokens_per_s"] = round(tok_window / dt, 1) if dt > 0 else 0.0
                    tok_window, t_window = 0, time.perf_counter()
                    bar.set_postfix(obj=row["objective"], loss=f"{row.get('loss', float('nan')):.3f}",
                                    tok_s=f"{row['tokens_per_s']:.0f}")
                self.log_row(row)
                bar.update(1)
                if kill_at == self.step:
                    os.kill(os.getpid(), signal.SIGKILL)  # tests: die like a preempted node
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < total:
                    self.run_eval()
                if self.step % cfg.checkpoint_every == 0 and self.step < total:
                    last_good = self.save()
            bar.close()  # before the final evaluation prints anything
            if not status.startswith("interrupted") and self.step not in self._val_logged:
                self.run_eval()
            if (last_good is None or last_good.parent != self.ckpt_dir
                    or ckpt.step_of(last_good) != self.step):
                last_good = self.save()
        finally:
            bar.close()
            for s, h in old.items():
                signal.signal(s, h)
            if self.tb is not None:
                self.tb.close()
        return {"status": status, "step": self.step, "elapsed_s": round(self.elapsed, 1),
                "checkpoint": str(last_good), "nonfinite_skipped": self.nonfinite["total"]}
