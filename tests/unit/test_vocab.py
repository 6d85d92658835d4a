"""The shared id space: round trips over every range, persistence, mismatches fail loudly."""

import pytest
import torch

from omnimask.modalities.vocab import Vocab, VocabMismatch


def _vocab():
    return Vocab(text_size=100, image_codes=1024, speech_units=500,
                 specials={"pad": 0, "mask": 3, "mask:0": 10}, text_fingerprint="abc")


def test_ranges_are_contiguous_and_disjoint():
    v = _vocab()
    r = v.ranges()
    assert r == {"text": (0, 100), "image": (100, 1124), "speech": (1124, 1624)} and v.size == 1624


def test_roundtrips_over_all_ranges():
    v = _vocab()
    codes, units, text = torch.arange(1024), torch.arange(500), torch.arange(100)
    assert torch.equal(v.to_image(v.from_image(codes)), codes)
    assert torch.equal(v.to_speech(v.from_speech(units)), units)
    assert torch.equal(v.from_text(text), text)
    ids = torch.cat([v.from_text(text), v.from_image(codes), v.from_speech(units)])
    assert torch.equal(ids, torch.arange(v.size))  # every id belongs to exactly one modality
    mod = v.modality_of(ids)
    assert mod.tolist() == [0] * 100 + [1] * 1024 + [2] * 500


@pytest.mark.parametrize("fn,x", [("from_image", 1024), ("from_image", -1), ("from_speech", 500),
                                  ("to_image", 99), ("to_speech", 1123), ("from_text", 100),
                                  ("modality_of", 1624)])
def test_out_of_range_is_an_error(fn, x):
    with pytest.raises(ValueError, match="out of range"):
        getattr(_vocab(), fn)(torch.tensor([x]))


def test_save_load_and_mismatch(tmp_path):
    v = _vocab()
    assert Vocab.load(v.save(tmp_path / "vocab.json")) == v
    v.check_compatible(Vocab.load(tmp_path / "vocab.json"))
    other = Vocab(text_size=101, image_codes=1024, speech_units=500,
                  specials={"pad": 0, "mask": 3, "mask:0": 10}, text_fingerprint="abd")
    with pytest.raises(VocabMismatch, match="text_size: model 100 vs tokenizer 101.*text_fingerprint"):
        v.check_compatible(other)
    with pytest.raises(VocabMismatch, match="no special token 'cls'"):
        v.special("cls")
    with pytest.raises(ValueError, match="outside the text range"):
        Vocab(text_size=5, specials={"pad": 7})


def test_tokenizers_assemble_and_mismatch_fails(tmp_path, shapes_dir):
    from omnimask.cli import main
    from omnimask.modalities.tokenizers import build_vocab, check_tokenizers

    data = str(shapes_dir / "train-*.tar")
    for name, extra in (("t1", ["vocab_size=400"]), ("t2", ["vocab_size=300"])):
        assert main(["tokenizer", "train", "text", "--data", data, "--out",
                     str(tmp_path / name), *extra, "-q"]) == 0
    assert main(["tokenizer", "train", "speech", "--data", data, "--out", str(tmp_path / "s"),
                 "codebook_size=256", "-q"]) == 0
    v = build_vocab(tmp_path / "t1", speech_dir=tmp_path / "s")
    assert v.speech_units == 256 and v.image_codes == 0 and v.size == v.text_size + 256
    saved = Vocab.load(v.save(tmp_path / "model" / "vocab.json"))  # as a model would keep it
    check_tokenizers(saved, tmp_path / "t1", speech_dir=tmp_path / "s")
    with pytest.raises(VocabMismatch, match="text_size"):
        check_tokenizers(saved, tmp_path / "t2", speech_dir=tmp_path / "s")
    with pytest.raises(VocabMismatch, match="speech_units"):
        check_tokenizers(saved, tmp_path / "t1")
