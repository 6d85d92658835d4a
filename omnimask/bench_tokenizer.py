"""``omnimask bench tokenizer``: VQ encode images/s and speech encode seconds of audio per second.

Throughput does not depend on training, so tokenizers not given are built untrained
(VQ with the default config, BEST-RQ from its seed, k-means with random centroids).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from .train.data.bench import machine


def bench_tokenizer(data=None, image_tokenizer: str | None = None, num: int = 200,
                    repeats: int = 3, progress: bool = True) -> dict:
    from .modalities.image.tokenizer import ImageTokenizer, load_images
    from .modalities.image.vq import VQVAE, VQConfig
    from .modalities.speech.quantizers import BestRQ, KMeansUnits
    from .modalities.speech.tokenizer import SpeechTokenizer, SpeechTokenizerConfig, _utterances
    from .train.data.shards import expand_shards

    tmp = None
    if not data:
        from .train.data.shapesworld import generate_shards

        tmp = tempfile.TemporaryDirectory(prefix="omnimask-bench-")
        generate_shards(tmp.name, num, seed=1, split="val", shard_size=num, progress=progress)
        data = [os.path.join(tmp.name, "val-*.tar")]
    try:
        shards = expand_shards(data)
        vq = (ImageTokenizer.load(image_tokenizer) if image_tokenizer
              else ImageTokenizer(VQVAE(VQConfig())))
        images = load_images(shards, vq.model.cfg.image_size)
        waves = [w for _, w in _utterances(shards, progress)]
        audio_s = sum(w.numel() for w in waves) / 16000
        res = {"bench": "tokenizer", "device": "cpu", "machine": machine(),
               "config": {"images": len(images), "audio_seconds": round(audio_s, 1),
                          "image_tokenizer": image_tokenizer or "untrained default VQConfig",
                          "threads": torch.get_num_threads(), "repeats": repeats}}

        def best(fn) -> float:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        t = best(lambda: [vq.model.encode(images[i:i + 128]) for i in range(0, len(images), 128)])
        res["image_vq_encode"] = {"images_per_s": round(len(images) / t, 1),
                                  "tokens_per_image": vq.model.cfg.tokens_per_image}
        ids = torch.cat([vq.model.encode(images[i:i + 128]) for i in range(0, len(images), 128)])
        t = best(lambda: [vq.model.decode(ids[i:i + 128]) for i in range(0, len(ids), 128)])
        res["image_vq_decode"] = {"images_per_s": round(len(images) / t, 1)}
        g = torch.Generator().manual_seed(0)
        for kind, q in (("bestrq", BestRQ(320, 1024, 16, 0)),
                        ("kmeans", KMeansUnits(torch.randn(500, 320, generator=g)))):
            tok = SpeechTokenizer(SpeechTokenizerConfig(kind=kind), q)
            t = best(lambda tok=tok: [tok.encode(w, 16000) for w in waves])
            res[f"speech_{kind}_encode"] = {"audio_seconds_per_s": round(audio_s / t, 1),
                                            "units_per_second": tok.units_per_second}
        return res
    finally:
        if tmp is not None:
            tmp.cleanup()
