"""Period and timestamp protocols → prediction instances with warm/cold/new labels, over per-user sequences.

Layout (size O(interactions), never O(instances × history)): ``Sequences`` holds every user's items in time order
in CSR form; an instance is a row (user, position of its target in the user's sequence, split, period, flags, ...);
its history — the ``max_history`` items before the target, left-padded with -1 — is gathered when asked for, one
vectorised step per batch. Everything is vectorised over rows and runs chunk by chunk (``genrec.data.columns``).

Period protocol (specs/dact.md §2.2): interactions (time-sorted, ties in file order) are cut into periods by
cumulative fractions of the row count. Inside a period, for each user the interactions that are not the
user's first ever are targets: the last is ``test``, the second last ``valid``, the rest ``train``. Histories reach
back across periods and hold the last ``max_history`` items before the target.

Timestamp protocol: the source's own split labels (train/valid/test; history_only rows are never targets),
all in period 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genrec.data.columns import Workspace, chunked_bincount, scatter_grouped, spans
from genrec.data.schema import DataError, InteractionTable

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_OF = {"train": TRAIN, "valid": VALID, "test": TEST}
NEVER = np.iinfo(np.int16).max  # "never a training target"

INSTANCE_COLUMNS = {
    "user": np.int64,  # dense user index
    "target": np.int64,  # item index
    "timestamp": np.int64,  # time of the target interaction
    "split": np.int8,  # 0 train, 1 valid, 2 test
    "period": np.int16,
    "row": np.int64,  # index of the target interaction in the InteractionTable
    "new_item": np.bool_,  # the target's first interaction falls in this period
    "cold": np.bool_,  # target never a train target up to and including this period
    "cold_prev": np.bool_,  # target never a train target before this period (previous period's model)
    "position": np.int32,  # index of the target in its user's sequence (its history: the items before it)
}


@dataclass(eq=False)
class Sequences:
    """Every user's items in time order: user u's are ``item[offsets[u]:offsets[u + 1]]`` (CSR)."""

    offsets: np.ndarray  # int64 (num_users + 1)
    item: np.ndarray  # int32 (num_interactions)
    timestamp: np.ndarray  # int64 (num_interactions)
    max_history: int
    folder: Path | None = None  # where it is memory-mapped from: pickled as the path (workers map the same pages)

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    def gather(self, user: np.ndarray, position: np.ndarray) -> np.ndarray:
        """(n, max_history) int64 histories, oldest first, left-padded with -1: the items before ``position``."""
        h = self.max_history
        user, position = np.asarray(user, dtype=np.int64), np.asarray(position, dtype=np.int64)
        back = np.arange(-h, 0)
        ok = position[:, None] + back >= 0
        at = (self.offsets[user] + position)[:, None] + back
        out = self.item[np.where(ok, at, 0)].astype(np.int64) if len(self.item) else np.zeros(at.shape, np.int64)
        out[~ok] = -1
        return out

    def __reduce__(self):
        if self.folder is None:
            return super().__reduce__()
        return open_sequences, (self.folder, self.max_history)


class _Column:
    """An instance field: the column itself on a full table, gathered (once) on a selection."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, inst, owner=None):
        return self if inst is None else inst.column(self.name)


class Instances:
    """One row per next-item prediction instance (struct of arrays, possibly memory-mapped), or a selection of
    them (``select`` / ``where`` keep the columns and an index: nothing is copied until a field is read).

    ``history`` is gathered on access (cached): fine on small subsets; batches use ``histories(idx)`` / ``batch``.
    """

    user = _Column()
    target = _Column()
    timestamp = _Column()
    split = _Column()
    period = _Column()
    row = _Column()
    new_item = _Column()
    cold = _Column()
    cold_prev = _Column()
    position = _Column()

    def __init__(self, columns: dict[str, np.ndarray], sequences: Sequences, index: np.ndarray | None = None,
                 folder: Path | None = None):
        self.columns, self.sequences, self.index, self.folder = columns, sequences, index, folder
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else len(self.columns["user"])

    def __repr__(self) -> str:
        return f"Instances(n={len(self)}, max_history={self.max_history})"

    @property
    def max_history(self) -> int:
        return self.sequences.max_history

    def column(self, name: str) -> np.ndarray:
        if self.index is None:
            return self.columns[name]
        if name not in self._cache:
            self._cache[name] = np.asarray(self.columns[name][self.index])
        return self._cache[name]

    def rows(self, idx=None):
        """Rows of the full table for positions ``idx`` of this selection (None: all)."""
        if idx is None:
            return slice(None) if self.index is None else self.index
        idx = np.asarray(idx, dtype=np.int64)
        return idx if self.index is None else self.index[idx]

    def select(self, mask) -> Instances:
        """The instances at a bool mask or integer positions (a view: same columns, composed index)."""
        pos = np.asarray(mask)
        if pos.dtype == bool:
            if pos.shape != (len(self),):
                raise IndexError(f"boolean mask of shape {pos.shape} for {len(self)} instances")
            pos = np.flatnonzero(pos)
        index = pos if self.index is None else self.index[pos]
        if len(self.columns["user"]) < 2**31:  # half the memory of a selection of millions
            index = index.astype(np.int32, copy=False)
        return Instances(self.columns, self.sequences, index, self.folder)

    def where(self, split: int | None = None, period: int | list[int] | None = None) -> Instances:
        """The instances of ``split`` in ``period`` (one or a list), found chunk by chunk."""
        periods = None if period is None else np.atleast_1d(np.asarray(period, dtype=np.int64))
        dtype = np.int32 if len(self) < 2**31 else np.int64
        parts = [np.empty(0, dtype)]
        for a, b in spans(len(self), 1 << 22):
            ok = np.ones(b - a, dtype=bool)
            if split is not None:
                ok &= self.split[a:b] == split
            if periods is not None:
                ok &= np.isin(self.period[a:b], periods)
            parts.append((np.flatnonzero(ok) + a).astype(dtype))
        return self.select(np.concatenate(parts))

    # ------------------------------------------------------------------ histories
    @property
    def history(self) -> np.ndarray:
        """(n, max_history) int64, left-padded with -1, oldest first (gathered once, then cached)."""
        if "history" not in self._cache:
            self._cache["history"] = self.histories()
        return self._cache["history"]

    def histories(self, idx=None) -> np.ndarray:
        """Histories of positions ``idx`` (None: all), in one vectorised gather."""
        rows = self.rows(idx)
        return self.sequences.gather(self.columns["user"][rows], self.columns["position"][rows])

    def batch(self, idx) -> dict[str, np.ndarray]:
        """history, target and user of positions ``idx``: one gather per column."""
        rows = self.rows(idx)
        user = np.asarray(self.columns["user"][rows])
        return {"history": self.sequences.gather(user, self.columns["position"][rows]),
                "target": np.asarray(self.columns["target"][rows]), "user": user}

    def chunks(self, size: int = 1 << 20) -> Iterator[Instances]:
        """Consecutive selections of ``size`` instances: a pass over millions with bounded memory."""
        for a, b in spans(len(self), size):
            yield self.select(np.arange(a, b))

    def iter_histories(self, batch_size: int = 1 << 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(history, target) chunks over all instances in order (e.g. for ``ItemRelations.from_chunks``)."""
        for part in self.chunks(batch_size):
            yield part.history, part.target

    def __reduce__(self):
        if self.folder is None:
            return _rebuild_instances, (self.columns, self.sequences, self.index)
        return open_instances, (self.folder, self.sequences, self.index)


def _rebuild_instances(columns, sequences, index) -> Instances:
    return Instances(columns, sequences, index)


def open_sequences(folder: Path, max_history: int) -> Sequences:
    """Memory-mapped (copy-on-write: pages shared between processes until written)."""
    folder = Path(folder)
    arrays = {k: np.asarray(np.load(folder / f"{k}.npy", mmap_mode="c")) for k in ("offsets", "item", "timestamp")}
    return Sequences(max_history=max_history, folder=folder, **arrays)


def open_instances(folder: Path, sequences: Sequences, index: np.ndarray | None = None) -> Instances:
    folder = Path(folder)
    cols = {k: np.asarray(np.load(folder / f"{k}.npy", mmap_mode="c")) for k in INSTANCE_COLUMNS}
    return Instances(cols, sequences, index, folder)


def period_of_rows(n: int, fractions: list[float]) -> np.ndarray:
    """Period index per time-sorted row; cut points floor(cumsum(fractions)·n) (cumsum rounded to 10 digits)."""
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) == 0 or np.any(fr <= 0):
        raise DataError(f"period_fractions must be a non-empty list of positive numbers, got {fractions}")
    if abs(fr.sum() - 1.0) > 1e-6:
        raise DataError(f"period_fractions must sum to 1, got {fractions} (sum {fr.sum():.6f})")
    cuts = np.floor(np.round(np.cumsum(fr), 10) * n).astype(np.int64)
    cuts[-1] = n
    sizes = np.diff(np.r_[0, cuts])
    if np.any(sizes <= 0):
        empty = int(np.flatnonzero(sizes <= 0)[0])
        raise DataError(
            f"period {empty} would be empty: {n} interactions cut by period_fractions {fractions}; "
            f"use fewer periods or larger fractions"
        )
    return np.repeat(np.arange(len(fr), dtype=np.int16), sizes)


def build_sequences(table: InteractionTable, max_history: int, ws: Workspace) -> tuple[Sequences, np.ndarray]:
    """The per-user sequences (a stable counting sort of the rows by user) and each row's position in its
    user's sequence."""
    n, num_users = len(table), table.num_users
    rows = ws.rows(48)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(chunked_bincount(table.user, num_users, rows), out=offsets[1:])
    item, time = ws.array("seq_item", n, np.int32), ws.array("seq_timestamp", n, np.int64)
    rank = ws.array("rank", n, np.int32)
    fill = offsets[:-1].copy()
    for a, b in spans(n, rows):
        u = np.asarray(table.user[a:b])
        dest = scatter_grouped(u, fill)
        item[dest] = table.item[a:b]
        time[dest] = table.timestamp[a:b]
        rank[a:b] = dest - offsets[u]
    return Sequences(offsets, item, time, max_history), rank


def item_first_period(item: np.ndarray, period_rows: np.ndarray, num_items: int, rows: int = 1 << 22,
                      fill: int = NEVER, dtype=np.int16) -> np.ndarray:
    """First period each item appears in (``fill`` for items without a row)."""
    first = np.full(num_items, fill, dtype=dtype)
    for a, b in spans(len(item), rows):
        np.minimum.at(first, item[a:b], period_rows[a:b].astype(dtype))
    return first


def _instances(table: InteractionTable, seqs: Sequences, rank: np.ndarray, period_rows: np.ndarray,
               rule: Callable[[int, int], tuple[np.ndarray, np.ndarray]], ws: Workspace) -> Instances:
    """Instances of the rows ``rule(a, b)`` marks eligible (with their split), in time order."""
    n, rows = len(table), ws.rows(64)
    m = sum(int(rule(a, b)[0].sum()) for a, b in spans(n, rows))
    cols = {k: ws.array(f"inst_{k}", m, dt) for k, dt in INSTANCE_COLUMNS.items()}
    first_train = np.full(table.num_items, NEVER, dtype=np.int16)
    out = 0
    for a, b in spans(n, rows):
        ok, split = rule(a, b)
        r = a + np.flatnonzero(ok)
        at = slice(out, out + len(r))
        target, period, split = table.item[r], period_rows[r].astype(np.int16), split[ok].astype(np.int8)
        for k, v in (("user", table.user[r]), ("target", target), ("timestamp", table.timestamp[r]),
                     ("split", split), ("period", period), ("row", r), ("position", rank[r])):
            cols[k][at] = v
        train = split == TRAIN
        np.minimum.at(first_train, target[train], period[train])
        out += len(r)
    # first period each item appears in at all, and first period it is a training target
    first_seen = item_first_period(table.item, period_rows, table.num_items, rows)
    for a, b in spans(m, rows):
        target, period = cols["target"][a:b], cols["period"][a:b]
        cols["new_item"][a:b] = first_seen[target] == period
        cols["cold"][a:b] = first_train[target] > period
        cols["cold_prev"][a:b] = first_train[target] >= period
    return Instances({k: np.asarray(v) for k, v in cols.items()}, seqs)


def split_counts(inst: Instances, num_periods: int, rows: int = 1 << 22) -> np.ndarray:
    """(num_periods, 3) instance counts per period and split, chunk by chunk."""
    counts = np.zeros(num_periods * 3, dtype=np.int64)
    for a, b in spans(len(inst), rows):
        key = inst.period[a:b].astype(np.int64) * 3 + inst.split[a:b]
        counts += np.bincount(key, minlength=num_periods * 3)[: num_periods * 3]
    return counts.reshape(num_periods, 3)


def check_instances(inst: Instances, num_periods: int, advice: str) -> None:
    """Every period needs train, valid and test instances (each is trained on, validated and tested in turn);
    without this check an empty split fails only later, inside training. ``advice`` says what to change."""
    if len(inst) == 0:
        raise DataError(
            "no prediction instance at all: no interaction can be a target (a user's first interaction never is, "
            f"so users need at least 2 interactions); {advice}"
        )
    counts = split_counts(inst, num_periods)
    empty = np.flatnonzero((counts == 0).any(axis=1))
    if len(empty):
        shown = ", ".join(f"period {p} (train {counts[p, TRAIN]}, valid {counts[p, VALID]}, test {counts[p, TEST]})"
                          for p in empty)
        raise DataError(f"every period needs train, valid and test instances; missing in {shown}; {advice}")


def build_period_instances(
    table: InteractionTable, fractions: list[float], max_history: int = 20, check: bool = True,
    ws: Workspace | None = None,
):
    """Instances of the period protocol; returns (instances, period of each table row).

    ``check``: refuse a period without train, valid or test instances (off only for hand-built unit tests).
    """
    ws = ws or Workspace()
    period_rows = period_of_rows(len(table), fractions)
    seqs, rank = build_sequences(table, max_history, ws)
    ws.release()
    # rows of each user in periods <= p (periods are contiguous row ranges): a target's rank from the end of
    # its (user, period) group is cum[user, period] - 1 - its position
    n_periods = len(fractions)
    cuts = np.searchsorted(period_rows, np.arange(n_periods + 1))
    cum = np.empty((table.num_users, n_periods), dtype=np.int32)
    for p in range(n_periods):
        cum[:, p] = chunked_bincount(table.user[cuts[p]:cuts[p + 1]], table.num_users, ws.rows(16))
    np.cumsum(cum, axis=1, out=cum)

    def rule(a: int, b: int):
        pos = np.asarray(rank[a:b], dtype=np.int64)
        from_end = cum[table.user[a:b], period_rows[a:b]] - 1 - pos
        return pos > 0, np.where(from_end == 0, TEST, np.where(from_end == 1, VALID, TRAIN))  # first: never a target

    inst = _instances(table, seqs, rank, period_rows, rule, ws)
    ws.discard(rank)
    ws.release()
    if check:
        check_instances(inst, n_periods, (
            f"{len(table)} interactions cut by period_fractions {list(fractions)}: use fewer periods or larger "
            f"fractions, or more data"))
    return inst, period_rows


def build_timestamp_instances(table: InteractionTable, max_history: int = 20, check: bool = True,
                              ws: Workspace | None = None):
    """Instances of the official timestamp split (needs ``table.split``); all in period 0 (``check``: as above)."""
    if table.split is None:
        raise DataError("the timestamp protocol needs split labels (splits.csv or the official benchmark files)")
    ws = ws or Workspace()
    unlabelled = sum(int((table.split[a:b] < 0).sum()) for a, b in spans(len(table), ws.rows(8)))
    if unlabelled:
        raise DataError(f"{unlabelled} interactions have no split label")
    period_rows = np.zeros(len(table), dtype=np.int16)
    seqs, rank = build_sequences(table, max_history, ws)
    ws.release()

    def rule(a: int, b: int):
        labels = table.split[a:b]
        return (rank[a:b] > 0) & (labels <= TEST), labels

    inst = _instances(table, seqs, rank, period_rows, rule, ws)
    ws.discard(rank)
    ws.release()
    if check:
        check_instances(inst, 1, (
            "check the split labels (splits.csv or the official files): each of train, valid and test needs rows "
            "that are not a user's first interaction"))
    return inst, period_rows


def new_items_per_period(table: InteractionTable, period_rows: np.ndarray) -> list[np.ndarray]:
    """Items whose first interaction falls in each period (period 0: the initial catalogue)."""
    first = np.full(table.num_items, NEVER, dtype=np.int64)
    np.minimum.at(first, table.item, period_rows.astype(np.int64))
    n_periods = int(period_rows.max()) + 1 if len(period_rows) else 0
    return [np.flatnonzero(first == p) for p in range(n_periods)]
