"""Period and timestamp protocols → prediction instances with histories and warm/cold/new labels.

Everything is vectorised over rows (no per-user Python loop): 1M interactions take seconds.

Period protocol (specs/dact.md §2.2): interactions (time-sorted, ties in file order) are cut into periods by
cumulative fractions of the row count. Inside a period, for each user the interactions that are not the
user's first ever are targets: the last is ``test``, the second last ``valid``, the rest ``train``. Histories reach
back across periods and hold the last ``max_history`` items before the target.

Timestamp protocol: the source's own split labels (train/valid/test; history_only rows are never targets),
all in period 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from genrec.data.schema import DataError, InteractionTable

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_OF = {"train": TRAIN, "valid": VALID, "test": TEST}
NEVER = np.iinfo(np.int16).max  # "never a training target"


@dataclass
class Instances:
    """One row per next-item prediction instance (struct of arrays)."""

    user: np.ndarray  # int64
    target: np.ndarray  # int64 item index
    history: np.ndarray  # int64 (n, max_history), left-padded with -1, oldest first
    timestamp: np.ndarray  # int64, time of the target interaction
    split: np.ndarray  # int8: 0 train, 1 valid, 2 test
    period: np.ndarray  # int16
    row: np.ndarray  # int64 index of the target interaction in the InteractionTable
    new_item: np.ndarray  # bool: the target's first interaction falls in this period
    cold: np.ndarray  # bool: target never a train target up to and including this period
    cold_prev: np.ndarray  # bool: target never a train target before this period (previous period's model)

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask: np.ndarray) -> Instances:
        return Instances(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    def where(self, split: int | None = None, period: int | None = None) -> Instances:
        mask = np.ones(len(self), dtype=bool)
        if split is not None:
            mask &= self.split == split
        if period is not None:
            mask &= self.period == period
        return self.select(mask)


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


def _user_sorted(table: InteractionTable) -> tuple[np.ndarray, np.ndarray]:
    """Row order grouped by user (time order inside) and, per sorted position, the group start."""
    order = np.lexsort((np.arange(len(table)), table.user))
    users = table.user[order]
    first = np.r_[True, users[1:] != users[:-1]]
    starts = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    return order, starts


def _histories(item_sorted: np.ndarray, pos: np.ndarray, starts: np.ndarray, max_history: int) -> np.ndarray:
    idx = pos[:, None] - max_history + np.arange(max_history)[None, :]
    ok = idx >= starts[pos][:, None]
    return np.where(ok, item_sorted[np.maximum(idx, 0)], -1)


def _finish(
    table: InteractionTable,
    order: np.ndarray,
    starts: np.ndarray,
    pos: np.ndarray,
    split: np.ndarray,
    period_rows: np.ndarray,
    max_history: int,
) -> Instances:
    rows = order[pos]
    item_sorted = table.item[order]
    target = table.item[rows]
    period = period_rows[rows].astype(np.int16)
    # first period each item appears in at all, and first period it is a training target
    first_seen = np.full(table.num_items, NEVER, dtype=np.int16)
    np.minimum.at(first_seen, table.item, period_rows.astype(np.int16))
    first_train = np.full(table.num_items, NEVER, dtype=np.int16)
    is_train = split == TRAIN
    np.minimum.at(first_train, target[is_train], period[is_train])
    # keep time order of instances (stable on table row)
    by_time = np.argsort(rows, kind="stable")
    inst = Instances(
        user=table.user[rows],
        target=target,
        history=_histories(item_sorted, pos, starts, max_history),
        timestamp=table.timestamp[rows],
        split=split.astype(np.int8),
        period=period,
        row=rows.astype(np.int64),
        new_item=first_seen[target] == period,
        cold=first_train[target] > period,
        cold_prev=first_train[target] >= period,
    )
    return inst.select(by_time)


def check_instances(inst: Instances, num_periods: int, advice: str) -> None:
    """Every period needs train, valid and test instances (each is trained on, validated and tested in turn);
    without this check an empty split fails only later, inside training. ``advice`` says what to change."""
    if len(inst) == 0:
        raise DataError(
            "no prediction instance at all: no interaction can be a target (a user's first interaction never is, "
            f"so users need at least 2 interactions); {advice}"
        )
    counts = np.bincount(inst.period.astype(np.int64) * 3 + inst.split, minlength=num_periods * 3)
    counts = counts.reshape(num_periods, 3)
    empty = np.flatnonzero((counts == 0).any(axis=1))
    if len(empty):
        shown = ", ".join(f"period {p} (train {counts[p, TRAIN]}, valid {counts[p, VALID]}, test {counts[p, TEST]})"
                          for p in empty)
        raise DataError(f"every period needs train, valid and test instances; missing in {shown}; {advice}")


def build_period_instances(
    table: InteractionTable, fractions: list[float], max_history: int = 20, check: bool = True
):
    """Instances of the period protocol; returns (instances, period of each table row).

    ``check``: refuse a period without train, valid or test instances (off only for hand-built unit tests).
    """
    period_rows = period_of_rows(len(table), fractions)
    order, starts = _user_sorted(table)
    n = len(order)
    sorted_period = period_rows[order]
    eligible = np.arange(n) != starts  # a user's first interaction is never a target
    pos = np.flatnonzero(eligible)
    # (user, period) groups are contiguous in user-sorted order; rank each eligible row from its group's end
    key = table.user[order][pos] * (len(fractions) + 1) + sorted_period[pos]
    last_of_group = np.r_[key[1:] != key[:-1], True]
    group_end = np.minimum.accumulate(np.where(last_of_group, np.arange(len(pos)), len(pos))[::-1])[::-1]
    rank_from_end = group_end - np.arange(len(pos))
    split = np.where(rank_from_end == 0, TEST, np.where(rank_from_end == 1, VALID, TRAIN))
    inst = _finish(table, order, starts, pos, split, period_rows, max_history)
    if check:
        check_instances(inst, len(fractions), (
            f"{len(table)} interactions cut by period_fractions {list(fractions)}: use fewer periods or larger "
            f"fractions, or more data"))
    return inst, period_rows


def build_timestamp_instances(table: InteractionTable, max_history: int = 20, check: bool = True):
    """Instances of the official timestamp split (needs ``table.split``); all in period 0 (``check``: as above)."""
    if table.split is None:
        raise DataError("the timestamp protocol needs split labels (splits.csv or the official benchmark files)")
    if np.any(table.split < 0):
        raise DataError(f"{int((table.split < 0).sum())} interactions have no split label")
    period_rows = np.zeros(len(table), dtype=np.int16)
    order, starts = _user_sorted(table)
    labels = table.split[order]
    eligible = (np.arange(len(order)) != starts) & (labels <= TEST)
    pos = np.flatnonzero(eligible)
    inst = _finish(table, order, starts, pos, labels[pos], period_rows, max_history)
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
