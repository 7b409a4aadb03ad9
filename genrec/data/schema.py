"""Data model: interactions and item catalogue, with dense ids and named-source errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from genrec.errors import DataError  # noqa: F401  (re-exported: the data layer's error)

# Official split labels (timestamp protocol); -1 = no label.
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2, "history_only": 3}
SPLIT_NAMES = {v: k for k, v in SPLIT_CODES.items()}

ITEM_TEXT_FIELDS = ("title", "brand", "categories", "description")


def require_columns(df: pd.DataFrame, required: tuple[str, ...], source: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; expected columns {list(required)}, found {list(df.columns)}"
        )


def check_timestamps(values: pd.Series, source: str, column: str = "timestamp", row_offset: int = 2) -> np.ndarray:
    """Integer, non-negative timestamps; the error names the first bad row (1-based file line by default)."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() | (numeric < 0) | (numeric != np.floor(numeric))
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{source}: row {pos + row_offset}, column '{column}': expected a non-negative integer (unix time), "
            f"got {values.iloc[pos]!r}"
        )
    return numeric.to_numpy().astype(np.int64)


@dataclass
class RawData:
    """What a source yields before preprocessing: string ids, one row per interaction."""

    interactions: pd.DataFrame  # user_id, item_id (str), timestamp (int64)[, rating][, split]
    items: pd.DataFrame  # item_id (str) + any of ITEM_TEXT_FIELDS
    source: str  # human-readable origin for messages


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
