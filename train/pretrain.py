"""``omnimask pretrain``: config, build (corpus, model, objectives, mixing), run.

One objective per optimizer step, drawn by the configured ratios from a generator seeded
by (seed, step) alone, so every rank draws the same one (UNITER's ``MetaLoader``);
each rank then draws its own samples. Validation: every objective on fixed val batches
(same samples and masks every time), logged per objective. The end-of-run samples and
their scores are in ``train/evaluate.py``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from omnimask.config import check_choice, check_fields, save_config
from omnimask.errors import ConfigError, OmnimaskError
from omnimask.model import ModelConfig, OmniModel
from omnimask.safeio import atomic_write_bytes

from . import checkpoint as ckpt
from . import distributed as dist
from .encoder_warmup import EncoderWarmupConfig, check_labels, tag_words, warm_up_encoder
from .evaluate import ORDERS, RERANKERS, SAMPLERS, resolve_sampler, samples, val_history
from .objectives.base import (
    OBJECTIVES,
    Context,
    ObjectivesConfig,
    mix_weights,
    pretraining_heads,
)
from .trainer import Trainer, TrainerConfig, seed_everything, step_seed

log = logging.getLogger("omnimask.pretrain")
TOKENIZER_IDS = "tokenizers.json"  # fingerprints of the tokenizers a run was trained with
WARMUP = "encoder_warmup.json"  # the image encoder's warm-up result


@dataclass
class PretrainData:
    train: list[str] = field(default_factory=list)  # shard paths / globs
    val: list[str] = field(default_factory=list)
    features: str = "vq"  # image input features: vq (tokenizer latents) | patch_encoder (timm)
    patch_encoder: str = "vit_tiny_patch16_224"
    val_batches: int = 2  # per objective
    val_batch_size: int = 64

    def __post_init__(self) -> None:
        check_choice(self, "features", ("vq", "patch_encoder"), prefix="data.")
        check_fields(self, ">=1", "val_batches", "val_batch_size", prefix="data.")


@dataclass
class TokenizerPaths:
    text: str = ""
    image: str = ""
    speech: str | None = None


@dataclass
class GenerateConfig:
    captions: int = 8  # val images to caption at the end
    images: int = 8  # val captions to draw
    # cm3: left to right; maskgit: parallel rounds (objective maskgit); auto: cm3, or
    # maskgit for an rq tokenizer's id stacks
    sampler: str = "auto"
    steps: int = 12  # maskgit's rounds
    order: str = "confidence"  # maskgit: a round keeps its most confident codes, or random ones
    temperature: float = 1.0  # image sampling
    top_k: int = 20
    guidance: float = 1.0  # classifier-free guidance scale for images (1: none)
    candidates: int = 1  # images sampled per caption; the best by `rerank` is kept
    rerank: str = "itc"  # itc | itm: the model's own head scores the candidates
    caption_candidates: int = 1  # the greedy caption + samples; the best by `rerank` is kept
    caption_temperature: float = 0.7  # sampling the extra caption candidates (top_k applies)
    # ShapesWorld shape judge (train/data/shapesworld/judge.py, safetensors): scores the
    # drawn images and the VQ's reconstructions of the same val images against the
    # captions; "shipped": the package's judge; a file path: trained and saved there when
    # missing (~30 s); empty: no judging
    shape_judge: str | None = None
    grid_images: int = 8  # drawn images shown in generated_images.png

    def __post_init__(self) -> None:
        p = "generate."
        check_choice(self, "rerank", RERANKERS, prefix=p)
        check_choice(self, "sampler", SAMPLERS, prefix=p)
        check_choice(self, "order", ORDERS, prefix=p)
        check_fields(self, ">=1", "captions", "images", "candidates", "caption_candidates",
                     "grid_images", "steps", prefix=p)
        check_fields(self, ">=0", "temperature", "top_k", "caption_temperature", prefix=p)
        check_fields(self, ">0", "guidance", prefix=p)


@dataclass
class PretrainConfig:
    out: str = "runs/pretrain"
    prepare: bool = False  # create missing ShapesWorld shards/tokenizers like the demo does
    init_from_tokenizers: bool = True  # code/unit embeddings and MRC codes from the tokenizers
    data: PretrainData = field(default_factory=PretrainData)
    tokenizers: TokenizerPaths = field(default_factory=TokenizerPaths)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    # the pixel encoder learns the shards' semantic classes before the first step
    # (train/encoder_warmup.py); skipped when the run resumes from a checkpoint
    encoder_warmup: EncoderWarmupConfig = field(default_factory=EncoderWarmupConfig)


def load_tokenizers(paths: TokenizerPaths) -> dict:
    from omnimask.modalities.image.tokenizer import ImageTokenizer
    from omnimask.modalities.speech.tokenizer import SpeechTokenizer
    from omnimask.modalities.text.tokenizer import TextTokenizer

    for key in ("text", "image"):
        if not getattr(paths, key) or not Path(getattr(paths, key)).is_dir():
            raise ConfigError(f"tokenizers.{key}: no tokenizer directory at "
                              f"{getattr(paths, key)!r}")
    if paths.speech and not Path(paths.speech).is_dir():
        raise ConfigError(f"tokenizers.speech: no tokenizer directory at {paths.speech!r}")
    return {"text": TextTokenizer.load(paths.text), "image": ImageTokenizer.load(paths.image),
            "speech": SpeechTokenizer.load(paths.speech) if paths.speech else None}


def word_starts(text_tok) -> torch.Tensor:
    """[text vocab] bool: the byte-level BPE token begins a word ('Ġ' prefix) or is special."""
    n = text_tok.vocab_size
    out = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        t = text_tok.tok.id_to_token(i) or ""
        out[i] = t.startswith("Ġ") or text_tok.is_special(i)
    return out


class Pretraining:
    """Everything ``omnimask pretrain`` builds, usable from Python and tests."""

    def __init__(self, cfg: PretrainConfig, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        ii, feats = cfg.model.image_input, cfg.data.features
        if cfg.generate.candidates > 1 and ii != "pixels" and feats != "vq":
            raise ConfigError("generate.candidates > 1 reranks samples on their VQ features; "
                              f"data.features is {feats!r}, not 'vq'")
        # the corpus computes the features the model reads (pixels: the VQ latents, which
        # MRFR regresses); patch-encoder features for a pixels model would go unread
        want = "patch_encoder" if ii == "patch_encoder" else "vq"
        if feats != want:
            raise ConfigError(f"model.image_input={ii} needs data.features={want}, got "
                              f"data.features={feats}")
        self.run = Path(cfg.out)
        self._fwd = None  # the trainer's forward entry (DDP/FSDP) while training
        with dist.rank0_first(cfg.trainer.parallel, cfg.trainer.device):
            # before anything in the run directory is touched (rank 0 holds it for all)
            self.lock = dist.run_lock(self.run)
            self._build_locked(progress)

    def _build_locked(self, progress: bool) -> None:
        try:
            self._build(progress)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, progress: bool) -> None:
        from .corpus import load_or_build, tokenizer_id

        cfg = self.cfg
        if cfg.prepare:
            prepare_shapes(cfg, progress)
        self.toks = load_tokenizers(cfg.tokenizers)
        text, image, speech = self.toks["text"], self.toks["image"], self.toks["speech"]
        self.vocab = text.vocab(image.size, speech.size if speech else 0)
        tk = {"text": cfg.tokenizers.text, "image": cfg.tokenizers.image,
              "speech": cfg.tokenizers.speech}
        self._check_resume_inputs({k: tokenizer_id(v) for k, v in tk.items()})
        self.train = load_or_build(self.run / "corpus-train.safetensors", cfg.data.train, tk,
                                   self.toks, cfg.data.features, cfg.data.patch_encoder, progress)
        self.val = load_or_build(self.run / "corpus-val.safetensors", cfg.data.val, tk,
                                 self.toks, cfg.data.features, cfg.data.patch_encoder, progress)
        oc = cfg.objectives
        mix = {k: float(v) for k, v in oc.mix.items() if float(v) > 0}
        if not mix:
            raise ConfigError("objectives.mix: no objective has a positive ratio")
        if oc.mix_start and not any(float(v) > 0 for v in oc.mix_start.values()):
            raise ConfigError("objectives.mix_start: no objective has a positive ratio")
        for key, ratios in (("mix", oc.mix), ("mix_start", oc.mix_start)):
            for name, v in ratios.items():
                if name not in OBJECTIVES:
                    raise ConfigError(f"objectives.{key}.{name}: unknown objective; known: "
                                      f"{', '.join(OBJECTIVES.names())}")
                if float(v) < 0:
                    raise ConfigError(f"objectives.{key}.{name}: ratio {v} is negative")
        mix |= {k: float(v) for k, v in oc.mix_start.items() if float(v) > 0}
        if "speech" in mix and not self.train.has_speech:
            log.warning("the training shards have no speech (or tokenizers.speech is not set): "
                        "the speech objective is left out of objectives.mix and mix_start")
            del mix["speech"]
            if not any(float(oc.mix.get(n, 0)) > 0 for n in mix):
                raise ConfigError("objectives.mix: no objective but speech has a positive "
                                  "ratio, and the training shards have no speech")
        g = cfg.generate
        g.sampler = resolve_sampler(g.sampler, self.train.depth)
        if self.train.depth > 1 and "cm3" in mix and g.images > 0 and g.sampler == "cm3":
            raise ConfigError(f"generate.sampler=cm3 draws one image code per position, and "
                              f"tokenizers.image ({cfg.tokenizers.image}) gives stacks of "
                              f"{self.train.depth} (vq.quantizer=rq): set generate.sampler="
                              f"maskgit (or auto), or generate.images=0")
        if "cm3" in mix and g.images > 0 and g.sampler == "maskgit" and "maskgit" not in mix:
            log.warning("generate.sampler=maskgit draws with a head that objectives.mix does "
                        "not train: add objectives.mix.maskgit")
        pixels = cfg.model.image_input == "pixels"
        if cfg.encoder_warmup.steps > 0:  # before anything is written to the run directory
            if not pixels:
                raise ConfigError(f"encoder_warmup.steps > 0 trains the pixel encoder; "
                                  f"model.image_input is {cfg.model.image_input!r}, not "
                                  f"'pixels'")
            check_labels(self.train, self.val, cfg.encoder_warmup)
        self.ctx = Context(vocab=self.vocab, codebook=image.model.quantizer.codes().detach(),
                           word_start=word_starts(text), cfg=cfg.objectives, pixels=pixels,
                           depth=self.train.depth)
        self.names = sorted(mix)  # every objective with a positive ratio at some step
        self.objectives = {n: OBJECTIVES.create(n, self.ctx) for n in self.names}
        cfg.model.mrc_temperature = cfg.objectives.mrc_temperature
        if cfg.encoder_warmup.steps > 0 and cfg.encoder_warmup.tags != "none":
            cfg.model.image_encoder = replace(cfg.model.image_encoder,
                                              tags=tag_words(self.train, cfg.encoder_warmup))
        self.model = build_model(cfg.model, self.toks, self.vocab, self.train,
                                 pretraining_heads(cfg.objectives), tk, cfg.trainer.seed,
                                 cfg.init_from_tokenizers, cfg.data.features == "vq")
        self.vocab.save(self.run / "vocab.json")
        save_config(cfg, self.run)
        self._val_batches = self._fixed_val_batches()

    def _resumes(self) -> bool:
        """The trainer will start from a checkpoint (a named one, or ``auto`` finding one)."""
        tc = self.cfg.trainer
        return tc.resume not in ("auto", "never") or (
            tc.resume == "auto" and bool(ckpt.complete(self.run / "checkpoints")))

    def _check_resume_inputs(self, tokenizer_ids: dict[str, str]) -> None:
        """A run that will resume keeps its vocabulary and tokenizers: ``VocabMismatch``
        naming both otherwise, raised before anything in the run directory is rewritten."""
        from omnimask.modalities.vocab import Vocab, VocabMismatch

        if self._resumes():
            saved_vocab, saved_ids = self.run / "vocab.json", self.run / TOKENIZER_IDS
            if saved_vocab.is_file():
                Vocab.load(saved_vocab).check_compatible(self.vocab, "configured tokenizers")
            if saved_ids.is_file():
                before = json.loads(saved_ids.read_text())
                for k, v in tokenizer_ids.items():
                    if before.get(k, "") != v:
                        raise VocabMismatch(
                            f"tokenizers.{k} ({getattr(self.cfg.tokenizers, k)}, fingerprint "
                            f"{v or 'none'}) is not the tokenizer this run was trained with "
                            f"(fingerprint {before.get(k) or 'none'} in {saved_ids}); use "
                            "the original tokenizer or a new run directory")
        atomic_write_bytes(self.run / TOKENIZER_IDS,
                           (json.dumps(tokenizer_ids, indent=1) + "\n").encode())

    # -- data --------------------------------------------------------------------------------
    def make_batch(self, step: int, micro: int) -> tuple[str, dict]:
        seed = self.cfg.trainer.seed
        # the objective from (seed, step) alone: every micro-batch of an optimizer step
        # (trainer.accumulate > 1) trains the same one; the samples differ per micro-batch
        g = torch.Generator().manual_seed(step_seed(seed, step))
        w = mix_weights(self.names, self.cfg.objectives, step)
        name = self.names[int(torch.multinomial(w, 1, generator=g))]
        # `micro` counts micro-batches over all ranks: each rank draws its own samples
        gd = torch.Generator().manual_seed(step_seed(seed + 7919, step, micro))
        n = min(self.cfg.trainer.batch_size, len(self.train))
        idx = torch.randperm(len(self.train), generator=gd)[:n].tolist()
        return name, self.objectives[name].batch(self.train, idx, gd)

    def _fixed_val_batches(self) -> dict[str, list[dict]]:
        out = {}
        n = min(self.cfg.data.val_batch_size, len(self.val))
        for k, name in enumerate(self.names):
            out[name] = []
            for j in range(self.cfg.data.val_batches):
                g = torch.Generator().manual_seed(1_000_000 + 1000 * k + j)
                idx = torch.randperm(len(self.val), generator=g)[:n].tolist()
                out[name].append(self.objectives[name].batch(self.val, idx, g))
        return out

    def loss(self, name: str, batch: dict, model=None) -> dict:
        """One objective's loss dict; through the trainer's forward entry while training."""
        b = {k: (v.to(self.device) if hasattr(v, "to") and not isinstance(v, list) else v)
             for k, v in batch.items()} if self.device.type != "cpu" else batch
        return self.objectives[name].loss(model or self._fwd or self.model, b)

    def evaluate(self, model) -> dict:
        losses, extra = {}, {}
        for name, batches in self._val_batches.items():
            outs = [self.loss(name, b, model) for b in batches]
            losses[name] = round(sum(float(o[name]) for o in outs) / len(outs), 5)
            for key in outs[0]:
                if key not in ("loss", name, "tokens"):
                    extra[key] = round(sum(float(o[key]) for o in outs) / len(outs), 5)
        return {"losses": losses, "metrics": extra}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- run ---------------------------------------------------------------------------------
    def warm_up(self) -> dict | None:
        """The image encoder's region-label warm-up (``encoder_warmup``) on a fresh run;
        its result is kept in ``RUN/encoder_warmup.json``."""
        wc = self.cfg.encoder_warmup
        if wc.steps <= 0 or self._resumes():
            return None
        enc = self.model.encoder.embedders["image"].encoder
        # every rank warms up alike (seeded, deterministic on CPU); rank 0 writes
        out = warm_up_encoder(enc, self.train, self.val, wc, self.cfg.trainer.seed,
                              self.progress and dist.is_main())
        if dist.is_main():
            atomic_write_bytes(self.run / WARMUP, json.dumps(out, indent=1).encode())
        return out

    def fit(self) -> dict:
        t0 = time.perf_counter()
        warm = self.warm_up()
        trainer = Trainer(self.cfg.trainer, self.run, self.model, self.make_batch, self.loss,
                          self.evaluate, self.progress)
        self._fwd = trainer.forward_model
        try:
            summary = trainer.fit()
            self._fwd = None
            if trainer.fsdp:  # the end-of-run samples need whole weights: gathered to rank 0
                self.model = self._unsharded(trainer)
            if not dist.is_main():  # rank 0 writes the samples and the summary
                return summary
            summary["train_seconds"] = round(time.perf_counter() - t0, 1)
            if (self.run / WARMUP).is_file():
                summary["encoder_warmup"] = warm or json.loads((self.run / WARMUP).read_text())
            summary["val"] = val_history(self.run / "metrics.jsonl")
            if not summary["status"].startswith("interrupted"):
                summary["samples"] = (samples(self.model, self.ctx, self.toks, self.val,
                                              self.cfg.generate, self.run, self.progress)
                                      if "cm3" in self.objectives else {})
                if self.cfg.trainer.tensorboard and summary["samples"]:
                    samples_to_tb(self.run, summary["step"], summary["samples"])
            atomic_write_bytes(self.run / "summary.json", json.dumps(summary, indent=1).encode())
        finally:
            self.lock.release()
        return summary

    def _unsharded(self, trainer: Trainer) -> OmniModel | None:
        """A plain copy of an FSDP-trained model on rank 0 (every rank must call this)."""
        from .trainer import load_weights

        w = trainer._weights()
        if not dist.is_main():
            return None
        m = OmniModel(self.cfg.model, pretraining_heads(self.cfg.objectives))
        load_weights(m, w, "the FSDP-trained weights")
        m.vocab, m.tokenizer_dirs = self.model.vocab, self.model.tokenizer_dirs
        return m.to(trainer.device)


def samples_to_tb(run: Path, step: int, s: dict) -> None:
    """The end-of-run samples in TensorBoard: the drawn-images figure and the captions (CM3
    caption beside its reference, as a Markdown table)."""
    from .trainer import tb_add

    def cell(t: str) -> str:
        return t.replace("|", "\\|").replace("\n", " ")

    rows = ["| generated | reference |", "|---|---|"]
    rows += [f"| {cell(c['generated'])} | {cell(c['reference'])} |" for c in s.get("captions", [])]
    texts = {"samples/captions": "\n".join(rows)} if s.get("captions") else {}
    images = {"samples/generated_images": s["images_png"]} if s.get("images_png") else {}
    tb_add(run, step, images, texts)


def build_model(mc: ModelConfig, toks: dict, vocab, corpus, heads, tokenizer_dirs: dict,
                seed: int, init_from_tokenizers: bool = True, vq_features: bool = True
                ) -> OmniModel:
    """A fresh model for ``toks``/``vocab``, its input sizes set from ``corpus`` (``mc`` is
    completed in place): what pretraining and fine-tuning from scratch start from."""
    image, speech = toks["image"], toks.get("speech")
    pixels = mc.image_input == "pixels"
    codebook = image.model.quantizer.codes().detach()
    mc.trunk.vocab_size = vocab.size
    # from pixels the projection maps VQ code vectors (CM3's inputs, MRFR's targets)
    mc.image_feature_dim = int((corpus.latents if pixels else corpus.features).shape[-1])
    if pixels:  # the encoder's token grid is the VQ grid, position by position
        rows, cols = corpus.grid
        if rows != cols:
            raise ConfigError(f"model.image_input=pixels needs a square token grid, the "
                              f"image tokenizer gives {rows}x{cols}")
        size, enc = int(corpus.pixels.shape[-1]), mc.image_encoder
        stages = (size // rows).bit_length() - 1
        channels = list(enc.channels)
        if enc.backbone == "conv" and len(channels) > stages >= 1 and size == rows << stages:
            # a finer tokenizer grid: the conv stem keeps its first stages
            log.info("model.image_encoder: %d stride-2 stages for the tokenizer's %dx%d grid, "
                     "channels %s", stages, rows, rows, channels[:stages])
            channels = channels[:stages]
        try:
            mc.image_encoder = replace(enc, dim=mc.trunk.dim, grid=rows, image_size=size,
                                       channels=channels)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    mc.image_codes = image.size
    mc.image_code_depth = image.model.cfg.depth
    mc.image_code_offset = vocab.ranges()["image"][0]
    # a tag word's token ids as it reads inside a sentence (after a space)
    mc.image_tag_ids = [[vocab.from_text(torch.tensor(toks["text"].encode(" " + w))).tolist()
                         if w else [] for w in words] for words in mc.image_encoder.tags]
    mc.code_dim = int(codebook.shape[1])
    if corpus.has_speech and speech is not None:
        mc.speech_feature_dim = int(corpus.speech[0].shape[-1])
        mc.speech_units = speech.size
    seed_everything(seed)  # the initial weights are a function of the seed
    model = OmniModel(mc, heads)
    model.vocab = vocab
    model.tokenizer_dirs = {k: v for k, v in tokenizer_dirs.items() if v}
    with torch.no_grad():  # data, not initialisation: MRC and code inputs score against it
        model.encoder.embedders["image"].codebook.copy_(
            torch.nn.functional.normalize(codebook, dim=-1))
    if init_from_tokenizers:
        q = speech.quantizer if speech is not None else None
        # proj maps VQ latents (pixels: CM3's codes)
        model.init_from_tokenizers(codebook, vocab, vq_features, getattr(q, "centroids", None),
                                   seed)
    return model


def prepare_shapes(cfg: PretrainConfig, progress: bool) -> None:
    """Create the ShapesWorld shards and tokenizers a config names, where missing, the way
    ``omnimask demo`` does with its default settings (its ``runs/demo`` layout)."""
    from omnimask.config import DemoConfig

    from .data.shapesworld.prepare import generate_splits, split_sizes, train_tokenizers
    from .data.shards import expand_shards

    run = Path(cfg.tokenizers.text).parent.parent
    demo = DemoConfig(out=str(run))
    try:
        have_data = bool(expand_shards(cfg.data.train)) and bool(expand_shards(cfg.data.val))
    except OmnimaskError:
        have_data = False
    if not have_data:
        log.warning("preparing ShapesWorld shards under %s", run / "data")
        generate_splits(run / "data", split_sizes(demo.num_train, demo.num_val, demo.num_test,
                                                  demo.num_test_novel),
                        seed=demo.seed, image_size=demo.image_size, shard_size=demo.shard_size,
                        workers=demo.workers, progress=progress,
                        train_question_rounds=demo.train_question_rounds)
    if not all(Path(p).is_dir() for p in (cfg.tokenizers.text, cfg.tokenizers.image,
                                          cfg.tokenizers.speech or cfg.tokenizers.text)):
        log.warning("preparing tokenizers under %s", run / "tokenizers")
        train_tokenizers(run / "data", run / "tokenizers", speech_units=demo.speech_units,
                         vq_codes=demo.vq_codes,
                         vq_steps=demo.vq_steps,
                         vq_max_minutes=demo.stage_max_minutes, grid=run / "vq_reconstructions.png",
                         progress=progress, vq_precision=demo.precision, vq_crop=demo.vq_crop,
                         vq_depth=demo.vq_depth)
