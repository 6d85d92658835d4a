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
