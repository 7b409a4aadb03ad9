"""The one owner of "fit the tokenizer for the periods a model trains on".

A tokenizer fitted for periods 0..t sees only the items known by the end of period t (their first interaction
falls in 0..t); items that launch later get codes by inference from that fitted tokenizer and the smallest free
collision suffix, so the SIDs of the known items never depend on the future. Used by ``TigerModule`` (residual
k-means when no SID table is given), the benchmarks and GenRecEdit's cold items; the continual runner fits its
RQ-VAE / DACT on the same item set (``items_known_until``).
"""

from __future__ import annotations

import numpy as np

from genrec.tokenizers.reassign import Coder, reassign
from genrec.tokenizers.rkmeans import ResidualKMeans
from genrec.tokenizers.sid import SemanticIdTable


def items_known_until(item_first_period: np.ndarray, periods) -> np.ndarray:
    """Items whose first interaction falls in a period ≤ max(periods): what a tokenizer for them may see."""
    return np.flatnonzero(np.asarray(item_first_period) <= max(periods))


def table_from_coder(coder: Coder, embeddings: np.ndarray, fit_items: np.ndarray, num_levels: int,
                     codebook_size: int, suffix_size: int, all_items: np.ndarray | None = None) -> SemanticIdTable:
    """SIDs of ``fit_items`` (TIGER suffixes in item order), then of the other ``all_items`` by inference with
    free suffixes: the first part does not depend on the second."""
    from genrec.tokenizers.reassign import codes_from_coder

    fit_items = np.asarray(fit_items, dtype=np.int64)
    codes = codes_from_coder(coder, embeddings[fit_items], num_levels=num_levels)
    table = SemanticIdTable.from_codes(fit_items, codes, codebook_size, suffix_size)
    if all_items is None:
        return table
    items = np.union1d(fit_items, np.asarray(all_items, dtype=np.int64))
    if len(items) == len(fit_items):
        return table
    return reassign(table, items, embeddings[items], coder, mode="frozen").table


def rkmeans_sid_table(embeddings: np.ndarray, fit_items: np.ndarray, all_items: np.ndarray | None = None, *,
                      num_levels: int = 3, codebook_size: int = 256, suffix_size: int = 256, iters: int = 50,
                      seed: int = 0, pca_dim: int | None = 32, whiten: bool = True) -> SemanticIdTable:
    """Residual k-means (PCA-whitened) fitted on ``fit_items`` only; ``all_items`` coded by inference."""
    x = np.asarray(embeddings, dtype=np.float32)
    fit_items = np.asarray(fit_items, dtype=np.int64)
    k = min(codebook_size, len(fit_items))
    pca = None if pca_dim is None else min(pca_dim, len(fit_items), x.shape[1])
    rk = ResidualKMeans(num_levels, k, iters=iters, seed=seed, pca_dim=pca, whiten=whiten and pca is not None)
    rk.fit(x[fit_items])
    return table_from_coder(rk.encode, x, fit_items, num_levels, codebook_size, suffix_size, all_items)
