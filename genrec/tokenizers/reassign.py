"""Semantic-ID reassignment between two periods (DACT §3.2 / spec dact.md §1.8, decision 2).

Given the previous period's ``SemanticIdTable`` and fresh codes for the new catalogue, build the new
table under one of four policies:

* ``"dact"`` (relaxed-to-strict): level 1 is always re-inferred. An old item whose level-1 code is
  unchanged keeps its whole old SID (deeper codes and suffix). An old item whose level-1 code changed
  takes all its fresh codes; new items take their fresh codes. Changed and new items then receive the
  smallest suffix not used in their prefix, so kept SIDs never move and every SID is unique (the
  reference code skipped this check and shipped duplicates; decision 2 fixes it).
* ``"finetune"``: every item takes its fresh codes and fresh TIGER suffixes (rank within the prefix in
  catalogue order); naive tokenizer fine-tuning and DACT's "w/o Re-assign" ablation.
* ``"frozen"`` / ``"reformer"``: every old item keeps its SID; only new items are coded and receive the
  smallest free suffix. The two differ only in which tokenizer codes the new items (the frozen
  previous-period model vs. a model updated for the new items), i.e. in the ``coder`` passed in.

Everything works on plain arrays so the rules are unit-testable without a trained tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from genrec.tokenizers.sid import SemanticIdTable, assign_suffixes

REASSIGN_MODES = ("dact", "finetune", "frozen", "reformer")

# A callable mapping (n, d) embeddings to (n, L) codes, or a module with ``get_codes`` (e.g. RQVAE).
Coder = Callable[[torch.Tensor], torch.Tensor | np.ndarray] | torch.nn.Module


@dataclass
class ReassignResult:
    """New table plus what happened to each item.

    ``stats`` holds ``SemanticIdTable.diff`` rates of the old items (``level1..levelL``, ``suffix``,
    ``overall``, ``num_common_items``, ``num_new_items``) and counts: ``num_items``, ``num_kept``
    (old items whose full SID was kept), ``num_reinferred`` (old items that took fresh codes),
    ``num_coded_new``, ``num_dropped_old`` (old items absent from the new catalogue),
    ``num_suffix_moved`` (re-inferred/new items whose suffix differs from the plain TIGER rank of
    their fresh codes, i.e. collisions resolved against kept SIDs).
    """

    table: SemanticIdTable
    stats: dict[str, float] = field(default_factory=dict)
    kept: np.ndarray | None = None  # (n,) bool, row-aligned with ``table.items``
    is_new: np.ndarray | None = None  # (n,) bool


def codes_from_coder(
    coder: Coder,
    embeddings: torch.Tensor | np.ndarray,
    batch_size: int = 4096,
    num_levels: int = 0,
) -> np.ndarray:
    """(n, L) int64 codes for ``embeddings`` (n, d).

    ``coder`` is a callable returning codes for a batch of embeddings, or a module with a
    ``get_codes(x)`` method (e.g. ``RQVAE``); modules are run in eval mode without gradients and put
    back in their previous mode afterwards. ``num_levels`` only shapes the result of an empty input.
    """
    x = torch.as_tensor(np.asarray(embeddings) if not torch.is_tensor(embeddings) else embeddings)
    x = x.float()
    fn = coder.get_codes if hasattr(coder, "get_codes") else coder
    module = coder if isinstance(coder, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
        param = next(module.parameters(), None)
        if param is not None:
            x = x.to(param.device)
    out = []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                codes = fn(x[start : start + batch_size])
                codes = codes.detach().cpu().numpy() if torch.is_tensor(codes) else np.asarray(codes)
                out.append(codes.astype(np.int64))
    finally:
        if module is not None:
            module.train(was_training)
    if not out:
        return np.zeros((0, num_levels), dtype=np.int64)
    return np.concatenate(out, axis=0)


def reassign_codes(
    old_table: SemanticIdTable,
    items: np.ndarray,
    fresh_codes: np.ndarray,
    mode: str = "dact",
) -> ReassignResult:
    """New SID table for the catalogue ``items`` (n,) given fresh tokenizer codes (n, L).

    Row order of the result = order of ``items``; free suffixes are handed out in that order (pass
    items sorted by id to match the reference's ItemID order). For ``"frozen"``/``"reformer"`` the
    fresh codes of old items are ignored (pass anything of the right shape, e.g. the old codes).
    Raises ``SuffixOverflowError`` when a prefix holds more items than ``suffix_size``.
    """
    if mode not in REASSIGN_MODES:
        raise ValueError(f"mode must be one of {REASSIGN_MODES}, got {mode!r}")
    items = np.asarray(items, dtype=np.int64)
    fresh_codes = np.asarray(fresh_codes, dtype=np.int64)
    n = len(items)
    L, K, S = old_table.num_levels, old_table.codebook_size, old_table.suffix_size
    if fresh_codes.shape != (n, L):
        raise ValueError(f"fresh_codes must have shape ({n}, {L}) (items × levels), got {fresh_codes.shape}")
    if n and (fresh_codes.min() < 0 or fresh_codes.max() >= K):
        raise ValueError(f"fresh_codes must lie in [0, {K}) (codebook_size of the old table)")
    if len(np.unique(items)) != n:
        raise ValueError("items: an item appears twice in the new catalogue")

    is_old = np.isin(items, old_table.items)
    is_new = ~is_old
    old_rows = old_table.rows_of(items[is_old])
    old_codes = np.zeros((n, L), dtype=np.int64)
    old_suffix = np.full(n, -1, dtype=np.int64)
    old_codes[is_old] = old_table.codes[old_rows]
    old_suffix[is_old] = old_table.suffix[old_rows]

    if mode == "finetune":
        kept = np.zeros(n, dtype=bool)
        codes = fresh_codes.copy()
        suffix = assign_suffixes(codes, S, K)
    else:
        if mode == "dact":
            kept = is_old & (fresh_codes[:, 0] == old_codes[:, 0])
        else:  # frozen / reformer: every old item keeps its SID
            kept = is_old.copy()
        codes = np.where(kept[:, None], old_codes, fresh_codes)
        suffix = assign_suffixes(codes, S, K, kept_suffix=np.where(kept, old_suffix, -1))

    table = SemanticIdTable(items, codes, suffix, K, S)
    stats = dict(old_table.diff(table))
    moved = ~kept
    plain = assign_suffixes(codes[moved], S, K) if moved.any() else np.zeros(0, dtype=np.int64)
    stats.update(
        num_items=float(n),
        num_kept=float(kept.sum()),
        num_reinferred=float((is_old & ~kept).sum()),
        num_coded_new=float(is_new.sum()),
        num_dropped_old=float(old_table.num_items - is_old.sum()),
        num_suffix_moved=float((suffix[moved] != plain).sum()),
    )
    return ReassignResult(table=table, stats=stats, kept=kept, is_new=is_new)


def reassign(
    old_table: SemanticIdTable,
    items: np.ndarray,
    embeddings: torch.Tensor | np.ndarray,
    coder: Coder,
    mode: str = "dact",
    batch_size: int = 4096,
) -> ReassignResult:
    """Code the catalogue ``items`` (n,) with ``coder`` from their ``embeddings`` (n, d) and reassign.

    ``coder``: the fine-tuned tokenizer for ``"dact"``/``"finetune"``; for ``"frozen"`` the previous
    period's tokenizer, for ``"reformer"`` the tokenizer that codes new items. With ``"frozen"`` and
    ``"reformer"`` only the new items are run through the coder.
    """
    if mode not in REASSIGN_MODES:
        raise ValueError(f"mode must be one of {REASSIGN_MODES}, got {mode!r}")
    items = np.asarray(items, dtype=np.int64)
    if len(embeddings) != len(items):
        raise ValueError(f"embeddings has {len(embeddings)} rows but items has {len(items)}")
    L = old_table.num_levels
    if mode in ("frozen", "reformer"):
        is_new = ~np.isin(items, old_table.items)
        fresh = np.zeros((len(items), L), dtype=np.int64)
        if is_new.any():
            idx = np.flatnonzero(is_new)
            rows = (
                embeddings[torch.as_tensor(idx)]
                if torch.is_tensor(embeddings)
                else np.asarray(embeddings)[idx]
            )
            fresh[is_new] = codes_from_coder(coder, rows, batch_size, L)
    else:
        fresh = codes_from_coder(coder, embeddings, batch_size, L)
    if fresh.shape != (len(items), L):
        raise ValueError(f"coder returned codes of shape {fresh.shape}, expected ({len(items)}, {L})")
    return reassign_codes(old_table, items, fresh, mode)
