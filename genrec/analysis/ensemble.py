"""Adaptive SASRec + TIGER ensemble (specs/memgen.md §10.4) on plain arrays.

Per case, each model gives a ranked candidate list (items, scores; -1 items are padding/invalid and
ignored). Scores are min–max normalised within each list (constant list → all 1), an item missing from a
list scores 0 for that model, and the blend s = α·ŝ_SAS + (1−α)·ŝ_TIG is ranked descending with ties kept
in insertion order: SASRec items in their list order, then TIGER-only items in theirs. α is a constant
(fixed ensemble) or σ(k·(MSP − τ)) per case (adaptive; a missing MSP counts as 0.5). Both are selected on
validation NDCG@10 over the reference's grids, keeping the first best (strict >).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The reference builds its grids with np.arange(lo, hi + step / 2, step); same floats here.
ALPHA_GRID = tuple(float(a) for a in np.arange(0.0, 1.0 + 0.05, 0.1))
K_GRID = tuple(float(k) for k in np.arange(1.0, 25.0 + 2.0, 4.0))
TAU_GRID = tuple(float(t) for t in np.arange(0.0, 0.5 + 0.05, 0.1))
_ROWS = 8192  # rows per chunk of the (m, Nt, Ns) match tables and of the softmax


# ----------------------------------------------------------------------------------------- indicator
def sasrec_msp(logits_or_msp) -> np.ndarray:
    """(m,) float64 MSP = max_i softmax(logits)_i from (m, num_items) logits, or a precomputed (m,) MSP."""
    x = torch.as_tensor(logits_or_msp)
    if x.ndim == 1:
        return x.double().cpu().numpy()
    out = [torch.exp(c.amax(-1) - torch.logsumexp(c, -1)) for c in x.float().split(_ROWS)]
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


def adaptive_alpha(msp: np.ndarray, k: float, tau: float) -> np.ndarray:
    """α = σ(k·(MSP − τ)) per case; NaN MSP → 0.5 first."""
    msp = np.where(np.isnan(msp), 0.5, np.asarray(msp, dtype=np.float64))
    return 1.0 / (1.0 + np.exp(-k * (msp - tau)))


# ----------------------------------------------------------------------------------------- candidates
@dataclass
class Candidates:
    """Union of both lists per case in insertion order; slots with item -1 are empty."""

    items: np.ndarray  # (m, Ns + Nt) int64
    sas: np.ndarray  # (m, Ns + Nt) float64 normalised SASRec score (0 if absent)
    tig: np.ndarray  # (m, Ns + Nt) float64 normalised TIGER score (0 if absent)

    def scores(self, alpha) -> np.ndarray:
        """(m, C) blended scores α·ŝ_SAS + (1−α)·ŝ_TIG, -inf in empty slots; ``alpha`` scalar or (m,)."""
        a = np.asarray(alpha, dtype=np.float64)
        a = a[:, None] if a.ndim else a
        s = a * self.sas
        s += (1.0 - a) * self.tig  # same rounding as the reference's a*s + (1-a)*t
        s[self.items < 0] = -np.inf
        return s


def minmax(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(m, N) min–max over each row's valid entries (constant row → 1); invalid entries → 0."""
    scores = np.asarray(scores, dtype=np.float64)
    lo = np.where(valid, scores, np.inf).min(axis=1, keepdims=True)
    hi = np.where(valid, scores, -np.inf).max(axis=1, keepdims=True)
    span = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(span > 0, (scores - lo) / np.where(span > 0, span, 1.0), 1.0)
    return np.where(valid, norm, 0.0)


def candidates(sas_items, sas_scores, tig_items, tig_scores) -> Candidates:
    """Merge the two ranked lists ((m, Ns) and (m, Nt) items and scores) of every case.

    A repeated item within one list keeps its first occurrence only.
    """
    sas_items, tig_items = np.asarray(sas_items, np.int64), np.asarray(tig_items, np.int64)
    sas_items = np.where(_first_match(sas_items, sas_items) < _cols(sas_items), -1, sas_items)
    tig_items = np.where(_first_match(tig_items, tig_items) < _cols(tig_items), -1, tig_items)
    s_norm = minmax(sas_scores, sas_items >= 0)  # (m, Ns)
    t_norm = minmax(tig_scores, tig_items >= 0)  # (m, Nt)
    in_sas = _first_match(tig_items, sas_items)  # (m, Nt) column of the same item in the SASRec list
    in_tig = _first_match(sas_items, tig_items)  # (m, Ns)
    rows = np.arange(len(sas_items))[:, None]
    sas_tig = np.where(in_tig >= 0, t_norm[rows, np.maximum(in_tig, 0)], 0.0)
    tig_only = np.where(in_sas >= 0, -1, tig_items)
    return Candidates(
        items=np.concatenate([sas_items, tig_only], axis=1),
        sas=np.concatenate([s_norm, np.zeros_like(t_norm)], axis=1),
        tig=np.concatenate([sas_tig, np.where(in_sas >= 0, 0.0, t_norm)], axis=1),
    )


def blend(cands: Candidates, alpha) -> np.ndarray:
    """(m, C) items ranked by the blended score (stable: insertion order on ties), -1 padding at the end."""
    order = np.argsort(-cands.scores(alpha), axis=1, kind="stable")
    return np.take_along_axis(cands.items, order, axis=1)


def target_rank(cands: Candidates, alpha, target: np.ndarray) -> np.ndarray:
    """(m,) 0-based position of ``target`` in :func:`blend`'s list (without sorting), inf if absent."""
    return _rank_in(cands.scores(alpha), _target_column(cands, target))


def _target_column(cands: Candidates, target: np.ndarray) -> np.ndarray:
    """(m,) candidate column holding the target, -1 if none."""
    is_t = (cands.items == np.asarray(target)[:, None]) & (cands.items >= 0)
    return np.where(is_t.any(axis=1), is_t.argmax(axis=1), -1)


def _rank_in(s: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Stable descending position of column ``col`` in each row of ``s``: higher scores, then earlier ties."""
    st = s[np.arange(len(s)), np.maximum(col, 0)][:, None]
    before = (s > st) | ((s == st) & (np.arange(s.shape[1])[None, :] < col[:, None]))
    return np.where(col >= 0, before.sum(axis=1), np.inf)


# ----------------------------------------------------------------------------------------- metrics
def rank_metrics(rank: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-case (hit@k, NDCG@k) from 0-based ranks (inf = absent); one target: NDCG = 1/log2(rank+2)."""
    hit = rank < k
    return hit.astype(np.float64), np.where(hit, 1.0 / np.log2(np.where(hit, rank, 0) + 2.0), 0.0)


def hit_ndcg(ranked: np.ndarray, target: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-case (hit@k, NDCG@k) of ranked item lists (m, K') against targets (m,), exact item match."""
    top = np.asarray(ranked)[:, :k]
    match = (top == np.asarray(target)[:, None]) & (top >= 0)
    rank = np.where(match.any(axis=1), match.argmax(axis=1), np.inf)
    return rank_metrics(rank, k)


# ----------------------------------------------------------------------------------------- selection
def select_fixed(cands: Candidates, target: np.ndarray, alphas=ALPHA_GRID, k: int = 10) -> tuple[float, float]:
    """(α, validation NDCG@k) of the first best fixed α (strict >)."""
    sub, col, _, m = _with_target(cands, target)
    best, best_alpha = -1.0, float(alphas[0])
    for a in alphas:
        score = rank_metrics(_rank_in(sub.scores(a), col), k)[1].sum() / m
        if score > best:
            best, best_alpha = float(score), float(a)
    return best_alpha, best


def select_adaptive(cands: Candidates, msp: np.ndarray, target: np.ndarray, ks=K_GRID, taus=TAU_GRID,
                    k: int = 10) -> tuple[float, float, float]:
    """(k, τ, validation NDCG@k) of the first best (k, τ) in grid order (k outer, τ inner; strict >)."""
    sub, col, rows, m = _with_target(cands, target)
    msp = np.asarray(msp, dtype=np.float64)[rows]
    best, best_kt = -1.0, (float(ks[0]), float(taus[0]))
    for steep in ks:
        for tau in taus:
            score = rank_metrics(_rank_in(sub.scores(adaptive_alpha(msp, steep, tau)), col), k)[1].sum() / m
            if score > best:
                best, best_kt = float(score), (float(steep), float(tau))
    return best_kt[0], best_kt[1], best


def _with_target(cands: Candidates, target: np.ndarray):
    """Cases whose target is a candidate (the others score 0 for every α): their candidates, target columns,
    rows, and max(m, 1) for the mean over all cases."""
    col = _target_column(cands, target)
    rows = np.flatnonzero(col >= 0)
    sub = Candidates(cands.items[rows], cands.sas[rows], cands.tig[rows])
    return sub, col[rows], rows, max(len(col), 1)


@dataclass
class EnsembleInputs:
    """One split's model outputs: top-N lists of both models, SASRec MSP, targets (rows where both
    models agree on the target id; the reference drops the others)."""

    sas_items: np.ndarray  # (m, Ns)
    sas_scores: np.ndarray  # (m, Ns) raw logits
    tig_items: np.ndarray  # (m, Nt) items of the beams, -1 = invalid SID
    tig_scores: np.ndarray  # (m, Nt) beam sequences_scores
    msp: np.ndarray  # (m,) NaN = missing
    target: np.ndarray  # (m,)

    def candidates(self) -> Candidates:
        return candidates(self.sas_items, self.sas_scores, self.tig_items, self.tig_scores)


def evaluate_ensembles(val: EnsembleInputs, test: EnsembleInputs, k: int = 10) -> dict[str, float]:
    """§10.4 protocol: select α and (k, τ) on validation NDCG@k, report test NDCG@k / Recall@k of SASRec,
    TIGER, the fixed and the adaptive ensemble (flat keys ``{model}/test/{ndcg,recall}@k``, ``fixed/alpha``,
    ``adaptive/k``, ``adaptive/tau``)."""
    vc, tc = val.candidates(), test.candidates()
    alpha, _ = select_fixed(vc, val.target, k=k)
    steep, tau, _ = select_adaptive(vc, val.msp, val.target, k=k)
    ranks = {
        "fixed": target_rank(tc, alpha, test.target),
        "adaptive": target_rank(tc, adaptive_alpha(test.msp, steep, tau), test.target),
    }
    out = {"fixed/alpha": alpha, "adaptive/k": steep, "adaptive/tau": tau}
    for name, items in (("sasrec", test.sas_items), ("tiger", test.tig_items)):
        hit, ndcg = hit_ndcg(items, test.target, k)
        out[f"{name}/test/ndcg@{k}"], out[f"{name}/test/recall@{k}"] = float(ndcg.mean()), float(hit.mean())
    for name, rank in ranks.items():
        hit, ndcg = rank_metrics(rank, k)
        out[f"{name}/test/ndcg@{k}"], out[f"{name}/test/recall@{k}"] = float(ndcg.mean()), float(hit.mean())
    return out


# ----------------------------------------------------------------------------------------- indicator check
def msp_bins(msp: np.ndarray, memorized: np.ndarray, sas_ndcg: np.ndarray, tig_ndcg: np.ndarray,
             n_bins: int = 5) -> dict[str, np.ndarray]:
    """Rank-based quantile bins of MSP (pandas ``qcut(msp.rank(method="first"), n_bins)``), per bin:
    ``msp_mean``, ``msp_min``, ``msp_max``, ``memorization_ratio``, ``sasrec_ndcg``, ``tiger_ndcg``,
    ``count``; plus ``bin`` (m,) and ``correlation`` (bin index vs memorization ratio)."""
    msp = np.asarray(msp, dtype=np.float64)
    rank = np.empty(len(msp))
    rank[np.argsort(msp, kind="stable")] = np.arange(1, len(msp) + 1)  # ties: first come, first ranked
    edges = np.quantile(rank, np.linspace(0.0, 1.0, n_bins + 1))
    b = np.clip(np.searchsorted(edges, rank, side="left") - 1, 0, n_bins - 1)  # (lo, hi], lowest included
    out = {"bin": b}
    cols = {"msp": msp, "memorization_ratio": memorized, "sasrec_ndcg": sas_ndcg, "tiger_ndcg": tig_ndcg}
    count = np.bincount(b, minlength=n_bins)
    for name, x in cols.items():
        x = np.asarray(x, dtype=np.float64)
        key = "msp_mean" if name == "msp" else name
        out[key] = np.bincount(b, weights=x, minlength=n_bins) / np.maximum(count, 1)
    out["msp_min"] = np.array([msp[b == i].min() if count[i] else np.nan for i in range(n_bins)])
    out["msp_max"] = np.array([msp[b == i].max() if count[i] else np.nan for i in range(n_bins)])
    out["count"] = count
    ratio = out["memorization_ratio"]
    out["correlation"] = np.array(np.corrcoef(np.arange(n_bins), ratio)[0, 1] if ratio.std() > 0 else np.nan)
    return out


# ----------------------------------------------------------------------------------------- helpers
def _cols(x: np.ndarray) -> np.ndarray:
    return np.arange(x.shape[1])[None, :]


def _first_match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, A): column of the first entry of b's row equal to each valid entry of a's row, else -1."""
    out = np.full(a.shape, -1, dtype=np.int64)
    if not b.shape[1]:
        return out
    for lo in range(0, len(a), _ROWS):
        eq = (a[lo : lo + _ROWS, :, None] == b[lo : lo + _ROWS, None, :]) & (a[lo : lo + _ROWS, :, None] >= 0)
        out[lo : lo + _ROWS] = np.where(eq.any(-1), eq.argmax(-1), -1)
    return out
