"""Speech features and codebooks: BEST-RQ invariants, k-means correctness, bad audio."""

from __future__ import annotations

import json
import math

import pytest
import torch

from omnimask.cli import main
from omnimask.errors import OmnimaskError
from omnimask.modalities.artifacts import code_stats
from omnimask.modalities.kmeans import assign
from omnimask.modalities.speech.features import fbank, features, prepare_wave
from omnimask.modalities.speech.quantizers import BestRQ, KMeansUnits
from omnimask.modalities.speech.tokenizer import SpeechTokenizer
from omnimask.train.data.espeak import Voice, get_espeak


@pytest.fixture(scope="module")
def speech():
    raw = get_espeak().synth("is the small red circle left of the large blue square?",
                             Voice("en-us+m3", 150, 50, 1))
    return torch.from_numpy(raw.astype("float32") / 32768.0), 22050


def test_features_shapes_and_rates(speech):
    wave, sr = speech
    f = features(wave, sr)
    seconds = wave.numel() / sr
    assert f.shape[1] == 320 and abs(f.shape[0] - seconds * 25) <= 2  # 40 ms per stack
    fb = fbank(prepare_wave(wave, sr))
    assert fb.shape[1] == 80
    assert torch.allclose(fb.mean(0), torch.zeros(80), atol=1e-4)  # per-utterance normalised


def test_stereo_and_other_rates(speech):
    wave, sr = speech
    w16 = prepare_wave(wave, sr)
    stereo = torch.stack([wave, wave])
    assert torch.allclose(prepare_wave(stereo, sr), w16)
    assert torch.allclose(prepare_wave(stereo.T.contiguous(), sr), w16)  # [T, C] too
    w8 = prepare_wave(wave, sr)[::2]  # a 8 kHz version
    assert abs(prepare_wave(w8, 8000).numel() - w16.numel()) <= 2


@pytest.mark.parametrize("wave,msg", [(torch.zeros(16000), "silent"), (torch.zeros(0), "empty"),
                                      (torch.zeros(2, 3, 400), "expected audio of shape")])
def test_bad_audio_names_the_sample(wave, msg):
    with pytest.raises(OmnimaskError, match=f"sample-7: .*{msg}"):
        prepare_wave(wave, 16000, name="sample-7")


def test_bestrq_is_frozen_seeded_and_scale_invariant(speech):
    wave, sr = speech
    q = BestRQ(320, 1024, 16, seed=3)
    assert sum(p.numel() for p in q.parameters()) == 0 and len(list(q.buffers())) == 2
    f = features(wave, sr)
    a = q(f)
    assert torch.equal(a, BestRQ(320, 1024, 16, seed=3)(f))
    assert not torch.equal(a, BestRQ(320, 1024, 16, seed=4)(f))
    assert torch.equal(a, q(f * 7.5)) and torch.equal(a, q(f * 0.01))  # c > 0
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(1024))
    # scaling the waveform changes log-mel by a constant, which normalisation removes
    same = (q(features(wave * 0.2, sr)) == a).float().mean()
    assert same > 0.95


def test_assign_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(500, 8, generator=g), torch.randn(20, 8, generator=g)
    ids, d2 = assign(x, c, chunk=64)
    brute = ((x[:, None] - c[None]) ** 2).sum(-1)
    assert torch.equal(ids, brute.argmin(1)) and torch.allclose(d2, brute.min(1).values, atol=1e-4)


def test_kmeans_recovers_blobs_and_inertia_never_rises():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(6, 5, generator=g) * 10
    x = (means[:, None] + 0.3 * torch.randn(6, 200, 5, generator=g)).reshape(-1, 5)
    km, stats = KMeansUnits.fit(x, 6, iterations=15, seed=0, progress=False)
    h = stats["inertia_history"]
    assert all(b <= a + 1e-6 for a, b in zip(h, h[1:]))
    dist = torch.cdist(means, km.centroids).min(1).values
    assert dist.max() < 0.2 and stats["usage"] == 1.0
    assert math.isclose(stats["inertia"], 0.09 * 5, rel_tol=0.2)  # variance 0.3^2 per dim


def test_code_stats():
    s = code_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert s["usage"] == 0.5 and math.isclose(s["perplexity"], 2.0, rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["bestrq", "kmeans"])
def test_train_eval_save_load(kind, shapes_dir, tmp_path, speech):
    out = tmp_path / kind
    args = ["tokenizer", "train", "speech", "--quantizer", kind, "--data",
            str(shapes_dir / "train-*.tar"), "--out", str(out), "-q"]
    if kind == "kmeans":
        args += ["codebook_size=64", "iterations=8"]
    assert main(args) == 0
    tok = SpeechTokenizer.load(out)
    wave, sr = speech
    assert torch.equal(tok.encode(wave, sr), SpeechTokenizer.load(out).encode(wave, sr))
    assert main(["tokenizer", "eval", "speech", "--tokenizer", str(out), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--out", str(tmp_path / "m.json"), "-q"]) == 0
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    # k-means units are all used; 1024 random codes are not all reached by 30 utterances
    assert m["usage"] >= (0.5 if kind == "kmeans" else 0.15)
    assert m["units_per_second"] == 25.0 and m["utterances"] == 30
    assert 1 < m["perplexity"] <= tok.size
    assert ("inertia" in m) == (kind == "kmeans")


def test_bad_speech_config(shapes_dir, tmp_path, capsys):
    assert main(["tokenizer", "train", "speech", "--data", str(shapes_dir / "train-*.tar"),
                 "--out", str(tmp_path / "x"), "kind=vq"]) == 2
    assert "kind must be bestrq|kmeans, got 'vq'" in capsys.readouterr().err
    assert main(["tokenizer", "train", "text", "--kind", "kmeans", "--data", "x.tar",
                 "--out", str(tmp_path / "y")]) == 2  # the flag's former name still parses
    assert "--quantizer (bestrq|kmeans) applies to speech" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["bestrq", "kmeans"])
def test_shards_without_speech_are_refused(small_shards, tmp_path, capsys, kind):
    assert main(["tokenizer", "train", "speech", "--quantizer", kind, "--data",
                 str(small_shards / "train-*.tar"), "--out", str(tmp_path / kind), "-q"]) == 2
    assert "no speech found in the shards" in capsys.readouterr().err
    assert not (tmp_path / kind).exists()
