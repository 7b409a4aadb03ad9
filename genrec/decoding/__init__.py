"""Trie-constrained decoding of semantic IDs (fast path + HF reference), diverse beams and re-ranking."""

from genrec.decoding.beam_search import CachedT5Decoder, constrained_beam_search, score_sids
from genrec.decoding.diverse import diverse_beam_search
from genrec.decoding.rerank import (
    cosine_similarity,
    dense_top_m,
    hybrid_rerank,
    merge_candidates,
    mmr_rerank,
    prefix_similarity,
)
from genrec.decoding.trie import SidTrie

__all__ = [
    "CachedT5Decoder", "SidTrie", "constrained_beam_search", "cosine_similarity", "dense_top_m",
    "diverse_beam_search", "hybrid_rerank", "merge_candidates", "mmr_rerank", "prefix_similarity", "score_sids",
]
