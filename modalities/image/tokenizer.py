"""``omnimask tokenizer train|eval image``: train the VQ-VAE on shards, with checkpoints and
resume; encode images to code ids and decode them back.

Saved as a directory: ``image_tokenizer.json`` (config, training statistics) and
``vq.safetensors``; training state in ``checkpoints/step_XXXXXXXX/`` (resumable, a
``COMPLETE`` marker written last) and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from omnimask.config import DataConfig, check_fields, load_config, save_config
from omnimask.errors import Interrupted, OmnimaskError
from omnimask.registry import TOKENIZERS
from omnimask.stopsignals import StopSignals

from ..artifacts import code_stats, load_artifact, save_artifact
from .vq import VQVAE, VQConfig

META = "image_tokenizer.json"
WEIGHTS = "vq.safetensors"


@dataclass
class ImageTokenizerConfig:
    vq: VQConfig = field(default_factory=VQConfig)
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    max_minutes: float = 15.0  # training budget; the cosine schedule follows elapsed time
    max_steps: int = 0  # > 0: stop (and schedule) by steps instead of time
    seed: int = 0
    checkpoint_every: int = 300  # steps
    log_every: int = 50
    threads: int = 0  # torch threads; 0 keeps torch's default (all cores)
    max_images: int = 0  # 0: every training image

    def __post_init__(self) -> None:
        check_fields(self, ">=1", "batch_size", "checkpoint_every", "log_every")
        check_fields(self, ">0", "lr")
        check_fields(self, ">=0", "warmup_steps", "max_minutes", "max_steps", "threads",
                     "max_images")
        if not (self.max_steps > 0 or self.max_minutes > 0):  # else nothing is trained
            raise ValueError(f"max_steps or max_minutes must be > 0 (a training budget), got "
                             f"max_steps={self.max_steps}, max_minutes={self.max_minutes}")


class ImageTokenizer:
    def __init__(self, model: VQVAE, stats: dict | None = None) -> None:
        self.model = model.eval()
        self.stats = stats or {}

    @property
    def size(self) -> int:
        return self.model.cfg.codebook_size

    def prepare(self, images) -> torch.Tensor:
        """uint8 [B, 3, S, S] from a tensor batch, or a list of PIL images / HxW(xC) arrays.

        Other sizes are resized, other modes (L, RGBA, P, ...) converted to RGB; a tensor
        batch of the wrong layout is rejected with the shape it has.
        """
        s = self.model.cfg.image_size
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise OmnimaskError(f"expected a uint8 batch [B, 3, H, W], got shape "
                                    f"{tuple(images.shape)}")
            if images.is_floating_point():
                raise OmnimaskError("expected uint8 images (0-255), got a float tensor; "
                                    "use (x * 255).round().to(torch.uint8)")
            if tuple(images.shape[2:]) != (s, s):
                images = F.interpolate(images.float(), size=(s, s), mode="bilinear",
                                       antialias=True).round().clamp(0, 255).to(torch.uint8)
            return images
        out = []
        for i, im in enumerate(images):
            if isinstance(im, np.ndarray):
                if im.dtype != np.uint8 or im.ndim not in (2, 3):
                    raise OmnimaskError(f"image {i}: expected a uint8 HxW or HxWxC array, got "
                                        f"{im.dtype} {im.shape}")
                im = Image.fromarray(im)
            if not isinstance(im, Image.Image):
                raise OmnimaskError(f"image {i}: unsupported type {type(im).__name__}")
            im = im.convert("RGB")
            if im.size != (s, s):
                im = im.resize((s, s), Image.BILINEAR)
            out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
        if not out:
            raise OmnimaskError("no images given")
        return torch.stack(out)

    def encode(self, images) -> torch.Tensor:
        return self.model.encode(self.prepare(images))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.decode(ids)

    def save(self, directory: str | os.PathLike) -> Path:
        return save_artifact(directory, META, {"vq": asdict(self.model.cfg), "stats": self.stats,
                                               "size": self.size},
                             WEIGHTS, self.model.state_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ImageTokenizer:
        info, tensors = load_artifact(directory, META, WEIGHTS, "an image tokenizer")
        model = VQVAE(VQConfig(**info["vq"]))
        model.load_state_dict(tensors)
        return cls(model, info.get("stats"))


def load_images(data, size: int, limit: int = 0) -> torch.Tensor:
    """Every image of the shards as one uint8 tensor [N, 3, size, size], in shard order."""
    from omnimask.train.data.pipeline import ShardLoader

    cfg = DataConfig(shards=list(data), processors=["image"], batch_size=256, shuffle_buffer=0,
                     shuffle_shards=False, image_size=size)
    out, n = [], 0
    for b in ShardLoader(cfg, rank=0, world_size=1):
        out.append(b["image"])
        n += len(b["image"])
        if limit and n >= limit:
            break
    if not out:
        raise OmnimaskError("no images found in the shards")
    x = torch.cat(out)
    return x[:limit] if limit else x


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 batches."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


def _lr(cfg: ImageTokenizerConfig, step: int, frac: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train_vq(data, out, cfg: ImageTokenizerConfig, progress: bool = True) -> dict:
    """Train (or resume) a VQ-VAE in ``out``, holding the directory's lock meanwhile."""
    from omnimask.runlock import RunLock

    with RunLock(out):
        return _train_vq(data, out, cfg, progress)


def _train_vq(data, out, cfg: ImageTokenizerConfig, progress: bool) -> dict:
    from omnimask.train import checkpoint

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run)
    images = load_images(data, cfg.vq.image_size, cfg.max_images)
    torch.manual_seed(cfg.seed)
    model = VQVAE(cfg.vq)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = 0, 0.0
    found = checkpoint.load_newest(run / "checkpoints")
    if found is not None:
        last, weights, state = found
        model.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dead-code restarts draw from it
        step, elapsed = state["step"], state["elapsed"]
        if state["budget"] != [cfg.max_minutes, cfg.max_steps]:
            raise OmnimaskError(f"{last}: the checkpoint's budget (max_minutes, max_steps) = "
                                f"{state['budget']} differs from the config's")
    else:
        with torch.no_grad():  # k-means initialisation of the codebook on real latents
            idx = torch.randperm(len(images), generator=gen)[:512]
            z = F.normalize(model.latents(model.to_input(images[idx])), dim=-1)
            model.quantizer.init_kmeans(z, cfg.seed)
    model = model.to(memory_format=torch.channels_last)
    budget_s = cfg.max_minutes * 60

    def done() -> bool:
        return step >= cfg.max_steps if cfg.max_steps else elapsed >= budget_s

    def frac() -> float:
        return step / cfg.max_steps if cfg.max_steps else elapsed / budget_s

    def save_ckpt() -> None:
        checkpoint.save(run / "checkpoints", step, model.state_dict(),
                        {"optimizer": opt.state_dict(), "generator": gen.get_state(),
                         "torch_rng": torch.get_rng_state(), "step": step,
                         "elapsed": elapsed, "budget": [cfg.max_minutes, cfg.max_steps]})

    bar = tqdm(total=cfg.max_steps or int(budget_s), initial=step if cfg.max_steps else int(elapsed),
               unit="step" if cfg.max_steps else "s", desc="vq", disable=not progress)
    log = open(run / "metrics.jsonl", "a")  # noqa: SIM115 - closed below
    model.train()
    window = []
    used = torch.zeros(cfg.vq.codebook_size, dtype=torch.bool)
    stop = StopSignals()  # SIGTERM/SIGUSR2: stop after this step, save a checkpoint
    try:
        while not done() and not stop.signal:
            t0 = time.perf_counter()
            idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
            x = model.to_input(images[idx])
            flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x = x.contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step, frac())
            recon, ids, losses = model(x)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            window.append((losses["recon"].item(), dt))
            used |= torch.bincount(ids.flatten(), minlength=cfg.vq.codebook_size) > 0
            bar.update(1 if cfg.max_steps else int(elapsed) - bar.n)
            if step % cfg.log_every == 0:
                mse = sum(w[0] for w in window) / len(window)
                rec = {"step": step, "split": "train", "elapsed_s": round(elapsed, 1),
                       "lr": opt.param_groups[0]["lr"], "recon_mse": mse,
                       "psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12)),  # inputs span [-1, 1]
                       "images_per_s": cfg.batch_size * len(window) / sum(w[1] for w in window),
                       "usage": float(used.float().mean())}  # codes used in this window
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(psnr=f"{rec['psnr_db']:.1f}", usage=f"{rec['usage']:.2f}")
                window = []
                used.zero_()
            if step % cfg.checkpoint_every == 0:
                save_ckpt()
    finally:
        stop.restore()
        bar.close()
        log.close()
    save_ckpt()
    if stop.signal:  # resumable, not finished: no tokenizer is written
        raise Interrupted(f"image tokenizer training interrupted by {stop.signal} at step "
                          f"{step}; checkpoint saved in {run / 'checkpoints'}")
    stats = {"steps": step, "train_seconds": round(elapsed, 1), "images": len(images),
             "params": sum(p.numel() for p in model.parameters())}
    tok = ImageTokenizer(model.to(memory_format=torch.contiguous_format).eval(), stats)
    tok.save(run)
    return stats


def recon_grid(images: torch.Tensor, recon: torch.Tensor, path: Path, n: int = 16) -> Path:
    """Rows of originals over their reconstructions."""
    n = min(n, len(images))
    top = torch.cat(list(images[:n]), dim=2)
    bottom = torch.cat(list(recon[:n]), dim=2)
    grid = torch.cat([top, bottom], dim=1).permute(1, 2, 0).numpy()
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    return path


@TOKENIZERS.register("image")
class ImageTokenizerOps:
    config = ImageTokenizerConfig

    @staticmethod
    def train(data, out, overrides=(), progress: bool = True) -> dict:
        cfg = load_config(ImageTokenizerConfig, None, overrides)
        stats = train_vq(data, out, cfg, progress)
        return {"kind": "image", "out": str(out), "size": cfg.vq.codebook_size, **stats}

    @staticmethod
    def evaluate(tokenizer, data, progress: bool = True, grid: str | None = None) -> dict:
        tok = ImageTokenizer.load(tokenizer)
        images = load_images(data, tok.model.cfg.image_size)
        ids, recon, t_enc = [], [], 0.0
        for i in range(0, len(images), 128):
            t0 = time.perf_counter()
            c = tok.model.encode(images[i:i + 128])
            t_enc += time.perf_counter() - t0
            ids.append(c)
            recon.append(tok.model.decode(c))
        ids, recon = torch.cat(ids), torch.cat(recon)
        p = psnr(images, recon)
        mse = (images.float() - recon.float()).pow(2).mean()
        path = Path(grid) if grid else Path(tokenizer) / "eval_recon.png"
        recon_grid(images, recon, path)
        return {"kind": "image", "size": tok.size, "images": len(images),
                "psnr_db": round(float(p.mean()), 3),
                "psnr_db_dataset": round(float(10 * torch.log10(255.0 ** 2 / mse)), 3),
                **code_stats(ids, tok.size), "tokens_per_image": ids.shape[1],
                "encode_images_per_s": round(len(images) / max(t_enc, 1e-9), 1),
                "recon_grid": str(path)}
