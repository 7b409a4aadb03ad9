"""Preprocessing: exact de-duplication, optional k-core, stable dense ids. Every removal is counted."""

from __future__ import annotations

import numpy as np
import pandas as pd

from genrec.data.schema import SPLIT_CODES, DataError, InteractionTable, ItemCatalog, RawData


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Iterated k-core: keep rows whose user and item both have ≥ k rows among kept rows."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        u_counts = np.bincount(users[keep], minlength=users.max() + 1 if len(users) else 0)
        i_counts = np.bincount(items[keep], minlength=items.max() + 1 if len(items) else 0)
        new_keep = keep & (u_counts[users] >= k) & (i_counts[items] >= k)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def preprocess(
    raw: RawData, dedup: bool = True, kcore: int = 0, drop_items_without_metadata: bool = False
) -> tuple[InteractionTable, ItemCatalog, dict[str, int]]:
    """Dense ids by first appearance in time order (each period's new items form a contiguous range)."""
    df = raw.interactions
    report: dict[str, int] = {"raw_interactions": len(df), **raw.counts}
    if len(df) == 0:
        raise DataError(f"{raw.source}: no interactions")
    # Stable sort by time keeps file order among ties (day-resolution timestamps tie a lot).
    df = df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    if dedup:
        dup = df.duplicated(subset=["user_id", "item_id", "timestamp"], keep="first")
        report["removed_exact_duplicates"] = int(dup.sum())
        df = df[~dup].reset_index(drop=True)
    known = set(raw.items["item_id"])
    no_meta = ~df["item_id"].isin(known)
    report["interactions_on_items_without_metadata"] = int(no_meta.sum())
    if drop_items_without_metadata:
        report["removed_items_without_metadata"] = int(no_meta.sum())
        df = df[~no_meta].reset_index(drop=True)
    if kcore > 0:
        u_codes, _ = pd.factorize(df["user_id"])
        i_codes, _ = pd.factorize(df["item_id"])
        keep = kcore_mask(u_codes.astype(np.int64), i_codes.astype(np.int64), kcore)
        report[f"removed_by_{kcore}core"] = int((~keep).sum())
        df = df[keep].reset_index(drop=True)
    if len(df) == 0:
        raise DataError(f"{raw.source}: no interactions left after preprocessing ({report})")
    user, user_ids = pd.factorize(df["user_id"])
    item, item_ids = pd.factorize(df["item_id"])
    split = None
    if "split" in df:
        split = df["split"].map(SPLIT_CODES).fillna(-1).to_numpy().astype(np.int8)
    rating = df["rating"].to_numpy().astype(np.float32) if "rating" in df else None
    table = InteractionTable(
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        timestamp=df["timestamp"].to_numpy().astype(np.int64),
        user_ids=np.asarray(user_ids, dtype=object),
        item_ids=np.asarray(item_ids, dtype=object),
        rating=rating,
        split=split,
    )
    repeated = raw.items.duplicated("item_id", keep="first")  # Amazon meta files repeat some items: first wins
    report["removed_duplicate_catalogue_rows"] = int(repeated.sum())
    meta = raw.items[~repeated].set_index("item_id")
    report["catalogue_items_without_interactions"] = int(len(meta) - meta.index.isin(item_ids).sum())
    meta = meta.reindex(item_ids)
    fields = {c: [None if (v is None or (isinstance(v, float) and np.isnan(v))) else v for v in meta[c]]
              for c in meta.columns}
    catalog = ItemCatalog(np.asarray(item_ids, dtype=object), fields)
    report.update(num_interactions=len(table), num_users=table.num_users, num_items=table.num_items)
    return table, catalog, report
