"""The model: an :class:`Encoder` shared by every task and a ``ModuleDict`` of heads, with one
``forward(batch, task)`` (so DDP/FSDP can wrap the whole model).

Checkpoint keys are ``encoder.*`` and ``heads.<name>.*``: an encoder trained with one set of
heads loads into a model with others (strict on the encoder, the new heads initialised
fresh and listed, as timm's ``pretrained_strict=False`` + ``reset_classifier``).

The encoder: the modality embedders (``modalities/<m>/embedder.py``: projection, LayerNorm
and mask embedding for image features and speech frames, the trainable pixel encoder for
``image_input=pixels``, the speech convolutional position embedding, the VQ codebook for
codes-as-features), the trunk (``fusion/trunk.py``, with the
vocabulary head tied to the token embeddings) and UNITER's pooler (Linear + tanh on each
sample's first token, shared by ITM, ITC and VQA, as in BERT). Token ids (text, VQ codes,
speech units: one shared vocabulary) go through the trunk's embedding; continuous inputs
through their modality's embedder.

A head is an ``nn.Module`` built as ``Head(model_cfg, head_cfg)`` with ``forward(encoder,
batch) -> dict``; heads that need encoder parts (MRFR the image projection, MRC the
codebook) reach them through the ``encoder`` argument, never through stored references,
so every parameter has one key. Pretraining heads live beside their objectives
(``train/objectives/*.py``; their forward returns the objective's loss dict), task heads
in ``heads/`` behind ``omnimask.registry.HEADS``. Named sizes: ``omnimask/variants.py``;
the portable model directory: ``omnimask/pretrained.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from omnimask.config import check_choice, check_fields
from omnimask.errors import ConfigError, OmnimaskError
from omnimask.fusion.packing import PackedBatch
from omnimask.fusion.trunk import Trunk, TrunkConfig
from omnimask.modalities.image.encoder import ImageEncoderConfig

IMAGE_INPUTS = ("pixels", "vq_latents", "patch_encoder")


@dataclass
class ModelConfig:
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    # what the trunk reads of an image: "pixels" (uint8, through ``image_encoder``, trained
    # with the trunk) or frozen feature rows: "vq_latents" (the image tokenizer's) or
    # "patch_encoder" (a timm model's tokens); both feature kinds take the projection
    image_input: str = "vq_latents"
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)  # its dim
    # follows trunk.dim; image_size and grid are set from the corpus in pretraining
    image_feature_dim: int = 32  # set from the corpus
    speech_feature_dim: int = 320  # 80 mel bins x 4 stacked frames
    image_codes: int = 1024  # set from the image tokenizer
    speech_units: int = 500  # set from the speech tokenizer
    itc_dim: int = 128
    itc_temperature: float = 0.07  # initial; learnable, clamped at 1/100
    # BatchNorm (no affine, running statistics in eval) on the pooled states before the ITC
    # projections, as in SimCLR's projection head: a component that every sample's states
    # share does not reach the embeddings. Under DDP each rank normalises with its own batch
    itc_batchnorm: bool = False
    unit_dim: int = 64  # HuBERT final_dim
    unit_temperature: float = 0.1
    speech_conv_kernel: int = 15  # wav2vec2/HuBERT convolutional position embedding; 0: off
    speech_conv_groups: int = 16
    code_dim: int = 32  # VQ code vectors (set from the image tokenizer)
    # how VQ code ids (CM3 documents, generation) enter the trunk: "embedding" = a token
    # embedding row; "features" = their code vector through the image input projection +
    # LayerNorm, the path the VQ latents take in the other objectives (one image input)
    image_code_input: str = "embedding"
    image_code_offset: int = -1  # first image-code id in the shared vocabulary (set from it)
    # code ids per image position (an rq tokenizer's levels, set from it): level k's codes
    # are the image_codes / depth vocabulary rows from k * image_codes / depth; a position's
    # stack enters as the sum of its rows' token embeddings (``Encoder.forward(stack=)``)
    image_code_depth: int = 1
    # the token ids of each word of image_encoder.tags (set from the text tokenizer): a
    # tag's vector is the mean of its tokens' embeddings
    image_tag_ids: list[list[list[int]]] = field(default_factory=list)
    # width of a shape-blind colour path beside the pixel encoder (0: none): per-pixel
    # features (1x1 convolutions) max-pooled over each token's patch, projected (from zero)
    # and added to its token. Colour then reaches the trunk without the encoder's shape
    # features, which can stay colour-blind (finetune image_encoder_from)
    image_color_path: int = 0
    mrc_temperature: float = 0.1  # MRC logits: cos(predicted latent, codes) / t

    def __post_init__(self) -> None:
        p = "model."
        check_fields(self, ">=1", "image_feature_dim", "speech_feature_dim", "image_codes",
                     "speech_units", "itc_dim", "unit_dim", "speech_conv_groups", "code_dim",
                     "image_code_depth", prefix=p)
        if self.image_codes % self.image_code_depth:
            raise ValueError(f"{p}image_codes ({self.image_codes}) must be a multiple of "
                             f"{p}image_code_depth ({self.image_code_depth})")
        check_fields(self, ">0", "itc_temperature", "unit_temperature", "mrc_temperature",
                     prefix=p)
        check_fields(self, ">=0", "speech_conv_kernel", "image_color_path", prefix=p)
        check_choice(self, "image_input", IMAGE_INPUTS, prefix=p)
        if self.image_encoder.dim != self.trunk.dim:  # the encoder's tokens are trunk inputs
            self.image_encoder = replace(self.image_encoder, dim=self.trunk.dim)
        shape = [len(w) for w in self.image_encoder.tags]
        if self.image_tag_ids and [len(w) for w in self.image_tag_ids] != shape:
            raise ValueError(f"{p}image_tag_ids must give token ids for each word of "
                             f"{p}image_encoder.tags ({shape} words), got "
                             f"{[len(w) for w in self.image_tag_ids]}")
        check_choice(self, "image_code_input", ("features", "embedding"), prefix=p)
        k, g = self.speech_conv_kernel, self.speech_conv_groups
        if k and k % 2 == 0:
            raise ValueError(f"{p}speech_conv_kernel must be odd (or 0: off), got {k}")
        if k and self.trunk.dim % g:  # a grouped convolution over the trunk's channels
            raise ValueError(f"{p}speech_conv_groups must divide {p}trunk.dim, got "
                             f"{g} and {self.trunk.dim}")


def _isometry(n_in: int, n_out: int, g: torch.Generator) -> torch.Tensor:
    """[n_in, n_out] random map that keeps inner products when n_out >= n_in (orthonormal
    rows), else a random orthogonal projection."""
    q, _ = torch.linalg.qr(torch.randn(max(n_in, n_out), min(n_in, n_out), generator=g))
    return q.T if n_out >= n_in else q


def mlp_ln(dim: int, eps: float = 1e-12) -> nn.Sequential:
    """Linear-GELU-LayerNorm, UNITER's region-head transform (weights N(0, 0.02))."""
    seq = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=eps))
    init_linear(seq[0])
    return seq


def init_linear(*layers: nn.Linear) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases."""
    for m in layers:
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """Modality embedders + trunk + pooler: ``encoder(batch) -> hidden [T, dim]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from omnimask.modalities.image.embedder import ImageEmbedder
        from omnimask.modalities.speech.embedder import SpeechEmbedder

        if cfg.image_code_input == "features" and cfg.image_feature_dim != cfg.code_dim:
            raise ValueError("model.image_code_input=features needs image features that are "
                             f"VQ latents (dim {cfg.code_dim}), got dim {cfg.image_feature_dim}")
        self.cfg = cfg
        d = cfg.trunk.dim
        self.trunk = Trunk(cfg.trunk)
        self.embedders = nn.ModuleDict({
            "image": ImageEmbedder(cfg.image_feature_dim, d, cfg.image_codes, cfg.code_dim,
                                   encoder=replace(cfg.image_encoder, dim=d) if self.pixels
                                   else None, color_path=cfg.image_color_path),
            "speech": SpeechEmbedder(cfg.speech_feature_dim, d, cfg.speech_conv_kernel,
                                     cfg.speech_conv_groups)})
        self.pooler = nn.Linear(d, d)
        init_linear(self.pooler)

    @property
    def device(self) -> torch.device:
        return self.pooler.weight.device

    @property
    def pixels(self) -> bool:
        """Images enter as uint8 pixels through the trainable image encoder."""
        return self.cfg.image_input == "pixels"

    # -- inputs ------------------------------------------------------------------------------
    def input_features(self, batch: PackedBatch, masked: dict[str, torch.Tensor] | None = None,
                       maps: list | None = None) -> torch.Tensor | None:
        """[T, dim] embedded continuous inputs at feature positions (zeros elsewhere);
        ``maps`` receives the pixel encoder's feature maps of the batch's images."""
        if not batch.features and not batch.pixels:
            return None
        masked = masked or {}
        dev = batch.ids.device
        out = torch.zeros(batch.num_tokens, self.cfg.trunk.dim, device=dev,
                          dtype=self.pooler.weight.dtype)
        for m, px in batch.pixels.items():
            if m != "image" or not self.pixels:
                raise OmnimaskError(f"{m} given as pixels, but this model reads pixels only "
                                    f"for images with model.image_input=pixels (it has "
                                    f"{self.cfg.image_input!r})")
            index = batch.feature_index[m].to(dev)
            h = self.embedders[m].embed_pixels(px.to(dev), masked.get(m), maps,
                                               self.tag_words())
            if h.shape[0] != index.shape[0]:
                raise OmnimaskError(f"{px.shape[0]} images give {h.shape[0]} tokens, their "
                                    f"segments have {index.shape[0]} positions: the segment "
                                    f"grid must be model.image_encoder.grid "
                                    f"({self.cfg.image_encoder.grid})")
            out = out.index_copy(0, index, h.to(out.dtype))
        for m, feats in batch.features.items():
            if m not in self.embedders:
                raise ValueError(f"no embedder for {m} features; known: "
                                 f"{', '.join(self.embedders)}")
            if m == "image" and self.pixels:
                raise OmnimaskError("image features given to a model that reads pixels "
                                    "(model.image_input=pixels); give image segments pixels")
            index = batch.feature_index[m].to(dev)
            if m == "speech":  # one id per (sample, segment): the convolution's runs
                runs = batch.sample_index().to(dev)[index] * 4096 + batch.segment.to(dev)[index]
                h = self.embedders[m](feats.to(dev), runs, masked.get(m))
            else:
                h = self.embedders[m](feats.to(dev), masked.get(m))
            out = out.index_copy(0, index, h.to(out.dtype))
        return out

    def forward(self, batch: PackedBatch, mask: str = "bidirectional", prefix_len=None,
                masked: dict[str, torch.Tensor] | None = None, cache=None,
                maps: list | None = None, outputs: torch.Tensor | None = None,
                stack: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, dim] (the batch moves to the encoder's device when elsewhere).
        ``masked``: modality -> [n_m] bool, feature rows replaced by the mask embedding;
        ``cache``: a ``fusion.trunk.KVCache`` to fill (incremental decoding: ``trunk.step``);
        ``maps``: a list that receives the pixel encoder's feature maps (finest first,
        [images, C, H, W] each: the dense features a segmentation head decodes);
        ``outputs``: packed positions [P] -> only their hidden states [P, dim] (the trunk's
        last layer then computes only those rows); ``stack``: [T, depth] vocabulary ids, a
        code id stack per position (-1 rows: none), which enters as its rows' summed token
        embeddings in place of the position's id."""
        if batch.ids.device != self.device:
            batch = batch.to(self.device)
        feats = self.input_features(batch, masked, maps)
        if stack is not None:
            batch, feats = self._stack_features(batch, feats, stack.to(self.device))
        if self.codes_as_features:
            batch, feats = self._code_features(batch, feats)
        return self.trunk(batch, mask, prefix_len, features=feats, cache=cache,
                          outputs=None if outputs is None else outputs.to(self.device))

    def step(self, batch: PackedBatch, cache) -> torch.Tensor:
        """Incremental decoding: hidden states [B, dim] of one new token per sequence of a
        filled ``KVCache`` (``forward(..., cache=)`` first), read as ``forward`` reads it."""
        if batch.ids.device != self.device:
            batch = batch.to(self.device)
        feats = self.input_features(batch)
        if self.codes_as_features:
            batch, feats = self._code_features(batch, feats)
        return self.trunk.step_packed(batch, cache, feats)

    def tag_words(self) -> list[torch.Tensor]:
        """Per region-tag classifier of the image encoder, its classes' word vectors
        [classes, dim]: the mean of each word's token embeddings scaled to the norm of a
        LayerNorm output (sqrt(dim)), so a tag weighs as much as the token it joins; zeros
        for a class without a word. Trained with the token embeddings."""
        if not self.cfg.image_tag_ids:
            return []
        emb, d = self.trunk.tok.weight, self.cfg.trunk.dim
        out = []
        for words in self.cfg.image_tag_ids:
            rows = [emb[torch.tensor(ids, device=emb.device)].mean(0) if ids
                    else emb.new_zeros(d) for ids in words]
            out.append(F.normalize(torch.stack(rows), dim=-1) * math.sqrt(d))
        return out

    @property
    def codes_as_features(self) -> bool:
        return self.cfg.image_code_input == "features" and self.cfg.image_code_offset >= 0

    def _code_features(self, batch: PackedBatch, feats: torch.Tensor | None):
        """VQ code ids -> their code vectors through the image embedder (marked as feature
        positions, id -1), so that documents of codes and images given as latents reach the
        trunk the same way."""
        lo = self.cfg.image_code_offset
        is_code = (batch.ids >= lo) & (batch.ids < lo + self.cfg.image_codes)
        if not bool(is_code.any()):
            return batch, feats
        pos = is_code.nonzero(as_tuple=True)[0]
        e = self.embedders["image"].embed_codes(batch.ids[pos] - lo)
        if feats is None:
            feats = torch.zeros(batch.num_tokens, self.cfg.trunk.dim, device=e.device,
                                dtype=e.dtype)
        feats = feats.index_copy(0, pos, e.to(feats.dtype))
        return replace(batch, ids=batch.ids.masked_fill(is_code, -1)), feats

    def _stack_features(self, batch: PackedBatch, feats: torch.Tensor | None,
                        stack: torch.Tensor):
        """Positions with an id stack -> the sum of its token embeddings (feature rows)."""
        on = stack[:, 0] >= 0
        pos = on.nonzero(as_tuple=True)[0]
        e = self.trunk.tok(stack[pos]).sum(1)
        if feats is None:
            feats = torch.zeros(batch.num_tokens, self.cfg.trunk.dim, device=e.device,
                                dtype=e.dtype)
        feats = feats.index_copy(0, pos, e.to(feats.dtype))
        return replace(batch, ids=batch.ids.masked_fill(on, -1)), feats

    # -- outputs -----------------------------------------------------------------------------
    def pooled(self, hidden: torch.Tensor, batch: PackedBatch,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """UNITER pooler on each sample's first position ([B, dim]), or on ``positions``."""
        if positions is None:
            positions = batch.cu_seqlens[:-1]
        return torch.tanh(self.pooler(hidden[positions.long().to(hidden.device)]))

    def vocab_logits(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits over the shared vocabulary at ``positions`` (the trunk's tied head)."""
        return self.trunk.mlm_logits(hidden, positions)

    @torch.no_grad()
    def init_from_tokenizers(self, codebook: torch.Tensor, vocab, features_are_latents: bool,
                             g: torch.Generator) -> None:
        """The VQ codebook (normalised); image-code embeddings = the code vectors through one
        random isometry, scaled to the embedding init; the image projection through the same
        isometry when the features are the VQ latents."""
        d = self.cfg.trunk.dim
        q = _isometry(codebook.shape[1], d, g).T  # [d, code_dim]
        image = self.embedders["image"]
        image.codebook.copy_(F.normalize(codebook, dim=-1))
        lo, hi = vocab.ranges()["image"]
        self.trunk.tok.weight[lo:hi] = image.codebook @ q.T * (0.02 * math.sqrt(d))
        if features_are_latents:
            image.proj.weight.copy_(q)


def head_class(name: str) -> type[nn.Module]:
    """The head called ``name``: a task head (``HEADS``) or a pretraining objective's."""
    from omnimask.registry import HEADS
    from omnimask.train.objectives.base import OBJECTIVES

    if name in HEADS:
        return HEADS.get(name)
    if name in OBJECTIVES:
        return OBJECTIVES.get(name).head
    raise OmnimaskError(f"unknown head {name!r}; task heads: {', '.join(HEADS.names())}; "
                        f"pretraining heads: {', '.join(OBJECTIVES.names())}")


def head_config(cls: type[nn.Module], name: str, given: Any) -> Any:
    """``given`` (None, a dict or the head's own config dataclass) as the head's config."""
    schema = getattr(cls, "Config", None)
    if schema is None:
        if given:
            raise OmnimaskError(f"head {name!r} takes no settings, got {given!r}")
        return None
    if isinstance(given, schema):
        return given
    from omnimask.config import load_config

    if given is not None and not isinstance(given, Mapping):
        raise OmnimaskError(f"head {name!r}: settings must be a mapping, got {given!r}")
    try:
        return load_config(schema, None, **dict(given or {}))
    except ConfigError as e:
        raise ConfigError(f"head {name!r}: {e}") from None


def head_specs(heads: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    if heads is None:
        return {}
    if isinstance(heads, str):
        return {heads: None}
    return dict(heads) if isinstance(heads, Mapping) else {h: None for h in heads}


class OmniModel(nn.Module, PyTorchModelHubMixin, library_name="omnimask",
                tags=["omnimask", "multimodal"],
                repo_url="https://github.com/omnimask/omnimask"):
    """``encoder`` + ``heads``; ``model(batch, task)`` runs ``heads[task](encoder, batch)``.

    Not modules: ``vocab`` (the shared vocabulary, when known), ``tokenizers`` (loaded with
    a model directory) and ``tokenizer_dirs`` (what ``save_pretrained`` copies).
    huggingface_hub's ``PyTorchModelHubMixin`` adds ``push_to_hub`` and a model card; the
    directory it writes and reads is omnimask's own (``omnimask/pretrained.py``)."""

    def __init__(self, cfg: ModelConfig,
                 heads: Mapping[str, Any] | Iterable[str] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.heads = nn.ModuleDict()
        self.head_configs: dict[str, Any] = {}
        for name, given in head_specs(heads).items():
            self.add_head(name, given)
        self.vocab = None
        self.tokenizers: dict | None = None
        self.tokenizer_dirs: dict[str, str] = {}

    def add_head(self, name: str, config: Any = None) -> nn.Module:
        """A freshly initialised head ``name`` (replacing one of that name: timm's
        ``reset_classifier``); ``config`` is a dict or the head's config dataclass."""
        cls = head_class(name)
        cfg = head_config(cls, name, config)
        self.heads[name] = cls(self.cfg, cfg)
        self.head_configs[name] = cfg
        return self.heads[name]

    def layer_depths(self) -> tuple[dict[str, int], int]:
        """Each parameter's depth (``trainer.layer_decay``): the trunk's own
        (``Trunk.layer_depths``), the modality embedders 0, the pooler and heads the top."""
        trunk, top = self.encoder.trunk.layer_depths()
        depths = {}
        for name, _ in self.named_parameters():
            if name.startswith("encoder.trunk."):
                depths[name] = trunk[name.removeprefix("encoder.trunk.")]
            else:
                depths[name] = 0 if name.startswith("encoder.embedders.") else top
        return depths, top

    def head_settings(self) -> dict[str, dict]:
        """Each head's config as plain data (for ``config.json``)."""
        return {n: (dataclasses.asdict(c) if c is not None else {})
                for n, c in self.head_configs.items()}

    def forward(self, batch: Any, task: str) -> dict:
        if task not in self.heads:
            raise OmnimaskError(f"the model has no head {task!r}; its heads: "
                                f"{', '.join(self.heads) or 'none'}")
        return self.heads[task](self.encoder, batch)

    @torch.no_grad()
    def init_from_tokenizers(self, codebook: torch.Tensor, vocab, features_are_latents: bool,
                             unit_centroids: torch.Tensor | None = None, seed: int = 0) -> None:
        """Start from what the tokenizers know: the VQ codebook (``Encoder.
        init_from_tokenizers``) and the k-means speech centroids (the unit head's
        embeddings, through a random isometry). Similar codes then start with similar
        embeddings and logits."""
        g = torch.Generator().manual_seed(seed)
        self.encoder.init_from_tokenizers(codebook, vocab, features_are_latents, g)
        if unit_centroids is not None and "speech" in self.heads:
            c = F.normalize(unit_centroids.float(), dim=-1)
            head = self.heads["speech"]
            head.embed.copy_(c @ _isometry(c.shape[1], head.embed.shape[1], g))

    # -- inference (omnimask/inference.py) ---------------------------------------------------
    def answer(self, image, question, **kw):
        """VQA: ``{"answer", "score"}`` for an image (path, PIL, array, tensor) and a
        question; lists give lists (see ``omnimask.inference.answer``)."""
        from omnimask.inference import answer

        return answer(self, image, question, **kw)

    def caption(self, image, **kw):
        """Captioning: the caption of an image (``beams=``, ``max_len=``, ``prior_weight=``);
        lists give lists."""
        from omnimask.inference import caption

        return caption(self, image, **kw)

    def retrieve(self, query, gallery, k: int = 5, **kw):
        """Retrieval: ``{"indices", "scores"}`` of the ``k`` gallery images that best match a
        caption or a spoken caption (audio path or (wave, rate))."""
        from omnimask.inference import retrieve

        return retrieve(self, query, gallery, k, **kw)

    def segment(self, image, text: str | None = None, point=None, box=None, **kw):
        """Segmentation: per-pixel class ids of an image, or with a prompt (``text``, a
        ``point`` (x, y) or a ``box`` (x0, y0, x1, y1), in pixels) ``{"mask", "score"}``
        (see ``omnimask.inference.segment``)."""
        from omnimask.inference import segment

        return segment(self, image, text=text, point=point, box=box, **kw)

    # -- the model directory (omnimask/pretrained.py) ----------------------------------------
    def save_pretrained(self, directory: str | Path,
                        tokenizers: Mapping[str, str | Path] | None = None,
                        **hub: Any) -> Path:
        """Write a model directory that alone rebuilds this model (``omnimask.load``):
        weights, config, vocabulary, ``tokenizers`` (kind -> tokenizer directory; default:
        the ones this model was loaded with) copied in, and a model card (README.md).
        ``push_to_hub=True, repo_id=...`` uploads it too (huggingface_hub)."""
        from omnimask.pretrained import check_target

        d = check_target(directory)
        self._save_tokenizers = tokenizers
        try:
            PyTorchModelHubMixin.save_pretrained(self, d, **hub)
        finally:
            del self._save_tokenizers
        return d

    def _save_pretrained(self, save_directory: Path) -> None:  # the mixin's hook
        from omnimask.pretrained import save_pretrained

        save_pretrained(self, save_directory, getattr(self, "_save_tokenizers", None),
                        checked=True)

    @classmethod
    def from_pretrained(cls, source: str | Path, **kw: Any) -> OmniModel:
        """A model directory, a zoo name (``omnimask zoo list``), ``hf://org/repo`` or a
        Hub repository id: ``omnimask.load`` for the first three, the Hub for the last."""
        from omnimask.pretrained import load

        s = str(source)
        if s.startswith("hf://") or Path(s).is_dir():
            return load(s, heads=kw.get("heads"))
        from omnimask import zoo

        if s in zoo.entries():
            return load(s, heads=kw.get("heads"))
        return super().from_pretrained(s, **kw)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None,
                         cache_dir: str | Path | None = None, force_download: bool = False,
                         local_files_only: bool = False, token: str | bool | None = None,
                         **model_kwargs: Any) -> OmniModel:  # the mixin's hook, Hub ids
        from huggingface_hub import snapshot_download

        from omnimask.pretrained import load
        from omnimask.zoo.fetch import offline

        d = model_id if Path(model_id).is_dir() else snapshot_download(
            repo_id=model_id, revision=revision, cache_dir=cache_dir,
            force_download=force_download, local_files_only=local_files_only or offline(),
            token=token)
        return load(d, heads=model_kwargs.get("heads"))

    def load_encoder(self, source: str | Path) -> list[str]:
        """Load the encoder of a model directory, strictly (a missing, unexpected or
        differently shaped ``encoder.*`` key raises); returns the head keys left as they
        were (initialised fresh), and logs them."""
        from omnimask.pretrained import load_encoder

        return load_encoder(self, source)
