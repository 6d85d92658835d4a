"""Speech features: 16 kHz mono waveform -> 80-dim log-mel fbank (25 ms / 10 ms) ->
per-utterance mean/variance normalisation -> stacks of frames (4 -> 40 ms)."""

from __future__ import annotations

import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

from omnimask.errors import OmnimaskError

SAMPLE_RATE = 16000
SILENCE_RMS = 1e-4


def prepare_wave(wave: torch.Tensor, sr: int, name: str = "audio") -> torch.Tensor:
    """Mono float32 at 16 kHz. ``wave``: [T] or [channels, T]; stereo is mixed down.

    Raises :class:`OmnimaskError` naming ``name`` for empty or silent audio.
    """
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.ndim == 2:
        wave = wave.mean(dim=0 if wave.shape[0] <= 8 else 1)  # [C, T] (or [T, C])
    if wave.ndim != 1:
        raise OmnimaskError(f"{name}: expected audio of shape [T] or [channels, T], got "
                            f"{tuple(wave.shape)}")
    if sr <= 0:
        raise OmnimaskError(f"{name}: sample rate must be positive, got {sr}")
    if sr != SAMPLE_RATE:
        wave = AF.resample(wave, sr, SAMPLE_RATE)
    if wave.numel() < 400:  # shorter than one 25 ms window
        raise OmnimaskError(f"{name}: audio is empty or shorter than 25 ms ({wave.numel()} samples)")
    if float(wave.pow(2).mean().sqrt()) < SILENCE_RMS:
        raise OmnimaskError(f"{name}: audio is silent (RMS below {SILENCE_RMS})")
    return wave


def fbank(wave16k: torch.Tensor, num_mel_bins: int = 80) -> torch.Tensor:
    """[T] 16 kHz -> [frames, num_mel_bins] log-mel, normalised per utterance."""
    feats = kaldi.fbank(wave16k[None] * 32768.0, num_mel_bins=num_mel_bins, frame_length=25.0,
                        frame_shift=10.0, dither=0.0, sample_frequency=SAMPLE_RATE,
                        window_type="hamming", use_energy=False)
    return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)


def stack_frames(feats: torch.Tensor, stack: int) -> torch.Tensor:
    """[frames, d] -> [frames // stack, stack * d] (the remainder is dropped)."""
    n = feats.shape[0] // stack
    return feats[: n * stack].reshape(n, stack * feats.shape[1])


def features(wave: torch.Tensor, sr: int, num_mel_bins: int = 80, stack: int = 4,
             name: str = "audio") -> torch.Tensor:
    return stack_frames(fbank(prepare_wave(wave, sr, name), num_mel_bins), stack)
