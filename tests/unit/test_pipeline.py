"""The reader: coverage, splitting by node/worker, determinism, exact resume."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from omnimask.config import DataConfig
from omnimask.errors import DataError
from omnimask.train.data.pipeline import ShardLoader

ALL_KEYS = [f"train-{i:08d}" for i in range(60)]


def _cfg(d, **kw):
    base = dict(shards=[str(d / "train-*.tar")], processors=["image", "text"], batch_size=4,
                shuffle_buffer=8, seed=0)
    return DataConfig(**{**base, **kw})


def _keys(loader, limit=None):
    out = []
    for b in loader:
        out += b["__key__"]
        if limit is not None and len(out) >= limit:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_yields_every_sample_once(small_shards, workers):
    keys = _keys(ShardLoader(_cfg(small_shards, num_workers=workers), 0, 1))
    assert sorted(keys) == ALL_KEYS
    assert keys != ALL_KEYS  # shuffled


def test_batches_hold_tensors_and_lists(small_shards):
    b = next(iter(ShardLoader(_cfg(small_shards, processors=["image", "masks", "text", "qa"]), 0, 1)))
    assert b["image"].shape == (4, 3, 64, 64) and b["image"].dtype == torch.uint8
    assert b["seg"].shape == (4, 64, 64)
    assert len(b["captions"]) == 4 and isinstance(b["qa"][0], list)


@pytest.mark.parametrize("world,workers,shards", [(2, 1, None), (2, 2, None), (2, 2, 1), (3, 1, 2)])
def test_ranks_and_workers_partition_the_data(small_shards, world, workers, shards):
    """Whole shards per consumer when there are enough, else samples round-robin."""
    pattern = [str(small_shards / f"train-{i:06d}.tar") for i in range(shards or 6)]
    per_rank = [_keys(ShardLoader(DataConfig(shards=pattern, processors=["text"], batch_size=3,
                                             num_workers=workers, seed=1), r, world))
                for r in range(world)]
    flat = [k for ks in per_rank for k in ks]
    assert len(flat) == len(set(flat)) == 10 * (shards or 6)
    assert all(per_rank)  # no rank starves


def test_same_seed_same_order_other_seed_other_order(small_shards):
    a = _keys(ShardLoader(_cfg(small_shards, num_workers=2), 0, 1))
    b = _keys(ShardLoader(_cfg(small_shards, num_workers=2), 0, 1))
    c = _keys(ShardLoader(_cfg(small_shards, num_workers=2, seed=1), 0, 1))
    assert a == b and a != c and sorted(c) == ALL_KEYS


def test_next_epoch_reshuffles(small_shards):
    loader = ShardLoader(_cfg(small_shards), 0, 1)
    e0, e1 = _keys(loader), _keys(loader)
    assert sorted(e0) == sorted(e1) == ALL_KEYS and e0 != e1 and loader.epoch == 1


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("workers,buffer,stop", [(0, 8, 20), (2, 8, 24), (2, 0, 12), (2, 8, 4), (2, 5, 56), (0, 100, 8)])
def test_resume_continues_with_exactly_the_same_samples(small_shards, workers, buffer, stop):
    cfg = _cfg(small_shards, num_workers=workers, shuffle_buffer=buffer)
    full = _keys(ShardLoader(cfg, 0, 1))
    first = ShardLoader(cfg, 0, 1)
    head = _keys(first, limit=stop)
    sd = pickle.loads(pickle.dumps(_roundtrip(first.state_dict())))
    second = ShardLoader(cfg, 0, 1)
    second.load_state_dict(sd)
    tail = _keys(second)
    assert head + tail == full
    assert second.stats()["samples"] == len(full)
    # after the epoch, the resumed loader goes on into the same next epoch as an unbroken one
    unbroken = ShardLoader(cfg, 0, 1)
    _keys(unbroken)
    assert _keys(second) == _keys(unbroken)


def test_resume_across_epoch_boundary_and_resampled(small_shards):
    cfg = _cfg(small_shards, resampled=True, shuffle_buffer=10)
    take = 20  # batches
    ref = ShardLoader(cfg, 0, 1)
    it = iter(ref)
    full = [k for _ in range(take) for k in next(it)["__key__"]]
    first = ShardLoader(cfg, 0, 1)
    it = iter(first)
    head = [k for _ in range(7) for k in next(it)["__key__"]]
    second = ShardLoader(cfg, 0, 1)
    second.load_state_dict(first.state_dict())
    it = iter(second)
    tail = [k for _ in range(take - 7) for k in next(it)["__key__"]]
    assert head + tail == full
    assert len(set(full)) < len(full)  # drawn with replacement: an endless stream


def test_epoch_state_survives_resume(small_shards):
    cfg = _cfg(small_shards)
    ref = ShardLoader(cfg, 0, 1)
    _keys(ref)
    e1 = _keys(ref)
    a = ShardLoader(cfg, 0, 1)
    _keys(a)
    b = ShardLoader(cfg, 0, 1)
    b.load_state_dict(a.state_dict())  # saved at the end of epoch 0
    assert _keys(b) == e1


def test_resume_with_other_settings_is_refused(small_shards):
    a = ShardLoader(_cfg(small_shards), 0, 1)
    _keys(a, limit=8)
    b = ShardLoader(_cfg(small_shards, shuffle_buffer=9), 0, 1)
    with pytest.raises(DataError, match="data.shuffle_buffer was 8"):
        b.load_state_dict(a.state_dict())


def test_unknown_processor_fails_before_work(small_shards):
    from omnimask.errors import OmnimaskError

    with pytest.raises(OmnimaskError, match="unknown processor 'pixels'"):
        ShardLoader(_cfg(small_shards, processors=["pixels"]), 0, 1)


def test_drop_last_and_rank_from_environment(small_shards, monkeypatch):
    loader = ShardLoader(_cfg(small_shards, batch_size=7, drop_last=True), 0, 1)
    batches = list(loader)
    assert [len(b["__key__"]) for b in batches] == [7] * 8 and loader.stats()["samples"] == 56
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    other = ShardLoader(_cfg(small_shards))
    assert (other.dataset.rank, other.dataset.world_size) == (1, 2)
    assert len(_keys(other)) == 30
