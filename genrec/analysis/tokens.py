"""Prefix n-gram token memorization (specs/memgen.md §10.3).

π_n(item) = the item's first n SID tokens (n = 1..L+1; n = L+1 is the full SID with the collision token),
mapped to a dense prefix id; items without a SID have none. R^n_h is the image of R_h under π_n, so its
minimal distance is D^n(a, b) = min{D(u, v) : π_n(u) = a, π_n(v) = b}, built from the item relations.

Case label for length n: the smallest h in 1..H with a d ≤ h, d ≤ n_hist (shorter histories skip d, not the
hop) and (π_n(u_d), π_n(v)) ∈ R^n_h, i.e. ``hop = min_d max(d, D^n_d)`` labelled iff ≤ H; else "unseen".
Token category of a case = the largest n whose label is not unseen ("{n}-gram"), else "unseen".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genrec.analysis.labels import LOGICS, label_names
from genrec.analysis.relations import FAR, ItemRelations, lookup, unique_max
from genrec.tokenizers.sid import SemanticIdTable

UNSEEN = 0  # token label / category "unseen"
NO_LABEL = -1  # no history item, or a target without a SID (the reference crashes there)


@dataclass
class PrefixRelations:
    """R^n_1..R^n_H for every prefix length n (index n-1)."""

    max_hop: int
    prefix_id: np.ndarray  # (L+1, num_items) int64 dense id of π_n(item); -1 without a SID
    keys: list  # per n: (P_n,) int64 sorted a * num_prefixes_n + b
    dist: list  # per n: (P_n,) int8 D^n(a, b)
    num_prefixes: list  # per n

    @classmethod
    def from_relations(cls, rel: ItemRelations, sid: SemanticIdTable) -> PrefixRelations:
        prefix_id = prefix_ids(sid, rel.num_items)
        u, v = rel.keys // rel.num_items, rel.keys % rel.num_items
        keys, dists, sizes = [], [], []
        for pid in prefix_id:
            size = int(pid.max()) + 1 if len(pid) else 0
            a, b = pid[u], pid[v]
            ok = (a >= 0) & (b >= 0)
            # min distance per prefix pair: unique_max keeps the largest value, so store H+1-d
            k, flipped = unique_max(a[ok] * size + b[ok], rel.max_hop + 1 - rel.dist[ok].astype(np.int64))
            keys.append(k)
            dists.append((rel.max_hop + 1 - flipped).astype(np.int8))
            sizes.append(size)
        return cls(rel.max_hop, prefix_id, keys, dists, sizes)

    @property
    def num_lengths(self) -> int:
        return len(self.prefix_id)

    def distance(self, n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """D^n(π_n(u), π_n(v)) of item arrays (FAR where either item lacks a SID or the pair is unseen)."""
        pid = self.prefix_id[n - 1]
        a, b = _take(pid, u), _take(pid, v)
        key = np.where((a >= 0) & (b >= 0), a * self.num_prefixes[n - 1] + b, -1)
        return lookup(self.keys[n - 1], self.dist[n - 1], key, FAR)


def prefix_ids(sid: SemanticIdTable, num_items: int) -> np.ndarray:
    """(L+1, num_items) int64: dense id of each item's first-n-token prefix, -1 for items without a SID."""
    full = sid.full_codes()  # (n_sid, L+1)
    out = np.full((full.shape[1], num_items), -1, dtype=np.int64)
    inside = sid.items < num_items
    for n in range(1, full.shape[1] + 1):
        _, inverse = np.unique(full[inside, :n], axis=0, return_inverse=True)
        out[n - 1, sid.items[inside]] = inverse.reshape(-1)
    return out


def token_labels(prel: PrefixRelations, history: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(m, L+1) int8: per prefix length n, the hop h of "memorization_h", UNSEEN (0) or NO_LABEL (-1).

    NO_LABEL: no history item, or the target has no SID.
    """
    H = prel.max_hop
    u = np.asarray(history)[:, ::-1][:, :H].astype(np.int64)  # (m, ≤H) column d-1 = u_d
    v = np.asarray(target).astype(np.int64)
    n_hist = np.cumprod(u >= 0, axis=1).sum(axis=1)
    d = np.arange(1, u.shape[1] + 1)
    out = np.empty((len(v), prel.num_lengths), dtype=np.int8)
    for n in range(1, prel.num_lengths + 1):
        val = prel.distance(n, u, v[:, None]).astype(np.int64)  # (m, ≤H)
        score = np.where(d[None, :] <= n_hist[:, None], np.maximum(val, d[None, :]), FAR)
        hop = score.min(axis=1) if u.shape[1] else np.full(len(v), FAR)
        hop = np.where(hop <= H, hop, UNSEEN)
        has_target = _take(prel.prefix_id[n - 1], v) >= 0
        out[:, n - 1] = np.where((n_hist >= 1) & has_target, hop, NO_LABEL)
    return out


def token_categories(token_hops: np.ndarray) -> np.ndarray:
    """(m,) int8: the largest n with a memorization label (the "{n}-gram" category), UNSEEN, or NO_LABEL."""
    n = np.arange(1, token_hops.shape[1] + 1)
    largest = np.where(token_hops > 0, n[None, :], 0).max(axis=1, initial=0)
    return np.where((token_hops == NO_LABEL).all(axis=1), NO_LABEL, largest).astype(np.int8)


def category_names(num_lengths: int) -> tuple[str, ...]:
    """Column names of :func:`token_distribution`: "unseen", "1-gram", ..., "{L+1}-gram"."""
    return ("unseen", *(f"{n}-gram" for n in range(1, num_lengths + 1)))


def token_distribution(item_labels: np.ndarray, categories: np.ndarray, num_lengths: int,
                       max_hop: int = 4) -> dict[str, dict[str, float]]:
    """Token categories of the item-level generalization cases (§10.3 support coverage).

    Cases: those with an item label and without "memorization" (so: generalization or uncategorized) and
    with a token category. Rows: "overall", each logic (any hop), each item label; values: the share of
    the row's cases per category of :func:`category_names`, plus "count".
    """
    names = label_names(max_hop)
    col = {name: j for j, name in enumerate(names)}
    cases = item_labels.any(axis=1) & ~item_labels[:, col["memorization"]] & (categories >= 0)
    rows = {"overall": cases}
    for logic in LOGICS:
        rows[logic] = cases & item_labels[:, [j for nm, j in col.items() if nm.startswith(logic + "_")]].any(1)
    for name in names[2:]:
        rows[name] = cases & item_labels[:, col[name]]
    out = {}
    for row, sel in rows.items():
        counts = np.bincount(categories[sel].astype(np.int64), minlength=num_lengths + 1)
        total = max(int(sel.sum()), 1)
        out[row] = {c: float(counts[i] / total) for i, c in enumerate(category_names(num_lengths))}
        out[row]["count"] = float(sel.sum())
    return out


def _take(table: np.ndarray, items: np.ndarray) -> np.ndarray:
    """table[items] with -1 for items outside 0..len(table)-1."""
    items = np.asarray(items, dtype=np.int64)
    ok = (items >= 0) & (items < len(table))
    return np.where(ok, table[np.where(ok, items, 0)], -1)
