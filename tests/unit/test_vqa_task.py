"""VQA: packed questions (blocks mask), soft targets, the head's loss, learning, evaluation."""

from __future__ import annotations

import pytest
import torch

import omnimask
from omnimask.train.corpus import build_corpus
from omnimask.train.data.shards import expand_shards
from omnimask.train.tasks.base import TaskContext
from omnimask.train.tasks.vqa import VQA, VQAConfig, soft_score

from .test_objectives import fit_fixed_batch


@pytest.fixture(scope="module")
def setup(tiny_model_dir, shapes_dir):
    model = omnimask.load(tiny_model_dir)
    toks = model.tokenizers
    corpus = build_corpus(expand_shards([str(shapes_dir / "train-*.tar")]), toks["text"],
                          toks["image"], None, progress=False)
    ctx = TaskContext(vocab=model.vocab, text=toks["text"], pixels=True)
    task = VQA(ctx, VQAConfig(questions_per_sequence=3))
    head = task.head_config(corpus)
    model = omnimask.load(tiny_model_dir, heads={"vqa": head})
    task.bind(model)
    return model, corpus, task, head


def test_soft_scores_follow_annotator_agreement():
    assert soft_score(1, 1) == 1.0
    assert [soft_score(c, 10) for c in (0, 1, 2, 3, 4)] == pytest.approx([0, .3, .6, .9, 1])


def test_answer_list_and_priors_come_from_training_data(setup):
    _, corpus, _, head = setup
    counts = {}
    for qs in corpus.qa:
        for q in qs:
            counts[q["answers"][0]] = counts.get(q["answers"][0], 0) + 1
    assert set(head["answers"]) == set(counts)
    assert counts[head["answers"][0]] == max(counts.values())  # most frequent first
    types = {q["type"] for qs in corpus.qa for q in qs}
    assert set(head["priors"]) == types


def test_packed_questions_equal_each_question_alone(setup):
    """Blocks: a question's prediction does not depend on the other questions packed with
    it, and equals encoding [image + that question] as its own sequence."""
    model, corpus, task, _ = setup
    model.eval()
    qs = corpus.qa[0][:3]
    packed = model(task.pack_questions(corpus, [0], [qs]), task="vqa")["logits"]
    for k, q in enumerate(qs):
        alone = model(task.pack_questions(corpus, [0], [[q]]), task="vqa")["logits"]
        torch.testing.assert_close(packed[k], alone[0], atol=1e-5, rtol=1e-5)
    # one question per sequence ([cls + q][image]) is another input layout: it runs too
    task.cfg.questions_per_sequence = 0
    try:
        single = model(task.pack_questions(corpus, [0], [qs]), task="vqa")["logits"]
    finally:
        task.cfg.questions_per_sequence = 3
    assert single.shape == packed.shape


def test_vqa_loss_falls_on_a_fixed_batch(setup):
    model, corpus, task, _ = setup
    model.train()
    g = torch.Generator().manual_seed(0)
    b = task.batch(corpus, list(range(12)), g)
    assert b["target"].shape[0] == len(b["cls"]) and b["target"].sum(1).max() == 1
    first = fit_fixed_batch(lambda: task.loss(model, b), model, "vqa", steps=30, lr=3e-3)
    assert float(task.loss(model, b)["vqa"]) < 0.5 * first


def test_softmax_loss_is_cross_entropy_to_the_normalised_scores():
    from omnimask.heads.vqa import VQAHead, VQAHeadConfig
    from omnimask.model import ModelConfig

    head = VQAHead(ModelConfig(), VQAHeadConfig(num_answers=4, loss="softmax"))
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 0.0, 3.0]])
    target = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.3, 0.0, 0.0, 0.9]])
    head.logits = lambda encoder, batch: logits  # the loss alone, on fixed logits
    out = head(None, {"target": target, "packed": type("P", (), {"num_tokens": 1})()})
    want = (-torch.log_softmax(logits[0], 0)[1]
            - 0.25 * torch.log_softmax(logits[1], 0)[0]
            - 0.75 * torch.log_softmax(logits[1], 0)[3]) / 2
    torch.testing.assert_close(out["loss"], want)
    torch.testing.assert_close(head.scores(logits).sum(-1), torch.ones(2))
    assert VQAHead(ModelConfig(), VQAHeadConfig(num_answers=4)).scores(logits)[1, 3] == (
        torch.sigmoid(torch.tensor(3.0)))
    with pytest.raises(ValueError, match="heads.vqa.loss must be bce or softmax"):
        VQAHeadConfig(loss="hinge")
