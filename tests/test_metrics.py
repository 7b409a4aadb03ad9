"""Ranking metrics: hand-computed values, de-duplication, subsets, IID-Ratio, DDP reduction."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genrec.metrics import RankingMetrics, dedup_ranked

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# Four items with 4-token SIDs; 10 and 11 share the 3-token prefix (1, 5, 9).
SIDS = {10: [1, 5, 9, 13], 11: [1, 5, 9, 14], 12: [2, 6, 10, 13], 13: [1, 6, 9, 13], 14: [3, 7, 11, 13]}
INV = 1 / math.log2(3)  # NDCG gain at rank 2
INV3 = 1 / math.log2(4)  # rank 3


def tok(rows):
    return torch.tensor([[SIDS[i] if i >= 0 else [0, 0, 0, 0] for i in row] for row in rows])


def batch():
    """Instance 0: target 10, ranked [11, 10, 12]; instance 1: target 11, ranked [12, 13, empty];
    instance 2: target 12, ranked [invalid SID, 12, 10]."""
    items = torch.tensor([[11, 10, 12], [12, 13, -1], [-1, 12, 10]])
    tokens = tok(items.tolist())
    tokens[2, 0] = torch.tensor([4, 8, 12, 16])  # a non-empty slot without item: invalid SID
    targets = torch.tensor([10, 11, 12])
    return items, tokens, targets, tok([targets.tolist()])[0]


def test_hand_computed_values():
    m = RankingMetrics(ks=(1, 2, 3), subsets=("overall", "cold"), sid_length=4)
    items, tokens, targets, ttok = batch()
    m.update(items, tokens, targets, ttok, {"cold": torch.tensor([False, True, True])})
    r = {k: float(v) for k, v in m.compute().items()}
    assert r["count/overall"] == 3 and r["count/cold"] == 2
    # exact item match: ranks 2, none, 2
    assert r["recall@1/overall"] == 0
    assert r["recall@2/overall"] == pytest.approx(2 / 3)
    assert r["ndcg@2/overall"] == pytest.approx(2 * INV / 3)
    assert r["ndcg@3/cold"] == pytest.approx(INV / 2)
    # prefix-3: instance 0 hits at rank 1 (item 11 shares (1,5,9)), instance 2 at rank 2
    assert r["recall_p3@1/overall"] == pytest.approx(1 / 3)
    assert r["ndcg_p3@3/overall"] == pytest.approx((1 + INV) / 3)
    # first-n tokens: instance 1 matches token 1 at rank 2 (item 13 starts with 1); n = 2 does not
    assert r["ndcg_first1@2/overall"] == pytest.approx((1 + INV + INV) / 3)
    assert r["ndcg_first2@3/overall"] == pytest.approx((1 + INV) / 3)
    assert r["ndcg_first4@3/overall"] == pytest.approx(r["ndcg@3/overall"])
    assert r["ndcg_first3@3/overall"] == pytest.approx(r["ndcg_p3@3/overall"])
    # invalid rate: 1 invalid out of 8 returned SIDs overall; cold: 1 of 5
    assert r["invalid_rate/overall"] == pytest.approx(1 / 8)
    assert r["invalid_rate/cold"] == pytest.approx(1 / 5)
    # IID-Ratio@K divides by K; T_overall = {10, 11, 12}, T_cold = {11, 12}
    assert r["iid_ratio@1/overall"] == pytest.approx((1 + 1 + 0) / 3)  # item 12 is instance 2's target
    assert r["iid_ratio@3/overall"] == pytest.approx((3 / 3 + 1 / 3 + 2 / 3) / 3)
    assert r["iid_ratio@3/cold"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    # prefix-3 membership: T_cold prefixes {(1,5,9), (2,6,10)} → instance 2's item 10 counts too
    assert r["iid_ratio_p3@3/cold"] == pytest.approx((1 / 3 + 2 / 3) / 2)


def test_deduplicates_ranked_list():
    items = torch.tensor([[12, 12, 10, 13]])
    tokens = tok(items.tolist())
    d_items, d_tokens = dedup_ranked(items, tokens)
    assert d_items.tolist() == [[12, 10, 13, -1]]
    assert d_tokens[0, 3].tolist() == [0, 0, 0, 0]
    m = RankingMetrics(ks=(2,), subsets=("overall",), sid_length=4)
    m.update(items, tokens, torch.tensor([10]), tok([[10]])[0], {})
    r = m.compute()
    assert float(r["ndcg@2/overall"]) == pytest.approx(INV)  # 10 moves up to rank 2
    assert float(r["iid_ratio@2/overall"]) == pytest.approx(1 / 2)


def test_short_lists_and_empty_subset():
    m = RankingMetrics(ks=(5,), subsets=("overall", "warm", "new"), sid_length=4)
    items = torch.tensor([[14, 10]])
    m.update(
        items,
        tok(items.tolist()),
        torch.tensor([10]),
        tok([[10]])[0],
        {"warm": torch.tensor([True]), "new": torch.tensor([False])},
    )
    r = m.compute()
    assert float(r["recall@5/warm"]) == 1.0 and float(r["ndcg@5/warm"]) == pytest.approx(INV)
    assert float(r["iid_ratio@5/warm"]) == pytest.approx(1 / 5)  # K in the denominator
    assert float(r["count/new"]) == 0 and math.isnan(float(r["recall@5/new"]))


def test_valid_mask_and_instance_ids():
    items, tokens, targets, ttok = batch()
    ref = RankingMetrics(ks=(1, 3), subsets=("overall",), sid_length=4)
    ref.update(items, tokens, targets, ttok, {})
    a = RankingMetrics(ks=(1, 3), subsets=("overall",), sid_length=4)
    # batch 1: instances 0, 1 and a padded row; batch 2: instance 2 and instance 0 again (sampler repeat)
    a.update(
        items[[0, 1, 0]],
        tokens[[0, 1, 0]],
        targets[[0, 1, 0]],
        ttok[[0, 1, 0]],
        {},
        valid=torch.tensor([True, True, False]),
        instance_ids=torch.tensor([0, 1, 0]),
    )
    a.update(
        items[[2, 0]], tokens[[2, 0]], targets[[2, 0]], ttok[[2, 0]], {}, instance_ids=torch.tensor([2, 0])
    )
    ra, rr = a.compute(), ref.compute()
    assert ra.keys() == rr.keys()
    for k in rr:
        assert float(ra[k]) == pytest.approx(float(rr[k]), nan_ok=True), k
    per = a.per_instance("overall")
    assert sorted(per["instance_id"].tolist()) == [0, 1, 2]
    assert per["recall@3"].sum().item() == 2


def test_input_errors():
    m = RankingMetrics(ks=(2,), subsets=("overall", "cold"), sid_length=4)
    items, tokens, targets, ttok = batch()
    with pytest.raises(ValueError, match="missing subset 'cold'"):
        m.update(items, tokens, targets, ttok, {})
    with pytest.raises(ValueError, match="unknown subsets"):
        m.update(
            items, tokens, targets, ttok, {"cold": torch.ones(3, dtype=torch.bool), "hot": torch.ones(3)}
        )
    with pytest.raises(ValueError, match="pred_tokens"):
        m.update(items, tokens[..., :3], targets, ttok, {"cold": torch.ones(3, dtype=torch.bool)})


# ------------------------------------------------------------------------------------------- DDP
def test_merge_state_matches_single_pass():
    """Rank-wise states merged (what the DDP gather does to 'cat' states) equal one pass."""
    items, tokens, targets, ttok = batch()
    parts = []
    for rows in ([0, 2], [1, 0]):
        m = RankingMetrics(ks=(1, 3), subsets=("overall",), sid_length=4)
        m.update(items[rows], tokens[rows], targets[rows], ttok[rows], {}, instance_ids=torch.tensor(rows))
        parts.append(m)
    parts[0].merge_state(parts[1])
    ref = RankingMetrics(ks=(1, 3), subsets=("overall",), sid_length=4)
    ref.update(items, tokens, targets, ttok, {})
    got, want = parts[0].compute(), ref.compute()
    for k in want:
        assert float(got[k]) == pytest.approx(float(want[k]), nan_ok=True), k


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        items, tokens, targets, ttok = batch()
        cold = torch.tensor([False, True, True])
        # DistributedSampler-like split of 3 instances over 2 ranks: rank 0 → [0, 2], rank 1 → [1, 0 (pad)]
        rows = [0, 2] if rank == 0 else [1, 0]
        m = RankingMetrics(ks=(1, 2, 3), subsets=("overall", "cold"), sid_length=4)
        m.update(
            items[rows],
            tokens[rows],
            targets[rows],
            ttok[rows],
            {"cold": cold[rows]},
            instance_ids=torch.tensor(rows),
        )
        res = {k: float(v) for k, v in m.compute().items()}
        if rank == 0:
            torch.save(res, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_count_each_instance_once(tmp_path):
    out_file = str(tmp_path / "res.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    got = torch.load(out_file)
    items, tokens, targets, ttok = batch()
    ref = RankingMetrics(ks=(1, 2, 3), subsets=("overall", "cold"), sid_length=4)
    ref.update(items, tokens, targets, ttok, {"cold": torch.tensor([False, True, True])})
    want = {k: float(v) for k, v in ref.compute().items()}
    assert got.keys() == want.keys()
    for k, value in want.items():
        assert got[k] == pytest.approx(value, nan_ok=True), k
    assert got["count/overall"] == 3
