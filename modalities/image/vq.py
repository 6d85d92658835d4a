"""VQ image tokenizer: a small convolutional VQ-VAE with a factorised, l2-normalised codebook,
or finite scalar quantisation.

Encoder: ``downsample`` stride-2 convolutions (3: 8 px patches, 64 px -> 8 x 8 codes; 2:
4 px patches, 16 x 16 codes) with residual blocks; a 1x1 projection to a low-dimensional
code space. ``quantizer=vq``: vectors and codes are l2-normalised (ViT-VQGAN / BEiT-v2
"factorised codes"), so matching is by cosine; the codebook is updated by EMA (decay 0.99)
or by gradients (straight-through with a commitment loss), initialised by k-means on the
first batch of latents, and codes unused for a while are restarted at random latents of
the current batch. ``quantizer=fsq`` (Mentzer et al. 2023): each of the code space's
dimensions is bounded and rounded to one of ``fsq_levels[i]`` values, the code id is the
mixed-radix number of the levels; no codebook, so no collapse. ``quantizer=rq`` (RQ-VAE,
Lee et al. 2022): ``rq_depth`` Euclidean EMA codebooks, each quantising what the ones before
left over; a position's ids are its depth stack (tokens = positions x depth, depth
innermost) and the decoder reads the sum of their codes. Decoder: the mirror image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.config import check_choice, check_fields
from omnimask.errors import OmnimaskError

from ..kmeans import kmeans


def autocast_to(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` on ``device``; None: off (the inputs' precision)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@dataclass
class VQConfig:
    # the defaults are the best tokenizer measured on ShapesWorld: FSQ 8-5-5-5 on 4 px
    # patches (16 x 16 codes of 1000); the demo's is a VQ of 128 codes on 8 px patches
    image_size: int = 64
    downsample: int = 2  # stride-2 stages: patches of 2**downsample pixels
    channels: list[int] = field(default_factory=list)  # per stage; []: 32, 64, 128 (the last)
    code_dim: int = 32  # vq, rq: the code space (fsq: one dimension per level, ``dim``)
    codebook_size: int = 1024  # vq, rq: codes (fsq: the product of its levels, ``size``)
    quantizer: str = "fsq"  # vq | fsq | rq
    rq_depth: int = 4  # rq only: codes per position
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    ema: bool = True
    decay: float = 0.99
    commitment: float = 0.25
    dead_after: int = 30  # training steps without use after which a code is restarted

    def __post_init__(self) -> None:
        p = "vq."  # where it sits in the image tokenizer's config
        check_fields(self, ">=1", "image_size", "code_dim", "codebook_size", "dead_after",
                     "rq_depth", prefix=p)
        check_fields(self, "[0,1)", "decay", prefix=p)
        check_fields(self, ">=0", "commitment", prefix=p)
        check_choice(self, "downsample", (2, 3), prefix=p)
        check_choice(self, "quantizer", ("vq", "fsq", "rq"), prefix=p)
        if self.image_size % self.patch:
            raise ValueError(f"{p}image_size must be a multiple of {self.patch} "
                             f"(2**downsample), got {self.image_size}")
        ch = self.stage_channels
        if len(ch) != self.downsample or min(ch) < 1:
            raise ValueError(f"{p}channels must be {self.downsample} sizes >= 1 (one per "
                             f"stage), got {list(ch)}")
        if self.quantizer == "fsq" and (not self.fsq_levels or min(self.fsq_levels) < 2):
            raise ValueError(f"{p}fsq_levels must be sizes >= 2, got {list(self.fsq_levels)}")

    @property
    def stage_channels(self) -> list[int]:
        """``channels``, or the default's last ``downsample`` sizes when empty."""
        return list(self.channels) or [32, 64, 128][3 - self.downsample:]

    # fsq's sizes follow from its levels; derived here rather than written into
    # code_dim/codebook_size, so switching a config to vq keeps vq's own settings
    @property
    def dim(self) -> int:
        """The code space's dimension: one per level for fsq, else ``code_dim``."""
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.code_dim

    @property
    def size(self) -> int:
        """Distinct code ids: the product of the levels for fsq, else ``codebook_size``."""
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    @property
    def patch(self) -> int:
        return 2 ** self.downsample

    @property
    def tokens_side(self) -> int:
        return self.image_size // self.patch

    @property
    def depth(self) -> int:
        """Ids per grid position: ``rq_depth`` for rq, else 1."""
        return self.rq_depth if self.quantizer == "rq" else 1

    @property
    def tokens_per_image(self) -> int:
        return self.tokens_side ** 2 * self.depth


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.c2(F.silu(self.c1(F.silu(x))))


class Quantizer(nn.Module):
    """The VQ codebook: l2-normalised codes matched by cosine, or with ``euclidean`` (the
    levels of ``ResidualQuantizer``) plain vectors matched by distance, each the EMA mean of
    the latents assigned to it."""

    def __init__(self, cfg: VQConfig, euclidean: bool = False) -> None:
        super().__init__()
        self.cfg, self.euclidean = cfg, euclidean
        code = F.normalize(torch.randn(cfg.codebook_size, cfg.code_dim), dim=-1)
        if cfg.ema:
            self.register_buffer("codebook", code)
            self.register_buffer("ema_count", torch.ones(cfg.codebook_size))
            self.register_buffer("ema_sum", code.clone())
        else:
            self.codebook = nn.Parameter(code)
            self.register_buffer("ema_count", torch.ones(cfg.codebook_size))
        self.register_buffer("idle", torch.zeros(cfg.codebook_size, dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(False))

    def codes(self) -> torch.Tensor:
        return self.codebook if self.euclidean else F.normalize(self.codebook, dim=-1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N] -> the decoder's inputs [N, code_dim]: the code vectors."""
        return F.embedding(ids, self.codes())

    def unit(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [N, code_dim] -> the unit vectors ``codes()`` are the nearest of (the
        latents themselves when euclidean)."""
        return z if self.euclidean else F.normalize(z, dim=-1)

    def ids(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [N, code_dim] -> code ids [N]."""
        return self.nearest(self.unit(z))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, d] as ``unit`` makes it -> ids [N] (largest cosine, or nearest code)."""
        c = self.codes()
        if self.euclidean:  # argmin |z - c|^2 = argmax 2 z.c - |c|^2
            return (2 * z @ c.T - c.pow(2).sum(-1)).argmax(-1)
        return (z @ c.T).argmax(-1)

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, seed: int = 0) -> None:
        """The codebook as k-means centres of latents z [N, code_dim]."""
        c, _ = kmeans(self.unit(z), self.cfg.codebook_size, iterations=10, seed=seed)
        c = c if self.euclidean else F.normalize(c, dim=-1)
        self.codebook.data.copy_(c)
        if self.cfg.ema:
            self.ema_sum.copy_(c)
        self.initialised.fill_(True)

    def forward(self, z: torch.Tensor):
        """z: [N, d] -> (quantised with straight-through [N, d], ids [N], losses dict)."""
        z = self.unit(z)
        ids = self.nearest(z.detach())
        q = self.lookup(ids)
        losses = {"commit": self.cfg.commitment * F.mse_loss(z, q.detach())}
        if not self.cfg.ema:
            losses["codebook"] = F.mse_loss(q, z.detach())
        if self.training:
            self._update(z.detach(), ids)
        return z + (q - z).detach(), ids, losses

    @torch.no_grad()
    def _update(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        """EMA statistics and dead-code restarts. With several ranks (data-parallel
        training) the counts and sums are summed over ranks and rank 0's restart latents
        are broadcast, so every rank keeps the same codebook: one batch of all ranks' rows."""
        k, d = self.cfg.codebook_size, self.cfg.decay
        group = _group_size() > 1
        onehot_count = torch.bincount(ids, minlength=k).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, z) if self.cfg.ema else None
        if group:
            import torch.distributed as dist

            dist.all_reduce(onehot_count)
            if sums is not None:
                dist.all_reduce(sums)
        self.ema_count.mul_(d).add_(onehot_count, alpha=1 - d)
        if self.cfg.ema:
            self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
            self.codebook.copy_(self.ema_sum / self.ema_count.clamp_min(1e-5)[:, None]
                                if self.euclidean else F.normalize(self.ema_sum, dim=-1))
        self.idle.add_(1).masked_fill_(onehot_count > 0, 0)
        dead = self.idle >= self.cfg.dead_after
        n = int(dead.sum())
        if n:  # restart dead codes at random latents of this batch
            pick = z[torch.randint(z.shape[0], (n,), device=z.device)].contiguous()
            if group:
                import torch.distributed as dist

                dist.broadcast(pick, src=0)
            self.codebook.data[dead] = pick
            self.ema_count[dead] = self.ema_count.mean()
            if self.cfg.ema:  # a sum whose mean is the pick
                self.ema_sum[dead] = pick * (self.ema_count[dead, None] if self.euclidean
                                             else 1)
            self.idle[dead] = 0
        self.restarts = n


def _group_size() -> int:
    """The initialised process group's size (1 without one); modalities do not import
    the training package."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class FSQuantizer(nn.Module):
    """Finite scalar quantisation: dimension i of a latent is bounded by tanh to
    ``levels[i]`` steps and rounded (straight-through); the id is the levels' mixed-radix
    number. Outside the decoder a code is the unit vector of its values with a constant 1
    appended (``codes``, ``unit``): one vector per code, so the pretraining objectives and
    embedders that expect l2-normalised code vectors take FSQ codes unchanged."""

    restarts = 0  # no codebook, nothing to restart

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        levels = torch.tensor(cfg.fsq_levels, dtype=torch.long)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]),
                                                    0), persistent=False)
        half = levels // 2  # integer values -half .. levels - 1 - half, scaled to [-1, 1)
        self.register_buffer("half_width", half.float(), persistent=False)
        ids = torch.arange(cfg.size)
        self.register_buffer("grid", ((ids[:, None] // self.basis) % levels - half)
                             / half.float(), persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> values in (-half - 1/2, levels - half - 1/2): rounding gives a level."""
        lv = self.levels.float()
        lo, hi = -self.half_width - 0.5 + 1e-3, lv - self.half_width - 0.5 - 1e-3
        mid, span = (hi + lo) / 2, (hi - lo) / 2
        return mid + span * torch.tanh(z)

    def _values(self, z: torch.Tensor) -> torch.Tensor:
        b = self.bound(z)
        return (b + (b.round() - b).detach()) / self.half_width  # straight-through rounding

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.grid)

    def _unit(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.cat([v, torch.ones_like(v[..., :1])], -1), dim=-1)

    def codes(self) -> torch.Tensor:
        return self._unit(self.grid)

    def unit(self, z: torch.Tensor) -> torch.Tensor:
        return self._unit(self.bound(z) / self.half_width)

    def ids(self, z: torch.Tensor) -> torch.Tensor:
        q = (self.bound(z).round() + self.half_width).long()
        return (q * self.basis).sum(-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Unit vectors (as ``unit`` makes them) -> ids [N] (largest cosine)."""
        return (z @ self.codes().T).argmax(-1)

    def init_kmeans(self, z: torch.Tensor, seed: int = 0) -> None:
        """Nothing to initialise."""

    def forward(self, z: torch.Tensor):
        """z: [N, d] -> (quantised with straight-through [N, d], ids [N], no losses)."""
        return self._values(z), self.ids(z.detach()), {}


class ResidualQuantizer(nn.Module):
    """Residual quantisation: ``rq_depth`` Euclidean codebooks, level k quantising the
    residual the levels before it left; the quantised latent is the sum of the levels'
    codes. Ids are [N, depth]; ``codes()`` stacks the levels' codebooks (level k's code c
    at row k * codebook_size + c: the rows of an id stack's vocabulary); latents are matched
    by distance, so ``unit`` leaves them as they are, and ``nearest`` (one id per vector)
    refuses."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.levels = nn.ModuleList(Quantizer(cfg, euclidean=True) for _ in range(cfg.rq_depth))

    @property
    def restarts(self) -> int:
        return sum(getattr(q, "restarts", 0) for q in self.levels)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, depth] -> the summed codes [N, code_dim]."""
        return sum(q.lookup(ids[:, k]) for k, q in enumerate(self.levels))

    def _descend(self, r: torch.Tensor, update: bool = False):
        """Each level's nearest code to what the levels before left: (ids [N, depth], the
        summed codes [N, d]); ``update``: the levels' EMA statistics too."""
        total, ids = torch.zeros_like(r), []
        for q in self.levels:
            i = q.nearest(r)
            c = q.lookup(i)
            if update:
                q._update(r, i)
            ids.append(i)
            total, r = total + c, r - c
        return torch.stack(ids, 1), total

    def ids(self, z: torch.Tensor) -> torch.Tensor:
        return self._descend(z)[0]

    def codes(self) -> torch.Tensor:
        return torch.cat([q.codes() for q in self.levels])

    def unit(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        raise OmnimaskError("an rq image tokenizer (vq.quantizer=rq) gives a stack of ids per "
                            "position (quantizer.ids), not one nearest code")

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, seed: int = 0) -> None:
        for k, q in enumerate(self.levels):  # each level on what the ones before left
            q.init_kmeans(z, seed + k)
            z = z - q.lookup(q.nearest(z))

    def forward(self, z: torch.Tensor):
        """z: [N, d] -> (summed codes with straight-through [N, d], ids [N, depth], losses)."""
        ids, total = self._descend(z.detach(), update=self.training)
        total = total.detach()
        losses = {"commit": self.cfg.commitment * F.mse_loss(z, total)}
        return z + (total - z).detach(), ids, losses


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.stage_channels
        enc: list[nn.Module] = []
        for a, b in zip([3] + ch[:-1], ch):
            enc += [nn.Conv2d(a, b, 4, 2, 1), ResBlock(b)]
        self.encoder = nn.Sequential(*enc, ResBlock(ch[-1]), nn.SiLU(),
                                     nn.Conv2d(ch[-1], cfg.dim, 1))
        self.quantizer = {"fsq": FSQuantizer, "rq": ResidualQuantizer}.get(cfg.quantizer,
                                                                           Quantizer)(cfg)
        dec: list[nn.Module] = [nn.Conv2d(cfg.dim, ch[-1], 1), ResBlock(ch[-1]),
                                ResBlock(ch[-1]), nn.SiLU()]
        rev = ch[::-1]
        for a, b in zip(rev[:-1], rev[1:]):
            dec += [nn.ConvTranspose2d(a, b, 4, 2, 1), ResBlock(b), nn.SiLU()]
        self.decoder = nn.Sequential(*dec, nn.ConvTranspose2d(ch[0], 3, 4, 2, 1))
        self.conv_dtype: torch.dtype | None = None  # forward()'s convolutions (training)

    @staticmethod
    def to_input(images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float in [-1, 1]."""
        return images.float() / 127.5 - 1.0

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def _check(self, images: torch.Tensor) -> None:
        s = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (s, s):
            raise ValueError(f"expected images of shape [B, 3, {s}, {s}], got {tuple(images.shape)}")

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] float -> [B * h * w, code_dim] (unnormalised)."""
        z = self.encoder(x)
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])

    def decode_codes(self, q: torch.Tensor, b: int, side: int | None = None) -> torch.Tensor:
        """Code vectors [b * side**2, d] in raster order -> images; ``side``: codes per row
        (the config's whole image when None; a training crop's fewer)."""
        s = side or self.cfg.tokens_side
        return self.decoder(q.reshape(b, s, s, -1).permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor):
        """Training on [B, 3, S, S] in [-1, 1], S the image size or a crop's."""
        b, side = x.shape[0], x.shape[-1] // self.cfg.patch
        with self._convs(x):
            z = self.latents(x)
        q, ids, losses = self.quantizer(z.float())  # matching and EMA statistics in fp32
        with self._convs(x):
            recon = self.decode_codes(q, b, side)
        recon = recon.float()
        losses["recon"] = F.mse_loss(recon, x)
        return recon, ids.reshape(b, -1), losses

    def _convs(self, x: torch.Tensor):
        """The encoder's and decoder's autocast (``conv_dtype``, a training setting)."""
        return autocast_to(self.conv_dtype, x.device)

    @torch.no_grad()
    def unit_latents(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> l2-normalised latents [B, tokens, d], the vectors the codes
        (``quantizer.codes()``) are the nearest of (and the pretraining corpus's features)."""
        self._check(images)
        z = self.quantizer.unit(self.latents(self.to_input(images)))
        return z.view(images.shape[0], -1, z.shape[-1])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> code ids [B, tokens] in raster order."""
        self._check(images)
        z = self.latents(self.to_input(images))
        return self.quantizer.ids(z).view(images.shape[0], -1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """code ids [B, tokens] -> uint8 images [B, 3, H, W]."""
        n, d = self.cfg.tokens_per_image, self.cfg.depth
        if ids.ndim != 2 or ids.shape[1] != n:
            raise ValueError(f"expected ids of shape [B, {n}], got {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.size:
            raise ValueError(f"code ids must be in [0, {self.cfg.size})")
        flat = ids.reshape(-1, d) if d > 1 else ids.reshape(-1)
        return self.to_uint8(self.decode_codes(self.quantizer.lookup(flat), ids.shape[0]))
