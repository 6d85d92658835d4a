"""Offline text-to-speech with eSpeak NG through ctypes (the ``espeakng-loader`` wheel).

eSpeak NG keeps state between utterances (pitch flutter phase, noise generator), so the
same text twice gives different samples. Each utterance is therefore synthesised in a
forked child of a process that has just initialised the library: every utterance starts
from the same memory state, which makes synthesis bit-exact for given text and settings.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

ESPEAK_RATE, ESPEAK_PITCH, ESPEAK_RANGE = 1, 3, 4
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
BASE_VOICES = ("en-us", "en", "en-gb-scotland", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")


@dataclass(frozen=True)
class Voice:
    name: str  # e.g. "en-us+f3"
    rate: int  # words per minute
    pitch: int  # 0-99
    seed: int  # eSpeak's noise generator seed

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Voice:
        base = BASE_VOICES[int(rng.integers(len(BASE_VOICES)))]
        var = VARIANTS[int(rng.integers(len(VARIANTS)))]
        return cls(f"{base}+{var}", int(rng.integers(120, 201)), int(rng.integers(25, 76)),
                   int(rng.integers(1 << 30)))


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


_INSTANCE: Espeak | None = None


def get_espeak() -> Espeak:
    """The process's eSpeak NG. The library must be initialised once per process: a second
    ``espeak_Initialize`` leaves it in a state where synthesis crashes."""
    global _INSTANCE
    if _INSTANCE is None:
        _INSTANCE = Espeak()
    return _INSTANCE


class Espeak:
    """eSpeak NG, initialised; :meth:`synth` returns int16 samples. Use :func:`get_espeak`."""

    def __init__(self) -> None:
        if _INSTANCE is not None:
            raise RuntimeError("eSpeak NG is initialised already; use get_espeak()")
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._chunks: list[np.ndarray] = []
        self._cb = _CALLBACK(self._on_audio)  # keep a reference: C holds the pointer
        self.sample_rate = self._lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak_Initialize failed")
        self._lib.espeak_SetSynthCallback(self._cb)

    def _on_audio(self, wav, n, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def _synth_here(self, text: str, voice: Voice) -> np.ndarray:
        self._chunks.clear()
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice.name!r}")
        self._lib.espeak_ng_SetRandSeed(voice.seed)
        self._lib.espeak_SetParameter(ESPEAK_RATE, voice.rate, 0)
        self._lib.espeak_SetParameter(ESPEAK_PITCH, voice.pitch, 0)
        data = text.encode()
        self._lib.espeak_Synth(data, ctypes.c_size_t(len(data) + 1), 0, POS_CHARACTER, 0,
                               ESPEAK_CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, np.int16)
        return np.concatenate(self._chunks)

    def synth(self, text: str, voice: Voice) -> np.ndarray:
        """Speak ``text``; bit-exact for the same (text, voice)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: synthesise from the pristine state, send bytes, exit at once
            code = 0
            try:
                os.close(r)
                payload = self._synth_here(text, voice).tobytes()
                with os.fdopen(w, "wb") as f:
                    f.write(payload)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            payload = f.read()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"eSpeak NG failed on {text!r} with voice {voice.name!r}")
        return np.frombuffer(payload, np.int16)
