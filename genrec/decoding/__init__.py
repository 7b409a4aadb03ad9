"""Trie-constrained decoding of semantic IDs (fast path + HF reference)."""

from genrec.decoding.beam_search import CachedT5Decoder, constrained_beam_search, score_sids
from genrec.decoding.trie import SidTrie

__all__ = ["CachedT5Decoder", "SidTrie", "constrained_beam_search", "score_sids"]
