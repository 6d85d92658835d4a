"""VQA: questions about an image answered from a closed answer vocabulary.

Training data: several questions of one image packed into one sequence ([image][<cls> q1]
[<cls> q2]...; block mask: the image is encoded once, questions do not see each other),
soft answer scores as targets (``soft_score``: 1 for a single annotator's answer; with
several annotators, 0.3 per agreeing annotator up to 1, as UNITER's and bottom-up
attention's preprocessing); optionally images mirrored with their questions' direction words
swapped (``hflip``/``vflip``), so that an answer about where things are cannot be recalled
from the image alone. Evaluation: the official VQA accuracy with answer
normalisation, per question type, and the prior baseline (each type's most frequent
training answer, kept in the head's settings).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omnimask.config import check_fields
from omnimask.errors import OmnimaskError
from omnimask.fusion.packing import Segment, pack
from omnimask.modalities.image.processor import HUE_WORDS, hue_rotate, words_pattern

from ..objectives.base import image_segment, text_segment
from .base import Task, evaluating, first, pack_blocks, pyplot, save_figure, task


@dataclass
class VQAConfig:
    questions_per_sequence: int = 6  # questions packed with one image; 0: one per sequence
    max_answers: int = 3129  # the answer vocabulary: the most frequent training answers
    eval_images: int = 64  # images per evaluation batch
    max_question_tokens: int = 40
    # share of training images mirrored left-right / top-bottom; the words of
    # hflip_words / vflip_words in their questions and answers become their mirror images
    hflip: float = 0.0
    vflip: float = 0.0
    hflip_words: dict[str, str] = field(default_factory=lambda: dict(HFLIP_WORDS))
    vflip_words: dict[str, str] = field(default_factory=lambda: dict(VFLIP_WORDS))
    # weight of the glimpses' grounding loss (attention supervision): glimpse k of a
    # question attends where the instances of its k-th grounding role are (needs
    # heads.vqa.glimpses, inst.png and questions with "grounding"); 0: off
    ground_weight: float = 0.0
    # share of training images whose hue is turned by a random angle (pixel inputs), keeping
    # only their questions that name no hue and answer none (``hue_words``): shape, size,
    # count, relation seen in colours training never pairs them with
    hue_jitter: float = 0.0
    hue_words: list[str] = field(default_factory=lambda: list(HUE_WORDS))
    # a hue-turned image's other questions (those that name or answer a hue) are asked of
    # an untouched copy in the same batch instead of dropped: shape questions meet
    # turned hues as often as hue_jitter says, colour questions are not lost
    hue_copy: bool = False
    # product of experts with a question-only bias (Clark et al., 2019): in training the
    # answer logits get log p(answer | question text) - log p(answer | question type), the
    # training answers' counts per question text smoothed towards the type's with this many
    # pseudo-counts, so the head need not learn what the words alone predict (a colour never
    # seen with a shape); evaluation reads the head's logits alone. 0: off
    debias_question: float = 0.0

    def __post_init__(self) -> None:
        p = "tasks.vqa."
        check_fields(self, ">=0", "questions_per_sequence", prefix=p)
        check_fields(self, ">=1", "max_answers", "eval_images", "max_question_tokens", prefix=p)
        check_fields(self, "[0,1]", "hflip", "vflip", "hue_jitter", prefix=p)
        check_fields(self, ">=0", "ground_weight", "debias_question", prefix=p)
        for name in ("hflip_words", "vflip_words"):
            bad = [w for w in (*getattr(self, name), *getattr(self, name).values())
                   if not re.fullmatch(r"[a-z]+", w)]
            if bad:
                raise ValueError(f"{p}{name} must map lower-case words to words, got {bad[0]!r}")


# direction words and their mirror images (ShapesWorld's and English's usual ones)
HFLIP_WORDS = {"left": "right", "right": "left"}
VFLIP_WORDS = {"above": "below", "below": "above", "beneath": "above", "under": "above",
               "top": "bottom", "bottom": "top"}


def mirror_words(text: str, swaps: dict[str, str]) -> str:
    """``text`` with every whole word of ``swaps`` replaced (case-insensitive; a capital
    first letter stays capital)."""
    if not swaps:
        return text

    def sub(m: re.Match) -> str:
        w = swaps[m.group(0).lower()]
        return w.capitalize() if m.group(0)[0].isupper() else w

    words = "|".join(sorted(map(re.escape, swaps), key=len, reverse=True))
    return re.sub(rf"\b(?:{words})\b", sub, text, flags=re.IGNORECASE)


def mirrored(x: torch.Tensor, flip: tuple[bool, bool]) -> torch.Tensor:
    """``x`` ([..., H, W]) mirrored left-right and/or top-bottom by ``flip``."""
    dims = [d for d, on in zip((-1, -2), flip) if on]
    return x.flip(dims) if dims else x


def soft_score(count: int, annotators: int) -> float:
    """Target score of an answer given by ``count`` of ``annotators`` people."""
    if annotators <= 1:
        return float(count >= 1)
    return min(1.0, 0.3 * count)


def normalized(a: str) -> str:
    from ..metrics import normalize_answer

    return normalize_answer(a)


@task("vqa")
class VQA(Task):
    metric = "accuracy"
    Config = VQAConfig

    def __init__(self, ctx, cfg=None) -> None:
        super().__init__(ctx, cfg)
        self.answers: list[str] = []
        self.index: dict[str, int] = {}
        self._mirrored: dict[tuple[str, bool, bool], list[int]] = {}  # question ids
        self._grounded = None  # the corpus checked for grounding
        self._bias: tuple | None = None  # (corpus, {question text: log-ratio row})
        self.glimpses = 0
        self._hue_re = words_pattern(self.cfg.hue_words)
        if (self.cfg.hflip or self.cfg.vflip or self.cfg.hue_jitter) and not ctx.pixels:
            raise OmnimaskError("tasks.vqa.hflip/vflip/hue_jitter change pixels: they need "
                                "model.image_input=pixels (feature rows are not changed)")

    def check(self, corpus, what: str) -> None:
        super().check(corpus, what)
        if corpus.qa is None or not any(corpus.qa):
            raise OmnimaskError(f"{what}: the shards have no questions (qa.json); VQA needs "
                                "them")

    def head_config(self, corpus) -> dict:
        counts = Counter(normalized(a) for qs in corpus.qa for q in qs for a in q["answers"])
        answers = [a for a, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]
        by_type: dict[str, Counter] = {}
        for qs in corpus.qa:
            for q in qs:
                by_type.setdefault(q["type"], Counter()).update(
                    normalized(a) for a in q["answers"])
        priors = {t: min(c.items(), key=lambda x: (-x[1], x[0]))[0] for t, c in by_type.items()}
        return {"answers": answers[:self.cfg.max_answers], "priors": priors}

    def bind(self, model) -> None:
        hc = model.head_configs.get(self.name)
        if hc is None or not hc.answers:
            raise OmnimaskError("the model's vqa head has no answer list (heads.vqa.answers)")
        self.answers = list(hc.answers)
        self.index = {a: i for i, a in enumerate(self.answers)}
        self.priors = dict(hc.priors)
        self.glimpses = hc.glimpses
        if self.cfg.ground_weight and not self.glimpses:
            raise OmnimaskError("tasks.vqa.ground_weight supervises the head's glimpses: set "
                                "heads.vqa.glimpses >= 1")

    # -- data ------------------------------------------------------------------------------
    def _target(self, answers: list[str]) -> torch.Tensor:
        t = torch.zeros(len(self.answers))
        for a, c in Counter(normalized(a) for a in answers).items():
            if a in self.index:  # answers outside the vocabulary: no target (UNITER)
                t[self.index[a]] = soft_score(c, len(answers))
        return t

    def _question(self, q: dict) -> Segment:
        return text_segment(self.ctx, q["ids"][:self.cfg.max_question_tokens])

    def _image(self, corpus, i: int, flip: tuple[bool, bool], turn: float = 0.0) -> Segment:
        seg = image_segment(corpus, i, self.ctx.pixels)
        seg.pixels = mirrored(seg.pixels, flip)
        if turn:
            seg.pixels = hue_rotate(seg.pixels, turn)
        return seg

    def names_hue(self, q: dict) -> bool:
        """Whether question ``q`` or an answer of it names a hue (``hue_words``)."""
        return any(self._hue_re.search(t) for t in (q["question"], *q["answers"]))

    def hueless(self, qs: list[dict]) -> list[dict]:
        """The questions of ``qs`` that stay true when the image's hues turn."""
        return [q for q in qs if not self.names_hue(q)]

    def mirror(self, q: dict, flip: tuple[bool, bool]) -> dict:
        """Question ``q`` as asked of its image mirrored by ``flip`` = (left-right,
        top-bottom): direction words swapped in the question and the answers."""
        if not any(flip):
            return q
        h = self.cfg.hflip_words if flip[0] else {}
        v = self.cfg.vflip_words if flip[1] else {}
        swaps = {w: v.get(h.get(w, w), h.get(w, w)) for w in {**h, **v}}  # v after h
        text = mirror_words(q["question"], swaps)
        key = (q["question"], *flip)
        if key not in self._mirrored:
            self._mirrored[key] = (q["ids"] if text == q["question"] else
                                   self.ctx.text.tok.encode(text, add_special_tokens=False).ids)
        return {**q, "question": text, "ids": self._mirrored[key],
                "answers": [mirror_words(a, swaps) for a in q["answers"]]}

    def pack_questions(self, corpus, images: list[int], questions: list[list[dict]],
                       flips: list[tuple[bool, bool]] | None = None,
                       turns: list[float] | None = None) -> dict:
        """Image ``images[k]`` (mirrored by ``flips[k]``, its hue turned by ``turns[k]``
        radians) with its ``questions[k]``: packed as blocks, or one question per sequence
        when ``questions_per_sequence`` is 0."""
        flips = flips or [(False, False)] * len(images)
        turns = turns or [0.0] * len(images)
        if self.cfg.questions_per_sequence == 0:
            samples = [[self._question(q), self._image(corpus, i, f, t)]
                       for i, f, t, qs in zip(images, flips, turns, questions) for q in qs]
            return {"packed": pack(samples)}
        return pack_blocks([self._image(corpus, i, f, t)
                            for i, f, t in zip(images, flips, turns)],
                           [[self._question(q) for q in qs] for qs in questions])

    def batch(self, corpus, idx: list[int], gen: torch.Generator) -> dict:
        k = self.cfg.questions_per_sequence
        images, questions, flips, turns = [], [], [], []
        for i in idx:
            qs = corpus.qa[i]
            if not qs:
                continue
            views = [(qs, 0.0)]
            if self.cfg.hue_jitter and torch.rand((), generator=gen) < self.cfg.hue_jitter:
                kept = self.hueless(qs)
                if kept:  # an image with only hue questions stays as it is
                    turn = float(torch.rand((), generator=gen)) * 2 * math.pi
                    rest = [q for q in qs if self.names_hue(q)] if self.cfg.hue_copy else []
                    views = [(kept, turn)] + ([(rest, 0.0)] if rest else [])
            for qs, turn in views:
                if k and len(qs) > k:
                    qs = [qs[j] for j in torch.randperm(len(qs), generator=gen)[:k].tolist()]
                flip = tuple(bool(p) and bool(torch.rand((), generator=gen) < p)
                             for p in (self.cfg.hflip, self.cfg.vflip))
                images.append(i)
                questions.append([self.mirror(q, flip) for q in qs])
                flips.append(flip)
                turns.append(turn)
        if not images:
            raise OmnimaskError("a VQA batch without questions: the sampled images have none")
        b = self.pack_questions(corpus, images, questions, flips, turns)
        b["target"] = torch.stack([self._target(q["answers"]) for qs in questions for q in qs])
        if self.cfg.debias_question:
            b["prior"] = torch.stack([self.question_bias(corpus, q)
                                      for qs in questions for q in qs])
        if self.cfg.ground_weight:
            if corpus is not self._grounded:  # checked once per training corpus
                if corpus.inst is None or not any("grounding" in q for qs in corpus.qa
                                                  for q in qs):
                    raise OmnimaskError("tasks.vqa.ground_weight: the training shards need "
                                        "instance masks (inst.png) and questions with "
                                        "\"grounding\" (ShapesWorld >= 1.1)")
                self._grounded = corpus
            b["ground"] = torch.cat([self.grounding(corpus, i, f, qs)
                                     for i, f, qs in zip(images, flips, questions)])
            b["ground_weight"] = self.cfg.ground_weight
        return b

    def question_bias(self, corpus, q: dict) -> torch.Tensor:
        """The question-only bias of ``q`` over the answers (``debias_question``): zero
        outside its type's answers and for a text training never asks."""
        if self._bias is None or self._bias[0] is not corpus:
            asked = [x for qs in corpus.qa for x in qs]
            flips = [f for f in ((True, False), (False, True), (True, True))
                     if (self.cfg.hflip or not f[0]) and (self.cfg.vflip or not f[1])]
            asked += [self.mirror(x, f) for f in flips for x in asked]  # as batch() asks
            self._bias = (corpus, question_bias_table(asked, self.index,
                                                      self.cfg.debias_question))
        row = self._bias[1].get(q["question"])
        return torch.zeros(len(self.answers)) if row is None else row

    def grounding(self, corpus, i: int, flip: tuple[bool, bool], questions: list[dict]
                  ) -> torch.Tensor:
        """[len(questions), glimpses, grid cells]: per question and role, the share of the
        role's instance pixels in each grid cell of image ``i`` (mirrored by ``flip``);
        zeros where a question has no such role or the role no pixels."""
        inst = mirrored(corpus.inst[i], flip).long()
        rows, cols = corpus.grid
        # each instance's pixels per grid cell, pooled once per image (instances are disjoint,
        # so a role's cells are the sum of its instances' rows)
        per_inst = torch.nn.functional.adaptive_avg_pool2d(
            torch.nn.functional.one_hot(inst, int(inst.max()) + 1).permute(2, 0, 1).float(),
            (rows, cols)).flatten(1)
        out = torch.zeros(len(questions), self.glimpses, rows * cols)
        for k, q in enumerate(questions):
            for g, ids in enumerate(q.get("grounding", [])[:self.glimpses]):
                ids = [j for j in ids if 0 <= j < len(per_inst)]
                cells = per_inst[ids].sum(0) if ids else out[k, g]
                if cells.sum() > 0:
                    out[k, g] = cells / cells.sum()
        return out

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model, corpus, images: list[int], questions: list[list[dict]]
                ) -> list[tuple[str, float]]:
        """(answer, probability) for every question, in order."""
        b = self.pack_questions(corpus, images, questions)
        probs = model.heads[self.name].scores(model(b, task=self.name)["logits"])
        score, best = probs.max(-1)
        return [(self.answers[int(j)], float(s)) for j, s in zip(best, score)]

    @torch.no_grad()
    def evaluate(self, model, corpus, limit: int | None = None,
                 examples: Path | None = None) -> dict:
        from ..metrics import vqa_report

        self.check(corpus, "evaluation data")
        preds, answers, types, shown = [], [], [], []
        idx = [i for i in first(corpus, limit) if corpus.qa[i]]
        with evaluating(model):
            for s in range(0, len(idx), self.cfg.eval_images):
                chunk = idx[s:s + self.cfg.eval_images]
                qs = [corpus.qa[i] for i in chunk]
                out = iter(self.predict(model, corpus, chunk, qs))
                for i, q in zip(chunk, qs):
                    for x in q:
                        pred = next(out)[0]
                        preds.append(pred)
                        answers.append(x["answers"])
                        types.append(x["type"])
                        if len(shown) < 12:
                            shown.append((i, x["question"], pred, x["answers"][0]))
        report = vqa_report(preds, answers, types)
        prior = vqa_report([self.priors.get(t, "") for t in types], answers, types)
        report["prior_baseline"] = prior["accuracy"]
        report["prior_per_type"] = prior["per_type"]
        if examples is not None:
            report_examples(corpus, shown, Path(examples) / "vqa_examples.png")
        return report


def question_bias_table(questions: list[dict], index: dict[str, int], pseudo: float
                        ) -> dict[str, torch.Tensor]:
    """{question text: log p(a | text) - log p(a | type)} over the answers of ``index``
    for the texts of ``questions``, each answer counted as the soft targets do; p(a | text)
    is the text's counts smoothed with ``pseudo`` counts of the type's distribution; answers
    the type never has get 0 (the head still learns which answers a type takes)."""
    by_type: dict[str, Counter] = {}
    by_text: dict[str, tuple[str, Counter]] = {}
    for q in questions:
        c = Counter()
        for a, n in Counter(normalized(a) for a in q["answers"]).items():
            if a in index:
                c[a] += soft_score(n, len(q["answers"]))
        by_type.setdefault(q["type"], Counter()).update(c)
        by_text.setdefault(q["question"], (q["type"], Counter()))[1].update(c)
    out = {}
    for text, (t, c) in by_text.items():
        prior = by_type[t]
        total, n = sum(prior.values()), sum(c.values())
        row = torch.zeros(len(index))
        for a, k in prior.items():
            p_type = k / total
            row[index[a]] = math.log((c[a] + pseudo * p_type) / (n + pseudo)) - math.log(p_type)
        out[text] = row
    return out


def report_examples(corpus, shown: list[tuple], path: Path) -> Path:
    """A grid of images with a question, the model's answer and the truth under each."""
    plt = pyplot()
    cols = 4
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, q, pred, truth) in zip(axes.flat, shown):
        ax.imshow(corpus.pixels[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        right = pred == truth
        # a long question wraps inside its column; green when right, red when wrong
        ax.set_title(f"{textwrap.fill(q, 34)}\nmodel: {pred} ({'right' if right else 'wrong'})"
                     f"\ntruth: {truth}", fontsize=10, color="#0a7d28" if right else "#b00020")
    fig.suptitle("VQA: questions, the model's answers and the truth", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_figure(fig, path, dpi=100)
