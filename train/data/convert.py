"""Real datasets -> shards with the ShapesWorld schema (``omnimask data convert``).

``coco``: COCO captions JSON + image folder, optionally VQA v2 questions/annotations JSON.
``folder``: a folder of images + a CSV or JSONL of captions.
Images that are missing or unreadable are skipped, counted and listed; a missing or
malformed annotation file is an error that names the file and the key.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from omnimask.errors import DataError
from omnimask.registry import CONVERTERS

from .schema import encode_json, encode_png
from .shards import ShardSink

log = logging.getLogger("omnimask.data")


def _load_json(path: str | Path, what: str):
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} file {p} is not valid JSON: {e}") from None


def _field(obj: dict, key: str, path, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{path}: {where} has no key '{key}'")
    return obj[key]


def _image_png(path: Path, max_size: int | None) -> tuple[bytes, int, int]:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if max_size and max(im.size) > max_size:
            im.thumbnail((max_size, max_size), Image.BICUBIC)
        return encode_png(np.asarray(im)), im.width, im.height


def _write(out, split, shard_size, info, items, progress) -> dict:
    """items: (key, image path, {member: bytes}, meta) in a fixed order."""
    max_size = info.get("max_image_size")
    with ShardSink(Path(out), split, shard_size, info, total=len(items), progress=progress) as sink:
        for key, img_path, members, meta in items:
            try:
                png, w, h = _image_png(img_path, max_size)
            except (OSError, UnidentifiedImageError, ValueError) as e:
                sink.skipped += 1
                log.warning("skipped %s: cannot read image %s: %s", key, img_path, e)
                continue
            sink.write({"__key__": key, "image.png": png, **members,
                        "meta.json": encode_json({**meta, "width": w, "height": h})})
    if sink.entry["num"] == 0:
        raise DataError(f"no sample could be converted (all {len(items)} images unreadable)")
    return sink.entry


@CONVERTERS.register("coco")
def convert_coco(images: str, captions: str, out: str, split: str = "train",
                 questions: str | None = None, answers: str | None = None,
                 shard_size: int = 1000, max_image_size: int | None = None,
                 progress: bool = True) -> dict:
    """COCO captions (+ VQA v2) -> shards with image.png, caption.txt, [qa.json], meta.json."""
    if (questions is None) != (answers is None):
        raise DataError("VQA needs both --questions and --answers (annotations) files")
    img_dir = Path(images)
    if not img_dir.is_dir():
        raise DataError(f"image folder not found: {img_dir}")
    cap = _load_json(captions, "COCO captions")
    files = {}
    for im in _field(cap, "images", captions, "the top level"):
        files[_field(im, "id", captions, "an entry of 'images'")] = _field(
            im, "file_name", captions, "an entry of 'images'")
    caps: dict[int, list[str]] = defaultdict(list)
    for a in _field(cap, "annotations", captions, "the top level"):
        caps[_field(a, "image_id", captions, "an annotation")].append(
            str(_field(a, "caption", captions, "an annotation")).strip())
    qa: dict[int, list[dict]] = defaultdict(list)
    if questions is not None:
        qs = _load_json(questions, "VQA questions")
        ans = _load_json(answers, "VQA annotations")
        by_qid = {}
        for a in _field(ans, "annotations", answers, "the top level"):
            by_qid[_field(a, "question_id", answers, "an annotation")] = a
        for q in _field(qs, "questions", questions, "the top level"):
            qid = _field(q, "question_id", questions, "a question")
            a = by_qid.get(qid)
            if a is None:
                continue
            qa[_field(q, "image_id", questions, "a question")].append({
                "question": _field(q, "question", questions, "a question"),
                "answer": _field(a, "multiple_choice_answer", answers, "an annotation"),
                "answers": [x["answer"] for x in a.get("answers", [])],
                "type": a.get("answer_type", "other"),
                "question_type": a.get("question_type", ""),
                "question_id": qid})
    items = []
    for image_id in sorted(files):
        if not caps.get(image_id) and not qa.get(image_id):
            continue
        members = {"caption.txt": "\n".join(caps.get(image_id, [])).encode()}
        if questions is not None:
            members["qa.json"] = encode_json(sorted(qa.get(image_id, []),
                                                    key=lambda x: x["question_id"]))
        items.append((f"coco-{image_id:012d}", img_dir / files[image_id], members,
                      {"source": "coco", "image_id": image_id, "file_name": files[image_id]}))
    if not items:
        raise DataError(f"{captions}: no image has a caption")
    keys = ["caption.txt", "image.png", "meta.json"] + (["qa.json"] if questions else [])
    info = {"source": "coco", "keys": sorted(keys), "max_image_size": max_image_size}
    return _write(out, split, shard_size, info, items, progress)


_IMAGE_COLS = ("image", "file_name", "filename", "file", "path")
_TEXT_COLS = ("caption", "text")


def _read_captions_table(path: Path) -> dict[str, list[str]]:
    caps: dict[str, list[str]] = defaultdict(list)
    if path.suffix.lower() == ".jsonl":
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON: {e}") from None
            img = next((row[c] for c in _IMAGE_COLS if c in row), None)
            if img is None:
                raise DataError(f"{path}:{i}: no image key (one of {', '.join(_IMAGE_COLS)})")
            texts = row.get("captions") or [row[c] for c in _TEXT_COLS if c in row][:1]
            if not texts:
                raise DataError(f"{path}:{i}: no 'caption', 'text' or 'captions' key")
            caps[str(img)].extend(str(t).strip() for t in texts)
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            cols = reader.fieldnames or []
            ic = next((c for c in _IMAGE_COLS if c in cols), None)
            tc = next((c for c in _TEXT_COLS if c in cols), None)
            if ic is None or tc is None:
                raise DataError(f"{path}: the header needs an image column ({', '.join(_IMAGE_COLS)})"
                                f" and a caption column ({', '.join(_TEXT_COLS)}); it has {cols}")
            for row in reader:
                caps[row[ic]].append((row[tc] or "").strip())
    else:
        raise DataError(f"{path}: captions must be a .csv, .tsv or .jsonl file")
    return caps


@CONVERTERS.register("folder")
def convert_folder(images: str, captions: str, out: str, split: str = "train",
                   shard_size: int = 1000, max_image_size: int | None = None,
                   progress: bool = True) -> dict:
    """A folder of images + captions table -> shards with image.png, caption.txt, meta.json."""
    img_dir, table = Path(images), Path(captions)
    if not img_dir.is_dir():
        raise DataError(f"image folder not found: {img_dir}")
    if not table.is_file():
        raise DataError(f"captions file not found: {table}")
    caps = _read_captions_table(table)
    if not caps:
        raise DataError(f"{table}: no captions")
    items = [(f"{split}-{i:08d}", img_dir / name,
              {"caption.txt": "\n".join(c for c in caps[name] if c).encode()},
              {"source": "folder", "file_name": name})
             for i, name in enumerate(sorted(caps))]
    info = {"source": "folder", "keys": ["caption.txt", "image.png", "meta.json"],
            "max_image_size": max_image_size}
    return _write(out, split, shard_size, info, items, progress)


