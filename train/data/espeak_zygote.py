"""eSpeak NG's zygote: a small process that initialises the library once and forks a child
per utterance (run with ``-m`` by ``espeak.py``; imports nothing of omnimask, so a fork here
copies a few megabytes instead of a process that holds torch).

Protocol on stdin/stdout: it writes the sample rate as 8 bytes; then for each request line
(JSON: text, voice, rate, pitch, seed) it answers an 8-byte signed length and that many
bytes of int16 samples, or length -1 when the utterance failed.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys

ESPEAK_RATE, ESPEAK_PITCH = 1, 3
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


def _write(out, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(out, view):]


def main() -> None:
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    chunks: list[bytes] = []

    def on_audio(wav, n, _events) -> int:
        if n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    cb = _CALLBACK(on_audio)
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                 espeakng_loader.get_data_path().encode(), 0)
    lib.espeak_SetSynthCallback(cb)
    out = sys.stdout.fileno()
    _write(out, struct.pack("<q", rate))
    for line in sys.stdin.buffer:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: synthesise from the pristine state, answer, exit at once
            code = 0
            try:
                if lib.espeak_SetVoiceByName(req["voice"].encode()) != 0:
                    raise ValueError(req["voice"])
                lib.espeak_ng_SetRandSeed(req["seed"])
                lib.espeak_SetParameter(ESPEAK_RATE, req["rate"], 0)
                lib.espeak_SetParameter(ESPEAK_PITCH, req["pitch"], 0)
                data = req["text"].encode()
                lib.espeak_Synth(data, ctypes.c_size_t(len(data) + 1), 0, POS_CHARACTER, 0,
                                 ESPEAK_CHARS_UTF8, None, None)
                lib.espeak_Synchronize()
                payload = b"".join(chunks)
                _write(out, struct.pack("<q", len(payload)) + payload)
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            _write(out, struct.pack("<q", -1))


if __name__ == "__main__":
    main()
