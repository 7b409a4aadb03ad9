"""Most-popular baseline: every user gets the items that were most often a training target.

Popularity counts the targets of the training instances (the training window), restricted to a candidate
catalogue (items known by the evaluation period). Ties are broken by the smaller item index so the ranking is
deterministic; items never seen as a target rank after every counted item, in index order.
"""

from __future__ import annotations

import numpy as np
import torch


class PopularityRecommender:
    """Ranks items by how often they were a training target.

    Args:
        num_items: size of the item index space (0..num_items-1).
        train_targets: target item of every training instance (with repeats: they are the counts).
        catalogue: items that may be recommended (None = every item).
    """

    def __init__(self, num_items: int, train_targets: np.ndarray, catalogue: np.ndarray | None = None):
        if num_items <= 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")
        train_targets = np.asarray(train_targets, dtype=np.int64)
        if train_targets.size and (train_targets.min() < 0 or train_targets.max() >= num_items):
            raise ValueError(f"train_targets must be item indices in [0, {num_items - 1}]")
        self.num_items = num_items
        self.counts = np.bincount(train_targets, minlength=num_items).astype(np.int64)
        allowed = np.zeros(num_items, dtype=bool)
        if catalogue is None:
            allowed[:] = True
        else:
            catalogue = np.asarray(catalogue, dtype=np.int64)
            if catalogue.size and (catalogue.min() < 0 or catalogue.max() >= num_items):
                raise ValueError(f"catalogue must be item indices in [0, {num_items - 1}]")
            allowed[catalogue] = True
        self.allowed = allowed
        # descending count, ascending index on ties (lexsort: last key is primary)
        order = np.lexsort((np.arange(num_items), -self.counts))
        self.ranking = order[allowed[order]]

    def scores(self) -> torch.Tensor:
        """(num_items,) float scores: the counts, -inf outside the catalogue."""
        s = torch.from_numpy(self.counts.astype(np.float64))
        return s.masked_fill(~torch.from_numpy(self.allowed), float("-inf"))

    def top_k(self, k: int, batch_size: int) -> torch.Tensor:
        """(batch_size, k') the same top-k' item list for every instance (k' = min(k, catalogue size))."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        top = torch.from_numpy(self.ranking[:k].copy())
        return top[None].expand(batch_size, -1)
