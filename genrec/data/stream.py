"""Interactions as a stream of chunks: what every reader yields and preparation consumes.

A chunk holds integer codes, never a Python object per row: string ids are dictionary-encoded per chunk and only
the chunk's distinct ids meet the (growing) vocabulary. The synthetic source has integer ids to begin with; their
strings are formatted only for the ids that survive preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from genrec.data.schema import SPLIT_CODES, SPLIT_NAMES, RawData


@dataclass
class Chunk:
    user: np.ndarray  # int64 codes of the stream's user vocabulary
    item: np.ndarray  # int64 codes of its item vocabulary
    timestamp: np.ndarray  # int64
    rating: np.ndarray | None = None  # float32 (NaN: missing)
    split: np.ndarray | None = None  # int8 SPLIT_CODES


class StringVocab:
    """Raw string ids → codes in order of first appearance (one Python string per distinct id)."""

    def __init__(self):
        self._code: dict[str, int] = {}
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._ids)

    def encode(self, col: pa.Array) -> np.ndarray:
        enc = pc.dictionary_encode(col)
        lut = np.fromiter((self._add(s) for s in enc.dictionary.to_pylist()), np.int64, len(enc.dictionary))
        return lut[enc.indices.to_numpy(zero_copy_only=False)]

    def _add(self, s: str) -> int:
        code = self._code.get(s)
        if code is None:
            code = self._code[s] = len(self._ids)
            self._ids.append(s)
        return code

    def ids(self, codes: np.ndarray) -> np.ndarray:
        table = np.asarray(self._ids, dtype=object)
        return table[np.asarray(codes, dtype=np.int64)] if len(table) else np.empty(0, dtype=object)


class FormatVocab:
    """Integer codes whose id is ``prefix`` + the code zero-padded to ``width`` digits (the synthetic ids)."""

    def __init__(self, prefix: str, width: int, size: int):
        self.prefix, self.width, self.size = prefix, width, size

    def __len__(self) -> int:
        return self.size

    def ids(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        return np.char.add(self.prefix, np.char.zfill(codes.astype(str), self.width)).astype(object)


@dataclass
class Stream:
    """A source's interactions in file order, chunk by chunk (one pass), and its item table.

    ``items()`` is read after the chunks (so errors come in the order the readers always gave them); ``counts``
    (reader facts for the preprocessing report) is complete once the chunks are consumed.
    """

    chunks: Iterator[Chunk]
    items: Callable[[], pd.DataFrame]
    source: str
    users: StringVocab | FormatVocab
    item_vocab: StringVocab | FormatVocab
    counts: dict[str, int] = field(default_factory=dict)

    def to_raw(self, sort: bool = False) -> RawData:
        """All chunks as one ``RawData`` frame (small data: the readers' public API); ``sort``: by time, stable."""
        parts = list(self.chunks)
        cat = {k: _column(parts, k) for k in ("user", "item", "timestamp", "rating", "split")}
        if not parts:
            cat.update(user=np.empty(0, np.int64), item=np.empty(0, np.int64), timestamp=np.empty(0, np.int64))
        frame = {"user_id": self.users.ids(cat["user"]), "item_id": self.item_vocab.ids(cat["item"]),
                 "timestamp": cat["timestamp"].astype(np.int64)}
        if cat["split"] is not None:
            frame["split"] = np.asarray([SPLIT_NAMES[c] for c in range(len(SPLIT_NAMES))], dtype=object)[cat["split"]]
        if cat["rating"] is not None:
            frame["rating"] = cat["rating"]
        inter = pd.DataFrame(frame)
        if sort:
            inter = inter.sort_values("timestamp", kind="stable").reset_index(drop=True)
        return RawData(inter, self.items(), self.source, self.counts)


def _column(parts: list[Chunk], name: str) -> np.ndarray | None:
    """One column over all chunks; chunks without it (a file without ratings) are NaN / -1 there."""
    values = [getattr(c, name) for c in parts]
    if all(v is None for v in values):
        return None
    dtype = next(v for v in values if v is not None).dtype
    fill = np.nan if dtype.kind == "f" else -1
    return np.concatenate([v if v is not None else np.full(len(c.user), fill, dtype) for v, c in zip(values, parts)])


def stream_from_raw(raw: RawData, rows: int = 1 << 20) -> Stream:
    """A ``RawData`` frame (already checked by its reader) as a stream."""
    users, items = StringVocab(), StringVocab()
    df = raw.interactions

    def chunks():
        for a in range(0, len(df), rows):
            part = df.iloc[a: a + rows]
            split = None
            if "split" in part:
                split = part["split"].map(SPLIT_CODES).fillna(-1).to_numpy().astype(np.int8)
            yield Chunk(
                users.encode(pa.array(part["user_id"].astype(str).to_numpy(dtype=object), pa.string())),
                items.encode(pa.array(part["item_id"].astype(str).to_numpy(dtype=object), pa.string())),
                part["timestamp"].to_numpy().astype(np.int64),
                part["rating"].to_numpy().astype(np.float32) if "rating" in part else None,
                split,
            )

    return Stream(chunks(), lambda: raw.items, raw.source, users, items, dict(raw.counts))
