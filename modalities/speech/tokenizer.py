"""Speech tokenizer: waveform -> fbank stacks -> unit ids (BEST-RQ or k-means).

Saved as a directory: ``speech_tokenizer.json`` (config and fit statistics) and
``quantizer.safetensors`` (projection and codebook, or the k-means centroids).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from omnimask.config import DataConfig, check_choice, check_fields, load_config
from omnimask.errors import OmnimaskError
from omnimask.registry import TOKENIZERS

from ..artifacts import code_stats, load_artifact, save_artifact
from ..kmeans import assign
from .features import features
from .quantizers import BestRQ, KMeansUnits

META = "speech_tokenizer.json"
WEIGHTS = "quantizer.safetensors"
DEFAULT_SIZE = {"bestrq": 1024, "kmeans": 500}


@dataclass
class SpeechTokenizerConfig:
    kind: str = "bestrq"  # bestrq | kmeans
    codebook_size: int = 0  # 0: 1024 for bestrq, 500 for kmeans
    code_dim: int = 16  # bestrq projection size
    num_mel_bins: int = 80
    stack: int = 4  # frames per unit: 4 x 10 ms = 40 ms, 25 units/s
    seed: int = 0
    iterations: int = 25  # kmeans
    max_frames: int = 400_000  # kmeans: fit on at most this many (random) stacked frames

    def __post_init__(self) -> None:
        check_choice(self, "kind", DEFAULT_SIZE)
        check_fields(self, ">=0", "codebook_size")
        check_fields(self, ">=1", "code_dim", "num_mel_bins", "stack", "iterations",
                     "max_frames")
        self.codebook_size = self.codebook_size or DEFAULT_SIZE[self.kind]


class SpeechTokenizer:
    def __init__(self, cfg: SpeechTokenizerConfig, quantizer: torch.nn.Module,
                 stats: dict | None = None) -> None:
        self.cfg, self.quantizer, self.stats = cfg, quantizer, stats or {}

    @property
    def size(self) -> int:
        return self.quantizer.size

    @property
    def units_per_second(self) -> float:
        return 100.0 / self.cfg.stack

    def features(self, wave, sr: int, name: str = "audio") -> torch.Tensor:
        return features(wave, sr, self.cfg.num_mel_bins, self.cfg.stack, name)

    def encode(self, wave, sr: int, name: str = "audio") -> torch.Tensor:
        """Waveform ([T] or [channels, T], any sample rate) -> unit ids [T / (10 ms * stack)]."""
        return self.quantizer(self.features(wave, sr, name))

    def save(self, directory: str | os.PathLike) -> Path:
        return save_artifact(directory, META, {"config": asdict(self.cfg), "stats": self.stats,
                                               "size": self.size},
                             WEIGHTS, self.quantizer.state_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SpeechTokenizer:
        info, tensors = load_artifact(directory, META, WEIGHTS, "a speech tokenizer")
        cfg = SpeechTokenizerConfig(**info["config"])
        if cfg.kind == "bestrq":
            q = BestRQ(cfg.num_mel_bins * cfg.stack, cfg.codebook_size, cfg.code_dim, cfg.seed)
            q.load_state_dict(tensors)
        else:
            q = KMeansUnits(tensors["centroids"])
        return cls(cfg, q, info.get("stats"))


def _utterances(data, progress: bool):
    from omnimask.train.data.pipeline import ShardLoader

    cfg = DataConfig(shards=list(data), processors=["speech"], batch_size=64, shuffle_buffer=0,
                     shuffle_shards=False)
    for b in ShardLoader(cfg, rank=0, world_size=1):
        yield from zip(b["__key__"], b["speech"])


@TOKENIZERS.register("speech")
class SpeechTokenizerOps:
    config = SpeechTokenizerConfig

    @staticmethod
    def train(data, out, overrides=(), progress: bool = True) -> dict:
        cfg = load_config(SpeechTokenizerConfig, None, overrides)
        t0 = time.perf_counter()
        if cfg.kind == "bestrq":  # nothing to fit: the seed makes it
            if next(iter(_utterances(data, False)), None) is None:  # yet it needs speech
                raise OmnimaskError(f"no speech found in the shards {list(data)}: a speech "
                                    "tokenizer for them would never see an utterance")
            q = BestRQ(cfg.num_mel_bins * cfg.stack, cfg.codebook_size, cfg.code_dim, cfg.seed)
            stats = {}
        else:
            feats = [features(w, 16000, cfg.num_mel_bins, cfg.stack, k)
                     for k, w in _utterances(data, progress)]
            if not feats:
                raise OmnimaskError("no speech found in the shards")
            x = torch.cat(feats)
            if x.shape[0] > cfg.max_frames:
                g = torch.Generator().manual_seed(cfg.seed)
                x = x[torch.randperm(x.shape[0], generator=g)[: cfg.max_frames]]
            q, stats = KMeansUnits.fit(x, cfg.codebook_size, cfg.iterations, cfg.seed,
                                       progress=progress)
            stats.update(utterances=len(feats), frames=int(x.shape[0]))
        stats["fit_seconds"] = round(time.perf_counter() - t0, 2)
        tok = SpeechTokenizer(cfg, q, stats)
        tok.save(out)
        return {"kind": f"speech-{cfg.kind}", "out": str(out), "size": tok.size,
                "fit_seconds": stats["fit_seconds"], **({"inertia": stats["inertia"],
                                                          "usage": stats["usage"]}
                                                         if cfg.kind == "kmeans" else {})}

    @staticmethod
    def evaluate(tokenizer, data, progress: bool = True) -> dict:
        tok = SpeechTokenizer.load(tokenizer)
        ids, d2, seconds, t_enc = [], [], 0.0, 0.0
        for key, wave in _utterances(data, progress):
            t0 = time.perf_counter()
            f = tok.features(wave, 16000, key)
            u = tok.quantizer(f)
            t_enc += time.perf_counter() - t0
            ids.append(u)
            seconds += wave.numel() / 16000
            if tok.cfg.kind == "kmeans":
                d2.append(assign(f, tok.quantizer.centroids)[1])
        if not ids:
            raise OmnimaskError("no speech found in the shards")
        all_ids = torch.cat(ids)
        out = {"kind": f"speech-{tok.cfg.kind}", "size": tok.size, "utterances": len(ids),
               "audio_seconds": round(seconds, 1), **code_stats(all_ids, tok.size),
               "units_per_second": tok.units_per_second,
               "encode_audio_seconds_per_second": round(seconds / max(t_enc, 1e-9), 1)}
        if d2:
            out["inertia"] = float(torch.cat(d2).mean())
        return out
