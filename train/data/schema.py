"""The sample schema shared by ShapesWorld, the converters and the reader.

One sample is a group of tar members ``<key>.<ext>``. ``SCHEMA_VERSION`` is written into
every ``manifest.json``; bump it when a key changes meaning.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from torchvision.io import ImageReadMode

SCHEMA_VERSION = 1
SPEECH_SAMPLE_RATE = 16000
KEYS = ("image.png", "caption.txt", "qa.json", "seg.png", "inst.png", "refs.json",
        "speech.flac", "meta.json")
IMAGE_KEYS = ("image.png", "seg.png", "inst.png")


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """``compress_level=0`` stores the pixels deflate-free: larger, ~3x faster to decode."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def encode_flac(audio_int16: np.ndarray, sample_rate: int = SPEECH_SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio_int16, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(data: bytes) -> None:
    """Verify the signature and every chunk's CRC (PIL skips the CRC of image data)."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    pos, end = len(PNG_SIGNATURE), len(data)
    while pos + 12 <= end:
        (length,) = struct.unpack_from(">I", data, pos)
        body = data[pos + 4:pos + 8 + length]
        if pos + 12 + length > end:
            break
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(body) != crc:
            raise ValueError(f"PNG chunk {body[:4]!r} has a bad CRC")
        if body[:4] == b"IEND":
            return
        pos += 12 + length
    raise ValueError("PNG is truncated (no IEND chunk)")


def _png_op():
    """torchvision's libpng op, called directly: its Python wrapper (deprecated in 0.29 in
    favour of torchcodec) costs as much as decoding a 64 px mask. None if unavailable."""
    try:
        import torchvision  # noqa: F401  (registers torch.ops.image)

        return torch.ops.image.decode_png
    except (ImportError, AttributeError, RuntimeError):
        return None


_PNG_OP = _png_op()
_RGB, _ANY = ImageReadMode.RGB.value, ImageReadMode.UNCHANGED.value


def decode_png_pil(data: bytes, rgb: bool = False) -> torch.Tensor:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        if rgb and im.mode != "RGB":
            im = im.convert("RGB")
        arr = np.array(im)
    t = torch.from_numpy(arr)
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t


def decode_png(data: bytes, rgb: bool = False) -> torch.Tensor:
    """PNG bytes -> uint8 tensor, ``[3, H, W]`` when ``rgb`` else ``[H, W]`` (or ``[C, H, W]``).

    Chunk CRCs are verified first. libpng via torchvision when present (PIL otherwise).
    """
    check_png(data)
    if _PNG_OP is None:
        return decode_png_pil(data, rgb)
    t = _PNG_OP(torch.frombuffer(bytearray(data), dtype=torch.uint8), _RGB if rgb else _ANY, False)
    return t if rgb or t.shape[0] != 1 else t[0]


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """Return (float32 mono samples in [-1, 1], sample rate).

    16-bit files are checked against the MD5 of the audio stored in STREAMINFO, so a
    flipped byte that the FLAC decoder would paper over is reported as corruption.
    """
    if not data.startswith(b"fLaC"):
        raise ValueError("not a FLAC stream (bad signature)")
    audio, sr = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    md5 = data[26:42] if len(data) >= 42 else b""
    bits = ((data[20] & 0x1) << 4 | data[21] >> 4) + 1 if len(data) >= 22 else 0
    if bits == 16 and md5.strip(b"\0") and hashlib.md5(audio.astype("<i2").tobytes()).digest() != md5:
        raise ValueError("FLAC audio does not match its MD5 signature")
    mono = audio.astype(np.float32).mean(axis=1) / 32768.0
    return mono, sr


def decode_text(data: bytes) -> str:
    return data.decode("utf-8")


def decode_json(data: bytes):
    return json.loads(data.decode("utf-8"))


def decode_value(name: str, data: bytes):
    """Decode one member by its extension (``image.png`` -> ``[3, H, W]`` uint8 tensor, ...)."""
    ext = name.rsplit(".", 1)[-1]
    if name == "image.png":
        return decode_png(data, rgb=True)
    if ext == "png":
        return decode_png(data)
    if ext == "flac":
        return decode_flac(data)
    if ext == "json":
        return decode_json(data)
    if ext in ("txt", "cls"):
        return decode_text(data)
    return data


class SampleError(Exception):
    """A sample that cannot be used; ``kind`` is one of truncated, missing_key, corrupt."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def decode_sample(files: dict[str, bytes], keys, problem: str | None = None) -> dict:
    """Decode ``keys`` of one sample's members; raise :class:`SampleError` if it is unusable."""
    if problem:
        raise SampleError("truncated", problem)
    missing = [k for k in keys if k not in files]
    if missing:
        raise SampleError("missing_key", f"missing {', '.join(missing)}")
    out = {}
    for k in keys:
        try:
            out[k] = decode_value(k, files[k])
        except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt member
            raise SampleError("corrupt", f"cannot decode {k}: {e}") from None
    return out
