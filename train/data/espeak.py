"""Offline text-to-speech with eSpeak NG through ctypes (the ``espeakng-loader`` wheel).

eSpeak NG keeps state between utterances (pitch flutter phase, noise generator), so the
same text twice gives different samples. Each utterance is therefore synthesised in a
forked child of a process that has just initialised the library: every utterance starts
from the same memory state, which makes synthesis bit-exact for given text and settings.
That process is a small zygote (``espeak_zygote.py``) rather than the caller: forking a
process that holds torch cost more than the synthesis itself.
"""

from __future__ import annotations

import atexit
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

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


_INSTANCE: Espeak | None = None


def get_espeak() -> Espeak:
    """The process's eSpeak NG (a forked worker gets its own: pipes are not shared)."""
    global _INSTANCE
    if _INSTANCE is None or _INSTANCE.owner != os.getpid():
        _INSTANCE = Espeak(_private=True)
    return _INSTANCE


class Espeak:
    """eSpeak NG in its zygote; :meth:`synth` returns int16 samples. Use :func:`get_espeak`."""

    def __init__(self, _private: bool = False) -> None:
        if not _private:
            raise RuntimeError("one eSpeak NG per process: use get_espeak()")
        self.owner = os.getpid()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "omnimask.train.data.espeak_zygote"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        atexit.register(self.close)
        self.sample_rate = self._read_length("initialise")
        if self.sample_rate <= 0:
            raise RuntimeError("espeak_Initialize failed")

    def _read_length(self, what: str) -> int:
        head = self._proc.stdout.read(8)
        if len(head) != 8:
            raise RuntimeError(f"eSpeak NG's process ended ({what}; exit code "
                               f"{self._proc.poll()})")
        return struct.unpack("<q", head)[0]

    def close(self) -> None:
        if self.owner == os.getpid() and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def synth(self, text: str, voice: Voice) -> np.ndarray:
        """Speak ``text``; bit-exact for the same (text, voice)."""
        if self.owner != os.getpid():
            raise RuntimeError("this eSpeak NG belongs to another process: call get_espeak() "
                               "in each process")
        req = {"text": text, "voice": voice.name, "rate": voice.rate, "pitch": voice.pitch,
               "seed": voice.seed}
        self._proc.stdin.write(json.dumps(req).encode() + b"\n")
        self._proc.stdin.flush()
        n = self._read_length(f"speaking {text!r}")
        if n < 0:
            raise RuntimeError(f"eSpeak NG failed on {text!r} with voice {voice.name!r}")
        payload = self._proc.stdout.read(n)
        return np.frombuffer(payload, np.int16)
