"""Edit knowledge for cold items (specs/genrecedit.md §2; decision 5).

Pipeline (paper Eq. 5–7 and the released ``prepare_edit_data.py``, cleaned as the spec recommends):

1. ``nearest_neighbours``: top-k warm items by cosine of text embeddings; a cold item is never its own
   neighbour (the released pool could contain it and retrieve itself at cos = 1).
2. ``pseudo_knowledge``: for every neighbour occurrence *as a target* of a training instance, the instance's
   history (the interactions right before the occurrence) becomes a pseudo history of the cold item.
   Histories are de-duplicated per cold item (the released script drew from duplicated candidates), empty
   histories are skipped, and ``histories_per_item`` of them are drawn uniformly without replacement with a
   seeded RNG (the released RNG was unseeded).
3. ``EditKnowledge.position_requests``: position-wise requests ⟨(history, SID prefix t_<p), t_p⟩, p = 0..L.

``true_history_knowledge`` builds the "Upper Bound" knowledge (§2.6) from the evaluation instances of the
cold items themselves; it is flagged ``leaks_eval=True`` because it uses test histories by design.

Histories are item arrays ``(n, N)`` int64, left-padded with -1 (most recent item last); targets ``(n,)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from genrec.hashing import splitmix64
from genrec.models.tiger import encode_histories
from genrec.tokenizers.sid import SemanticIdTable

KNOWLEDGE_SOURCES = ("pseudo", "upper_bound")
PSEUDO_POLICIES = ("script", "notebook")
NOTEBOOK_EXTRA = 3  # the notebook policy lengthens a history by at most 3 items (2 neighbours + the cold item)


def _check_history(history: np.ndarray, target: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    history = np.asarray(history, dtype=np.int64)
    target = np.asarray(target, dtype=np.int64)
    if history.ndim != 2:
        raise ValueError(f"{name}_history must be 2-D (n, N) left-padded with -1, got shape {history.shape}")
    if target.shape != (history.shape[0],):
        raise ValueError(f"{name}_target must have shape ({history.shape[0]},), got {target.shape}")
    return history, target


@torch.no_grad()
def nearest_neighbours(
    query_embeddings: np.ndarray | torch.Tensor,
    pool_embeddings: np.ndarray | torch.Tensor,
    k: int,
    query_items: np.ndarray | None = None,
    pool_items: np.ndarray | None = None,
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` pool rows by cosine similarity for each query, best first.

    With ``query_items``/``pool_items`` a pool row holding the query's own item is never returned.
    Returns ``(index (q, k) into the pool, -1 where fewer than k candidates exist; similarity (q, k))``.
    """
    q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(query_embeddings), dtype=torch.float32), dim=1)
    p = torch.nn.functional.normalize(torch.as_tensor(np.asarray(pool_embeddings), dtype=torch.float32), dim=1)
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"embedding widths differ: cold items {q.shape[1]}, warm pool {p.shape[1]}")
    n_q, n_p = q.shape[0], p.shape[0]
    kk = min(k, n_p)
    index = np.full((n_q, k), -1, dtype=np.int64)
    sims = np.full((n_q, k), -np.inf, dtype=np.float32)
    if kk == 0 or n_q == 0:
        return index, sims
    exclude = query_items is not None and pool_items is not None
    if exclude:
        pool_t = torch.as_tensor(np.asarray(pool_items, dtype=np.int64))
        query_t = torch.as_tensor(np.asarray(query_items, dtype=np.int64))
    for start in range(0, n_q, batch_size):
        s = q[start : start + batch_size] @ p.T
        if exclude:
            s = s.masked_fill(query_t[start : start + batch_size, None] == pool_t[None, :], float("-inf"))
        val, idx = torch.topk(s, kk, dim=1)
        valid = torch.isfinite(val)
        index[start : start + len(s), :kk] = torch.where(valid, idx, -1).numpy()
        sims[start : start + len(s), :kk] = val.numpy()
    return index, sims


@dataclass
class EditKnowledge:
    """Histories that should lead to cold items: row i says "after ``histories[i]`` comes ``items[i]``"."""

    items: np.ndarray  # (m,) cold item of each history
    histories: np.ndarray  # (m, N) int64, left-padded with -1
    source: str  # "pseudo" | "upper_bound"
    leaks_eval: bool  # True when built from evaluation instances (Upper Bound)
    cold_items: np.ndarray  # (c,) every cold item asked for, in the caller's order
    neighbours: np.ndarray | None = None  # (c, k) warm neighbour items (-1 = none), pseudo only
    source_rows: np.ndarray | None = None  # (m,) row of the train (pseudo) / eval (upper bound) arrays used
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.items = np.asarray(self.items, dtype=np.int64)
        self.histories = np.asarray(self.histories, dtype=np.int64)
        if self.source not in KNOWLEDGE_SOURCES:
            raise ValueError(f"source must be one of {KNOWLEDGE_SOURCES}, got {self.source!r}")
        if self.histories.ndim != 2 or self.histories.shape[0] != len(self.items):
            raise ValueError(f"histories must be (m, N) with m = {len(self.items)}, got {self.histories.shape}")

    def __len__(self) -> int:
        return len(self.items)

    def sid_tokens(self, sid_table: SemanticIdTable) -> np.ndarray:
        """(m, L+1) SID tokens of each history's cold item."""
        return sid_table.tokens_of(self.items)

    def position_requests(self, sid_table: SemanticIdTable, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Requests at SID position ``p``: decoder input ``[0, t_0..t_{p-1}]`` (m, p+1) and target ``t_p`` (m,).

        The encoder input of request i is ``histories[i]``; the "last subject token" is decoder step p.
        """
        tokens = self.sid_tokens(sid_table)
        if not 0 <= position < tokens.shape[1]:
            raise ValueError(f"position must lie in [0, {tokens.shape[1]}), got {position}")
        prefix = np.concatenate([np.zeros((len(tokens), 1), dtype=np.int64), tokens[:, :position]], axis=1)
        return prefix, tokens[:, position]

    def object_requests(self, sid_table: SemanticIdTable) -> tuple[np.ndarray, np.ndarray]:
        """"w/o position-wise" requests (spec §2.5): one per history, subject = the history alone (step 0),
        object = the whole SID. Returns the teacher-forcing decoder input (m, L+1) and the targets (m, L+1)."""
        tokens = self.sid_tokens(sid_table)
        prefix = np.concatenate([np.zeros((len(tokens), 1), dtype=np.int64), tokens[:, :-1]], axis=1)
        return prefix, tokens


def _priority(seed: int, cold_item: np.ndarray, hist_id: np.ndarray) -> np.ndarray:
    """Seeded pseudo-random priority of each (cold item, distinct history) pair.

    A hash rather than an RNG stream, so the draw does not depend on chunking or on the order of candidates.
    """
    h = splitmix64(np.full(cold_item.shape, seed, dtype=np.uint64))
    h = splitmix64(h ^ cold_item.astype(np.uint64))
    return splitmix64(h ^ hist_id.astype(np.uint64))


def _check_pseudo_inputs(cold_items, neighbours, train_history, train_target, histories_per_item: int, policy: str):
    if policy not in PSEUDO_POLICIES:
        raise ValueError(f"policy must be one of {PSEUDO_POLICIES}, got {policy!r}")
    cold_items = np.asarray(cold_items, dtype=np.int64)
    neighbours = np.asarray(neighbours, dtype=np.int64)
    train_history, train_target = _check_history(train_history, train_target, "train")
    if neighbours.ndim != 2 or neighbours.shape[0] != len(cold_items):
        raise ValueError(f"neighbours must be (c, k) with c = {len(cold_items)} cold items, got {neighbours.shape}")
    if histories_per_item < 1:
        raise ValueError(f"histories_per_item must be >= 1, got {histories_per_item}")
    if np.any(neighbours == cold_items[:, None]):
        raise ValueError("a cold item is listed as its own neighbour; build neighbours with nearest_neighbours")
    return cold_items, neighbours, train_history, train_target


class _TrainIndex(NamedTuple):
    """Inverted index target → training rows, and what the draw needs to know of every row."""

    hist_id: np.ndarray  # (n,) id of the row's distinct history
    n_hist: int  # number of distinct histories (≥ 1)
    lengths: np.ndarray  # (n,) real (non-padding) items of the history
    usable: np.ndarray  # (n,) bool: may serve as a pseudo history under the policy
    order: np.ndarray  # (n,) rows sorted by target (stable)
    sorted_targets: np.ndarray  # (n,) train_target[order]


def _train_index(train_history: np.ndarray, train_target: np.ndarray, policy: str) -> _TrainIndex:
    # Unique id per distinct history (row content) so duplicates from cumulative training rows collapse.
    _, hist_id = np.unique(train_history, axis=0, return_inverse=True)
    hist_id = hist_id.reshape(-1).astype(np.int64)
    n_hist = int(hist_id.max()) + 1 if len(hist_id) else 1
    lengths = (train_history >= 0).sum(axis=1)
    usable = lengths > 0 if policy == "script" else np.ones(len(lengths), dtype=bool)
    order = np.argsort(train_target, kind="stable")
    return _TrainIndex(hist_id, n_hist, lengths, usable, order, train_target[order])


def _occurrences(neighbours: np.ndarray, c0: int, index: _TrainIndex) -> tuple[np.ndarray, np.ndarray]:
    """Usable training rows whose target is a neighbour of cold items ``c0, c0 + 1, ..`` (``neighbours`` rows).

    Returns ``(rows, cold_idx)``: one entry per (cold item, neighbour, occurrence).
    """
    k = neighbours.shape[1]
    nb = neighbours.reshape(-1)
    lo = np.searchsorted(index.sorted_targets, nb, side="left")
    hi = np.searchsorted(index.sorted_targets, nb, side="right")
    counts = np.where(nb >= 0, hi - lo, 0)
    total = int(counts.sum())
    # Expand every (cold item, neighbour) pair into the training rows where the neighbour is the target.
    group_start = np.repeat(np.cumsum(counts) - counts, counts)
    rows = index.order[np.repeat(lo, counts) + (np.arange(total) - group_start)]
    cold_idx = np.repeat(np.repeat(np.arange(c0, c0 + len(nb) // max(k, 1)), k), counts)
    keep = index.usable[rows]
    return rows[keep], cold_idx[keep]


def _distinct_histories(rows: np.ndarray, cold_idx: np.ndarray, index: _TrainIndex):
    """First candidate of each distinct (cold item, history) pair."""
    _, first = np.unique(cold_idx * index.n_hist + index.hist_id[rows], return_index=True)
    return rows[first], cold_idx[first]


def _choose(rows, cold_idx, cold_items, index: _TrainIndex, histories_per_item: int, seed: int, policy: str,
            weights: np.ndarray | None = None):
    """The ``histories_per_item`` candidates of each cold item that sort first by seeded priority (a uniform
    draw without replacement, whatever the chunking or candidate order); longest first before that for the
    notebook policy. With ``weights`` (> 0 per candidate) the draw is weighted: Efraimidis–Spirakis keys
    −log(u)/w from the same hashed uniform u, smallest first."""
    prio = _priority(seed, cold_items[cold_idx], index.hist_id[rows])
    if weights is not None:
        u = (prio >> np.uint64(11)).astype(np.float64) * 2.0**-53 + 2.0**-54  # (0, 1), 53 random bits
        prio = -np.log(u) / weights
    # lexsort: last key first — per cold item, (longest first for the notebook policy), then priority.
    by = np.lexsort((prio, -index.lengths[rows], cold_idx) if policy == "notebook" else (prio, cold_idx))
    rows, cold_idx = rows[by], cold_idx[by]
    rank = np.arange(len(rows)) - np.searchsorted(cold_idx, cold_idx, side="left")
    chosen = rank < histories_per_item
    return rows[chosen], cold_idx[chosen]


def _candidate_weights(rows, cold_idx, neighbours, neighbour_weights, train_target) -> np.ndarray:
    """Per candidate: its neighbour's weight divided by that neighbour's number of candidates for the cold item."""
    nb = train_target[rows]
    slot = np.argmax(neighbours[cold_idx] == nb[:, None], axis=1)  # which of the k neighbours supplied the row
    w = neighbour_weights[cold_idx, slot]
    pair = cold_idx * neighbours.shape[1] + slot
    _, inverse, counts = np.unique(pair, return_inverse=True, return_counts=True)
    return w / counts[inverse.reshape(-1)]


def _pseudo_stats(
    n_cold: int, cold_idx: np.ndarray, n_candidates: int, n_unique: int, histories_per_item: int, seed: int, policy: str
) -> dict:
    per_item = np.bincount(cold_idx, minlength=n_cold)
    return {
        "num_cold_items": n_cold,
        "num_candidates": int(n_candidates),
        "num_unique_candidates": int(n_unique),
        "num_histories": len(cold_idx),
        "items_without_history": int((per_item == 0).sum()),
        "mean_histories_per_item": float(per_item.mean()) if len(per_item) else 0.0,
        "histories_per_item": int(histories_per_item),
        "seed": int(seed),
        "policy": policy,
    }


def pseudo_knowledge(
    cold_items: np.ndarray,
    neighbours: np.ndarray,
    train_history: np.ndarray,
    train_target: np.ndarray,
    histories_per_item: int = 10,
    seed: int = 0,
    chunk_size: int = 1024,
    policy: str = "script",
    neighbour_weights: np.ndarray | None = None,
) -> EditKnowledge:
    """Pseudo histories of each cold item from its neighbours' occurrences as training targets.

    ``neighbours`` (c, k) holds warm *item ids* (-1 = none) for ``cold_items`` (c,). Vectorised with an inverted
    index target → training rows (the released script looped over occurrences × cold items); cold items are
    processed ``chunk_size`` at a time so the candidate arrays stay bounded.

    ``policy="script"`` (released ``prepare_edit_data.py``, canonical): the history before a neighbour's occurrence
    (never empty); each cold item keeps ``histories_per_item`` distinct histories of lowest seeded priority, a
    uniform draw without replacement. ``policy="notebook"`` (the reference's exploratory notebook, spec §2.2):
    empty prefixes allowed, the longest distinct prefixes are kept (ties by seeded priority) and each is then
    perturbed by :func:`notebook_perturb`; histories are ``NOTEBOOK_EXTRA`` columns wider than ``train_history``.

    ``neighbour_weights`` (c, k), ≥ 0 (e.g. a softmax of the text similarities): each neighbour's expected share
    of a cold item's histories follows its weight instead of its number of occurrences (without weights a popular
    neighbour supplies most histories however far it is); the weight is spread evenly over that neighbour's
    distinct histories.
    """
    cold_items, neighbours, train_history, train_target = _check_pseudo_inputs(
        cold_items, neighbours, train_history, train_target, histories_per_item, policy
    )
    if neighbour_weights is not None:
        neighbour_weights = np.asarray(neighbour_weights, dtype=np.float64)
        if neighbour_weights.shape != neighbours.shape or not np.all(neighbour_weights >= 0):
            raise ValueError(f"neighbour_weights must be non-negative with the neighbours' shape {neighbours.shape}, "
                             f"got {neighbour_weights.shape}")
    index = _train_index(train_history, train_target, policy)
    out_rows, out_idx = [], []
    n_candidates = n_unique = 0
    for c0 in range(0, len(cold_items), chunk_size):
        rows, cold_idx = _occurrences(neighbours[c0 : c0 + chunk_size], c0, index)
        n_candidates += len(rows)
        rows, cold_idx = _distinct_histories(rows, cold_idx, index)
        n_unique += len(rows)
        weights = None if neighbour_weights is None else _candidate_weights(
            rows, cold_idx, neighbours, neighbour_weights, train_target)
        if weights is not None:
            keep = weights > 0
            rows, cold_idx, weights = rows[keep], cold_idx[keep], weights[keep]
        rows, cold_idx = _choose(rows, cold_idx, cold_items, index, histories_per_item, seed, policy, weights)
        out_rows.append(rows)
        out_idx.append(cold_idx)
    rows = np.concatenate(out_rows) if out_rows else np.zeros(0, dtype=np.int64)
    cold_idx = np.concatenate(out_idx) if out_idx else np.zeros(0, dtype=np.int64)

    stats = _pseudo_stats(len(cold_items), cold_idx, n_candidates, n_unique, histories_per_item, seed, policy)
    histories = train_history[rows]
    if policy == "notebook":
        histories = notebook_perturb(histories, train_target[rows], cold_items[cold_idx], seed)
    return EditKnowledge(
        items=cold_items[cold_idx],
        histories=histories,
        source="pseudo",
        leaks_eval=False,
        cold_items=cold_items,
        neighbours=neighbours,
        source_rows=rows,
        stats=stats,
    )


def notebook_perturb(histories: np.ndarray, neighbours: np.ndarray, cold_items: np.ndarray, seed: int) -> np.ndarray:
    """The notebook generator's edits of a prefix (spec §2.2, our reading of its order of operations).

    For each row: insert its neighbour twice at random positions, delete min(2, ⌊len/4⌋) random items, insert
    the cold item at a random position in the first half. Rows are (m, N) left-padded with -1; the result is
    (m, N + NOTEBOOK_EXTRA), left-padded. Seeded: the same inputs give the same histories.
    """
    rng = np.random.default_rng(seed)
    m, width = histories.shape
    out = np.full((m, width + NOTEBOOK_EXTRA), -1, dtype=np.int64)
    for i in range(m):
        seq = [int(x) for x in histories[i] if x >= 0]
        for _ in range(2):
            seq.insert(int(rng.integers(len(seq) + 1)), int(neighbours[i]))
        for _ in range(min(2, len(seq) // 4)):
            del seq[int(rng.integers(len(seq)))]
        seq.insert(int(rng.integers(len(seq) // 2 + 1)), int(cold_items[i]))
        out[i, out.shape[1] - len(seq) :] = seq
    return out


def true_history_knowledge(
    cold_items: np.ndarray,
    eval_history: np.ndarray,
    eval_target: np.ndarray,
    max_per_item: int | None = None,
    seed: int = 0,
) -> EditKnowledge:
    """"Upper Bound" knowledge: the evaluation instances whose target is a cold item (leaks by design).

    One request per instance (the released ``edit_requests_gt``); ``max_per_item`` optionally caps it with a
    seeded draw. Empty histories are skipped, as in the data pipeline.
    """
    cold_items = np.asarray(cold_items, dtype=np.int64)
    eval_history, eval_target = _check_history(eval_history, eval_target, "eval")
    rows = np.flatnonzero(np.isin(eval_target, cold_items) & (eval_history >= 0).any(axis=1))
    if max_per_item is not None:
        rng = np.random.default_rng(seed)
        by = np.lexsort((rng.random(len(rows)), eval_target[rows]))
        rows = rows[by]
        t = eval_target[rows]
        rank = np.arange(len(rows)) - np.searchsorted(t, t, side="left")
        rows = np.sort(rows[rank < max_per_item])
    items = eval_target[rows]
    covered = np.isin(cold_items, items)
    stats = {
        "num_cold_items": len(cold_items),
        "num_histories": len(rows),
        "items_without_history": int((~covered).sum()),
        "max_per_item": max_per_item,
        "seed": int(seed),
    }
    return EditKnowledge(
        items=items,
        histories=eval_history[rows],
        source="upper_bound",
        leaks_eval=True,
        cold_items=cold_items,
        source_rows=rows,
        stats=stats,
    )


class SidHistoryEncoder:
    """Default encoder input: ``genrec.models.tiger.encode_histories`` (TIGER's layout, no user token).

    ``max_items`` must equal the recommender's ``TigerConfig.max_history_items``. Callers whose recommender
    uses user tokens or another layout pass their own callable ``history (b, N) -> (input_ids, attention_mask)``.
    """

    def __init__(self, sid_table: SemanticIdTable, max_items: int = 20) -> None:
        self.sid_table = sid_table
        self.max_items = max_items

    def __call__(self, history: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_histories(history, self.sid_table, max_items=self.max_items)
