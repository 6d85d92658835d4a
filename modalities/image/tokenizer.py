"""``omnimask tokenizer train|eval image``: train the VQ-VAE on shards through the one
training loop (``train/trainer.py``: its schedule, checkpoints, resume and logs); encode
images to code ids and decode them back.

Saved as a directory: ``image_tokenizer.json`` (config, training statistics) and
``vq.safetensors``; training state in ``checkpoints/step_XXXXXXXX/`` (the trainer's:
resumable, a ``COMPLETE`` marker written last) and ``metrics.jsonl``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from omnimask.config import (
    PRECISIONS,
    DataConfig,
    check_choice,
    check_fields,
    load_config,
    save_config,
)
from omnimask.errors import Interrupted, OmnimaskError
from omnimask.registry import TOKENIZERS

from ..artifacts import code_stats, load_artifact, save_artifact
from .processor import fit_image
from .vq import VQVAE, VQConfig

META = "image_tokenizer.json"
WEIGHTS = "vq.safetensors"


@dataclass
class ImageTokenizerConfig:
    vq: VQConfig = field(default_factory=VQConfig)
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    # reconstruction loss: pixels of saturated objects weigh 1 + object_weight (a 3x3
    # neighbourhood of them, so their outlines count: the shapes, not the muted background
    # gradient, carry the information); edge_weight adds an L1 loss on image gradients
    object_weight: float = 4.0
    edge_weight: float = 0.5
    # the budget: steps (the default tokenizer's ~7 quiet minutes on 2 cores), and with them
    # max_minutes only caps a stuck run (0: no cap); max_steps=0 schedules by max_minutes
    max_steps: int = 3000
    max_minutes: float = 0.0
    seed: int = 0
    checkpoint_every: int = 300  # steps
    log_every: int = 50
    threads: int = 0  # torch threads; 0 keeps torch's default (all cores)
    max_images: int = 0  # 0: every training image
    parallel: str = "none"  # none | ddp (several processes: torchrun, omnimask submit)
    tensorboard: bool = True  # OUT/tb: the losses, usage, and reconstructions at the end
    # the encoder's and decoder's convolutions in training (the quantiser stays fp32; the
    # tokenizer encodes and decodes in fp32): fp32 | bf16 | auto (bf16 where the processor
    # computes it natively, AVX512-BF16/AMX or CUDA; fp32 elsewhere, where it is slower).
    # fp32 by default: the same tokens on every machine
    precision: str = "fp32"
    # train on random crops of this many pixels, on the code grid (0: whole images): the
    # nets are convolutional, so a step costs about the crop's share of the pixels
    crop: int = 32

    def __post_init__(self) -> None:
        check_fields(self, ">=1", "batch_size", "checkpoint_every", "log_every")
        check_fields(self, ">0", "lr")
        check_fields(self, ">=0", "warmup_steps", "max_minutes", "max_steps", "threads",
                     "max_images", "object_weight", "edge_weight")
        check_choice(self, "parallel", ("none", "ddp"))
        check_choice(self, "precision", PRECISIONS)
        p, size = self.vq.patch, self.vq.image_size
        if self.crop and (self.crop < 0 or self.crop % p or self.crop > size):
            raise ValueError(f"crop must be 0 or a multiple of {p} (vq.downsample's patch) "
                             f"up to vq.image_size {size}, got {self.crop}")
        if not (self.max_steps > 0 or self.max_minutes > 0):  # else nothing is trained
            raise ValueError(f"max_steps or max_minutes must be > 0 (a training budget), got "
                             f"max_steps={self.max_steps}, max_minutes={self.max_minutes}")


class ImageTokenizer:
    def __init__(self, model: VQVAE, stats: dict | None = None) -> None:
        self.model = model.eval()
        self.stats = stats or {}

    @property
    def size(self) -> int:
        """Vocabulary rows of the image codes: each rq level its own ``codebook_size``."""
        return self.model.cfg.size * self.model.cfg.depth

    def prepare(self, images, fit: str = "crop") -> torch.Tensor:
        """uint8 [B, 3, S, S] from a tensor batch, or a list of PIL images / HxW(xC) arrays.

        Other sizes are fitted to S by ``fit`` (centre ``crop``, ``pad`` or ``stretch``, as
        ``data.image_fit``), other modes (L, RGBA, P, ...) converted to RGB; a tensor batch
        of the wrong layout is rejected with the shape it has.
        """
        s = self.model.cfg.image_size
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise OmnimaskError(f"expected a uint8 batch [B, 3, H, W], got shape "
                                    f"{tuple(images.shape)}")
            if images.is_floating_point():
                raise OmnimaskError("expected uint8 images (0-255), got a float tensor; "
                                    "use (x * 255).round().to(torch.uint8)")
            return torch.stack([fit_image(x, s, fit) for x in images])
        out = []
        for i, im in enumerate(images):
            if isinstance(im, np.ndarray):
                if im.dtype != np.uint8 or im.ndim not in (2, 3):
                    raise OmnimaskError(f"image {i}: expected a uint8 HxW or HxWxC array, got "
                                        f"{im.dtype} {im.shape}")
                im = Image.fromarray(im)
            if not isinstance(im, Image.Image):
                raise OmnimaskError(f"image {i}: unsupported type {type(im).__name__}")
            x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
            out.append(fit_image(x, s, fit))
        if not out:
            raise OmnimaskError("no images given")
        return torch.stack(out)

    def encode(self, images) -> torch.Tensor:
        return self.model.encode(self.prepare(images))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.decode(ids)

    def save(self, directory: str | os.PathLike) -> Path:
        cfg = self.model.cfg  # written with the sizes in use (fsq's follow from its levels)
        vq = asdict(cfg) | {"code_dim": cfg.dim, "codebook_size": cfg.size}
        return save_artifact(directory, META, {"vq": vq, "stats": self.stats, "size": self.size},
                             WEIGHTS, self.model.state_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ImageTokenizer:
        info, tensors = load_artifact(directory, META, WEIGHTS, "an image tokenizer")
        # written before these fields existed: 8 px patches of a VQ codebook, whatever the
        # defaults are now
        model = VQVAE(VQConfig(**{"downsample": 3, "quantizer": "vq", **info["vq"]}))
        model.load_state_dict(tensors)
        return cls(model, info.get("stats"))


def load_images(data, size: int, limit: int = 0, captions: bool = False):
    """Every image of the shards as one uint8 tensor [N, 3, size, size], in shard order;
    with ``captions``, also each image's first caption (a list of N strings)."""
    from omnimask.train.data.pipeline import ShardLoader

    cfg = DataConfig(shards=list(data), processors=["image"] + ["text"] * captions,
                     batch_size=256, shuffle_buffer=0, shuffle_shards=False, image_size=size)
    out, caps, n = [], [], 0
    for b in ShardLoader(cfg, rank=0, world_size=1):
        out.append(b["image"])
        caps += [c[0] for c in b.get("captions", [])]
        n += len(b["image"])
        if limit and n >= limit:
            break
    if not out:
        raise OmnimaskError("no images found in the shards")
    x = torch.cat(out)
    x = x[:limit] if limit else x
    return (x, caps[:len(x)]) if captions else x


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 batches."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


def region_psnr(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """PSNR in dB of uint8 batches over all their object pixels (``object_pixels`` of
    ``a``: saturated pixels and their outline) and over the rest (the background)."""
    err = (a.float() - b.float()).pow(2).mean(1)  # [B, H, W]
    obj = object_pixels(a.float() / 127.5 - 1)[:, 0]
    out = {}
    for name, m in (("objects", obj), ("background", ~obj)):
        mse = float(err[m].mean()) if m.any() else float("nan")
        out[f"psnr_{name}_db"] = round(10 * math.log10(255.0 ** 2 / max(mse, 1e-10)), 3)
    out["object_pixel_share"] = round(float(obj.float().mean()), 4)
    return out


OBJECT_CHROMA = 80 / 127.5  # max - min channel of a saturated pixel, on the [-1, 1] scale


def object_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [B, 3, H, W] -> bool [B, 1, H, W]: saturated pixels and their 3x3
    neighbourhood (muted backgrounds stay below the threshold)."""
    sat = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) > OBJECT_CHROMA
    return F.max_pool2d(sat.float(), 3, 1, 1) > 0


def recon_loss(recon: torch.Tensor, x: torch.Tensor, object_weight: float = 0.0,
               edge_weight: float = 0.0) -> torch.Tensor:
    """Mean squared error, object pixels weighted by ``1 + object_weight`` (weights
    normalised to mean 1 per batch), plus ``edge_weight`` times the L1 error of horizontal
    and vertical differences."""
    err = (recon - x).pow(2)
    if object_weight:
        w = 1 + object_weight * object_pixels(x).float()
        loss = (err * w).mean() / w.mean()
    else:
        loss = err.mean()
    if edge_weight:
        dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
        dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
        loss = loss + edge_weight * ((dx(recon) - dx(x)).abs().mean()
                                     + (dy(recon) - dy(x)).abs().mean())
    return loss


def grid_crops(x: torch.Tensor, size: int, patch: int, gen: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop of each image in ``x`` [B, C, H, W], its corner
    on the ``patch`` grid (the codes see the same pixel phase as on whole images)."""
    b, _, h, w = x.shape
    ys = torch.randint((h - size) // patch + 1, (b,), generator=gen) * patch
    xs = torch.randint((w - size) // patch + 1, (b,), generator=gen) * patch
    return torch.stack([im[:, y:y + size, c:c + size] for im, y, c in
                        zip(x, ys.tolist(), xs.tolist())])


def train_vq(data, out, cfg: ImageTokenizerConfig, progress: bool = True) -> dict:
    """Train (or resume) a VQ-VAE in ``out``, holding the directory's lock meanwhile (rank
    0 holds it for all ranks when several train it: ``parallel=ddp`` under torchrun)."""
    from omnimask.train import distributed as dist

    with dist.rank0_first(cfg.parallel, "cpu"):
        lock = dist.run_lock(out)
    try:
        return _train_vq(data, out, cfg, progress)
    finally:
        lock.release()


def trainer_config(cfg: ImageTokenizerConfig):
    """The tokenizer's budget and optimiser as the one training loop's settings: Adam
    (0.9, 0.99), warmup then cosine to 2% by steps (``max_steps``) or else by time, clip 1,
    fp32 on the CPU."""
    from omnimask.train.trainer import TrainerConfig

    return TrainerConfig(
        max_steps=cfg.max_steps, max_minutes=cfg.max_minutes,
        schedule_by="steps" if cfg.max_steps else "time", batch_size=cfg.batch_size,
        lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr_ratio=0.02, optimizer="adam",
        betas=[0.9, 0.99], weight_decay=0.0, clip=1.0, precision="fp32", device="cpu",
        checkpoint_every=cfg.checkpoint_every, eval_every=0, log_every=cfg.log_every,
        seed=cfg.seed, threads=cfg.threads, tensorboard=cfg.tensorboard,
        parallel=cfg.parallel)


def conv_dtype(precision: str, device: str | torch.device = "cpu",
               setting: str = "precision") -> torch.dtype | None:
    """A convolutional net's autocast dtype in training on ``device`` for ``precision``
    (fp32 | bf16 | auto: bf16 where ``device`` computes it natively); None: fp32. The VQ's
    and the pixel encoder warm-up's setting (named ``setting`` in the emulation warning)."""
    from omnimask.train.trainer import native_bf16, warn_emulated_bf16

    if precision == "bf16":
        warn_emulated_bf16(setting, device)
    bf16 = precision == "bf16" or (precision == "auto" and native_bf16(device))
    return torch.bfloat16 if bf16 else None


def _train_vq(data, out, cfg: ImageTokenizerConfig, progress: bool) -> dict:
    from omnimask.train import checkpoint
    from omnimask.train import distributed as dist
    from omnimask.train.trainer import Trainer, step_seed

    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    main = dist.is_main()
    if main:
        save_config(cfg, run)
    images = load_images(data, cfg.vq.image_size, cfg.max_images)
    torch.manual_seed(cfg.seed)
    model = VQVAE(cfg.vq)
    if not checkpoint.complete(run / "checkpoints"):  # else the trainer resumes the weights
        with torch.no_grad():  # k-means initialisation of the codebook on real latents
            gen = torch.Generator().manual_seed(cfg.seed)
            idx = torch.randperm(len(images), generator=gen)[:512]
            model.quantizer.init_kmeans(model.latents(model.to_input(images[idx])), cfg.seed)
    model = model.to(memory_format=torch.channels_last)
    model.conv_dtype = conv_dtype(cfg.precision)
    bf16 = model.conv_dtype is not None

    def make_batch(step: int, micro: int) -> tuple[str, dict]:
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, micro))
        x = model.to_input(images[torch.randint(len(images), (cfg.batch_size,), generator=gen)])
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if cfg.crop and cfg.crop < cfg.vq.image_size:
            x = grid_crops(x, cfg.crop, cfg.vq.patch, gen)
        return "vq", {"x": x.contiguous(memory_format=torch.channels_last)}

    fwd = [model]  # the trainer's forward entry (DDP) once it exists

    def loss_fn(name: str, batch: dict) -> dict:
        recon, ids, losses = fwd[0](batch["x"])
        mse = losses["recon"].detach()
        if cfg.object_weight or cfg.edge_weight:  # replaces the plain MSE
            losses["recon"] = recon_loss(recon, batch["x"], cfg.object_weight, cfg.edge_weight)
        return {"loss": sum(losses.values()), "recon_mse": mse,
                "psnr_db": 10 * torch.log10(4.0 / mse.clamp_min(1e-12)),  # inputs span [-1, 1]
                **{k: v.detach() for k, v in losses.items() if k != "recon"},
                "images": len(batch["x"]), "ids": ids}

    used = torch.zeros(cfg.vq.size, dtype=torch.bool)  # codes used since the last row
    restarts = [0]  # dead codes restarted since the last row

    def after_step(step: int, outputs: list[dict]) -> dict | None:
        for o in outputs:
            used.index_fill_(0, o["ids"].flatten(), True)
        restarts[0] += model.quantizer.restarts
        if step % cfg.log_every:
            return None
        row = {"usage": round(float(used.float().mean()), 4), "restarts": restarts[0]}
        used.zero_()
        restarts[0] = 0
        return row

    trainer = Trainer(trainer_config(cfg), run, model, make_batch, loss_fn, progress=progress,
                      after_step=after_step, desc="vq", units="images")
    fwd[0] = trainer.forward_model
    summary = trainer.fit()
    if summary["status"].startswith("interrupted"):  # resumable, not finished: no tokenizer
        raise Interrupted(f"image tokenizer training {summary['status']} at step "
                          f"{summary['step']}; checkpoint saved in {trainer.ckpt_dir}")
    model.conv_dtype = None  # the tokenizer runs in fp32
    stats = {"steps": summary["step"], "train_seconds": summary["elapsed_s"],
             "images": len(images), "params": sum(p.numel() for p in model.parameters()),
             "precision": "bf16" if bf16 else "fp32"}
    tok = ImageTokenizer(model.to(memory_format=torch.contiguous_format).eval(), stats)
    if main:
        tok.save(run)
        if cfg.tensorboard:  # training images and their reconstructions, in TensorBoard
            from omnimask.train.trainer import tb_add

            with torch.no_grad():
                recon = tok.decode(tok.model.encode(images[:8]))
            png = recon_grid(images[:8], recon, run / "tb" / "train_recon.png",
                             title=f"VQ tokenizer after {summary['step']} steps: training images")
            tb_add(run, summary["step"], {"vq/reconstructions": png})
    return stats


def recon_grid(images: torch.Tensor, recon: torch.Tensor, path: Path, n: int = 12,
               title: str = "VQ tokenizer on val images") -> Path:
    """Originals over their reconstructions, labelled (~1000 px wide)."""
    from omnimask.train.figures import image_table

    n = min(n, len(images))
    return image_table([("original", list(images[:n])), ("reconstruction", list(recon[:n]))],
                       path, title, cell=0.8)


@TOKENIZERS.register("image")
class ImageTokenizerOps:
    config = ImageTokenizerConfig

    @staticmethod
    def train(data, out, overrides=(), progress: bool = True) -> dict:
        cfg = load_config(ImageTokenizerConfig, None, overrides)
        stats = train_vq(data, out, cfg, progress)
        return {"kind": "image", "out": str(out), "size": cfg.vq.size, **stats}

    @staticmethod
    def evaluate(tokenizer, data, progress: bool = True, grid: str | None = None,
                 judge: str | None = None) -> dict:
        """Reconstruction PSNR (all pixels, objects, background), code usage, speed; with
        ``judge`` (a ShapesWorld shape judge's file, trained there when missing) also the
        judge's scores of the reconstructions against each image's first caption."""
        tok = ImageTokenizer.load(tokenizer)
        size = tok.model.cfg.image_size  # captions only for the judge: shards may have none
        images, caps = (load_images(data, size, captions=True) if judge
                        else (load_images(data, size), []))
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
        d = tok.model.cfg.depth
        codes = f"{ids.shape[1] // d} x {d}" if d > 1 else f"{ids.shape[1]}"
        recon_grid(images, recon, path, title=f"VQ tokenizer ({codes} codes of "
                   f"{tok.model.cfg.size}): {len(images)} images, PSNR {float(p.mean()):.1f} dB")
        judged = {}
        if judge:
            from omnimask.train.data.shapesworld.judge import (
                judge_images,
                load_or_train,
                shape_scores,
            )

            model = load_or_train(judge, progress)
            scores = shape_scores(judge_images(model, recon, caps))
            real = shape_scores(judge_images(model, images, caps))
            judged = {"judge_shape": scores["shape_hit"], "judge_shape_chance":
                      scores["shape_chance"], "judge_color": scores["colour_present"],
                      "judge_shape_originals": real["shape_hit"]}
        depth, size = tok.model.cfg.depth, tok.model.cfg.size  # rq: codes per level
        levels = ({"usage_per_level": [round(code_stats(ids.view(len(ids), -1, depth)[..., k],
                                                        size)["usage"], 4)
                                       for k in range(depth)]} if depth > 1 else {})
        return {"kind": "image", "size": size, "images": len(images),
                "psnr_db": round(float(p.mean()), 3),
                "psnr_db_dataset": round(float(10 * torch.log10(255.0 ** 2 / mse)), 3),
                **region_psnr(images, recon), **judged,
                **code_stats(ids, size), **levels, "tokens_per_image": ids.shape[1],
                "encode_images_per_s": round(len(images) / max(t_enc, 1e-9), 1),
                "recon_grid": str(path)}
