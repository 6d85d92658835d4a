"""The shard reader: a list of small stages, resumable at the exact sample.

    shard list -> per-epoch order (or endless resampling) -> split by node and worker
    -> tar to raw samples (damaged bytes skipped and counted) -> shuffle buffer
    -> decode -> modality processors -> batches

Every stage keeps its position in a :class:`StreamState`: the shard and byte offset of the
last sample read, the locations (not the bytes) of the samples in the shuffle buffer, and
the shuffle RNG. Each batch leaves its worker with a snapshot of that state, so
:meth:`ShardLoader.state_dict` describes exactly the batches the trainer has consumed
(prefetched batches are not counted). Resuming reopens the shards at those byte offsets and
re-reads the buffered samples, so the stream continues with the same samples in the same
order. What is exact and what is not is written in ARCHITECTURE.md ("Data pipeline").
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omnimask.config import DataConfig
from omnimask.errors import DataError, OmnimaskError
from omnimask.registry import PROCESSORS

from ..distributed import rank_and_world
from .schema import SampleError, decode_sample, manifest_fault
from .shards import MANIFEST, expand_shards, manifest_entries, read_manifest
from .tario import RawSample, TarProblem, iter_samples, open_shard

log = logging.getLogger("omnimask.data")
STATE_VERSION = 1
MAX_RECORDS = 10_000  # bad-sample records kept in memory (counts are always complete)


@dataclass
class StreamState:
    """Where one consumer (a worker of a rank) stands; see the module docstring."""

    epoch: int = 0
    done: bool = False
    shard_pos: int = 0  # position in this consumer's shard sequence
    offset: int = 0  # byte offset of the last sample read in that shard
    ordinal: int = 0  # its index within the shard
    taken: bool = False  # True once the sample at `offset` has been read
    buffer: list[tuple[int, int, int]] = field(default_factory=list)  # (shard_pos, offset, ordinal)
    rng: dict | None = None
    emitted: int = 0  # samples delivered in this epoch
    bad: dict[str, int] = field(default_factory=dict)  # skipped samples by kind of fault
    lost: int = 0  # samples the manifest lists that could not be read at all
    problems: int = 0  # damaged tar headers and other shard faults (records name them)
    generator: np.random.Generator | None = field(default=None, repr=False, compare=False)

    def snapshot(self) -> dict:
        d = dict(self.__dict__)
        gen = d.pop("generator")
        if gen is not None:  # read the shuffle RNG only now: cheaper than after every draw
            d["rng"] = gen.bit_generator.state
        d["buffer"] = np.asarray(self.buffer, dtype=np.int64).reshape(-1, 3)
        d["bad"] = dict(self.bad)
        return d

    @classmethod
    def restore(cls, d: dict) -> StreamState:
        d = dict(d)
        d["buffer"] = [tuple(int(v) for v in row) for row in np.asarray(d["buffer"]).reshape(-1, 3)]
        d["bad"] = dict(d["bad"])
        return cls(**d)


def _warn_skipped(records: list[dict], seen: dict[str, int]) -> None:
    """The first skipped sample of each reason, named; the others are counted in ``seen``
    for one summary line (a split without speech is one warning, not one per sample)."""
    for rec in records:
        if rec["kind"] == "tar":
            continue
        seen[rec["reason"]] = seen.get(rec["reason"], 0) + 1
        if seen[rec["reason"]] == 1:
            log.warning("skipped sample %s in %s: %s (others skipped for this reason are "
                        "counted, then summed up)", rec["key"] or "?", rec["shard"],
                        rec["reason"])


class _Tally:
    """Counts skipped samples into the state and keeps records to hand to the main process."""

    def __init__(self, state: StreamState) -> None:
        self.state = state
        self.records: list[dict] = []

    def bad(self, shard: str, key: str | None, kind: str, reason: str) -> None:
        self.state.bad[kind] = self.state.bad.get(kind, 0) + 1
        rec = {"shard": shard, "key": key, "kind": kind, "reason": reason}
        self.records.append(rec)  # the main process warns, once per reason (ShardLoader)

    def problem(self, shard: str, reason: str) -> None:
        self.state.problems += 1
        self.records.append({"shard": shard, "key": None, "kind": "tar", "reason": reason})
        log.warning("%s: %s", shard, reason)

    def flush(self) -> list[dict]:
        out, self.records = self.records, []
        return out


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack tensors of equal shape; keep everything else (and ragged tensors) as lists."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in vals) and len({v.shape for v in vals}) == 1:
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out


def _shard_items(path: str, offset: int, ordinal: int, tally: _Tally | None, keys):
    """Samples of one shard from ``offset``; an unreadable file is one reported problem."""
    try:
        with open_shard(path) as buf:
            yield from iter_samples(buf, offset, ordinal, keys=keys)
    except OSError as e:
        if tally is not None:
            tally.problem(path, f"cannot read shard: {e}")


def as_is(item):
    """Identity collate: batches are already collated in the workers."""
    return item


class ShardDataset(IterableDataset):
    """The stages for one consumer; use :class:`ShardLoader`, which adds workers and state."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if cfg.batch_size < 1:
            raise OmnimaskError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
        if cfg.shuffle_buffer < 0 or cfg.num_workers < 0:
            raise OmnimaskError("data.shuffle_buffer and data.num_workers must be >= 0")
        if cfg.max_image_pixels < 1:
            raise OmnimaskError(f"data.max_image_pixels must be >= 1, got {cfg.max_image_pixels}")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.shards = expand_shards(cfg.shards)
        self.manifest = self._manifests(self.shards)
        for name in cfg.processors:
            PROCESSORS.get(name)  # unknown names fail here, before any work
        needed = {k for n in cfg.processors for k in PROCESSORS.get(n).keys}
        self.keys = tuple(sorted(needed | set(cfg.keys or ())))
        self.start_states: dict[int, dict] = {}
        self.epoch = 0
        self.shift = 0  # DataLoader worker i plays logical worker (i + shift) % num_workers

    @staticmethod
    def _manifests(shards: list[str]) -> dict[str, dict]:
        """Manifest records of the shards; a manifest that cannot be used is ignored with a
        warning (its shards are read without counts or keys), not a traceback."""
        ignored = set()
        for d in {str(Path(s).parent) for s in shards}:
            try:
                man = read_manifest(d)
                fault = manifest_fault(man) if man is not None else None
            except DataError as e:
                fault = str(e)
            if fault:
                log.warning("%s ignored: %s", Path(d) / MANIFEST, fault)
                ignored.add(d)
        return manifest_entries([s for s in shards if str(Path(s).parent) not in ignored])

    # -- stage 1: which shards this consumer reads, in which order --------------------------
    def _sequence(self, consumer: int, consumers: int, epoch: int):
        """Return (shard at position k or None past the end, whether to split by sample)."""
        n, cfg = len(self.shards), self.cfg
        if cfg.resampled:
            def pick(k: int) -> str:
                return self.shards[int(np.random.default_rng([cfg.seed, consumer, k, 1]).integers(n))]
            return pick, False
        order = (np.random.default_rng([cfg.seed, epoch]).permutation(n) if cfg.shuffle_shards
                 else np.arange(n))
        by_sample = n < consumers  # too few shards for whole-shard splitting: split samples
        mine = [self.shards[i] for i in (order if by_sample else order[consumer::consumers])]
        return (lambda k: mine[k] if k < len(mine) else None), by_sample

    # -- stage 2: tar -> raw samples ------------------------------------------------------
    def _raw(self, st: StreamState, tally: _Tally, consumer: int, consumers: int
             ) -> Iterator[tuple[tuple[int, int, int], RawSample]]:
        seq, by_sample = self._sequence(consumer, consumers, st.epoch)
        while (path := seq(st.shard_pos)) is not None:
            mine = (lambda o, p=st.shard_pos: (p + o) % consumers == consumer) if by_sample else None
            reports = mine is None or st.shard_pos % consumers == consumer
            last = st.ordinal if st.taken else -1
            skip = st.taken
            for item in _shard_items(path, st.offset, st.ordinal, tally if reports else None,
                                     self.keys):
                if isinstance(item, TarProblem):
                    if reports:
                        tally.problem(path, f"at byte {item.offset}: {item.reason}")
                    continue
                if skip:  # the sample at the resume offset was taken before
                    skip = False
                    continue
                st.offset, st.ordinal, st.taken = item.offset, item.ordinal, True
                last = item.ordinal
                item.shard = path
                if mine is None or mine(item.ordinal):
                    yield (st.shard_pos, item.offset, item.ordinal), item
            expected = self.manifest.get(path, {}).get("samples")
            if expected is not None and last + 1 < expected and reports:
                st.lost += expected - last - 1
                tally.problem(path, f"manifest lists {expected} samples, only {last + 1} "
                                    f"could be read (shard truncated or damaged)")
            st.shard_pos, st.offset, st.ordinal, st.taken = st.shard_pos + 1, 0, 0, False

    def _reread(self, st: StreamState, consumer: int, consumers: int, locs) -> list[RawSample]:
        """Read the samples at buffer locations again (resume)."""
        seq, _ = self._sequence(consumer, consumers, st.epoch)
        out = []
        for pos, off, ordinal in locs:
            with open_shard(seq(pos)) as buf:
                got = [s for s in iter_samples(buf, off, ordinal, limit=1, keys=self.keys)
                       if isinstance(s, RawSample)]
            if not got:
                raise DataError(f"cannot resume: no sample at byte {off} of {seq(pos)}; "
                                f"was the shard rewritten since the checkpoint?")
            got[0].shard = seq(pos)
            out.append(got[0])
        return out

    # -- stage 3: shuffle buffer ----------------------------------------------------------
    def _shuffle(self, raw, st: StreamState, consumer: int, consumers: int):
        size = self.cfg.shuffle_buffer
        if size <= 1:
            for _, s in raw:
                yield s
            return
        rng = np.random.default_rng([self.cfg.seed, st.epoch, consumer, 2])
        if st.rng is not None:
            rng.bit_generator.state = st.rng
        st.generator = rng
        locs = st.buffer  # kept in step with `items`: the state always says what is buffered
        items = self._reread(st, consumer, consumers, locs) if locs else []
        for loc, s in raw:
            if len(items) < size:
                items.append(s)
                locs.append(loc)
                continue
            i = int(rng.integers(size))
            out, items[i], locs[i] = items[i], s, loc
            yield out
        while items:
            i = int(rng.integers(len(items)))
            out = items[i]
            items[i], locs[i] = items[-1], locs[-1]
            items.pop()
            locs.pop()
            yield out

    # -- stage 4 and 5: decode, then modality processors -----------------------------------
    def _process(self, samples, tally: _Tally, processors):
        for s in samples:
            shard = s.shard
            try:
                decoded = decode_sample(s.files, self.keys, s.problem,
                                        max_pixels=self.cfg.max_image_pixels)
            except SampleError as e:
                tally.bad(shard, s.key, e.kind, str(e))
                continue
            out: dict[str, Any] = {"__key__": s.key}
            name = ""
            try:
                for name, fn in processors:  # noqa: B007 - `name` is reported on failure
                    out.update(fn(decoded))
            except Exception as e:  # noqa: BLE001
                tally.bad(shard, s.key, "invalid", f"processor {name!r}: {e}")
                continue
            yield out

    def __iter__(self):
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        wid = (wid + self.shift) % nworkers
        consumer, consumers = self.rank * nworkers + wid, self.world_size * nworkers
        if wid in self.start_states:
            st = StreamState.restore(self.start_states[wid])
        else:
            st = StreamState(epoch=self.epoch)
        tally = _Tally(st)
        if st.done:
            yield "end", wid, None, st.snapshot(), tally.flush()
            return
        processors = [(n, PROCESSORS.get(n)(self.cfg)) for n in self.cfg.processors]
        raw = self._raw(st, tally, consumer, consumers)
        shuffled = self._shuffle(raw, st, consumer, consumers)
        batch: list[dict] = []
        for sample in self._process(shuffled, tally, processors):
            batch.append(sample)
            st.emitted += 1
            if len(batch) == self.cfg.batch_size:
                yield "batch", wid, collate(batch), st.snapshot(), tally.flush()
                batch = []
        if batch and not self.cfg.drop_last:
            yield "batch", wid, collate(batch), st.snapshot(), tally.flush()
        elif batch:
            st.emitted -= len(batch)  # dropped, not delivered
        st.done = True
        yield "end", wid, None, st.snapshot(), tally.flush()


class ShardLoader:
    """Batches from shards, with worker processes and an exact ``state_dict``.

    Iterating runs one epoch (endless when ``resampled``); iterating again continues where
    the last iteration stopped, or starts the next epoch when that one had finished.
    """

    def __init__(self, cfg: DataConfig, rank: int | None = None, world_size: int | None = None
                 ) -> None:
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        self.cfg = cfg
        self.dataset = ShardDataset(cfg, rank, world_size)
        self.epoch = 0
        self._states: dict[int, dict] = {}
        self._next_worker = 0  # whose batch comes next in the DataLoader's round-robin
        self.records: list[dict] = []

    @property
    def num_consumers(self) -> int:
        return max(1, self.cfg.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if len(self._states) == self.num_consumers and all(s["done"] for s in self._states.values()):
            self.epoch += 1
            self._states = {}
            self._next_worker = 0
        self.dataset.epoch = self.epoch
        self.dataset.start_states = dict(self._states)
        # The DataLoader always asks its worker 0 first; rotate the roles so that the worker
        # whose turn it was when the last batch was taken comes first again.
        self.dataset.shift = self._next_worker
        nw = self.cfg.num_workers
        # collate_fn=as_is: batches are already collated; torch's default_convert would walk
        # every nested dict of every sample again.
        dl = DataLoader(self.dataset, batch_size=None, num_workers=nw, collate_fn=as_is,
                        prefetch_factor=4 if nw else None, persistent_workers=False)
        seen: dict[str, int] = {}  # skipped samples by reason, this pass
        for kind, wid, data, state, records in dl:
            self._states[wid] = state
            self._next_worker = (wid + 1) % self.num_consumers
            room = MAX_RECORDS - len(self.records)
            self.records.extend(records[:max(room, 0)])
            _warn_skipped(records, seen)
            if kind == "batch":
                yield data
        for reason, n in seen.items():  # one line per reason, not one per sample
            if n > 1:
                log.warning("skipped %d samples in all: %s", n, reason)

    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"shards": hashlib.sha256("\n".join(Path(s).name for s in self.dataset.shards)
                                         .encode()).hexdigest()[:16],
                "num_workers": c.num_workers, "world_size": self.dataset.world_size,
                "rank": self.dataset.rank, "seed": c.seed, "batch_size": c.batch_size,
                "shuffle_buffer": c.shuffle_buffer, "resampled": c.resampled,
                "shuffle_shards": c.shuffle_shards, "keys": list(self.dataset.keys)}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "config": self._fingerprint(),
                "next_worker": self._next_worker,
                "workers": {int(k): v for k, v in self._states.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION:
            raise DataError(f"data state version {sd.get('version')} is not {STATE_VERSION}")
        mine = self._fingerprint()
        for k, v in sd["config"].items():
            if mine.get(k) != v:
                raise DataError(f"cannot resume the data stream: data.{k} was {v!r} in the "
                                f"checkpoint and is {mine.get(k)!r} now")
        self.epoch = sd["epoch"]
        self._next_worker = sd["next_worker"]
        self._states = {int(k): v for k, v in sd["workers"].items()}

    def stats(self) -> dict:
        bad: Counter = Counter()
        for s in self._states.values():
            bad.update(s["bad"])
        return {"epoch": self.epoch, "samples": sum(s["emitted"] for s in self._states.values()),
                "bad": sum(bad.values()), "bad_by_kind": dict(bad),
                "lost": sum(s["lost"] for s in self._states.values()),
                "problems": sum(s.get("problems", 0) for s in self._states.values())}
