"""TIGER: a T5 encoder–decoder that reads a history of semantic IDs and writes the next item's SID.

Sources: specs/dact.md §2.4 (DACT's TIGER backbone) and specs/genrecedit.md §1.5–1.7; decision 1 of
specs/README.md (gated-SiLU FFN by default, ReLU selectable).

Sequence layout used here (decision for this project, no EOS token, like DACT):

* encoder input: the SID tokens of the last ``max_history_items`` history items, flattened in time
  order and **left**-padded with 0; with ``num_user_tokens > 0`` one hashed user token precedes the
  history tokens. Attention mask = 1 on real tokens.
* labels: the L+1 tokens of the target SID. The decoder input is ``[0, t_1, .., t_L]`` (HF shifts the
  labels right with ``decoder_start_token_id = 0``); the loss is the token cross-entropy averaged over
  the L+1 positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from transformers import T5Config, T5ForConditionalGeneration

from genrec.errors import ConfigError
from genrec.hashing import splitmix64
from genrec.tokenizers.sid import PAD_TOKEN, SemanticIdTable

_FFN_KINDS = ("gated-silu", "relu")


@dataclass
class TigerConfig:
    """Architecture of the TIGER T5 (defaults: DACT's backbone with the gated-SiLU FFN of GenRecEdit)."""

    num_encoder_layers: int = 4
    """Encoder T5 blocks (DACT 4; GenRecEdit 6)."""
    num_decoder_layers: int = 4
    """Decoder T5 blocks (DACT 4; GenRecEdit 6)."""
    d_model: int = 128
    """Hidden width."""
    num_heads: int = 6
    """Attention heads (DACT 6; GenRecEdit 8)."""
    d_kv: int = 64
    """Width of one head; the inner attention width num_heads*d_kv may differ from d_model."""
    d_ff: int = 1024
    """FFN inner width (the GenRecEdit keys live in this space)."""
    dropout: float = 0.1
    """Dropout rate of every T5 dropout layer."""
    feed_forward_proj: Literal["gated-silu", "relu"] = "gated-silu"
    """'gated-silu' (decision 1, GenRecEdit) or 'relu' (DACT parity)."""
    max_history_items: int = 20
    """Most recent history items fed to the encoder (both papers: 20)."""
    num_user_tokens: int = 0
    """Hashed user-id tokens appended to the vocabulary (TIGER paper's hashing trick); 0 = no user token."""
    relative_attention_num_buckets: int = 32
    """T5 relative-position buckets (T5 default)."""
    relative_attention_max_distance: int = 128
    """T5 relative-position max distance (T5 default)."""
    layer_norm_epsilon: float = 1e-6
    """RMSNorm epsilon (T5 default)."""

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in _FFN_KINDS:
            raise ConfigError(
                f"TigerConfig.feed_forward_proj must be one of {_FFN_KINDS}, got {self.feed_forward_proj!r}"
            )
        for name in (
            "num_encoder_layers",
            "num_decoder_layers",
            "d_model",
            "num_heads",
            "d_kv",
            "d_ff",
            "max_history_items",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"TigerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_user_tokens < 0:
            raise ConfigError(f"TigerConfig.num_user_tokens must be >= 0, got {self.num_user_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"TigerConfig.dropout must lie in [0, 1), got {self.dropout}")

    def model_vocab_size(self, sid_vocab_size: int) -> int:
        """Vocabulary of the T5: the SID table's tokens followed by the user tokens."""
        return int(sid_vocab_size) + self.num_user_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def build_tiger(cfg: TigerConfig, vocab_size: int) -> T5ForConditionalGeneration:
    """A freshly initialised T5 (no hub weights) for SID vocabulary ``vocab_size`` (``SemanticIdTable.vocab_size``).

    The model's vocabulary is ``vocab_size + cfg.num_user_tokens``; pad = decoder start = 0 and there
    is no EOS token (decoding always stops after L+1 tokens). Seed torch before calling for a
    reproducible initialisation.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (pad + at least one SID token), got {vocab_size}")
    config = T5Config(
        vocab_size=cfg.model_vocab_size(vocab_size),
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj=cfg.feed_forward_proj,
        is_encoder_decoder=True,
        use_cache=True,
        pad_token_id=PAD_TOKEN,
        eos_token_id=None,  # no EOS: a SID always has exactly L+1 tokens
        decoder_start_token_id=PAD_TOKEN,
        tie_word_embeddings=True,
    )
    return T5ForConditionalGeneration(config)


# ------------------------------------------------------------------------------------------- encoding
def _as_numpy_int64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def user_token_ids(user_ids, num_user_tokens: int, sid_vocab_size: int) -> np.ndarray:
    """Hashed user token of each user id: ``sid_vocab_size + hash(user) mod num_user_tokens``.

    The hash is ``genrec.hashing.splitmix64``, so the mapping is the same in every run.
    """
    if num_user_tokens <= 0:
        raise ValueError("user_token_ids needs num_user_tokens > 0")
    u = splitmix64(_as_numpy_int64(user_ids, "user_ids").astype(np.uint64))
    return (u % np.uint64(num_user_tokens)).astype(np.int64) + int(sid_vocab_size)


def encode_histories(
    history_items,
    sid_table: SemanticIdTable,
    max_items: int = 20,
    user_ids=None,
    num_user_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder inputs for a batch of histories.

    Args:
        history_items: (B, N) item ids in time order, -1 = padding (normally left padding; padding
            anywhere is dropped, the order of real items is kept).
        sid_table: the SID table giving every history item's L+1 tokens (unknown items raise KeyError).
        max_items: keep the most recent ``max_items`` items of each row (``TigerConfig.max_history_items``).
        user_ids: (B,) user ids, required iff ``num_user_tokens > 0``.
        num_user_tokens: ``TigerConfig.num_user_tokens``; > 0 puts one hashed user token before the history.

    Returns:
        input_ids (B, T) int64, left-padded with 0, T = (longest kept history)·(L+1) [+1 with a user token];
        attention_mask (B, T) int64, 1 on real tokens.
    """
    items = _as_numpy_int64(history_items, "history_items")
    if items.ndim != 2:
        raise ValueError(f"history_items must have shape (B, N), got {items.shape}")
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    if (num_user_tokens > 0) != (user_ids is not None):
        raise ValueError("user_ids must be given exactly when num_user_tokens > 0")
    bsz = items.shape[0]
    width = sid_table.sid_length
    valid = items >= 0
    # Stable sort puts padding first and keeps the time order of real items: right-aligned rows.
    order = np.argsort(valid, axis=1, kind="stable")
    items = np.take_along_axis(items, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    if items.shape[1] == 0:
        raise ValueError("history_items must have at least one column")
    # At least one item slot so that an all-padding batch still gives a (fully masked) encoder input.
    keep = min(max(int(valid.sum(axis=1).max()), 1), max_items)
    items = items[:, items.shape[1] - keep :]
    valid = valid[:, valid.shape[1] - keep :]

    tokens = np.zeros((bsz, keep, width), dtype=np.int64)
    if valid.any():
        tokens[valid] = sid_table.tokens_of(items[valid])
    tokens = tokens.reshape(bsz, keep * width)
    if num_user_tokens > 0:
        user = _as_numpy_int64(user_ids, "user_ids").reshape(-1)
        if user.shape[0] != bsz:
            raise ValueError(f"user_ids must have shape ({bsz},), got {user.shape}")
        user_tok = user_token_ids(user, num_user_tokens, sid_table.vocab_size)
        # The user token sits right before the row's first real history token (left padding stays left).
        n_real = valid.sum(axis=1) * width
        out = np.zeros((bsz, keep * width + 1), dtype=np.int64)
        out[:, 1:] = tokens
        out[np.arange(bsz), out.shape[1] - 1 - n_real] = user_tok
        tokens = out
    input_ids = torch.from_numpy(tokens)
    return input_ids, (input_ids != PAD_TOKEN).long()


def target_tokens(items, sid_table: SemanticIdTable) -> torch.Tensor:
    """Labels for target items (any shape) → (..., L+1) int64 SID tokens (no EOS, no -100)."""
    arr = _as_numpy_int64(items, "items")
    if np.any(arr < 0):
        raise ValueError("target items must be real items (>= 0); got padding (-1)")
    return torch.from_numpy(np.ascontiguousarray(sid_table.tokens_of(arr)))


def tiger_loss(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Token cross-entropy averaged over the L+1 target positions (HF shifts labels right with start 0)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
