"""Reference decoding paths built on stock HF ``generate`` and full-recompute forwards.

They are slow and exist to pin the fast path (``beam_search.py``) down:

* :func:`reference_beam_search` — ``model.generate`` with beam search, ``prefix_allowed_tokens_fn``
  over a plain dict trie, every generation argument explicit. With an ``edit`` it disables the KV
  cache, so every step recomputes the whole decoder, and a forward hook on the edited layer's ``wo``
  adds ``edit.delta`` at the last time step only: the literal One-One semantics of the GenRecEdit
  code (specs/genrecedit.md §6.1).
* :func:`reference_score_sids` — one full teacher-forced forward per SID position with the same hook (the
  one reference scorer: the editing tests use it too).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache, GenerationConfig, T5ForConditionalGeneration

from genrec.decoding.beam_search import eval_mode
from genrec.models.ffn_edit import FFNEdit
from genrec.tokenizers.sid import PAD_TOKEN, SemanticIdTable

_GARBAGE_SCORE = -1e8  # HF starts beams 1..B-1 at -1e9; anything below this is such a filler beam


def build_prefix_dict(sid_table: SemanticIdTable) -> dict[tuple[int, ...], list[int]]:
    """Decoder-input prefix (starting with the start token 0) → sorted allowed next tokens."""
    trie: dict[tuple[int, ...], set[int]] = {}
    for row in sid_table.tokens().tolist():
        seq = [PAD_TOKEN, *row]
        for p in range(1, len(seq)):
            trie.setdefault(tuple(seq[:p]), set()).add(seq[p])
    return {k: sorted(v) for k, v in trie.items()}


def items_of_tokens_checked(sid_table: SemanticIdTable, tokens: np.ndarray) -> np.ndarray:
    """``sid_table.items_of_tokens`` plus a range check per position: a token outside its position's
    range (possible in unconstrained decoding) would otherwise alias another SID's mixed-radix key."""
    values = tokens - sid_table.level_offsets()
    in_range = np.all((values >= 0) & (values < np.asarray(sid_table.level_sizes())), axis=-1)
    return np.where(in_range, sid_table.items_of_tokens(tokens), -1)


@contextmanager
def last_step_edit_hooks(model: T5ForConditionalGeneration, edit: FFNEdit | None, num_positions: int):
    """Hooks adding ``edit.delta(p, key)`` to the last time step of the edited layers' ``wo`` output.

    The position p is read from the decoder length (p = length − 1), so this is only correct when
    every call runs the decoder on the full prefix (no KV cache).
    """
    handles = []
    if edit is not None:
        layers = {edit.layer_for_position(p) for p in range(num_positions)} - {None}
        for layer in sorted(layers):

            def hook(module, inputs, output, layer=layer):
                p = output.shape[1] - 1
                if edit.layer_for_position(p) != layer:
                    return output
                output = output.clone()
                output[:, -1] = output[:, -1] + edit.delta(p, inputs[0][:, -1]).to(output.dtype)
                return output

            wo = model.decoder.block[layer].layer[-1].DenseReluDense.wo
            handles.append(wo.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _no_default_eos(model: T5ForConditionalGeneration):
    # generate() fills unset fields from model.generation_config; an EOS there (T5 defaults) would end
    # unconstrained hypotheses early, which the fast path never does.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


@torch.no_grad()
def reference_beam_search(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sid_table: SemanticIdTable,
    num_beams: int = 20,
    top_k: int = 20,
    edit: FFNEdit | None = None,
    unconstrained: bool = False,
    return_tokens: bool = False,
):
    """HF ``generate`` beam search; same arguments and return format as ``constrained_beam_search``."""
    if not 1 <= top_k <= num_beams:
        raise ValueError(f"top_k must lie in [1, num_beams={num_beams}], got {top_k}")
    depth = sid_table.sid_length
    prefix = build_prefix_dict(sid_table)

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        # Filler beams (fewer valid SIDs than beams) follow no SID; give them the pad token.
        return prefix.get(tuple(sent.tolist()), [PAD_TOKEN])

    gen = GenerationConfig(
        max_new_tokens=depth,
        min_new_tokens=0,
        do_sample=False,
        num_beams=num_beams,
        num_beam_groups=1,
        num_return_sequences=top_k,
        length_penalty=0.0,  # score = sum of token log-probs
        early_stopping=False,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        temperature=1.0,
        top_k=None,
        top_p=None,
        bos_token_id=None,
        pad_token_id=PAD_TOKEN,
        eos_token_id=None,  # no EOS: every hypothesis has exactly L+1 tokens
        decoder_start_token_id=PAD_TOKEN,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        use_cache=edit is None,  # an edit needs full recomputation so that earlier steps stay unedited
        output_scores=True,
        return_dict_in_generate=True,
    )
    # Caches without a config grow per layer on demand; HF sizes a config-built cache by the encoder's
    # layer count, which breaks models whose decoder is deeper than the encoder.
    cache = {"past_key_values": EncoderDecoderCache(DynamicCache(), DynamicCache())} if gen.use_cache else {}
    with eval_mode(model), last_step_edit_hooks(model, edit, depth), _no_default_eos(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=gen,
            prefix_allowed_tokens_fn=None if unconstrained else allowed,
            **cache,
        )
    bsz = input_ids.shape[0]
    tokens = out.sequences[:, 1:].reshape(bsz, top_k, depth).cpu()
    scores = out.sequences_scores.reshape(bsz, top_k).float().cpu()
    items = torch.from_numpy(items_of_tokens_checked(sid_table, tokens.numpy()))
    filler = scores < _GARBAGE_SCORE
    items = items.masked_fill(filler, -1)
    scores = scores.masked_fill(filler, float("-inf"))
    tokens = tokens.masked_fill(filler[..., None], PAD_TOKEN)
    return (items, scores, tokens) if return_tokens else (items, scores)


@torch.no_grad()
def reference_score_sids(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sid_tokens: torch.Tensor,
    edit: FFNEdit | None = None,
) -> torch.Tensor:
    """(B, L+1) SIDs → (B, L+1) teacher-forced log p(t_p | x, t_<p), one full forward per position.

    The one reference scorer (fast path: ``beam_search.score_sids``): with an ``edit``, position p is scored by
    a full recompute over ``[0, t_0..t_{p-1}]`` with ``edit.delta(p, key)`` added at the last time step only
    (``last_step_edit_hooks``), so prefix states are those of the unedited model (One-One semantics). Inputs
    move to the model's device; runs in eval mode; the weights are untouched.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    sid_tokens = sid_tokens.to(device).long()
    bsz, depth = sid_tokens.shape
    start = torch.full((bsz, 1), PAD_TOKEN, dtype=torch.long, device=device)
    dec_in = torch.cat([start, sid_tokens], dim=1)
    out = []
    with eval_mode(model), last_step_edit_hooks(model, edit, depth):
        for p in range(depth):
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec_in[:, : p + 1]
            ).logits[:, -1]
            out.append(F.log_softmax(logits.float(), -1).gather(1, sid_tokens[:, p : p + 1]).squeeze(1))
    return torch.stack(out, dim=1)
