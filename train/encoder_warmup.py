"""Region-label warm-up of the pixel image encoder, before multimodal pretraining.

UNITER and its kin read images through a detector trained on labelled objects; our encoder
is trained from pixels. Captions, matching and masked modelling alone did not teach it
shape identity on ShapesWorld (a linear probe of its patch tokens read the shape of object
patches at chance), so before the first pretraining step it learns the shards' semantic
classes (``seg.png``): the encoder alone (no trunk, a fraction of a step's cost) with a
linear classifier per patch token, KL to each patch's class fractions. The classifier is
then dropped and the encoder kept; ``model.image_encoder.frozen`` keeps what it learned
through pretraining and fine-tuning (the detector's role, whose features UNITER keeps
fixed).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from omnimask.config import PRECISIONS, check_choice, check_fields
from omnimask.errors import ConfigError
from omnimask.modalities.image.tokenizer import conv_dtype
from omnimask.modalities.image.vq import autocast_to

log = logging.getLogger("omnimask.encoder_warmup")


TAG_MODES = ("none", "classes", "all")


@dataclass
class EncoderWarmupConfig:
    steps: int = 0  # 0: no warm-up
    batch_size: int = 32  # images per step
    lr: float = 2.0e-3  # one-cycle schedule (10% warm-up, cosine down)
    weight_decay: float = 0.01
    classes: int = 0  # semantic classes; 0: the training corpus's (largest id in seg.png + 1)
    val_images: int = 200  # object-patch accuracy measured on this many validation images
    # share of training images whose hue is turned by a random angle: they teach the patch
    # classes only (not the colours), so shape is learned apart from colour
    hue_jitter: float = 0.0
    # keep classifiers as the encoder's region tags (OSCAR's object tags): each image token
    # then also carries the embeddings of its predicted words, the words captions and
    # questions use, so text finds the patches it names. none | classes | all (+ colours)
    tags: str = "none"
    # the training steps' arithmetic: fp32, bf16 (autocast) or auto (bf16 where the CPU, or
    # a GPU, computes it natively)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        p = "encoder_warmup."
        check_fields(self, ">=0", "steps", "classes", "val_images", "weight_decay", prefix=p)
        check_fields(self, ">=1", "batch_size", prefix=p)
        check_fields(self, ">0", "lr", prefix=p)
        check_fields(self, "[0,1]", "hue_jitter", prefix=p)
        check_choice(self, "precision", PRECISIONS, prefix=p)
        check_choice(self, "tags", TAG_MODES, prefix=p)


def object_patch_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Accuracy over the patches an object class (not class 0, the background) covers at
    least half of: the patches whose class has to be seen. NaN when there are none."""
    clear = target[:, 1:].amax(-1) >= 0.5
    return float((logits.argmax(-1) == target.argmax(-1))[clear].float().mean())


def check_labels(train, val, cfg: EncoderWarmupConfig) -> int:
    """The number of semantic classes the warm-up predicts; a ConfigError naming the split
    when either corpus lacks labels or pixels, or holds a class beyond ``cfg.classes``."""
    for what, c in (("data.train", train), ("data.val", val)):
        if c.regions is None or c.pixels is None:
            raise ConfigError(f"encoder_warmup.steps > 0 needs semantic labels (seg.png) and "
                              f"pixels; {what} has none")
    k = cfg.classes or int(train.regions.shape[-1])
    for what, c in (("data.train", train), ("data.val", val)):
        if c.regions.shape[-1] > k:
            raise ConfigError(f"encoder_warmup.classes is {k} but {what}'s seg.png holds "
                              f"class {c.regions.shape[-1] - 1}")
    return k


def tag_words(train, cfg: EncoderWarmupConfig) -> list[list[str]]:
    """The words of the warm-up's classifiers that ``cfg.tags`` keeps, as
    ``model.image_encoder.tags`` holds them: the semantic classes' names ("" for the
    background and unnamed classes), then (``all``) "" (no object) and the colour names
    when the corpus has colours."""
    k = cfg.classes or int(train.regions.shape[-1])
    named = list(train.seg_classes or [])
    classes = [named[i] if 0 < i < len(named) and not named[i].startswith("class ") else ""
               for i in range(k)]
    out = [classes]
    if cfg.tags == "all" and train.region_attrs is not None and train.region_colors:
        out.append(["", *train.region_colors])
    return out


def _attrs(c, names: list[str]) -> torch.Tensor | None:
    """``c``'s colour attributes [N, P, 1 + len(names)] in ``names``' order (colours
    ``names`` lacks count as no object)."""
    if c.region_attrs is None:
        return None
    a = c.region_attrs.float()
    out = torch.zeros(*a.shape[:2], 1 + len(names))
    out[..., 0] = a[..., 0]
    for j, n in enumerate(c.region_colors or []):
        out[..., 1 + names.index(n) if n in names else 0] += a[..., 1 + j]
    return out


def hue_jittered(pixels: torch.Tensor, p: float, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, 3, H, W] with a share ``p`` of the images hue-turned by a random angle;
    and a bool [B]: True where an image keeps its colours."""
    from omnimask.modalities.image.processor import hue_rotate

    turn = torch.rand(len(pixels), generator=g) < p
    angles = torch.rand(len(pixels), generator=g) * 2 * math.pi
    out = pixels.clone()
    for i in turn.nonzero().flatten().tolist():
        out[i] = hue_rotate(pixels[i], float(angles[i]))
    return out, ~turn


def warm_up_encoder(encoder, train, val, cfg: EncoderWarmupConfig, seed: int,
                    progress: bool = True) -> dict:
    """Train ``encoder`` (an :class:`ImageEncoder`) on ``train``'s patch classes, and its
    objects' colours where the corpus has them (``region_attrs``), for ``cfg.steps`` steps
    (all randomness from ``seed``); returns the validation object-patch accuracies before
    and after, the classes, the seconds taken and the training steps' precision (the
    accuracies are measured in fp32)."""
    k = check_labels(train, val, cfg)
    names = list(train.region_colors or [])
    attrs = {id(c): _attrs(c, names) for c in (train, val)}
    colors = all(a is not None for a in attrs.values()) and bool(names)

    def targets(c, idx) -> list[torch.Tensor]:
        t = c.regions[idx].float()
        out = [F.pad(t, (0, k - t.shape[-1])).flatten(0, 1)]
        if colors:
            out.append(attrs[id(c)][idx].flatten(0, 1))
        return out

    device = next(encoder.parameters()).device
    dtype = conv_dtype(cfg.precision, device, "encoder_warmup.precision")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sizes = [k, 1 + len(names)] if colors else [k]
    kept = list(encoder.tag_heads)  # the encoder keeps these as its region tags
    if [h.out_features for h in kept] != sizes[:len(kept)]:
        raise ConfigError(f"model.image_encoder.tags has {[h.out_features for h in kept]} "
                          f"classes per classifier; the warm-up's data gives {sizes}")
    # the others are dropped after the warm-up
    fresh = [torch.nn.Linear(encoder.cfg.dim, n) for n in sizes[len(kept):]]
    heads = torch.nn.ModuleList(kept + fresh).to(device)
    opt = torch.optim.AdamW([*encoder.parameters(), *(p for h in fresh for p in h.parameters())],
                            lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps,
                                                pct_start=0.1)
    vidx = torch.arange(min(cfg.val_images, len(val)))

    @torch.no_grad()
    def accuracies() -> list[float]:
        was = encoder.training
        encoder.eval()
        tok = torch.cat([encoder(val.pixels[i].to(device)).tokens for i in vidx.split(64)])
        encoder.train(was)
        return [object_patch_accuracy(h(tok).flatten(0, 1).float().cpu(), t)
                for h, t in zip(heads, targets(val, vidx))]

    frozen = encoder.frozen
    encoder.freeze(False)  # model.image_encoder.frozen applies after the warm-up
    before, t0 = accuracies(), time.perf_counter()
    encoder.train()
    bar = tqdm(range(cfg.steps), desc="encoder warm-up", unit="step", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(train), (cfg.batch_size,), generator=g)
        pixels, kept = train.pixels[idx], torch.ones(len(idx), dtype=torch.bool)
        if cfg.hue_jitter > 0:
            pixels, kept = hue_jittered(pixels, cfg.hue_jitter, g)
        with autocast_to(dtype, device):
            tok = encoder(pixels.to(device)).tokens
            logits = [h(tok).flatten(0, 1).float() for h in heads]
        loss = 0
        for j, (z, t) in enumerate(zip(logits, targets(train, idx))):
            rows = slice(None) if j == 0 else kept.repeat_interleave(tok.shape[1]).to(device)
            if j and not kept.any():  # every image turned: no colour to learn this step
                continue
            loss = loss + F.kl_div(z[rows].log_softmax(-1), t.to(device)[rows],
                                   reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    encoder.freeze(frozen)
    after = accuracies()
    out = {"steps": cfg.steps, "classes": k, "seconds": round(time.perf_counter() - t0, 1),
           "object_patch_accuracy_before": round(before[0], 4),
           "object_patch_accuracy": round(after[0], 4),
           "chance": round(1 / max(1, k - 1), 4),
           "precision": "bf16" if dtype is not None else "fp32"}
    if colors:
        out |= {"colors": len(names), "color_patch_accuracy_before": round(before[1], 4),
                "color_patch_accuracy": round(after[1], 4),
                "color_chance": round(1 / len(names), 4)}
    log.info("encoder warm-up: object-patch accuracy %.3f -> %.3f (chance %.3f) in %d steps",
             before[0], out["object_patch_accuracy"], out["chance"], cfg.steps)
    return out
