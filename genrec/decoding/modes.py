"""Decoding modes of a TIGER: plain trie-constrained beams, diverse beam groups, the LIGER-style hybrid
(generative candidates ∪ injected items, re-ranked with a dense scorer) and MMR re-ranking — one entry point,
``decode``, so evaluation, ``genrec predict`` and the benchmarks share the same code (``DecodingConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from genrec.decoding.beam_search import constrained_beam_search
from genrec.decoding.diverse import diverse_beam_search
from genrec.decoding.rerank import (
    cosine_similarity,
    dense_top_m,
    hybrid_rerank,
    merge_candidates,
    mmr_rerank,
    prefix_similarity,
)
from genrec.errors import ConfigError


@dataclass
class DecodingConfig:
    """How a TIGER turns a history into its top-K.

    Args:
        mode: ``beam`` (trie-constrained beam search), ``diverse`` (beam groups with a Hamming penalty),
            ``hybrid`` (beam candidates ∪ injected items re-ranked by a blend of the dense score and the
            generative log-prob; needs ``model.dense``), ``mmr`` (maximal marginal relevance over the beams).
        num_groups: Beam groups of ``diverse``.
        diversity_penalty: Log-prob penalty per earlier group's beam on the same SID value (``diverse``).
        hybrid_weight: Blend weight of the dense score (0 = generative order, 1 = dense order); choose it on
            validation (``bench/coldstart.py`` does).
        inject: What ``hybrid`` adds to the beams: ``cold`` (the evaluation catalogue's items that were never a
            training target) or ``dense_top_m`` (the dense scorer's top ``inject_m`` items of the catalogue).
        inject_m: Items added by ``dense_top_m``.
        mmr_lambda: MMR trade-off (1 = the beam order; lower = more dissimilar picks).
        mmr_similarity: ``text`` (cosine of item text embeddings) or ``prefix`` (shared leading SID tokens).
        diversity_metrics: Also log intra-list diversity, distinct first-level codes, novelty and coverage.
    """

    mode: Literal["beam", "diverse", "hybrid", "mmr"] = "beam"
    num_groups: int = 4
    diversity_penalty: float = 1.0
    hybrid_weight: float = 0.5
    inject: Literal["cold", "dense_top_m"] = "cold"
    inject_m: int = 50
    mmr_lambda: float = 0.7
    mmr_similarity: Literal["text", "prefix"] = "text"
    diversity_metrics: bool = False

    def __post_init__(self) -> None:
        if self.num_groups < 1 or self.inject_m < 1:
            raise ConfigError("decoding.num_groups and decoding.inject_m must be >= 1")
        if not 0.0 <= self.hybrid_weight <= 1.0 or not 0.0 <= self.mmr_lambda <= 1.0:
            raise ConfigError("decoding.hybrid_weight and decoding.mmr_lambda must lie in [0, 1]")

    @property
    def needs_text(self) -> bool:
        return self.mode == "hybrid" or (self.mode == "mmr" and self.mmr_similarity == "text") or self.diversity_metrics


@dataclass
class DecodeContext:
    """What the non-beam modes need besides the model: dense user vectors, cached item vectors, the injected
    items and the item text embeddings (None where unused)."""

    user_vectors: torch.Tensor | None = None  # (B, dim)
    item_vectors: torch.Tensor | None = None  # (num_items, dim), computed once per evaluation
    dense_scale: torch.Tensor | None = None  # 1 / τ of the dense scorer
    inject: torch.Tensor | None = None  # (M,) items
    catalogue_mask: torch.Tensor | None = None  # (num_items,) bool: items that may be recommended
    text_embeddings: torch.Tensor | None = None  # (num_items, text_dim)


def decode(t5, input_ids, attention_mask, trie, cfg: DecodingConfig, num_beams: int, top_k: int, edit=None,
           unconstrained: bool = False, ctx: DecodeContext | None = None):
    """(items (B, top_k), scores (B, top_k)) of the configured mode; -1 / -inf pad short lists."""
    if cfg.mode == "diverse":
        return diverse_beam_search(t5, input_ids, attention_mask, trie, num_beams=num_beams,
                                   num_groups=cfg.num_groups, penalty=cfg.diversity_penalty, top_k=top_k, edit=edit)
    items, scores, tokens = constrained_beam_search(t5, input_ids, attention_mask, trie, num_beams=num_beams,
                                                    top_k=num_beams, edit=edit, unconstrained=unconstrained,
                                                    return_tokens=True)
    if cfg.mode == "beam":
        return items[:, :top_k], scores[:, :top_k]
    if ctx is None:
        raise ConfigError(f"decoding.mode {cfg.mode} needs a decode context (dense scorer / text embeddings)")
    if cfg.mode == "mmr":
        if cfg.mmr_similarity == "text":
            sim = cosine_similarity(ctx.text_embeddings[items.clamp(min=0)])  # (B, N, N)
        else:
            sim = prefix_similarity(tokens)
        ranked, slots = mmr_rerank(items, scores, similarity=sim, lam=cfg.mmr_lambda, top_k=top_k)
        return ranked, scores.gather(1, slots.clamp(min=0)).masked_fill(slots < 0, float("-inf"))
    return _hybrid(items, scores, cfg, top_k, ctx)


def _hybrid(items, scores, cfg: DecodingConfig, top_k: int, ctx: DecodeContext):
    dense_all = ctx.user_vectors @ ctx.item_vectors.T * ctx.dense_scale  # (B, num_items)
    if cfg.inject == "cold":
        inject = ctx.inject
    else:
        allowed = ctx.catalogue_mask[None].expand_as(dense_all).clone()
        allowed.scatter_(1, items.clamp(min=0), False)  # the beams are candidates already
        inject, _ = dense_top_m(dense_all, allowed, cfg.inject_m)
    cand, gen = merge_candidates(items, scores, inject)  # (B, N + M)
    dense = dense_all.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
    return hybrid_rerank(cand, gen, dense, cfg.hybrid_weight, top_k)
