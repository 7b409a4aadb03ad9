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

from genrec.decoding.beam_search import (
    CachedT5Decoder,
    _cut_to_top_k,
    _extend,
    _masked_step,
    _validate,
    eval_mode,
)
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


def _select_groups(
    scores: torch.Tensor, step_lp: torch.Tensor, group_rows: list[torch.Tensor], group_size: int, penalty: float
):
    """One step's selection, group after group (module docstring): group g takes its top ``group_size``
    extensions of its own rows by true log-prob − penalty · (earlier groups' picks of the same value).

    ``scores`` (B, R) true log-probs of the decoder rows, ``step_lp`` (B, R, W). Returns the new true
    scores, parent rows (within the history) and values, each (B, R') with every group's beams
    consecutive in group order, and the groups' sizes.
    """
    bsz, _, width = step_lp.shape
    used = torch.zeros(bsz, width, device=step_lp.device)  # earlier groups' picks of each value at this step
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
    return scores, parent, value, sizes


def _diverse_decode(dec: CachedT5Decoder, trie: SidTrie, num_groups: int, group_size: int, penalty: float, edit):
    """The L+1 steps of all groups. Returns true scores (B, R), tokens (B, R, L+1), trie leaves (B * R,)."""
    bsz, depth, device = dec.batch_size, trie.sid_length, dec.cross_bias.device
    arange_b = torch.arange(bsz, device=device)[:, None]
    scores = torch.zeros(bsz, 1, device=device)  # (B, R) true log-prob of each decoder row
    seqs = torch.zeros(bsz, 1, 0, dtype=torch.long, device=device)  # (B, R, t)
    node = trie.root(bsz).to(device)  # (B * R,)
    # Decoder rows (within a history) holding each group's beams; at step 0 all share the root row.
    group_rows = [torch.zeros(1, dtype=torch.long, device=device)] * num_groups
    tokens_in = torch.full((bsz,), PAD_TOKEN, dtype=torch.long, device=device)
    for t in range(depth):
        offset, width, rows_per_hist = trie.level_offsets[t], trie.level_sizes[t], scores.shape[1]
        logp = F.log_softmax(dec.step(tokens_in, edit).float(), dim=-1)
        step_lp = _masked_step(logp, trie, t, node).reshape(bsz, rows_per_hist, width)  # (B, R, W)
        scores, parent, value, sizes = _select_groups(scores, step_lp, group_rows, group_size, penalty)
        origin = (arange_b * rows_per_hist + parent).reshape(-1)  # absolute decoder rows
        tokens = value + offset
        seqs = _extend(seqs, origin, tokens, sum(sizes))
        node = trie.advance(t, node[origin], value.reshape(-1)).to(device)
        tokens_in = tokens.reshape(-1)
        starts = [sum(sizes[:g]) for g in range(num_groups)]
        group_rows = [torch.arange(s, s + n, device=device) for s, n in zip(starts, sizes)]
        if t + 1 < depth:
            dec.reorder(origin, sum(sizes))
    return scores, seqs, node


def _rank_results(items: torch.Tensor, scores: torch.Tensor, seqs: torch.Tensor):
    """All groups' slots ranked by score, one per item (its best); repeats become empty slots, moved last."""
    order, keep = _rank_unique(items, scores)
    items = items.gather(1, order).masked_fill(~keep, -1)
    scores = scores.gather(1, order).masked_fill(~keep, float("-inf"))
    seqs = seqs.gather(1, order[..., None].expand_as(seqs)).masked_fill(~keep[..., None], PAD_TOKEN)
    return items, scores, seqs


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
    with eval_mode(model):
        dec = CachedT5Decoder(model, input_ids, attention_mask, max_steps=trie.sid_length)
        scores, seqs, node = _diverse_decode(dec, trie, num_groups, num_beams // num_groups, penalty, edit)

    items = trie.items_of_leaves(node).to(dec.cross_bias.device).reshape(scores.shape)
    items = items.masked_fill(torch.isinf(scores), -1)
    items, scores, seqs = _rank_results(items, scores, seqs)
    return _cut_to_top_k(items, scores, seqs, top_k, return_tokens)
