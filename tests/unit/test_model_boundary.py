"""The model boundary: Encoder + heads behind one forward, named variants, the portable model
directory (save_pretrained / omnimask.load), and fine-tuning starts on a saved encoder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import omnimask
from omnimask.errors import ConfigError, OmnimaskError
from omnimask.fusion.packing import Segment, pack
from omnimask.registry import HEADS
from omnimask.train.objectives.base import OBJECTIVES

from .test_objectives import _corpus, _ctx, _model


def _tiny(**kw):
    """omnimask-tiny made small enough for a unit test (two layers, a small vocabulary)."""
    torch.manual_seed(0)
    return omnimask.create_model("omnimask-tiny", **{"trunk.layers": 2, "trunk.vocab_size": 300},
                                 **kw)


def _image(cfg, g: torch.Generator) -> Segment:
    """An image as the model reads it: uint8 pixels or feature rows."""
    if cfg.image_input == "pixels":
        e = cfg.image_encoder
        return Segment("image", pixels=torch.randint(0, 256, (3, e.image_size, e.image_size),
                                                     generator=g, dtype=torch.uint8),
                       grid=(e.grid, e.grid))
    return Segment("image", features=torch.randn(16, cfg.image_feature_dim, generator=g),
                   grid=(4, 4))


def _packed(cfg, n: int = 3) -> dict:
    """Text + image + speech frames per sample, fixed by a seed."""
    g = torch.Generator().manual_seed(0)
    samples = [[Segment("text", ids=torch.randint(0, 200, (5 + k,), generator=g)),
                _image(cfg, g),
                Segment("speech", features=torch.randn(6, cfg.speech_feature_dim, generator=g))]
               for k in range(n)]
    return {"packed": pack(samples)}


@pytest.mark.parametrize("image_input", ["vq_latents", "pixels"])
def test_state_dict_keys_are_encoder_or_heads_and_each_tensor_has_one_key(image_input):
    from omnimask.modalities.image.encoder import ImageEncoderConfig

    enc = ImageEncoderConfig(image_size=16, grid=4, channels=[8, 16], stem_channels=4)
    model = _model(_ctx(), image_input=image_input, image_encoder=enc)
    keys = list(model.state_dict())
    # the pixel encoder, where there is one, belongs to the image embedder
    assert any(k.startswith("encoder.embedders.image.encoder.") for k in keys) == (
        image_input == "pixels")
    assert all(k.startswith(("encoder.", "heads.")) for k in keys), keys
    assert {k.split(".")[1] for k in keys if k.startswith("heads.")} == {
        n for n in OBJECTIVES.names() if any(True for _ in model.heads[n].parameters())}
    assert set(model.heads) == set(OBJECTIVES.names())
    # only the tied vocabulary head aliases another tensor (no stored references to the
    # encoder inside heads: MRFR and MRC reach the projection and codebook through it)
    ptrs: dict = {}
    for k, v in model.state_dict(keep_vars=True).items():
        ptrs.setdefault(v.data_ptr(), []).append(k)
    shared = [ks for ks in ptrs.values() if len(ks) > 1]
    assert shared == [["encoder.trunk.tok.weight", "encoder.trunk.mlm.embedding.weight"]]


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_objective_goes_through_the_model_forward(name):
    ctx, c = _ctx(), _corpus()
    model = _model(ctx)
    obj = OBJECTIVES.create(name, ctx)
    b = obj.batch(c, list(range(8)), torch.Generator().manual_seed(0))
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["task"]),
                                with_kwargs=True)
    out = obj.loss(model, b)
    assert calls == [name]  # the loss came through model.__call__, where DDP hooks sit
    assert torch.isfinite(out["loss"])
    if name != "itm":  # ITM optimises its cross-entropy + 0.1 x word-region alignment
        assert float(out[name]) == float(out["loss"].detach())
    out["loss"].backward()
    enc = [p for p in model.encoder.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert enc, "no gradient reached the encoder"
    for k, p in model.heads[name].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"heads.{name}.{k}"
    with torch.no_grad():  # the same as calling the model with the objective's inputs
        again = model(obj.inputs(model, b), task=name)
    torch.testing.assert_close(again["loss"], out["loss"].detach())


def test_unknown_task_names_the_heads():
    with pytest.raises(OmnimaskError, match="no head 'vqa'.*itc"):
        _model(_ctx())({"packed": None}, task="vqa")


@pytest.fixture(scope="module")
def task_corpus(tiny_model_dir, shapes_dir):
    from omnimask.train.corpus import build_corpus
    from omnimask.train.data.shards import expand_shards

    toks = omnimask.load(tiny_model_dir).tokenizers
    return build_corpus(expand_shards([str(shapes_dir / "test-novel-*.tar")]), toks["text"],
                        toks["image"], toks["speech"], progress=False)


def test_corpus_keeps_what_segmentation_reads(task_corpus, shapes_dir):
    """seg.png, inst.png, the class names and refs.json, against the shards' own files."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from omnimask.train.corpus import patch_classes
    from omnimask.train.data.shapesworld.vocab import SEG_CLASSES

    c = task_corpus
    assert c.seg_classes == list(SEG_CLASSES)  # named from meta.json's objects
    assert c.seg.dtype == c.inst.dtype == torch.uint8 and c.seg.shape == c.pixels[:, 0].shape
    torch.testing.assert_close(patch_classes(c.seg, c.grid[0], c.regions.shape[-1]),
                               c.regions)
    with tarfile.open(sorted(shapes_dir.glob("test-novel-*.tar"))[0]) as tf:
        key = c.keys[0]
        seg = np.array(Image.open(io.BytesIO(tf.extractfile(f"{key}.seg.png").read())))
        refs = json.loads(tf.extractfile(f"{key}.refs.json").read())
    assert (c.seg[0].numpy() == seg).all()  # the generator draws at the corpus's size
    assert [r["expression"] for r in c.refs[0]] == [r["expression"] for r in refs]
    for r in c.refs[0]:  # every expression names an instance the image has
        assert (c.inst[0] == r["instance"]).any() and r["ids"]


@pytest.mark.parametrize("name", HEADS.names())
def test_every_task_head_trains_through_its_task(name, tiny_model_dir, task_corpus):
    """Each head has the task (same name) that builds its batches; one step's loss is finite
    and reaches the encoder."""
    from omnimask.train.tasks.base import TASKS, TaskContext

    assert name in TASKS
    m = omnimask.load(tiny_model_dir)
    ctx = TaskContext(vocab=m.vocab, text=m.tokenizers["text"], pixels=True,
                      speech=m.tokenizers["speech"])
    task = TASKS.create(name, ctx)
    model = omnimask.load(tiny_model_dir, heads={name: task.head_config(task_corpus)})
    task.bind(model)
    out = task.loss(model, task.batch(task_corpus, list(range(6)),
                                      torch.Generator().manual_seed(0)))
    assert torch.isfinite(out["loss"]) and name in out
    out["loss"].backward()
    grads = [p.grad for p in model.encoder.trunk.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)


def test_vqa_head_takes_its_settings_and_refuses_unknown_ones():
    model = _tiny(heads={"vqa": {"num_answers": 7}})
    assert model(_packed(model.cfg), task="vqa")["logits"].shape == (3, 7)
    with pytest.raises(OmnimaskError, match="vqa.*nope"):
        _tiny(heads={"vqa": {"nope": 1}})
    with pytest.raises(OmnimaskError, match="unknown head 'nope'.*vqa.*itm"):
        _tiny(heads=["nope"])


def test_variants_are_listed_and_build():
    assert {"omnimask-tiny", "omnimask-small", "omnimask-base"} <= set(omnimask.list_models())
    tiny = omnimask.create_model("omnimask-tiny")
    t = tiny.cfg.trunk
    assert (t.dim, t.layers, t.heads, t.ffn_dim) == (128, 4, 4, 512)  # shapes_tiny.yaml
    small = omnimask.create_model("omnimask-small")
    assert (small.cfg.trunk.dim, small.cfg.trunk.layers) == (256, 6)
    with torch.device("meta"):  # built, not run: 110M parameters
        base = omnimask.create_model("omnimask-base", heads=["vqa"])
    assert base.encoder.trunk.cfg.dim == 768 and len(base.encoder.trunk.blocks) == 12
    with pytest.raises(OmnimaskError, match="unknown model 'omnimask-huge'.*omnimask-tiny"):
        omnimask.create_model("omnimask-huge")


def test_create_model_overrides_nested_or_dotted_and_checked():
    m = omnimask.create_model("omnimask-tiny", trunk={"layers": 1}, **{"trunk.heads": 2,
                                                                        "itc_dim": 16})
    assert (m.cfg.trunk.layers, m.cfg.trunk.heads, m.cfg.trunk.dim, m.cfg.itc_dim) == (1, 2, 128, 16)
    with pytest.raises(ConfigError, match="trunk.nope"):
        omnimask.create_model("omnimask-tiny", **{"trunk.nope": 1})
    with pytest.raises(ConfigError, match="model.trunk.dim must be divisible"):
        omnimask.create_model("omnimask-tiny", **{"trunk.heads": 3})


def test_base_takes_bert_base_weights():
    """omnimask-base has BERT-base's shapes: ``Trunk.from_hf_bert`` weights fill every
    parameter but the multimodal additions (modality and 2-D grid embeddings)."""
    transformers = pytest.importorskip("transformers")
    from omnimask.fusion.trunk import Trunk

    with torch.device("meta"):
        bert = Trunk.from_hf_bert(transformers.BertModel(transformers.BertConfig(),
                                                         add_pooling_layer=False))
        base = omnimask.create_model("omnimask-base", **{"trunk.vocab_size": 30522})
    theirs, ours = bert.state_dict(), base.encoder.trunk.state_dict()
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {
        k: tuple(ours[k].shape) for k in theirs}
    assert set(ours) - set(theirs) == {"modality.weight", "row.weight", "col.weight"}


def test_import_omnimask_stays_cheap():
    code = ("import sys, omnimask; assert 'torch' not in sys.modules; "
            "assert callable(omnimask.create_model) and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the model directory -----------------------------------------------------------------------
def test_save_pretrained_then_load_gives_identical_outputs(tmp_path):
    model = _tiny(heads={"vqa": {"num_answers": 5}}).eval()
    b = _packed(model.cfg)
    with torch.no_grad():
        h, logits = model.encoder(b["packed"]), model(b, task="vqa")["logits"]
    d = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "config.json",
                                                   "model.safetensors", "omnimask_vocab.json",
                                                   "tokenizers"]
    info = json.loads((d / "config.json").read_text())
    assert info["heads"] == {"vqa": {"answers": [], "num_answers": 5, "priors": {},
                                     "loss": "bce", "glimpses": 0, "relation_probes": 0}}
    assert info["format_version"] == 1
    loaded = omnimask.load(d).eval()
    assert loaded.tokenizers is None and loaded.vocab.size == 300
    with torch.no_grad():
        assert torch.equal(loaded.encoder(b["packed"]), h)
        assert torch.equal(loaded(b, task="vqa")["logits"], logits)
    # the tied vocabulary head is stored once and tied again after loading
    assert "encoder.trunk.mlm.embedding.weight" not in load_file(str(d / "model.safetensors"))
    trunk = loaded.encoder.trunk
    assert trunk.mlm.embedding.weight is trunk.tok.weight


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "omnimask_vocab.json"])
def test_a_directory_missing_a_file_fails_naming_it(tmp_path, missing):
    d = _tiny().save_pretrained(tmp_path / "m")
    (d / missing).unlink()
    with pytest.raises(OmnimaskError, match=f"{missing} is missing"):
        omnimask.load(d)


def test_a_directory_with_the_former_vocab_name_still_loads(tmp_path):
    d = _tiny().save_pretrained(tmp_path / "m")
    (d / "omnimask_vocab.json").rename(d / "vocab.json")  # directories saved before the rename
    assert omnimask.load(d).vocab.size == 300


def test_bad_directories_fail_clearly(tmp_path, plant_pickle):
    with pytest.raises(OmnimaskError, match="no model directory"):
        omnimask.load(tmp_path / "nothing")
    d = _tiny().save_pretrained(tmp_path / "m")
    info = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**info, "format_version": 2}))
    with pytest.raises(OmnimaskError, match="format version 2.*newer omnimask"):
        omnimask.load(d)
    (d / "config.json").write_text(json.dumps({**info, "tokenizers": ["text"]}))
    with pytest.raises(OmnimaskError, match="tokenizers/text is missing"):
        omnimask.load(d)
    (d / "config.json").write_text(json.dumps({**info, "model": {"nope": 1}}))
    with pytest.raises(OmnimaskError, match="config.json.*nope"):
        omnimask.load(d)
    (d / "config.json").write_text(json.dumps(info))
    marker = tmp_path / "pwned"
    plant_pickle(d / "model.safetensors", marker)  # loading never unpickles
    with pytest.raises(OmnimaskError, match="model.safetensors cannot be read"):
        omnimask.load(d)
    assert not marker.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OmnimaskError, match="not a model directory"):
        _tiny().save_pretrained(other)  # never written over a folder that is not one
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_fine_tuning_start_is_strict_on_the_encoder_and_lists_fresh_heads(tmp_path, caplog):
    """A pretraining export loaded with a fresh task head: the encoder loads exactly, the
    new head's keys are listed, the pretraining heads are left out."""
    ctx = _ctx()
    pre = _model(ctx)
    pre.vocab = ctx.vocab
    d = pre.save_pretrained(tmp_path / "pre")
    ft = omnimask.load(d, heads={"vqa": {"num_answers": 4}, "itm": None})
    assert set(ft.heads) == {"vqa", "itm"}
    vqa_keys = [k for k in ft.state_dict() if k.startswith("heads.vqa.")]
    assert ft.load_report["fresh"] == vqa_keys and vqa_keys
    assert {k.split(".")[1] for k in ft.load_report["unused"]} == set(OBJECTIVES.names()) - {
        "itm", "mlm", "mim", "cm3", "maskgit"}  # heads with weights that were not asked for
    assert f"heads.vqa ({len(vqa_keys)} tensors)" in caplog.text  # one line per fresh head
    for k, v in pre.state_dict().items():
        if k.startswith(("encoder.", "heads.itm.")):
            assert torch.equal(ft.state_dict()[k], v), k
    # load_encoder into a model built elsewhere: the same strictness, the head keys returned
    fresh = omnimask.create_model(
        "omnimask-tiny", heads=["vqa"], image_input="vq_latents", image_feature_dim=8,
        speech_feature_dim=12,
        image_codes=32, speech_units=16, code_dim=8,
        trunk={"vocab_size": ctx.vocab.size, "dim": 32, "layers": 2, "ffn_dim": 64,
               "embed_norm": False})
    assert fresh.load_encoder(d) == [k for k in fresh.state_dict() if k.startswith("heads.")]
    assert torch.equal(fresh.encoder.trunk.tok.weight, pre.encoder.trunk.tok.weight)


@pytest.mark.parametrize("change", ["drop", "add", "reshape"])
def test_an_encoder_key_that_does_not_fit_fails_naming_it(tmp_path, change):
    d = _model(_ctx()).save_pretrained(tmp_path / "pre")
    sd = load_file(str(d / "model.safetensors"))
    key = "encoder.embedders.image.proj.weight"
    if change == "drop":
        del sd[key]
    elif change == "add":
        key = "encoder.extra.weight"
        sd[key] = torch.zeros(2)
    else:
        sd[key] = torch.zeros(3, 3)
    save_file(sd, str(d / "model.safetensors"))
    for heads in (None, ["vqa"]):
        with pytest.raises(OmnimaskError, match=key.replace(".", r"\.")):
            omnimask.load(d, heads=heads)


def test_layer_depths_order_the_model_from_inputs_to_heads():
    """trainer.layer_decay's depths: the embedders and the trunk's embeddings 0, block i
    i + 1, the final norm, MLM head, pooler and task heads on top; every parameter has one,
    and the optimizer groups hold each trainable parameter once."""
    from omnimask.train.trainer import param_groups

    m = _tiny(heads={"vqa": {}, "caption": {}})
    depths, top = m.layer_depths()
    assert top == 3 and set(depths) == {n for n, _ in m.named_parameters()}
    for name, d in depths.items():
        if name.startswith("encoder.trunk.blocks."):
            assert d == int(name.split(".")[3]) + 1, name
        elif name.startswith(("encoder.embedders.", "encoder.trunk.tok.",
                              "encoder.trunk.pos.")):
            assert d == 0, name
        elif name.startswith(("heads.", "encoder.pooler.", "encoder.trunk.final_norm.",
                              "encoder.trunk.mlm.")):
            assert d == top, name
    assert {d for n, d in depths.items() if n.startswith("heads.")} == {top}
    groups = param_groups(m, 0.01, 0.5)
    held = [id(p) for g in groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in m.parameters() if p.requires_grad)
    assert {g["lr_scale"] for g in groups} == {0.5 ** k for k in range(top + 1)}
