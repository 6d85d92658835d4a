"""Task metrics (train/metrics.py) against hand-computed cases and published numbers."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from omnimask.errors import OmnimaskError
from omnimask.train import metrics
from omnimask.train.metrics import (
    caption_metrics,
    ceiling_r1,
    normalize_answer,
    recall_at_k,
    simple_tokenize,
    vqa_accuracy,
    vqa_report,
)

JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not JAVA, reason="java is not on PATH")


# ---------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("none", "0"), ("TEN", "10"),            # number words (manualMap)
    ("the dog.", "dog"), ("An apple", "apple"),           # articles; a final period goes
    ("isnt", "isn't"), ("whats that", "what's that"),     # contractions table
    ("3.5", "3.5"), ("5.", "5"),                          # a period before a digit stays
    ("3,000", "3000"),                                    # digit,digit: the mark is deleted
    ("yes, it is", "yes it is"),                          # a mark beside a space is deleted
    ("black/white", "black white"), ("t-shirt", "t shirt"),  # elsewhere it becomes a space
    (" \tRed\n", "red"),                                  # tabs, newlines, case
])
def test_normalize_answer_follows_the_official_tables(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_leave_one_out():
    # n = 10 humans, m of them give the prediction. Leaving out one of the m matching answers
    # leaves m-1 matches, leaving out one of the 10-m others leaves m; each subset scores
    # min(1, matches/3), the accuracy is their mean:
    #   m=3: (3 * 2/3 + 7 * 1) / 10 = 9/10         m=2: (2 * 1/3 + 8 * 2/3) / 10 = 6/10
    #   m=4: (4 * 1 + 6 * 1) / 10 = 1              m=1: (1 * 0 + 9 * 1/3) / 10 = 3/10
    def answers(m):
        return ["two"] * m + ["three"] * (10 - m)
    assert vqa_accuracy("2", answers(3)) == 0.9
    assert vqa_accuracy("2", answers(2)) == 0.6
    assert vqa_accuracy("2", answers(4)) == 1.0
    assert vqa_accuracy("2", answers(10)) == 1.0
    assert vqa_accuracy("2", answers(1)) == pytest.approx(0.3)
    assert vqa_accuracy("2", answers(0)) == 0.0


def test_vqa_accuracy_single_answer_is_normalised_exact_match():
    assert vqa_accuracy("Red.", ["red"]) == 1.0
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert vqa_accuracy("the square", ["square"]) == 1.0
    assert vqa_accuracy("red", ["blue"]) == 0.0
    with pytest.raises(OmnimaskError, match="non-empty list"):
        vqa_accuracy("red", [])
    with pytest.raises(OmnimaskError, match="non-empty list"):
        vqa_accuracy("red", "red")  # a string is not a list of answers


def test_vqa_report_per_type_and_prior_baseline():
    preds = ["red", "blue", "2", "square", "circle"]
    answers = [["red"], ["red"], ["two"], ["square"], ["square"]]
    types = ["color", "color", "count", "shape", "shape"]
    r = vqa_report(preds, answers, types)
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["per_type"] == {"color": 0.5, "count": 1.0, "shape": 0.5}
    # prior from the evaluated answers: color -> "red", count -> "2", shape -> "square"
    assert r["prior_per_type"] == {"color": 1.0, "count": 1.0, "shape": 1.0}
    assert r["prior_baseline"] == 1.0

    # prior from training answers: color -> "blue" (3 vs 2), count -> "3"; shape is missing
    # there, so it gets the most frequent answer of all types ("blue")
    train = {"color": ["blue", "Blue", "the blue", "red", "red"], "count": ["three", "2", "3"]}
    r = vqa_report(preds, answers, types, train_answers_by_type=train)
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["prior_per_type"] == {"color": 0.0, "count": 0.0, "shape": 0.0}
    assert r["prior_baseline"] == 0.0
    # ties between answers go to the alphabetically first one: "green" over "red"
    r = vqa_report(["x"], [["green"]], ["color"], {"color": ["red", "green"]})
    assert r["prior_baseline"] == 1.0


def test_vqa_report_rejects_bad_input():
    with pytest.raises(OmnimaskError, match="same length"):
        vqa_report(["red"], [["red"], ["blue"]], ["color"])
    with pytest.raises(OmnimaskError, match="no questions"):
        vqa_report([], [], [])
    with pytest.raises(OmnimaskError, match="one string"):
        vqa_report(["red"], [["red"]], ["color"], {"color": "red"})


# ---------------------------------------------------------------------------- retrieval


def test_recall_on_a_hand_made_matrix():
    # rows = texts, columns = images; text t describes image t
    s = torch.tensor([[0.9, 0.8, 0.7],
                      [0.1, 0.2, 0.3],
                      [0.4, 0.5, 0.6]])
    r = recall_at_k(s, [0, 1, 2], ks=(1, 2, 3))
    # text ranks: t0 0.9 first; t1 0.2 < 0.3 second; t2 0.6 first -> [1, 2, 1]
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == pytest.approx((2 / 3, 1, 1))
    # image ranks over the columns: i0 0.9 first; i1 0.2 < 0.8, 0.5 third; i2 0.6 < 0.7
    # second -> [1, 3, 2]
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == pytest.approx((1 / 3, 2 / 3, 1))
    assert set(r) == {f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 2, 3)}


def test_recall_ties_go_against_the_model():
    const = torch.ones(4, 4)
    r = recall_at_k(const, [0, 1, 2, 3], ks=(1, 3, 4))
    assert r == {"t2i_r1": 0.0, "t2i_r3": 0.0, "t2i_r4": 1.0,
                 "i2t_r1": 0.0, "i2t_r3": 0.0, "i2t_r4": 1.0}
    # a one-image gallery cannot be wrong
    assert recall_at_k(torch.tensor([[5.0]]), [0], ks=(1,)) == {"t2i_r1": 1.0, "i2t_r1": 1.0}
    # the true image tied with one other at the top ranks second
    s = torch.tensor([[0.5, 0.5, 0.1],
                      [0.0, 0.9, 0.2],
                      [0.0, 0.1, 0.8]])
    r = recall_at_k(s, [0, 1, 2], ks=(1, 2))
    assert (r["t2i_r1"], r["t2i_r2"]) == pytest.approx((2 / 3, 1.0))


def test_recall_several_captions_per_image():
    # texts 0, 1 describe image 0; texts 2, 3 image 1
    s = torch.tensor([[0.2, 0.8],
                      [0.9, 0.85],
                      [0.95, 0.6],
                      [0.1, 0.1]])
    r = recall_at_k(s, [0, 0, 1, 1], ks=(1, 2, 3))
    # image 0: its best text t1 (0.9) is beaten by t2 (0.95): rank 2. image 1: its best text
    # t2 (0.6) is beaten by t0 (0.8) and t1 (0.85): rank 3 (t3 at 0.1 does not help)
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == (0.0, 0.5, 1.0)
    # texts: t0 0.2 < 0.8 -> 2; t1 -> 1; t2 0.6 < 0.95 -> 2; t3 0.1 = 0.1 tie -> 2
    assert (r["t2i_r1"], r["t2i_r2"]) == (0.25, 1.0)
    # two texts of one image tied at the top do not push each other down
    s = torch.tensor([[0.9, 0.0], [0.9, 0.0], [0.1, 0.5]])
    r = recall_at_k(s, [0, 0, 1], ks=(1,))
    assert r["i2t_r1"] == 1.0
    # an image without texts is not counted
    r = recall_at_k(torch.tensor([[0.9, 0.0, 0.0]]), [0], ks=(1,))
    assert r == {"t2i_r1": 1.0, "i2t_r1": 1.0}


def test_recall_matches_a_sorting_reference_and_names_spoken_queries():
    g = torch.Generator().manual_seed(0)
    n_txt, n_img = 50, 20
    s = torch.randn(n_txt, n_img, generator=g)  # no ties
    tt = torch.randint(0, n_img, (n_txt,), generator=g)
    ks = (1, 5, 10)
    t_rank = [int((s[t].argsort(descending=True) == tt[t]).nonzero()) + 1 for t in range(n_txt)]
    i_rank = []
    for i in tt.unique().tolist():
        order = s[:, i].argsort(descending=True).tolist()
        i_rank.append(min(order.index(t) for t in range(n_txt) if tt[t] == i) + 1)
    want = {f"t2i_r{k}": sum(r <= k for r in t_rank) / n_txt for k in ks}
    want |= {f"i2t_r{k}": sum(r <= k for r in i_rank) / len(i_rank) for k in ks}
    assert recall_at_k(s, tt, ks, chunk=7) == pytest.approx(want)
    spoken = recall_at_k(s, tt, ks, prefix="s", i2t=False)
    assert spoken == pytest.approx({f"s2i_r{k}": want[f"t2i_r{k}"] for k in ks})


def test_recall_rejects_bad_input():
    s = torch.zeros(3, 2)
    with pytest.raises(OmnimaskError, match="3 image indices"):
        recall_at_k(s, [0, 1])
    with pytest.raises(OmnimaskError, match="outside"):
        recall_at_k(s, [0, 1, 2])
    with pytest.raises(OmnimaskError, match="NaN"):
        recall_at_k(torch.tensor([[float("nan"), 0.0]]), [0])
    with pytest.raises(OmnimaskError, match="positive integers"):
        recall_at_k(s, [0, 1, 1], ks=(0,))


def test_ceiling_r1_with_duplicate_captions():
    texts = ["a red square", "A red  square", "a blue circle", "a blue circle"]
    # "a red square" describes images 0 and 1 (m = 2): each of its queries is right at best
    # half the time; "a blue circle" twice describes image 2 only (m = 1)
    assert ceiling_r1(texts, [0, 1, 2, 2]) == (0.5 + 0.5 + 1 + 1) / 4
    assert ceiling_r1(texts, [0, 1, 2, 2], normalize=None) == 1.0  # exact strings differ
    assert ceiling_r1(["x", "x", "x"], [0, 1, 2]) == pytest.approx(1 / 3)
    with pytest.raises(OmnimaskError, match="as many"):
        ceiling_r1(["x"], [0, 1])


# ---------------------------------------------------------------------------- captions

# Hand computation (two images, one reference each; every n-gram of the references occurs in
# one image's references, so idf = log 2 - log 1 for all, and unseen n-grams get df 1 too):
#   image 1: "red square" vs "red square": unigram and bigram cosines 1, no 3- or 4-grams:
#            mean(1, 1, 0, 0) * 10 = 5.0 (CIDEr-D averages n = 1..4, so two words give 5)
#   image 2: "red circle" vs "blue circle": unigrams: only "circle" is shared, clipped
#            min(L, L) * L / (sqrt(2) L * sqrt(2) L) = 1/2; bigrams 0: mean(0.5, 0, 0, 0) * 10
#   CIDEr-D = (5 + 1.25) / 2 = 3.125
#   BLEU over the corpus: unigrams 3 of 4 right, bigrams 1 of 2, lengths equal (no penalty):
#   BLEU-1 = 0.75, BLEU-2 = sqrt(0.75 * 0.5)
HAND_PRED = {1: "Red square.", 2: "red circle"}
HAND_REFS = {1: ["red square"], 2: ["Blue circle!"]}


@pytest.mark.parametrize("tok", ["simple", pytest.param("ptb", marks=needs_java)])
def test_caption_metrics_hand_example(tok):
    m = caption_metrics(HAND_PRED, HAND_REFS, meteor=False, tokenizer=tok)
    assert m["cider"] == pytest.approx(3.125)
    assert m["bleu1"] == pytest.approx(0.75)
    assert m["bleu2"] == pytest.approx(0.375 ** 0.5)
    assert set(m) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}


# No published example with its references: coco-caption's own (cocoEvalCapDemo.ipynb:
# CIDEr 0.600, Bleu_4 0.191 on results/captions_val2014_fakecap_results.json) scores against
# annotations/captions_val2014.json, which neither tylin/coco-caption nor pycocoevalcap ships
# (a 32 MB COCO download). The published example used here is Maluuba/nlg-eval's README
# (examples/hyp.txt, ref1.txt, ref2.txt; asserted to 5 places in its
# nlgeval/tests/test_nlgeval.py), scored by verbatim copies of coco-caption's Bleu, Cider
# and Meteor 1.5 on whitespace tokens; its lower-case, punctuation-free sentences are
# unchanged by PTB tokenisation.
NLG_HYP = {1: "this is the model generated sentence1 which seems good enough",
           2: "this is sentence2 which has been generated by your model"}
NLG_REFS = {1: ["this is one reference sentence for sentence1",
                "this is one more reference sentence for sentence1"],
            2: ["this is a reference sentence for sentence2 which was generated by your model",
                "this is the second reference sentence for sentence2"]}
NLG_PUBLISHED = {"bleu1": 0.55, "bleu2": 0.428174, "bleu3": 0.284043, "bleu4": 0.201143,
                 "cider": 1.242192, "meteor": 0.295797}


def test_caption_metrics_reproduce_the_published_example():
    m = caption_metrics(NLG_HYP, NLG_REFS, meteor=False)
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider"):
        assert m[k] == pytest.approx(NLG_PUBLISHED[k], abs=5e-4), k
    # nlg-eval's single-sentence case: one image, so every idf (log 1 - log df) is 0
    one = caption_metrics({0: "this is a good test"},
                          {0: ["this is a test", "this is also a test"]}, meteor=False)
    assert one["cider"] == 0.0
    assert (one["bleu1"], one["bleu2"], one["bleu3"], one["bleu4"]) == pytest.approx(
        (0.8, 0.632455, 0.5108729, 0.0000903602), abs=5e-6)  # its 5 places


@pytest.mark.slow  # METEOR's JVM loads its paraphrase table: ~10 s of CPU
@needs_java
def test_meteor_reproduces_the_published_example():
    m = caption_metrics(NLG_HYP, NLG_REFS, meteor=True)
    assert m["meteor"] == pytest.approx(NLG_PUBLISHED["meteor"], abs=5e-4)
    assert m["cider"] == pytest.approx(NLG_PUBLISHED["cider"], abs=5e-4)
    kept = metrics._METEOR[os.getpid()]  # the JVM stays for the next evaluation
    assert caption_metrics(NLG_HYP, NLG_REFS, meteor=True) == m
    assert metrics._METEOR[os.getpid()] is kept and kept.meteor_p.poll() is None
    kept.meteor_p.kill()  # a kept process that died is replaced
    kept.meteor_p.wait()
    assert caption_metrics(NLG_HYP, NLG_REFS, meteor=True) == m
    assert metrics._METEOR[os.getpid()] is not kept


@needs_java
def test_caption_metrics_equal_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    pred = {"a": "A small red square, left of a blue circle.", "b": "Two green crosses!",
            "c": "a yellow triangle isn't there"}
    refs = {"a": ["A red square left of the blue circle.", "a small red square"],
            "b": ["two green crosses", "Green crosses (two) above a star"],
            "c": ["There's a yellow\ntriangle.", "a yellow triangle"]}
    tok = PTBTokenizer()  # coco-caption's own pipeline
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in pred.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    m = caption_metrics(pred, refs, meteor=False, tokenizer="ptb")
    assert m == pytest.approx({**{f"bleu{n + 1}": b for n, b in enumerate(bleu)},
                               "cider": cider}, abs=1e-12)


def test_without_java_captions_use_the_simple_tokenizer_and_no_meteor(monkeypatch):
    assert simple_tokenize("A Dog, running.  (Fast)") == "a dog running fast"
    monkeypatch.setattr(metrics, "_java", lambda: False)
    m = caption_metrics({1: "A red square."}, {1: ["a red square"]})
    assert "meteor" not in m and m["bleu1"] == pytest.approx(1.0)
    with pytest.raises(OmnimaskError, match="needs java"):
        caption_metrics({1: "x"}, {1: ["x"]}, tokenizer="ptb")


def test_caption_metrics_reject_bad_input():
    with pytest.raises(OmnimaskError, match="no predictions"):
        caption_metrics({}, {})
    with pytest.raises(OmnimaskError, match="id 2"):
        caption_metrics({1: "x", 2: "y"}, {1: ["x"]}, meteor=False)
    with pytest.raises(OmnimaskError, match="id 1"):
        caption_metrics({1: "x"}, {1: "x"}, meteor=False)  # one string, not a list
    with pytest.raises(OmnimaskError, match="tokenizer"):
        caption_metrics({1: "x"}, {1: ["x"]}, tokenizer="nltk")


class _HangingMeteor:
    """Stands in for pycocoevalcap's Meteor: its subprocess never answers."""

    def __init__(self):
        self.meteor_p = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lock = threading.Lock()
        _HangingMeteor.last = self

    def compute_score(self, gts, res):
        self.lock.acquire()  # left held, as pycocoevalcap's does when a read fails
        return float(self.meteor_p.stdout.readline())  # blocks until the process dies


def test_meteor_that_hangs_is_killed_and_left_out(monkeypatch, caplog):
    from pycocoevalcap.meteor import meteor as pm

    monkeypatch.setattr(metrics, "_java", lambda: True)
    monkeypatch.setattr(pm, "Meteor", _HangingMeteor)
    monkeypatch.setattr(metrics, "_METEOR", {})  # no process kept from an earlier test
    t = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="omnimask.metrics"):
        m = caption_metrics({1: "a red square"}, {1: ["a red square"]},
                            tokenizer="simple", timeout=0.5)
    assert time.monotonic() - t < 10
    assert "meteor" not in m and m["bleu1"] == pytest.approx(1.0)
    assert "METEOR left out" in caplog.text
    p = _HangingMeteor.last.meteor_p
    assert p.returncode is not None  # killed and reaped
    assert _HangingMeteor.last.lock.acquire(timeout=1)  # the garbage collector cannot block
    assert not metrics._METEOR  # not kept
