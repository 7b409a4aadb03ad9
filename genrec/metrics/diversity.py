"""Beyond-accuracy metrics of ranked lists: intra-list diversity, distinct first-level codes, novelty, coverage.

Per ranked list of the top-K items (item -1 = empty slot, ignored):

* ``ild@K``              intra-list diversity: mean over the pairs of non-empty items of the cosine
                         distance 1 − cos(e_i, e_j) of their text embeddings; NaN for lists with < 2 items
                         (left out of the subset mean)
* ``distinct_l1@K``      distinct first-level SID codes among the non-empty top-K items / K (divides by
                         K like IID-Ratio, decision 3); ``distinct_l1_count@K`` is the count itself
* ``novelty@K``          mean over the non-empty items of −log2 p(i), p(i) = (c_i + 1) / (Σ_j c_j + N):
                         c_i = how often item i is a training target, N = catalogue size (add-one
                         smoothing, so a cold item has finite novelty −log2(1 / (Σc + N))); NaN for an
                         empty list (left out of the mean)
* ``coverage@K``         distinct non-empty items over all lists of the subset / catalogue size

Lists are taken as given (beam search and the re-rankers return distinct items).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from genrec.metrics.ranking import subset_tensor


# ------------------------------------------------------------------------------------- plain functions
def intra_list_diversity(items: torch.Tensor, item_embeddings: torch.Tensor) -> torch.Tensor:
    """(B, K) items → (B,) mean pairwise cosine distance of the non-empty items; NaN with < 2 items."""
    valid = items >= 0
    emb = F.normalize(item_embeddings.float(), dim=-1)[items.clamp(min=0)]  # (B, K, D)
    dist = 1.0 - emb @ emb.transpose(1, 2)  # (B, K, K)
    k = items.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=items.device).triu(1)
    pairs = valid[:, :, None] & valid[:, None, :] & upper  # (B, K, K) each unordered pair once
    n = pairs.sum((1, 2)).double()
    total = (dist.double() * pairs).sum((1, 2))
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))


def distinct_first_codes(first_codes: torch.Tensor) -> torch.Tensor:
    """(B, K) first-level code per slot (-1 = empty) → (B,) number of distinct codes (divide by K for the ratio)."""
    s = torch.sort(first_codes, dim=1).values
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    return (new & (s >= 0)).sum(1)


def item_popularity(train_targets: torch.Tensor, num_items: int) -> torch.Tensor:
    """(num_items,) add-one smoothed popularity p(i) = (c_i + 1) / (Σ c + N) of the training targets."""
    counts = torch.bincount(torch.as_tensor(train_targets).long().reshape(-1), minlength=num_items)[:num_items]
    return (counts.double() + 1.0) / (counts.sum().double() + num_items)


def novelty(items: torch.Tensor, popularity: torch.Tensor) -> torch.Tensor:
    """(B, K) items, (num_items,) popularity p → (B,) mean −log2 p(i) over the non-empty items; NaN if none."""
    valid = items >= 0
    info = -torch.log2(popularity.double()[items.clamp(min=0)]) * valid  # (B, K)
    n = valid.sum(1).double()
    return torch.where(n > 0, info.sum(1) / n.clamp(min=1), torch.full_like(n, float("nan")))


def coverage(items: torch.Tensor, catalogue_size: int) -> torch.Tensor:
    """Distinct non-empty items over all (B, K) lists / catalogue size (a 0-dim float64 tensor)."""
    distinct = torch.unique(items[items >= 0]).numel()
    return torch.tensor(distinct / catalogue_size, dtype=torch.float64, device=items.device)


# ------------------------------------------------------------------------------------- Metric
class DiversityMetrics(Metric):
    """ILD, distinct first-level codes, novelty and coverage for all K and subsets (module docstring).

    Args:
        ks: cut-offs K.
        subsets: subset names; ``update`` gets one boolean mask per name ("overall" defaults to all),
            as in ``RankingMetrics``.
        item_embeddings: (num_items, D) text embeddings, row i = item i (for ILD).
        item_first_code: (num_items,) first-level SID code (or token) of each item, -1 if none.
        popularity: (num_items,) p(i) from :func:`item_popularity`.
        catalogue_size: denominator of coverage (default: rows of ``item_embeddings``).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        ks: Sequence[int],
        subsets: Sequence[str],
        item_embeddings: torch.Tensor,
        item_first_code: torch.Tensor,
        popularity: torch.Tensor,
        catalogue_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.ks = sorted({int(k) for k in ks})
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ks must be positive integers, got {list(ks)}")
        if not subsets or len(set(subsets)) != len(subsets):
            raise ValueError(f"subsets must be distinct names, got {list(subsets)}")
        self.subsets = list(subsets)
        self.kmax = self.ks[-1]
        self.register_buffer("item_embeddings", torch.as_tensor(item_embeddings).float(), persistent=False)
        self.register_buffer("item_first_code", torch.as_tensor(item_first_code).long(), persistent=False)
        self.register_buffer("popularity", torch.as_tensor(popularity).double(), persistent=False)
        self.catalogue_size = int(catalogue_size or self.item_embeddings.shape[0])
        # Per-instance states ("cat"): per-list values, the top-max(K) items (coverage), subset masks, ids.
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("items", default=[], dist_reduce_fx="cat")
        self.add_state("subset_masks", default=[], dist_reduce_fx="cat")
        self.add_state("instance_ids", default=[], dist_reduce_fx="cat")

    def _columns(self) -> list[str]:
        return [f"{m}@{k}" for k in self.ks for m in ("ild", "distinct_l1", "distinct_l1_count", "novelty")]

    def _subset_tensor(self, subset_masks, bsz: int) -> torch.Tensor:
        return subset_tensor(subset_masks, self.subsets, bsz, self.device)

    def update(self, pred_items: torch.Tensor, subset_masks, valid=None, instance_ids=None) -> None:
        """Add a batch: ``pred_items`` (B, K') ranked items (-1 = empty); masks / valid / ids as in RankingMetrics."""
        items = torch.as_tensor(pred_items, device=self.device).long()
        if items.ndim != 2:
            raise ValueError(f"pred_items must be (B, K), got {tuple(items.shape)}")
        bsz = items.shape[0]
        items = F.pad(items, (0, max(self.kmax - items.shape[1], 0)), value=-1)[:, : self.kmax]  # (B, Kmax)
        masks = self._subset_tensor(subset_masks, bsz)
        ids = (torch.as_tensor(instance_ids, device=self.device).long().reshape(bsz) if instance_ids is not None
               else torch.full((bsz,), -1, dtype=torch.long, device=self.device))
        if valid is not None:
            keep = torch.as_tensor(valid, device=self.device).bool().reshape(bsz)
            items, masks, ids = items[keep], masks[keep], ids[keep]
        codes = self.item_first_code[items.clamp(min=0)].masked_fill(items < 0, -1)  # (B, Kmax)
        cols = []
        for k in self.ks:
            count = distinct_first_codes(codes[:, :k]).double()
            cols += [intra_list_diversity(items[:, :k], self.item_embeddings), count / k, count,
                     novelty(items[:, :k], self.popularity)]
        self.values.append(torch.stack(cols, dim=1))
        self.items.append(items)
        self.subset_masks.append(masks.to(torch.uint8))
        self.instance_ids.append(ids)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def cat(x, shape, dtype):
            if isinstance(x, torch.Tensor):
                return x
            return torch.cat(x) if x else torch.zeros(shape, dtype=dtype, device=self.device)

        values = cat(self.values, (0, len(self._columns())), torch.float64)
        items = cat(self.items, (0, self.kmax), torch.long)
        masks = cat(self.subset_masks, (0, len(self.subsets)), torch.uint8).bool()
        ids = cat(self.instance_ids, (0,), torch.long)
        if ids.numel() and (ids >= 0).any():  # count each instance id once (DDP sampler repeats)
            order = torch.argsort(ids, stable=True)
            s = ids[order]
            first = torch.ones_like(s, dtype=torch.bool)
            first[1:] = s[1:] != s[:-1]
            keep = torch.zeros_like(first)
            keep[order] = first | (s < 0)
            values, items, masks = values[keep], items[keep], masks[keep]
        return values, items, masks

    def compute(self) -> dict[str, torch.Tensor]:
        values, items, masks = self._gathered()
        cols = self._columns()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        out: dict[str, torch.Tensor] = {}
        for s_idx, s in enumerate(self.subsets):
            rows = masks[:, s_idx]
            sub = values[rows]
            for c_idx, name in enumerate(cols):
                out[f"{name}/{s}"] = sub[:, c_idx].nanmean() if len(sub) else nan
            for k in self.ks:
                out[f"coverage@{k}/{s}"] = coverage(items[rows][:, :k], self.catalogue_size) if len(sub) else nan
        return out
