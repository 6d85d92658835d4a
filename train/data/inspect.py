"""``omnimask data inspect``: read every sample of some shards, decode every member, report.

Besides bad samples it reports, as problems with a ``kind``: tar faults (``tar``), shards
that cannot be read (``unreadable``), sample counts that differ from the manifest
(``count``), changed shards (``sha256``), shards the manifest lists that are missing
(``missing_shard``), a manifest that cannot be used (``manifest``) and sample keys seen
more than once (``repeated_key``).
"""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from omnimask.errors import DataError
from omnimask.safeio import sha256_file

from .schema import MAX_IMAGE_PIXELS, SampleError, decode_sample, manifest_fault
from .shards import MANIFEST, expand_shards, manifest_entries, read_manifest
from .tario import RawSample, iter_samples, open_shard


def _inspect_one(args: tuple[str, dict | None, int]) -> dict:
    path, rec, max_pixels = args
    keys: Counter = Counter()
    bad: list[dict] = []
    problems: list[tuple[str, str]] = []
    order: list[str] = []  # sample keys in shard order (repeats are found across shards)
    expected_keys = tuple(rec["keys"]) if rec and rec.get("keys") else ()
    try:
        with open_shard(path) as buf:
            for item in iter_samples(buf):
                if not isinstance(item, RawSample):
                    problems.append(("tar", f"byte {item.offset}: {item.reason}"))
                    continue
                order.append(item.key)
                keys.update(item.files.keys())
                try:
                    decode_sample(item.files, expected_keys or tuple(item.files), item.problem,
                                  max_pixels=max_pixels)
                except SampleError as e:
                    bad.append({"shard": path, "key": item.key, "kind": e.kind, "reason": str(e)})
    except OSError as e:
        problems.append(("unreadable", f"cannot read shard: {e}"))
    n = len(order)
    lost = 0
    if rec is not None:
        if n != rec["samples"]:
            lost = max(rec["samples"] - n, 0)
            problems.append(("count", f"manifest lists {rec['samples']} samples, found {n}"))
        if rec.get("sha256") and sha256_file(path) != rec["sha256"]:
            problems.append(("sha256", "SHA-256 differs from the manifest (shard changed since "
                                       "written)"))
    return {"shard": path, "samples": n, "keys": dict(keys), "bad": bad, "order": order,
            "problems": [{"shard": path, "kind": k, "problem": p} for k, p in problems],
            "lost": lost, "split": rec.get("split") if rec else None,
            "schema_version": rec.get("schema_version") if rec else None}


def _check_manifests(shards: list[str]) -> tuple[set[str], list[dict], int]:
    """Directories whose manifest can be used, problems of the others, samples lost in
    shards their manifest lists that are missing from disk."""
    usable: set[str] = set()
    problems: list[dict] = []
    lost = 0
    for d in dict.fromkeys(str(Path(s).parent) for s in shards):
        where = str(Path(d) / MANIFEST)
        try:
            man = read_manifest(d)
        except DataError as e:
            problems.append({"shard": where, "kind": "manifest", "problem": str(e)})
            continue
        if man is None:
            continue
        fault = manifest_fault(man)
        if fault:
            problems.append({"shard": where, "kind": "manifest",
                             "problem": f"manifest cannot be used: {fault}"})
            continue
        usable.add(d)
        for split, entry in man.get("splits", {}).items():
            for rec in entry.get("shards", []):
                if not (Path(d) / rec["name"]).is_file():
                    lost += rec["samples"]
                    problems.append({"shard": str(Path(d) / rec["name"]), "kind": "missing_shard",
                                     "problem": f"missing: {MANIFEST} lists it (split {split!r}, "
                                                f"{rec['samples']} samples)"})
    return usable, problems, lost


def inspect_shards(patterns, workers: int = 1, progress: bool = True,
                   max_pixels: int | None = MAX_IMAGE_PIXELS) -> dict:
    """Report counts per key and split, bad samples (shard, key, reason) and problems:
    shard faults, missing shards, unusable manifests and repeated sample keys."""
    shards = expand_shards(patterns)
    usable, problems, lost = _check_manifests(shards)
    recs = manifest_entries([s for s in shards if str(Path(s).parent) in usable])
    jobs = [(s, recs.get(s), max_pixels) for s in shards]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            results = list(tqdm(pool.imap(_inspect_one, jobs), total=len(jobs), unit="shard",
                                desc="inspect", disable=not progress))
    else:
        results = [_inspect_one(j) for j in tqdm(jobs, unit="shard", desc="inspect",
                                                   disable=not progress)]
    keys: Counter = Counter()
    splits: Counter = Counter()
    first: dict[str, str] = {}  # sample key -> the shard it was first seen in
    duplicates = 0
    for r in results:
        keys.update(r["keys"])
        splits[r["split"] or "?"] += r["samples"]
        for k in r.pop("order"):
            if k in first:
                duplicates += 1
                r["problems"].append({"shard": r["shard"], "kind": "repeated_key",
                                      "problem": f"key {k!r} repeats (first in {first[k]})"})
            else:
                first[k] = r["shard"]
    versions = sorted({r["schema_version"] for r in results if r["schema_version"] is not None})
    bad = [b for r in results for b in r["bad"]]
    return {
        "shards": len(results),
        "samples": sum(r["samples"] for r in results),
        "bad": len(bad),
        "bad_by_kind": dict(Counter(b["kind"] for b in bad)),
        "lost": lost + sum(r["lost"] for r in results),
        "duplicates": duplicates,
        "keys": dict(sorted(keys.items())),
        "splits": dict(sorted(splits.items())),
        "schema_version": versions[0] if len(versions) == 1 else (versions or None),
        "without_manifest": sum(r["split"] is None for r in results),
        "bad_samples": bad,
        "problems": problems + [p for r in results for p in r["problems"]],
    }


def format_report(rep: dict) -> str:
    lines = [f"shards: {rep['shards']}   samples: {rep['samples']}   bad samples: {rep['bad']}"
             f"   lost: {rep['lost']}   repeated keys: {rep['duplicates']}"
             f"   schema version: {rep['schema_version']}"]
    if rep["splits"]:
        lines.append("per split: " + ", ".join(f"{k} {v}" for k, v in rep["splits"].items()))
    lines.append(f"{'key':<14}{'count':>8}")
    lines += [f"{k:<14}{v:>8}" for k, v in rep["keys"].items()]
    for b in rep["bad_samples"][:50]:
        lines.append(f"BAD  {b['shard']} {b['key']}: [{b['kind']}] {b['reason']}")
    if len(rep["bad_samples"]) > 50:
        lines.append(f"... and {len(rep['bad_samples']) - 50} more bad samples")
    for p in rep["problems"][:50]:
        lines.append(f"PROBLEM  {p['shard']}: [{p['kind']}] {p['problem']}")
    if len(rep["problems"]) > 50:
        lines.append(f"... and {len(rep['problems']) - 50} more problems")
    return "\n".join(lines)


def strict_summary(rep: dict) -> str | None:
    """One line naming what makes ``inspect --strict`` fail, or None when nothing does."""
    parts = []
    if rep["bad"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(rep["bad_by_kind"].items()))
        parts.append(f"{rep['bad']} bad samples ({kinds})")
    if rep["lost"]:
        parts.append(f"{rep['lost']} samples lost")
    if rep["problems"]:
        kinds = Counter(p["kind"] for p in rep["problems"])
        parts.append("problems: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return "; ".join(parts) or None
