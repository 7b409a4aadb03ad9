"""Trie-constrained diverse beam search (Hamming diversity, Vijayakumar et al. 2018) for a TIGER T5.

The ``num_beams`` beams are split into ``num_groups`` groups of ``num_beams // num_groups``, decoded
step-synchronously over one shared :class:`~genrec.decoding.beam_search.CachedT5Decoder` (the groups'
beams are consecutive rows of their history). At step t the groups choose in order g = 0, 1, ..; group g
selects its beams by

    cumulative log-prob + log p(v | prefix) − penalty · n_<g(v)

where n_<g(v) is the number of beams of earlier groups (same history) that chose SID value v **at this
step, whatever their parent prefix** (the plain Hamming penalty of the paper and of HF's group beam
search). At step 0 this pushes the groups onto different first-level codes, the diversity that
matters most for SIDs. The penalty only steers the selection: the beam score carried forward and
returned is the true log-prob (sum of token log-probs, as in ``constrained_beam_search``).

Output: the beams of all groups, de-duplicated by item (an item reached by two groups keeps its best
score), ranked by score (ties: earlier group, then beam order), empty slots (-1) last. With
``num_groups = 1`` (any penalty) this is exactly ``constrained_beam_search``.

Scale: the penalty is in log-prob units (nats per earlier beam). A peaked model needs a penalty above
its log-prob gap between first-level codes before groups move; with penalty 0 and G > 1 every group
repeats group 0's beams, so only ``num_beams // G`` distinct items come back. Groups that still meet
on the same items also leave empty slots: fewer than ``top_k`` items is possible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import T5ForConditionalGeneration

from genrec.decoding.beam_search import CachedT5Decoder, _validate, eval_mode
from genrec.decoding.rerank import first_occurrence
from genrec.decoding.trie import SidTrie
from genrec.models.ffn_edit import FFNEdit
from genrec.tokenizers.sid import PAD_TOKEN


def _rank_unique(items: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) → slot order by score (stable) with later repeats / empty slots last, and the kept mask in that order."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    keep = first_occurrence(items.gather(1, order))  # best occurrence of each item
    last = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    return order.gather(1, last), keep.gather(1, last)


@torch.no_grad()
def diverse_beam_search(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: SidTrie,
    num_beams: int = 20,
    num_groups: int = 4,
    penalty: float = 0.5,
    top_k: int | None = None,
    edit: FFNEdit | None = None,
    return_tokens: bool = False,
):
    """Diverse beam search over the L+1 SID positions, constrained to ``trie`` (module docstring).

    Args:
        model, input_ids, attention_mask, trie, edit: as in ``constrained_beam_search``.
        num_beams: total beams per history (a multiple of ``num_groups``).
        num_groups: groups G; each keeps ``num_beams // G`` beams.
        penalty: Hamming diversity strength (≥ 0, in log-prob units per earlier beam).
        top_k: items returned (≤ num_beams; default num_beams).
        return_tokens: also return the (B, top_k, L+1) tokens.

    Returns:
        items (B, top_k) int64 (-1 = empty), scores (B, top_k) true log-probs (-inf = empty)
        [, tokens (B, top_k, L+1), 0 for empty slots].
    """
    _validate(model, input_ids, attention_mask)
    top_k = num_beams if top_k is None else top_k
    if num_groups < 1 or num_beams % num_groups:
        raise ValueError(f"num_beams ({num_beams}) must be a positive multiple of num_groups ({num_groups})")
    if not 1 <= top_k <= num_beams:
        raise ValueError(f"top_k must lie in [1, num_beams={num_beams}], got {top_k}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    group_size = num_beams // num_groups
    depth, bsz = trie.sid_length, input_ids.shape[0]
    with eval_mode(model):
        dec = CachedT5Decoder(model, input_ids, attention_mask, max_steps=depth)
        device = dec.cross_bias.device
        arange_b = torch.arange(bsz, device=device)[:, None]
        rows_per_hist = 1
        scores = torch.zeros(bsz, 1, device=device)  # (B, R) true log-prob of each decoder row
        seqs = torch.zeros(bsz, 1, 0, dtype=torch.long, device=device)  # (B, R, t)
        node = trie.root(bsz).to(device)  # (B * R,)
        # Decoder rows (within a history) holding each group's beams; at step 0 all share the root row.
        group_rows = [torch.zeros(1, dtype=torch.long, device=device)] * num_groups
        tokens_in = torch.full((bsz,), PAD_TOKEN, dtype=torch.long, device=device)
        for t in range(depth):
            offset, width = trie.level_offsets[t], trie.level_sizes[t]
            logp = F.log_softmax(dec.step(tokens_in, edit).float(), dim=-1)
            step_lp = logp[:, offset : offset + width].masked_fill(~trie.allowed(t, node).to(device), float("-inf"))
            step_lp = step_lp.reshape(bsz, rows_per_hist, width)  # (B, R, W)
            used = torch.zeros(bsz, width, device=device)  # earlier groups' picks of each value at step t
            new_scores, parents, values = [], [], []
            for rows in group_rows:
                n = rows.shape[0]
                cand = (scores[:, rows, None] + step_lp[:, rows]).reshape(bsz, n * width)  # (B, n·W) true
                pen = (penalty * used).repeat(1, n)  # (B, n·W) same value → same penalty, any parent
                keep = min(group_size, n * width)
                flat = (cand - pen).topk(keep, dim=1).indices  # (B, keep)
                value = flat % width
                true = cand.gather(1, flat)
                used.scatter_add_(1, value, torch.isfinite(true).float())  # dead beams do not count
                new_scores.append(true)
                parents.append(rows[torch.div(flat, width, rounding_mode="floor")])
                values.append(value)
            sizes = [v.shape[1] for v in values]
            scores, parent, value = (torch.cat(x, dim=1) for x in (new_scores, parents, values))  # (B, R')
            origin = (arange_b * rows_per_hist + parent).reshape(-1)  # absolute decoder rows
            seqs = torch.cat([seqs.reshape(bsz * rows_per_hist, -1)[origin].reshape(bsz, sum(sizes), -1),
                              (value + offset)[..., None]], dim=2)
            node = trie.advance(t, node[origin], value.reshape(-1)).to(device)
            tokens_in = (value + offset).reshape(-1)
            rows_per_hist = sum(sizes)
            starts = [sum(sizes[:g]) for g in range(num_groups)]
            group_rows = [torch.arange(s, s + n, device=device) for s, n in zip(starts, sizes)]
            if t + 1 < depth:
                dec.reorder(origin, rows_per_hist)

    items = trie.items_of_leaves(node).to(device).reshape(bsz, rows_per_hist)
    items = items.masked_fill(torch.isinf(scores), -1)
    order, keep = _rank_unique(items, scores)
    items = items.gather(1, order).masked_fill(~keep, -1)
    scores = scores.gather(1, order).masked_fill(~keep, float("-inf"))
    seqs = seqs.gather(1, order[..., None].expand_as(seqs)).masked_fill(~keep[..., None], PAD_TOKEN)
    if rows_per_hist < top_k:  # catalogue smaller than the beam at some step
        pad = top_k - rows_per_hist
        items = F.pad(items, (0, pad), value=-1)
        scores = F.pad(scores, (0, pad), value=float("-inf"))
        seqs = F.pad(seqs, (0, 0, 0, pad), value=PAD_TOKEN)
    out = (items[:, :top_k], scores[:, :top_k])
    return (*out, seqs[:, :top_k]) if return_tokens else out
