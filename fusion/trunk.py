"""The shared transformer trunk over packed multimodal sequences.

Options: pre-LN or post-LN (BERT), LayerNorm or RMSNorm, GELU or SwiGLU, QK-norm,
clipped softmax (Bondarenko et al. 2023: ``clip((zeta - gamma) * softmax + gamma, 0, 1)``;
gamma=0, zeta=1 is the softmax), gated attention (each head's output times
``sigmoid(G(x))``, bias initialised to logit(pi)), multiway FFN experts per modality
(BEiT-3: shared attention, one FFN per modality), learned modality embeddings,
activation checkpointing. Output heads gather the target positions before projecting.
Incremental decoding: ``Trunk.forward(..., cache=KVCache())`` keeps each layer's keys and
values of a batch of equal-length samples (the prefix), then ``Trunk.step`` feeds one new
token per sequence, attending to everything before it (prefix-LM/causal decoding).
``Trunk.from_hf_bert`` loads a transformers ``BertModel``/``BertForMaskedLM``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnimask.config import check_choice, check_fields
from omnimask.errors import ConfigError
from omnimask.modalities.vocab import MODALITIES

from .attention import Layout, attention, block_ids, math_attention
from .packing import PackedBatch

log = logging.getLogger("omnimask.trunk")


@dataclass
class TrunkConfig:
    vocab_size: int = 8192
    dim: int = 256
    layers: int = 4
    heads: int = 4
    ffn_dim: int = 1024
    max_positions: int = 512
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-12
    prenorm: bool = True  # False: post-LN (BERT)
    activation: str = "gelu"  # gelu | swiglu
    qk_norm: bool = False
    clip_gamma: float = 0.0  # clipped softmax; (0, 1) is the plain softmax
    clip_zeta: float = 1.0
    gated_attention: bool = False
    gate_init_prob: float = 0.25
    multiway: bool = False  # one FFN per modality
    modality_embeddings: bool = True
    grid_positions: bool = True  # learned row + column embeddings on 2-D grids (images)
    # 2-D rotary queries/keys on grids: image-to-image attention sees only (row, col)
    # offsets, so what is learned at one place of an image holds at every other
    rope_2d: bool = False
    rope_base: float = 100.0
    max_grid: int = 64
    token_type_embedding: bool = False  # BERT's token type embeddings, for imported models
    type_vocab_size: int = 1  # token types 0..n-1 (BERT: 2, sentence A/B)
    embed_norm: bool = False  # LayerNorm after the embeddings (BERT)
    dropout: float = 0.0
    attention_backend: str = "auto"
    checkpointing: bool = False

    def __post_init__(self) -> None:
        p = "model.trunk."  # where it sits in a pretraining config
        check_fields(self, ">=1", "vocab_size", "dim", "layers", "heads", "ffn_dim",
                     "max_positions", "max_grid", "type_vocab_size", prefix=p)
        check_fields(self, ">0", "norm_eps", "rope_base", prefix=p)
        check_fields(self, "[0,1)", "dropout", prefix=p)
        check_fields(self, "(0,1)", "gate_init_prob", prefix=p)
        if self.dim % self.heads:
            raise ValueError(f"{p}dim must be divisible by {p}heads, got {self.dim} and "
                             f"{self.heads}")
        if self.rope_2d and (self.dim // self.heads) % 4:
            raise ValueError(f"{p}rope_2d needs a head size ({p}dim / {p}heads) divisible by "
                             f"4, got {self.dim // self.heads}")
        if self.clip_zeta <= self.clip_gamma:
            raise ValueError(f"{p}clip_zeta must be > {p}clip_gamma, got {self.clip_zeta} "
                             f"and {self.clip_gamma}")
        check_choice(self, "norm", ("layernorm", "rmsnorm"), prefix=p)
        check_choice(self, "activation", ("gelu", "swiglu"), prefix=p)
        from .attention import BACKENDS

        check_choice(self, "attention_backend", BACKENDS, prefix=p)

    @property
    def plain_softmax(self) -> bool:
        return self.clip_gamma == 0.0 and self.clip_zeta == 1.0


def block_positions(cu: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Position of each packed position under mask='blocks': how many earlier positions of
    its sample it may attend to (the context's, then its own block's), i.e. its index in
    [context + its block] alone."""
    T = blocks.numel()
    lens = (cu[1:] - cu[:-1]).long()
    sample = torch.repeat_interleave(torch.arange(lens.numel(), device=blocks.device), lens)
    key = sample * (int(blocks.max()) + 1 if T else 1) + blocks  # one group per (sample, block)
    order = torch.sort(key, stable=True).indices
    k = key[order]
    first = torch.ones_like(k, dtype=torch.bool)
    first[1:] = k[1:] != k[:-1]
    start = torch.cummax(torch.where(first, torch.arange(T, device=k.device), 0), 0).values
    rank = torch.empty_like(blocks)
    rank[order] = torch.arange(T, device=k.device) - start  # index within its group
    ctx = torch.cumsum((blocks == 0).long(), 0) - (blocks == 0).long()  # context before, packed
    ctx = ctx - ctx[cu[:-1].long()].repeat_interleave(lens) if T else ctx  # ...in its sample
    return torch.where(blocks == 0, rank, rank + ctx)


def _token_types_2d(state_dict, prefix, *args) -> None:
    """Trunks saved before token types had one type-0 vector [dim]: load it as [1, dim]."""
    v = state_dict.get(prefix + "token_type")
    if v is not None and v.ndim == 1:
        state_dict[prefix + "token_type"] = v[None]


def rope_2d_angles(rc: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Rotation angles [T, head_dim / 2] of 2-D rotary embeddings: the first half of the
    pairs turn with the row, the second with the column (frequencies base^(-i/n)); tokens
    off the grid (rc -1) are not turned."""
    n = head_dim // 4
    inv = base ** (-torch.arange(n, device=rc.device, dtype=torch.float32) / n)
    on = (rc[:, :1] >= 0).float()
    rc = rc.clamp_min(0).float()
    return torch.cat([rc[:, :1] * inv, rc[:, 1:] * inv], -1) * on


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """[T, H, D] turned pairwise: (x[i], x[i + D/2]) by ``angles`` [T, D/2]."""
    a, b = x.chunk(2, dim=-1)
    c, s = angles.cos()[:, None].to(x.dtype), angles.sin()[:, None].to(x.dtype)
    return torch.cat([a * c - b * s, a * s + b * c], -1)


def _norm(cfg: TrunkConfig, dim: int) -> nn.Module:
    return (nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.norm == "layernorm"
            else nn.RMSNorm(dim, eps=cfg.norm_eps))


def clipped_softmax(scores: torch.Tensor, mask: torch.Tensor, gamma: float, zeta: float):
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.clamp((zeta - gamma) * p + gamma, 0.0, 1.0).masked_fill(~mask, 0.0)


class KVCache:
    """Each layer's keys and values ``[B, heads, L, head_dim]`` of B sequences of one length
    L (beams, a batch of images): filled by ``Trunk.forward(..., cache=)``, grown by
    ``Trunk.step``; ``reorder(idx)`` picks/repeats sequences (beam search)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def add(self, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> None:
        """One layer's packed keys/values [T, H, D] of equal-length samples."""
        B = cu.numel() - 1
        if k.shape[0] % max(B, 1) or not bool((cu[1:] - cu[:-1] == k.shape[0] // B).all()):
            raise ValueError("a KV cache needs samples of one length (pad or group them); "
                             f"got lengths {(cu[1:] - cu[:-1]).tolist()}")
        self.keys.append(k.view(B, -1, *k.shape[1:]).transpose(1, 2))
        self.values.append(v.view(B, -1, *v.shape[1:]).transpose(1, 2))

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append one position's [B, H, D] keys/values to ``layer``; returns the layer's."""
        self.keys[layer] = torch.cat([self.keys[layer], k[:, :, None]], 2)
        self.values[layer] = torch.cat([self.values[layer], v[:, :, None]], 2)
        return self.keys[layer], self.values[layer]

    def reorder(self, idx: torch.Tensor) -> KVCache:
        """Keep sequence ``idx[i]`` as sequence i (in place; returns self)."""
        idx = torch.as_tensor(idx, device=self.keys[0].device if self.keys else None).long()
        self.keys = [k.index_select(0, idx) for k in self.keys]
        self.values = [v.index_select(0, idx) for v in self.values]
        return self


class Attention(nn.Module):
    def __init__(self, cfg: TrunkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = _norm(cfg, self.head_dim), _norm(cfg, self.head_dim)
        if cfg.gated_attention:
            self.gate = nn.Linear(cfg.dim, cfg.heads)
            self.init_gate()

    def init_gate(self) -> None:
        """Zero weights, bias logit(pi): every head starts open by pi."""
        if self.cfg.gated_attention:
            nn.init.zeros_(self.gate.weight)
            p = self.cfg.gate_init_prob
            nn.init.constant_(self.gate.bias, math.log(p / (1 - p)))

    def _qkv(self, x, rows=None, rope=None):
        """q, k, v [T, H, D]; with ``rows``, q only at those positions (its share of the
        fused projection is skipped elsewhere); ``rope``: 2-D rotary angles [T, D / 2]."""
        H, D = self.cfg.heads, self.head_dim
        if rows is None:
            q, k, v = self.qkv(x).view(x.shape[0], 3, H, D).unbind(1)
        else:
            w, b, n = self.qkv.weight, self.qkv.bias, self.cfg.dim
            q = F.linear(x[rows], w[:n], b[:n]).view(-1, H, D)
            k, v = F.linear(x, w[n:], b[n:]).view(x.shape[0], 2, H, D).unbind(1)
        if self.cfg.qk_norm:
            # CUDA autocast runs norms in fp32: back to v's dtype (fused kernels and flex's
            # backward need one dtype)
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if rope is not None:
            q, k = rotate(q, rope if rows is None else rope[rows]), rotate(k, rope)
        return q, k, v

    def forward(self, x, cu, max_seqlen, mask, prefix_len, cache: KVCache | None = None,
                layout: Layout | None = None, rows: torch.Tensor | None = None, rope=None):
        """[T, dim] -> [T, dim], or [P, dim] at the sorted positions ``rows`` (their queries
        over every key)."""
        q, k, v = self._qkv(x, rows, rope)
        if cache is not None:
            cache.add(k, v, cu)
        lay = layout or Layout(cu, mask, prefix_len)
        if self.cfg.plain_softmax:
            o = attention(q, k, v, cu, max_seqlen, mask, prefix_len, self.cfg.attention_backend,
                          layout=lay, rows=rows)
        else:
            c = self.cfg
            o = math_attention(q, k, v, cu, mask, prefix_len, probs=lambda s, m: clipped_softmax(
                s, m, c.clip_gamma, c.clip_zeta), layout=lay, rows=rows)
        if self.cfg.gated_attention:
            o = o * torch.sigmoid(self.gate(x if rows is None else x[rows]))[..., None]
        return self.out(o.reshape(o.shape[0], -1))

    def step(self, x, cache: KVCache, layer: int, rope=None):
        """One new position per cached sequence ([B, dim]): attends to all it follows."""
        q, k, v = self._qkv(x, rope=rope)
        k, v = cache.extend(layer, k, v)  # [B, H, L + 1, D]
        s = (q[:, :, None] @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, H, 1, L+1]
        if self.cfg.plain_softmax:
            p = s.softmax(-1)
        else:
            p = clipped_softmax(s, torch.ones_like(s, dtype=torch.bool), self.cfg.clip_gamma,
                                self.cfg.clip_zeta)
        o = (p @ v)[:, :, 0]  # [B, H, D]
        if self.cfg.gated_attention:
            o = o * torch.sigmoid(self.gate(x))[..., None]
        return self.out(o.reshape(x.shape[0], -1))


class FFN(nn.Module):
    def __init__(self, cfg: TrunkConfig) -> None:
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim * (2 if self.swiglu else 1))
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x):
        h = self.up(x)
        if self.swiglu:
            a, b = h.chunk(2, dim=-1)
            return self.down(F.silu(a) * b)
        return self.down(F.gelu(h))


class Block(nn.Module):
    def __init__(self, cfg: TrunkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg)
        self.ffn = nn.ModuleList([FFN(cfg) for _ in (MODALITIES if cfg.multiway else [0])])
        self.norm1, self.norm2 = _norm(cfg, cfg.dim), _norm(cfg, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def _ffn(self, x, modality):
        if len(self.ffn) == 1:
            return self.ffn[0](x)
        out = torch.empty_like(x)
        for m, ffn in enumerate(self.ffn):  # each token through its modality's expert
            sel = (modality == m).nonzero(as_tuple=True)[0]
            if sel.numel():
                out[sel] = ffn(x[sel]).to(out.dtype)  # autocast: bf16 expert, fp32 x
        return out

    def forward(self, x, modality, cu, max_seqlen, mask, prefix_len, cache=None, layout=None,
                rows=None, rope=None):
        """[T, dim] -> [T, dim], or [P, dim] at the sorted positions ``rows`` only."""
        def attn(y):
            return self.attn(y, cu, max_seqlen, mask, prefix_len, cache, layout, rows, rope)
        return self._residual(x, modality, attn, rows)

    def step(self, x, modality, cache: KVCache, layer: int, rope=None):
        return self._residual(x, modality, lambda y: self.attn.step(y, cache, layer, rope))

    def _residual(self, x, modality, attn, rows=None):
        keep, mod = (x, modality) if rows is None else (x[rows], modality[rows])
        if self.cfg.prenorm:
            x = keep + self.drop(attn(self.norm1(x)))
            return x + self.drop(self._ffn(self.norm2(x), mod))
        x = self.norm1(keep + self.drop(attn(x)))
        return self.norm2(x + self.drop(self._ffn(x, mod)))


class MLMHead(nn.Module):
    """Dense-GELU-norm, then a projection tied to the word embeddings (+ own bias)."""

    def __init__(self, cfg: TrunkConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.norm = _norm(cfg, cfg.dim)
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h):
        return F.linear(self.norm(F.gelu(self.dense(h))), self.embedding.weight, self.bias)


class Trunk(nn.Module):
    def __init__(self, cfg: TrunkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_positions, cfg.dim)
        if cfg.token_type_embedding:  # [types, dim]; a 1-D [dim] (type 0 only) loads too
            self.token_type = nn.Parameter(torch.zeros(cfg.type_vocab_size, cfg.dim))
            self._register_load_state_dict_pre_hook(_token_types_2d)
        if cfg.modality_embeddings:
            self.modality = nn.Embedding(len(MODALITIES), cfg.dim)
            nn.init.zeros_(self.modality.weight)
        if cfg.grid_positions:
            self.row = nn.Embedding(cfg.max_grid, cfg.dim)
            self.col = nn.Embedding(cfg.max_grid, cfg.dim)
        self.embed_norm = _norm(cfg, cfg.dim) if cfg.embed_norm else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.final_norm = _norm(cfg, cfg.dim) if cfg.prenorm else None
        self.mlm = MLMHead(cfg, self.tok)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init)
        if cfg.modality_embeddings:
            nn.init.zeros_(self.modality.weight)
        for blk in self.blocks:
            blk.attn.init_gate()

    def layer_depths(self) -> tuple[dict[str, int], int]:
        """Each parameter's depth, for layer-wise lr decay: the embeddings 0, block i i + 1,
        what reads the last block (final norm, MLM head) layers + 1; and that top depth."""
        top = len(self.blocks) + 1
        depths = {}
        for name, _ in self.named_parameters():
            first = name.split(".")[0]
            depths[name] = (int(name.split(".")[1]) + 1 if first == "blocks"
                            else top if first in ("final_norm", "mlm") else 0)
        return depths, top

    def compile_blocks(self) -> Trunk:
        """``torch.compile`` each block in place (dynamic shapes; parameter names and
        checkpoints unchanged): norms, projections, residuals and the FFN fuse into
        compiled kernels, attention stays eager (its lengths and masks are data)."""
        for blk in self.blocks:
            blk.compile(dynamic=True)
        return self

    @staticmethod
    def _init(m: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, batch: PackedBatch, features: torch.Tensor | None = None,
              blocks: torch.Tensor | None = None, pos_offset: int = 0) -> torch.Tensor:
        """Token embeddings; positions are indices within each sample (plus ``pos_offset``:
        the tokens follow that many cached ones). ``features``: [T, dim] already-projected
        continuous inputs, used where ``batch.ids == -1``. ``blocks`` (mask='blocks' block
        ids): positions count only what each position sees."""
        cu = batch.cu_seqlens.to(batch.ids.device)
        starts = torch.repeat_interleave(cu[:-1].long(), (cu[1:] - cu[:-1]).long())
        pos = torch.arange(batch.num_tokens, device=batch.ids.device) - starts + pos_offset
        if blocks is not None:
            pos = block_positions(cu, blocks.to(pos.device))
        self._check_positions(int(pos.max()) + 1)
        is_feat = batch.ids < 0
        x = self.tok(batch.ids.clamp_min(0))
        if is_feat.any():
            if features is None:
                raise ValueError("the batch holds feature positions but no features were given")
            x = torch.where(is_feat[:, None], features, x)
        x = self._add_position(x, pos, batch.modality, self._token_types(batch))
        if self.cfg.grid_positions:
            rc = batch.position_2d.to(x.device)
            on = rc[:, 0] >= 0
            if on.any():
                if int(rc.max()) >= self.cfg.max_grid:
                    raise ValueError(f"an image grid is larger than max_grid={self.cfg.max_grid}")
                rc = rc.clamp_min(0)
                x = x + (self.row(rc[:, 0]) + self.col(rc[:, 1])) * on[:, None]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.drop(x)

    def _check_positions(self, longest: int) -> None:
        if longest > self.cfg.max_positions:  # a config mismatch, not a bug: say which key
            raise ConfigError(f"model.trunk.max_positions={self.cfg.max_positions} is smaller "
                              f"than a sample of {longest} tokens; raise it to at least "
                              f"{longest}")

    def _token_types(self, batch: PackedBatch) -> torch.Tensor | None:
        """The batch's token types [T], checked against this trunk (None: all type 0)."""
        tt = batch.token_type
        if tt is None:
            return None
        n = self.cfg.type_vocab_size if self.cfg.token_type_embedding else 1
        hi = int(tt.max()) if tt.numel() else 0
        if hi >= n or (tt.numel() and int(tt.min()) < 0):
            raise ValueError(f"token type {hi} in the batch, but this trunk has {n} token "
                             f"type(s) (model.trunk.token_type_embedding="
                             f"{str(self.cfg.token_type_embedding).lower()}, "
                             f"type_vocab_size={self.cfg.type_vocab_size})")
        return tt.to(self.tok.weight.device)

    def _add_position(self, x, pos, modality, token_type=None):
        """Position, token-type and modality embeddings (not the 2-D grid's)."""
        x = x + self.pos(pos)
        if self.cfg.token_type_embedding:
            x = x + (self.token_type[0] if token_type is None else self.token_type[token_type])
        if self.cfg.modality_embeddings:
            x = x + self.modality(modality)
        return x

    def forward(self, batch: PackedBatch, mask: str = "bidirectional", prefix_len=None,
                features: torch.Tensor | None = None, cache: KVCache | None = None,
                outputs: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, dim] of the packed batch. mask='blocks' (``prefix_len`` = block
        ids [T]) also numbers each block's positions after its context, so a block's
        outputs are those of [context + block] alone. ``cache`` (an empty ``KVCache``; the
        samples of one length) keeps each layer's keys/values for ``step``. ``outputs``
        (packed positions [P]): return only their hidden states [P, dim], in that order;
        the last layer then computes only those rows (the same numbers, less work)."""
        blocks = block_ids(prefix_len, batch.num_tokens) if mask == "blocks" else None
        if cache is not None and (len(cache.keys) or mask == "blocks" or outputs is not None):
            raise ValueError("a KV cache starts empty, and not under mask='blocks' or with "
                             "outputs= (later tokens attend to every earlier position)")
        x = self.embed(batch, features, blocks)
        rope = self._rope(batch, x.device)
        cu = batch.cu_seqlens
        lay = Layout(cu, mask, prefix_len)
        order = None
        if outputs is not None:  # sorted rows for the last layer; the caller's order after
            outputs, order = torch.as_tensor(outputs, device=x.device).long().sort()
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            args = (x, batch.modality, cu, batch.max_seqlen, mask, prefix_len, cache, lay,
                    outputs if i == last else None, rope)
            if self.cfg.checkpointing and self.training and cache is None:
                x = checkpoint(blk, *args, use_reentrant=False)
            else:
                x = blk(*args)
        if order is not None:
            x = x[order.argsort()]
        return self.final_norm(x) if self.final_norm is not None else x

    def step(self, ids: torch.Tensor, cache: KVCache, modality: str = "text") -> torch.Tensor:
        """Hidden states [B, dim] of one new token per cached sequence (``ids`` [B], token
        ids of ``modality``, off any 2-D grid), at the position after the cache; it attends
        to every cached position and is appended to the cache. Equals the full forward with
        mask='prefix' (or causal) at that position."""
        if not cache.keys:
            raise ValueError("Trunk.step needs a filled KVCache: run forward(..., cache=) first")
        if ids.ndim != 1 or ids.shape[0] != cache.batch_size:
            raise ValueError(f"Trunk.step takes one id per cached sequence "
                             f"({cache.batch_size}), got shape {tuple(ids.shape)}")
        L = len(cache)
        self._check_positions(L + 1)
        ids = ids.to(self.tok.weight.device)
        m = torch.full_like(ids, MODALITIES.index(modality))
        x = self._add_position(self.tok(ids), torch.full_like(ids, L), m)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self._step_blocks(self.drop(x), m, cache)

    def _rope(self, batch: PackedBatch, device) -> torch.Tensor | None:
        """2-D rotary angles [T, head size / 2] of the batch (``rope_2d``), else None."""
        if not self.cfg.rope_2d:
            return None
        return rope_2d_angles(batch.position_2d.to(device), self.cfg.dim // self.cfg.heads,
                              self.cfg.rope_base)

    def _step_blocks(self, x, modality, cache: KVCache, rope=None) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            x = blk.step(x, modality, cache, i, rope)
        return self.final_norm(x) if self.final_norm is not None else x

    def step_packed(self, batch: PackedBatch, cache: KVCache,
                    features: torch.Tensor | None = None) -> torch.Tensor:
        """``step`` for a packed batch of one token per cached sequence, embedded as
        ``forward`` embeds (features, modality, 2-D grid positions): hidden states [B, dim]."""
        if not cache.keys:
            raise ValueError("Trunk.step needs a filled KVCache: run forward(..., cache=) first")
        if batch.num_tokens != cache.batch_size or batch.num_samples != cache.batch_size:
            raise ValueError(f"step_packed takes one token per cached sequence "
                             f"({cache.batch_size}), got {batch.num_tokens} tokens in "
                             f"{batch.num_samples} samples")
        x = self.embed(batch, features, pos_offset=len(cache))
        return self._step_blocks(x, batch.modality.to(x.device), cache,
                                 self._rope(batch, x.device))

    def mlm_logits(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits at ``positions`` only: gather first, then project (no logits elsewhere)."""
        return self.mlm(hidden[positions])

    def mlm_loss(self, batch: PackedBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy at the batch's target positions; without ``hidden``, the forward
        computes only those rows in its last layer."""
        pos = batch.target_positions
        if hidden is None:
            return F.cross_entropy(self.mlm(self(batch, outputs=pos)), batch.targets[pos])
        return F.cross_entropy(self.mlm_logits(hidden, pos), batch.targets[pos])

    # -- Hugging Face BERT ---------------------------------------------------------------
    @classmethod
    def from_hf_bert(cls, model_or_path, **overrides) -> Trunk:
        """A transformers ``BertModel``/``BertForMaskedLM`` (object or path) as a post-LN
        trunk: every weight, token types included, so outputs equal transformers' to float
        rounding. A config the trunk cannot compute exactly is refused with its field; a
        checkpoint without the MLM head leaves the trunk's head new (random), said once."""
        from transformers import BertForMaskedLM, BertModel

        hf, fresh_head = model_or_path, False
        if isinstance(hf, (str, os.PathLike)):
            hf, info = BertForMaskedLM.from_pretrained(str(hf), output_loading_info=True)
            missing = info["missing_keys"]
            fresh_head = any(k.startswith("cls.") for k in missing)
            other = [k for k in missing if not k.startswith("cls.")]
            if other:
                raise ValueError(f"{model_or_path}: the checkpoint lacks BERT weights "
                                 f"{other[:4]}{' ...' if len(other) > 4 else ''}")
        bert = hf.bert if hasattr(hf, "bert") else hf
        if not isinstance(bert, BertModel):
            raise TypeError(f"expected a BertModel or BertForMaskedLM, got {type(hf).__name__}")
        fresh_head = fresh_head or not hasattr(hf, "cls")
        c = bert.config
        _check_bert_config(c)
        cfg = TrunkConfig(**{
            "vocab_size": c.vocab_size, "dim": c.hidden_size, "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads, "ffn_dim": c.intermediate_size,
            "max_positions": c.max_position_embeddings, "norm_eps": c.layer_norm_eps,
            "prenorm": False, "modality_embeddings": False, "grid_positions": False,
            "token_type_embedding": True, "type_vocab_size": c.type_vocab_size,
            "embed_norm": True, "dropout": c.hidden_dropout_prob, **overrides})
        t = cls(cfg)
        e = bert.embeddings
        sd = {"tok.weight": e.word_embeddings.weight, "pos.weight": e.position_embeddings.weight,
              "token_type": e.token_type_embeddings.weight,
              "embed_norm.weight": e.LayerNorm.weight, "embed_norm.bias": e.LayerNorm.bias}
        for i, layer in enumerate(bert.encoder.layer):
            a, p = layer.attention.self, f"blocks.{i}."
            sd[p + "attn.qkv.weight"] = torch.cat([a.query.weight, a.key.weight, a.value.weight])
            sd[p + "attn.qkv.bias"] = torch.cat([a.query.bias, a.key.bias, a.value.bias])
            o = layer.attention.output
            sd.update({p + "attn.out.weight": o.dense.weight, p + "attn.out.bias": o.dense.bias,
                       p + "norm1.weight": o.LayerNorm.weight, p + "norm1.bias": o.LayerNorm.bias,
                       p + "ffn.0.up.weight": layer.intermediate.dense.weight,
                       p + "ffn.0.up.bias": layer.intermediate.dense.bias,
                       p + "ffn.0.down.weight": layer.output.dense.weight,
                       p + "ffn.0.down.bias": layer.output.dense.bias,
                       p + "norm2.weight": layer.output.LayerNorm.weight,
                       p + "norm2.bias": layer.output.LayerNorm.bias})
        if not fresh_head:
            tr = hf.cls.predictions.transform
            sd.update({"mlm.dense.weight": tr.dense.weight, "mlm.dense.bias": tr.dense.bias,
                       "mlm.norm.weight": tr.LayerNorm.weight, "mlm.norm.bias": tr.LayerNorm.bias,
                       "mlm.bias": hf.cls.predictions.bias})
        else:
            log.warning("%s has no MLM head (a BertModel checkpoint): the trunk's MLM head is "
                        "new and random (its projection tied to the word embeddings); "
                        "fine-tune it before reading mlm_logits", _name_of(model_or_path))
        missing, unexpected = t.load_state_dict({k: v.detach().clone() for k, v in sd.items()},
                                                strict=False)
        allowed = {"mlm.dense.weight", "mlm.dense.bias", "mlm.norm.weight", "mlm.norm.bias",
                   "mlm.bias", "mlm.embedding.weight"}
        if unexpected or set(missing) - allowed:
            raise RuntimeError(f"BERT import mismatch: missing {missing}, unexpected {unexpected}")
        return t


def _name_of(model_or_path) -> str:
    return (str(model_or_path) if isinstance(model_or_path, (str, os.PathLike))
            else f"this {type(model_or_path).__name__}")


# BERT config fields whose other values change the maths the trunk computes
_BERT_EXACT = {"hidden_act": "gelu", "position_embedding_type": "absolute",
               "is_decoder": False, "add_cross_attention": False}


def _check_bert_config(c) -> None:
    """Refuse what the trunk would compute differently; say what only training changes."""
    for key, want in _BERT_EXACT.items():
        got = getattr(c, key, want)
        if got != want:
            raise ValueError(f"BERT config {key}={got!r} is not supported (the trunk "
                             f"computes {key}={want!r}); only such checkpoints import exactly")
    if getattr(c, "attention_probs_dropout_prob", 0.0):
        log.info("BERT import: attention_probs_dropout_prob=%s is not applied (the trunk has "
                 "no attention dropout); outputs in eval mode are unaffected",
                 c.attention_probs_dropout_prob)
