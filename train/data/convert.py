"""Real datasets -> shards with the ShapesWorld schema (``omnimask data convert``).

``coco``: COCO captions JSON + image folder, optionally VQA v2 questions/annotations JSON.
``folder``: a folder of images + a CSV or JSONL of captions.
``images``: every image under a folder, no text (what an image tokenizer trains on).
``imagefolder``: torchvision's ImageFolder layout, ``root/<class name>/<image>``: the class in
``meta.json`` (``label``, ``class_name``), the manifest's ``classes``, and a caption from
a template ("a photo of a {}.") so that text-image objectives and retrieval read it.
Images keep their size unless ``image_size`` fits them to a square (``fit``: centre crop,
pad or stretch, as ``data.image_fit``); the manifest records both.
Rows and images that give no sample (missing or unreadable image, a path outside the image
folder, a null or empty caption, a short row) are skipped, counted and listed with the
reason in the manifest; a missing or malformed annotation file (bad encoding, unterminated
quote, wrong structure) is a one-line error that names the file and the line or key.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from omnimask.errors import DataError
from omnimask.modalities.image.processor import FITS, fit_image
from omnimask.registry import CONVERTERS

from .schema import encode_json, encode_png
from .shards import ShardSink, check_name

log = logging.getLogger("omnimask.data")


def _read_text(path: Path) -> str:
    """The file as text; not UTF-8 is an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8") from None


def _load_json(path: str | Path, what: str):
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}")
    try:
        return json.loads(_read_text(p))
    except json.JSONDecodeError as e:
        raise DataError(f"{what} file {p} is not valid JSON: {e}") from None


def _field(obj: dict, key: str, path, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{path}: {where} has no key '{key}'")
    return obj[key]


def _list(obj: dict, key: str, path, where: str) -> list:
    v = _field(obj, key, path, where)
    if not isinstance(v, list):
        raise DataError(f"{path}: '{key}' in {where} must be a list, got {type(v).__name__}")
    return v


def _int_id(v, path, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(f"{path}: {where} is {v!r} ({type(v).__name__}); COCO ids are integers")
    return v


def _caption(t) -> tuple[str | None, str | None]:
    """(caption, None) or (None, why it is not one). Line breaks inside become spaces, as
    one caption per line is how caption.txt stores them."""
    if not isinstance(t, str):
        return None, f"the caption is {'null' if t is None else type(t).__name__}, not a string"
    t = " ".join(x.strip() for x in t.strip().splitlines() if x.strip())
    return (t, None) if t else (None, "empty caption")


def _image_path(root: Path, name) -> tuple[Path | None, str]:
    """The image ``name`` inside ``root`` (symlinks resolved), or (None, why not)."""
    if not isinstance(name, str) or not name.strip():
        return None, f"the image name must be a non-empty string, got {name!r}"
    try:
        path = (root / name).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        return None, f"bad image path: {e}"
    if not path.is_relative_to(root):
        return None, f"the path is outside the images folder {root}"
    return path, ""


def _image_png(path: Path, max_size: int | None, size: int | None = None,
               fit: str = "crop") -> tuple[bytes, dict]:
    """The image as PNG bytes (fitted to ``size``, or its longer side cut to ``max_size``)
    and meta: the stored width and height, and the source's when they differ."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        src = {"source_width": im.width, "source_height": im.height}
        if size:
            x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
            png = encode_png(fit_image(x, size, fit).permute(1, 2, 0).numpy())
            return png, {"width": size, "height": size, **src}
        if max_size and max(im.size) > max_size:
            im.thumbnail((max_size, max_size), Image.BICUBIC)
        else:
            src = {}
        return encode_png(np.asarray(im)), {"width": im.width, "height": im.height, **src}


def _check_args(images: str, split: str, shard_size: int, max_image_size: int | None,
                image_size: int | None = None, fit: str = "crop") -> Path:
    check_name(split, "split")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"shard size must be an integer >= 1, got {shard_size!r}")
    for what, v in (("max image size", max_image_size), ("image size", image_size)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise DataError(f"{what} must be an integer >= 1, got {v!r}")
    if fit not in FITS:
        raise DataError(f"image fit must be one of {', '.join(FITS)}, got {fit!r}")
    img_dir = Path(images)
    if not img_dir.is_dir():
        raise DataError(f"image folder not found: {img_dir}")
    return img_dir


def _write(out, split, shard_size, info, img_dir: Path, items, bad, progress) -> dict:
    """items: (key, image name, {member: bytes}, meta) in a fixed order; bad: (name, why)
    of input rows already refused. Nothing changes in ``out`` unless a sample is written."""
    max_size, size, fit = info.get("max_image_size"), info.get("image_size"), info.get("image_fit")
    root = img_dir.resolve()
    with ShardSink(Path(out), split, shard_size, info, total=len(items), progress=progress) as sink:
        for name, why in bad:
            sink.skip(name, why)
        for key, name, members, meta in items:
            path, why = _image_path(root, name)
            if path is not None:
                try:
                    png, dims = _image_png(path, max_size, size, fit or "crop")
                except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
                        Image.DecompressionBombError) as e:
                    why = f"cannot read image {path}: {e}"
            if why:
                sink.skip(name, why)
                continue
            sink.write({"__key__": key, "image.png": png, **members,
                        "meta.json": encode_json({**meta, **dims})})
        if sink.num == 0:  # raised inside: the split's previous shards stay as they were
            first = sink.skipped_items[0] if sink.skipped_items else None
            raise DataError(f"no sample could be converted (all {len(items)} images skipped"
                            + (f"; first: {first['name']}: {first['reason']}" if first else "")
                            + f"); {out} is unchanged")
    return sink.entry


@CONVERTERS.register("coco")
def convert_coco(images: str, captions: str, out: str, split: str = "train",
                 questions: str | None = None, answers: str | None = None,
                 shard_size: int = 1000, max_image_size: int | None = None,
                 image_size: int | None = None, fit: str = "crop",
                 progress: bool = True) -> dict:
    """COCO captions (+ VQA v2) -> shards with image.png, caption.txt, [qa.json], meta.json."""
    if (questions is None) != (answers is None):
        raise DataError("VQA needs both --questions and --answers (annotations) files")
    img_dir = _check_args(images, split, shard_size, max_image_size, image_size, fit)
    bad: list[tuple[str, str]] = []
    cap = _load_json(captions, "COCO captions")
    files: dict[int, object] = {}
    for k, im in enumerate(_list(cap, "images", captions, "the top level")):
        iid = _int_id(_field(im, "id", captions, "an entry of 'images'"), captions,
                      f"images[{k}].id")
        if iid in files:
            raise DataError(f"{captions}: images[{k}].id {iid} appears twice in 'images'")
        files[iid] = _field(im, "file_name", captions, "an entry of 'images'")
    caps: dict[int, list[str]] = defaultdict(list)
    for k, a in enumerate(_list(cap, "annotations", captions, "the top level")):
        iid = _int_id(_field(a, "image_id", captions, "an annotation"), captions,
                      f"annotations[{k}].image_id")
        text, why = _caption(_field(a, "caption", captions, "an annotation"))
        if iid not in files:
            why = f"a caption of image_id {iid}, which 'images' does not list"
        if why:
            bad.append((f"annotations[{k}]", why))
        else:
            caps[iid].append(text)  # type: ignore[arg-type]
    qa: dict[int, list[dict]] = defaultdict(list)
    if questions is not None:
        qs = _load_json(questions, "VQA questions")
        ans = _load_json(answers, "VQA annotations")
        by_qid = {}
        for k, a in enumerate(_list(ans, "annotations", answers, "the top level")):
            by_qid[_int_id(_field(a, "question_id", answers, "an annotation"), answers,
                           f"annotations[{k}].question_id")] = a
        for k, q in enumerate(_list(qs, "questions", questions, "the top level")):
            qid = _int_id(_field(q, "question_id", questions, "a question"), questions,
                          f"questions[{k}].question_id")
            iid = _int_id(_field(q, "image_id", questions, "a question"), questions,
                          f"questions[{k}].image_id")
            a = by_qid.get(qid)
            if a is None:
                bad.append((f"questions[{k}]", f"question {qid} has no annotation in {answers}"))
                continue
            question = _field(q, "question", questions, "a question")
            answer = _field(a, "multiple_choice_answer", answers, "an annotation")
            alls = a.get("answers", [])
            if not isinstance(alls, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("answer"), str) for x in alls):
                why = "'answers' must be a list of {\"answer\": string} objects"
            elif not isinstance(question, str) or not isinstance(answer, str):
                why = "the question and its multiple_choice_answer must be strings"
            elif iid not in files:
                why = f"a question about image_id {iid}, which {captions} does not list"
            else:
                why = ""
            if why:
                bad.append((f"questions[{k}]", why))
                continue
            qa[iid].append({
                "question": question, "answer": answer, "answers": [x["answer"] for x in alls],
                "type": a.get("answer_type", "other"),
                "question_type": a.get("question_type", ""),
                "question_id": qid})
    items = []
    for image_id in sorted(files):
        name = files[image_id]
        if not caps.get(image_id) and not qa.get(image_id):
            bad.append((str(name), f"image_id {image_id} has no caption"
                        + (" or question" if questions is not None else "")))
            continue
        members = {"caption.txt": "\n".join(caps.get(image_id, [])).encode()}
        if questions is not None:
            members["qa.json"] = encode_json(sorted(qa.get(image_id, []),
                                                    key=lambda x: x["question_id"]))
        items.append((f"coco-{image_id:012d}", name, members,
                      {"source": "coco", "image_id": image_id, "file_name": name}))
    if not items:
        first = f" ({len(bad)} skipped; first: {bad[0][0]}: {bad[0][1]})" if bad else ""
        raise DataError(f"{captions}: no image has a caption{first}")
    keys = ["caption.txt", "image.png", "meta.json"] + (["qa.json"] if questions else [])
    info = {"source": "coco", "keys": sorted(keys), **_sizes(max_image_size, image_size, fit)}
    return _write(out, split, shard_size, info, img_dir, items, bad, progress)


_IMAGE_COLS = ("image", "file_name", "filename", "file", "path")
_TEXT_COLS = ("caption", "text")


class _Table:
    """Captions by image name, and the rows that gave none (named ``file:line``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.caps: dict[str, list[str]] = defaultdict(list)
        self.bad: list[tuple[str, str]] = []

    def add(self, line: int, img, texts: list) -> None:
        where = f"{self.path.name}:{line}"
        if not isinstance(img, str) or not img.strip():
            self.bad.append((where, f"the image name must be a non-empty string, got {img!r}"))
            return
        if not texts:
            self.bad.append((where, f"no caption for {img}"))
        for t in texts:
            text, why = _caption(t)
            if why:
                self.bad.append((where, f"{img}: {why}"))
            else:
                self.caps[img].append(text)  # type: ignore[arg-type]


def _read_jsonl(path: Path) -> _Table:
    table = _Table(path)
    for i, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: a row must be a JSON object, got {type(row).__name__}")
        ic = next((c for c in _IMAGE_COLS if c in row), None)
        if ic is None:
            raise DataError(f"{path}:{i}: no image key (one of {', '.join(_IMAGE_COLS)})")
        if "captions" in row:
            texts = row["captions"]
            if not isinstance(texts, list):  # a string would become one caption per letter
                table.bad.append((f"{path.name}:{i}", "'captions' must be a list of strings, "
                                  f"got {type(texts).__name__}"))
                continue
        else:
            tc = next((c for c in _TEXT_COLS if c in row), None)
            if tc is None:
                raise DataError(f"{path}:{i}: no 'caption', 'text' or 'captions' key")
            texts = [row[tc]]
        table.add(i, row[ic], texts)
    return table


def _read_csv(path: Path, delimiter: str) -> _Table:
    table = _Table(path)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter,
                        strict=True)
    try:
        cols = [c.strip() for c in next(reader, [])]
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed CSV header ({e})") from None
    ic = next((c for c in _IMAGE_COLS if c in cols), None)
    tc = next((c for c in _TEXT_COLS if c in cols), None)
    if ic is None or tc is None:
        raise DataError(f"{path}: the header needs an image column ({', '.join(_IMAGE_COLS)})"
                        f" and a caption column ({', '.join(_TEXT_COLS)}); it has {cols}")
    ii, ti = cols.index(ic), cols.index(tc)
    start = reader.line_num + 1  # the physical line the next row starts on
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise DataError(f"{path}:{start}: unterminated quote: the quoted field that "
                                "starts on this line runs to the end of the file") from None
            raise DataError(f"{path}:{start}: malformed CSV ({e}); check the quotes of the "
                            "row that starts on this line") from None
        end, line = reader.line_num, start
        start = end + 1
        if end > line:  # no caption spans lines: this is a quote left open
            raise DataError(f"{path}:{line}: a quoted field runs over lines {line}-{end} (an "
                            "unterminated quote?); captions cannot contain line breaks")
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(cols):
            table.bad.append((f"{path.name}:{line}", f"the row has {len(row)} field"
                              f"{'' if len(row) == 1 else 's'}, the header {len(cols)} (an "
                              "unquoted delimiter or a missing column?)"))
            continue
        table.add(line, row[ii], [row[ti]])
    return table


def _read_captions_table(path: Path) -> _Table:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    raise DataError(f"{path}: captions must be a .csv, .tsv or .jsonl file")


@CONVERTERS.register("folder")
def convert_folder(images: str, captions: str, out: str, split: str = "train",
                   shard_size: int = 1000, max_image_size: int | None = None,
                   image_size: int | None = None, fit: str = "crop",
                   progress: bool = True) -> dict:
    """A folder of images + captions table -> shards with image.png, caption.txt, meta.json."""
    img_dir = _check_args(images, split, shard_size, max_image_size, image_size, fit)
    table_path = Path(captions)
    if not table_path.is_file():
        raise DataError(f"captions file not found: {table_path}")
    table = _read_captions_table(table_path)
    if not table.caps:
        first = f" ({len(table.bad)} bad rows; first: {table.bad[0][0]}: {table.bad[0][1]})" \
            if table.bad else ""
        raise DataError(f"{table_path}: no captions{first}")
    items = [(f"{split}-{i:08d}", name, {"caption.txt": "\n".join(table.caps[name]).encode()},
              {"source": "folder", "file_name": name})
             for i, name in enumerate(sorted(table.caps))]
    info = {"source": "folder", "keys": ["caption.txt", "image.png", "meta.json"],
            **_sizes(max_image_size, image_size, fit)}
    return _write(out, split, shard_size, info, img_dir, items, table.bad, progress)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm")


def _files(root: Path) -> list[Path]:
    """Every file under ``root`` (hidden ones and hidden folders left out), sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _image_files(root: Path, files: list[Path], bad: list) -> list[Path]:
    """The files with an image suffix; the others are listed in ``bad`` by name."""
    out = []
    for p in files:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(p)
        else:
            bad.append((str(p.relative_to(root)), f"not an image file (suffix "
                        f"'{p.suffix or '(none)'}'; read: {', '.join(IMAGE_SUFFIXES)})"))
    return out


@CONVERTERS.register("images")
def convert_images(images: str, out: str, split: str = "train", shard_size: int = 1000,
                   max_image_size: int | None = None, image_size: int | None = None,
                   fit: str = "crop", progress: bool = True) -> dict:
    """Every image under a folder -> shards with image.png and meta.json (no text)."""
    img_dir = _check_args(images, split, shard_size, max_image_size, image_size, fit)
    root = img_dir.resolve()
    bad: list[tuple[str, str]] = []
    names = [str(p.relative_to(root)) for p in _image_files(root, _files(root), bad)]
    if not names:
        raise DataError(f"{img_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    items = [(f"{split}-{i:08d}", n, {}, {"source": "images", "file_name": n})
             for i, n in enumerate(names)]
    info = {"source": "images", "keys": ["image.png", "meta.json"],
            **_sizes(max_image_size, image_size, fit)}
    return _write(out, split, shard_size, info, img_dir, items, bad, progress)


@CONVERTERS.register("imagefolder")
def convert_imagefolder(images: str, out: str, split: str = "train", shard_size: int = 1000,
                        max_image_size: int | None = None, image_size: int | None = None,
                        fit: str = "crop", caption_template: str = "a photo of a {}.",
                        progress: bool = True) -> dict:
    """``root/<class>/<image>`` -> shards with image.png, meta.json (label, class_name) and,
    unless ``caption_template`` is empty, caption.txt (the template with the class name,
    ``_`` read as a space). Classes are the sorted folder names, numbered from 0 (as
    torchvision's ImageFolder numbers them)."""
    img_dir = _check_args(images, split, shard_size, max_image_size, image_size, fit)
    if caption_template and "{}" not in caption_template:
        raise DataError(f"caption template {caption_template!r} has no {{}} for the class name")
    root = img_dir.resolve()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{img_dir}: no class folders (the layout is {img_dir}/<class>/<image>)")
    bad: list[tuple[str, str]] = []
    items = []
    for p in _image_files(root, _files(root), bad):
        rel = p.relative_to(root)
        if len(rel.parts) < 2:
            bad.append((str(rel), "not inside a class folder"))
            continue
        name = rel.parts[0]
        label = classes.index(name)
        members = ({"caption.txt": caption_template.format(name.replace("_", " ")).encode()}
                   if caption_template else {})
        items.append((f"{split}-{len(items):08d}", str(rel), members,
                      {"source": "imagefolder", "file_name": str(rel), "label": label,
                       "class_name": name}))
    if not items:
        raise DataError(f"{img_dir}: no image files in its class folders")
    keys = ["image.png", "meta.json"] + (["caption.txt"] if caption_template else [])
    info = {"source": "imagefolder", "keys": sorted(keys), "classes": classes,
            "caption_template": caption_template or None,
            **_sizes(max_image_size, image_size, fit)}
    return _write(out, split, shard_size, info, img_dir, items, bad, progress)


def _sizes(max_image_size: int | None, image_size: int | None, fit: str) -> dict:
    """The manifest's record of how images were sized."""
    return {"max_image_size": max_image_size, "image_size": image_size,
            "image_fit": fit if image_size else None}
