"""TIGER model construction, sequence encoding and loss."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec.models.tiger import (
    TigerConfig,
    build_tiger,
    encode_histories,
    target_tokens,
    tiger_loss,
    user_token_ids,
)
from genrec.tokenizers.sid import SemanticIdTable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def table():
    # 3 items, L = 2 levels of K = 4 codes + suffix of 2: tokens 1..4 | 5..8 | 9..10
    return SemanticIdTable.from_codes(np.array([7, 8, 9]), np.array([[0, 1], [0, 1], [3, 2]]), 4, 2)


def tiny_cfg(**kw):
    base = {
        "num_encoder_layers": 1,
        "num_decoder_layers": 2,
        "d_model": 16,
        "num_heads": 2,
        "d_kv": 4,
        "d_ff": 32,
    }
    return TigerConfig(**{**base, **kw})


def test_config_defaults_and_validation():
    cfg = TigerConfig()
    assert (
        cfg.num_encoder_layers,
        cfg.num_decoder_layers,
        cfg.d_model,
        cfg.num_heads,
        cfg.d_kv,
        cfg.d_ff,
    ) == (
        4,
        4,
        128,
        6,
        64,
        1024,
    )
    assert cfg.feed_forward_proj == "gated-silu" and cfg.dropout == 0.1 and cfg.max_history_items == 20
    assert cfg.num_user_tokens == 0
    with pytest.raises(ValueError, match="feed_forward_proj"):
        TigerConfig(feed_forward_proj="gelu")
    with pytest.raises(ValueError, match="num_heads"):
        TigerConfig(num_heads=0)


def test_build_matches_spec_sizes():
    # specs/dact.md §2.4: ≈4.65 M parameters with ReLU and vocab 1,505; ≈5.70 M gated
    relu = build_tiger(TigerConfig(feed_forward_proj="relu"), 1505)
    gated = build_tiger(TigerConfig(), 1505)
    assert round(sum(p.numel() for p in relu.parameters()) / 1e6, 2) == 4.65
    assert round(sum(p.numel() for p in gated.parameters()) / 1e6, 2) == 5.70
    ff = gated.decoder.block[0].layer[-1].DenseReluDense
    assert hasattr(ff, "wi_0") and hasattr(ff, "wi_1") and ff.wi_0.out_features == 1024
    assert hasattr(relu.decoder.block[0].layer[-1].DenseReluDense, "wi")
    c = gated.config
    assert (c.pad_token_id, c.decoder_start_token_id, c.eos_token_id) == (0, 0, None)
    assert c.num_layers == 4 and c.num_decoder_layers == 4 and c.num_heads == 6 and c.d_kv == 64
    assert gated.lm_head.weight.data_ptr() == gated.shared.weight.data_ptr()  # tied embeddings


def test_user_tokens_extend_vocab(table):
    model = build_tiger(tiny_cfg(num_user_tokens=5), table.vocab_size)
    assert model.config.vocab_size == table.vocab_size + 5
    tok = user_token_ids(np.arange(100), 5, table.vocab_size)
    assert tok.min() >= table.vocab_size and tok.max() < table.vocab_size + 5
    assert len(np.unique(tok)) == 5  # the hash spreads 100 users over all 5 tokens
    np.testing.assert_array_equal(tok, user_token_ids(np.arange(100), 5, table.vocab_size))


def test_encode_histories_left_pads_truncates_and_adds_user(table):
    hist = np.array([[-1, -1, 7, 9], [8, 7, 9, 8], [-1, -1, -1, -1]])
    ids, mask = encode_histories(hist, table, max_items=3)
    t7, t8, t9 = (table.tokens_of(np.array([i]))[0].tolist() for i in (7, 8, 9))
    assert t7 == [1, 6, 9] and t8 == [1, 6, 10] and t9 == [4, 7, 9]
    assert ids.tolist() == [
        [0, 0, 0] + t7 + t9,
        t7 + t9 + t8,  # the 3 most recent of 4
        [0] * 9,
    ]
    assert mask.tolist() == (ids != 0).long().tolist()
    # padding inside a row is dropped, time order kept
    ids2, _ = encode_histories(np.array([[9, -1, 7]]), table, max_items=3)
    assert ids2.tolist() == [t9 + t7]
    # one user token right before the first real token
    ids3, mask3 = encode_histories(hist[:1], table, max_items=3, user_ids=np.array([42]), num_user_tokens=4)
    u = int(user_token_ids(np.array([42]), 4, table.vocab_size)[0])
    assert ids3.tolist() == [[u] + t7 + t9] and mask3.sum().item() == 7
    with pytest.raises(ValueError, match="user_ids"):
        encode_histories(hist, table, num_user_tokens=4)
    with pytest.raises(KeyError):
        encode_histories(np.array([[5]]), table)


def test_target_tokens(table):
    assert target_tokens(np.array([9, 7]), table).tolist() == [[4, 7, 9], [1, 6, 9]]
    assert target_tokens(torch.tensor([[8]]), table).shape == (1, 1, 3)
    with pytest.raises(ValueError, match="padding"):
        target_tokens(np.array([-1]), table)


def test_loss_is_token_ce_over_sid_positions_and_trains(table):
    torch.manual_seed(0)
    model = build_tiger(tiny_cfg(dropout=0.0), table.vocab_size)
    ids, mask = encode_histories(np.array([[7, 8], [-1, 9]]), table)
    labels = target_tokens(np.array([9, 8]), table)
    loss = tiger_loss(model, ids, mask, labels)
    dec_in = torch.cat([torch.zeros(2, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in).logits
    assert logits.shape == (2, 3, table.vocab_size)
    manual = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert model.shared.weight.grad.abs().sum() > 0
    assert model.encoder.block[0].layer[-1].DenseReluDense.wi_0.weight.grad.abs().sum() > 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        step_loss = tiger_loss(model, ids, mask, labels)
        step_loss.backward()
        opt.step()
    assert step_loss.item() < 0.5 * loss.item()
