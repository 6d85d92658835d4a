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


def test_libpng_op_is_loaded_without_importing_torchvision():
    import subprocess
    import sys

    from torchvision.io import ImageReadMode

    from omnimask.train.data import schema

    assert ImageReadMode.RGB.value == schema._RGB
    assert ImageReadMode.UNCHANGED.value == schema._ANY
    # a fresh process: the reader has the op, and neither torchvision nor torch._dynamo
    # (seconds of import) came with it
    code = ("import sys; from omnimask.train.data import schema; "
            "print(schema._PNG_OP is not None, 'torchvision' in sys.modules, "
            "'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False", "False"]


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


def test_webdataset_reads_our_shards_with_the_decoder(shapes_dir):
    """webdataset itself, with ``wds_decoder``: every member decodes as our reader's does,
    speech included (no torchaudio backend needed)."""
    import tarfile

    import webdataset as wds

    from omnimask.train.data.schema import decode_value, wds_decoder

    shard = sorted(shapes_dir.glob("train-*.tar"))[0]
    got = next(iter(wds.WebDataset(str(shard), shardshuffle=False).decode(wds_decoder)))
    with tarfile.open(shard) as tar:  # the first sample's members, read with the stdlib
        members = {}
        for m in tar:
            key, name = m.name.split(".", 1)
            if key != got["__key__"]:
                break
            members[name] = tar.extractfile(m).read()
    assert {"image.png", "speech.flac", "meta.json"} <= set(members) <= set(got)
    for name, data in members.items():
        want = decode_value(name, data)
        if name == "speech.flac":
            assert got[name][1] == want[1] and np.array_equal(got[name][0], want[0])
        elif isinstance(want, torch.Tensor):
            assert torch.equal(got[name], want)
        else:
            assert got[name] == want
    assert got["image.png"].dtype == torch.uint8 and got["image.png"].shape[0] == 3
