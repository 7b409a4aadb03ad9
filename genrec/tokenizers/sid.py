"""Semantic-ID table: item ↔ (c_1..c_L, suffix), token mapping, collisions, diffs, persistence.

Layout (specs/README.md decision 2): L residual levels of K codes plus a collision suffix of S
values, so every item has L+1 tokens. Token ids share one vocabulary with per-level offsets:

    token(level l, code c) = 1 + l*K + c        for l in 0..L-1
    token(suffix s)        = 1 + L*K + s
    0 is padding / decoder start.

Suffixes are 0-based: the first item of a prefix gets 0 (TIGER-style collision index).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

PAD_TOKEN = 0


class SuffixOverflowError(ValueError):
    """More items share one L-level prefix than the suffix can tell apart."""


def _prefix_keys(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """One int64 key per row of ``codes`` (mixed radix K)."""
    codes = np.asarray(codes, dtype=np.int64)
    key = np.zeros(codes.shape[0], dtype=np.int64)
    for level in range(codes.shape[1]):
        key = key * codebook_size + codes[:, level]
    return key


def _overflow(codes_row: np.ndarray, count: int, suffix_size: int) -> SuffixOverflowError:
    return SuffixOverflowError(
        f"{count} items share the semantic-ID prefix {tuple(int(c) for c in codes_row)}, but the suffix "
        f"holds only {suffix_size} values; raise `suffix_size`, train the tokenizer longer, or enable "
        f"balanced last-level assignment"
    )


def assign_suffixes(
    codes: np.ndarray,
    suffix_size: int,
    codebook_size: int,
    kept_suffix: np.ndarray | None = None,
) -> np.ndarray:
    """Collision suffix for every row of ``codes`` (shape n×L), in row order.

    Without ``kept_suffix`` each item gets its 0-based rank among the items sharing its prefix.
    With ``kept_suffix`` (n,, -1 = free) rows that keep a suffix keep it untouched and every free
    row takes the smallest suffix not used in its prefix (relaxed-to-strict reassignment and new
    items; decision 2). Raises ``SuffixOverflowError`` naming the crowded prefix.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n = codes.shape[0]
    keys = _prefix_keys(codes, codebook_size)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if n else np.zeros(0, int)
    group_sizes = np.diff(np.r_[starts, n])
    if kept_suffix is None:
        if n and group_sizes.max() > suffix_size:
            g = int(np.argmax(group_sizes))
            raise _overflow(codes[order[starts[g]]], int(group_sizes[g]), suffix_size)
        rank = np.arange(n) - np.repeat(starts, group_sizes)
        suffix = np.empty(n, dtype=np.int64)
        suffix[order] = rank
        return suffix

    kept_suffix = np.asarray(kept_suffix, dtype=np.int64)
    if kept_suffix.shape != (n,):
        raise ValueError(f"kept_suffix must have shape ({n},), got {kept_suffix.shape}")
    suffix = kept_suffix.copy()
    free = suffix < 0
    if not free.any():
        _check_unique(codes, suffix, codebook_size, suffix_size)
        return suffix
    group_of_row = np.empty(n, dtype=np.int64)
    group_of_row[order] = np.repeat(np.arange(len(starts)), group_sizes)
    # Only prefixes that receive a free row need work; loop over those groups alone.
    for g in np.unique(group_of_row[free]):
        rows = order[starts[g] : starts[g] + group_sizes[g]]
        if len(rows) > suffix_size:
            raise _overflow(codes[rows[0]], len(rows), suffix_size)
        taken = suffix[rows][suffix[rows] >= 0]
        if len(np.unique(taken)) != len(taken):
            raise ValueError(f"kept suffixes collide inside prefix {tuple(codes[rows[0]].tolist())}")
        available = np.setdiff1d(np.arange(suffix_size), taken)
        free_rows = rows[suffix[rows] < 0]  # rows are in row order within a group (stable sort)
        suffix[free_rows] = available[: len(free_rows)]
    return suffix


def _check_unique(codes: np.ndarray, suffix: np.ndarray, codebook_size: int, suffix_size: int) -> None:
    full = _prefix_keys(codes, codebook_size) * suffix_size + suffix
    if len(np.unique(full)) != len(full):
        raise ValueError("semantic IDs are not unique: two items share the same codes and suffix")


@dataclass
class SemanticIdTable:
    """Semantic IDs of a catalogue. ``items`` are dense item indices (int64)."""

    items: np.ndarray  # (n,) int64
    codes: np.ndarray  # (n, L) int64 in [0, K)
    suffix: np.ndarray  # (n,) int64 in [0, S)
    codebook_size: int = 256
    suffix_size: int = 256

    def __post_init__(self) -> None:
        self.items = np.asarray(self.items, dtype=np.int64)
        self.codes = np.asarray(self.codes, dtype=np.int64)
        self.suffix = np.asarray(self.suffix, dtype=np.int64)
        n = len(self.items)
        if self.codes.ndim != 2 or self.codes.shape[0] != n or self.suffix.shape != (n,):
            raise ValueError(
                f"inconsistent SID table shapes: items {self.items.shape}, codes {self.codes.shape}, "
                f"suffix {self.suffix.shape}"
            )
        if n and (self.codes.min() < 0 or self.codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        if n and (self.suffix.min() < 0 or self.suffix.max() >= self.suffix_size):
            raise ValueError(f"suffixes must lie in [0, {self.suffix_size})")
        if len(np.unique(self.items)) != n:
            raise ValueError("an item appears twice in the SID table")
        _check_unique(self.codes, self.suffix, self.codebook_size, self.suffix_size)
        self._index: dict | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_codes(
        cls,
        items: np.ndarray,
        codes: np.ndarray,
        codebook_size: int = 256,
        suffix_size: int = 256,
    ) -> SemanticIdTable:
        """Table with TIGER collision suffixes assigned in the given item order."""
        suffix = assign_suffixes(codes, suffix_size, codebook_size)
        return cls(items, codes, suffix, codebook_size, suffix_size)

    # ----------------------------------------------------------------- shape facts
    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_levels(self) -> int:
        """Residual levels L (the suffix is one more token)."""
        return self.codes.shape[1]

    @property
    def sid_length(self) -> int:
        return self.num_levels + 1

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_levels * self.codebook_size + self.suffix_size

    def level_sizes(self) -> list[int]:
        """Number of values at each SID position (L levels + suffix)."""
        return [self.codebook_size] * self.num_levels + [self.suffix_size]

    def level_offsets(self) -> np.ndarray:
        """Token id of value 0 at each SID position."""
        return 1 + np.arange(self.sid_length, dtype=np.int64) * self.codebook_size

    # ----------------------------------------------------------------- tokens
    def full_codes(self) -> np.ndarray:
        """(n, L+1) values per position: codes then suffix."""
        return np.concatenate([self.codes, self.suffix[:, None]], axis=1)

    def tokens(self) -> np.ndarray:
        """(n, L+1) token ids in the shared vocabulary, row i ↔ ``items[i]``."""
        return self.full_codes() + self.level_offsets()[None, :]

    def tokens_of(self, items: np.ndarray) -> np.ndarray:
        """Token ids of the given items (any shape); raises on unknown items."""
        return self.tokens()[self.rows_of(items)]

    def rows_of(self, items: np.ndarray) -> np.ndarray:
        items = np.asarray(items, dtype=np.int64)
        order, sorted_items = self._item_index()
        pos = np.searchsorted(sorted_items, items)
        pos = np.clip(pos, 0, len(sorted_items) - 1)
        if not np.all(sorted_items[pos] == items):
            missing = np.asarray(items)[sorted_items[pos] != items]
            raise KeyError(f"items without a semantic ID: {missing[:10].tolist()}")
        return order[pos]

    def items_of_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Map (..., L+1) token ids back to items; -1 where no item has that SID."""
        tokens = np.asarray(tokens, dtype=np.int64)
        values = tokens - self.level_offsets()
        keys = self._full_key(values.reshape(-1, self.sid_length))
        key_order, sorted_keys = self._key_index()
        pos = np.clip(np.searchsorted(sorted_keys, keys), 0, max(len(sorted_keys) - 1, 0))
        flat = values.reshape(-1, self.sid_length)
        in_range = np.all((flat >= 0) & (flat < np.asarray(self.level_sizes())[None, :]), axis=1)
        valid = (sorted_keys[pos] == keys) & in_range
        out = np.where(valid, self.items[key_order[pos]], -1)
        return out.reshape(tokens.shape[:-1])

    def _full_key(self, full_codes: np.ndarray) -> np.ndarray:
        return _prefix_keys(full_codes[:, :-1], self.codebook_size) * self.suffix_size + full_codes[:, -1]

    def _item_index(self):
        if self._index is None:
            self._index = {}
        if "items" not in self._index:
            order = np.argsort(self.items, kind="stable")
            self._index["items"] = (order, self.items[order])
        return self._index["items"]

    def _key_index(self):
        if self._index is None:
            self._index = {}
        if "keys" not in self._index:
            keys = self._full_key(self.full_codes())
            order = np.argsort(keys, kind="stable")
            self._index["keys"] = (order, keys[order])
        return self._index["keys"]

    # ----------------------------------------------------------------- quality
    def collision_rate(self) -> float:
        """Share of items whose L-level code (before the suffix) is not unique: 1 − #prefixes / n."""
        if self.num_items == 0:
            return 0.0
        n_unique = len(np.unique(_prefix_keys(self.codes, self.codebook_size)))
        return 1.0 - n_unique / self.num_items

    def unique_sid_rate(self) -> float:
        """Share of distinct full SIDs (1.0 by construction; measured, not assumed)."""
        if self.num_items == 0:
            return 1.0
        return len(np.unique(self._full_key(self.full_codes()))) / self.num_items

    def codebook_usage(self) -> list[float]:
        """Share of the K codes used at each level."""
        return [len(np.unique(self.codes[:, level])) / self.codebook_size for level in range(self.num_levels)]

    # ----------------------------------------------------------------- change tracking
    def diff(self, newer: SemanticIdTable) -> dict[str, float]:
        """Code-change rates from ``self`` to ``newer`` over the items both hold (DACT Table 4).

        Keys: ``level{1..L}``, ``suffix`` (per position) and ``overall`` (any token changed), plus
        ``num_common_items`` and ``num_new_items``.
        """
        common, rows_old, rows_new = np.intersect1d(self.items, newer.items, return_indices=True)
        old_full = self.full_codes()[rows_old]
        new_full = newer.full_codes()[rows_new]
        changed = old_full != new_full
        out: dict[str, float] = {}
        n = max(len(common), 1)
        for level in range(self.num_levels):
            out[f"level{level + 1}"] = float(changed[:, level].sum() / n)
        out["suffix"] = float(changed[:, -1].sum() / n)
        out["overall"] = float(changed.any(axis=1).sum() / n)
        out["num_common_items"] = float(len(common))
        out["num_new_items"] = float(len(np.setdiff1d(newer.items, self.items)))
        return out

    # ----------------------------------------------------------------- persistence
    def content_hash(self) -> str:
        """sha256 over items, codes, suffixes and sizes (stable across save/load)."""
        h = hashlib.sha256()
        order = np.argsort(self.items, kind="stable")
        for arr in (self.items[order], self.codes[order], self.suffix[order]):
            h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
        h.update(json.dumps([self.codebook_size, self.suffix_size, self.num_levels]).encode())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> str:
        """Write a parquet file (atomically); returns the content hash stored in its metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {"item": pa.array(self.items)}
        for level in range(self.num_levels):
            cols[f"c{level + 1}"] = pa.array(self.codes[:, level])
        cols["suffix"] = pa.array(self.suffix)
        digest = self.content_hash()
        meta = {
            "genrec.sid": json.dumps(
                {"codebook_size": self.codebook_size, "suffix_size": self.suffix_size, "hash": digest}
            )
        }
        table = pa.table(cols).replace_schema_metadata(meta)
        from genrec.files import atomic_write

        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        return digest

    @classmethod
    def load(cls, path: str | os.PathLike) -> SemanticIdTable:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"genrec.sid")
        if raw is None:
            raise ValueError(f"{path}: not a genrec SID table (missing 'genrec.sid' metadata)")
        meta = json.loads(raw)
        levels = sorted((c for c in table.column_names if c.startswith("c")), key=lambda c: int(c[1:]))
        codes = np.stack([table[c].to_numpy() for c in levels], axis=1)
        out = cls(
            table["item"].to_numpy(), codes, table["suffix"].to_numpy(), meta["codebook_size"], meta["suffix_size"]
        )
        if out.content_hash() != meta["hash"]:
            raise ValueError(f"{path}: content hash mismatch (file corrupted or edited by hand)")
        return out
