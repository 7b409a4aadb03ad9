"""Edit diagnostics: does the closed-form ΔW do what the per-request δ did, and what does it disturb?

``top1_hits`` answers, per SID position, whether the model's best token within that position's token range is the
target token when the decoder is fed the target prefix (teacher forcing), with or without an edit (One-One
semantics, through the cached decoder). On the edit requests the edited rate is the *efficacy* of ΔW (the δ success
rate is the same question for the per-request δ before the least-squares compromise); on training rows the change is
the *locality* cost.
"""

from __future__ import annotations

import numpy as np
import torch

from genrec.decoding.beam_search import CachedT5Decoder, eval_mode
from genrec.models.ffn_edit import FFNEdit
from genrec.tokenizers.sid import PAD_TOKEN, SemanticIdTable


@torch.no_grad()
def top1_hits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sid_tokens: torch.Tensor,
    sid_table: SemanticIdTable,
    edit: FFNEdit | None = None,
) -> torch.Tensor:
    """(B, L+1) bool: at step p, argmax over position p's token range == ``sid_tokens[:, p]`` (teacher-forced)."""
    offsets, sizes = sid_table.level_offsets(), sid_table.level_sizes()
    length = sid_tokens.shape[1]
    with eval_mode(model):
        dec = CachedT5Decoder(model, input_ids, attention_mask, max_steps=length)
        device = dec.cross_bias.device
        sid_tokens = sid_tokens.to(device).long()
        tokens_in = torch.full((sid_tokens.shape[0],), PAD_TOKEN, dtype=torch.long, device=device)
        hits = []
        for p in range(length):
            lo, width = int(offsets[p]), int(sizes[p])
            pred = dec.step(tokens_in, edit)[:, lo : lo + width].argmax(-1) + lo
            hits.append(pred == sid_tokens[:, p])
            tokens_in = sid_tokens[:, p]
    return torch.stack(hits, dim=1)


def top1_rates(model, encoder, histories: np.ndarray, items: np.ndarray, sid_table: SemanticIdTable,
               edit: FFNEdit | None, batch_size: int) -> np.ndarray:
    """Per-position top-1 rate (L+1,) over ``histories`` → ``items`` in batches (``encoder`` as in the editor)."""
    tokens = torch.from_numpy(sid_table.tokens_of(np.asarray(items)))
    total = torch.zeros(tokens.shape[1], dtype=torch.float64)
    for start in range(0, len(tokens), batch_size):
        ids, mask = encoder(histories[start : start + batch_size])
        total += top1_hits(model, ids, mask, tokens[start : start + batch_size], sid_table, edit).sum(0).cpu()
    return (total / max(len(tokens), 1)).numpy()
