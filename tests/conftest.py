"""Shared fixtures: small ShapesWorld datasets made once per test session."""

from __future__ import annotations

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
