"""finetune -> RUN/model -> eval -> Python API, end to end on a tiny model, per task."""

from __future__ import annotations

import json

import pytest
import torch

import omnimask
from omnimask.cli import main
from omnimask.config import load_config
from omnimask.errors import ConfigError, OmnimaskError
from omnimask.train.finetune import FinetuneConfig, Finetuning


def _finetune(tiny_model_dir, shapes_dir, out, task: str, tensorboard: bool = False, **kw):
    cfg = load_config(FinetuneConfig, None, **{
        "out": str(out), "task": task, "init": str(tiny_model_dir),
        # one small split for both sides: reading shards with speech is the slow part
        "data": {"train": [str(shapes_dir / "test-novel-*.tar")],
                 "val": [str(shapes_dir / "test-novel-*.tar")], "val_limit": 12},
        "trainer": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "checkpoint_every": 3,
                    "warmup_steps": 1, "log_every": 2, "lr": 1e-3,
                    "tensorboard": tensorboard},
        **kw})
    return Finetuning(cfg, progress=False).fit()


@pytest.fixture(scope="module")
def vqa_run(tiny_model_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "vqa"
    return out, _finetune(tiny_model_dir, shapes_dir, out, "vqa", tensorboard=True,
                          tasks={"vqa": {"questions_per_sequence": 3}})


def test_finetune_exports_the_best_model_with_only_its_head(vqa_run):
    out, summary = vqa_run
    assert summary["status"] == "done" and summary["step"] == 6
    best = json.loads((out / "model" / "metrics.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["metrics"]["accuracy"] for r in rows if r.get("split") == "val"}
    assert set(val) == {0, 3, 6}
    # the exported step is the best validated one after training started
    assert best["step"] in (3, 6)
    assert best["score"] == pytest.approx(max(val[3], val[6]), abs=1e-5)
    model = omnimask.load(out / "model")
    assert set(model.heads) == {"vqa"} and model.head_configs["vqa"].answers
    # the last evaluation drew its examples, into the run and TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (out / "examples" / "vqa_examples.png").is_file()
    ev = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    ev.Reload()
    assert [e.step for e in ev.Images("examples/vqa_examples")] == [6]


def test_eval_cli_writes_the_metrics_json_and_examples(vqa_run, shapes_dir, tmp_path, capsys):
    out, _ = vqa_run
    js = tmp_path / "vqa.json"
    assert main(["eval", "vqa", "--model", str(out / "model"), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--limit", "10", "--out", str(js),
                 "--examples", str(tmp_path / "ex"), "-q"]) == 0
    r = json.loads(js.read_text())
    assert (r["task"], r["split"], r["n"]) == ("vqa", "test-novel", 10)
    m = r["metrics"]
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["prior_baseline"] <= 1
    assert set(m["per_type"]) <= {"color", "shape", "size", "count", "exists", "relation"}
    assert (tmp_path / "ex" / "vqa_examples.png").stat().st_size > 10_000
    assert "per_type.color" in capsys.readouterr().out


def test_answer_api_takes_paths_arrays_and_tensors(vqa_run, tmp_path):
    from PIL import Image

    out, _ = vqa_run
    model = omnimask.load(out / "model")
    img = (torch.rand(3, 64, 64) * 255).to(torch.uint8)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    a = model.answer(tmp_path / "a.png", "what color is the circle?")
    assert a["answer"] in model.head_configs["vqa"].answers and 0 <= a["score"] <= 1
    many = model.answer([img, img.permute(1, 2, 0).numpy()], ["how many objects are there?"] * 2)
    assert len(many) == 2 and many[0] == many[1]
    assert model.answer(img, "what color is the circle?") == a  # a path and a tensor: one image


def test_a_run_stopped_before_validating_exports_the_validated_model_on_resume(
        tiny_model_dir, shapes_dir, tmp_path, monkeypatch):
    """A run stopped (SIGTERM) before its first validation exports its last weights unscored;
    resumed, its first validation must replace them (a NaN score once blocked every later
    export, leaving the stopped run's weights as the final model)."""
    import math
    import os
    import signal

    out = tmp_path / "vqa"
    make_batch = Finetuning.make_batch

    def stop_early(self, step, micro):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled as a stop request by the trainer
        return make_batch(self, step, micro)

    monkeypatch.setattr(Finetuning, "make_batch", stop_early)
    first = _finetune(tiny_model_dir, shapes_dir, out, "vqa")
    assert first["status"] != "done" and first["step"] < 3
    placeholder = json.loads((out / "model" / "metrics.json").read_text())
    assert placeholder["score"] is None and placeholder["step"] == first["step"]
    monkeypatch.setattr(Finetuning, "make_batch", make_batch)
    done = _finetune(tiny_model_dir, shapes_dir, out, "vqa")
    assert done["status"] == "done" and done["step"] == 6
    best = json.loads((out / "model" / "metrics.json").read_text())
    assert best["step"] in (3, 6) and math.isfinite(best["score"]) and best["metrics"]
    assert done["best"] == best


def test_train_and_freeze_image_encoder_set_what_trains_and_the_export(tiny_model_dir, shapes_dir,
                                                                   tmp_path):
    from dataclasses import replace

    model = omnimask.load(tiny_model_dir)
    model.cfg.image_encoder = replace(model.cfg.image_encoder, frozen=True)
    frozen = model.save_pretrained(tmp_path / "frozen")

    def encoder(m):
        return {k: v.detach().clone()
                for k, v in m.encoder.embedders["image"].encoder.named_parameters()}

    start = encoder(omnimask.load(frozen))
    for flag in (False, True):
        out = tmp_path / f"ft-{flag}"
        _finetune(frozen, shapes_dir, out, "vqa", train_image_encoder=flag)
        tuned = omnimask.load(out / "model")
        assert tuned.cfg.image_encoder.frozen is not flag
        now = encoder(tuned)
        same = [torch.equal(v, now[k]) for k, v in start.items()]
        assert all(same) if not flag else not any(same)
    # a chain's next run keeps the encoder the run before trained, frozen again
    trained = tmp_path / "ft-True" / "model"
    before = encoder(omnimask.load(trained))
    _finetune(trained, shapes_dir, tmp_path / "refrozen", "vqa", freeze_image_encoder=True)
    again = omnimask.load(tmp_path / "refrozen" / "model")
    assert again.cfg.image_encoder.frozen is True
    assert all(torch.equal(v, encoder(again)[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="train_image_encoder and freeze_image_encoder"):
        _finetune(trained, shapes_dir, tmp_path / "both", "vqa", train_image_encoder=True,
                  freeze_image_encoder=True)


def test_image_encoder_from_takes_another_models_pixel_encoder(tiny_model_dir, shapes_dir,
                                                                tmp_path):
    """The init's trunk with another directory's pixel encoder (frozen, as the init keeps
    it): the encoder leaves training equal to the donor's, the trunk starts from the init."""
    from dataclasses import replace

    from omnimask.pretrained import IMAGE_ENCODER, load_image_encoder

    model = omnimask.load(tiny_model_dir)
    model.cfg.image_encoder = replace(model.cfg.image_encoder, frozen=True)
    init = model.save_pretrained(tmp_path / "init")
    donor = omnimask.load(tiny_model_dir)
    with torch.no_grad():
        for v in donor.state_dict().values():
            v.add_(torch.randn_like(v) * 0.1 if v.is_floating_point() else 0)
    donor_dir = donor.save_pretrained(tmp_path / "donor")

    def part(m, enc: bool):
        return {k: v.clone() for k, v in m.state_dict().items()
                if k.startswith(IMAGE_ENCODER) == enc}

    _finetune(init, shapes_dir, tmp_path / "ft", "vqa", image_encoder_from=str(donor_dir))
    tuned = omnimask.load(tmp_path / "ft" / "model")
    want = part(omnimask.load(donor_dir), True)
    got = part(tuned, True)
    assert want.keys() == got.keys() and all(torch.equal(v, got[k]) for k, v in want.items())
    assert tuned.cfg.image_encoder.frozen  # the init's setting stays
    # the rest started from the init, not the donor: 6 Adam steps at lr 1e-3 move a weight
    # by < 0.01, the donor differs by noise of std 0.1
    start, moved = part(omnimask.load(init), False), part(tuned, False)
    trunk = [k for k in start if k.startswith("encoder.") and start[k].is_floating_point()]
    assert trunk and all((moved[k] - start[k]).abs().max() < 0.03 for k in trunk)
    # a different architecture is refused, naming the field
    other = omnimask.load(tiny_model_dir)
    other.cfg.image_encoder = replace(other.cfg.image_encoder, channels=[8, 16, 16])
    with pytest.raises(OmnimaskError, match="image_encoder differs.*channels"):
        load_image_encoder(other, donor_dir)
    with pytest.raises(ConfigError, match="image_encoder_from: no model directory"):
        _finetune(init, shapes_dir, tmp_path / "bad", "vqa",
                  image_encoder_from=str(tmp_path / "nowhere"))


def test_image_color_path_starts_as_a_no_op_trains_and_is_exported(tiny_model_dir,
                                                                   shapes_dir, tmp_path):
    from omnimask.errors import ConfigError
    from omnimask.train.finetune import FinetuneConfig, Finetuning

    cfg = load_config(FinetuneConfig, None, **{
        "out": str(tmp_path / "a"), "task": "vqa", "init": str(tiny_model_dir),
        "image_color_path": 8, "data": {"train": [str(shapes_dir / "test-novel-*.tar")],
                                        "val": [str(shapes_dir / "test-novel-*.tar")]}})
    ft = Finetuning(cfg, progress=False)
    ft.lock.release()
    color = ft.model.encoder.embedders["image"].color
    assert color is not None and ft.model.cfg.image_color_path == 8
    base = omnimask.load(tiny_model_dir).encoder.embedders["image"]
    px = (torch.rand(2, 3, 64, 64) * 255).to(torch.uint8)
    with torch.no_grad():  # the path's projection starts at zero: the same tokens
        torch.testing.assert_close(ft.model.encoder.embedders["image"].eval().embed_pixels(px),
                                   base.eval().embed_pixels(px))
    _finetune(tiny_model_dir, shapes_dir, tmp_path / "b", "vqa", image_color_path=8)
    tuned = omnimask.load(tmp_path / "b" / "model")
    assert tuned.cfg.image_color_path == 8
    assert tuned.encoder.embedders["image"].color.proj.weight.abs().max() > 0  # it learned
    with pytest.raises(ConfigError, match="image_color_path: the model has one of width 8"):
        _finetune(tmp_path / "b" / "model", shapes_dir, tmp_path / "c", "vqa",
                  image_color_path=4)


def test_bad_finetune_inputs_fail_naming_the_setting(tiny_model_dir, shapes_dir, tmp_path):
    from omnimask.errors import ConfigError

    with pytest.raises(ConfigError, match="tasks.vqa"):
        _finetune(tiny_model_dir, shapes_dir, tmp_path / "a", "vqa",
                  tasks={"vqa": {"questions_per_sequence": -1}})
    with pytest.raises(ConfigError, match="init"):
        _finetune(tmp_path / "nowhere", shapes_dir, tmp_path / "b", "vqa")
    with pytest.raises(ConfigError, match="heads.vqa: .*'hidden'"):
        _finetune(tiny_model_dir, shapes_dir, tmp_path / "c", "vqa", heads={"vqa": {"hidden": 3}})
    with pytest.raises(ConfigError, match="heads.nope: unknown task"):
        _finetune(tiny_model_dir, shapes_dir, tmp_path / "d", "vqa", heads={"nope": {}})


@pytest.fixture(scope="module")
def multitask_run(tiny_model_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "multi"
    return out, _finetune(tiny_model_dir, shapes_dir, out, "multitask",
                          tasks={"caption": {"meteor": False, "tokenizer": "simple"}},
                          heads={"retrieval": {"speech_itm": False, "rerank_k": 4}})


def test_multitask_trains_every_head_on_one_encoder(multitask_run):
    out, summary = multitask_run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = {r["objective"] for r in rows if r.get("split") == "train"}
    assert trained <= {"vqa", "retrieval", "caption"} and len(trained) >= 2
    val = [r for r in rows if r.get("split") == "val"][-1]["metrics"]
    assert {"vqa.accuracy", "retrieval.t2i_r1", "caption.cider", "score"} <= set(val)
    model = omnimask.load(out / "model")
    assert set(model.heads) == {"vqa", "retrieval", "caption"}
    assert summary["best"]["metric"].startswith("mean of")
    # heads.<name>.<key> over the fresh head's settings, kept in the exported model
    rc = model.heads["retrieval"].cfg
    assert (rc.speech_itm, rc.rerank_k, rc.features) == (False, 4, "pair")


@pytest.mark.parametrize("task,keys", [
    ("retrieval", {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "s2i_r1",
                   "s2i_r5", "s2i_r10", "ceiling_r1"}),
    ("caption", {"bleu4", "cider", "color_precision", "shape_precision", "pair_precision",
                 "color_precision_chance", "pair_precision_chance"})])
def test_eval_of_each_task(multitask_run, shapes_dir, tmp_path, task, keys):
    out, _ = multitask_run
    js = tmp_path / f"{task}.json"
    assert main(["eval", task, "--model", str(out / "model"), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--limit", "12", "--out", str(js),
                 "--examples", str(tmp_path / "ex"), "-q"]) == 0
    m = json.loads(js.read_text())["metrics"]
    assert keys <= set(m)
    assert all(0 <= m[k] <= 1 for k in keys if k not in ("cider",))
    assert any(p.suffix == ".png" for p in (tmp_path / "ex").iterdir())


def test_evaluations_tokenise_the_data_once_per_tokenizers(multitask_run, shapes_dir,
                                                           monkeypatch):
    from omnimask.train import corpus as C
    from omnimask.train.evaluate_task import evaluate_model

    model, data = str(multitask_run[0] / "model"), [str(shapes_dir / "test-novel-*.tar")]
    plain = evaluate_model("retrieval", model, data, limit=12, progress=False)
    built = []
    real = C.build_corpus
    monkeypatch.setattr(C, "build_corpus", lambda *a, **k: built.append(1) or real(*a, **k))
    memo: dict = {}
    vqa = evaluate_model("vqa", model, data, limit=12, progress=False, corpora=memo)
    ret = evaluate_model("retrieval", model, data, limit=12, progress=False, corpora=memo)
    assert len(built) == 1 and len(memo) == 1
    assert ret["metrics"] == plain["metrics"] and vqa["metrics"]["accuracy"] >= 0


def test_caption_and_retrieve_api(multitask_run, shapes_dir, tmp_path):
    import tarfile

    import soundfile

    out, _ = multitask_run
    model = omnimask.load(out / "model")
    with tarfile.open(sorted(shapes_dir.glob("test-novel-*.tar"))[0]) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()[:40]}
    pngs = [tmp_path / f"{k}.png" for k in range(3)]
    keys = sorted({n.rsplit(".", 2)[0] for n in members if n.endswith("image.png")})[:3]
    for p, key in zip(pngs, keys):
        p.write_bytes(members[f"{key}.image.png"])
    caps = model.caption(pngs, beams=2)
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    assert model.caption(pngs[0], beams=2) == caps[0]
    r = model.retrieve("a red circle", pngs, k=2)
    assert len(r["indices"]) == 2 and r["scores"][0] >= r["scores"][1]
    wav = tmp_path / "q.flac"
    wav.write_bytes(members[f"{keys[0]}.speech.flac"])
    spoken = model.retrieve(str(wav), pngs, k=3)
    assert sorted(spoken["indices"]) == [0, 1, 2]
    wave, rate = soundfile.read(str(wav), dtype="float32")
    # a (wave, rate) pair is the same query as its file (an untrained model nearly ties the
    # gallery, so the scores are compared, not the order)
    from omnimask.inference import _speech_frames

    torch.testing.assert_close(_speech_frames(model, (wave, rate), 0),
                               _speech_frames(model, str(wav), 0))
    again = model.retrieve([(wave, rate)], pngs, k=3)[0]
    assert again["scores"] == pytest.approx(spoken["scores"], abs=1e-4)


@pytest.fixture(scope="module")
def segment_run(tiny_model_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "segment"
    return out, _finetune(tiny_model_dir, shapes_dir, out, "segment",
                          heads={"segment": {"dim": 32, "mask_dim": 16, "queries": 6,
                                             "ffn_dim": 64, "points": 64}},
                          tasks={"segment": {"noc_objects": 4, "noc_max_clicks": 3}})


def test_segment_finetune_eval_and_api(segment_run, shapes_dir, tmp_path):
    out, summary = segment_run
    assert summary["status"] == "done"
    model = omnimask.load(out / "model")
    assert set(model.heads) == {"segment"}
    names = model.head_configs["segment"].class_names
    assert names[0] == "background" and "circle" in names
    # class names are embedded as in a sentence: "circle" ends in the token captions hold
    from omnimask.train.objectives.base import text_segment
    from omnimask.train.tasks.base import task_for

    hc = model.head_configs["segment"]
    assert (hc.class_prompt, hc.class_pool) == ("a {}", "last")
    task = task_for(model, "segment")
    batch = task.class_batch()
    end = batch.cu_seqlens[names.index("circle") + 1].item()
    caption = model.tokenizers["text"].tok.encode("a large red circle", add_special_tokens=False)
    assert batch.ids[end - 1] == text_segment(task.ctx, caption.ids).ids[-1]
    for task, keys in [("segment", {"miou", "per_class_iou", "pixel_accuracy", "pq", "sq",
                                    "rq", "point_miou", "box_miou", "noc85"}),
                       ("refer", {"miou", "ciou"})]:
        js = tmp_path / f"{task}.json"
        assert main(["eval", task, "--model", str(out / "model"), "--data",
                     str(shapes_dir / "test-novel-*.tar"), "--limit", "6", "--out", str(js),
                     "--examples", str(tmp_path / "ex"), "-q", "--set", "noc_max_clicks=3",
                     "--set", "noc_objects=5"]) == 0
        m = json.loads(js.read_text())["metrics"]
        assert keys <= set(m), keys - set(m)
        assert all(0 <= m[k] <= 1 for k in keys if k not in ("per_class_iou", "noc85"))
    seg = json.loads((tmp_path / "segment.json").read_text())["metrics"]
    assert 1 <= seg["noc85"] <= 3 and seg["objects"] == 5  # the protocol --set asked for
    # the click protocol asks for every object's next mask in one forward: the same
    # numbers as one object per forward (prompts never see each other)
    from omnimask.train.evaluate_task import evaluate_model

    data = [str(shapes_dir / "test-novel-*.tar")]
    one, many = (evaluate_model("segment", str(out / "model"), data, limit=6, progress=False,
                                settings={"noc_max_clicks": 4, "noc_objects": 8,
                                          "eval_images": n})["metrics"] for n in (1, 32))
    assert one["noc85"] == many["noc85"] and one["objects"] == many["objects"] == 8
    assert one["point_miou"] == pytest.approx(many["point_miou"], abs=1e-6)
    assert one["box_miou"] == pytest.approx(many["box_miou"], abs=1e-6)
    assert {p.name for p in (tmp_path / "ex").iterdir()} == {"segment_examples.png",
                                                             "refer_examples.png"}
    img = (torch.rand(3, 48, 80) * 255).to(torch.uint8)  # not the model's size, not square
    ids = model.segment(img)
    assert ids.shape == (48, 80) and ids.dtype == torch.long and int(ids.max()) < len(names)
    for kw in ({"text": "the red circle"}, {"point": (10, 20)}, {"box": (5, 5, 30, 40)},
               {"point": [(10, 20, True), (40, 30, False)]}):
        r = model.segment(img, **kw)
        assert r["mask"].shape == (48, 80) and r["mask"].dtype == torch.bool
        assert 0 <= r["score"] <= 1
    # a wide image is padded to the square, not stretched: its maps are the padded
    # square's, cut back (64 px model: a 32 x 64 image sits in rows 16-47)
    side = model.tokenizers["image"].model.cfg.image_size
    wide = (torch.rand(3, side // 2, side) * 255).to(torch.uint8)
    square = torch.zeros(3, side, side, dtype=torch.uint8)
    top = side // 4
    square[:, top:top + side // 2] = wide
    assert torch.equal(model.segment(wide), model.segment(square)[top:top + side // 2])
    a, b = model.segment(wide, point=(10, 5)), model.segment(square, point=(10, 5 + top))
    assert torch.equal(a["mask"], b["mask"][top:top + side // 2])
    two = model.segment([img, img], point=(10, 20))
    assert len(two) == 2 and torch.equal(two[0]["mask"], two[1]["mask"])
    with pytest.raises(OmnimaskError, match="outside"):
        model.segment(img, point=(100, 5))
    with pytest.raises(OmnimaskError, match="one prompt"):
        model.segment(img, text="a", point=(1, 1))


def test_hue_jitter_turns_the_image_keeps_its_targets_and_hueless_expressions(segment_run):
    from types import SimpleNamespace

    from omnimask.train.tasks.base import task_for

    model = omnimask.load(segment_run[0] / "model")
    side = model.tokenizers["image"].model.cfg.image_size
    pixels = torch.full((1, 3, side, side), 100, dtype=torch.uint8)
    pixels[0, :, 8:24, 8:24] = torch.tensor([215, 35, 35], dtype=torch.uint8)[:, None, None]
    inst = torch.zeros(1, side, side, dtype=torch.uint8)
    inst[0, 8:24, 8:24] = 1
    names = model.head_configs["segment"].class_names
    tok = model.tokenizers["text"].tok
    refs = [{"expression": e, "ids": tok.encode(e, add_special_tokens=False).ids,
             "instance": 1} for e in ("the Red square", "the large square")]
    corpus = SimpleNamespace(pixels=pixels, inst=inst, seg=inst * names.index("square"),
                             seg_classes=names, grid=(side // 8, side // 8), refs=[refs])
    batches = {}
    for p in (0.0, 1.0):
        task = task_for(model, "segment", settings={"hue_jitter": p, "boxes": 0.0})
        batches[p] = task.batch(corpus, [0], torch.Generator().manual_seed(0))
    plain, turned = batches[0.0], batches[1.0]
    kinds = [[pr["kind"] for pr in b["prompts"]] for b in (plain, turned)]
    assert kinds == [["text", "text", "point"], ["text", "point"]]  # "Red" names a hue
    kept = turned["packed"].ids[turned["packed"].segment == 1]  # the expression's block
    assert refs[1]["ids"][-1] in kept.tolist() and refs[0]["ids"][1] not in kept.tolist()
    for a, b in zip(plain["targets"], turned["targets"]):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["masks"], b["masks"])
    x0, x1 = (b["packed"].pixels["image"][0] for b in (plain, turned))
    assert torch.equal(x1[:, 0, 0], x0[:, 0, 0])  # the grey background stays
    assert not torch.equal(x1[:, 16, 16], x0[:, 16, 16])  # the red square does not
    with pytest.raises(OmnimaskError, match="hue_jitter"):
        task_for(model, "segment", settings={"hue_jitter": 1.5})


def test_the_readme_api_snippet_runs(vqa_run, multitask_run, segment_run, shapes_dir,
                                     tmp_path, monkeypatch):
    """The README's Python API block, run as written against the two tiny runs."""
    import re
    import tarfile
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                 if "vqa.answer(" in b)
    with tarfile.open(sorted(shapes_dir.glob("test-novel-*.tar"))[0]) as tf:
        names = tf.getnames()
        png = next(n for n in names if n.endswith(".image.png"))
        flac = next(n for n in names if n.endswith(".speech.flac"))
        (tmp_path / "scene.png").write_bytes(tf.extractfile(png).read())
        (tmp_path / "spoken.flac").write_bytes(tf.extractfile(flac).read())
    runs = {"vqa": vqa_run, "multitask": multitask_run, "segment": segment_run}
    for name, (run, _) in runs.items():
        (tmp_path / "runs" / "ft" / name).mkdir(parents=True)
        (tmp_path / "runs" / "ft" / name / "model").symlink_to(run / "model")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert {"vqa", "m", "gallery", "seg"} <= set(scope)
