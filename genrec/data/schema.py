"""Data model: interactions and item catalogue, with dense ids and named-source errors."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from genrec.errors import DataError  # also re-exported: the data layer's error

# Official split labels (timestamp protocol); -1 = no label.
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2, "history_only": 3}
SPLIT_NAMES = {v: k for k, v in SPLIT_CODES.items()}

ITEM_TEXT_FIELDS = ("title", "brand", "categories", "description")

# What a missing id turns into when a frame with nulls goes through astype(str) (or pandas' NA strings):
# never a real id, always an upstream loss, so refused like an empty cell.
MISSING_MARKERS = ("nan", "NaN", "None", "null", "NULL", "NA", "N/A", "<NA>")

# Largest accepted timestamp: any unix time in s/ms/µs fits, and int64 conversion can never overflow.
MAX_TIMESTAMP = 2**62


@dataclass(frozen=True)
class Origin:
    """Where table rows come from, so that messages name the file and the row as the user sees it.

    ``first`` is the number of row 0 (2 for a CSV with a header: data row i is file line i + 2; 1 for parquet);
    ``lines`` gives per-row line numbers instead (JSON lines, where blank lines are skipped).
    """

    source: str
    first: int = 2
    lines: np.ndarray | None = None

    def place(self, pos: int) -> str:
        """'line 7' / 'row 7' for the row at position ``pos``."""
        return f"line {int(self.lines[pos])}" if self.lines is not None else f"row {pos + self.first}"

    def at(self, pos: int, column: str) -> str:
        kind = "field" if self.lines is not None else "column"
        return f"{self.source}: {self.place(pos)}, {kind} '{column}'"


def show(value) -> str:
    """repr of a cell as the user wrote it (numpy scalars as plain Python values)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def first_bad(bad: pd.Series | np.ndarray, what: str) -> tuple[int, str]:
    """Position of the first flagged row and a note on how many more there are."""
    bad = np.asarray(bad, dtype=bool)
    n = int(bad.sum())
    return int(np.flatnonzero(bad)[0]), (f" ({n} {what} like this; first shown)" if n > 1 else "")


def is_id_value(value) -> bool:
    """Ids are strings or integers; floats (1.0 → '1.0'), bools, lists and dicts are refused."""
    return isinstance(value, (str, int, np.integer)) and not isinstance(value, (bool, np.bool_))


def require_columns(df, required: tuple[str, ...], source: str) -> None:
    """``df``: a DataFrame or the list of column names."""
    found = list(getattr(df, "columns", df))
    missing = [c for c in required if c not in found]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; expected columns {list(required)}, found {found}")


def check_unique_columns(names: list, source: str) -> None:
    """pandas renames a repeated header to ``name.1``: a silently lost column, so refuse it."""
    seen, dups = set(), []
    for name in names:
        if name in seen and name not in dups:
            dups.append(name)
        seen.add(name)
    if dups:
        raise DataError(f"{source}: duplicate column name(s) {dups} in the header {list(names)}; keep one of each")


def check_ids(values: pd.Series, where: Origin, column: str) -> pd.Series:
    """Non-empty string or integer ids, returned as strings (a missing id would become the string 'nan')."""
    if pd.api.types.infer_dtype(values, skipna=True) not in ("string", "integer", "empty"):
        bad = values.notna().to_numpy() & ~values.map(is_id_value).to_numpy(dtype=bool)  # NaN: missing, below
        if bad.any():
            pos, more = first_bad(bad, "rows")
            raise DataError(
                f"{where.at(pos, column)}: expected a string or integer id, got {show(values.iloc[pos])}{more}"
            )
    missing = values.isna()
    text = values.astype(object).where(~missing, "").astype(str)
    blank = missing.to_numpy() | (text.str.strip() == "").to_numpy() | text.isin(MISSING_MARKERS).to_numpy()
    if blank.any():
        pos, more = first_bad(blank, "rows")
        got = "" if missing.iloc[pos] else text.iloc[pos]
        raise DataError(f"{where.at(pos, column)}: expected a non-empty id, got {got!r}{more}")
    return text


def check_timestamps(values: pd.Series, where: Origin, column: str = "timestamp") -> np.ndarray:
    """Finite, integer, non-negative unix times up to MAX_TIMESTAMP, as int64 (1e20 would wrap to INT64_MIN)."""
    if pd.api.types.is_datetime64_any_dtype(values):
        raise DataError(
            f"{where.source}: column '{column}': expected integer unix times, got a {values.dtype} column "
            f"(convert it, e.g. df['{column}'].astype('int64') // 10**9 for seconds)"
        )
    numeric = pd.to_numeric(values, errors="coerce").astype(np.float64).to_numpy()
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(numeric) | (numeric < 0) | (numeric > MAX_TIMESTAMP) | (numeric != np.floor(numeric))
    if bad.any():
        pos, more = first_bad(bad, "rows")
        raise DataError(
            f"{where.at(pos, column)}: expected a non-negative integer (unix time) up to 2**62, "
            f"got {show(values.iloc[pos])}{more}"
        )
    # through float64 only when the values are not int64 already (floats lose precision above 2**53)
    if pd.api.types.is_integer_dtype(values):
        return values.to_numpy().astype(np.int64)
    return numeric.astype(np.int64)


# ----------------------------------------------------------------------------- arrow fast paths
# Each takes one arrow column of a chunk and returns the checked values when they are certainly valid under the
# pandas check above, or None: then the caller runs that check on the chunk, which names the first bad row (or
# accepts values the fast path is too strict for, e.g. integral float timestamps).
_PY_WHITESPACE = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())  # what str.strip strips
_MARKERS = pa.array(MISSING_MARKERS)


def _single(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def arrow_ids(col) -> pa.Array | None:
    """Non-empty string (or integer) ids as a string array, as ``check_ids`` would return them."""
    col = _single(col)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_integer(col.type):
        col = pc.cast(col, pa.string())
    elif not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return None
    if col.null_count:
        return None
    blank = pc.equal(pc.utf8_length(pc.utf8_trim(col, characters=_PY_WHITESPACE)), 0)
    if pc.any(blank).as_py() or pc.any(pc.is_in(col, value_set=_MARKERS)).as_py():
        return None
    return col


def arrow_timestamps(col) -> np.ndarray | None:
    """Integer unix times in [0, MAX_TIMESTAMP] as int64, from integer or decimal-string cells."""
    col = _single(col)
    if not (pa.types.is_integer(col.type) or pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return None
    try:
        col = pc.cast(col, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if col.null_count:
        return None
    values = col.to_numpy()
    if len(values) and (values.min() < 0 or values.max() > MAX_TIMESTAMP):
        return None
    return values


def arrow_numbers(col) -> np.ndarray | None:
    """Numeric cells as float64 (nulls → NaN), like ``pd.to_numeric``; None for text that is not all numbers."""
    col = _single(col)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_string(col.type)
            or pa.types.is_large_string(col.type)):
        return None
    try:
        col = pc.cast(col, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return col.to_numpy(zero_copy_only=False)


def arrow_labels(col, labels) -> np.ndarray | None:
    """Index of each cell in ``labels`` (int8) when every cell is one of them."""
    col = _single(col)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return None
    idx = pc.index_in(col, value_set=pa.array(list(labels)))
    if idx.null_count:
        return None
    return idx.to_numpy().astype(np.int8)


@dataclass
class RawData:
    """What a source yields before preprocessing: string ids, one row per interaction."""

    interactions: pd.DataFrame  # user_id, item_id (str), timestamp (int64)[, rating][, split]
    items: pd.DataFrame  # item_id (str) + any of ITEM_TEXT_FIELDS
    source: str  # human-readable origin for messages
    counts: dict[str, int] = field(default_factory=dict)  # reader-side facts for the preprocessing report


@dataclass
class InteractionTable:
    """Interactions with dense ids, sorted by (timestamp, original order)."""

    user: np.ndarray  # int64 dense user index
    item: np.ndarray  # int64 dense item index
    timestamp: np.ndarray  # int64
    user_ids: np.ndarray  # raw id of each dense user
    item_ids: np.ndarray  # raw id of each dense item
    rating: np.ndarray | None = None
    split: np.ndarray | None = None  # int8 official split label, see SPLIT_CODES

    def __len__(self) -> int:
        return len(self.user)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


@dataclass
class ItemCatalog:
    """Item metadata aligned with the dense item index (row i ↔ item i)."""

    item_ids: np.ndarray
    fields: dict[str, list] = field(default_factory=dict)  # name → list (None where missing)

    def __len__(self) -> int:
        return len(self.item_ids)

    def to_frame(self) -> pd.DataFrame:
        df = pd.DataFrame({"item_id": self.item_ids})
        for name, values in self.fields.items():
            df[name] = values
        return df
