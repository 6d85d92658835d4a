"""Assemble ShapesWorld samples and write them as webdataset shards, in parallel.

Sample ``i`` of split ``s`` is a pure function of ``(seed, s, i)``: worker processes make
samples in any order and the writer puts them into shards in index order, so the same
arguments always give byte-identical shards.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from ..schema import encode_flac, encode_json, encode_png
from ..shards import ShardSink
from .language import captions, questions, referring_expressions, relations
from .scene import sample_scene
from .vocab import SPLITS

GENERATOR_VERSION = "1.1.0"  # 1.1: questions name the instances they look at
SPEECH_SAMPLE_RATE = 16000

_state: dict = {}


def _speech_tools():
    """Per-process eSpeak NG and resampler, made on first use (again in a forked worker)."""
    from ..espeak import get_espeak

    tts = get_espeak()
    if _state.get("espeak") is not tts:
        import torchaudio

        _state["espeak"] = tts
        _state["resample"] = torchaudio.transforms.Resample(tts.sample_rate, SPEECH_SAMPLE_RATE)
    return tts, _state["resample"]


def _speak(text: str, rng: np.random.Generator) -> tuple[bytes, dict]:
    import torch

    from ..espeak import Voice

    tts, resample = _speech_tools()
    voice = Voice.sample(rng)
    raw = tts.synth(text, voice)
    with torch.no_grad():
        wav = resample(torch.from_numpy(raw.astype(np.float32) / 32768.0)).numpy()
    pad = np.zeros(int(0.1 * SPEECH_SAMPLE_RATE), np.float32)
    wav = np.concatenate([pad, wav, pad])
    pcm = np.clip(np.rint(wav * 32767.0), -32768, 32767).astype(np.int16)
    info = {"voice": voice.name, "rate": voice.rate, "pitch": voice.pitch,
            "sample_rate": SPEECH_SAMPLE_RATE, "num_samples": int(pcm.size)}
    return encode_flac(pcm, SPEECH_SAMPLE_RATE), info


def make_sample(seed: int, split: str, index: int, image_size: int = 64,
                speech: bool = True, question_rounds: int = 1) -> dict[str, bytes | str]:
    """Return one sample as ``{"__key__": ..., "image.png": bytes, ...}``;
    ``question_rounds``: the question programs drawn that many times for the scene (each
    round from its own generator, repeats dropped), round 1 as with one round."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    objs, image, seg, inst = sample_scene(rng, split, image_size)
    caps = captions(objs, image_size, rng)
    qa = questions(objs, image_size, rng)
    refs = referring_expressions(objs, image_size, rng)
    rels = [{"subject": a.id, "relation": r, "object": b.id}
            for a in objs for b in objs if a is not b for r in relations(a, b, image_size)]
    meta = {"generator": "shapesworld", "generator_version": GENERATOR_VERSION, "seed": seed,
            "split": split, "index": index, "image_size": image_size,
            "objects": [o.to_json() for o in objs], "relations": rels}
    sample: dict[str, bytes | str] = {
        "__key__": f"{split}-{index:08d}",
        # Stored PNGs (no deflate): larger but faster to decode; the spoken caption
        # dominates a sample's size anyway.
        "image.png": encode_png(image, compress_level=0),
        "seg.png": encode_png(seg, compress_level=0),
        "inst.png": encode_png(inst, compress_level=0),
        "caption.txt": "\n".join(caps).encode(),
        "qa.json": encode_json(qa),
        "refs.json": encode_json(refs),
    }
    if speech:
        spoken = int(rng.integers(len(caps)))
        sample["speech.flac"], info = _speak(caps[spoken], rng)
        meta["speech"] = {**info, "caption_index": spoken, "text": caps[spoken]}
    asked = {q["question"] for q in qa}
    for r in range(1, question_rounds):  # after everything else: round 1 stays as it was
        for q in questions(objs, image_size,
                           np.random.default_rng([seed, SPLITS.index(split), index, r])):
            if q["question"] not in asked:
                asked.add(q["question"])
                qa.append(q)
    if question_rounds > 1:
        sample["qa.json"] = encode_json(qa)
    sample["meta.json"] = encode_json(meta)
    return sample


def _work(args: tuple) -> dict:
    return make_sample(*args)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already


def generate_shards(out: str | os.PathLike, num: int, seed: int = 0, split: str = "train",
                    image_size: int = 64, shard_size: int = 1000, speech: bool = True,
                    workers: int = 0, progress: bool = True, question_rounds: int = 1) -> dict:
    """Write ``num`` samples of ``split`` into ``out/<split>-NNNNNN.tar``; update the manifest.
    ``question_rounds``: see :func:`make_sample`.

    Returns the split's manifest entry.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if num < 1 or shard_size < 1 or image_size < 16 or question_rounds < 1:
        raise ValueError("num, shard_size and question_rounds must be >= 1 and image_size "
                         ">= 16")
    workers = workers or os.cpu_count() or 1
    workers = max(1, min(workers, math.ceil(num / 8)))
    keys = ["caption.txt", "image.png", "inst.png", "meta.json", "qa.json", "refs.json",
            "seg.png"] + (["speech.flac"] if speech else [])
    info = {"generator": "shapesworld", "generator_version": GENERATOR_VERSION, "seed": seed,
            "image_size": image_size, "keys": sorted(keys)}
    if question_rounds > 1:
        info["question_rounds"] = question_rounds
    jobs = ((seed, split, i, image_size, speech, question_rounds) for i in range(num))
    with ShardSink(Path(out), split, shard_size, info, total=num, progress=progress) as sink:
        if workers == 1:
            for job in jobs:
                sink.write(_work(job))
        else:
            # fork (like torch's DataLoader): no re-import of the caller's __main__; workers set
            # torch to one thread before they use it.
            with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
                for sample in pool.imap(_work, jobs, chunksize=8):
                    sink.write(sample)
    return sink.entry
