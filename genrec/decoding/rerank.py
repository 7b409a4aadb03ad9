"""Hybrid generative + dense retrieval (LIGER-style) and MMR re-ranking, on plain tensors.

Hybrid retrieval (cold-start arena): beam search gives N candidates with their log-probs, cold (or
dense top-M) items are injected, and the pool is re-ranked by a blend of the generative score and a
dense content score (``genrec.models.dense.DenseScorer.scores``):

    blend = w · z(dense) + (1 − w) · z(gen)

z is a per-row **min–max normalisation over the row's valid, finite values** → [0, 1]; a non-finite
value (−inf generative score of an injected item that was not generated) maps to 0, the row minimum;
a row whose finite values are all equal maps to 0. Min–max (rather than z-scores) keeps both terms on
the same bounded scale whatever the temperature of either model, and is monotone, so w = 0 is the
generative order and w = 1 the dense order. At exactly w = 0 / w = 1 the ranking is done on the raw
scores so that no rounding in z can create a tie; ties are broken by candidate order (generated items
in beam order first, then injected items in the given order); empty slots (item −1) always rank last.

MMR (Carbonell & Goldstein 1998) greedily picks ``argmax λ · rel − (1 − λ) · max_{j picked} sim(i, j)``
with rel min–max normalised per row as above; λ = 1 returns the candidates sorted by relevance (the
input order for a ranked beam), smaller λ trades relevance for dissimilarity to what is already picked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------- helpers
def first_occurrence(items: torch.Tensor) -> torch.Tensor:
    """(B, C) → (B, C) bool: True at the first slot of each item in its row; False on repeats and on -1."""
    sorted_items, order = torch.sort(items, dim=1, stable=True)  # equal items keep their slot order
    first = torch.ones_like(sorted_items, dtype=torch.bool)
    first[:, 1:] = sorted_items[:, 1:] != sorted_items[:, :-1]
    return torch.empty_like(first).scatter_(1, order, first) & (items >= 0)


def minmax_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row min–max of the valid, finite entries of (B, C) → [0, 1]; everything else (and constant rows) → 0."""
    finite = valid & torch.isfinite(x)
    lo = torch.where(finite, x, torch.full_like(x, float("inf"))).min(1, keepdim=True).values  # (B, 1)
    hi = torch.where(finite, x, torch.full_like(x, NEG_INF)).max(1, keepdim=True).values
    span = hi - lo
    ok = finite & (span > 0)
    z = (x - lo.nan_to_num(0.0, posinf=0.0)) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(ok, z, torch.zeros_like(x))


def _rank(key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, C) slot indices by key descending, stable, valid slots before empty ones."""
    idx = torch.sort(key, dim=1, descending=True, stable=True).indices
    empty_last = torch.sort((~valid).gather(1, idx).to(torch.int8), dim=1, stable=True).indices
    return idx.gather(1, empty_last)


def _pad_cols(x: torch.Tensor, k: int, fill) -> torch.Tensor:
    """Pad (B, C ≤ k) with ``fill`` up to k columns."""
    return F.pad(x, (0, k - x.shape[1]), value=fill) if x.shape[1] < k else x


def _take(x: torch.Tensor, idx: torch.Tensor, k: int, fill) -> torch.Tensor:
    """Gather ``idx[:, :k]`` from (B, C), padded with ``fill`` up to k columns."""
    return _pad_cols(x.gather(1, idx[:, :k]), k, fill)


# --------------------------------------------------------------------------------------------- hybrid
def merge_candidates(
    gen_items: torch.Tensor, gen_scores: torch.Tensor, inject: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated candidates followed by injected items, each item once.

    Args:
        gen_items: (B, N) generated items in beam order, -1 = empty slot.
        gen_scores: (B, N) their generative log-probs.
        inject: (M,) items injected into every row, or (B, M) per row (-1 = none).

    Returns:
        items (B, N + M) and generative scores (B, N + M): -inf for injected items that were not
        generated. A repeated item keeps its first slot (so a generated item keeps its log-prob); its
        other slots become -1 / -inf (slots are not compacted: positions stay "beam, then injected").
    """
    bsz = gen_items.shape[0]
    inject = torch.as_tensor(inject, device=gen_items.device).long()
    if inject.ndim == 1:
        inject = inject[None, :].expand(bsz, -1)
    if inject.ndim != 2 or inject.shape[0] != bsz:
        raise ValueError(f"inject must be (M,) or (B={bsz}, M), got {tuple(inject.shape)}")
    items = torch.cat([gen_items.long(), inject], dim=1)  # (B, N + M)
    scores = torch.cat([gen_scores.float(), torch.full(inject.shape, NEG_INF, device=items.device)], dim=1)
    keep = first_occurrence(items)
    return items.masked_fill(~keep, -1), scores.masked_fill(~keep, NEG_INF)


def hybrid_rerank(
    cand_items: torch.Tensor,
    gen_scores: torch.Tensor,
    dense_scores: torch.Tensor,
    weight: float,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank candidates by ``weight · z(dense) + (1 − weight) · z(gen)`` (z: per-row min–max, module doc).

    Args:
        cand_items: (B, C) candidates (``merge_candidates``), -1 = empty slot.
        gen_scores: (B, C) generative log-probs, -inf for injected items not generated.
        dense_scores: (B, C) dense scores of the candidates (any scale).
        weight: dense weight in [0, 1]; 0 = generative order, 1 = dense order (exactly).
        top_k: items returned.

    Returns:
        items (B, top_k), -1 past the last valid candidate; blended scores (B, top_k) in [0, 1], -inf there.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    valid = cand_items >= 0
    blend = weight * minmax_rows(dense_scores, valid) + (1.0 - weight) * minmax_rows(gen_scores, valid)
    blend = blend.masked_fill(~valid, NEG_INF)
    # Endpoints rank on the raw scores: the same order as z, without rounding-made ties.
    key = gen_scores if weight == 0.0 else dense_scores if weight == 1.0 else blend
    idx = _rank(key, valid)
    return _take(cand_items, idx, top_k, -1), _take(blend, idx, top_k, NEG_INF)


def dense_top_m(
    dense_scores_all: torch.Tensor, candidate_mask: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-m items of the catalogue by dense score among the allowed ones ("dense top-M" injection).

    Args:
        dense_scores_all: (B, num_items) dense scores (``DenseScorer.scores(user)``).
        candidate_mask: (B, num_items) or (num_items,) bool, True = may be injected (e.g. cold items,
            or not already generated).
        m: items per row.

    Returns:
        items (B, m), -1 where fewer than m items are allowed; their scores (B, m), -inf there.
        Ties keep the lower item id first (stable sort).
    """
    mask = candidate_mask.to(torch.bool).expand_as(dense_scores_all)
    scores = dense_scores_all.masked_fill(~mask, NEG_INF)
    idx = _rank(scores, mask)[:, :m]  # allowed items first, by score
    allowed = mask.gather(1, idx)
    items = _pad_cols(idx.masked_fill(~allowed, -1), m, -1)
    return items, _pad_cols(scores.gather(1, idx).masked_fill(~allowed, NEG_INF), m, NEG_INF)


# --------------------------------------------------------------------------------------------- MMR
def cosine_similarity(vectors: torch.Tensor) -> torch.Tensor:
    """(B, K, D) → (B, K, K) pairwise cosine similarity (e.g. of the candidates' text embeddings)."""
    v = F.normalize(vectors.float(), dim=-1)
    return v @ v.transpose(1, 2)


def prefix_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """(B, K, L+1) SID tokens → (B, K, K): number of shared leading tokens / (L+1)."""
    eq = (tokens[:, :, None, :] == tokens[:, None, :, :]).to(torch.int32)  # (B, K, K, L+1)
    return eq.cumprod(-1).sum(-1).float() / tokens.shape[-1]


def mmr_rerank(
    items: torch.Tensor,
    relevance: torch.Tensor,
    similarity: torch.Tensor | None = None,
    lam: float = 0.5,
    top_k: int | None = None,
    vectors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximal marginal relevance, greedy, vectorised over the batch (one loop step per pick).

    Args:
        items: (B, K) candidates, -1 = empty slot (never picked).
        relevance: (B, K) any-scale relevance (beam log-probs, hybrid scores); min–max normalised per
            row over the valid finite entries (−inf → 0).
        similarity: (B, K, K) pairwise similarity (:func:`cosine_similarity`, :func:`prefix_similarity`);
            or give ``vectors`` (B, K, D) for cosine similarity.
        lam: relevance weight in [0, 1]; 1 = sort by relevance (ties: input order).
        top_k: picks (default K).

    Returns:
        items (B, top_k) and their slot indices into the input (B, top_k); -1 once a row runs out.
    """
    if (similarity is None) == (vectors is None):
        raise ValueError("give exactly one of similarity (B, K, K) and vectors (B, K, D)")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    sim = cosine_similarity(vectors) if similarity is None else similarity.float()  # (B, K, K)
    bsz, k = items.shape
    top_k = k if top_k is None else top_k
    valid = items >= 0
    rel = minmax_rows(relevance.float(), valid)  # (B, K)
    rows = torch.arange(bsz, device=items.device)
    picked = torch.zeros_like(valid)
    max_sim = torch.zeros_like(rel)  # max similarity to the picked items (0 before the first pick)
    out = []
    for t in range(min(top_k, k)):
        obj = (lam * rel - (1.0 - lam) * max_sim).masked_fill(picked | ~valid, NEG_INF)
        idx = obj.argmax(1)  # first maximum: ties keep input order
        ok = torch.isfinite(obj[rows, idx])  # (B,) the row still had a candidate
        picked[rows, idx] |= ok
        out.append(torch.where(ok, idx, torch.full_like(idx, -1)))
        s = sim[rows, idx]  # (B, K) similarity of every candidate to the new pick
        max_sim = s if t == 0 else torch.maximum(max_sim, s)
    index = torch.stack(out, 1) if out else torch.zeros(bsz, 0, dtype=torch.long, device=items.device)
    index = _pad_cols(index, top_k, -1)
    picked_items = items.gather(1, index.clamp(min=0)).masked_fill(index < 0, -1)
    return picked_items, index
