"""Member codecs: both PNG decoders agree; every checksum catches a flipped byte."""

import numpy as np
import pytest
import torch

from omnimask.train.data.schema import (
    SampleError,
    decode_flac,
    decode_png,
    decode_png_pil,
    decode_sample,
    encode_flac,
    encode_png,
)
from omnimask.train.data.shapesworld import make_sample


@pytest.mark.parametrize("key", ["image.png", "seg.png", "inst.png"])
@pytest.mark.parametrize("level", [0, 6])
def test_libpng_op_and_pil_agree(key, level):
    raw = make_sample(4, "train", 2, speech=False)[key]
    arr = decode_png_pil(raw, rgb=key == "image.png")
    again = encode_png(arr.permute(1, 2, 0).numpy() if arr.ndim == 3 else arr.numpy(), level)
    for data in (raw, again):
        a = decode_png(data, rgb=key == "image.png")
        b = decode_png_pil(data, rgb=key == "image.png")
        assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b)


def test_png_crc_catches_every_single_flip():
    data = encode_png(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    for pos in range(8, len(data)):  # every byte after the signature
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(ValueError):
            decode_png(bytes(bad))


def test_flac_roundtrip_and_md5():
    pcm = (np.sin(np.arange(16000) / 10) * 20000).astype(np.int16)
    data = encode_flac(pcm)
    audio, sr = decode_flac(data)
    assert sr == 16000 and np.array_equal(np.rint(audio * 32768).astype(np.int16), pcm)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(Exception):  # noqa: B017 - decoder error or MD5 mismatch
        decode_flac(bytes(bad))


def test_decode_sample_kinds():
    s = make_sample(4, "train", 2, speech=False)
    with pytest.raises(SampleError) as e:
        decode_sample(s, ("image.png", "speech.flac"))
    assert e.value.kind == "missing_key" and "speech.flac" in str(e.value)
    with pytest.raises(SampleError) as e:
        decode_sample({**s, "qa.json": b"[{"}, ("qa.json",))
    assert e.value.kind == "corrupt" and "qa.json" in str(e.value)
    with pytest.raises(SampleError) as e:
        decode_sample(s, ("image.png",), problem="tar ends inside member")
    assert e.value.kind == "truncated"
