"""Big arrays of the data pipeline: in memory while they fit ``data.memory_budget_gb``, else memory-mapped ``.npy``
files in a scratch folder; every pass over them runs in chunks sized from the budget, so the same code (and the
same output) serves 10k and 100M interactions.

Also the two vectorised building blocks everything else sorts and groups with: ``stable_argsort`` (radix passes of
packed (key, position) int64 sorts, much faster than numpy's stable argsort) and ``scatter_grouped`` (one chunk of a
stable counting sort).
"""

from __future__ import annotations

import mmap
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MIN_CHUNK = 64  # rows; a tiny budget (tests) still makes progress


class Workspace:
    """Where the pipeline keeps arrays. ``spill`` (set by ``plan``) puts new arrays on disk in ``root``."""

    def __init__(self, budget_gb: float = 4.0, root: str | Path | None = None):
        self.budget = max(int(budget_gb * 2**30), 1)
        self.root = Path(root) if root is not None else None
        self.spill = False
        self._dir: Path | None = None
        self._files = 0
        self._maps: list[weakref.ref] = []

    def __getstate__(self) -> dict:
        # a copy (pickled with a dataset whose arrays travel by value) owns no scratch files
        return {**self.__dict__, "_dir": None, "_maps": []}

    def plan(self, rows: int, bytes_per_row: int) -> None:
        """Spill from now on when ``rows`` arrays of ``bytes_per_row`` in all would exceed the budget."""
        self.spill = rows * bytes_per_row > self.budget

    def rows(self, bytes_per_row: int) -> int:
        """Rows per chunk for a pass whose temporaries take ``bytes_per_row``: a quarter of the budget."""
        return max(self.budget // (4 * bytes_per_row), MIN_CHUNK)

    @property
    def dir(self) -> Path:
        if self._dir is None:
            if self.root is not None:
                self.root.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="genrec-scratch-", dir=self.root)).resolve()
            weakref.finalize(self, shutil.rmtree, str(self._dir), True)  # gone with the workspace (and its arrays)
        return self._dir

    def path(self, name: str, suffix: str = ".npy") -> Path:
        self._files += 1
        return self.dir / f"{self._files:03d}-{name}{suffix}"

    def array(self, name: str, n: int, dtype) -> np.ndarray:
        """An uninitialised (n,) array: in memory, or a ``.npy`` memory map when spilling."""
        if not self.spill or n == 0:
            return np.empty(n, dtype)
        return self._track(np.lib.format.open_memmap(self.path(name), mode="w+", dtype=dtype, shape=(n,)))

    def _track(self, arr: np.memmap) -> np.memmap:
        self._maps = [r for r in self._maps if r() is not None] + [weakref.ref(arr)]
        return arr

    def release(self) -> None:
        """Unmap the pages of every spilled array from this process (the data stays in the files and the page
        cache): between passes, resident memory then holds only what the next pass touches."""
        for ref in self._maps:
            m = getattr(ref(), "_mmap", None)
            if m is not None and not m.closed and hasattr(m, "madvise"):
                m.madvise(mmap.MADV_DONTNEED)

    def discard(self, *arrays) -> None:
        """Delete the scratch files behind intermediate arrays (a memory map stays valid until it is dropped)."""
        for arr in arrays:
            base = arr if isinstance(arr, np.memmap) else getattr(arr, "base", None)
            name = getattr(base, "filename", None)
            if self._dir is not None and name and Path(name).parent == self._dir:
                Path(name).unlink(missing_ok=True)

    def appender(self, name: str, dtype) -> Appender:
        return Appender(self, name, dtype)

    def take(self, name: str, src: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``src[idx]`` built chunk by chunk (``src`` may be a memory map)."""
        out = self.array(name, len(idx), src.dtype)
        for a, b in spans(len(idx), self.rows(16)):
            out[a:b] = src[idx[a:b]]
        return out


class Appender:
    """A column of unknown length built chunk by chunk: in memory up to an eighth of the budget, then a raw file."""

    def __init__(self, ws: Workspace, name: str, dtype):
        self.ws, self.name, self.dtype = ws, name, np.dtype(dtype)
        self.parts: list[np.ndarray] = []
        self.n = 0
        self._file = None
        self._path: Path | None = None

    def __len__(self) -> int:
        return self.n

    def add(self, values) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if self._file is None and (self.n + len(values)) * self.dtype.itemsize > self.ws.budget // 8:
            self._path = self.ws.path(self.name, ".bin")
            self._file = open(self._path, "wb")  # noqa: SIM115 (open across add() calls, closed by finish())
            for part in self.parts:
                part.tofile(self._file)
            self.parts = []
        if self._file is not None:
            values.tofile(self._file)
        else:
            self.parts.append(values)
        self.n += len(values)

    def finish(self) -> np.ndarray:
        if self._file is None:
            return np.concatenate(self.parts) if self.parts else np.empty(0, self.dtype)
        self._file.close()
        return self.ws._track(np.memmap(self._path, dtype=self.dtype, mode="r+", shape=(self.n,)))


def spans(n: int, rows: int) -> Iterator[tuple[int, int]]:
    """[a, b) chunks covering range(n)."""
    for a in range(0, n, max(int(rows), 1)):
        yield a, min(a + rows, n)


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for integer keys, as LSD radix passes: each pass sorts int64 values that
    pack a digit of ``keys - min`` above the row position (unique values, so numpy's fast sort is stable)."""
    keys = np.asarray(keys)
    n = len(keys)
    if n < 2:
        return np.arange(n, dtype=np.int64)
    bits = (n - 1).bit_length()
    width = 63 - bits
    lo, hi = int(keys.min()), int(keys.max())
    if width < 8 or hi - lo >= 2**63 or keys.dtype.kind not in "iub":
        return np.argsort(keys, kind="stable")
    rel = keys.astype(np.int64) - np.int64(lo) if lo else keys.astype(np.int64, copy=False)
    mask = np.int64((1 << bits) - 1)
    pos = np.arange(n, dtype=np.int64)
    order, shift, span = None, 0, hi - lo
    while True:
        digit = rel >> np.int64(shift) if shift else rel
        if span >> (shift + width):
            digit = digit & np.int64((1 << width) - 1)
        if order is not None:
            digit = digit[order]
        packed = (digit << np.int64(bits)) | pos
        packed.sort()
        perm = packed & mask
        order = perm if order is None else order[perm]
        shift += width
        if not span >> shift:
            return order


def scatter_grouped(keys: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """One chunk of a stable counting sort: the destination of each row when rows are grouped by ``keys`` (arrival
    order inside a group). ``fill[k]`` is group k's next free slot; it is advanced here."""
    o = stable_argsort(keys)
    ks = keys[o]
    first = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    length = np.diff(np.r_[first, len(ks)])
    dest = np.empty(len(keys), dtype=np.int64)
    dest[o] = fill[ks] + (np.arange(len(ks)) - np.repeat(first, length))
    fill[ks[first]] += length
    return dest


def first_appearance(codes: np.ndarray) -> np.ndarray:
    """Distinct values of ``codes`` in order of first appearance."""
    if len(codes) == 0:
        return np.empty(0, dtype=np.int64)
    o = stable_argsort(codes)
    s = codes[o]
    start = np.r_[True, s[1:] != s[:-1]]
    return s[start][np.argsort(o[start])]


class DenseIds:
    """Dense ids 0, 1, ... given to codes in order of first appearance, chunk after chunk."""

    def __init__(self, size: int):
        self.dense = np.full(size, -1, dtype=np.int64)
        self.n = 0

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        seen = first_appearance(codes)
        new = seen[self.dense[seen] < 0]
        self.dense[new] = np.arange(self.n, self.n + len(new))
        self.n += len(new)
        return self.dense[codes]

    def codes(self) -> np.ndarray:
        """The code of each dense id."""
        out = np.empty(self.n, dtype=np.int64)
        known = np.flatnonzero(self.dense >= 0)
        out[self.dense[known]] = known
        return out


def chunked_bincount(values: np.ndarray, minlength: int, rows: int, weights_mask: np.ndarray | None = None
                     ) -> np.ndarray:
    """``np.bincount(values[mask], minlength)`` chunk by chunk (int64 counts)."""
    out = np.zeros(minlength, dtype=np.int64)
    for a, b in spans(len(values), rows):
        v = values[a:b]
        if weights_mask is not None:
            v = v[weights_mask[a:b]]
        out += np.bincount(v, minlength=minlength)[:minlength]
    return out
