"""Pretraining's evaluation: end-of-run samples, their scores and the summary lines.

At the end of a run the CM3 model writes captions for val images, images for val captions
(decoded by the VQ decoder) and an infilled caption; they go to ``summary.json`` (under
``samples``) and ``generated_images.png``. With ``generate.shape_judge`` the drawn images
are scored by the ShapesWorld shape judge (``train/data/shapesworld/judge.py``), beside the
VQ reconstructions of the same images. ``caption_scores``, ``image_scores`` and
``summary_table`` turn a summary into the lines the CLI and the demo report print.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

# how drawn images are drawn (left to right, or MaskGIT's parallel rounds) and which head
# reranks the candidates: settings of pretraining's samples and of `eval generate`
SAMPLERS = ("auto", "cm3", "maskgit")  # auto: resolve_sampler
ORDERS = ("confidence", "random")  # maskgit: which sampled codes a round keeps
RERANKERS = ("itc", "itm")

if TYPE_CHECKING:
    from .corpus import Corpus
    from .objectives.base import Context
    from .pretrain import GenerateConfig



def resolve_sampler(sampler: str, depth: int) -> str:
    """``auto``: CM3 for one image code per position, MaskGIT for an rq tokenizer's
    ``depth`` > 1 id stacks (CM3 reads stacks but draws one code per position)."""
    return ("maskgit" if depth > 1 else "cm3") if sampler == "auto" else sampler

def samples(model, ctx: Context, toks: dict, val: Corpus, g: GenerateConfig, run: Path,
            progress: bool = True) -> dict:
    """Captions of val images, images drawn from val captions (``run/generated_images.png``,
    judged with ``g.shape_judge`` if set), an infilled caption and grounding scores."""
    from .evaluate_generate import draw_codes
    from .objectives import cm3_generate as cg

    text = toks["text"]
    model.eval()
    head = cg.itc_scores if g.rerank == "itc" else cg.itm_scores
    nc = min(g.captions, len(val))
    greedy: dict[int, str] = {}  # candidate 0 of every image is its greedy caption

    images = val.pixels if ctx.pixels else val.features  # what the model reads

    def score_captions(caps: list[list[int]], i: int) -> torch.Tensor:
        greedy[i] = text.decode(caps[0])
        f = images[i]
        return head(model, ctx, caps, f[None].expand(len(caps), *f.shape))

    chosen = cg.caption_images(model, ctx, text, val.codes[:nc],
                               candidates=g.caption_candidates,
                               temperature=g.caption_temperature, top_k=g.top_k,
                               score=score_captions, gen=torch.Generator().manual_seed(0))
    caps = []
    for i, out in enumerate(chosen):
        first = greedy.get(i, out)
        refs = [text.decode(c) for c in val.captions[i]]
        # chance level: the same caption against the next image's references
        chance = object_match(out, [text.decode(c) for c in val.captions[(i + 1) % nc]])
        caps.append({"key": val.keys[i], "generated": out, "reference": refs[0],
                     **object_match(out, refs), "greedy": first,
                     "greedy_precision": object_match(first, refs)["precision"],
                     **{f"chance_{k}": v for k, v in chance.items() if k != "recall"}})
    n = min(g.images, len(val))
    score = cg.image_scorer(model, ctx, toks["image"], g.rerank) if g.candidates > 1 else None
    codes = draw_codes(model, ctx, [val.captions[i][0] for i in range(n)],
                       val.grid[0] * val.grid[1], val.grid[1], g, score,
                       torch.Generator().manual_seed(0))
    vq = toks["image"].model
    with torch.no_grad():  # decoded once for the PNG and the judge
        drawn, recon = vq.decode(codes), vq.decode(val.codes[:n])
    image_caps = [text.decode(val.captions[i][0]) for i in range(n)]
    png = image_grid(recon[:g.grid_images], drawn[:g.grid_images], run,
                     image_caps[:g.grid_images])
    # the object scores and the judge know ShapesWorld's colours and shapes only
    shapes = shapesworld_captions([c["reference"] for c in caps] + image_caps)
    judged = (judge(g.shape_judge, drawn, recon, image_caps, progress)
              if g.shape_judge and shapes else {})
    d = [ctx.sp("bos"), *cg.text_part(ctx, val.captions[0][0])]
    s, e = 1 + len(val.captions[0][0]) // 3, 1 + 2 * len(val.captions[0][0]) // 3
    filled = cg.infill(model, ctx, text, d, s, e)
    first = list(range(min(64, len(val))))
    grounding = cg.grounding(model, ctx, val, first)
    if g.sampler == "maskgit":
        from .objectives import maskgit

        grounding["maskgit"] = maskgit.grounding(model, ctx, val, first)

    def mean(key: str) -> float:
        return round(sum(c[key] for c in caps) / max(1, len(caps)), 3)

    scores = {} if not shapes else {
        "captions_naming_every_object": sum(c["names_all"] for c in caps),
        "caption_object_precision": mean("precision"),
        "greedy_caption_object_precision": mean("greedy_precision"),
        "chance_caption_object_precision": mean("chance_precision"),
        "chance_captions_naming_every_object": sum(c["chance_names_all"] for c in caps),
        **{f"{p}caption_{k}_precision": mean(f"{p}{k}_precision")
           for p in ("", "chance_") for k in ("colour", "shape")}}
    return {"captions": caps, "grounding": grounding, "captions_scored": len(caps),
            "shapesworld": shapes, **scores, **judged, "images_png": str(png), "image_captions": image_caps,
            "infill": {"text": text.decode(val.captions[0][0]),
                       "hidden": text.decode(d[s:e]), "generated": filled}}


def shapesworld_captions(captions: list[str]) -> bool:
    """Whether the captions are ShapesWorld's: some name one of its (colour, shape) pairs.
    Real images' captions ("a dog on a sofa") get no object scores instead of zeros."""
    from .data.shapesworld.language import named_objects

    return any(named_objects(c) for c in captions)


def judge(path: str, drawn: torch.Tensor, recon: torch.Tensor, captions: list[str],
          progress: bool = True) -> dict:
    """Shape-judge scores (the judge at ``path``, trained there when missing) of the images
    drawn from ``captions`` and of the VQ's reconstructions of their val images (what the
    codes can show at best)."""
    from .data.shapesworld.judge import judge_images, load_or_train, shape_scores

    shape_judge = load_or_train(path, progress=progress)
    out: dict = {"images_judged": len(captions)}
    for kind, images in (("images", drawn), ("reconstructions", recon)):
        scores = shape_scores(judge_images(shape_judge, images, captions))
        out |= {f"{kind}_{k}": v for k, v in scores.items()}
    return out


def image_grid(real: torch.Tensor, fake: torch.Tensor, run: Path,
               captions: list[str] | None = None) -> Path:
    """``run/generated_images.png``: decoded val images [n, 3, H, W] (top row) over images
    drawn from their captions (written under them)."""
    from .figures import image_table

    return image_table([("VQ codes of\nthe val image", list(real)),
                        ("drawn from\nits caption", list(fake))],
                       Path(run) / "generated_images.png",
                       "CM3: val images through the VQ (top) and drawn from their captions",
                       [[], list(captions or [])], cell=1.3, wrap=20)


def object_match(generated: str, references: list[str]) -> dict:
    """ShapesWorld: the (colour, shape) pairs a caption names, against the references'."""
    from .data.shapesworld.language import named_objects as pairs

    got = pairs(generated)
    want = set().union(*(pairs(r) for r in references)) if references else set()

    def precision(hits: int) -> float:
        return round(hits / len(got), 3) if got else 0.0

    colours, shapes = {c for c, _ in want}, {s for _, s in want}
    return {"precision": precision(len(got & want)),
            "recall": round(len(got & want) / len(want), 3) if want else 0.0,
            "names_all": bool(want) and want <= got,
            # each named object's colour / shape alone: is it one the image has?
            "colour_precision": precision(sum(c in colours for c, _ in got)),
            "shape_precision": precision(sum(s in shapes for _, s in got))}


def val_history(metrics: Path) -> dict:
    """First and last validation losses per objective, and their ratio."""
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    vals = [r for r in rows if r.get("split") == "val"]
    if not vals:
        return {}
    first, last = vals[0]["losses"], vals[-1]["losses"]
    return {k: {"step0": first[k], "final": last[k],
                "ratio": round(last[k] / first[k], 3) if first[k] else None}
            for k in first if k in last}


def caption_scores(s: dict) -> str:
    """One line: how well CM3's captions of val images match them, each score against chance
    (the same caption scored against another image's references); ``s`` holds the
    ``samples()`` keys. Not ShapesWorld data: says that no object scores were computed."""
    if not s.get("shapesworld", True):
        return (f"CM3 captions of {s['captions_scored']} val images: no object scores (the "
                "captions name no ShapesWorld objects; the scores know only its colours "
                "and shapes)")
    def pair(k: str) -> str:
        return f"{s[k]:.3f} (chance {s['chance_' + k]:.3f})"
    return (f"CM3 captions of {s['captions_scored']} val images: of the objects named, right "
            f"colour {pair('caption_colour_precision')}, right shape "
            f"{pair('caption_shape_precision')}, right (colour, shape) "
            f"{pair('caption_object_precision')}; naming every object: "
            f"{s['captions_naming_every_object']} (chance {s['chance_captions_naming_every_object']})")


def image_scores(s: dict) -> str:
    """One line: the shape judge on the images drawn from val captions, beside the VQ's
    reconstructions of the same val images and chance; ``s`` holds the ``samples()`` keys."""
    def part(k: str) -> str:
        return (f"of the {s[k + '_objects']} objects in named colours, a named shape "
                f"{s[k + '_shape_hit']:.3f} (chance {s[k + '_shape_chance']:.3f})")
    return (f"Shape judge on images drawn from {s['images_judged']} "
            f"val captions: named colours present {s['images_colour_present']:.3f}, "
            f"{part('images')}; their VQ reconstructions: {part('reconstructions')}")


def summary_table(summary: dict, target: float | None = None) -> str:
    """Markdown: each objective's validation loss at step 0 and at the end, their ratio, and
    with ``target`` whether the ratio is at most it."""
    head = "| objective | val loss at step 0 | final | final / step 0 |"
    lines = [head + (" target | |" if target else ""),
             "|---|---|---|---|" + ("---|---|" if target else "")]
    for k, v in summary.get("val", {}).items():
        row = f"| {k} | {v['step0']:.4f} | {v['final']:.4f} | {v['ratio']} |"
        if target:
            r = v["ratio"]
            row += f" <= {target:.2f} | {'' if r is None else 'pass' if r <= target else 'short'} |"
        lines.append(row)
    return "\n".join(lines)
