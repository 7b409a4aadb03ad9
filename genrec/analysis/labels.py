"""Memorization / generalization labels of test cases (specs/memgen.md §10.2).

A case is (history u_1..u_n, target v), u_1 the most recent item. With val_d the witness value of history
item u_d for one logic (the smallest h with J(u_d, v, h)), the spec's loop — "smallest h in h_min..H with
n ≥ h and a witness d ≤ h" — has the closed form

    hop = max(h_min, min_{d ≤ min(n, H)} max(d, val_d)),   labelled iff hop ≤ min(n, H),

because hop h has a witness iff some d ≤ h has val_d ≤ h. For the compositions val_d is
:meth:`ItemRelations.meet`, computed d by d with the bound ``current hop − 1`` (larger values cannot
change the label), which keeps the 2-hop work small.
"""

from __future__ import annotations

import numpy as np

from genrec.analysis.relations import FAR, ItemRelations

LOGICS = ("substitutability", "symmetry", "transitivity", "second_symmetry")


def label_names(max_hop: int = 4) -> tuple[str, ...]:
    """Column order of §10.2: memorization, generalization, <logic>_<h> (no substitutability_1), uncategorized."""
    hops = [f"{logic}_{h}" for logic in LOGICS for h in range(1, max_hop + 1) if (logic, h) != (LOGICS[0], 1)]
    return ("memorization", "generalization", *hops, "uncategorized")


LABELS = label_names(4)


def label_instances(rel: ItemRelations, history: np.ndarray, target: np.ndarray,
                    batch_size: int = 1 << 20) -> np.ndarray:
    """(m, len(label_names(H))) bool labels of the cases (history (m, N) left-padded with -1, target (m,)).

    Cases without a history item get no label; a target of -1 (an invalid prediction) gets "uncategorized"
    only. Rows are processed in batches of ``batch_size`` (memory), with identical results.
    """
    history, target = np.asarray(history), np.asarray(target)
    if history.ndim != 2 or target.shape != (history.shape[0],):
        raise ValueError(f"history must be (m, N) and target (m,), got {history.shape} and {target.shape}")
    out = np.zeros((len(target), len(label_names(rel.max_hop))), dtype=bool)
    for lo in range(0, len(target), batch_size):
        out[lo : lo + batch_size] = _label_batch(rel, history[lo : lo + batch_size], target[lo : lo + batch_size])
    return out


def label_predictions(rel: ItemRelations, history: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """(m, K, labels) bool: each prediction p labelled as the case (history ∥ p); -1 → uncategorized only."""
    m, k = predictions.shape
    recent = np.asarray(history)[:, -rel.max_hop :]  # only the last H items matter; keeps the repeat small
    labels = label_instances(rel, np.repeat(recent, k, axis=0), np.asarray(predictions).reshape(-1))
    return labels.reshape(m, k, -1)


def label_ratios(labels: np.ndarray, max_hop: int = 4) -> dict[str, float]:
    """ratio(label) = #cases with the label / #cases (§10.2 statistics)."""
    n = max(len(labels), 1)
    return {name: float(labels[:, j].sum() / n) for j, name in enumerate(label_names(max_hop))}


def per_label_mean(labels: np.ndarray, values: np.ndarray, max_hop: int = 4) -> dict[str, float]:
    """Mean of a per-case metric (e.g. NDCG@10) over the cases carrying each label (NaN if none)."""
    values = np.asarray(values, dtype=np.float64)
    out = {}
    for j, name in enumerate(label_names(max_hop)):
        sel = labels[:, j]
        out[name] = float(values[sel].mean()) if sel.any() else float("nan")
    return out


# ----------------------------------------------------------------------------------------- internals
def _label_batch(rel: ItemRelations, history: np.ndarray, target: np.ndarray) -> np.ndarray:
    H = rel.max_hop
    names = label_names(H)
    u = history[:, ::-1][:, :H].astype(np.int64)  # (m, ≤H) column d-1 = u_d
    if u.shape[1] < H:
        u = np.concatenate([u, np.full((len(u), H - u.shape[1]), -1, np.int64)], axis=1)
    v = target.astype(np.int64)
    n_hist = np.cumprod(u >= 0, axis=1).sum(axis=1)  # (m,) leading valid items = min(n, H)
    valid = (v >= 0) & (n_hist >= 1)
    out = np.zeros((len(v), len(names)), dtype=bool)

    mem = np.zeros(len(v), dtype=bool)
    mem[valid] = rel.distance(u[valid, 0], v[valid]) == 1
    out[:, names.index("memorization")] = mem
    rows = np.flatnonzero(valid & ~mem)  # the generalization candidates
    u, v, n_hist = u[rows], v[rows], n_hist[rows]
    hops = {
        "substitutability": _hop_direct(rel.distance(u, v[:, None]), n_hist, h_min=2),
        "symmetry": _hop_direct(rel.distance(v[:, None], u), n_hist, h_min=1),
        "transitivity": _hop_composed(lambda p, q, b: rel.meet("fwd", p, "bwd", q, b), u, v, n_hist, H),
        "second_symmetry": _hop_composed(lambda p, q, b: _second_symmetry(rel, p, q, b), u, v, n_hist, H),
    }
    any_logic = np.zeros(len(rows), dtype=bool)
    for logic, hop in hops.items():
        for h in range(1, H + 1):
            name = f"{logic}_{h}"
            if name in names:
                out[rows, names.index(name)] = hop == h
        any_logic |= hop <= H
    out[rows, names.index("generalization")] = any_logic
    out[rows[~any_logic], names.index("uncategorized")] = True
    out[target < 0, names.index("uncategorized")] = True
    return out


def _hop_direct(val: np.ndarray, n_hist: np.ndarray, h_min: int) -> np.ndarray:
    """Closed form of the module docstring for one logic; (m,) hop, FAR where unlabelled."""
    d = np.arange(1, val.shape[1] + 1)
    score = np.where(d[None, :] <= n_hist[:, None], np.maximum(val, d[None, :]), FAR)
    hop = np.maximum(score.min(axis=1), h_min)
    return np.where(hop <= n_hist, hop, FAR).astype(np.int8)


def _hop_composed(meet, u: np.ndarray, v: np.ndarray, n_hist: np.ndarray, max_hop: int) -> np.ndarray:
    """Same closed form for a composed logic, val_d computed d by d with the pruning bound."""
    best = np.full(len(v), FAR, dtype=np.int64)
    for d in range(1, max_hop + 1):
        bound = np.minimum(best - 1, n_hist)  # only val_d ≤ bound can lower the hop
        idx = np.flatnonzero(bound >= d)
        if len(idx):
            val = meet(u[idx, d - 1], v[idx], bound[idx]).astype(np.int64)
            best[idx] = np.minimum(best[idx], np.where(val <= bound[idx], np.maximum(val, d), FAR))
    return np.where(best <= n_hist, best, FAR).astype(np.int8)


def _second_symmetry(rel: ItemRelations, u: np.ndarray, v: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """min of the three forms of §10.2 (v→x→u, v→x←u, v←x→u), each bounded by the previous answer."""
    best = np.full(len(u), FAR, dtype=np.int64)
    for side_v, side_u in (("fwd", "bwd"), ("fwd", "fwd"), ("bwd", "bwd")):
        b = np.minimum(bound, best - 1)
        idx = np.flatnonzero(b >= 1)
        if len(idx):
            best[idx] = np.minimum(best[idx], rel.meet(side_v, v[idx], side_u, u[idx], b[idx]))
    return best.astype(np.int8)
