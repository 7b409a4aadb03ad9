"""Item-level relations R_1..R_H of the MemGen analysis (specs/memgen.md §10.1) and their exact 2-hop queries.

One record per observed pair: ``D(u, v)`` = the smallest distance d (1 ≤ d ≤ H) at which u precedes v in a
training instance. The relations are inclusive, so (u, v) ∈ R_h ⇔ D(u, v) ≤ h and one sorted key array
``u * num_items + v`` with an int8 ``dist`` holds all H of them. Forward sets F_h(u) and reverse sets B_h(v)
are CSR rows sorted by (distance, neighbour), so F_h(u) is a prefix of F_H(u).

The compositions of §10.2 (transitivity, 2nd-symmetry) need, per query pair (p, q),
``M(p, q) = min_x max(D_a(p, x), D_b(q, x))`` over an intermediate x, with a, b ∈ {forward, backward}:
the smallest h at which p's and q's hop-h sets meet. Hub items have lists of tens of thousands of entries,
so a merge per pair is too slow. :meth:`ItemRelations.meet` splits the intermediates:

* heavy x (the ``num_heavy`` items of largest degree): one bitset per (item, hop) over the heavy items, so
  a hop-h test is an AND of ``num_heavy / 64`` words; hub–hub pairs almost always meet at hop 1 there;
* light x (all others): only for pairs the heavy part left above hop 1, and only below the heavy answer.
  Per pair the shorter light list (up to that hop) is expanded and each entry read from a dense int8
  table holding the other item's list; pairs are grouped by that other item, so a hub's list is written
  once per batch and shared by all its pairs.

Both parts are exact, so ``M`` is exact (no cap on hub work). Callers pass a per-pair ``bound`` (the largest
answer that can still change a label) which prunes hops above it. Lookups of arbitrary pairs sort their
needles first (numpy's binary search is an order of magnitude faster on sorted needles).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from genrec.errors import DataError

FAR = np.int8(127)  # "no such pair / no witness" (compares above every hop)
_DIST_BITS = 3  # distances 1..7 packed below the pair key while building
_EXPAND_CHUNK = 1 << 23  # expanded entries per light-part batch (bounds memory)
_MARK_BYTES = 1 << 26  # dense marking table of the light part
_BITS_CHUNK = 1 << 16  # pairs per heavy-part chunk


# ----------------------------------------------------------------------------------------- sorted lookups
def argsort_int(values: np.ndarray) -> np.ndarray:
    """Argsort of non-negative int64 values; packs the index below the value when it fits (np.sort is far
    faster than np.argsort)."""
    n = len(values)
    idx_bits = max(int(n - 1).bit_length(), 1)
    top = int(values.max()) if n else 0
    if n == 0 or top.bit_length() + idx_bits > 62:
        return np.argsort(values, kind="stable")
    code = np.sort((values << idx_bits) | np.arange(n, dtype=np.int64))
    return code & ((1 << idx_bits) - 1)


def lookup(sorted_keys: np.ndarray, values: np.ndarray, query: np.ndarray, missing) -> np.ndarray:
    """``values[i]`` where ``sorted_keys[i] == query`` else ``missing``; same shape as ``query``.

    Needles are sorted first: numpy's binary search is an order of magnitude faster on sorted needles.
    """
    q = np.asarray(query, dtype=np.int64).ravel()
    out = np.full(len(q), missing, dtype=values.dtype)
    if len(q) and len(sorted_keys):
        order = argsort_int(q)
        qs = q[order]
        pos = np.minimum(np.searchsorted(sorted_keys, qs), len(sorted_keys) - 1)
        hit = sorted_keys[pos] == qs
        out[order[hit]] = values[pos[hit]]
    return out.reshape(np.shape(query))


def unique_max(keys: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``keys`` (sorted) and the largest ``bound`` (small non-negative int) of each."""
    code = np.sort((keys.astype(np.int64) << _DIST_BITS) | bound.astype(np.int64))
    k = code >> _DIST_BITS
    last = np.r_[k[1:] != k[:-1], True] if len(k) else np.zeros(0, bool)
    return k[last], (code[last] & ((1 << _DIST_BITS) - 1)).astype(np.int8)


def _expand(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Flat positions of the segments [starts, starts + lens), segment after segment."""
    shift = starts - (np.cumsum(lens) - lens)
    return np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(shift, lens)


# ----------------------------------------------------------------------------------------- adjacency
@dataclass
class Adjacency:
    """CSR neighbour lists, each row sorted by (distance, neighbour): hop-h set = row[: hop_end[row, h-1]]."""

    indptr: np.ndarray  # (N+1,) int64
    nbr: np.ndarray  # (P,) int32
    dist: np.ndarray  # (P,) int8
    hop_end: np.ndarray  # (N, H) int64 end offset of the hop-h prefix of each row

    @classmethod
    def from_pairs(cls, row: np.ndarray, col: np.ndarray, dist: np.ndarray, num_items: int, max_hop: int):
        code = np.sort((row * (max_hop + 1) + dist) * num_items + col)
        col, rd = code % num_items, code // num_items
        row, dist = rd // (max_hop + 1), (rd % (max_hop + 1)).astype(np.int8)
        counts = np.bincount(row * max_hop + dist - 1, minlength=num_items * max_hop).reshape(num_items, max_hop)
        indptr = np.r_[0, np.cumsum(counts.sum(1))].astype(np.int64)
        hop_end = indptr[:-1, None] + np.cumsum(counts, axis=1)
        return cls(indptr, col.astype(np.int32), dist, hop_end)

    def row_of(self, item: int, hop: int) -> np.ndarray:
        return self.nbr[self.indptr[item] : self.hop_end[item, hop - 1]].astype(np.int64)

    def degree(self) -> np.ndarray:
        return np.diff(self.indptr)

    def restrict(self, keep_nbr: np.ndarray) -> Adjacency:
        """Same rows with only the neighbours where ``keep_nbr`` is True (order kept)."""
        keep = keep_nbr[self.nbr]
        rows = np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))[keep]
        n, h = self.hop_end.shape
        counts = np.bincount(rows * h + self.dist[keep] - 1, minlength=n * h).reshape(n, h)
        indptr = np.r_[0, np.cumsum(counts.sum(1))].astype(np.int64)
        return Adjacency(indptr, self.nbr[keep], self.dist[keep], indptr[:-1, None] + np.cumsum(counts, axis=1))


def _heavy_bits(adj: Adjacency, heavy_id: np.ndarray, num_heavy: int) -> np.ndarray:
    """(H, N, W) uint64: bit j of row u at hop h ⇔ heavy item j is in u's hop-h set."""
    n, max_hop = adj.hop_end.shape
    words = max((num_heavy + 63) // 64, 1)
    bits = np.zeros((max_hop, n, words), dtype=np.uint64)
    rows = np.repeat(np.arange(n), np.diff(adj.indptr))
    hid = heavy_id[adj.nbr]
    sel = hid >= 0
    rows, hid, dist = rows[sel], hid[sel].astype(np.int64), adj.dist[sel]
    for h in range(1, max_hop + 1):
        at = dist == h  # rows are nested: hop h = hop h-1 plus the pairs at distance h
        flat = bits[h - 1].reshape(-1)
        if h > 1:
            flat |= bits[h - 2].reshape(-1)
        np.bitwise_or.at(flat, rows[at] * words + (hid[at] >> 6), np.left_shift(np.uint64(1), (hid[at] & 63).astype(np.uint64)))
    return bits


# ----------------------------------------------------------------------------------------- relations
@dataclass
class ItemRelations:
    """R_1..R_H of §10.1 over items 0..num_items-1 (see the module docstring for the layout)."""

    num_items: int
    max_hop: int
    keys: np.ndarray  # (P,) int64 sorted, u * num_items + v
    dist: np.ndarray  # (P,) int8 D(u, v) in 1..H
    fwd: Adjacency  # F: row u → v
    bwd: Adjacency  # B: row v → u
    num_heavy: int = 0
    heavy_id: np.ndarray | None = None  # (N,) int32, -1 for light items
    bits: dict | None = None  # {"fwd"|"bwd": (H, N, W) uint64}
    light: dict | None = None  # {"fwd"|"bwd": Adjacency restricted to light neighbours}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_instances(cls, history: np.ndarray, target: np.ndarray, num_items: int, max_hop: int = 4,
                       num_heavy: int = 2048) -> ItemRelations:
        """Relations from training instances: ``history`` (n, N) left-padded with -1, ``target`` (n,)."""
        return cls.from_chunks([(history, target)], num_items, max_hop, num_heavy)

    @classmethod
    def from_chunks(cls, chunks: Iterable[tuple[np.ndarray, np.ndarray]], num_items: int, max_hop: int = 4,
                    num_heavy: int = 2048) -> ItemRelations:
        """Relations from an iterable of (history (n, N), target (n,)) chunks; only the last H columns count.

        R_h = {(history[i, -d], target[i]) : 1 ≤ d ≤ h, history[i, -d] ≥ 0} over all training instances.
        """
        if not 1 <= max_hop < (1 << _DIST_BITS):
            raise ValueError(f"max_hop must lie in 1..{(1 << _DIST_BITS) - 1}, got {max_hop}")
        if num_items <= 0 or (num_items * num_items) << _DIST_BITS >= 1 << 63:
            raise ValueError(f"num_items must lie in 1..2**29, got {num_items}")
        parts, pending = [], 0
        for history, target in chunks:
            parts.append(_chunk_codes(np.asarray(history), np.asarray(target), num_items, max_hop))
            pending += len(parts[-1])
            if pending > 1 << 26:  # compact now and then so memory follows distinct pairs, not rows
                parts = [_min_dist_codes(np.concatenate(parts))]
                pending = len(parts[0])
        code = _min_dist_codes(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return cls.from_pairs(code >> _DIST_BITS, (code & ((1 << _DIST_BITS) - 1)).astype(np.int8),
                              num_items, max_hop, num_heavy)

    @classmethod
    def from_pairs(cls, keys: np.ndarray, dist: np.ndarray, num_items: int, max_hop: int = 4,
                   num_heavy: int = 2048) -> ItemRelations:
        """From sorted distinct pair keys ``u * num_items + v`` and their minimal distances."""
        u, v = keys // num_items, keys % num_items
        fwd = Adjacency.from_pairs(u, v, dist, num_items, max_hop)
        bwd = Adjacency.from_pairs(v, u, dist, num_items, max_hop)
        rel = cls(num_items, max_hop, keys, dist, fwd, bwd)
        rel._index_heavy(num_heavy)
        return rel

    def _index_heavy(self, num_heavy: int) -> None:
        degree = self.fwd.degree() + self.bwd.degree()
        num_heavy = int(min(num_heavy, (degree > 0).sum()))
        heavy = np.argsort(-degree, kind="stable")[:num_heavy]
        self.num_heavy = num_heavy
        self.heavy_id = np.full(self.num_items, -1, dtype=np.int32)
        self.heavy_id[heavy] = np.arange(num_heavy, dtype=np.int32)
        light = self.heavy_id < 0
        self.bits = {s: _heavy_bits(a, self.heavy_id, num_heavy) for s, a in (("fwd", self.fwd), ("bwd", self.bwd))}
        self.light = {"fwd": self.fwd.restrict(light), "bwd": self.bwd.restrict(light)}

    # ------------------------------------------------------------------ membership
    def num_pairs(self, hop: int) -> int:
        """|R_hop|."""
        return int((self.dist <= hop).sum())

    def distance(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """D(u, v) (int8, FAR if the pair never occurs within H); (u, v) ∈ R_h ⇔ distance ≤ h. Any shape."""
        u, v = np.asarray(u, dtype=np.int64), np.asarray(v, dtype=np.int64)
        ok = (u >= 0) & (v >= 0) & (u < self.num_items) & (v < self.num_items)
        key = np.where(ok, u * self.num_items + v, -1)
        return lookup(self.keys, self.dist, key, FAR)

    def forward(self, u: int, hop: int) -> np.ndarray:
        """F_hop(u), sorted by (distance, item)."""
        return self.fwd.row_of(u, hop)

    def backward(self, v: int, hop: int) -> np.ndarray:
        """B_hop(v), sorted by (distance, item)."""
        return self.bwd.row_of(v, hop)

    # ------------------------------------------------------------------ 2-hop compositions
    def meet(self, side_p: str, p: np.ndarray, side_q: str, q: np.ndarray, bound: np.ndarray | int) -> np.ndarray:
        """min_x max(D_p(x), D_q(x)) per pair, exact where ≤ ``bound`` (else FAR); int8 (n,).

        ``side_p``/``side_q`` ∈ {"fwd", "bwd"} pick F(p) or B(p) (and likewise for q): transitivity is
        meet("fwd", u, "bwd", v); the 2nd-symmetry forms are meet("fwd", v, "bwd", u), meet("fwd", v, "fwd", u)
        and meet("bwd", v, "bwd", u). Distinct pairs are computed once (with their largest bound); the last
        two forms are symmetric in (p, q), so each unordered pair is computed once.
        """
        p, q = np.asarray(p, np.int64), np.asarray(q, np.int64)
        bound = np.broadcast_to(np.minimum(np.asarray(bound, np.int64), self.max_hop), p.shape)
        if side_p == side_q:  # symmetric form: one orientation per pair
            p, q = np.minimum(p, q), np.maximum(p, q)
        key = p * self.num_items + q
        ukey, ubound = unique_max(key, np.maximum(bound, 0))
        val = self._meet_distinct(side_p, ukey // self.num_items, side_q, ukey % self.num_items, ubound)
        out = lookup(ukey, val, key, FAR)
        return np.where(out <= bound, out, FAR).astype(np.int8)

    def _meet_distinct(self, side_p, p, side_q, q, bound) -> np.ndarray:
        val = np.full(len(p), FAR, dtype=np.int8)
        self._meet_heavy(side_p, p, side_q, q, bound, val)
        # light intermediates can only improve on the heavy answer below it
        limit = np.minimum(bound, val.astype(np.int64) - 1)
        todo = np.flatnonzero(limit >= 1)
        if len(todo):
            light = self._meet_light(side_p, p[todo], side_q, q[todo], limit[todo])
            val[todo] = np.minimum(val[todo], light)
        return val

    def _meet_heavy(self, side_p, p, side_q, q, bound, val) -> None:
        if self.num_heavy == 0:
            return
        bits_p, bits_q = self.bits[side_p], self.bits[side_q]
        active = np.flatnonzero(bound >= 1)
        for h in range(1, self.max_hop + 1):
            active = active[bound[active] >= h]
            if not len(active):
                return
            found = np.zeros(len(active), dtype=bool)
            for lo in range(0, len(active), _BITS_CHUNK):
                a = active[lo : lo + _BITS_CHUNK]
                found[lo : lo + len(a)] = (bits_p[h - 1][p[a]] & bits_q[h - 1][q[a]]).any(axis=1)
            val[active[found]] = h
            active = active[~found]

    def _meet_light(self, side_p, p, side_q, q, limit) -> np.ndarray:
        """Exact min_x max(D_p(x), D_q(x)) over light x with both distances ≤ limit (else FAR)."""
        adj_p, adj_q = self.light[side_p], self.light[side_q]
        len_p = adj_p.hop_end[p, limit - 1] - adj_p.indptr[p]
        len_q = adj_q.hop_end[q, limit - 1] - adj_q.indptr[q]
        out = np.full(len(p), FAR, dtype=np.int8)
        # expand the shorter list; mark the longer one densely (shared by all pairs of that item)
        from_p = len_p <= len_q
        nonempty = np.minimum(len_p, len_q) > 0
        for sel, adj_e, e, adj_m, mk in ((from_p, adj_p, p, adj_q, q), (~from_p, adj_q, q, adj_p, p)):
            idx = np.flatnonzero(sel & nonempty)
            if len(idx):
                out[idx] = self._probe(adj_e, e[idx], adj_m, mk[idx], limit[idx])
        return out

    def _probe(self, adj_e: Adjacency, e, adj_m: Adjacency, mk, limit) -> np.ndarray:
        """Per pair: min over x in e's list of max(d_e(x), d_m(x)) where ≤ limit (else FAR).

        Pairs are grouped by the marked item ``mk``; a batch writes the lists of its marked items into a
        dense (G, N) int8 table once and gathers every expanded entry from it.
        """
        n = self.num_items
        order = argsort_int(mk)
        e, mk, limit = e[order], mk[order], limit[order]
        lens = adj_e.hop_end[e, limit - 1] - adj_e.indptr[e]
        first = np.r_[True, mk[1:] != mk[:-1]]
        cum_len, cum_first = np.r_[0, np.cumsum(lens)], np.r_[0, np.cumsum(first)]
        max_rows = int(min(max(1, _MARK_BYTES // n), first.sum()))
        table = np.full(max_rows * n, FAR, dtype=np.int8)
        out = np.empty(len(e), dtype=np.int8)
        lo = 0
        while lo < len(e):
            hi = min(int(np.searchsorted(cum_len, cum_len[lo] + _EXPAND_CHUNK, side="right")) - 1,
                     int(np.searchsorted(cum_first, cum_first[lo + 1] + max_rows - 1, side="right")) - 1)
            hi = max(hi, lo + 1)
            out[lo:hi] = self._probe_batch(adj_e, e[lo:hi], adj_m, mk[lo:hi], limit[lo:hi], table)
            lo = hi
        result = np.empty_like(out)
        result[order] = out
        return result

    def _probe_batch(self, adj_e, e, adj_m, mk, limit, table) -> np.ndarray:
        n = self.num_items
        new = np.r_[True, mk[1:] != mk[:-1]]
        row = np.cumsum(new) - 1  # (b,) table row of each pair
        starts = np.flatnonzero(new)
        items, mark_hop = mk[starts], np.maximum.reduceat(limit, starts)
        m_start = adj_m.indptr[items]
        m_lens = adj_m.hop_end[items, mark_hop - 1] - m_start
        m_pos = _expand(m_start, m_lens)
        m_cell = np.repeat(np.arange(len(items)) * n, m_lens) + adj_m.nbr[m_pos]
        table[m_cell] = adj_m.dist[m_pos]
        e_start = adj_e.indptr[e]
        lens = adj_e.hop_end[e, limit - 1] - e_start
        pos = _expand(e_start, lens)
        d = np.maximum(adj_e.dist[pos], table[np.repeat(row * n, lens) + adj_e.nbr[pos]])
        table[m_cell] = FAR  # reset for the next batch
        # marked entries beyond a pair's own limit can only give minima above it: filter after the min
        best = np.minimum.reduceat(d, np.r_[0, np.cumsum(lens)[:-1]])
        return np.where(best <= limit, best, FAR).astype(np.int8)


def _chunk_codes(history: np.ndarray, target: np.ndarray, num_items: int, max_hop: int) -> np.ndarray:
    """(u*N + v) << 3 | d for one chunk, one code per distinct pair with its smallest d."""
    if history.ndim != 2 or target.shape != (history.shape[0],):
        raise DataError(f"history must be (n, N) and target (n,), got {history.shape} and {target.shape}")
    hist = history[:, -max_hop:].astype(np.int64)
    target = target.astype(np.int64)
    for arr, name in ((hist, "history"), (target, "target")):
        if arr.size and (arr.max() >= num_items or arr.min() < -1):
            raise DataError(f"training {name} holds item ids outside -1..{num_items - 1}")
    codes = []
    for d in range(1, hist.shape[1] + 1):
        u = hist[:, -d]
        ok = (u >= 0) & (target >= 0)
        codes.append(((u[ok] * num_items + target[ok]) << _DIST_BITS) | d)
    return _min_dist_codes(np.concatenate(codes))


def _min_dist_codes(code: np.ndarray) -> np.ndarray:
    code = np.sort(code)
    key = code >> _DIST_BITS
    return code[np.r_[True, key[1:] != key[:-1]]] if len(code) else code
