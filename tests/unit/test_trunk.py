"""The trunk: BERT parity, packing invariance, and each option's defining property."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from omnimask.fusion.packing import IGNORE, Segment, pack
from omnimask.fusion.trunk import Trunk, TrunkConfig, clipped_softmax


def _batch(lengths, vocab=100, seed=0, modality=None):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        tgt = torch.where(torch.rand(n, generator=g) < 0.3, ids, torch.full((n,), IGNORE))
        segs = [Segment(modality or "text", ids=ids, targets=tgt)]
        samples.append(segs)
    return pack(samples)


@pytest.mark.parametrize("seed", [0, 1])
def test_hf_bert_parity_packed_vs_padded(seed):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = BertForMaskedLM(cfg).eval()
    ours = Trunk.from_hf_bert(hf, attention_backend="sdpa").eval()
    lengths = [5, 17, 11, 3]
    b = _batch(lengths, vocab=97, seed=seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    att = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, (s, n) in enumerate(zip(b.cu_seqlens[:-1].tolist(), lengths)):
        ids[i, :n], att[i, :n] = b.ids[s:s + n], 1
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=att, output_hidden_states=True)
        h = ours(b)
        logits = ours.mlm_logits(h, torch.arange(b.num_tokens))
    for i, (s, n) in enumerate(zip(b.cu_seqlens[:-1].tolist(), lengths)):
        torch.testing.assert_close(h[s:s + n], out.hidden_states[-1][i, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[s:s + n], out.logits[i, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", [{}, {"prenorm": False}, {"norm": "rmsnorm", "activation": "swiglu",
                                                           "qk_norm": True},
                                  {"multiway": True}, {"gated_attention": True},
                                  {"clip_gamma": -0.03, "clip_zeta": 1.0}])
@pytest.mark.parametrize("mask", ["bidirectional", "causal"])
def test_packed_batch_equals_each_sample_alone(opts, mask):
    torch.manual_seed(0)
    t = Trunk(TrunkConfig(vocab_size=50, dim=32, heads=4, layers=2, ffn_dim=48,
                          attention_backend="sdpa", **opts)).eval()
    lengths = [4, 9, 1, 6]
    b = _batch(lengths, vocab=50)
    with torch.no_grad():
        h = t(b, mask)
        for i, n in enumerate(lengths):
            s = int(b.cu_seqlens[i])
            alone = pack([[Segment("text", ids=b.ids[s:s + n])]])
            torch.testing.assert_close(h[s:s + n], t(alone, mask), atol=1e-5, rtol=1e-5)


def test_clipped_softmax_property():
    s = torch.randn(2, 3, 5, 5)
    m = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    torch.testing.assert_close(clipped_softmax(s, m, 0.0, 1.0), s.softmax(-1))
    # gamma < 0 lets a head put exactly zero weight on tokens: exact zeros appear
    s2 = s.clone()
    s2[..., 0] = 10.0  # a head that wants to attend to one token only
    p = clipped_softmax(s2, m, -0.025, 1.0)
    assert (p == 0).any() and (p >= 0).all() and (p <= 1).all()
    assert (s2.softmax(-1) > 0).all()  # the plain softmax can never give exact zeros


def test_gated_attention_initial_gate_and_effect():
    torch.manual_seed(0)
    cfg = TrunkConfig(vocab_size=20, dim=16, heads=2, layers=1, ffn_dim=16, gated_attention=True,
                      gate_init_prob=0.25, attention_backend="sdpa")
    t = Trunk(cfg)
    x = torch.randn(7, 16)
    assert torch.allclose(torch.sigmoid(t.blocks[0].attn.gate(x)), torch.full((7, 2), 0.25))
    b = _batch([7], vocab=20)
    attn = t.blocks[0].attn
    with torch.no_grad():
        attn.gate.bias.fill_(-1e4)  # gates shut: attention contributes only its output bias
        o = attn(x, b.cu_seqlens, 7, "bidirectional", None)
    torch.testing.assert_close(o, attn.out.bias.expand(7, 16))


def test_multiway_routes_tokens_to_their_modality_expert():
    torch.manual_seed(0)
    t = Trunk(TrunkConfig(vocab_size=30, dim=16, heads=2, layers=1, ffn_dim=16, multiway=True,
                          attention_backend="sdpa")).eval()
    blk = t.blocks[0]
    x = torch.randn(6, 16)
    mod = torch.tensor([0, 0, 1, 1, 2, 2])
    out = blk._ffn(x, mod)
    for i, m in enumerate(mod.tolist()):
        torch.testing.assert_close(out[i], blk.ffn[m](x[i:i + 1])[0])
    with torch.no_grad():  # changing the image expert leaves text tokens alone
        blk.ffn[1].down.bias.add_(1.0)
    out2 = blk._ffn(x, mod)
    assert torch.equal(out[:2], out2[:2]) and not torch.equal(out[2:4], out2[2:4])
    # under bf16 autocast (CUDA's default) each expert's bf16 output lands in x's dtype
    with torch.autocast("cpu", torch.bfloat16):
        out3 = blk._ffn(x, mod)
        want = torch.cat([blk.ffn[m](x[i:i + 1]) for i, m in enumerate(mod.tolist())])
    assert out3.dtype == x.dtype and torch.equal(out3, want.float())


def test_qk_norm_hands_attention_one_dtype(monkeypatch):
    """Under CUDA autocast the q/k norms compute in fp32 while v comes out of the bf16
    projection; attention gets all three in v's dtype (as if the norms ran in fp32 here)."""
    t = Trunk(TrunkConfig(vocab_size=20, dim=16, heads=2, layers=1, ffn_dim=16, qk_norm=True,
                          attention_backend="sdpa"))
    attn = t.blocks[0].attn
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name)
        monkeypatch.setattr(norm, "forward", lambda x, _f=norm.forward: _f(x.float()).float())
    with torch.autocast("cpu", torch.bfloat16):
        q, k, v = attn._qkv(torch.randn(5, 16))
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16


def test_qk_norm_bounds_logits():
    torch.manual_seed(0)
    t = Trunk(TrunkConfig(vocab_size=20, dim=16, heads=2, layers=1, ffn_dim=16, qk_norm=True,
                          norm="rmsnorm", attention_backend="sdpa"))
    attn = t.blocks[0].attn
    x = torch.randn(5, 16) * 1000  # huge activations
    q, k, _ = attn.qkv(x).view(5, 3, 2, 8).unbind(1)
    qn, kn = attn.q_norm(q), attn.k_norm(k)
    assert (qn.pow(2).mean(-1).sqrt() - 1).abs().max() < 1e-3  # unit RMS per head
    assert (qn * kn).sum(-1).abs().max() <= 8 + 1e-3  # |q.k| <= head_dim


def test_mlm_logits_only_at_targets_and_training_step():
    torch.manual_seed(0)
    t = Trunk(TrunkConfig(vocab_size=40, dim=32, heads=4, layers=2, ffn_dim=64,
                          attention_backend="sdpa", checkpointing=True))
    b = _batch([8, 12], vocab=40)
    h = t(b)
    logits = t.mlm_logits(h, b.target_positions)
    assert logits.shape == (len(b.target_positions), 40)
    opt = torch.optim.AdamW(t.parameters(), 1e-2)
    losses = []
    for _ in range(30):  # it learns to reconstruct the masked tokens of a fixed batch
        loss = t.mlm_loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    t = Trunk(TrunkConfig(vocab_size=50, dim=32, heads=4, layers=2, ffn_dim=48,
                          attention_backend="sdpa")).eval()
    b = _batch([5, 9, 3], vocab=50)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(t)(b), t(b), atol=1e-5, rtol=1e-5)


def test_a_process_that_never_compiles_never_imports_dynamo():
    import subprocess
    import sys

    # the trunk's eager() attention builds its torch.compiler.disable'd version only when
    # something compiles: importing torch._dynamo costs seconds per process
    code = ("import sys, torch\n"
            "from omnimask.fusion.packing import Segment, pack\n"
            "from omnimask.fusion.trunk import Trunk, TrunkConfig\n"
            "t = Trunk(TrunkConfig(vocab_size=50, dim=32, heads=4, layers=2, ffn_dim=48))\n"
            "b = pack([[Segment('text', ids=torch.arange(1, 6))]])\n"
            "with torch.no_grad():\n"
            "    out = t(b)\n"
            "print(tuple(out.shape), 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")[-2]
    assert out == "(5, 32) False"


def test_grid_positions_add_row_and_column_embeddings():
    torch.manual_seed(0)
    t = Trunk(TrunkConfig(vocab_size=30, dim=16, heads=2, layers=1, ffn_dim=16,
                          attention_backend="sdpa")).eval()
    ids = torch.arange(8)
    text = Segment("text", ids=torch.tensor([1, 2, 3]))
    wide = pack([[text, Segment("image", ids=ids, grid=(2, 4))]])
    tall = pack([[text, Segment("image", ids=ids, grid=(4, 2))]])
    with torch.no_grad():
        e = t.embed(wide)
        t.cfg.grid_positions = False
        flat = t.embed(wide)
        t.cfg.grid_positions = True
        # text positions carry no grid term; image positions carry row[r] + col[c] exactly
        torch.testing.assert_close(e[:3], flat[:3])
        r, c = torch.arange(8) // 4, torch.arange(8) % 4
        torch.testing.assert_close(e[3:] - flat[3:], t.row(r) + t.col(c))
        # the same codes laid out on another grid embed differently (position (0, 0) alike)
        e2 = t.embed(tall)
        torch.testing.assert_close(e2[3], e[3])
        assert not torch.allclose(e2[4:], e[4:])
    big = pack([[Segment("image", ids=torch.zeros(65, dtype=torch.long), grid=(1, 65))]])
    with pytest.raises(ValueError, match="max_grid"):
        t.embed(big)


def test_mixed_modalities_on_grids_packed_equals_alone_flex_and_sdpa():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    samples = [[Segment("image", ids=torch.randint(0, 40, (n * n,), generator=g), grid=(n, n)),
                Segment("text", ids=torch.randint(0, 40, (m,), generator=g))]
               for n, m in [(2, 5), (3, 1), (1, 7)]]
    b = pack(samples)
    outs = {}
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        t = Trunk(TrunkConfig(vocab_size=40, dim=32, heads=4, layers=2, ffn_dim=48,
                              attention_backend=backend)).eval()
        with torch.no_grad():
            outs[backend] = h = t(b, "prefix", prefix_len=[4, 9, 1])
            for i, s in enumerate(samples):
                lo, hi = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
                torch.testing.assert_close(h[lo:hi], t(pack([s]), "prefix",
                                                       prefix_len=[len(s[0])]),
                                           atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["sdpa"], outs["flex"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_backend"):
        TrunkConfig(attention_backend="flash9")


def _packed_questions(g, vocab=40):
    """Two samples, each an image (block 0) then questions (blocks 1..n): the VQA layout."""
    samples, blocks, alone = [], [], []
    for grid, qs in [((2, 3), [4, 2, 5]), ((2, 2), [3])]:
        img = Segment("image", ids=torch.randint(0, vocab, (grid[0] * grid[1],), generator=g),
                      grid=grid)
        texts = [Segment("text", ids=torch.randint(0, vocab, (n,), generator=g)) for n in qs]
        samples.append([img, *texts])
        blocks += [0] * len(img) + sum(([j + 1] * len(t) for j, t in enumerate(texts)), [])
        alone.append([[img, t] for t in texts])
    return samples, torch.tensor(blocks), alone


@pytest.mark.parametrize("opts", [{}, {"prenorm": False}, {"multiway": True},
                                  {"gated_attention": True, "qk_norm": True},
                                  {"clip_gamma": -0.03, "clip_zeta": 1.0},
                                  {"attention_backend": "flex"}])
def test_blocks_mask_each_question_as_if_alone(opts):
    """mask='blocks': each question's outputs = [image + that question] alone under the same
    mask (positions included), the image's = the image alone (it sees only itself); the
    image's outputs do not move when a question changes."""
    torch.manual_seed(0)
    t = Trunk(TrunkConfig(vocab_size=40, dim=32, heads=4, layers=2, ffn_dim=48,
                          **{"attention_backend": "sdpa", **opts})).eval()
    samples, blocks, alone = _packed_questions(torch.Generator().manual_seed(2))
    b = pack(samples)
    with torch.no_grad():
        h = t(b, "blocks", prefix_len=blocks)
        for i, pairs in enumerate(alone):
            lo = int(b.cu_seqlens[i])
            n_img = len(pairs[0][0])
            at = lo + n_img
            torch.testing.assert_close(h[lo:lo + n_img], t(pack([[pairs[0][0]]])), atol=1e-5,
                                       rtol=1e-5)
            for img, q in pairs:
                ref = t(pack([[img, q]]), "blocks",
                        prefix_len=torch.tensor([0] * n_img + [1] * len(q)))
                torch.testing.assert_close(h[at:at + len(q)], ref[n_img:], atol=1e-5, rtol=1e-5)
                at += len(q)
        changed = [list(s) for s in samples]
        changed[0][2] = Segment("text", ids=(samples[0][2].ids + 1) % 40)
        h2 = t(pack(changed), "blocks", prefix_len=blocks)
    moved = torch.zeros(len(blocks), dtype=torch.bool)
    moved[:int(b.cu_seqlens[1])] = blocks[:int(b.cu_seqlens[1])] == 2
    torch.testing.assert_close(h2[~moved], h[~moved], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(h2[moved], h[moved])


def test_block_positions_count_what_each_position_sees():
    from omnimask.fusion.trunk import block_positions

    cu = torch.tensor([0, 7, 11])
    blocks = torch.tensor([0, 0, 1, 2, 1, 0, 2] + [1, 1, 0, 1])
    assert block_positions(cu, blocks).tolist() == [0, 1, 2, 2, 3, 2, 4] + [0, 1, 0, 3]


def test_encoder_passes_block_ids_through():
    """The Encoder (image features through its embedder) under mask='blocks'."""
    from omnimask.model import Encoder, ModelConfig

    torch.manual_seed(0)
    enc = Encoder(ModelConfig(trunk=TrunkConfig(vocab_size=40, dim=32, layers=1, heads=4,
                                                ffn_dim=48, attention_backend="sdpa"),
                              image_feature_dim=8)).eval()
    g = torch.Generator().manual_seed(0)
    img = Segment("image", features=torch.randn(4, 8, generator=g), grid=(2, 2))
    q1, q2 = (Segment("text", ids=torch.randint(0, 40, (n,), generator=g)) for n in (3, 5))
    with torch.no_grad():
        h = enc(pack([[img, q1, q2]]), mask="blocks",
                prefix_len=torch.tensor([0] * 4 + [1] * 3 + [2] * 5))
        alone = enc(pack([[img, q2]]), mask="blocks", prefix_len=torch.tensor([0] * 4 + [1] * 5))
    torch.testing.assert_close(h[7:], alone[4:], atol=1e-5, rtol=1e-5)
    # one layer: the image's keys/values are its embeddings, so a question also equals
    # [image + question] as one bidirectional sample
    with torch.no_grad():
        torch.testing.assert_close(h[7:], enc(pack([[img, q2]]))[4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", [{}, {"prenorm": False, "embed_norm": True,
                                       "token_type_embedding": True},
                                  {"norm": "rmsnorm", "activation": "swiglu", "qk_norm": True},
                                  {"gated_attention": True, "clip_gamma": -0.03, "clip_zeta": 1.02},
                                  {"multiway": True}, {"attention_backend": "flex"},
                                  {"rope_2d": True}])
def test_kv_cache_decoding_equals_full_prefix_forward(opts):
    """Prefill [image + bos] once, then one token at a time: the hidden states and logits at
    every step equal the full forward with mask='prefix' (prefix = image + bos); after
    ``reorder`` the cache continues the picked sequences."""
    from omnimask.fusion.trunk import KVCache

    torch.manual_seed(0)
    t = Trunk(TrunkConfig(vocab_size=40, dim=32, heads=4, layers=2, ffn_dim=48,
                          **{"attention_backend": "sdpa", **opts})).eval()
    g = torch.Generator().manual_seed(3)
    B, P, n = 3, 5, 4  # 2x2 image + bos, then n tokens
    imgs = torch.randint(0, 40, (B, 4), generator=g)
    text = torch.randint(0, 40, (B, 1 + n), generator=g)

    def full(imgs, text):
        b = pack([[Segment("image", ids=i, grid=(2, 2)), Segment("text", ids=s)]
                  for i, s in zip(imgs, text)])
        h = t(b, "prefix", prefix_len=[P] * len(imgs))
        return h.view(len(imgs), -1, 32)

    with torch.no_grad():
        want = full(imgs, text)
        cache = KVCache()
        pre = t(pack([[Segment("image", ids=i, grid=(2, 2)), Segment("text", ids=s[:1])]
                      for i, s in zip(imgs, text)]), "prefix", prefix_len=[P] * B, cache=cache)
        torch.testing.assert_close(pre.view(B, P, 32), want[:, :P], atol=1e-5, rtol=1e-5)
        for j in range(1, n + 1):
            h = t.step(text[:, j], cache)
            assert len(cache) == P + j
            torch.testing.assert_close(h, want[:, P + j - 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(t.mlm_logits(h, torch.arange(B)),
                                       t.mlm_logits(want[:, P + j - 1], torch.arange(B)),
                                       atol=1e-5, rtol=1e-5)
        idx = torch.tensor([2, 0, 0, 1])  # beams: pick, repeat, drop
        cache.reorder(idx)
        nxt = torch.randint(0, 40, (4,), generator=g)
        h = t.step(nxt, cache)
        want = full(imgs[idx], torch.cat([text[idx], nxt[:, None]], 1))
        torch.testing.assert_close(h, want[:, -1], atol=1e-5, rtol=1e-5)


def test_kv_cache_bad_use():
    from omnimask.fusion.trunk import KVCache

    t = Trunk(TrunkConfig(vocab_size=40, dim=32, heads=4, layers=1, ffn_dim=48,
                          max_positions=6, attention_backend="sdpa")).eval()
    with pytest.raises(ValueError, match="one length"):
        t(_batch([3, 4], vocab=40), cache=KVCache())
    with pytest.raises(ValueError, match="filled KVCache"):
        t.step(torch.tensor([1]), KVCache())
    cache = KVCache()
    t(_batch([5, 5], vocab=40), "causal", cache=cache)
    with pytest.raises(ValueError, match="one id per cached sequence"):
        t.step(torch.tensor([1, 2, 3]), cache)
    t.step(torch.tensor([1, 2]), cache)
    from omnimask.errors import ConfigError

    with pytest.raises(ConfigError, match="max_positions"):
        t.step(torch.tensor([1, 2]), cache)


@pytest.mark.parametrize("opts", [{}, {"prenorm": False}, {"multiway": True},
                                  {"gated_attention": True, "qk_norm": True},
                                  {"clip_gamma": -0.03, "clip_zeta": 1.0},
                                  {"checkpointing": True}])
@pytest.mark.parametrize("mask", ["bidirectional", "causal"])
def test_outputs_at_rows_equal_the_full_forward_float64(opts, mask):
    """forward(outputs=pos) computes the last layer only at pos: hidden states, logits and
    every parameter's gradient equal the full forward's gathered at pos (1e-6, float64)."""
    torch.manual_seed(0)
    t = Trunk(TrunkConfig(vocab_size=50, dim=32, heads=4, layers=2, ffn_dim=48,
                          attention_backend="sdpa", **opts)).double().train()
    b = _batch([4, 9, 1, 6], vocab=50, modality=None)
    b.modality = torch.arange(b.num_tokens) % 3  # every expert gets tokens (multiway)
    pos = torch.tensor([13, 2, 19, 5, 6])  # any order; sample 2 has none
    grads = []
    for fast in (True, False):
        t.zero_grad()
        h = t(b, mask, outputs=pos) if fast else t(b, mask)[pos]
        (t.mlm(h).sin().sum() + h.square().sum()).backward()
        grads.append((h, {n: p.grad.clone() for n, p in t.named_parameters()
                          if p.grad is not None}))
    (h_fast, g_fast), (h_full, g_full) = grads
    torch.testing.assert_close(h_fast, h_full, atol=1e-6, rtol=1e-6)
    assert g_fast.keys() == g_full.keys()
    for n in g_full:
        torch.testing.assert_close(g_fast[n], g_full[n], atol=1e-6, rtol=1e-6, msg=n)


@pytest.mark.parametrize("opts", [{}, {"prenorm": False}, {"multiway": True}])
def test_compiled_blocks_equal_eager_with_gradients(opts):
    """compile_blocks: each block compiled in place (attention eager) gives the eager
    trunk's outputs at the target rows and its gradients, over batches of new lengths
    (dynamic shapes), and keeps the parameter names."""
    torch.manual_seed(0)
    eager = Trunk(TrunkConfig(vocab_size=50, dim=32, heads=4, layers=2, ffn_dim=48,
                              attention_backend="sdpa", **opts))
    compiled = Trunk(eager.cfg)
    compiled.load_state_dict(eager.state_dict())
    names = list(dict(compiled.named_parameters()))
    compiled.compile_blocks()
    assert list(dict(compiled.named_parameters())) == names
    for lengths in ([5, 9, 3], [7, 2, 11, 4]):
        b = _batch(lengths, vocab=50)
        if opts.get("multiway"):
            b.modality = torch.arange(b.num_tokens) % 3
        losses = []
        for t in (eager, compiled):
            t.zero_grad()
            loss = t.mlm_loss(b)
            loss.backward()
            losses.append((loss, {n: p.grad.clone() for n, p in t.named_parameters()
                                  if p.grad is not None}))
        torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-5, rtol=1e-5)
        for n, g in losses[0][1].items():
            torch.testing.assert_close(losses[1][1][n], g, atol=1e-5, rtol=1e-4, msg=n)


def _host_syncs(fn) -> int:
    """Calls in ``fn`` that make the host wait for the device on CUDA: tensor -> Python
    scalars or lists, and ops whose output size depends on the data."""
    from torch.utils._python_dispatch import TorchDispatchMode

    waits = {"aten._local_scalar_dense.default", "aten.nonzero.default",
             "aten.repeat_interleave.Tensor", "aten.masked_select.default"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += str(func) in waits
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist  # a CPU tolist dispatches nothing: counted here

    def counted(self, *a):
        Count.n += 1
        return tolist(self, *a)

    torch.Tensor.tolist = counted
    try:
        with Count():
            fn()
    finally:
        torch.Tensor.tolist = tolist
    return Count.n


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_host_syncs_per_training_step_do_not_grow_with_depth(backend):
    """A GPU step stalls at each host sync: the trunk makes a few per forward (lengths,
    target rows, position check), none per layer."""
    b = _batch([5, 12, 9])
    counts = []
    for layers in (2, 5):
        t = Trunk(TrunkConfig(vocab_size=100, dim=16, heads=2, layers=layers, ffn_dim=32,
                              attention_backend=backend))
        t.mlm_loss(b).backward()  # the backend probe (auto) runs once, before counting
        counts.append(_host_syncs(lambda t=t: t.mlm_loss(b).backward()))
    assert counts[0] == counts[1] and 0 < counts[0] <= 8
