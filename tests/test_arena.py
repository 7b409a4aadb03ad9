"""Cold-start arena core: dense scorer, hybrid re-ranking, MMR, diverse beam search, diversity metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec.decoding import (
    SidTrie,
    constrained_beam_search,
    dense_top_m,
    diverse_beam_search,
    hybrid_rerank,
    merge_candidates,
    mmr_rerank,
    prefix_similarity,
    score_sids,
)
from genrec.metrics import (
    DiversityMetrics,
    coverage,
    distinct_first_codes,
    intra_list_diversity,
    item_popularity,
    novelty,
)
from genrec.models.dense import DenseScorer, DenseScorerConfig, encoder_states
from genrec.models.tiger import TigerConfig, build_tiger, encode_histories, target_tokens
from genrec.tokenizers.sid import SemanticIdTable

INF = float("inf")
N_ITEMS = 40


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def table():
    codes = np.random.default_rng(0).integers(0, 6, size=(N_ITEMS, 3))
    return SemanticIdTable.from_codes(np.arange(N_ITEMS), codes, codebook_size=6, suffix_size=4)


@pytest.fixture(scope="module")
def tiny(table):
    """A tiny T5 fitted a few steps on targets from a few first-level codes, so plain beams share prefixes."""
    torch.manual_seed(0)
    cfg = TigerConfig(num_encoder_layers=1, num_decoder_layers=2, d_model=32, num_heads=2, d_kv=8, d_ff=64)
    model = build_tiger(cfg, table.vocab_size)
    rng = np.random.default_rng(0)
    hist = table.items[rng.integers(0, N_ITEMS, size=(32, 4))]
    popular = table.items[table.codes[:, 0] == table.codes[0, 0]]  # one first-level code dominates
    target = popular[hist[:, -1] % len(popular)]
    ids, mask = encode_histories(hist, table, max_items=cfg.max_history_items)
    labels = target_tokens(target, table)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    model.eval()
    return model, ids[:8], mask[:8]


def scorer(num_items=10, text_dim=12, d_model=16, seed=0, **cfg):
    torch.manual_seed(seed)
    text = torch.randn(num_items, text_dim)
    return DenseScorer(DenseScorerConfig(dim=8, hidden=16, **cfg), d_model, text)


# ------------------------------------------------------------------------------------------- dense scorer
def test_dense_scorer_scores_every_item_including_cold(tiny, table):
    model, ids, mask = tiny
    hidden = encoder_states(model, ids, mask)
    assert hidden.shape == (*ids.shape, model.config.d_model)
    dense = DenseScorer(DenseScorerConfig(dim=8, hidden=16), model.config.d_model, torch.randn(N_ITEMS, 12))
    user = dense.user_vectors(hidden, mask)
    assert user.shape == (8, 8)
    torch.testing.assert_close(user.norm(dim=-1), torch.ones(8))
    all_scores = dense.scores(user)  # (B, num_items): no item was a target of the dense scorer yet
    assert all_scores.shape == (8, N_ITEMS) and torch.isfinite(all_scores).all()
    assert (all_scores.abs() <= 1 / dense.temperature + 1e-4).all()  # cosine / τ
    cand = torch.tensor([[3, -1, 7]]).expand(8, -1)
    per_row = dense.scores(user, cand)
    assert torch.isinf(per_row[:, 1]).all()
    torch.testing.assert_close(per_row[:, [0, 2]], all_scores[:, [3, 7]])
    cached = dense.item_vectors()  # a whole evaluation can reuse the catalogue's vectors
    assert torch.equal(dense.scores(user, cand, item_vecs=cached), per_row)
    assert torch.equal(dense.scores(user, item_vecs=cached), all_scores)
    # a fully padded history still gets a finite vector
    assert torch.isfinite(dense.user_vectors(hidden[:1], torch.zeros_like(mask[:1]))).all()


@pytest.mark.parametrize("negatives", ["in_batch", 5])
def test_dense_loss_decreases_on_toy_problem(negatives):
    dense = scorer(num_items=10)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(16, 3, 16, generator=g)
    mask = torch.ones(16, 3, dtype=torch.long)
    target = torch.arange(16) % 10
    opt = torch.optim.Adam(dense.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = dense.loss(dense.user_vectors(hidden, mask), target, negatives=negatives, generator=g)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert dense.log_temperature.grad is not None  # the log-temperature is learned


def test_in_batch_duplicates_are_masked():
    dense = scorer(num_items=10, learn_temperature=False)
    user = F.normalize(torch.randn(3, 8), dim=-1)
    target = torch.tensor([3, 3, 5])
    logits = user @ dense.item_vectors(target).T / dense.temperature
    want = torch.stack([
        torch.logsumexp(logits[0, [0, 2]], 0) - logits[0, 0],  # column 1 is item 3 again: not a negative
        torch.logsumexp(logits[1, [1, 2]], 0) - logits[1, 1],
        torch.logsumexp(logits[2], 0) - logits[2, 2],
    ]).mean()
    torch.testing.assert_close(dense.loss(user, target), want)
    # log-Q correction subtracts log q(item) from every candidate column
    log_q = torch.log(torch.linspace(0.05, 0.15, 10))
    lq = logits - log_q[target][None, :]
    want_q = torch.stack([torch.logsumexp(lq[0, [0, 2]], 0) - lq[0, 0], torch.logsumexp(lq[1, [1, 2]], 0) - lq[1, 1],
                          torch.logsumexp(lq[2], 0) - lq[2, 2]]).mean()
    torch.testing.assert_close(dense.loss(user, target, log_q=log_q), want_q)
    # sampled negatives: with 2 items every draw hits some row's target, which is masked for that row
    small = scorer(num_items=2, learn_temperature=False)
    loss = small.loss(user, torch.tensor([0, 1, 0]), negatives=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert DenseScorerConfig().learn_temperature  # default: learnable τ
    assert "log_temperature" not in dict(small.named_parameters())  # fixed τ is a buffer


# ------------------------------------------------------------------------------------------- hybrid
def test_merge_candidates_keeps_generated_duplicates_once():
    gen = torch.tensor([[10, 11, -1], [12, 13, 14]])
    gen_lp = torch.tensor([[-1.0, -2.0, -INF], [-0.5, -1.5, -3.0]])
    items, lp = merge_candidates(gen, gen_lp, torch.tensor([11, 20, 20, 13]))
    assert items.tolist() == [[10, 11, -1, -1, 20, -1, 13], [12, 13, 14, 11, 20, -1, -1]]
    assert lp.tolist() == [[-1.0, -2.0, -INF, -INF, -INF, -INF, -INF], [-0.5, -1.5, -3.0, -INF, -INF, -INF, -INF]]
    per_row, _ = merge_candidates(gen, gen_lp, torch.tensor([[20], [14]]))
    assert per_row.tolist() == [[10, 11, -1, 20], [12, 13, 14, -1]]


def test_hybrid_rerank_exact_orders():
    # generated 10, 11, 12 (beam order), an emptied duplicate slot, injected 20, 21
    cand = torch.tensor([[10, 11, 12, -1, 20, 21]])
    gen = torch.tensor([[-1.0, -2.0, -4.0, -INF, -INF, -INF]])
    dense = torch.tensor([[0.1, 0.5, 0.3, 5.0, 0.9, 0.0]])  # the empty slot's score is ignored
    items, blend = hybrid_rerank(cand, gen, dense, weight=0.5, top_k=6)
    # z(gen) = [1, 2/3, 0, ·, 0, 0]; z(dense) = [1/9, 5/9, 3/9, ·, 1, 0]
    assert items.tolist() == [[11, 10, 20, 12, 21, -1]]
    torch.testing.assert_close(blend, torch.tensor([[11 / 18, 5 / 9, 0.5, 1 / 6, 0.0, -INF]]))
    assert hybrid_rerank(cand, gen, dense, 0.0, 6)[0].tolist() == [[10, 11, 12, 20, 21, -1]]  # generative
    assert hybrid_rerank(cand, gen, dense, 1.0, 6)[0].tolist() == [[20, 11, 12, 10, 21, -1]]  # dense
    # ties: equal generative scores keep beam order, equal dense scores keep candidate order; padding
    tie_items, tie_scores = hybrid_rerank(cand, torch.tensor([[-1.0, -1.0, -1.0, -INF, -INF, -INF]]),
                                          torch.tensor([[0.2, 0.7, 0.7, 0.0, 0.7, 0.2]]), 1.0, 8)
    assert tie_items.tolist() == [[11, 12, 20, 10, 21, -1, -1, -1]] and torch.isinf(tie_scores[0, 5:]).all()
    assert hybrid_rerank(cand, gen, dense, 0.0, 3)[0].tolist() == [[10, 11, 12]]


def test_hybrid_weight_endpoints_on_random_pools():
    g = torch.Generator().manual_seed(0)
    gen_lp = torch.sort(torch.randn(4, 10, generator=g), dim=1, descending=True).values
    gen_items = torch.randperm(30, generator=g)[:10].repeat(4, 1)
    cand, lp = merge_candidates(gen_items, gen_lp, torch.arange(30, 36))
    dense = torch.randn(4, 16, generator=g)
    items0, _ = hybrid_rerank(cand, lp, dense, 0.0, 16)
    assert torch.equal(items0, cand)  # generated in beam order, then injected in given order
    items1, _ = hybrid_rerank(cand, lp, dense, 1.0, 16)
    assert torch.equal(items1, cand.gather(1, dense.argsort(dim=1, descending=True, stable=True)))


def test_dense_top_m():
    scores = torch.tensor([[0.3, 0.9, 0.1, 0.9, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, True, True, True], [False, False, True, False, False]])
    items, top = dense_top_m(scores, mask, 3)
    assert items.tolist() == [[3, 4, 0], [2, -1, -1]]
    torch.testing.assert_close(top, torch.tensor([[0.9, 0.5, 0.3], [0.0, -INF, -INF]]))


# ------------------------------------------------------------------------------------------- MMR
def test_mmr_lambda_one_is_beam_order():
    g = torch.Generator().manual_seed(0)
    rel = torch.sort(torch.randn(3, 6, generator=g), dim=1, descending=True).values
    rel[0, 2] = rel[0, 1]  # a tie keeps input order
    items = torch.arange(18).reshape(3, 6)
    items[2, 5] = -1  # empty slot: never picked
    picked, index = mmr_rerank(items, rel, vectors=torch.randn(3, 6, 4, generator=g), lam=1.0)
    assert torch.equal(picked, items) and index[2, 5] == -1 and torch.equal(index[:2], torch.arange(6).expand(2, -1))


def test_mmr_hand_made_similarity():
    items = torch.tensor([[1, 2, 3, 4]])
    rel = torch.tensor([[1.0, 0.9, 0.5, 0.0]])
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.0], [0.9, 1.0, 0.2, 0.1], [0.1, 0.2, 1.0, 0.3], [0.0, 0.1, 0.3, 1.0]])
    picked, index = mmr_rerank(items, rel, sim[None], lam=0.5)
    assert picked.tolist() == [[1, 3, 2, 4]] and index.tolist() == [[0, 2, 1, 3]]
    assert mmr_rerank(items, rel * 10 - 3, sim[None], lam=0.5, top_k=2)[0].tolist() == [[1, 3]]  # scale-free
    tokens = torch.tensor([[[1, 7, 13, 19], [1, 7, 14, 19], [2, 7, 13, 19]]])
    ps = prefix_similarity(tokens)
    torch.testing.assert_close(ps[0], torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]))


# ------------------------------------------------------------------------------------------- diverse beams
@pytest.mark.parametrize("num_beams,top_k", [(8, 8), (8, 5)])
def test_diverse_beam_search_one_group_equals_beam_search(tiny, table, num_beams, top_k):
    model, ids, mask = tiny
    trie = SidTrie.from_table(table)
    want = constrained_beam_search(model, ids, mask, trie, num_beams, top_k, return_tokens=True)
    got = diverse_beam_search(model, ids, mask, trie, num_beams, num_groups=1, penalty=0.0, top_k=top_k,
                              return_tokens=True)
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_diverse_groups_spread_first_level_codes(tiny, table):
    model, ids, mask = tiny
    trie = SidTrie.from_table(table)
    first = torch.from_numpy(table.tokens()[:, 0])  # items are 0..N-1

    def distinct_l1(items):
        return distinct_first_codes(first[items.clamp(min=0)].masked_fill(items < 0, -1)).double().mean()

    plain, _ = constrained_beam_search(model, ids, mask, trie, 8, 8)
    # the penalty is in log-prob units: it must beat the toy model's gap between first-level codes
    items, scores, tokens = diverse_beam_search(model, ids, mask, trie, 8, num_groups=4, penalty=20.0,
                                                return_tokens=True)
    assert distinct_l1(items) >= distinct_l1(plain)
    assert distinct_l1(items) > distinct_l1(plain) + 1  # the toy model is peaked on one first-level code
    # distinct items ranked by their true (teacher-forced) log-prob; items two groups share come back once
    found = items >= 0
    assert found.sum() >= 0.9 * items.numel() and (found[:, :-1].int() >= found[:, 1:].int()).all()  # empties last
    assert all(len(set(r) - {-1}) == len([x for x in r if x >= 0]) for r in items.tolist())
    assert torch.isfinite(scores[found]).all() and torch.isinf(scores[~found]).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    tf = score_sids(model, ids, mask, tokens.clamp(min=1))  # empty slots: any valid tokens, not compared
    torch.testing.assert_close(tf[found], scores[found], atol=1e-4, rtol=1e-5)
    # penalty 0 with several groups: every group repeats group 0's beams, so only its items remain
    same, _ = diverse_beam_search(model, ids, mask, trie, 8, num_groups=4, penalty=0.0)
    assert torch.equal(same[:, :2], constrained_beam_search(model, ids, mask, trie, 2, 2)[0])
    assert (same[:, 2:] == -1).all()


# ------------------------------------------------------------------------------------------- diversity metrics
EMB = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [-1.0, 0.0]])  # item 2 ∥ item 0, item 3 opposite
FIRST = torch.tensor([5, 5, 6, 7])
POP = item_popularity(torch.tensor([0, 0, 0, 1]), 4)  # (c + 1) / (4 + 4) = [1/2, 1/4, 1/8, 1/8]
LISTS = torch.tensor([[0, 1, 2], [3, 0, -1], [1, -1, -1]])


def test_diversity_functions_hand_computed():
    ild = intra_list_diversity(LISTS, EMB)
    torch.testing.assert_close(ild[:2], torch.tensor([2 / 3, 2.0], dtype=torch.float64))
    assert math.isnan(ild[2])
    assert distinct_first_codes(FIRST[LISTS.clamp(min=0)].masked_fill(LISTS < 0, -1)).tolist() == [2, 2, 1]
    torch.testing.assert_close(POP, torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64))
    torch.testing.assert_close(novelty(LISTS, POP), torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    assert float(coverage(LISTS, 4)) == 1.0 and float(coverage(LISTS[:, :1], 4)) == 0.75


def test_diversity_metric_per_subset():
    metric = DiversityMetrics(ks=(1, 3), subsets=("overall", "cold", "new"), item_embeddings=EMB,
                              item_first_code=FIRST, popularity=POP)
    cold = torch.tensor([True, False, True])
    metric.update(LISTS[:2], {"cold": cold[:2], "new": torch.zeros(2, dtype=torch.bool)}, instance_ids=torch.tensor([0, 1]))
    metric.update(LISTS[1:], {"cold": cold[1:], "new": torch.zeros(2, dtype=torch.bool)},
                  instance_ids=torch.tensor([1, 2]))  # instance 1 again (DDP padding): counted once
    out = {k: float(v) for k, v in metric.compute().items()}
    want = {
        "ild@3/overall": 4 / 3, "ild@3/cold": 2 / 3,
        "distinct_l1@3/overall": 5 / 9, "distinct_l1@3/cold": 1 / 2, "distinct_l1_count@3/overall": 5 / 3,
        "distinct_l1@1/overall": 1.0, "novelty@3/overall": 2.0, "novelty@1/cold": 1.5,
        "coverage@3/overall": 1.0, "coverage@3/cold": 0.75, "coverage@1/overall": 0.75, "coverage@1/cold": 0.5,
    }
    for key, value in want.items():
        assert out[key] == pytest.approx(value), key
    assert math.isnan(out["ild@1/overall"]) and math.isnan(out["coverage@3/new"])
    assert set(out) == {f"{m}@{k}/{s}" for m in ("ild", "distinct_l1", "distinct_l1_count", "novelty", "coverage")
                        for k in (1, 3) for s in ("overall", "cold", "new")}
