"""Text tokenizer: lossless round trip, transformers compatibility, foreign tokenizers."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from omnimask.cli import main
from omnimask.errors import OmnimaskError
from omnimask.modalities.text.tokenizer import TextTokenizer, TextTokenizerConfig
from omnimask.modalities.text.train import iter_texts
from omnimask.train.data.shapesworld import generate_shards


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_dir):
    out = tmp_path_factory.mktemp("tok") / "text"
    assert main(["tokenizer", "train", "text", "--data", str(shapes_dir / "train-*.tar"),
                 "--out", str(out), "vocab_size=600", "num_sentinels=8", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout")
    generate_shards(d, 40, seed=99, split="val", shard_size=40, speech=False, progress=False)
    return d


def test_roundtrip_on_heldout_text(trained, heldout):
    tok = TextTokenizer.load(trained)
    texts = list(iter_texts([str(heldout / "*.tar")]))
    assert len(texts) > 200  # captions, questions, answers, expressions
    assert all(tok.decode(tok.encode(t)) == t for t in texts)
    odd = "Ünïcode, emoji 🙂, tabs\tand\nnewlines  "
    assert tok.decode(tok.encode(odd)) == odd  # byte-level: nothing is unknown


def test_specials_and_sentinels(trained):
    tok = TextTokenizer.load(trained)
    assert [f"mask:{i}" in tok.roles for i in range(8)] == [True] * 8 and "mask:8" not in tok.roles
    for role in ("pad", "cls", "sep", "mask", "bos", "eos", "image", "/image", "speech", "/speech"):
        i = tok.roles[role]
        assert tok.is_special(i) and tok.encode(tok.decode([i])) == [i]  # one token, not split
    assert len(set(tok.roles.values())) == len(tok.roles)


def test_loads_with_transformers_autotokenizer(trained, heldout):
    from transformers import AutoTokenizer

    ours = TextTokenizer.load(trained)
    hf = AutoTokenizer.from_pretrained(str(trained))
    for t in list(iter_texts([str(heldout / "*.tar")]))[:50]:
        assert hf(t, add_special_tokens=False)["input_ids"] == ours.encode(t)
    assert hf.mask_token_id == ours.roles["mask"] and hf.pad_token_id == ours.roles["pad"]
    assert hf.convert_tokens_to_ids("<mask:3>") == ours.roles["mask:3"]


def test_eval_json(trained, heldout, tmp_path):
    out = tmp_path / "m.json"
    assert main(["tokenizer", "eval", "text", "--tokenizer", str(trained), "--data",
                 str(heldout / "*.tar"), "--out", str(out), "-q"]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["roundtrip_exact"] == 1.0 and m["unknown_rate"] == 0.0
    assert 3 < m["tokens_per_caption"] < 40 and m["vocab_size"] == TextTokenizer.load(trained).vocab_size


def test_existing_wordpiece_tokenizer_gets_omnimask_specials(tmp_path):
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red",
                                         "circle", "##s"])}
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "text", "--data", "unused.tar", "--out", str(out),
                 f"from_file={tmp_path / 'tokenizer.json'}", "-q"]) == 0
    tok = TextTokenizer.load(out)
    assert tok.roles["pad"] == 0 and tok.roles["mask"] == 4 and tok.roles["unk"] == 1
    assert tok.roles["image"] >= 9 and tok.roles["mask:15"] >= 9  # added after the vocabulary
    assert tok.encode("a red circles") == [5, 6, 7, 8]
    assert tok.encode("zebra") == [1]


def test_bad_tokenizer_inputs(tmp_path, trained):
    with pytest.raises(OmnimaskError, match="tokenizer file not found"):
        TextTokenizer.from_file(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(OmnimaskError, match="not a Hugging Face tokenizer.json"):
        TextTokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(OmnimaskError, match="not an omnimask text tokenizer"):
        TextTokenizer.load(tmp_path)
    # a tokenizer.json edited after saving is refused
    edited = tmp_path / "edited"
    TextTokenizer.load(trained).save(edited)
    data = json.loads((edited / "tokenizer.json").read_text())
    data["model"]["vocab"]["zzzz"] = len(data["model"]["vocab"]) + 100
    (edited / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(OmnimaskError, match="changed after it was saved"):
        TextTokenizer.load(edited)


def test_config_rejects_unknown_keys(shapes_dir, tmp_path, capsys):
    assert main(["tokenizer", "train", "text", "--data", str(shapes_dir / "train-*.tar"),
                 "--out", str(tmp_path / "t"), "vocab_sise=10"]) == 2
    assert "vocab_sise" in capsys.readouterr().err
    assert TextTokenizerConfig().num_sentinels == 16


def test_autotokenizer_adds_cls_sep_and_pairs_like_bert(trained):
    """tok("text") adds <cls> ... <sep> as BERT users expect (omnimask encodes without);
    a pair gets <sep> between and token types 0 then 1."""
    from transformers import AutoTokenizer

    ours = TextTokenizer.load(trained)
    hf = AutoTokenizer.from_pretrained(str(trained))
    cls_, sep = ours.roles["cls"], ours.roles["sep"]
    a, b = ours.encode("a red square"), ours.encode("left of it")
    assert hf("a red square")["input_ids"] == [cls_, *a, sep]
    pair = hf("a red square", "left of it")
    assert pair["input_ids"] == [cls_, *a, sep, *b, sep]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert "<image>" in hf.all_special_tokens and hf.cls_token == "<cls>"
    config = json.loads((trained / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # every transformers has it
    assert (trained / "omnimask_vocab.json").is_file() and not (trained / "vocab.json").exists()


def test_a_directory_resaved_by_transformers_loads_back(trained, tmp_path):
    from transformers import AutoTokenizer

    ours = TextTokenizer.load(trained)
    AutoTokenizer.from_pretrained(str(trained)).save_pretrained(str(tmp_path / "re"))
    back = TextTokenizer.load(tmp_path / "re")
    assert back.roles == ours.roles
    assert back.encode("two small blue circles") == ours.encode("two small blue circles")
    (tmp_path / "plain").mkdir()
    Tokenizer(models.BPE()).save(str(tmp_path / "plain" / "tokenizer.json"))
    (tmp_path / "plain" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(OmnimaskError, match="without omnimask's special tokens"):
        TextTokenizer.load(tmp_path / "plain")


def test_a_resaved_wordpiece_based_tokenizer_keeps_its_bert_roles(tmp_path):
    """A tokenizer built from a BERT vocabulary fills roles with [CLS], [PAD], ...; re-saved
    by transformers it loads back with the same roles."""
    from transformers import AutoTokenizer

    wp = Tokenizer(models.WordPiece({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3,
                                     "[MASK]": 4, "red": 5, "square": 6}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.save(str(tmp_path / "wp.json"))
    ours = TextTokenizer.from_file(tmp_path / "wp.json", num_sentinels=2)
    ours.save(tmp_path / "tok")
    AutoTokenizer.from_pretrained(str(tmp_path / "tok")).save_pretrained(str(tmp_path / "re"))
    back = TextTokenizer.load(tmp_path / "re")
    assert back.roles == ours.roles and back.roles["cls"] == 2
    assert back.encode("red square") == ours.encode("red square") == [5, 6]
