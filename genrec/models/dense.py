"""Dense content scorer beside TIGER: user vector from the T5 encoder, item vectors from text embeddings.

Why: a cold item (never a training target) has a valid SID but almost no generative probability, so
beam search prunes it. A two-tower scorer whose item tower reads only the item's *text embedding* gives
every item, cold ones included, a fair score (LIGER-style hybrid; ``genrec.decoding.rerank``).

* user tower: masked mean-pool of the TIGER encoder states (B, T, d_model) → Linear → GELU → LayerNorm
  → Linear to ``dim``;
* item tower: the same head shape over the frozen text embeddings (num_items, text_dim) → ``dim``;
* score = cos(user, item) / τ with τ = exp(log τ), a learnable log-temperature clamped below at
  ``min_temperature`` (``learn_temperature=False`` keeps τ fixed at ``temperature``).

Training: jointly next to TIGER's CE (``loss_total = ce + w · dense.loss(...)``, gradients reach the
encoder) or post hoc on a frozen TIGER (pass ``encoder_states(...).detach()``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genrec.errors import ConfigError


@dataclass
class DenseScorerConfig:
    """Architecture and temperature of :class:`DenseScorer`."""

    dim: int = 64
    """Width of the shared user/item space (the vectors are L2-normalised)."""
    hidden: int = 256
    """Hidden width of both projection heads."""
    temperature: float = 0.07
    """Initial (learnable) or fixed softmax temperature τ; scores are cos / τ."""
    learn_temperature: bool = True
    """Learn log τ (CLIP-style); False keeps τ fixed."""
    min_temperature: float = 0.01
    """Lower clamp of the learned τ (keeps logits ≤ 1/min_temperature; CLIP's 100)."""
    dropout: float = 0.0
    """Dropout after the hidden activation of both heads."""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.hidden < 1:
            raise ConfigError(f"DenseScorerConfig: dim and hidden must be >= 1, got {self.dim}, {self.hidden}")
        if not 0 < self.min_temperature <= self.temperature:
            raise ConfigError(
                f"DenseScorerConfig: need 0 < min_temperature <= temperature, got "
                f"{self.min_temperature}, {self.temperature}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"DenseScorerConfig.dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


def _head(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Dropout(dropout), nn.Linear(hidden, d_out)
    )


def encoder_states(t5, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d_model) last hidden states of the TIGER T5 encoder (gradients flow; detach for post hoc)."""
    return t5.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) × (B, T) → (B, d) mean over the real tokens; a fully padded row gives zeros."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class DenseScorer(nn.Module):
    """Two-tower dense scorer over TIGER encoder states and item text embeddings.

    Args:
        cfg: architecture / temperature.
        d_model: TIGER hidden width (input of the user head).
        text_embeddings: (num_items, text_dim) float, row i = item i; kept as a non-trainable,
            non-persistent buffer (checkpoints hold the heads only; call :meth:`set_text_embeddings`
            after loading, possibly with a larger catalogue holding new cold items).
    """

    def __init__(self, cfg: DenseScorerConfig, d_model: int, text_embeddings: torch.Tensor) -> None:
        super().__init__()
        text_embeddings = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if text_embeddings.ndim != 2:
            raise ValueError(f"text_embeddings must be (num_items, text_dim), got {tuple(text_embeddings.shape)}")
        self.cfg = cfg
        self.user_head = _head(d_model, cfg.hidden, cfg.dim, cfg.dropout)
        self.item_head = _head(text_embeddings.shape[1], cfg.hidden, cfg.dim, cfg.dropout)
        log_tau = torch.tensor(float(cfg.temperature)).log()
        if cfg.learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)
        self.register_buffer("text_embeddings", text_embeddings, persistent=False)

    # ------------------------------------------------------------------------------------ towers
    @property
    def num_items(self) -> int:
        return self.text_embeddings.shape[0]

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=self.cfg.min_temperature)

    def set_text_embeddings(self, text_embeddings: torch.Tensor) -> None:
        """Replace the catalogue (same text_dim; e.g. after a checkpoint load or when new items arrive)."""
        emb = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if emb.ndim != 2 or emb.shape[1] != self.item_head[0].in_features:
            raise ValueError(f"text_embeddings must be (n, {self.item_head[0].in_features}), got {tuple(emb.shape)}")
        self.text_embeddings = emb.to(self.text_embeddings.device)

    def user_vectors(self, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model), (B, T) → (B, dim) unit user vectors."""
        return F.normalize(self.user_head(masked_mean(encoder_hidden, attention_mask)), dim=-1)

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Unit item vectors: all (num_items, dim) when ``items`` is None, else (*items.shape, dim).

        Slots with item -1 get the vector of item 0 (mask them; :meth:`scores` does).
        """
        if items is None:
            return F.normalize(self.item_head(self.text_embeddings), dim=-1)
        return F.normalize(self.item_head(self.text_embeddings[items.clamp(min=0)]), dim=-1)

    def scores(
        self, user_vec: torch.Tensor, items: torch.Tensor | None = None, item_vecs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """cos(user, item) / τ.

        ``items`` None → (B, num_items) over the whole catalogue; (M,) → (B, M) shared candidates;
        (B, M) → (B, M) per-row candidates; -inf where the item is -1. ``item_vecs``: the catalogue's
        :meth:`item_vectors` computed once (cache it for a whole evaluation; the towers are frozen there).
        """
        if item_vecs is None:
            vecs = self.item_vectors(items)
        else:
            vecs = item_vecs if items is None else item_vecs[items.clamp(min=0)]
        user = F.normalize(user_vec, dim=-1)  # (B, dim)
        if items is None or items.ndim == 1:
            out = user @ vecs.T / self.temperature  # (B, M)
            return out if items is None else out.masked_fill((items < 0)[None, :], float("-inf"))
        out = torch.einsum("bd,bmd->bm", user, vecs) / self.temperature  # (B, M)
        return out.masked_fill(items < 0, float("-inf"))

    # ------------------------------------------------------------------------------------ training
    def loss(
        self,
        user_vec: torch.Tensor,
        target: torch.Tensor,
        negatives: Literal["in_batch"] | int = "in_batch",
        log_q: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Softmax cross-entropy of the target against negatives (mean over the batch).

        Args:
            user_vec: (B, dim) from :meth:`user_vectors`.
            target: (B,) target items.
            negatives: "in_batch": the other rows' targets are the negatives (a column holding the
                row's own target item again is masked, so duplicates in the batch are not negatives);
                int k: k negatives drawn uniformly from the catalogue, shared by the batch (a negative
                equal to the row's target is masked).
            log_q: optional (num_items,) log sampling probability per item; subtracted from every
                candidate's logit, positive included (log-Q correction, Yi et al. 2019). Meaningful for
                in-batch negatives (sampled ∝ target popularity); constant, hence a no-op, for uniform k.
            generator: RNG of the uniform negatives (on any device; the draw moves to the user's).
        """
        target = target.reshape(-1).long()
        user = F.normalize(user_vec, dim=-1)  # (B, dim)
        rows = torch.arange(len(target), device=user.device)
        if negatives == "in_batch":
            cand = target[None, :].expand(len(target), -1)  # (B, B): column j = row j's target
            logits = user @ self.item_vectors(target).T  # (B, B)
            # The row's own target met again in another column is not a negative.
            masked = (cand == target[:, None]) & (rows[:, None] != rows[None, :])
            label = rows
        elif isinstance(negatives, int) and not isinstance(negatives, bool) and negatives >= 1:
            dev = generator.device if generator is not None else user.device
            neg = torch.randint(self.num_items, (negatives,), generator=generator, device=dev).to(user.device)
            cand = torch.cat([target[:, None], neg[None, :].expand(len(target), -1)], dim=1)  # (B, 1 + k)
            pos = (user * self.item_vectors(target)).sum(-1, keepdim=True)  # (B, 1)
            logits = torch.cat([pos, user @ self.item_vectors(neg).T], dim=1)  # (B, 1 + k)
            masked = F.pad(neg[None, :] == target[:, None], (1, 0), value=False)  # accidental hits
            label = torch.zeros_like(rows)
        else:
            raise ValueError(f"negatives must be 'in_batch' or a positive int, got {negatives!r}")
        logits = logits / self.temperature
        if log_q is not None:
            logits = logits - log_q.to(logits)[cand]
        return F.cross_entropy(logits.masked_fill(masked, float("-inf")), label)
