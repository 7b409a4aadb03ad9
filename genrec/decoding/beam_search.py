"""Fast trie-constrained beam search and teacher-forced SID scoring for a TIGER T5.

Speed comes from four choices (semantics match HF ``generate``; see ``reference.py`` and the tests):

* the encoder runs once, and each decoder layer's cross-attention K/V are projected once **per
  history** (B rows), not per beam: beams are the query positions of their history's attention;
* a self-attention KV cache of our own (the decoder only ever sees L+1 ≤ 5 positions);
* the constraint is a tensor lookup in :class:`~genrec.decoding.trie.SidTrie` for all beams at once,
  and top-k runs only over the current position's token range;
* step 0 expands one beam per history instead of ``num_beams`` identical copies.

The decoder is driven through the T5 submodules (layer norms, q/k/v/o projections, FFN pieces,
final norm, tied-embedding output scaling, ``lm_head``) in eval mode (dropout off).

Edits (GenRecEdit One-One trigger, specs/genrecedit.md §6.1, ``genrec.models.ffn_edit``): at step p
the ``wo`` output of layer ``l = edit.layer_for_position(p)`` gets ``edit.delta(p, key)`` for the
current query only. Cached states of earlier steps stay unedited, so for layers above ``l`` the
current token runs twice: an unedited stream whose K/V go to the cache and an edited stream that
only produces this step's logits.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import T5ForConditionalGeneration

from genrec.decoding.trie import SidTrie
from genrec.models.ffn_edit import FFNEdit
from genrec.tokenizers.sid import PAD_TOKEN


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Run with dropout off and restore the previous train/eval state afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class CachedT5Decoder:
    """Step-wise T5 decoder with per-history cross-attention K/V and a self-attention KV cache.

    Rows of every step are grouped by history: ``N = B * group`` rows, row ``b * group + j`` belongs to
    history ``b``. :meth:`reorder` selects surviving rows (beam search) and may change ``group``.
    """

    def __init__(
        self,
        model: T5ForConditionalGeneration,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_steps: int,
        enc_hidden: torch.Tensor | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.blocks = list(model.decoder.block)
        self.num_heads = cfg.num_heads
        self.d_kv = cfg.d_kv
        self.scale_output = bool(getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings))
        self.output_scale = cfg.d_model**-0.5
        self.gated = bool(cfg.is_gated_act)
        device = model.lm_head.weight.device
        attention_mask = attention_mask.to(device)
        self.batch_size = attention_mask.shape[0]

        if enc_hidden is None:
            enc_hidden = model.encoder(
                input_ids=input_ids.to(device), attention_mask=attention_mask
            ).last_hidden_state
        enc = enc_hidden
        dtype = enc.dtype
        bsz, src_len, _ = enc.shape
        # Additive mask as in HF's eager path: 0 for real tokens, dtype-min for padding.
        self.cross_bias = torch.zeros(bsz, 1, 1, src_len, dtype=dtype, device=device).masked_fill(
            attention_mask[:, None, None, :] == 0, torch.finfo(dtype).min
        )
        self.cross_k: list[torch.Tensor] = []
        self.cross_v: list[torch.Tensor] = []
        # Stored in the layouts the per-step matmuls read (K as (B, H, d, S), V as (B, H, S, d)),
        # contiguous: otherwise every step would copy them again.
        for block in self.blocks:
            att = block.layer[1].EncDecAttention
            k = att.k(enc).view(bsz, src_len, self.num_heads, self.d_kv)
            self.cross_k.append(k.permute(0, 2, 3, 1).contiguous())
            v = att.v(enc).view(bsz, src_len, self.num_heads, self.d_kv)
            self.cross_v.append(v.transpose(1, 2).contiguous())
        # (H, T, T) causal relative-position bias; step t uses row t, columns 0..t.
        self.self_bias = (
            self.blocks[0].layer[0].SelfAttention.compute_bias(max_steps, max_steps, device=device)[0]
        )
        self.max_steps = max_steps
        self.self_k: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.self_v: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.group = 1
        self.steps_done = 0
        self._fused_weights()

    # ----------------------------------------------------------------------------------- pieces
    @staticmethod
    def _norm(layer_norm, h: torch.Tensor) -> torch.Tensor:
        # T5LayerNorm = RMSNorm without bias (one fused kernel instead of HF's four ops).
        return F.rms_norm(h, (h.shape[-1],), layer_norm.weight, layer_norm.variance_epsilon)

    def _fused_weights(self) -> None:
        # One matmul for q|k|v and one for wi_0|wi_1 instead of three and two (same maths).
        self.qkv_w, self.ffn_in_w = [], []
        for block in self.blocks:
            att = block.layer[0].SelfAttention
            self.qkv_w.append(torch.cat([att.q.weight, att.k.weight, att.v.weight], dim=0))
            ff = block.layer[-1].DenseReluDense
            self.ffn_in_w.append(
                torch.cat([ff.wi_0.weight, ff.wi_1.weight], dim=0) if self.gated else ff.wi.weight
            )

    def _self_attention(self, i: int, h: torch.Tensor, t: int, write: bool, new_kv: dict) -> torch.Tensor:
        layer = self.blocks[i].layer[0]
        n = h.shape[0]
        q, k, v = (
            F.linear(self._norm(layer.layer_norm, h), self.qkv_w[i])
            .view(n, 3, self.num_heads, 1, self.d_kv)
            .unbind(1)
        )
        if self.self_k[i] is not None:
            k = torch.cat([self.self_k[i], k], dim=2)
            v = torch.cat([self.self_v[i], v], dim=2)
        if write:
            new_kv[i] = (k, v)
        # T5 does not scale q·k; the relative position bias carries position. With ≤ L+1 keys an
        # elementwise product beats batched tiny matmuls.
        scores = (q * k).sum(-1) + self.self_bias[None, :, t, : t + 1]
        weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
        out = (weights[..., None] * v).sum(2).reshape(n, self.num_heads * self.d_kv)
        return h + layer.SelfAttention.o(out)

    def _cross_attention(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.blocks[i].layer[1]
        att = layer.EncDecAttention
        n = h.shape[0]
        x = self._norm(layer.layer_norm, h)
        # Beams of one history are its query positions: (B, H, group, d) against (B, H, S, d).
        q = att.q(x).view(self.batch_size, n // self.batch_size, self.num_heads, self.d_kv).transpose(1, 2)
        scores = torch.matmul(q, self.cross_k[i]) + self.cross_bias
        weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(weights, self.cross_v[i]).transpose(1, 2).reshape(n, self.num_heads * self.d_kv)
        return h + att.o(out)

    def _ffn(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.blocks[i].layer[-1]
        ff = layer.DenseReluDense
        pre = F.linear(self._norm(layer.layer_norm, h), self.ffn_in_w[i])
        if self.gated:
            gate, lin = pre.chunk(2, dim=-1)
            key = ff.act(gate) * lin
        else:
            key = ff.act(pre)
        return h + ff.wo(key.to(ff.wo.weight.dtype)), key

    def _block(self, i: int, h: torch.Tensor, t: int, write: bool, new_kv: dict):
        h = self._self_attention(i, h, t, write, new_kv)
        h = self._cross_attention(i, h)
        return self._ffn(i, h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self._norm(self.model.decoder.final_layer_norm, h)
        if self.scale_output:
            h = h * self.output_scale
        return self.model.lm_head(h)

    # ----------------------------------------------------------------------------------- API
    def step(self, tokens: torch.Tensor, edit: FFNEdit | None = None) -> torch.Tensor:
        """Feed one token per row (N = B * group) at the next position; returns (N, V) logits."""
        t = self.steps_done
        if t >= self.max_steps:
            raise RuntimeError(f"decoder was built for {self.max_steps} steps")
        if tokens.shape[0] != self.batch_size * self.group:
            raise ValueError(f"expected {self.batch_size * self.group} tokens, got {tokens.shape[0]}")
        edit_layer = edit.layer_for_position(t) if edit is not None else None
        if edit_layer is not None and not 0 <= edit_layer < len(self.blocks):
            raise ValueError(f"edit.layer_for_position({t}) = {edit_layer} is not a decoder layer")
        new_kv: dict = {}
        h = self.model.decoder.embed_tokens(tokens.to(self.cross_bias.device))
        h_edit = None
        for i in range(len(self.blocks)):
            h, key = self._block(i, h, t, True, new_kv)
            if h_edit is not None:
                # Edited stream: sees the cached (unedited) past plus its own current K/V, writes nothing.
                h_edit, _ = self._block(i, h_edit, t, False, new_kv)
            elif i == edit_layer:
                h_edit = h + edit.delta(t, key).to(h.dtype)
        for i, (k, v) in new_kv.items():
            self.self_k[i], self.self_v[i] = k, v
        self.steps_done = t + 1
        return self._logits(h if h_edit is None else h_edit)

    def step_to_layer(self, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the next position through blocks ``0..layer`` without touching the cache.

        Returns the residual stream after block ``layer`` and that block's ``wo`` input (the GenRecEdit key).
        With :meth:`logits_from_layer` this evaluates an edit at (layer, this step) many times over one
        unedited prefix: the δ optimisation runs only the blocks above the edited one.
        """
        t = self.steps_done
        h = self.model.decoder.embed_tokens(tokens.to(self.cross_bias.device))
        for i in range(layer + 1):
            h, key = self._block(i, h, t, False, {})
        return h, key

    def logits_from_layer(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """(N, V) logits of the next position from the residual stream ``h`` after block ``layer``."""
        t = self.steps_done
        for i in range(layer + 1, len(self.blocks)):
            h, _ = self._block(i, h, t, False, {})
        return self._logits(h)

    def reorder(self, rows: torch.Tensor, group: int) -> None:
        """Keep cache rows ``rows`` (length B * group, grouped by history) for the next step."""
        if rows.shape[0] != self.batch_size * group:
            raise ValueError(f"reorder needs {self.batch_size * group} rows, got {rows.shape[0]}")
        self.self_k = [None if k is None else k.index_select(0, rows) for k in self.self_k]
        self.self_v = [None if v is None else v.index_select(0, rows) for v in self.self_v]
        self.group = group


def _validate(model, input_ids, attention_mask) -> None:
    if not isinstance(model, T5ForConditionalGeneration):
        raise TypeError(
            f"model must be a transformers T5ForConditionalGeneration, got {type(model).__name__}"
        )
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (B, T); got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )


def _masked_step(logp: torch.Tensor, trie: SidTrie, t: int, node: torch.Tensor) -> torch.Tensor:
    """(N, level_sizes[t]) log-probs of position t's values; values that leave the trie are -inf.

    Only position t's token range is kept, so top-k runs over its values, not the whole vocabulary.
    """
    offset, width = trie.level_offsets[t], trie.level_sizes[t]
    return logp[:, offset : offset + width].masked_fill(~trie.allowed(t, node).to(logp.device), float("-inf"))


def _top_beams(
    beam_scores: torch.Tensor, step_lp: torch.Tensor, arange_b: torch.Tensor, width: int, num_beams: int
):
    """Best ``num_beams`` (beam, value) extensions of each history, over all its G beams in one top-k.

    ``beam_scores`` (B, G), ``step_lp`` (B * G, width). Returns the new (B, keep) scores, the decoder row
    each one extends (B * keep,) and its value (B * keep,).
    """
    bsz, group = beam_scores.shape
    cand = (beam_scores.reshape(-1, 1) + step_lp).reshape(bsz, group * width)
    beam_scores, flat = cand.topk(min(num_beams, group * width), dim=1)
    origin = (arange_b * group + torch.div(flat, width, rounding_mode="floor")).reshape(-1)
    return beam_scores, origin, (flat % width).reshape(-1)


def _extend(seqs: torch.Tensor, origin: torch.Tensor, tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, G, t) sequences → (B, keep, t+1): the parent sequence (decoder row ``origin``) of each kept beam
    plus its new token (``tokens``, B * keep values in row order)."""
    bsz, group, _ = seqs.shape
    return torch.cat(
        [seqs.reshape(bsz * group, -1)[origin].reshape(bsz, keep, -1), tokens.reshape(bsz, keep, 1)], dim=2
    )


def _cut_to_top_k(items, scores, seqs, top_k: int, return_tokens: bool):
    """Ranked (B, R) slots → exactly ``top_k``; empty slots are appended when R < top_k (a catalogue
    smaller than the beam at some step)."""
    rows = scores.shape[1]
    if rows < top_k:
        pad = top_k - rows
        items = F.pad(items, (0, pad), value=-1)
        scores = F.pad(scores, (0, pad), value=float("-inf"))
        seqs = F.pad(seqs, (0, 0, 0, pad), value=PAD_TOKEN)
    out = (items[:, :top_k], scores[:, :top_k])
    return (*out, seqs[:, :top_k]) if return_tokens else out


def _beam_decode(dec: CachedT5Decoder, trie: SidTrie, num_beams: int, edit, unconstrained: bool):
    """The L+1 beam steps. Returns scores (B, G), tokens (B, G, L+1) and the beams' trie nodes (B * G,)
    (still the roots when unconstrained: the trie is not walked then)."""
    bsz, depth, device = dec.batch_size, trie.sid_length, dec.cross_bias.device
    vocab = dec.model.config.vocab_size
    arange_b = torch.arange(bsz, device=device)[:, None]
    beam_scores = torch.zeros(bsz, 1, device=device)
    seqs = torch.zeros(bsz, 1, 0, dtype=torch.long, device=device)
    node = trie.root(bsz).to(device)
    tokens_in = torch.full((bsz,), PAD_TOKEN, dtype=torch.long, device=device)
    for t in range(depth):
        logp = F.log_softmax(dec.step(tokens_in, edit).float(), dim=-1)
        if unconstrained:
            offset, width, step_lp = 0, vocab, logp
        else:
            offset, width = trie.level_offsets[t], trie.level_sizes[t]
            step_lp = _masked_step(logp, trie, t, node)
        beam_scores, origin, value = _top_beams(beam_scores, step_lp, arange_b, width, num_beams)
        tokens_in = value + offset
        seqs = _extend(seqs, origin, tokens_in, beam_scores.shape[1])
        if not unconstrained:
            node = trie.advance(t, node[origin], value).to(device)
        if t + 1 < depth:
            dec.reorder(origin, beam_scores.shape[1])
    return beam_scores, seqs, node


@torch.no_grad()
def constrained_beam_search(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: SidTrie,
    num_beams: int = 20,
    top_k: int = 20,
    edit: FFNEdit | None = None,
    unconstrained: bool = False,
    return_tokens: bool = False,
):
    """Beam search over the L+1 SID positions, constrained to SIDs in ``trie`` (decision 4).

    Beam score = sum of token log-probs (log-softmax over the whole vocabulary, invalid tokens then
    masked, no renormalisation, no length penalty) — the same as HF ``generate`` with
    ``prefix_allowed_tokens_fn`` and ``length_penalty=0``.

    Args:
        model: TIGER T5 (run in eval mode here; its train/eval state is restored).
        input_ids, attention_mask: (B, T) encoder inputs (``genrec.models.tiger.encode_histories``).
        trie: valid SIDs (``SidTrie.from_table``); also maps final SIDs to items.
        num_beams: beams kept per history at every step.
        top_k: ranked items returned per history (≤ num_beams).
        edit: optional One-One FFN edit (see module docstring).
        unconstrained: explicit option: no trie masking, top-k over the whole vocabulary at every step;
            sequences that are not valid SIDs come back with item -1 (their tokens tell them apart
            from empty slots, whose tokens are 0).
        return_tokens: also return the (B, top_k, L+1) tokens.

    Returns:
        items (B, top_k) int64, best first, -1 where fewer than top_k SIDs exist (or the SID is invalid
        in unconstrained mode); scores (B, top_k) float32, -inf for empty slots; [tokens (B, top_k, L+1)
        int64, 0 for empty slots]. Beams are distinct sequences, so the ranked items are distinct.
    """
    _validate(model, input_ids, attention_mask)
    if not 1 <= top_k <= num_beams:
        raise ValueError(f"top_k must lie in [1, num_beams={num_beams}], got {top_k}")
    with eval_mode(model):
        dec = CachedT5Decoder(model, input_ids, attention_mask, max_steps=trie.sid_length)
        beam_scores, seqs, node = _beam_decode(dec, trie, num_beams, edit, unconstrained)

    device = dec.cross_bias.device
    if unconstrained:
        items = trie.items_of_tokens(seqs).to(device)
    else:
        items = trie.items_of_leaves(node).to(device).reshape(beam_scores.shape)
    dead = torch.isinf(beam_scores)
    items = items.masked_fill(dead, -1)
    seqs = seqs.masked_fill(dead[..., None], PAD_TOKEN)
    return _cut_to_top_k(items, beam_scores, seqs, top_k, return_tokens)


def score_sids(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sid_tokens: torch.Tensor,
    edit: FFNEdit | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Teacher-forced log-probability of given SIDs (specs/genrecedit.md §6.2).

    ``log p(y | x) = Σ_p log p(y_p | x, y_<p)`` where, with an edit, step p's query alone is edited
    (earlier positions' states unedited) — exactly the beam-search semantics. Gradients flow (wrap in
    ``torch.no_grad`` for evaluation); dropout is off.

    Args:
        sid_tokens: (B, L+1) or (B, M, L+1) token ids: one or M candidate SIDs per history.
        reduction: "sum" → (B,) / (B, M); "none" → per-position log-probs (B[, M], L+1).
    """
    _validate(model, input_ids, attention_mask)
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    squeeze = sid_tokens.ndim == 2
    sids = sid_tokens[:, None, :] if squeeze else sid_tokens
    if sids.ndim != 3 or sids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"sid_tokens must be (B, L+1) or (B, M, L+1) with B = {input_ids.shape[0]}")
    bsz, m, depth = sids.shape
    with eval_mode(model):
        dec = CachedT5Decoder(model, input_ids, attention_mask, max_steps=depth)
        device = dec.cross_bias.device
        sids = sids.to(device).long()
        flat = sids.reshape(bsz * m, depth)
        dec.reorder(torch.arange(bsz, device=device).repeat_interleave(m), m)
        tokens_in = torch.full((bsz * m,), PAD_TOKEN, dtype=torch.long, device=device)
        per_pos = []
        for t in range(depth):
            logp = F.log_softmax(dec.step(tokens_in, edit).float(), dim=-1)
            per_pos.append(logp.gather(1, flat[:, t : t + 1]).squeeze(1))
            tokens_in = flat[:, t]
    lp = torch.stack(per_pos, dim=1).reshape(bsz, m, depth)
    out = lp.sum(-1) if reduction == "sum" else lp
    return out[:, 0] if squeeze else out
