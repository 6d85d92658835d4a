"""Pretraining corpus: the shards read once and tokenised into tensors held in memory.

Every sample becomes: its captions as text ids, the index of the spoken caption, the
image's VQ codes (raster order), its patch features (the VQ encoder's l2-normalised
latents, or a timm patch encoder's tokens), its uint8 pixels at the VQ tokenizer's image
size (for a trainable pixel encoder), and, when the shards have speech, the stacked
fbank frames (float16) with their speech-tokenizer units. Batches are then drawn from
memory, so a step costs only the model, and the data order is a pure function of
(seed, step): exact resume needs no reader state. This fits datasets up to a few hundred
thousand samples (ShapesWorld: 2000 samples, ~110 MB, and 25 MB of 64 px pixels); larger
ones want the streaming reader (``train/data/pipeline.py``), which the corpus is built from.

The corpus is cached as ``corpus-<split>.safetensors`` in the run directory (a tree file:
tensors and JSON, never a pickle) with a fingerprint of its inputs (settings, tokenizer
files, every shard's SHA-256); a cache whose fingerprint differs is rebuilt, never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from omnimask.config import DataConfig
from omnimask.errors import OmnimaskError
from omnimask.safeio import UnreadableFile, load_tree, save_tree

log = logging.getLogger("omnimask.corpus")


@dataclass
class Corpus:
    keys: list[str]
    captions: list[list[list[int]]]  # sample -> captions -> text ids (no specials)
    spoken: list[int]  # index of the spoken caption (0 when unknown)
    codes: torch.Tensor  # [N, P * depth] long, VQ code ids (raster order; rq: id stacks)
    latents: torch.Tensor  # [N, P, code_dim] float16, l2-normalised VQ latents (soft targets)
    features: torch.Tensor  # [N, P, feat_dim] float16, the trunk's image input features
    grid: tuple[int, int]
    speech: list[torch.Tensor] | None = None  # sample -> [n, frame_dim] float16
    units: list[torch.Tensor] | None = None  # sample -> [n] long
    pixels: torch.Tensor | None = None  # [N, 3, S, S] uint8, the images the VQ codes are of
    texts: list[list[str]] | None = None  # sample -> captions as written (metric references)
    # sample -> questions: {"question": str, "ids": text ids, "answers": [str, ...] (one or
    # several annotators' answers), "type": str, optional "grounding": instance ids per
    # role}; None when the shards have no qa.json
    qa: list[list[dict]] | None = None
    # [N, P, C] float16: each patch's fraction of pixels of each semantic class (seg.png;
    # C = the largest class id present + 1); None when the shards have no seg.png
    regions: torch.Tensor | None = None
    # [N, P, 1 + len(region_colors)] float16: each patch's fraction of pixels of each object
    # colour (0: no object), from inst.png and meta.json's objects (an attribute, as a
    # detector's); None without them
    region_attrs: torch.Tensor | None = None
    region_colors: list[str] | None = None  # colour names, attribute ids 1.. in this order
    # segmentation: [N, S, S] uint8 class per pixel (seg.png) and instance per pixel
    # (inst.png, 0: none), at the pixels' size; None without them
    seg: torch.Tensor | None = None
    inst: torch.Tensor | None = None
    # class id -> name: the meta.json name (category, class or shape) of the objects whose
    # pixels carry it, "background" for an unnamed class 0, "class K" for another
    seg_classes: list[str] | None = None
    # sample -> referring expressions: {"expression": str, "ids": text ids, "instance": int}
    refs: list[list[dict]] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_speech(self) -> bool:
        return self.speech is not None

    @property
    def depth(self) -> int:
        """Code ids per grid position (an rq tokenizer's levels; 1 otherwise)."""
        return self.codes.shape[1] // (self.grid[0] * self.grid[1])


def _fingerprint(shards: list[str], parts: dict) -> str:
    """Of the inputs and every shard's bytes: a shard edited in place changes it."""
    from omnimask.safeio import sha256_file

    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for p in shards:
        h.update(f"{p}:{sha256_file(p)}".encode())
    return h.hexdigest()[:16]


def tokenizer_id(directory: str | None) -> str:
    """A fingerprint of a tokenizer directory's files (names and bytes)."""
    if not directory:
        return ""
    h = hashlib.sha256()
    for p in sorted(Path(directory).glob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def build_corpus(shards: list[str], text_tok, image_tok, speech_tok=None,
                 features: str = "vq", patch_encoder: str = "vit_tiny_patch16_224",
                 progress: bool = True) -> Corpus:
    """Read ``shards`` once (shard order) and tokenise every modality."""
    from omnimask.train.data.pipeline import ShardLoader
    from omnimask.train.data.shards import expand_shards, shard_keys

    paths = expand_shards(shards)
    keys_present = shard_keys(paths)
    want_speech = speech_tok is not None and "speech.flac" in keys_present
    want_qa = "qa.json" in keys_present
    want_refs = "refs.json" in keys_present
    want_seg = "seg.png" in keys_present and "inst.png" in keys_present
    want_meta = want_speech or (want_seg and "meta.json" in keys_present)
    procs = (["image", "text"] + (["speech"] if want_speech else [])
             + (["meta"] if want_meta else []) + (["qa"] if want_qa else [])
             + (["masks"] if want_seg else []) + (["refs"] if want_refs else []))
    size = image_tok.model.cfg.image_size
    cfg = DataConfig(shards=paths, processors=procs, batch_size=64, shuffle_buffer=0,
                     shuffle_shards=False, image_size=size)
    pe = None
    if features == "patch_encoder":
        from omnimask.modalities.image.patch_encoder import PatchEncoder  # imports timm: slow

        pe = PatchEncoder(patch_encoder, image_size=size, patch_size=8).eval()
    elif features != "vq":
        raise OmnimaskError(f"corpus features must be vq or patch_encoder, got {features!r}")
    vq = image_tok.model
    out = {"keys": [], "captions": [], "spoken": [], "codes": [], "latents": [], "features": [],
           "speech": [], "units": [], "pixels": [], "texts": [], "qa": [], "seg": [],
           "inst": [], "colors": [], "names": {}, "refs": []}
    bar = tqdm(desc="tokenising corpus", unit="sample", disable=not progress)
    with torch.no_grad():
        for b in ShardLoader(cfg, rank=0, world_size=1):
            n = len(b["__key__"])
            pixels = image_tok.prepare(b["image"])  # at the VQ tokenizer's size
            out["pixels"].append(pixels)
            z = vq.unit_latents(pixels)
            flat = z.reshape(-1, z.shape[-1])
            if vq.cfg.depth > 1:  # rq: each position's id stack (depth innermost), matched
                # by distance on the latents as they are; kept l2-normalised as the others
                out["codes"].append(vq.quantizer.ids(flat).reshape(n, -1))
                z = torch.nn.functional.normalize(z, dim=-1)
            else:
                out["codes"].append(vq.quantizer.nearest(flat).reshape(n, -1))
            out["latents"].append(z.half())
            out["features"].append((pe(b["image"]) if pe is not None else z).half())
            if want_seg:
                out["seg"].extend(b["seg"])
                out["inst"].extend(b["inst"])
                if want_meta:
                    out["colors"].extend(_instance_colors(b["inst"][i], b["meta"][i])
                                         for i in range(n))
                    for i in range(n):
                        _class_names(b["seg"][i], b["inst"][i], b["meta"][i], out["names"])
            for i in range(n):
                out["keys"].append(b["__key__"][i])
                out["captions"].append([e.ids for e in text_tok.tok.encode_batch(
                    b["captions"][i], add_special_tokens=False)])
                out["texts"].append(list(b["captions"][i]))
                if want_qa:
                    out["qa"].append(_questions(b["qa"][i], text_tok))
                if want_refs:
                    out["refs"].append(_expressions(b["refs"][i], text_tok))
                if want_speech:
                    sp = b["meta"][i].get("speech", {})
                    out["spoken"].append(int(sp.get("caption_index", 0)))
                    wav = b["speech"][i]
                    feats = speech_tok.features(wav, 16000, b["__key__"][i])
                    out["speech"].append(feats.half())
                    out["units"].append(speech_tok.quantizer(feats))
                else:
                    out["spoken"].append(0)
            bar.update(n)
    bar.close()
    if not out["keys"]:
        raise OmnimaskError(f"no samples in {shards}")
    side = vq.cfg.tokens_side
    regions = patch_classes(torch.stack(out["seg"]), side) if want_seg else None
    attrs = names = None
    if want_seg and want_meta and any(c is not None for c, _ in out["colors"]):
        names = sorted({n for _, ns in out["colors"] for n in ns if n})
        ids = torch.stack([_color_ids(c, ns, names) for c, ns in out["colors"]])
        attrs = patch_classes(ids, side, len(names) + 1)
    seg = inst = classes = None
    if want_seg:
        seg = torch.stack(out["seg"]).to(torch.uint8)
        inst = torch.stack(out["inst"]).to(torch.uint8)
        classes = _name_classes(int(seg.max()) + 1, out["names"])
    return Corpus(keys=out["keys"], captions=out["captions"], spoken=out["spoken"],
                  codes=torch.cat(out["codes"]), latents=torch.cat(out["latents"]),
                  features=torch.cat(out["features"]), grid=(side, side),
                  speech=out["speech"] if want_speech else None,
                  units=out["units"] if want_speech else None,
                  pixels=torch.cat(out["pixels"]), texts=out["texts"],
                  qa=out["qa"] if want_qa else None, regions=regions, region_attrs=attrs,
                  region_colors=names, seg=seg, inst=inst,
                  seg_classes=classes, refs=out["refs"] if want_refs else None)


NAME_KEYS = ("category", "class", "shape")  # meta.json object keys that name its class


def _class_names(seg: torch.Tensor, inst: torch.Tensor, meta: dict,
                 names: dict[int, str]) -> None:
    """Record in ``names`` the class id under each meta.json object that names its class
    (the most frequent class id under its instance's pixels)."""
    for o in meta.get("objects", []):
        key = next((k for k in NAME_KEYS if k in o), None)
        if key is None or "id" not in o:
            continue
        under = seg[inst == int(o["id"])]
        if under.numel():
            names.setdefault(int(under.long().mode().values), str(o[key]))


def _name_classes(n: int, names: dict[int, str]) -> list[str]:
    out = [names.get(k, f"class {k}") for k in range(n)]
    if 0 not in names:
        out[0] = "background"
    return out


def _expressions(refs: list[dict], text_tok) -> list[dict]:
    """refs.json entries ({"expression", "instance"}) with their text ids."""
    refs = [r for r in refs if "expression" in r and "instance" in r]
    ids = text_tok.tok.encode_batch([str(r["expression"]) for r in refs],
                                    add_special_tokens=False)
    return [{"expression": str(r["expression"]), "ids": e.ids, "instance": int(r["instance"])}
            for r, e in zip(refs, ids)]


def _instance_colors(inst: torch.Tensor, meta: dict) -> tuple[torch.Tensor | None, list[str]]:
    """The instance map and, per instance id, its object's colour name (meta.json's
    ``objects``: ``id`` and ``color``); (None, []) when meta.json names no colours."""
    objs = [o for o in meta.get("objects", []) if "id" in o and "color" in o]
    if not objs:
        return None, []
    names = [""] * (1 + max(int(o["id"]) for o in objs))
    for o in objs:
        names[int(o["id"])] = str(o["color"])
    return inst, names


def _color_ids(inst: torch.Tensor | None, by_id: list[str], names: list[str]) -> torch.Tensor:
    """[H, W] attribute ids: 1 + the colour's index in ``names`` under each object, else 0."""
    if inst is None:
        raise OmnimaskError("some samples' meta.json name object colours and some do not")
    lut = torch.zeros(max(256, len(by_id)), dtype=torch.long)
    for k, n in enumerate(by_id):
        if n:
            lut[k] = 1 + names.index(n)
    return lut[inst.long()]


def patch_classes(seg: torch.Tensor, side: int, classes: int = 0) -> torch.Tensor:
    """[N, H, W] class ids -> [N, side * side, C] float16: each patch's (raster order)
    fraction of pixels of each class, C = ``classes`` or the largest id + 1."""
    n, h, w = seg.shape
    if h % side or w % side:
        raise OmnimaskError(f"seg.png of {h}x{w} pixels does not split into {side}x{side} "
                            f"patches")
    hot = torch.nn.functional.one_hot(seg.long(), classes or int(seg.max()) + 1).float()
    hot = hot.view(n, side, h // side, side, w // side, -1).mean((2, 4))
    return hot.reshape(n, side * side, -1).half()


def _questions(qa: list[dict], text_tok) -> list[dict]:
    """qa.json entries with their text ids; ``answers`` is a list (VQA v2 keeps ten);
    ``grounding`` (instance ids per role of the question) where the data has it."""
    ids = text_tok.tok.encode_batch([str(q["question"]) for q in qa], add_special_tokens=False)
    out = []
    for q, e in zip(qa, ids):
        a = q.get("answers", q["answer"])
        item = {"question": str(q["question"]), "ids": e.ids,
                "answers": [str(x) for x in (a if isinstance(a, list) else [a])],
                "type": str(q.get("type", "other"))}
        if isinstance(q.get("grounding"), list):  # instance ids per role (ShapesWorld >= 1.1)
            item["grounding"] = [[int(i) for i in role] for role in q["grounding"]]
        out.append(item)
    return out


def share_cache(src_run: str | os.PathLike, dst_run: str | os.PathLike,
                splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """Hard-link ``src_run``'s ``corpus-<split>.safetensors`` into ``dst_run`` where it has
    none (a copy where links fail): runs over the same shards and tokenizers then tokenise
    once. ``load_or_build`` still checks the fingerprint, and rewrites by renaming, so a
    link is never written through. Returns the splits shared."""
    import shutil

    done = []
    for split in splits:
        src = Path(src_run) / f"corpus-{split}.safetensors"
        dst = Path(dst_run) / src.name
        if not src.is_file() or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        done.append(split)
    return done


def load_or_build(path: str | os.PathLike, shards: list[str], tokenizers: dict[str, str | None],
                  loaded: dict, features: str = "vq", patch_encoder: str = "vit_tiny_patch16_224",
                  progress: bool = True) -> Corpus:
    """The cached corpus at ``path`` if its fingerprint matches, else build and cache it."""
    from omnimask.train.data.shards import expand_shards

    paths = expand_shards(shards)
    if not paths:
        raise OmnimaskError(f"no shards match {shards}")
    fp = _fingerprint(paths, {"tokenizers": {k: tokenizer_id(v) for k, v in tokenizers.items()},
                              "features": features, "patch_encoder": patch_encoder,
                              "version": 7})  # 2: pixels; 3: texts, qa; 4-5: regions; 6: masks; 7: grounding
    p = Path(path)
    if p.is_file():
        try:
            blob = load_tree(p)
            if blob.get("fingerprint") == fp:
                return Corpus(**blob["corpus"])
            log.warning("corpus cache %s was built from other inputs; rebuilding", p)
        except (UnreadableFile, TypeError, AttributeError) as e:  # rebuilt, never trusted
            log.warning("corpus cache %s unreadable (%s); rebuilding", p, e)
    c = build_corpus(paths, loaded["text"], loaded["image"], loaded.get("speech"), features,
                     patch_encoder, progress)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_tree(p, {"fingerprint": fp, "corpus": {f.name: getattr(c, f.name) for f in fields(c)}})
    return c
