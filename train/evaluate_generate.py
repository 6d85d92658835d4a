"""``omnimask eval generate``: images a pretrained model draws from captions, judged.

Each image's first caption is the prompt (CM3: ``<bos> caption <sep> <image>``, as
pretraining's end-of-run samples; ``sampler=maskgit``: the caption and a fully masked
image, unmasked in rounds); the drawn codes go through the image tokenizer's decoder, and the
ShapesWorld shape judge (``train/data/shapesworld/judge.py``) scores them against the
caption: named colours present, judged shapes named with their colour, and the object
count. The same scores of the tokenizer's reconstructions (what its codes can show at
best) and of the original images (what the judge can see at best) stand beside them, and
the sampler's grounding: its loss on the images' codes after their own caption and after
another one (equal: the caption is not read).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from omnimask.config import check_choice, check_fields, load_config
from omnimask.errors import ConfigError, OmnimaskError

from .evaluate import ORDERS, RERANKERS, SAMPLERS, resolve_sampler

INFILLS = ("none", "objects")


@dataclass
class GenerateEvalConfig:
    """``--set KEY=VALUE`` settings of ``omnimask eval generate``."""

    # cm3: left to right; maskgit: parallel rounds (objective maskgit); auto: maskgit with
    # infill or an rq tokenizer's id stacks, else cm3
    sampler: str = "auto"
    steps: int = 12  # maskgit's rounds
    # maskgit: which drawn codes a round keeps: its most confident (MaskGIT's) or a uniformly
    # random share (any-order sampling: confidence keeps the background first)
    order: str = "confidence"
    # maskgit: none draws whole images; objects draws only the codes around each object
    # (its box, one code of margin), the rest given: the shape drawn where it belongs
    infill: str = "none"
    temperature: float = 1.0  # sampling of image codes
    top_k: int = 20
    guidance: float = 5.0  # classifier-free guidance scale (1: none)
    candidates: int = 8  # images sampled per caption; the one `rerank` scores best is kept
    rerank: str = "itc"  # itc | itm: the model's own head scores the candidates
    # the ShapesWorld shape judge: "shipped" (the package's), or a safetensors file, trained
    # and saved there when missing (~30 s)
    shape_judge: str = "shipped"
    seed: int = 0
    batch: int = 16  # captions drawn at once (times candidates, times 2 with guidance)
    grid_images: int = 8  # columns of the examples PNG

    def __post_init__(self) -> None:
        check_choice(self, "rerank", RERANKERS)
        check_choice(self, "sampler", SAMPLERS)
        check_choice(self, "order", ORDERS)
        check_choice(self, "infill", INFILLS)
        if self.infill != "none" and self.sampler == "cm3":
            raise ConfigError(f"infill={self.infill} needs sampler=maskgit (cm3 draws left "
                              f"to right)")
        check_fields(self, ">=1", "candidates", "batch", "grid_images", "steps")
        check_fields(self, ">=0", "temperature", "top_k", "seed")
        check_fields(self, ">0", "guidance")


def generation_metrics(model, corpus, limit: int | None, examples: Path | None,
                       settings: dict | None = None, progress: bool = True) -> dict:
    """Draw an image from the first caption of the first ``limit`` samples of ``corpus``
    and judge them; with ``examples`` write ``generated.png`` (original, codes, drawn)."""
    from tqdm import tqdm

    from .data.shapesworld.judge import (
        count_scores,
        judge_images,
        load_or_train,
        shape_scores,
    )
    from .evaluate import shapesworld_captions
    from .objectives import cm3_generate as cg
    from .objectives.base import Context

    g = load_config(GenerateEvalConfig, None, [f"{k}={v}" for k, v in (settings or {}).items()])
    toks = model.tokenizers
    text, image = toks["text"], toks["image"]
    g.sampler = resolve_sampler("maskgit" if g.infill != "none" and g.sampler == "auto"
                                else g.sampler, image.model.cfg.depth)
    if g.candidates > 1 and g.rerank not in model.heads:
        raise ConfigError(f"rerank={g.rerank}: the model has no {g.rerank} head (heads: "
                          f"{', '.join(sorted(model.heads)) or 'none'}); set candidates=1")
    n = len(corpus) if limit is None else min(limit, len(corpus))
    captions = [text.decode(corpus.captions[i][0]) for i in range(n)]
    if not shapesworld_captions(captions):
        raise OmnimaskError("eval generate judges ShapesWorld pictures; these captions name "
                            "none of its (colour, shape) pairs")
    pixels = model.cfg.image_input == "pixels"
    ctx = Context(vocab=model.vocab, codebook=torch.empty(0), word_start=torch.empty(0),
                  cfg=None, pixels=pixels, depth=model.cfg.image_code_depth)
    model.eval()
    score = cg.image_scorer(model, ctx, image, g.rerank) if g.candidates > 1 else None
    gen = torch.Generator().manual_seed(g.seed)
    rows, cols = corpus.grid
    drawn = []
    for s in tqdm(range(0, n, g.batch), desc="drawing", unit="batch", disable=not progress):
        idx = list(range(s, min(n, s + g.batch)))
        caps = [corpus.captions[i][0] for i in idx]
        given = None
        if g.infill == "objects":
            from .objectives.maskgit import object_boxes
            given = (corpus.codes[idx].long(), ~object_boxes(corpus, idx))
        drawn.append(draw_codes(model, ctx, caps, rows * cols, cols, g, score, gen, given))
    codes = torch.cat(drawn)
    vq = image.model
    with torch.no_grad():
        pictures = vq.decode(codes)
        recon = vq.decode(corpus.codes[:n])
    originals = corpus.pixels[:n] if corpus.pixels is not None else recon
    judge = load_or_train(g.shape_judge, progress=progress)
    out: dict = {"images": n}
    for suffix, ims in (("", pictures), ("_reconstructions", recon), ("_originals", originals)):
        sc = shape_scores(judge_images(judge, ims, captions))
        out[f"judge_shape{suffix}"] = sc["shape_hit"]
        if not suffix:
            out["judge_shape_chance"] = sc["shape_chance"]
        out[f"judge_color{suffix}"] = sc["colour_present"]
        out[f"judge_count{suffix}"] = count_scores(ims, captions)["count_hit"]
    idx = list(range(min(n, 64)))
    if g.sampler == "maskgit":  # does the drawing read the caption: own vs another's
        from .objectives.maskgit import grounding
        out["grounding"] = grounding(model, ctx, corpus, idx)
    else:
        out["grounding"] = cg.grounding(model, ctx, corpus, idx)
    out["settings"] = {k: v for k, v in asdict(g).items() if k not in ("batch", "grid_images")}
    if examples is not None:
        out["examples_png"] = str(examples_png(originals, recon, pictures, captions,
                                               Path(examples), g.grid_images, g.sampler))
    return out


def draw_codes(model, ctx, captions: list[list[int]], num_codes: int, cols: int, g,
               score=None, gen: torch.Generator | None = None,
               given: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Codes [len(captions), num_codes * depth] (``num_codes`` positions, ``depth`` ids
    each) drawn by ``g.sampler`` (cm3: left to right over the KV cache; maskgit:
    ``g.steps`` parallel rounds in ``g.order``) with ``g.temperature``, ``g.top_k`` (cm3),
    ``g.guidance`` and ``g.candidates`` per caption, the one ``score(caption, codes)``
    rates best kept (the first without ``score``). ``given`` (maskgit): (codes [len(captions),
    num_codes * depth], keep [len(captions), num_codes]), the positions where ``keep`` stay."""
    from .objectives import cm3_generate as cg
    from .objectives.maskgit import draw

    if g.sampler == "cm3":
        return cg.images_from_captions(model, ctx, captions, num_codes, cols, g.temperature,
                                       g.top_k, g.guidance, g.candidates, score, gen)
    k = g.candidates
    start, keep = ((given[0].repeat_interleave(k, 0), given[1].repeat_interleave(k, 0))
                   if given is not None else (None, None))
    codes = draw(model, ctx, [c for c in captions for _ in range(k)], num_codes, cols,
                 g.steps, g.temperature, g.guidance, gen, start=start, keep_known=keep,
                 order=g.order).view(len(captions), k, -1)
    best = ([int(score(c, codes[j]).argmax()) for j, c in enumerate(captions)]
            if k > 1 and score is not None else [0] * len(captions))
    return codes[torch.arange(len(captions)), torch.tensor(best)]


def examples_png(originals: torch.Tensor, recon: torch.Tensor, drawn: torch.Tensor,
                 captions: list[str], folder: Path, n: int, sampler: str = "cm3") -> Path:
    """``folder/generated.png``: per column a caption's image, its tokenizer codes decoded,
    and the image drawn from the caption (written under it)."""
    from .figures import image_table

    folder.mkdir(parents=True, exist_ok=True)
    n = min(n, len(drawn))
    return image_table([("original", list(originals[:n])), ("its codes", list(recon[:n])),
                        ("drawn from\nthe caption", list(drawn[:n]))],
                       folder / "generated.png",
                       f"Images drawn from captions ({'MaskGIT' if sampler == 'maskgit' else 'CM3'})",
                       [[], [], captions[:n]], cell=1.3, wrap=20)
