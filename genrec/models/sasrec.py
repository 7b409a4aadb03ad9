"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

Used three ways in genrec: as a baseline next-item recommender, as the SASRec half of the MemGen adaptive
ensemble (specs/memgen.md §10.4: raw last-position logits over the full item vocabulary, MSP of their softmax),
and as the collaborative-filtering signal of the tokenizer (specs/dact.md §2.3: a 32-d item table per period,
``item_embeddings()``).

Layout decisions:

* Items are indices ``0..num_items-1``; histories are left-padded with ``-1`` (the datamodule's format).
  Embedding row 0 is the padding row (kept at zero), item ``i`` lives in row ``i + 1``.
* Positions are counted from the **end** of the sequence: the most recent item always gets the last learned
  position ``max_len - 1``. For a full-width left-padded input this is exactly the paper's absolute positions;
  it also makes the last-position output independent of how much left padding precedes the history.
  Inputs longer than ``max_len`` keep their last ``max_len`` items.
* Attention is causal and never reads padding keys. A padding query attends to itself only (so no attention
  row is empty); its output is never used for the loss or for scoring.
* Blocks are pre-LayerNorm ``torch.nn.TransformerEncoderLayer`` s with a ReLU point-wise FFN of width
  ``hidden`` and a final LayerNorm, like the paper's reference implementation.
* Scores are dot products with the (shared) item embedding table, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genrec.errors import ConfigError

PAD_ITEM = -1
_LOSSES = ("ce", "bce")
_POSITIONS = ("all", "last")


@dataclass
class SASRecConfig:
    """SASRec architecture and training objective."""

    num_items: int = 0
    """Number of items (indices 0..num_items-1); 0 = not known yet (the Lightning module fills it in from the
    datamodule); ``SASRec`` itself needs it > 0."""
    hidden: int = 64
    """Embedding / hidden width d (paper: 50; LETTER's CF model for the tokenizer: 32)."""
    num_layers: int = 2
    """Self-attention blocks b (paper: 2)."""
    num_heads: int = 1
    """Attention heads (paper: 1)."""
    dropout: float = 0.2
    """Dropout on embeddings, attention weights and FFN (paper: 0.2 on MovieLens-1M, 0.5 on sparse Amazon sets)."""
    max_len: int = 20
    """Maximum sequence length n = the datamodule's history length N (paper: 50 / 200)."""
    loss: Literal["ce", "bce"] = "ce"
    """'ce' = full softmax cross-entropy over all items (default, stronger on small data); 'bce' = the paper's
    binary cross-entropy with sampled negatives."""
    num_negatives: int = 1
    """Sampled negatives per position for loss='bce' (paper: 1)."""
    train_positions: Literal["all", "last"] = "all"
    """'all' = predict the next item at every history position (the paper's objective; targets = history
    shifted left + the instance target); 'last' = only the instance target at the last position."""
    layer_norm_eps: float = 1e-8
    """LayerNorm epsilon (reference implementation: 1e-8)."""

    def __post_init__(self) -> None:
        if self.num_items < 0:
            raise ConfigError(f"SASRecConfig.num_items must be >= 0, got {self.num_items}")
        if self.hidden <= 0 or self.hidden % self.num_heads:
            raise ConfigError(
                f"SASRecConfig.hidden must be a positive multiple of num_heads, got hidden={self.hidden}, "
                f"num_heads={self.num_heads}"
            )
        if self.num_layers < 1 or self.max_len < 1:
            raise ConfigError(f"SASRecConfig.num_layers and max_len must be >= 1, got {self.num_layers}, {self.max_len}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.loss not in _LOSSES:
            raise ConfigError(f"SASRecConfig.loss must be one of {_LOSSES}, got {self.loss!r}")
        if self.num_negatives < 1:
            raise ConfigError(f"SASRecConfig.num_negatives must be >= 1, got {self.num_negatives}")
        if self.train_positions not in _POSITIONS:
            raise ConfigError(f"SASRecConfig.train_positions must be one of {_POSITIONS}, got {self.train_positions!r}")


class SASRec(nn.Module):
    """SASRec over item indices. ``forward(history) -> (B, L, hidden)`` sequence representations."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        if config.num_items <= 0:
            raise ValueError(f"SASRecConfig.num_items must be > 0 to build the model, got {config.num_items}")
        self.config = c = config
        self.item_emb = nn.Embedding(c.num_items + 1, c.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(c.max_len, c.hidden)
        self.emb_dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=c.hidden,
                nhead=c.num_heads,
                dim_feedforward=c.hidden,
                dropout=c.dropout,
                activation="relu",
                layer_norm_eps=c.layer_norm_eps,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(c.num_layers)
        )
        self.final_norm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-normal on every matrix, as the reference implementation; the padding row stays zero.
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    # ------------------------------------------------------------------ encoding
    def _check(self, history: torch.Tensor) -> torch.Tensor:
        if history.dim() != 2:
            raise ValueError(f"history must be (batch, length) item indices, got shape {tuple(history.shape)}")
        if history.shape[1] > self.config.max_len:
            history = history[:, -self.config.max_len:]
        bad = (history < PAD_ITEM) | (history >= self.config.num_items)
        if bool(bad.any()):
            raise ValueError(
                f"history holds item indices outside [-1, {self.config.num_items - 1}] "
                f"(e.g. {int(history[bad][0])}); -1 is padding"
            )
        return history

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) item indices, left-padded with -1 → (B, L', hidden) outputs, L' = min(L, max_len)."""
        history = self._check(history)
        length = history.shape[1]
        valid = history != PAD_ITEM
        x = self.item_emb(history + 1) * math.sqrt(self.config.hidden)
        pos = torch.arange(self.config.max_len - length, self.config.max_len, device=history.device)
        x = self.emb_dropout(x + self.pos_emb(pos)[None])
        x = x * valid[..., None]
        # allowed[b, q, k]: causal and (real key, or the query itself so padding rows are never empty)
        causal = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=history.device)
        allowed = causal[None] & (valid[:, None, :] | eye[None])
        # float mask (0 / -inf), one per head, shape (B * heads, L, L)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        mask = mask.repeat_interleave(self.config.num_heads, dim=0)
        for block in self.blocks:
            x = block(x, src_mask=mask)
            x = x * valid[..., None]
        return self.final_norm(x)

    def item_table(self) -> torch.Tensor:
        """(num_items, hidden) output/input item embeddings (the padding row excluded)."""
        return self.item_emb.weight[1:]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) → (..., num_items) dot-product scores against every item."""
        return hidden @ self.item_table().T

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) histories → (B, num_items) raw logits at the last position (full catalogue)."""
        return self.logits(self(history)[:, -1])

    # ------------------------------------------------------------------ training
    @staticmethod
    def sequence_targets(history: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-item targets at every position (history shifted left + the instance target) and their mask
        (positions whose input is padding are ignored)."""
        targets = torch.cat([history[:, 1:], target[:, None]], dim=1)
        return targets, history != PAD_ITEM

    def num_positions(self, history: torch.Tensor) -> int:
        """How many positions :meth:`loss` averages over for these histories."""
        if self.config.train_positions == "last":
            return int(history.shape[0])
        return int((history != PAD_ITEM).sum())

    def loss(
        self,
        history: torch.Tensor,
        target: torch.Tensor,
        item_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean training loss over the predicted positions.

        Args:
            history: (B, L) item indices left-padded with -1.
            target: (B,) the item following the history.
            item_mask: optional (num_items,) bool, the items that may be predicted (e.g. the catalogue known by
                the end of the training window). 'ce' restricts the softmax to them; 'bce' samples negatives
                among them. None = every item.
        """
        history = self._check(history)
        if target.shape != history.shape[:1]:
            raise ValueError(f"target must have shape ({history.shape[0]},), got {tuple(target.shape)}")
        out = self(history)
        targets, keep = self.sequence_targets(history, target)
        if self.config.train_positions == "last":
            keep = torch.zeros_like(keep)
            keep[:, -1] = True
        h, pos = out[keep], targets[keep]  # (P, hidden), (P,)
        if h.shape[0] == 0:
            raise ValueError("no position to train on: every history is empty")
        if self.config.loss == "ce":
            logits = self.logits(h)
            if item_mask is not None:
                logits = logits.masked_fill(~item_mask.to(logits.device)[None], float("-inf"))
            return F.cross_entropy(logits, pos)
        neg = self.sample_negatives(pos, self.config.num_negatives, item_mask)  # (P, k)
        table = self.item_table()
        pos_logit = (h * table[pos]).sum(-1)
        neg_logit = (h[:, None] * table[neg]).sum(-1)
        return (
            F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
            + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit), reduction="none").sum(-1).mean()
        )

    def sample_negatives(
        self, positives: torch.Tensor, k: int, item_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(P,) positives → (P, k) uniform negatives among the allowed items, never equal to the positive."""
        device = positives.device
        if item_mask is None:
            pool = torch.arange(self.config.num_items, device=device)
        else:
            pool = torch.nonzero(item_mask.to(device), as_tuple=True)[0]
        n = pool.numel()
        if n < 2:
            raise ValueError(f"negative sampling needs at least 2 allowed items, got {n}")
        idx = torch.randint(0, n, (positives.shape[0], k), device=device)
        neg = pool[idx]
        # a draw that hits the positive moves to the next pool entry (still uniform over the others when the
        # positive is in the pool)
        hit = neg == positives[:, None]
        return torch.where(hit, pool[(idx + 1) % n], neg)

    # ------------------------------------------------------------------ CF signal
    @torch.no_grad()
    def item_embeddings(self, dim: int | None = None) -> torch.Tensor:
        """(num_items, dim) item embeddings for the tokenizer's CF regulariser / DACT (specs/dact.md §2.3).

        ``dim=None`` (or ``hidden``) returns the learned table as is (train with ``hidden=32`` for the
        reference's 32-d table). A smaller ``dim`` projects the table onto its top ``dim`` principal
        directions (centred SVD), which keeps as much of the table's variance as ``dim`` axes can.
        """
        table = self.item_table().detach().float()
        if dim is None or dim == table.shape[1]:
            return table.clone()
        if not 0 < dim < table.shape[1]:
            raise ValueError(f"dim must be in [1, hidden={table.shape[1]}], got {dim}")
        centred = table - table.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        return centred @ vh[:dim].T
