"""MemGen analysis (specs/memgen.md §10.1–10.4): hand-made cases pinning each rule, and randomised checks of
the vectorised labellers against plain-Python references written with loops and sets."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from genrec.analysis import (
    FAR,
    LABELS,
    NO_LABEL,
    UNSEEN,
    EnsembleInputs,
    ItemRelations,
    PrefixRelations,
    adaptive_alpha,
    blend,
    candidates,
    evaluate_ensembles,
    hit_ndcg,
    label_instances,
    label_predictions,
    label_ratios,
    minmax,
    msp_bins,
    per_label_mean,
    prefix_ids,
    sasrec_msp,
    select_adaptive,
    select_fixed,
    target_rank,
    token_categories,
    token_distribution,
    token_labels,
)
from genrec.errors import DataError
from genrec.tokenizers.sid import SemanticIdTable

H = 4
WIDTH = 6


# ----------------------------------------------------------------------------------------- helpers
def instances(seqs: list[list[int]], width: int = WIDTH):
    """Leave-one-out training instances of item sequences: (history (n, width) left-padded, target (n,))."""
    hist, tgt = [], []
    for s in seqs:
        for i in range(1, len(s)):
            h = s[max(0, i - width) : i]
            hist.append([-1] * (width - len(h)) + h)
            tgt.append(s[i])
    return np.array(hist, dtype=np.int64).reshape(-1, width), np.array(tgt, dtype=np.int64)


def rel_of(seqs, num_items: int = 20, num_heavy: int = 2048) -> ItemRelations:
    return ItemRelations.from_instances(*instances(seqs), num_items, H, num_heavy=num_heavy)


def cases(*pairs):
    """(history, target) arrays from (history list, target) pairs."""
    hist = [[-1] * (WIDTH - len(h)) + list(h) for h, _ in pairs]
    return np.array(hist, dtype=np.int64).reshape(-1, WIDTH), np.array([t for _, t in pairs], dtype=np.int64)


def names(row) -> set[str]:
    return {n for n, x in zip(LABELS, row) if x}


def labels_of(rel, history, target) -> set[str]:
    return names(label_instances(rel, *cases((history, target)))[0])


def random_data(rng, num_items, n, width=WIDTH, skew=0.0):
    lens = rng.integers(0, width + 1, n)
    p = 1.0 / np.arange(1, num_items + 1) ** skew
    draw = lambda size: rng.choice(num_items, size=size, p=p / p.sum())
    hist = draw((n, width))
    hist[np.arange(width)[None, :] < (width - lens)[:, None]] = -1
    return hist, draw(n)


# ----------------------------------------------------------------------------------------- reference labellers
class ReferenceLabeller:
    """§10.2 written out with dicts of sets and the spec's loops (independent of the vectorised code)."""

    def __init__(self, train_history, train_target, max_hop=H):
        self.H = max_hop
        self.fwd = {h: defaultdict(set) for h in range(1, max_hop + 1)}
        self.bwd = {h: defaultdict(set) for h in range(1, max_hop + 1)}
        for hist, v in zip(train_history.tolist(), train_target.tolist()):
            for d in range(1, max_hop + 1):
                if d <= len(hist) and hist[-d] >= 0:
                    for h in range(d, max_hop + 1):
                        self.fwd[h][hist[-d]].add(v)
                        self.bwd[h][v].add(hist[-d])

    def judge(self, logic, u, v, h):
        F, B = self.fwd[h], self.bwd[h]
        if logic == "substitutability":
            return v in F[u]
        if logic == "symmetry":
            return u in F[v]
        if logic == "transitivity":
            return bool(F[u] & B[v])
        return bool(F[v] & B[u]) or bool(F[v] & F[u]) or bool(B[v] & B[u])

    def labels(self, history, v):
        seq = [x for x in history if x >= 0] + [v]
        if v < 0:
            return {"uncategorized"}
        if len(seq) < 2:
            return set()
        if v in self.fwd[1][seq[-2]]:
            return {"memorization"}
        out = set()
        for logic in ("substitutability", "symmetry", "transitivity", "second_symmetry"):
            for h in range(2 if logic == "substitutability" else 1, self.H + 1):
                if len(seq) - h - 1 < 0:
                    continue
                if any(self.judge(logic, seq[-d - 1], v, h) for d in range(1, h + 1)):
                    out.add(f"{logic}_{h}")
                    break
        out.add("generalization" if out else "uncategorized")
        return out


def reference_token_labels(train_history, train_target, prefix_of, test_history, test_target, max_hop=H):
    """§10.3 for one prefix map (dict item → prefix tuple): per case the hop, 0 (unseen) or -1 (no label)."""
    rules = {h: defaultdict(set) for h in range(1, max_hop + 1)}
    for hist, v in zip(train_history.tolist(), train_target.tolist()):
        for d in range(1, max_hop + 1):
            u = hist[-d]
            if u >= 0 and u in prefix_of and v in prefix_of:
                for h in range(d, max_hop + 1):
                    rules[h][prefix_of[u]].add(prefix_of[v])
    out = []
    for hist, v in zip(test_history.tolist(), test_target.tolist()):
        seq = [x for x in hist if x >= 0] + [v]
        if len(seq) < 2 or v not in prefix_of:
            out.append(-1)
            continue
        label = 0
        for h in range(1, max_hop + 1):
            found = False
            for d in range(1, h + 1):
                if len(seq) - d - 1 < 0:
                    continue
                u = seq[-d - 1]
                if u in prefix_of and prefix_of[v] in rules[h][prefix_of[u]]:
                    found = True
                    break
            if found:
                label = h
                break
        out.append(label)
    return np.array(out)


# ----------------------------------------------------------------------------------------- §10.1 relations
def test_relations_are_inclusive_with_the_smallest_distance():
    rel = rel_of([[0, 1, 2, 3, 4], [7, 8, 9, 7, 8]])
    assert rel.distance(0, 1) == 1 and rel.distance(0, 2) == 2 and rel.distance(0, 4) == 4
    assert rel.distance(4, 0) == FAR and rel.distance(0, 5) == FAR
    assert rel.distance(7, 8) == 1  # seen at distances 1 and 4: the smallest counts
    for h in range(1, H):
        assert rel.num_pairs(h) < rel.num_pairs(h + 1)  # R_1 ⊂ R_2 ⊂ ...
    assert rel.forward(0, 2).tolist() == [1, 2] and rel.forward(0, 4).tolist() == [1, 2, 3, 4]
    assert rel.backward(4, 1).tolist() == [3] and sorted(rel.backward(4, 4).tolist()) == [0, 1, 2, 3]


def test_relations_only_see_the_last_h_history_columns_and_stream_in_chunks():
    hist, tgt = instances([[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3]], width=6)
    whole = ItemRelations.from_instances(hist, tgt, 10)
    chunked = ItemRelations.from_chunks(((hist[i : i + 2], tgt[i : i + 2]) for i in range(0, len(tgt), 2)), 10)
    assert np.array_equal(whole.keys, chunked.keys) and np.array_equal(whole.dist, chunked.dist)
    assert whole.distance(0, 5) == FAR and whole.distance(1, 5) == 4  # distance 5 > H is no pair


def test_relations_reject_item_ids_outside_the_catalogue():
    with pytest.raises(DataError):
        ItemRelations.from_instances(np.array([[0, 12]]), np.array([1]), num_items=10)


def test_meet_is_the_exact_bounded_minimax_for_every_heavy_split():
    rng = np.random.default_rng(0)
    hist, tgt = random_data(rng, 25, 150, skew=1.0)
    ref = ReferenceLabeller(hist, tgt)
    p, q = rng.integers(0, 25, 400), rng.integers(0, 25, 400)
    bound = rng.integers(0, H + 1, 400)
    sets = {"fwd": ref.fwd, "bwd": ref.bwd}
    for num_heavy in (0, 3, 25):
        rel = ItemRelations.from_instances(hist, tgt, 25, num_heavy=num_heavy)
        for sp, sq in (("fwd", "bwd"), ("fwd", "fwd"), ("bwd", "bwd"), ("bwd", "fwd")):
            got = rel.meet(sp, p, sq, q, bound)
            want = [
                next((h for h in range(1, b + 1) if sets[sp][h][a] & sets[sq][h][c]), FAR)
                for a, c, b in zip(p.tolist(), q.tolist(), bound.tolist())
            ]
            assert got.tolist() == want, (num_heavy, sp, sq)


# ----------------------------------------------------------------------------------------- §10.2 labels
def test_memorization_stops_every_other_label():
    rel = rel_of([[0, 1], [1, 0], [0, 2], [2, 1]])  # symmetry and transitivity would also hold
    assert labels_of(rel, [0], 1) == {"memorization"}
    assert labels_of(rel, [5, 0], 1) == {"memorization"}


def test_substitutability_starts_at_hop_2_and_needs_a_long_enough_history():
    rel = rel_of([[0, 5, 1]])  # D(0, 1) = 2
    assert labels_of(rel, [9, 0], 1) >= {"substitutability_2", "generalization"}
    assert not any(n.startswith("substitutability") for n in labels_of(rel, [0], 1))  # n = 1 < h = 2


def test_each_logic_takes_its_smallest_hop():
    rel = rel_of([[1, 0], [1, 5, 3]])  # D(1, 0) = 1, D(1, 3) = 2: symmetry witnesses at hops 1 and 2
    got = labels_of(rel, [3, 0], 1)
    assert "symmetry_1" in got and not {"symmetry_2", "symmetry_3", "symmetry_4"} & got


def test_witnesses_range_over_d_up_to_h():
    rel = rel_of([[1, 7]])  # D(1, 7) = 1 but 7 is u_3: the witness only counts from h = 3
    assert {n for n in labels_of(rel, [7, 8, 9], 1) if n.startswith("symmetry")} == {"symmetry_3"}


def test_a_hop_is_skipped_when_the_history_is_shorter():
    rel = rel_of([[1, 5, 0]])  # D(1, 0) = 2: symmetry at h = 2 needs n ≥ 2 (smaller d are not enough)
    assert "symmetry_2" in labels_of(rel, [9, 0], 1)
    assert not any(n.startswith("symmetry") for n in labels_of(rel, [0], 1))


@pytest.mark.parametrize(
    "train",
    [
        [[1, 2], [2, 0]],  # (v, x) and (x, u)
        [[1, 2], [0, 2]],  # (v, x) and (u, x)
        [[2, 1], [2, 0]],  # (x, v) and (x, u)
    ],
)
def test_each_second_symmetry_form_alone(train):
    assert labels_of(rel_of(train), [0], 1) == {"second_symmetry_1", "generalization"}


def test_transitivity_with_its_hop():
    assert labels_of(rel_of([[0, 2], [2, 1]]), [0], 1) == {"transitivity_1", "generalization"}
    rel = rel_of([[0, 9, 2], [2, 1]])  # (0, 2) only in R_2
    assert "transitivity_2" in labels_of(rel, [8, 0], 1)
    assert labels_of(rel, [0], 1) == {"uncategorized"}


def test_cases_without_history_and_invalid_predictions():
    rel = rel_of([[0, 1]])
    hist, tgt = cases(([], 1), ([0], -1), ([0], 15), ([0], 1))
    got = [names(r) for r in label_instances(rel, hist, tgt)]
    assert got == [set(), {"uncategorized"}, {"uncategorized"}, {"memorization"}]
    preds = label_predictions(rel, cases(([0], 1))[0], np.array([[1, -1, 3]]))  # (m, K, labels)
    assert preds.shape == (1, 3, len(LABELS))
    assert [names(r) for r in preds[0]] == [{"memorization"}, {"uncategorized"}, {"uncategorized"}]


def test_label_ratios_and_per_label_means():
    rel = rel_of([[0, 1]])
    labels = label_instances(rel, *cases(([0], 1), ([0], 2), ([], 1), ([3], 1)))
    ratios = label_ratios(labels)
    assert list(ratios) == list(LABELS)
    assert ratios["memorization"] == 0.25 and ratios["uncategorized"] == 0.5
    means = per_label_mean(labels, np.array([1.0, 0.0, 0.5, 0.2]))
    assert means["memorization"] == 1.0 and means["uncategorized"] == pytest.approx(0.1)
    assert math.isnan(means["symmetry_1"])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("skew", [0.0, 1.2])
def test_vectorised_labels_equal_the_reference(seed, skew):
    rng = np.random.default_rng(seed)
    num_items = 30 + 10 * seed
    train_h, train_t = random_data(rng, num_items, 150, skew=skew)
    test_h, test_t = random_data(rng, num_items, 300, skew=skew)
    test_t[:5] = -1  # invalid predictions
    ref = ReferenceLabeller(train_h, train_t)
    want = np.array([[n in ref.labels(h, v) for n in LABELS] for h, v in zip(test_h.tolist(), test_t.tolist())])
    for num_heavy in (0, 4, num_items):
        rel = ItemRelations.from_instances(train_h, train_t, num_items, num_heavy=num_heavy)
        got = label_instances(rel, test_h, test_t, batch_size=128)
        assert np.array_equal(got, want), (num_heavy, np.flatnonzero((got != want).any(1))[:5])


def test_labels_do_not_depend_on_the_batch_sizes(monkeypatch):
    from genrec.analysis import relations

    rng = np.random.default_rng(7)
    train_h, train_t = random_data(rng, 40, 200, skew=1.0)
    test_h, test_t = random_data(rng, 40, 300, skew=1.0)
    rel = ItemRelations.from_instances(train_h, train_t, 40, num_heavy=5)
    want = label_instances(rel, test_h, test_t)
    # tiny light-part batches (a marked item's pairs split across batches) and heavy-part chunks
    monkeypatch.setattr(relations, "_EXPAND_CHUNK", 7)
    monkeypatch.setattr(relations, "_MARK_BYTES", 80)  # two table rows of 40 items
    monkeypatch.setattr(relations, "_BITS_CHUNK", 5)
    assert np.array_equal(label_instances(rel, test_h, test_t, batch_size=37), want)


def test_sorted_lookup_helpers():
    from genrec.analysis.relations import argsort_int, lookup

    rng = np.random.default_rng(0)
    for top in (50, 2**61):  # index packed below the value, or the argsort fallback
        x = rng.integers(0, top, 500)
        x[:100] = x[100:200]  # ties keep their order
        assert np.array_equal(argsort_int(x), np.argsort(x, kind="stable"))
    keys = np.array([2, 5, 9])
    assert lookup(keys, np.array([20, 50, 90]), np.array([[9, 1], [5, 10]]), -1).tolist() == [[90, -1], [50, -1]]


# ----------------------------------------------------------------------------------------- §10.3 tokens
def sid_table(codes: dict[int, tuple[int, int, int]]) -> SemanticIdTable:
    items = np.array(sorted(codes), dtype=np.int64)
    return SemanticIdTable.from_codes(items, np.array([codes[i] for i in items]), codebook_size=4, suffix_size=8)


def test_prefix_ids_group_items_by_their_first_n_tokens():
    sid = sid_table({0: (0, 1, 2), 1: (0, 1, 3), 2: (0, 2, 2), 3: (1, 1, 2)})
    pid = prefix_ids(sid, num_items=5)  # item 4 has no SID
    assert pid.shape == (4, 5)
    assert pid[0, 0] == pid[0, 1] == pid[0, 2] != pid[0, 3] and pid[0, 4] == -1
    assert pid[1, 0] == pid[1, 1] != pid[1, 2]
    assert len(set(pid[3, :4].tolist())) == 4  # full SIDs (with suffix) are unique


def test_token_labels_skip_short_distances_not_hops_and_take_the_largest_n():
    # 0 → 1 seen at distance 3; 2 shares 1's first two tokens only; 4 has no SID
    sid = sid_table({0: (0, 0, 0), 1: (1, 1, 1), 2: (1, 1, 2), 3: (2, 0, 0), 5: (3, 3, 3)})
    rel = rel_of([[0, 5, 5, 1]], num_items=6)
    prel = PrefixRelations.from_relations(rel, sid)
    hist, tgt = cases(([0], 1), ([0], 2), ([0, 4], 1), ([0], 4), ([], 1), ([3], 1))
    hops = token_labels(prel, hist, tgt)  # (m, L+1)
    assert hops[0].tolist() == [3, 3, 3, 3]  # n_hist = 1 < h = 3, yet memorization_3 (d = 1 kept)
    assert hops[1].tolist() == [3, 3, UNSEEN, UNSEEN]  # item 2 matches item 1 on two tokens
    assert hops[2].tolist() == [3, 3, 3, 3]  # u_1 = 4 has no SID and is skipped; u_2 = 0 gives max(2, 3)
    assert hops[3].tolist() == [NO_LABEL] * 4 and hops[4].tolist() == [NO_LABEL] * 4
    assert hops[5].tolist() == [UNSEEN] * 4
    assert token_categories(hops).tolist() == [4, 2, 4, NO_LABEL, NO_LABEL, UNSEEN]
    # item level, the same case has no substitutability: there hop 3 needs n ≥ 3
    assert not any(n.startswith("substitutability") for n in labels_of(rel, [0], 1))


def test_token_categories_use_the_largest_n_even_with_different_hops():
    hops = np.array([[1, 3, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 4]], dtype=np.int8)
    assert token_categories(hops).tolist() == [2, 1, UNSEEN, 4]


def test_token_distribution_counts_item_generalization_cases_only():
    labels = np.zeros((4, len(LABELS)), dtype=bool)
    col = {n: j for j, n in enumerate(LABELS)}
    labels[0, [col["memorization"]]] = True
    labels[1, [col["generalization"], col["symmetry_2"], col["transitivity_1"]]] = True
    labels[2, [col["uncategorized"]]] = True  # row 3: no label at all
    dist = token_distribution(labels, np.array([4, 2, 0, 1], dtype=np.int8), num_lengths=4)
    assert dist["overall"]["count"] == 2 and dist["overall"]["2-gram"] == 0.5 and dist["overall"]["unseen"] == 0.5
    assert dist["symmetry"] == dist["symmetry_2"] == dist["transitivity"] and dist["symmetry"]["2-gram"] == 1.0
    assert dist["uncategorized"]["unseen"] == 1.0 and dist["second_symmetry"]["count"] == 0


@pytest.mark.parametrize("seed", range(3))
def test_token_labels_equal_the_reference(seed):
    rng = np.random.default_rng(seed)
    num_items = 40
    with_sid = rng.permutation(num_items)[:34]  # a few items without SID
    codes = {int(i): tuple(int(c) for c in rng.integers(0, 3, 3)) for i in with_sid}
    sid = SemanticIdTable.from_codes(np.array(list(codes)), np.array(list(codes.values())), 3, 40)
    train_h, train_t = random_data(rng, num_items, 120, skew=0.8)
    test_h, test_t = random_data(rng, num_items, 300, skew=0.8)
    rel = ItemRelations.from_instances(train_h, train_t, num_items)
    got = token_labels(PrefixRelations.from_relations(rel, sid), test_h, test_t)
    full = dict(zip(sid.items.tolist(), map(tuple, sid.full_codes().tolist())))
    for n in range(1, 5):
        prefix_of = {i: c[:n] for i, c in full.items()}
        want = reference_token_labels(train_h, train_t, prefix_of, test_h, test_t)
        assert np.array_equal(got[:, n - 1], want), n


# ----------------------------------------------------------------------------------------- §10.4 ensemble
def reference_blend(sas_items, sas_scores, tig_items, tig_scores, alpha):
    """The reference's dict-based blend for one case (lists without -1 and without repeats)."""
    def scale(x):
        x = np.asarray(x, float)
        return np.ones_like(x) if x.max() <= x.min() else (x - x.min()) / (x.max() - x.min())

    score = {}
    for it, s in zip(sas_items, scale(sas_scores)):
        score[it] = [s, 0.0]
    for it, t in zip(tig_items, scale(tig_scores)):
        score.setdefault(it, [0.0, 0.0])[1] = t
    fused = [(it, alpha * s + (1 - alpha) * t) for it, (s, t) in score.items()]
    return [it for it, _ in sorted(fused, key=lambda x: x[1], reverse=True)]


def test_minmax_constant_list_and_invalid_entries():
    out = minmax(np.array([[3.0, 3.0, 7.0], [1.0, 2.0, 3.0]]), np.array([[True, True, False], [True, True, True]]))
    assert out.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.5, 1.0]]


def test_blend_scores_missing_items_zero_and_keeps_insertion_order_on_ties():
    c = candidates([[10, 11]], [[2.0, 1.0]], [[11, 12]], [[-1.0, -2.0]])
    assert blend(c, 0.5)[0, :3].tolist() == [10, 11, 12]  # s = 0.5, 0.5, 0: SASRec order on the tie
    c = candidates([[10, -1]], [[5.0, 0.0]], [[-1, 12]], [[0.0, 3.0]])  # -1 entries are ignored
    assert blend(c, 0.5)[0].tolist()[:2] == [10, 12] and set(blend(c, 0.5)[0, 2:].tolist()) == {-1}
    assert blend(c, 0.0)[0, :2].tolist() == [12, 10]  # α = 0: TIGER only; item 10 scores 0 there


@pytest.mark.parametrize("seed", range(3))
def test_blend_and_target_rank_equal_the_reference(seed):
    rng = np.random.default_rng(seed)
    m, n = 200, 6
    sas = np.stack([rng.choice(15, n, replace=False) for _ in range(m)])
    tig = np.stack([rng.choice(15, n, replace=False) for _ in range(m)])
    sas_s, tig_s = rng.integers(0, 3, (m, n)).astype(float), rng.normal(size=(m, n)).round(1)
    target = rng.integers(0, 15, m)
    c = candidates(sas, sas_s, tig, tig_s)
    for alpha in (0.0, 0.3, 1.0, rng.random(m)):
        ranked = blend(c, alpha)
        a = np.broadcast_to(alpha, (m,))
        for i in range(m):
            want = reference_blend(sas[i].tolist(), sas_s[i], tig[i].tolist(), tig_s[i], float(a[i]))
            assert ranked[i, : len(want)].tolist() == want
        ranks = target_rank(c, alpha, target)
        pos = [r.tolist().index(t) if t in r else np.inf for r, t in zip(ranked, target)]
        assert np.array_equal(ranks, pos)


def test_hit_and_ndcg_of_ranked_lists():
    hit, ndcg = hit_ndcg(np.array([[5, 6, 7], [6, 5, 7], [1, 2, 3], [-1, 4, 5]]), np.array([5, 5, 5, 5]), k=2)
    assert hit.tolist() == [1, 1, 0, 0] and ndcg.tolist() == [1.0, 1 / math.log2(3), 0.0, 0.0]


def test_grid_selection_keeps_the_first_best():
    # identical lists: every α and (k, τ) ties, so the first grid point wins
    c = candidates([[1, 2]], [[2.0, 1.0]], [[1, 2]], [[0.0, -1.0]])
    assert select_fixed(c, np.array([2]))[0] == 0.0
    assert select_adaptive(c, np.array([0.9]), np.array([2]))[:2] == (1.0, 0.0)
    # s(7) = α, s(8) = 1 − α: the target 7 is first for α ≥ 0.5 (at 0.5 by the SASRec-first tie order)
    c = candidates([[7, 8]], [[2.0, 1.0]], [[8, 7]], [[0.0, -1.0]])
    alpha, score = select_fixed(c, np.array([7]))
    assert alpha == 0.5 and score == 1.0


def test_adaptive_alpha_and_missing_msp():
    a = adaptive_alpha(np.array([0.5, np.nan, 1.0]), 10.0, 0.5)
    assert a[0] == a[1] == 0.5 and a[2] == pytest.approx(1 / (1 + math.exp(-5)))


def test_sasrec_msp_from_logits_or_precomputed():
    logits = np.array([[0.0, 0.0], [0.0, math.log(3.0)]])
    assert sasrec_msp(logits) == pytest.approx([0.5, 0.75])
    assert sasrec_msp(np.array([0.2, 0.4])).tolist() == [0.2, 0.4]


def test_msp_bins_are_rank_based_quantiles():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    msp = rng.integers(0, 4, 37) / 4.0  # many ties: ranks break them by order
    memo = rng.random(37) < msp
    out = msp_bins(msp, memo, rng.random(37), rng.random(37))
    want = pd.qcut(pd.Series(msp).rank(method="first"), q=5, labels=False).to_numpy()
    assert np.array_equal(out["bin"], want)
    assert out["count"].sum() == 37
    assert out["memorization_ratio"] == pytest.approx([memo[want == b].mean() for b in range(5)])
    assert out["msp_mean"] == pytest.approx([msp[want == b].mean() for b in range(5)])


def test_evaluate_ensembles_reports_every_model():
    rng = np.random.default_rng(0)

    def split(m=50):
        target = rng.integers(0, 20, m)
        sas = np.stack([rng.choice(20, 10, replace=False) for _ in range(m)])
        tig = np.stack([rng.choice(20, 10, replace=False) for _ in range(m)])
        return EnsembleInputs(sas, np.sort(rng.random((m, 10)))[:, ::-1], tig,
                              np.sort(rng.normal(size=(m, 10)))[:, ::-1], rng.random(m), target)

    out = evaluate_ensembles(split(), split())
    assert {"sasrec/test/ndcg@10", "tiger/test/recall@10", "fixed/alpha", "adaptive/k", "adaptive/tau",
            "adaptive/test/ndcg@10"} <= set(out)
    assert all(0.0 <= v <= 25.0 for v in out.values())
