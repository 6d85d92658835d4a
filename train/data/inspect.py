"""``omnimask data inspect``: read every sample of some shards, decode every member, report."""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .schema import SampleError, decode_sample
from .shards import _sha256, expand_shards, manifest_entries
from .tario import RawSample, iter_samples, open_shard


def _inspect_one(args: tuple[str, dict | None]) -> dict:
    path, rec = args
    keys: Counter = Counter()
    bad: list[dict] = []
    problems: list[str] = []
    n = 0
    expected_keys = tuple(rec["keys"]) if rec and rec.get("keys") else ()
    with open_shard(path) as buf:
        for item in iter_samples(buf):
            if not isinstance(item, RawSample):
                problems.append(f"byte {item.offset}: {item.reason}")
                continue
            n += 1
            keys.update(item.files.keys())
            try:
                decode_sample(item.files, expected_keys or tuple(item.files), item.problem)
            except SampleError as e:
                bad.append({"shard": path, "key": item.key, "kind": e.kind, "reason": str(e)})
    lost = 0
    if rec is not None:
        if n < rec["samples"]:
            lost = rec["samples"] - n
            problems.append(f"manifest lists {rec['samples']} samples, found {n}")
        if rec.get("sha256") and _sha256(Path(path)) != rec["sha256"]:
            problems.append("SHA-256 differs from the manifest (shard changed since written)")
    return {"shard": path, "samples": n, "keys": dict(keys), "bad": bad, "problems": problems,
            "lost": lost, "split": rec.get("split") if rec else None,
            "schema_version": rec.get("schema_version") if rec else None}


def inspect_shards(patterns, workers: int = 1, progress: bool = True) -> dict:
    """Report counts per key and split, bad samples (shard, key, reason) and shard problems."""
    shards = expand_shards(patterns)
    recs = manifest_entries(shards)
    jobs = [(s, recs.get(s)) for s in shards]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            results = list(tqdm(pool.imap(_inspect_one, jobs), total=len(jobs), unit="shard",
                                desc="inspect", disable=not progress))
    else:
        results = [_inspect_one(j) for j in tqdm(jobs, unit="shard", desc="inspect",
                                                   disable=not progress)]
    keys: Counter = Counter()
    splits: Counter = Counter()
    for r in results:
        keys.update(r["keys"])
        splits[r["split"] or "?"] += r["samples"]
    versions = sorted({r["schema_version"] for r in results if r["schema_version"] is not None})
    bad = [b for r in results for b in r["bad"]]
    return {
        "shards": len(results),
        "samples": sum(r["samples"] for r in results),
        "bad": len(bad),
        "bad_by_kind": dict(Counter(b["kind"] for b in bad)),
        "lost": sum(r["lost"] for r in results),
        "keys": dict(sorted(keys.items())),
        "splits": dict(sorted(splits.items())),
        "schema_version": versions[0] if len(versions) == 1 else (versions or None),
        "without_manifest": sum(r["split"] is None for r in results),
        "bad_samples": bad,
        "problems": [{"shard": r["shard"], "problem": p} for r in results for p in r["problems"]],
    }


def format_report(rep: dict) -> str:
    lines = [f"shards: {rep['shards']}   samples: {rep['samples']}   bad samples: {rep['bad']}"
             f"   lost: {rep['lost']}   schema version: {rep['schema_version']}"]
    if rep["splits"]:
        lines.append("per split: " + ", ".join(f"{k} {v}" for k, v in rep["splits"].items()))
    lines.append(f"{'key':<14}{'count':>8}")
    lines += [f"{k:<14}{v:>8}" for k, v in rep["keys"].items()]
    for b in rep["bad_samples"][:50]:
        lines.append(f"BAD  {b['shard']} {b['key']}: [{b['kind']}] {b['reason']}")
    if len(rep["bad_samples"]) > 50:
        lines.append(f"... and {len(rep['bad_samples']) - 50} more bad samples")
    for p in rep["problems"][:50]:
        lines.append(f"PROBLEM  {p['shard']}: {p['problem']}")
    return "\n".join(lines)
