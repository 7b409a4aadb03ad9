"""Top-K ranking metrics for generative retrieval over semantic IDs (specs/genrecedit.md §7, decision 3).

One target per instance. Predictions are a ranked list of items with their SID tokens (from
``constrained_beam_search(..., return_tokens=True)``). The ranked list is de-duplicated (a repeated SID
keeps its first rank); empty slots (item -1 and all tokens 0) are misses; a non-empty slot with item -1
is an invalid SID (possible only with unconstrained decoding): a miss that still takes its rank.

Per instance, with j* the 1-based rank of the first match:

* ``recall@K``            1[j* ≤ K] with the exact item match (= HR@K for one target)
* ``ndcg@K``              1[j* ≤ K] / log2(j* + 1)
* ``ndcg_first{n}@K``     NDCG@K where a match means the first n SID tokens agree (n = 1..L+1;
                          GenRecEdit Fig. 3 left; n = L+1 equals ``ndcg@K`` for unique SIDs)
* ``recall_p{P}@K``, ``ndcg_p{P}@K``  the GenRecEdit reference's prefix-P match (P = 3: the collision
                          token is ignored), reported under their own names
* ``iid_ratio@K``         (1/K) Σ_{j≤K} 1[ŷ_j ∈ T_s], T_s = the target items of the evaluated subset s
                          (divides by K, decision 3); ``iid_ratio_p{P}@K`` uses prefix-P membership
* ``invalid_rate``        invalid SIDs / returned SIDs in the top max(K) (ratio of sums)
* ``count``               instances in the subset

Every value is the mean over the instances of its subset (overall / warm / cold / new ... — a boolean
mask per subset per instance); a subset without instances gives NaN.

DDP: per-instance values are kept as concatenated states, gathered by torchmetrics, and instances
that appear twice (``DistributedSampler`` pads the last batch with repeats) are counted once when
``instance_ids`` are given; alternatively pass ``valid`` to drop padded rows in ``update``. Keeping
per-instance values also gives :meth:`RankingMetrics.per_instance` for paired significance tests.
IID-Ratio needs the whole subset's target set, which is only known at the end; that is the other
reason for concatenated rather than summed states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchmetrics import Metric

_KEY_BITS = 16  # prefix keys pack tokens (< 2**16) into one int64


def first_hit_rank(hits: torch.Tensor) -> torch.Tensor:
    """(B, K) bool → (B,) float 1-based rank of the first True, +inf where none."""
    k = hits.shape[1]
    ranks = torch.arange(1, k + 1, device=hits.device, dtype=torch.float64).expand_as(hits)
    return (
        torch.where(hits, ranks, torch.full_like(ranks, float("inf"))).min(dim=1).values
        if k
        else torch.full((hits.shape[0],), float("inf"), dtype=torch.float64, device=hits.device)
    )


def dedup_ranked(items: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop later repeats of a SID in each ranked list (shifting the rest up, padding with empty slots)."""
    k, width = tokens.shape[1:]
    nonempty = (tokens != 0).any(-1)
    same = (tokens[:, :, None, :] == tokens[:, None, :, :]).all(-1)  # (B, K, K)
    earlier = torch.ones(k, k, dtype=torch.bool, device=tokens.device).tril(-1)
    dup = (same & earlier).any(-1) & nonempty
    if not dup.any():
        return items, tokens
    order = torch.sort(dup.to(torch.int8), dim=1, stable=True).indices  # kept slots first, in rank order
    items = items.gather(1, order).masked_fill(dup.gather(1, order), -1)
    tokens = tokens.gather(1, order[..., None].expand(-1, -1, width)).masked_fill(
        dup.gather(1, order)[..., None], 0
    )
    return items, tokens


def prefix_keys(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Pack the first n tokens of (..., L+1) into one int64 per row (exact for tokens < 2**16, n ≤ 3)."""
    if n * _KEY_BITS > 63:
        raise ValueError(f"prefix keys hold at most {63 // _KEY_BITS} tokens, got n = {n}")
    key = torch.zeros(tokens.shape[:-1], dtype=torch.long, device=tokens.device)
    for i in range(n):
        key = key * (1 << _KEY_BITS) + tokens[..., i].long()
    return key


# The evaluation subsets every model reports, in column order (datamodules build their masks in this order;
# MemGen labels, when enabled, follow them).
SUBSETS: tuple[str, ...] = ("overall", "warm", "cold", "new")


def subset_tensor(subset_masks, subsets: Sequence[str], bsz: int, device) -> torch.Tensor:
    """(B, S) bool masks from a (B, S) tensor or a mapping name → (B,) mask ("overall" may be omitted): the one
    place that fixes the column order of the evaluation subsets."""
    if isinstance(subset_masks, torch.Tensor):
        if subset_masks.shape != (bsz, len(subsets)):
            raise ValueError(f"subset_masks tensor must be (B, {len(subsets)}) for {list(subsets)}")
        return subset_masks.to(device=device, dtype=torch.bool)
    if not isinstance(subset_masks, Mapping):
        raise TypeError("subset_masks must be a mapping name → (B,) bool or a (B, S) bool tensor")
    unknown = set(subset_masks) - set(subsets)
    if unknown:
        raise ValueError(f"subset_masks has unknown subsets {sorted(unknown)}; known: {list(subsets)}")
    cols = []
    for name in subsets:
        if name in subset_masks:
            m = torch.as_tensor(subset_masks[name], device=device).bool().reshape(-1)
            if m.shape[0] != bsz:
                raise ValueError(f"subset_masks[{name!r}] must have shape ({bsz},), got {tuple(m.shape)}")
        elif name == "overall":
            m = torch.ones(bsz, dtype=torch.bool, device=device)
        else:
            raise ValueError(f"subset_masks is missing subset {name!r}")
        cols.append(m)
    return torch.stack(cols, dim=1)


def _ndcg(rank: torch.Tensor, k: int) -> torch.Tensor:
    """1 / log2(rank + 1) where rank ≤ k, else 0 (rank = +inf for a miss; the clamp keeps log2 finite)."""
    return torch.where(rank <= k, 1.0 / torch.log2(rank.clamp(max=1e9) + 1.0), torch.zeros_like(rank))


class RankingMetrics(Metric):
    """All ranking metrics for all K and all subsets in one torchmetrics ``Metric``.

    Args:
        ks: cut-offs K (GenRecEdit: 10/20/50; DACT: 5/10/20).
        subsets: subset names; ``update`` gets one boolean mask per name ("overall" defaults to all).
        sid_length: tokens per SID (L+1); inferred from the first ``update`` if None.
        prefix_len: P of the prefix-P variants (GenRecEdit reference: 3).
        iid_ratio: compute IID-Ratio (keeps the top-max(K) predictions of every instance).
    """

    full_state_update = False
    higher_is_better = None  # mixed: invalid_rate is lower-is-better
    is_differentiable = False

    def __init__(
        self,
        ks: Sequence[int] = (5, 10, 20, 50),
        subsets: Sequence[str] = SUBSETS,
        sid_length: int | None = 4,
        prefix_len: int = 3,
        iid_ratio: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        ks = sorted({int(k) for k in ks})
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        if len(set(subsets)) != len(subsets) or not subsets:
            raise ValueError(f"subsets must be distinct names, got {list(subsets)}")
        if not 1 <= prefix_len * _KEY_BITS <= 63:
            raise ValueError(f"prefix_len must lie in [1, {63 // _KEY_BITS}], got {prefix_len}")
        self.ks = ks
        self.kmax = ks[-1]
        self.subsets = list(subsets)
        self.sid_length = sid_length
        self.prefix_len = prefix_len
        self.iid_ratio = iid_ratio
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("subset_masks", default=[], dist_reduce_fx="cat")
        self.add_state("instance_ids", default=[], dist_reduce_fx="cat")
        if iid_ratio:
            self.add_state("pred_keys", default=[], dist_reduce_fx="cat")
            self.add_state("target_keys", default=[], dist_reduce_fx="cat")

    # ------------------------------------------------------------------------------------ columns
    def _columns(self) -> list[str]:
        cols = []
        for k in self.ks:
            cols += [
                f"recall@{k}",
                f"ndcg@{k}",
                f"recall_p{self.prefix_len}@{k}",
                f"ndcg_p{self.prefix_len}@{k}",
            ]
            cols += [f"ndcg_first{n}@{k}" for n in range(1, self.sid_length + 1)]
        return cols + ["_invalid", "_returned"]

    def _subset_tensor(self, subset_masks, bsz: int, device) -> torch.Tensor:
        return subset_tensor(subset_masks, self.subsets, bsz, device)

    # ------------------------------------------------------------------------------------ update
    def update(
        self,
        pred_items: torch.Tensor,
        pred_tokens: torch.Tensor,
        target_item: torch.Tensor,
        target_tokens: torch.Tensor,
        subset_masks,
        valid: torch.Tensor | None = None,
        instance_ids: torch.Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            pred_items: (B, K') ranked items, -1 for empty/invalid slots.
            pred_tokens: (B, K', L+1) their SID tokens (all 0 for empty slots).
            target_item: (B,) target items; target_tokens: (B, L+1) their SIDs.
            subset_masks: {subset: (B,) bool} (or (B, S) bool in ``subsets`` order).
            valid: (B,) bool, False rows are ignored (e.g. sampler padding).
            instance_ids: (B,) int64 dataset indices; an id seen again (on any rank) is counted once.
        """
        device = self.device
        pred_items, pred_tokens, target_item, target_tokens = self._checked_batch(
            pred_items, pred_tokens, target_item, target_tokens
        )
        bsz = target_item.shape[0]
        masks = self._subset_tensor(subset_masks, bsz, device)
        ids = (
            torch.as_tensor(instance_ids, device=device).long().reshape(-1)
            if instance_ids is not None
            else torch.full((bsz,), -1, dtype=torch.long, device=device)
        )
        if ids.shape[0] != bsz:
            raise ValueError(f"instance_ids must have shape ({bsz},)")
        if valid is not None:
            keep = torch.as_tensor(valid, device=device).bool().reshape(-1)
            pred_items, pred_tokens, target_item, target_tokens, masks, ids = (
                x[keep] for x in (pred_items, pred_tokens, target_item, target_tokens, masks, ids)
            )

        pred_items, pred_tokens = self._ranked_slots(pred_items, pred_tokens)
        nonempty = (pred_tokens != 0).any(-1)
        self.values.append(
            self._instance_values(pred_items, pred_tokens, target_item, target_tokens, nonempty)
        )
        self.subset_masks.append(masks.to(torch.uint8))
        self.instance_ids.append(ids)
        if self.iid_ratio:
            pk = prefix_keys(pred_tokens, self.prefix_len).masked_fill(~nonempty, -1)
            self.pred_keys.append(torch.stack([pred_items, pk], dim=-1))
            self.target_keys.append(
                torch.stack([target_item, prefix_keys(target_tokens, self.prefix_len)], dim=-1)
            )

    def _checked_batch(self, pred_items, pred_tokens, target_item, target_tokens):
        """The batch as int64 tensors on the metric's device with checked shapes; the first batch fixes
        ``sid_length`` when it was not given."""
        device = self.device
        pred_items = torch.as_tensor(pred_items, device=device).long()
        pred_tokens = torch.as_tensor(pred_tokens, device=device).long()
        target_item = torch.as_tensor(target_item, device=device).long().reshape(-1)
        target_tokens = torch.as_tensor(target_tokens, device=device).long()
        bsz = target_item.shape[0]
        if self.sid_length is None:
            self.sid_length = target_tokens.shape[-1]
        width = self.sid_length
        if pred_items.ndim != 2 or pred_items.shape[0] != bsz:
            raise ValueError(f"pred_items must be (B={bsz}, K), got {tuple(pred_items.shape)}")
        if pred_tokens.shape != (*pred_items.shape, width):
            raise ValueError(
                f"pred_tokens must be {(*pred_items.shape, width)}, got {tuple(pred_tokens.shape)}"
            )
        if target_tokens.shape != (bsz, width):
            raise ValueError(f"target_tokens must be ({bsz}, {width}), got {tuple(target_tokens.shape)}")
        if pred_tokens.numel() and int(pred_tokens.max()) >= 1 << _KEY_BITS:
            raise ValueError(f"token ids must be < {1 << _KEY_BITS}")
        return pred_items, pred_tokens, target_item, target_tokens

    def _ranked_slots(self, pred_items: torch.Tensor, pred_tokens: torch.Tensor):
        """Ranked lists as exactly max(K) de-duplicated slots (missing slots are empty)."""
        kp = pred_items.shape[1]
        if kp < self.kmax:
            pred_items = torch.nn.functional.pad(pred_items, (0, self.kmax - kp), value=-1)
            pred_tokens = torch.nn.functional.pad(pred_tokens, (0, 0, 0, self.kmax - kp), value=0)
        pred_items, pred_tokens = dedup_ranked(pred_items, pred_tokens)
        return pred_items[:, : self.kmax], pred_tokens[:, : self.kmax]

    def _instance_values(self, pred_items, pred_tokens, target_item, target_tokens, nonempty) -> torch.Tensor:
        """(B, len(_columns())) float64 per-instance values, in ``_columns`` order."""
        item_hits = (pred_items == target_item[:, None]) & (pred_items >= 0)
        token_eq = pred_tokens == target_tokens[:, None, :]
        prefix_hits = [token_eq[..., :n].all(-1) & nonempty for n in range(1, self.sid_length + 1)]
        rank_item = first_hit_rank(item_hits)
        rank_prefix = [first_hit_rank(h) for h in prefix_hits]
        rank_p = rank_prefix[self.prefix_len - 1]
        cols = []
        for k in self.ks:
            cols += [(rank_item <= k).double(), _ndcg(rank_item, k), (rank_p <= k).double(), _ndcg(rank_p, k)]
            cols += [_ndcg(r, k) for r in rank_prefix]
        cols.append((nonempty & (pred_items < 0)).sum(1).double())
        cols.append(nonempty.sum(1).double())
        return torch.stack(cols, dim=1)

    # ------------------------------------------------------------------------------------ compute
    def _gathered(self) -> dict[str, torch.Tensor]:
        def cat(x, empty_shape, dtype):
            if isinstance(x, torch.Tensor):
                return x
            return torch.cat(x) if len(x) else torch.zeros(empty_shape, dtype=dtype, device=self.device)

        out = {
            "values": cat(self.values, (0, len(self._columns()) if self.sid_length else 0), torch.float64),
            "masks": cat(self.subset_masks, (0, len(self.subsets)), torch.uint8).bool(),
            "ids": cat(self.instance_ids, (0,), torch.long),
        }
        if self.iid_ratio:
            out["pred_keys"] = cat(self.pred_keys, (0, self.kmax, 2), torch.long)
            out["target_keys"] = cat(self.target_keys, (0, 2), torch.long)
        # Count each instance id once (DistributedSampler repeats instances to even out ranks).
        ids = out["ids"]
        if ids.numel() and (ids >= 0).any():
            order = torch.argsort(ids, stable=True)
            sorted_ids = ids[order]
            first = torch.ones_like(sorted_ids, dtype=torch.bool)
            first[1:] = sorted_ids[1:] != sorted_ids[:-1]
            keep = torch.zeros_like(ids, dtype=torch.bool)
            keep[order] = first | (sorted_ids < 0)
            out = {k: v[keep] for k, v in out.items()}
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        g = self._gathered()
        cols = self._columns()
        values, masks = g["values"], g["masks"]
        result: dict[str, torch.Tensor] = {}
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        for s_idx, s in enumerate(self.subsets):
            rows = masks[:, s_idx] if masks.numel() else torch.zeros(0, dtype=torch.bool, device=self.device)
            n = int(rows.sum())
            result[f"count/{s}"] = torch.tensor(float(n), dtype=torch.float64, device=self.device)
            sub = values[rows]
            for c_idx, name in enumerate(cols):
                if name.startswith("_"):
                    continue
                result[f"{name}/{s}"] = sub[:, c_idx].mean() if n else nan
            returned = sub[:, cols.index("_returned")].sum() if n else nan
            result[f"invalid_rate/{s}"] = (
                sub[:, cols.index("_invalid")].sum() / returned if n and returned > 0 else nan
            )
            if self.iid_ratio:
                for v_idx, suffix in ((0, ""), (1, f"_p{self.prefix_len}")):
                    targets = torch.unique(g["target_keys"][rows, v_idx])
                    preds = g["pred_keys"][rows][..., v_idx]
                    member = torch.isin(preds, targets) & (preds >= 0)
                    for k in self.ks:
                        result[f"iid_ratio{suffix}@{k}/{s}"] = (
                            (member[:, :k].sum(1).double() / k).mean() if n else nan
                        )
        return result

    def per_instance(self, subset: str = "overall") -> dict[str, torch.Tensor]:
        """Per-instance values of one subset (after de-duplication), e.g. for paired t-tests."""
        if subset not in self.subsets:
            raise ValueError(f"unknown subset {subset!r}; known: {self.subsets}")
        with self.sync_context(should_sync=self.sync_on_compute):  # every rank's instances under DDP
            g = self._gathered()
        rows = g["masks"][:, self.subsets.index(subset)]
        out = {
            name: g["values"][rows, i] for i, name in enumerate(self._columns()) if not name.startswith("_")
        }
        out["instance_id"] = g["ids"][rows]
        return out

    def per_instance_table(self) -> dict[str, np.ndarray]:
        """Every instance once (after DDP de-duplication): ``instance_id``, each metric column and
        ``mask/<subset>`` as numpy arrays — what paired tests across methods need (``genrec.metrics.stats``)."""
        with self.sync_context(should_sync=self.sync_on_compute):  # every rank's instances under DDP
            g = self._gathered()
        out = {"instance_id": g["ids"].cpu().numpy()}
        for i, name in enumerate(self._columns()):
            if not name.startswith("_"):
                out[name] = g["values"][:, i].cpu().numpy()
        for s_idx, s in enumerate(self.subsets):
            out[f"mask/{s}"] = g["masks"][:, s_idx].cpu().numpy()
        return out
