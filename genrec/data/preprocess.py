"""Preprocessing: stable time sort, exact de-duplication, optional k-core, dense ids. Every removal is counted.

Streams its input: chunks are appended to columns of integer codes (``genrec.data.columns``: in memory under
the budget, else files), sorted by time out of core when they do not fit (bucketed by timestamp range, each bucket
sorted in memory), then filtered and given dense ids in passes of bounded size. The output does not depend on the
budget.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from genrec.data.columns import (
    Appender,
    DenseIds,
    Workspace,
    chunked_bincount,
    scatter_grouped,
    spans,
    stable_argsort,
)
from genrec.data.schema import DataError, InteractionTable, ItemCatalog, RawData
from genrec.data.stream import Stream, stream_from_raw

# bytes per interaction of the arrays preparation holds at once (read columns, order, sorted copies, table,
# sequences, instances): above the budget they are memory-mapped files instead
BYTES_PER_ROW = 160


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int, keep: np.ndarray | None = None,
               rows: int = 1 << 22) -> np.ndarray:
    """Iterated k-core: keep rows whose user and item both have ≥ k rows among kept rows (``keep``: the rows
    taking part, updated in place when given)."""
    keep = np.ones(len(users), dtype=bool) if keep is None else keep
    n_users = int(max((users[a:b].max() for a, b in spans(len(users), rows)), default=-1)) + 1
    n_items = int(max((items[a:b].max() for a, b in spans(len(items), rows)), default=-1)) + 1
    while True:
        u_counts = chunked_bincount(users, n_users, rows, keep)
        i_counts = chunked_bincount(items, n_items, rows, keep)
        changed = 0
        for a, b in spans(len(users), rows):
            new = keep[a:b] & (u_counts[users[a:b]] >= k) & (i_counts[items[a:b]] >= k)
            changed += int((new != keep[a:b]).sum())
            keep[a:b] = new
        if not changed:
            return keep


@dataclass
class _Read:
    """The stream's columns in file order."""

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray | None
    split: np.ndarray | None


def _collect(stream: Stream, ws: Workspace) -> _Read:
    cols = {k: ws.appender(k, np.int64) for k in ("user", "item", "timestamp")}
    extra: dict[str, Appender] = {}
    for chunk in stream.chunks:
        n_before = len(cols["user"])
        for k, col in cols.items():
            col.add(getattr(chunk, k))
        for k, dtype, fill in (("rating", np.float32, np.nan), ("split", np.int8, -1)):
            values = getattr(chunk, k)
            if values is not None and k not in extra:  # a column first seen now: missing in the rows before
                extra[k] = ws.appender(k, dtype)
                extra[k].add(np.full(n_before, fill, dtype))
            if k in extra:
                extra[k].add(values if values is not None else np.full(len(chunk.user), fill, dtype))
    out = {k: c.finish() for k, c in cols.items()}
    return _Read(**out, rating=extra["rating"].finish() if "rating" in extra else None,
                 split=extra["split"].finish() if "split" in extra else None)


def time_order(ts: np.ndarray, ws: Workspace) -> np.ndarray:
    """Row order by (timestamp, file order). Out of core when ``ts`` exceeds a chunk: rows are scattered into
    buckets of timestamp ranges (a stable counting sort, so file order survives inside a bucket), then each
    bucket is sorted in memory."""
    n, rows = len(ts), ws.rows(48)
    if n <= rows:
        return stable_argsort(np.asarray(ts))
    sample = np.asarray(ts[:: max(n // (1 << 16), 1)])
    n_buckets = 2 * -(-n // rows)
    bounds = np.unique(np.quantile(sample, np.linspace(0, 1, n_buckets + 1)[1:-1], method="lower"))
    counts = np.zeros(len(bounds) + 1, dtype=np.int64)
    for a, b in spans(n, rows):
        counts += np.bincount(np.searchsorted(bounds, ts[a:b], side="right"), minlength=len(counts))
    starts = np.r_[0, np.cumsum(counts)]
    order, fill = ws.array("order", n, np.int64), starts[:-1].copy()
    for a, b in spans(n, rows):
        order[scatter_grouped(np.searchsorted(bounds, ts[a:b], side="right"), fill)] = np.arange(a, b)
    for lo, hi in itertools.pairwise(starts):
        idx = np.asarray(order[lo:hi])
        order[lo:hi] = idx[stable_argsort(np.asarray(ts[idx]))]
    return order


def mark_duplicates(ts: np.ndarray, user: np.ndarray, item: np.ndarray, keep: np.ndarray, num_users: int,
                    num_items: int, rows: int) -> int:
    """Clear ``keep`` on time-sorted rows repeating an earlier (user, item, timestamp); returns how many. Chunks
    end at a change of timestamp, so a duplicate always meets its first occurrence."""
    n, a, removed = len(ts), 0, 0
    packed = num_users * num_items < 2**62
    while a < n:
        b = min(a + rows, n)
        if b < n:
            b = int(np.searchsorted(ts, ts[b - 1], side="right"))
        u, i, t = np.asarray(user[a:b]), np.asarray(item[a:b]), np.asarray(ts[a:b])
        if packed:  # one key per (user, item); inside a key rows stay in time order, so repeats are adjacent
            key = u * num_items + i
            o = stable_argsort(key)
            same = key[o][1:] == key[o][:-1]
        else:
            o = np.lexsort((i, u))
            same = (u[o][1:] == u[o][:-1]) & (i[o][1:] == i[o][:-1])
        dup = o[1:][same & (t[o][1:] == t[o][:-1])]
        view = keep[a:b]
        removed += int(view[dup].sum())
        view[dup] = False
        a = b
    return removed


def preprocess(
    raw: RawData, dedup: bool = True, kcore: int = 0, drop_items_without_metadata: bool = False
) -> tuple[InteractionTable, ItemCatalog, dict[str, int]]:
    """Dense ids by first appearance in time order (each period's new items form a contiguous range)."""
    return preprocess_stream(stream_from_raw(raw), dedup, kcore, drop_items_without_metadata)


def preprocess_stream(
    stream: Stream, dedup: bool = True, kcore: int = 0, drop_items_without_metadata: bool = False,
    ws: Workspace | None = None,
) -> tuple[InteractionTable, ItemCatalog, dict[str, int]]:
    """``preprocess`` of a stream, within ``ws``'s memory budget."""
    ws = ws or Workspace()
    read = _collect(stream, ws)
    n = len(read.user)
    report: dict[str, int] = {"raw_interactions": n, **stream.counts}
    if n == 0:
        raise DataError(f"{stream.source}: no interactions")
    ws.plan(n, BYTES_PER_ROW)
    rows = ws.rows(64)
    # Stable sort by time keeps file order among ties (day-resolution timestamps tie a lot).
    order = time_order(read.timestamp, ws)
    ws.release()
    ts, user, item = (ws.take(f"sorted_{k}", getattr(read, k), order) for k in ("timestamp", "user", "item"))
    ws.release()
    keep = ws.array("keep", n, bool)
    keep[:] = True
    num_items = len(stream.item_vocab)
    if dedup:
        report["removed_exact_duplicates"] = mark_duplicates(ts, user, item, keep, len(stream.users), num_items,
                                                             rows)
    items = stream.items()
    known = pd.Series(stream.item_vocab.ids(np.arange(num_items))).isin(items["item_id"]).to_numpy()
    no_meta = sum(int((keep[a:b] & ~known[item[a:b]]).sum()) for a, b in spans(n, rows))
    report["interactions_on_items_without_metadata"] = no_meta
    if drop_items_without_metadata:
        report["removed_items_without_metadata"] = no_meta
        for a, b in spans(n, rows):
            keep[a:b] &= known[item[a:b]]
    if kcore > 0:
        before = _count(keep, rows)
        kcore_mask(user, item, kcore, keep=keep, rows=rows)
        report[f"removed_by_{kcore}core"] = before - _count(keep, rows)
    if _count(keep, rows) == 0:
        raise DataError(f"{stream.source}: no interactions left after preprocessing ({report})")
    ws.release()
    table = _dense_table(stream, read, order, ts, user, item, keep, ws)
    ws.discard(read.user, read.item, read.timestamp, read.rating, read.split, order, ts, user, item, keep)
    ws.release()
    catalog = _catalog(items, table.item_ids, report)
    report.update(num_interactions=len(table), num_users=table.num_users, num_items=table.num_items)
    return table, catalog, report


def _count(mask: np.ndarray, rows: int) -> int:
    return sum(int(mask[a:b].sum()) for a, b in spans(len(mask), rows))


def _dense_table(stream: Stream, read: _Read, order, ts, user, item, keep, ws: Workspace) -> InteractionTable:
    """The kept rows in time order, with dense ids by first appearance."""
    n, rows = len(order), ws.rows(64)
    m = _count(keep, rows)
    users, items = DenseIds(len(stream.users)), DenseIds(len(stream.item_vocab))
    cols = {k: ws.array(f"table_{k}", m, np.int64) for k in ("user", "item", "timestamp")}
    extra = {k: ws.array(f"table_{k}", m, getattr(read, k).dtype) for k in ("rating", "split")
             if getattr(read, k) is not None}
    out = 0
    for a, b in spans(n, rows):
        k = np.asarray(keep[a:b])
        at = slice(out, out + int(k.sum()))
        cols["user"][at] = users(np.asarray(user[a:b])[k])
        cols["item"][at] = items(np.asarray(item[a:b])[k])
        cols["timestamp"][at] = ts[a:b][k]
        for name, col in extra.items():
            col[at] = getattr(read, name)[np.asarray(order[a:b])[k]]
        out = at.stop
    return InteractionTable(
        **{k: np.asarray(v) for k, v in cols.items()},
        user_ids=stream.users.ids(users.codes()),
        item_ids=stream.item_vocab.ids(items.codes()),
        rating=np.asarray(extra["rating"]) if "rating" in extra else None,
        split=np.asarray(extra["split"]) if "split" in extra else None,
    )


def _catalog(items: pd.DataFrame, item_ids: np.ndarray, report: dict) -> ItemCatalog:
    repeated = items.duplicated("item_id", keep="first")  # Amazon meta files repeat some items: first wins
    report["removed_duplicate_catalogue_rows"] = int(repeated.sum())
    meta = items[~repeated].set_index("item_id")
    report["catalogue_items_without_interactions"] = int(len(meta) - meta.index.isin(item_ids).sum())
    meta = meta.reindex(item_ids)
    fields = {c: [None if (v is None or (isinstance(v, float) and np.isnan(v))) else v for v in meta[c]]
              for c in meta.columns}
    return ItemCatalog(np.asarray(item_ids, dtype=object), fields)
