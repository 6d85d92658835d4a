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

SCHEMA_VERSION = 1
SPEECH_SAMPLE_RATE = 16000
KEYS = ("image.png", "caption.txt", "qa.json", "seg.png", "inst.png", "refs.json",
        "speech.flac", "meta.json")
IMAGE_KEYS = ("image.png", "seg.png", "inst.png")


def manifest_fault(man) -> str | None:
    """What makes a parsed ``manifest.json`` unusable (the fields the readers use), or None."""
    if not isinstance(man, dict) or not isinstance(man.get("splits", {}), dict):
        return "not an object with a 'splits' object"
    for split, entry in man.get("splits", {}).items():
        shards = entry.get("shards", []) if isinstance(entry, dict) else None
        keys = entry.get("keys", []) if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not isinstance(keys, list) or not all(
                isinstance(k, str) for k in keys):
            return f"split {split!r} has no list of shards and keys"
        for i, rec in enumerate(shards):
            name = rec.get("name") if isinstance(rec, dict) else None
            ok = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
                  and type(rec.get("samples")) is int and rec["samples"] >= 0
                  and isinstance(rec.get("sha256", ""), str))
            if not ok:
                return (f"split {split!r}, shard {i}: needs a file name, a sample count and "
                        f"a SHA-256")
    return None


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """``compress_level=0`` stores the pixels deflate-free: larger, faster to decode."""
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
MAX_IMAGE_PIXELS = 4096 * 4096  # default limit on width x height (``data.max_image_pixels``)
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # interlace passes: x0, y0, dx, dy
_FILTERS = bytes(range(5))  # the row filter types PNG defines


class ContentError(ValueError):
    """Bytes that decode but break what the schema promises; ``kind`` says how
    (``too_large``: above the pixel limit; ``mismatch``: not the declared format)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _png_pixels(stream, width: int, height: int, depth: int, colour: int, interlace: int) -> None:
    """Inflate the pixel data as far as the image needs and check every row's filter type.

    libpng errors while reading rows crash torchvision's decoder (SIGSEGV, not an
    exception), so a PNG whose CRCs are fine but whose pixel data is short, long, does not
    inflate or end, or has a bad filter byte must be refused before it gets there.
    """
    bits = _PNG_CHANNELS[colour] * depth
    passes, total = [], 0
    for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            stride = 1 + (w * bits + 7) // 8  # a filter byte, then the packed samples
            passes.append((total, h, stride))
            total += h * stride
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(stream, total + 1)  # bounded: one byte more than needed
    except zlib.error as e:
        raise ValueError(f"PNG pixel data does not inflate ({e})") from None
    if len(raw) != total or not inflate.eof:  # libpng needs the stream to end in IDAT too
        raise ValueError(f"PNG pixel data is {len(raw)} bytes"
                         f"{'' if inflate.eof else ' and does not end'}; the image needs {total}")
    for start, h, stride in passes:
        if raw[start:start + h * stride:stride].translate(None, _FILTERS):
            raise ValueError("PNG has a row with an unknown filter type")


def check_png(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """Validate a PNG before decoding it; return (width, height).

    Checks the signature, every chunk's CRC (PIL skips the CRC of image data), the IHDR
    fields, the pixel count against ``max_pixels`` (read from IHDR, so a decompression
    bomb costs nothing) and that the pixel data inflates to what the image needs.
    ``ContentError("too_large")`` above the limit, ``ValueError`` for anything broken.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    view, end = memoryview(data), len(data)
    if end < 33 or data[8:16] != b"\0\0\0\rIHDR":
        raise ValueError("PNG does not start with an IHDR chunk")
    if zlib.crc32(view[12:29]) != struct.unpack_from(">I", data, 29)[0]:
        raise ValueError("PNG chunk b'IHDR' has a bad CRC")
    width, height, depth, colour, method, filt, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if (not 0 < width < 1 << 31 or not 0 < height < 1 << 31 or method or filt or interlace > 1
            or depth not in _PNG_DEPTHS.get(colour, ())):
        raise ValueError(f"PNG IHDR is invalid ({width}x{height}, depth {depth}, colour type "
                         f"{colour}, interlace {interlace})")
    if max_pixels is not None and width * height > max_pixels:
        raise ContentError("too_large", f"image is {width}x{height} pixels, above the limit of "
                                        f"{max_pixels} (data.max_image_pixels)")
    pos, idat, after_idat = 33, [], False
    while pos + 12 <= end:
        (length,) = struct.unpack_from(">I", data, pos)
        if pos + 12 + length > end:
            break
        kind = data[pos + 4:pos + 8]
        if zlib.crc32(view[pos + 4:pos + 8 + length]) != struct.unpack_from(">I", data, pos + 8 + length)[0]:
            raise ValueError(f"PNG chunk {kind!r} has a bad CRC")
        if kind == b"IDAT":
            if after_idat:
                raise ValueError("PNG IDAT chunks are not consecutive")
            idat.append(view[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            if not idat:
                raise ValueError("PNG has no IDAT chunk")
            _png_pixels(idat[0] if len(idat) == 1 else b"".join(idat), width, height, depth,
                        colour, interlace)
            return width, height
        elif idat:
            after_idat = True
        pos += 12 + length
    raise ValueError("PNG is truncated (no IEND chunk)")


def _png_op():
    """torchvision's libpng op, called directly: its Python wrapper (deprecated in 0.29 in
    favour of torchcodec) costs as much as decoding a 64 px mask. Its library is loaded
    alone: importing torchvision imports torch._dynamo (~4 s per process). None if
    unavailable."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("torchvision")
    for where in (spec.submodule_search_locations or []) if spec else []:
        for name in ("image_stable.so", "image.so"):  # torchvision >= 0.29, before
            if os.path.isfile(os.path.join(where, name)):
                try:
                    torch.ops.load_library(os.path.join(where, name))
                    return torch.ops.image.decode_png
                except (OSError, AttributeError, RuntimeError):
                    pass
    try:  # another layout: the package registers the op itself
        import torchvision  # noqa: F401

        return torch.ops.image.decode_png
    except (ImportError, AttributeError, RuntimeError):
        return None


_PNG_OP = _png_op()
_RGB, _ANY = 3, 0  # torchvision.io.ImageReadMode.RGB and .UNCHANGED


def decode_png_pil(data: bytes, rgb: bool = False) -> torch.Tensor:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        if rgb and im.mode != "RGB":
            im = im.convert("RGB")
        arr = np.array(im)
    t = torch.from_numpy(arr)
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t


def decode_png(data: bytes, rgb: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS
               ) -> torch.Tensor:
    """PNG bytes -> uint8 tensor, ``[3, H, W]`` when ``rgb`` else ``[H, W]`` (or ``[C, H, W]``).

    :func:`check_png` runs first (CRCs, pixel limit, pixel data). libpng via torchvision
    when present (PIL otherwise).
    """
    check_png(data, max_pixels)
    if _PNG_OP is None:
        return decode_png_pil(data, rgb)
    t = _PNG_OP(torch.frombuffer(bytearray(data), dtype=torch.uint8), _RGB if rgb else _ANY, False)
    return t if rgb or t.shape[0] != 1 else t[0]


def decode_flac(data: bytes, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Return (float32 mono samples in [-1, 1], sample rate).

    16-bit files are checked against the MD5 of the audio stored in STREAMINFO, so a
    flipped byte that the FLAC decoder would paper over is reported as corruption. With
    ``sample_rate``, another rate in STREAMINFO is ``ContentError("mismatch")``, found
    before decoding (the MD5 covers the samples, not the rate they are played at).
    """
    if not data.startswith(b"fLaC"):
        raise ValueError("not a FLAC stream (bad signature)")
    if len(data) < 42 or data[4] & 0x7F or data[5:8] != b"\0\0\x22":
        raise ValueError("FLAC stream does not start with its STREAMINFO block")
    rate = data[18] << 12 | data[19] << 4 | data[20] >> 4
    if sample_rate is not None and rate != sample_rate:
        raise ContentError("mismatch", f"sample rate is {rate} Hz, the schema declares "
                                       f"{sample_rate} Hz")
    audio, sr = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    md5 = data[26:42]
    bits = ((data[20] & 0x1) << 4 | data[21] >> 4) + 1
    if bits == 16 and md5.strip(b"\0") and hashlib.md5(audio.astype("<i2").tobytes()).digest() != md5:
        raise ValueError("FLAC audio does not match its MD5 signature")
    mono = audio.astype(np.float32).mean(axis=1) / 32768.0
    return mono, sr


def decode_text(data: bytes) -> str:
    return data.decode("utf-8")


def decode_json(data: bytes):
    return json.loads(data.decode("utf-8"))


def decode_value(name: str, data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS,
                 sample_rate: int | None = None):
    """Decode one member by its extension (``image.png`` -> ``[3, H, W]`` uint8 tensor, ...)."""
    ext = name.rsplit(".", 1)[-1]
    if name == "image.png":
        return decode_png(data, True, max_pixels)
    if ext == "png":
        return decode_png(data, False, max_pixels)
    if ext == "flac":
        return decode_flac(data, sample_rate)
    if ext == "json":
        return decode_json(data)
    if ext in ("txt", "cls"):
        return decode_text(data)
    return data


def wds_decoder(key: str, data: bytes):
    """A ``webdataset`` decode handler for these shards, for readers that use webdataset
    itself: ``WebDataset(urls).decode(wds_decoder)`` gives each member as omnimask's reader
    does (``image.png`` -> uint8 ``[3, H, W]``, mask PNGs -> ``[H, W]``, ``speech.flac`` ->
    (float32 mono, rate) through soundfile, JSON, text). webdataset's own ``torch_audio``
    needs torchaudio's torchcodec backend, which omnimask does not install."""
    name = key.lstrip(".")
    if name.rsplit(".", 1)[-1] not in ("png", "flac", "json", "txt", "cls"):
        return None  # not ours: the next handler (or the raw bytes)
    return decode_value(name, data)


class SampleError(Exception):
    """A sample that cannot be used; ``kind`` is one of truncated, missing_key, corrupt,
    too_large (an image above the pixel limit), mismatch (audio not at the declared rate)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def decode_sample(files: dict[str, bytes], keys, problem: str | None = None, *,
                  max_pixels: int | None = MAX_IMAGE_PIXELS,
                  sample_rate: int | None = SPEECH_SAMPLE_RATE) -> dict:
    """Decode ``keys`` of one sample's members; raise :class:`SampleError` if it is unusable.

    Images above ``max_pixels`` and audio at another rate than ``sample_rate`` are unusable.
    """
    if problem:
        raise SampleError("truncated", problem)
    missing = [k for k in keys if k not in files]
    if missing:
        raise SampleError("missing_key", f"missing {', '.join(missing)}")
    out = {}
    for k in keys:
        try:
            out[k] = decode_value(k, files[k], max_pixels, sample_rate)
        except ContentError as e:
            raise SampleError(e.kind, f"{k}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt member
            raise SampleError("corrupt", f"cannot decode {k}: {e}") from None
    return out
