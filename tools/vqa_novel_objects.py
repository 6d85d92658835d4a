#!/usr/bin/env python3
"""VQA accuracy split by whether the object a question asks about is a colour-shape pair
training never shows (ShapesWorld's test-novel split: meta.json marks such objects
``"novel": true``), and whether the question names a colour.

    python tools/vqa_novel_objects.py --model DIR_OR_ZOO_NAME --data test-novel-*.tar
        [--types shape,color] [--out FILE.json]

Prints a Markdown table and the most frequent wrong answers on novel objects as (colour,
truth, answer); ``--out`` writes them as JSON. One question at a time through
``model.answer`` (the evaluation packs several per image, so totals differ slightly).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path


def read_shards(patterns: list[str]) -> list[tuple[bytes, dict, list[dict]]]:
    """(image PNG bytes, meta, questions) of every sample of the shards."""
    from omnimask.errors import OmnimaskError
    from omnimask.train.data.shards import expand_shards

    try:
        files = expand_shards(patterns)
    except OmnimaskError as e:
        raise SystemExit(f"--data: {e}") from None
    out = []
    for f in files:
        parts: dict[str, dict[str, bytes]] = defaultdict(dict)
        with tarfile.open(f) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if m.isfile() and ext in ("image.png", "meta.json", "qa.json"):
                    parts[key][ext] = tf.extractfile(m).read()
        for key in sorted(parts):
            p = parts[key]
            if len(p) < 3:
                raise SystemExit(f"{f}: sample {key} lacks image.png, meta.json or qa.json")
            out.append((p["image.png"], json.loads(p["meta.json"]), json.loads(p["qa.json"])))
    return out


def split_by_novelty(model, samples, types: set[str]) -> dict:
    """Accuracy per (novel|seen object, colour named or not) and the novel objects' errors;
    a question counts when its first grounding role is one object."""
    from PIL import Image

    images, questions, keys = [], [], []
    for png, meta, qa in samples:
        objs = {o["id"]: o for o in meta.get("objects", [])}
        img = Image.open(io.BytesIO(png)).convert("RGB")
        for q in qa:
            roles = q.get("grounding") or [[]]
            if q["type"] not in types or len(roles[0]) != 1 or roles[0][0] not in objs:
                continue
            o = objs[roles[0][0]]
            named = "color" in json.dumps(q.get("program", {}).get("filter", {}))
            images.append(img)
            questions.append(q["question"])
            keys.append((bool(o.get("novel")), named, o.get("color"), q["answer"]))
    got = model.answer(images, questions) if images else []
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    wrong: Counter = Counter()
    for (novel, named, colour, truth), a in zip(keys, got):
        right = a["answer"] == truth
        for k in ("novel" if novel else "seen",
                  f"{'novel' if novel else 'seen'}, colour {'named' if named else 'not named'}"):
            rows[k][0] += 1
            rows[k][1] += right
        if novel and not right:
            wrong[(colour, truth, a["answer"])] += 1
    return {"types": sorted(types),
            "accuracy": {k: {"n": n, "accuracy": round(ok / n, 4)}
                         for k, (n, ok) in sorted(rows.items())},
            "novel_errors": [{"colour": c, "truth": t, "answer": a, "count": n}
                             for (c, t, a), n in wrong.most_common(10)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model directory or zoo name with a vqa head")
    ap.add_argument("--data", nargs="+", required=True, help="shards (globs)")
    ap.add_argument("--types", default="shape", help="question types, comma-separated")
    ap.add_argument("--out", help="write the result JSON here")
    a = ap.parse_args(argv)
    import omnimask

    samples = read_shards(a.data)
    model = omnimask.load(a.model)
    if "vqa" not in model.heads:
        raise SystemExit(f"--model {a.model}: no vqa head (heads: {', '.join(model.heads)})")
    res = split_by_novelty(model, samples, set(a.types.split(",")))
    res.update(model=str(a.model), data=a.data)
    print("| objects asked about | questions | accuracy |\n|---|---|---|")
    for k, v in res["accuracy"].items():
        print(f"| {k} | {v['n']} | {v['accuracy']:.3f} |")
    print("novel objects' wrong answers (colour, truth, answer): " + ", ".join(
        f"{e['colour']} {e['truth']} -> {e['answer']} x{e['count']}" for e in res["novel_errors"]))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
