"""Evaluation metrics of the fine-tuned tasks: pure functions over predictions, no model code.

- VQA: ``normalize_answer``, ``vqa_accuracy`` and ``vqa_report``, the official VQA accuracy
  (GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``: its normalisation
  tables, the leave-one-out ``min(1, #matches/3)``) with per-type accuracy and the
  most-frequent-answer-per-type baseline.
- Retrieval: ``recall_at_k`` (Recall@K with UNITER's conventions, ``utils/itm_eval.py``; ties
  are broken against the model) and ``ceiling_r1`` (the best R@1 a gallery of duplicate
  captions allows).
- Captioning: ``caption_metrics``, BLEU-1..4, CIDEr-D and (where Java runs) METEOR through
  pycocoevalcap, tokenised as coco-caption does.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import subprocess
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from functools import lru_cache

import torch

from omnimask.errors import ConfigError, DataError, OmnimaskError

log = logging.getLogger("omnimask.metrics")

# --------------------------------------------------------------------------------------
# VQA accuracy
# --------------------------------------------------------------------------------------

# The official tables (vqaEval.py at GT-Vision-Lab/VQA master, after its "fixed the apostrophe
# symbol issue" commit: straight apostrophes). Keys with capitals ("Im", "Ive") never match
# after lower-casing, in the official code as here.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!")
# The official pattern, verbatim: "(?!<=\d)" is a lookahead that always holds (a lookbehind
# was meant), so every period not followed by a digit goes ("3.5" stays, "5." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    # as the official: a mark next to a space, or any text with a digit,digit comma ("3,000"),
    # loses the mark; otherwise it becomes a space ("black/white" -> "black white")
    drop = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if drop or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official passes re.UNICODE (32) where re.sub takes its count: at most 32 periods go
    return _PERIOD_STRIP.sub("", out, 32)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


@lru_cache(maxsize=1 << 16)  # answers repeat a lot ("yes", "2"): VQA v2 val has 2M
def normalize_answer(s: str) -> str:
    """The official VQA answer normalisation: newlines and tabs to spaces, punctuation rules,
    lower case, number words to digits, articles dropped, contractions restored."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the human answers of its question.

    Several answers (VQA v2 has ten): the mean, over the subsets that leave one human answer
    out, of ``min(1, #matches/3)`` (three matching humans give 0.9, four or more 1.0). One
    answer (ShapesWorld): exact match. The prediction and every answer are normalised; the
    official script skips that when all humans agree (its annotations are stored normalised),
    which would make a raw answer such as "Two" miss the prediction "2".
    """
    if isinstance(answers, str) or not answers:
        raise DataError(f"vqa_accuracy: expected a non-empty list of answers, got {answers!r}")
    p = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    n = len(gts)
    if n == 1:
        return float(p == gts[0])
    m = sum(g == p for g in gts)
    # leaving out a matching answer leaves m - 1 matches among the others, any other one m;
    # integer sums keep 27/30 exactly 0.9
    return (m * min(3, m - 1) + (n - m) * min(3, m)) / (3 * n)


def _most_frequent(counts: Counter) -> str:
    # ties go to the alphabetically first answer, so the baseline is deterministic
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def vqa_report(preds: Sequence[str], answers_list: Sequence[Sequence[str]],
               types: Sequence[Hashable],
               train_answers_by_type: Mapping[Hashable, Iterable[str]] | None = None) -> dict:
    """VQA accuracy overall and per question type, and the prior baseline.

    The prior baseline answers every question with the most frequent (normalised) answer of
    its type: counted over ``train_answers_by_type`` (type -> every training answer of that
    type; a type it lacks gets the most frequent answer of all types), or, when that is None,
    over the evaluated questions' own answers, an optimistic prior that has seen the test
    answers. Returns ``{"accuracy", "per_type": {type: acc}, "prior_baseline",
    "prior_per_type": {type: acc}}``, accuracies in [0, 1].
    """
    if not len(preds) == len(answers_list) == len(types):
        raise DataError(f"vqa_report: {len(preds)} predictions, {len(answers_list)} answer "
                        f"lists and {len(types)} types; they must have the same length")
    if not preds:
        raise DataError("vqa_report: no questions to score")
    if train_answers_by_type is None:
        source = "the evaluated answers"
        pool: dict[Hashable, list[str]] = defaultdict(list)
        for t, ans in zip(types, answers_list, strict=True):
            pool[t].extend(ans)
    else:
        source = "train_answers_by_type"
        pool = dict(train_answers_by_type)
    counts: dict[Hashable, Counter] = {}
    for t, ans in pool.items():
        if isinstance(ans, str):
            raise DataError(f"vqa_report: {source}[{t!r}] is one string, not a list of answers")
        c = Counter(normalize_answer(a) for a in ans)
        if c:
            counts[t] = c
    if not counts:
        raise DataError(f"vqa_report: {source} holds no answers for the prior baseline")
    overall = _most_frequent(sum(counts.values(), Counter()))
    prior = {t: _most_frequent(c) for t, c in counts.items()}

    acc: dict[Hashable, list[float]] = defaultdict(list)
    base: dict[Hashable, list[float]] = defaultdict(list)
    for p, ans, t in zip(preds, answers_list, types, strict=True):
        acc[t].append(vqa_accuracy(p, ans))
        base[t].append(vqa_accuracy(prior.get(t, overall), ans))
    n = len(preds)

    def per_type(d: dict) -> dict:
        return {t: sum(v) / len(v) for t, v in sorted(d.items(), key=lambda kv: str(kv[0]))}

    return {"accuracy": sum(sum(v) for v in acc.values()) / n, "per_type": per_type(acc),
            "prior_baseline": sum(sum(v) for v in base.values()) / n,
            "prior_per_type": per_type(base)}


# --------------------------------------------------------------------------------------
# Retrieval recall
# --------------------------------------------------------------------------------------

def _check_scores(scores, text_to_image) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(scores)
    if s.ndim != 2 or s.numel() == 0:
        raise DataError(f"recall_at_k: scores must be a non-empty [texts, images] matrix, "
                        f"got shape {tuple(s.shape)}")
    if not s.is_floating_point():
        s = s.double()
    if torch.isnan(s).any():
        raise DataError("recall_at_k: the score matrix holds NaN")
    tt = torch.as_tensor(text_to_image, device=s.device)
    if tt.ndim != 1 or len(tt) != s.shape[0] or tt.is_floating_point():
        raise DataError(f"recall_at_k: text_to_image must be {s.shape[0]} image indices (one "
                        f"per row of scores), got shape {tuple(tt.shape)} {tt.dtype}")
    tt = tt.long()
    if len(tt) and (tt.min() < 0 or tt.max() >= s.shape[1]):
        raise DataError(f"recall_at_k: text_to_image holds an image index outside "
                        f"[0, {s.shape[1]})")
    return s, tt


def recall_at_k(scores, text_to_image, ks: Sequence[int] = (1, 5, 10), prefix: str = "t",
                i2t: bool = True, chunk: int = 1024) -> dict[str, float]:
    """Recall@K both ways from ``scores[texts, images]`` (higher = more alike).

    ``text_to_image[t]``: the image of text ``t`` (an image may have several texts).
    ``{prefix}2i_r{k}``: the fraction of texts whose image ranks in the top ``k`` of all
    images; ``i2{prefix}_r{k}`` (with ``i2t``): the fraction of images (those with a text)
    whose best-ranked text is in the top ``k`` of all texts, as UNITER's ``itm_eval``. Ties
    go against the model: an item tied with the true one ranks before it (a constant matrix
    gives R@1 = 0 unless the gallery has one item); texts of the same image do not count
    against each other. ``prefix="s"`` names spoken queries ``s2i_r1...``. Works in row
    blocks of ``chunk`` on the scores' device.
    """
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ConfigError(f"recall_at_k: ks must be positive integers, got {tuple(ks)}")
    if chunk < 1:
        raise ConfigError(f"recall_at_k: chunk must be at least 1, got {chunk}")
    ks = [int(k) for k in ks]
    s, tt = _check_scores(scores, text_to_image)
    n_txt, n_img = s.shape
    true = s.gather(1, tt[:, None]).squeeze(1)  # each text's score with its own image
    # text -> image: rank = images scoring >= the true one (itself included)
    rank = torch.cat([(s[a:a + chunk] >= true[a:a + chunk, None]).sum(1)
                      for a in range(0, n_txt, chunk)])
    out = {f"{prefix}2i_r{k}": (rank <= k).double().mean().item() for k in ks}
    if i2t:
        # image -> text: the best true text of each image, then the other images' texts
        # scoring >= it; the image's own texts tied with its best are not counted
        best = torch.full((n_img,), float("-inf"), dtype=s.dtype, device=s.device)
        best = best.scatter_reduce(0, tt, true, "amax")
        own_at_best = torch.zeros(n_img, dtype=torch.long, device=s.device)
        own_at_best.scatter_add_(0, tt, (true == best[tt]).long())
        imgs = torch.unique(tt)
        ge = torch.cat([(s[:, imgs[a:a + chunk]] >= best[imgs[a:a + chunk]]).sum(0)
                        for a in range(0, len(imgs), chunk)])
        irank = 1 + ge - own_at_best[imgs]
        out.update({f"i2{prefix}_r{k}": (irank <= k).double().mean().item() for k in ks})
    return out


def _caption_key(s: str) -> str:
    return " ".join(s.lower().split())


def ceiling_r1(query_texts: Sequence[str], text_to_image: Sequence[int],
               normalize: Callable[[str], str] | None = _caption_key) -> float:
    """The best expected text -> image R@1 when one caption string describes several images.

    A query whose string (after ``normalize``: lower case, whitespace collapsed; None: the
    exact string) is also a query of ``m`` distinct images cannot tell them apart, so it is
    right in 1/m of cases at best: the mean of 1/m over the queries.
    """
    tt = [int(i) for i in torch.as_tensor(text_to_image).reshape(-1).tolist()]
    if len(tt) != len(query_texts) or not tt:
        raise DataError(f"ceiling_r1: {len(query_texts)} queries and {len(tt)} image indices; "
                        f"they must be as many, and not none")
    keys = [normalize(q) if normalize else q for q in query_texts]
    images: dict[str, set[int]] = defaultdict(set)
    for k, i in zip(keys, tt, strict=True):
        images[k].add(i)
    return sum(1 / len(images[k]) for k in keys) / len(keys)


# --------------------------------------------------------------------------------------
# Caption metrics
# --------------------------------------------------------------------------------------

_SIMPLE_PUNCT = re.compile(r"[^\w\s]|_")


def _java() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(s: str) -> str:
    """The tokenizer without Java: lower case, every punctuation mark a space. It equals
    coco-caption's PTB tokenisation on plain word captions (ShapesWorld's); PTB would split
    "isn't" into "is n't" where this gives "isn t"."""
    return " ".join(_SIMPLE_PUNCT.sub(" ", s.lower()).split())


def _ptb_tokenize(lines: list[str], timeout: float) -> list[str]:
    """coco-caption's tokenisation (pycocoevalcap's PTBTokenizer: Stanford PTBTokenizer
    lower-cased, punctuation tokens dropped), fed on stdin: pycocoevalcap's own wrapper
    writes a temporary file into its package directory and has no timeout."""
    from importlib.resources import as_file, files

    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    with as_file(files("pycocoevalcap.tokenizer") / ptb.STANFORD_CORENLP_3_4_1_JAR) as jar:
        return _ptb_run(str(jar), lines, timeout)


def _ptb_run(jar: str, lines: list[str], timeout: float) -> list[str]:
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    # one caption a line: every kind of line break inside a caption becomes a space
    text = "".join(" ".join(s.split()) + "\n" for s in lines)
    r = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                        "-preserveLines", "-lowerCase"], input=text.encode(),
                       capture_output=True, timeout=timeout, check=True)
    out = r.stdout.decode().split("\n")[:len(lines) + 1]
    if len(out) != len(lines) + 1 or out[-1] != "":
        raise RuntimeError(f"PTBTokenizer returned {len(out) - 1} lines for {len(lines)}")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in ptb.PUNCTUATIONS)
            for line in out[:-1]]


# pid -> its METEOR process, kept between evaluations (the JVM's start and paraphrase table
# take ~10-20 s; it holds up to 2 GB until the process ends)
_METEOR: dict = {}


def _close_meteor(m) -> None:
    p = m.meteor_p
    p.kill()  # also ends a read a worker is blocked in
    p.wait()
    for f in (p.stdin, p.stdout, p.stderr):
        with contextlib.suppress(OSError):
            f.close()
    # Meteor.__del__ takes this lock, which a failed compute_score leaves held: a fresh one
    # keeps the garbage collector from blocking on it
    m.lock = threading.Lock()


@atexit.register
def _close_meteors() -> None:
    m = _METEOR.pop(os.getpid(), None)
    if m is not None:
        _close_meteor(m)


def _meteor(gts: dict, res: dict, timeout: float) -> float | None:
    """pycocoevalcap's METEOR (a Java subprocess, started once per process and kept),
    given at most ``timeout`` seconds; on any failure the process is killed, and the caller
    gets None and a warning."""
    from pycocoevalcap.meteor import meteor as pm

    m = _METEOR.pop(os.getpid(), None)
    if m is not None and m.meteor_p.poll() is not None:  # it died since: reap it
        _close_meteor(m)
        m = None
    if m is None:
        try:
            m = pm.Meteor()
        except OSError as e:
            log.warning("METEOR left out: cannot start java (%s)", e)
            return None
    box: dict = {}

    def work() -> None:
        try:
            box["score"] = float(m.compute_score(gts, res)[0])
        except Exception as e:  # noqa: BLE001 - any failure only drops the key
            box["error"] = e

    th = threading.Thread(target=work, name="meteor", daemon=True)
    th.start()
    th.join(timeout)
    if "score" in box:
        _METEOR[os.getpid()] = m
        return box["score"]
    _close_meteor(m)
    th.join(10)
    why = box.get("error") or f"no answer within {timeout:g} s"
    log.warning("METEOR left out: %s", why)
    return None


def caption_metrics(predictions: Mapping[Hashable, str],
                    references: Mapping[Hashable, Sequence[str]], *, meteor: bool = True,
                    tokenizer: str = "auto", timeout: float = 300.0) -> dict[str, float]:
    """coco-caption's scores of one generated caption per id against that id's references.

    Returns ``bleu1``..``bleu4`` (corpus BLEU, the "closest" reference length), ``cider``
    (pycocoevalcap's Cider, which is CIDEr-D: idf over the scored ids' references, clipped
    counts, Gaussian length penalty sigma 6, times 10) and ``meteor`` when Java is on PATH,
    ``meteor`` is set and METEOR runs within ``timeout`` seconds (otherwise the key is absent
    and a warning logged). Only the ids of ``predictions`` are scored (references of other
    ids are ignored). ``tokenizer``: ``"ptb"`` (coco-caption's, needs Java), ``"simple"``
    (``simple_tokenize``) or ``"auto"`` (PTB when Java is present, else simple).
    """
    if tokenizer not in ("auto", "ptb", "simple"):
        raise ConfigError(f"caption_metrics: tokenizer must be auto, ptb or simple, "
                          f"got {tokenizer!r}")
    ids = list(predictions)
    if not ids:
        raise DataError("caption_metrics: no predictions to score")
    for i in ids:
        refs = references.get(i)
        if isinstance(refs, str) or not refs:
            raise DataError(f"caption_metrics: id {i!r} has no list of reference captions")
        if not isinstance(predictions[i], str) or not all(isinstance(r, str) for r in refs):
            raise DataError(f"caption_metrics: id {i!r}: captions must be strings")
    java = _java()
    if tokenizer == "ptb" and not java:
        raise ConfigError("caption_metrics: tokenizer ptb needs java on PATH")
    lines = [predictions[i] for i in ids] + [r for i in ids for r in references[i]]
    toks = None
    if tokenizer == "ptb" or (tokenizer == "auto" and java):
        try:
            toks = _ptb_tokenize(lines, timeout)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            if tokenizer == "ptb":
                raise OmnimaskError(f"caption_metrics: PTBTokenizer failed: {e}") from e
            log.warning("PTBTokenizer failed (%s): captions tokenised by simple_tokenize", e)
    if toks is None:
        toks = [simple_tokenize(s) for s in lines]
    res = {i: [toks[k]] for k, i in enumerate(ids)}
    gts, k = {}, len(ids)
    for i in ids:
        gts[i] = toks[k:k + len(references[i])]
        k += len(references[i])

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["cider"] = float(cider)
    if meteor and java:
        score = _meteor(gts, res, timeout)
        if score is not None:
            out["meteor"] = score
    return out
