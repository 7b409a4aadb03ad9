"""Tensorised prefix trie over the valid semantic IDs of a catalogue.

Decoding step p (p = 0..L) chooses the SID value at position p. The trie stores, per depth p, the
sorted unique prefixes of length p as node ids and the edges from depth p to p+1 in CSR form:

* ``edge_value[p][e]``  value (0-based code within position p) of edge e,
* ``edge_key[p][e]``    ``parent * level_size[p] + value``, sorted ascending (prefixes are sorted
  lexicographically, so the edges of one parent are contiguous and ordered by value),
* ``ptr[p][j]``          edges of node j are ``ptr[p][j] : ptr[p][j+1]``.

Because the children of a depth-p node are exactly the depth-(p+1) prefixes it extends, the edge
index IS the child node id at depth p+1, and at depth L+1 the node id is the row of the sorted full
SIDs, which maps to an item. Where ``num_nodes * level_size`` is small enough a dense child table
(``num_nodes × level_size``, -1 = no child) replaces the CSR lookups with one gather.

For all beams at once, :meth:`allowed` returns the (N, level_size) mask and :meth:`advance` the next
node ids, with tensor ops only (no Python per beam, no scan over the catalogue).
"""

from __future__ import annotations

import numpy as np
import torch

from genrec.tokenizers.sid import SemanticIdTable

DEFAULT_DENSE_LIMIT = 1 << 22  # entries of a dense child table (int64: 32 MiB) before falling back to CSR


class SidTrie:
    """Valid-next-token structure for constrained decoding of (L+1)-token semantic IDs.

    Args:
        tokens: (n, L+1) token ids, one row per item (rows must be distinct).
        items: (n,) item id of each row.
        level_offsets: (L+1,) token id of value 0 at each position.
        level_sizes: (L+1,) number of values at each position.
        dense_limit: largest ``num_nodes * level_size`` stored as a dense table; 0 = CSR everywhere.
        device: where the tensors live.
    """

    def __init__(
        self,
        tokens,
        items,
        level_offsets,
        level_sizes,
        dense_limit: int = DEFAULT_DENSE_LIMIT,
        device: torch.device | str | None = None,
    ) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        offsets = np.asarray(level_offsets, dtype=np.int64)
        sizes = np.asarray(level_sizes, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[0] != items.shape[0]:
            raise ValueError(f"tokens must be (n, L+1) and items (n,); got {tokens.shape} and {items.shape}")
        depth = tokens.shape[1]
        if offsets.shape != (depth,) or sizes.shape != (depth,):
            raise ValueError(f"level_offsets and level_sizes must have shape ({depth},)")
        values = tokens - offsets[None, :]
        if tokens.shape[0] and (values.min() < 0 or np.any(values >= sizes[None, :])):
            raise ValueError("a token lies outside its position's range [offset, offset + size)")

        self.depth = depth
        self.level_offsets = [int(o) for o in offsets]
        self.level_sizes = [int(s) for s in sizes]
        self.dense_limit = int(dense_limit)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

        n = values.shape[0]
        order = np.lexsort(values.T[::-1]) if n else np.zeros(0, dtype=np.int64)
        values = values[order]
        # new_prefix[p][i]: row i starts a new prefix of length p+1 (rows sorted lexicographically).
        differs = np.ones((n, depth), dtype=bool)
        if n > 1:
            differs[1:] = values[1:] != values[:-1]
        starts = np.cumsum(differs, axis=1) > 0  # prefix of length p+1 differs from the previous row's
        if n > 1 and not starts[1:, -1].all():
            dup = int(np.flatnonzero(~starts[1:, -1])[0]) + 1
            raise ValueError(
                f"duplicate semantic ID {tokens[order[dup]].tolist()} (items must have unique SIDs)"
            )

        self.num_nodes = [1]
        self.ptr: list[torch.Tensor] = []
        self.edge_value: list[torch.Tensor] = []
        self.edge_key: list[torch.Tensor] = []
        self.child_table: list[torch.Tensor | None] = []
        parent_ids = np.zeros(n, dtype=np.int64)  # node id at depth p of each sorted row
        for p in range(depth):
            new = starts[:, p]
            edge_rows = np.flatnonzero(new)
            parents = parent_ids[edge_rows]
            vals = values[edge_rows, p]
            num_parents = self.num_nodes[p]
            ptr = np.zeros(num_parents + 1, dtype=np.int64)
            np.cumsum(np.bincount(parents, minlength=num_parents), out=ptr[1:])
            size = self.level_sizes[p]
            self.ptr.append(torch.from_numpy(ptr))
            self.edge_value.append(torch.from_numpy(vals.copy()))
            self.edge_key.append(torch.from_numpy(parents * size + vals))
            if num_parents * size <= self.dense_limit:
                table = np.full((num_parents, size), -1, dtype=np.int64)
                table[parents, vals] = np.arange(len(edge_rows))
                self.child_table.append(torch.from_numpy(table))
            else:
                self.child_table.append(None)
            parent_ids = np.cumsum(new) - 1
            self.num_nodes.append(len(edge_rows))
        self.leaf_items = torch.from_numpy(items[order].copy())
        self.to(self.device)

    # --------------------------------------------------------------------------------- construction
    @classmethod
    def from_table(
        cls,
        table: SemanticIdTable,
        dense_limit: int = DEFAULT_DENSE_LIMIT,
        device: torch.device | str | None = None,
    ) -> SidTrie:
        """Trie over every item of ``table`` (cold items included)."""
        return cls(
            table.tokens(), table.items, table.level_offsets(), table.level_sizes(), dense_limit, device
        )

    def to(self, device: torch.device | str) -> SidTrie:
        self.device = torch.device(device)
        self.ptr = [t.to(self.device) for t in self.ptr]
        self.edge_value = [t.to(self.device) for t in self.edge_value]
        self.edge_key = [t.to(self.device) for t in self.edge_key]
        self.child_table = [None if t is None else t.to(self.device) for t in self.child_table]
        self.leaf_items = self.leaf_items.to(self.device)
        return self

    @property
    def sid_length(self) -> int:
        return self.depth

    @property
    def num_items(self) -> int:
        return self.num_nodes[-1]

    def root(self, n: int) -> torch.Tensor:
        """Node ids of ``n`` empty prefixes."""
        return torch.zeros(n, dtype=torch.long, device=self.device)

    # --------------------------------------------------------------------------------- queries
    def allowed(self, p: int, node: torch.Tensor) -> torch.Tensor:
        """(N, level_sizes[p]) bool: values that extend each depth-p ``node`` to a valid prefix (-1 = dead)."""
        node = node.to(self.device)
        alive = node >= 0
        safe = node.clamp(min=0)
        table = self.child_table[p]
        if table is not None:
            return (table[safe] >= 0) & alive[:, None]
        ptr = self.ptr[p]
        first = ptr[safe]
        counts = torch.where(alive, ptr[safe + 1] - first, torch.zeros_like(first))
        mask = torch.zeros(node.shape[0], self.level_sizes[p], dtype=torch.bool, device=self.device)
        total = int(counts.sum())
        if total:
            row = torch.repeat_interleave(torch.arange(node.shape[0], device=self.device), counts)
            row_start = torch.cumsum(counts, 0) - counts
            edge = first[row] + torch.arange(total, device=self.device) - row_start[row]
            mask[row, self.edge_value[p][edge]] = True
        return mask

    def advance(self, p: int, node: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Depth-(p+1) node reached from depth-p ``node`` by position-p ``value``; -1 where invalid."""
        node = node.to(self.device)
        value = value.to(self.device)
        size = self.level_sizes[p]
        ok = (node >= 0) & (value >= 0) & (value < size)
        safe_node = node.clamp(min=0)
        safe_value = value.clamp(0, size - 1)
        table = self.child_table[p]
        if table is not None:
            child = table[safe_node, safe_value]
        else:
            keys = self.edge_key[p]
            if keys.numel() == 0:
                return torch.full_like(node, -1)
            query = safe_node * size + safe_value
            pos = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
            child = torch.where(keys[pos] == query, pos, torch.full_like(pos, -1))
        return torch.where(ok, child, torch.full_like(child, -1))

    def items_of_leaves(self, leaf: torch.Tensor) -> torch.Tensor:
        """Item of each depth-(L+1) node; -1 where ``leaf`` is -1."""
        leaf = leaf.to(self.device)
        if self.leaf_items.numel() == 0:
            return torch.full_like(leaf, -1)
        return torch.where(leaf >= 0, self.leaf_items[leaf.clamp(min=0)], torch.full_like(leaf, -1))

    def items_of_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map (..., L+1) token ids to items, -1 where the sequence is not a valid SID."""
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.shape[-1] != self.depth:
            raise ValueError(
                f"tokens must end in a dimension of {self.depth}, got shape {tuple(tokens.shape)}"
            )
        flat = tokens.reshape(-1, self.depth).long()
        node = self.root(flat.shape[0])
        for p in range(self.depth):
            node = self.advance(p, node, flat[:, p] - self.level_offsets[p])
        return self.items_of_leaves(node).reshape(tokens.shape[:-1])

    def leaf_tokens(self) -> torch.Tensor:
        """(num_items, L+1) tokens of the leaves in node order (reconstructed from the edges)."""
        n = self.num_items
        out = torch.empty(n, self.depth, dtype=torch.long, device=self.device)
        node = torch.arange(n, device=self.device)
        for p in range(self.depth - 1, -1, -1):
            out[:, p] = self.edge_value[p][node] + self.level_offsets[p]
            # Parent of edge e at depth p: the CSR row containing e.
            node = torch.searchsorted(self.ptr[p], node, right=True) - 1
        return out
