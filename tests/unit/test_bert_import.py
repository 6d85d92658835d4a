"""BERT import without silent gaps: a real checkpoint (all-MiniLM-L6-v2) packed vs
transformers padded, with token types; what the import refuses and what it says."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

from omnimask.fusion.packing import Segment, from_padded, pack, to_padded
from omnimask.fusion.trunk import Trunk, TrunkConfig

SENTENCES = ["A small red square sits left of a large blue circle.",
             "Packing removes padding.", "no"]
PAIRS = [("What colour is the square?", "It is red."),
         ("Where is the circle?", "To the right of the small square, near the top edge.")]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    hf = BertModel.from_pretrained(str(minilm_dir), add_pooling_layer=False).eval()
    return tok, hf


@pytest.mark.parametrize("kind", ["sentences", "pairs"])
def test_real_bert_packed_equals_transformers_padded(minilm, kind, caplog):
    """Right-padded HF inputs -> from_padded -> the imported trunk -> to_padded: equal to
    transformers' padded forward at every real position, sentence pairs' token types
    included (type 1 ignored would move them by ~0.2)."""
    tok, hf = minilm
    enc = (tok(SENTENCES, padding=True, return_tensors="pt") if kind == "sentences" else
           tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt"))
    assert (enc["token_type_ids"].max() == 1) == (kind == "pairs")
    with caplog.at_level(logging.WARNING, "omnimask.trunk"):
        ours = Trunk.from_hf_bert(hf, attention_backend="sdpa").eval()
    assert "no MLM head" in caplog.text  # a BertModel: the head is new, and it says so
    batch = from_padded(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    with torch.no_grad():
        want = hf(**enc).last_hidden_state
        got = to_padded(ours(batch), batch.cu_seqlens, enc["input_ids"].shape[1])
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-5)
    if kind == "pairs":  # the same tokens as all type 0 are a different input
        batch.token_type = torch.zeros_like(batch.token_type)
        with torch.no_grad():
            moved = (to_padded(ours(batch), batch.cu_seqlens)[real] - want[real]).abs().max()
        assert moved > 1e-2


def test_checkpoint_without_mlm_head_loads_with_a_fresh_head(minilm_dir, caplog):
    with caplog.at_level(logging.WARNING, "omnimask.trunk"):
        t = Trunk.from_hf_bert(str(minilm_dir))
    assert f"{minilm_dir} has no MLM head" in caplog.text
    assert t.cfg.type_vocab_size == 2 and t.token_type.shape == (2, 384)
    # our init (zero bias, N(0, 0.02) transform), not transformers' random head
    assert torch.equal(t.mlm.bias, torch.zeros_like(t.mlm.bias))
    assert t.mlm.embedding.weight is t.tok.weight


def test_checkpoint_with_mlm_head_is_copied_and_quiet(tmp_path, caplog):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32)
    hf = BertForMaskedLM(cfg)
    with torch.no_grad():
        hf.cls.predictions.bias.normal_()
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, "omnimask.trunk"):
        t = Trunk.from_hf_bert(str(tmp_path))
    assert "no MLM head" not in caplog.text
    assert "attention_probs_dropout_prob=0.1 is not applied" in caplog.text
    torch.testing.assert_close(t.mlm.bias, hf.cls.predictions.bias)
    assert t.cfg.dropout == 0.1  # hidden_dropout_prob maps to the trunk's dropout


@pytest.mark.parametrize("field, value", [("position_embedding_type", "relative_key"),
                                          ("hidden_act", "relu"), ("is_decoder", True)])
def test_unsupported_bert_configs_are_refused_by_name(field, value):
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, **{field: value})
    with pytest.raises(ValueError, match=f"{field}={value!r} is not supported"):
        Trunk.from_hf_bert(BertModel(cfg))


def test_token_types_are_checked_against_the_trunk():
    with_types = Trunk(TrunkConfig(vocab_size=20, dim=16, heads=2, layers=1, ffn_dim=16,
                                   token_type_embedding=True, type_vocab_size=2))
    plain = Trunk(TrunkConfig(vocab_size=20, dim=16, heads=2, layers=1, ffn_dim=16))
    b = pack([[Segment("text", ids=torch.tensor([1, 2])),
               Segment("text", ids=torch.tensor([3]), token_type=1)]])
    assert b.token_type.tolist() == [0, 0, 1]
    with torch.no_grad():
        with_types.token_type[1] += 1.0
        h1 = with_types(b)
        b.token_type = None  # no types: all type 0
        h0 = with_types(b)
    assert not torch.allclose(h1[2], h0[2])
    b.token_type = torch.tensor([0, 0, 2])
    with pytest.raises(ValueError, match="token type 2 in the batch, but this trunk has 2"):
        with_types(b)
    b.token_type = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="token_type_embedding=false"):
        plain(b)


def test_a_trunk_saved_with_one_type_vector_still_loads():
    t = Trunk(TrunkConfig(vocab_size=20, dim=16, heads=2, layers=1, ffn_dim=16,
                          token_type_embedding=True))
    sd = t.state_dict()
    sd["token_type"] = torch.arange(16.0)  # the former [dim] layout
    t.load_state_dict(sd)
    assert torch.equal(t.token_type, torch.arange(16.0)[None])


def test_from_padded_and_to_padded():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    att = torch.tensor([[1, 1, 1], [1, 1, 0]])
    b = from_padded(ids, att, torch.tensor([[0, 1, 1], [0, 0, 0]]))
    assert b.ids.tolist() == [5, 6, 7, 8, 9] and b.cu_seqlens.tolist() == [0, 3, 5]
    assert b.position.tolist() == [0, 1, 2, 0, 1] and b.token_type.tolist() == [0, 1, 1, 0, 0]
    back = to_padded(b.ids.float()[:, None], b.cu_seqlens, value=-1)
    assert back[..., 0].tolist() == [[5, 6, 7], [8, 9, -1]]
    with pytest.raises(ValueError, match="row 1 is not right-padded"):
        from_padded(ids, torch.tensor([[1, 1, 1], [0, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        from_padded(ids, att[:, :2])
