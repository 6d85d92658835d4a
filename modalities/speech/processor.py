"""Speech processor: FLAC -> float32 waveform tensor at 16 kHz."""

from __future__ import annotations

import torch

from ..base import register_processor

SAMPLE_RATE = 16000


@register_processor("speech", keys=("speech.flac",))
def make_speech(cfg):
    def fn(d):
        audio, sr = d["speech.flac"]
        wav = torch.from_numpy(audio)
        if sr != SAMPLE_RATE:
            import torchaudio.functional as F

            wav = F.resample(wav, sr, SAMPLE_RATE)
        if wav.numel() == 0:
            raise ValueError("speech.flac holds no audio")
        return {"speech": wav}

    return fn
