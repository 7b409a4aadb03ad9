"""Keys and values of the decoder FFN output projection (specs/genrecedit.md §4.1).

For decoder layer ``l`` and decoder time step ``t`` the key is the *input* of
``decoder.block[l].layer[-1].DenseReluDense.wo`` (gated-silu: ``silu(W_0 h) ⊙ W_1 h``; relu: ``relu(W_i h)``)
and the value is its output. Everything here runs teacher-forced full forwards: the decoder is causal, so
the states at step ``t`` of a forward over ``[0, t_0, .., t_{T-1}]`` equal those of a forward over the
prefix ``[0, .., t_{t-1}]`` alone, and one forward yields the keys of every position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from genrec.decoding.beam_search import eval_mode

# (layer, time step)
Site = tuple[int, int]


def ffn_out_proj(model: nn.Module, layer: int) -> nn.Linear:
    """The ``wo`` linear of decoder layer ``layer`` (the matrix GenRecEdit edits)."""
    blocks = model.decoder.block
    if not 0 <= layer < len(blocks):
        raise IndexError(f"decoder layer {layer} out of range: the model has {len(blocks)} decoder layers")
    return blocks[layer].layer[-1].DenseReluDense.wo


def num_decoder_layers(model: nn.Module) -> int:
    return len(model.decoder.block)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def wo_hooks(model: nn.Module, hooks: dict[int, Callable]) -> Iterator[None]:
    """Register ``hooks[layer](module, inputs, output)`` as forward hooks on the ``wo`` of each layer."""
    handles = [ffn_out_proj(model, layer).register_forward_hook(fn) for layer, fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def encode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Encoder last hidden state (never edited, so computed once per batch and reused)."""
    return model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def decoder_logits(
    model: nn.Module, enc_hidden: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor
) -> torch.Tensor:
    """(b, T, V) logits of a teacher-forced decoder pass over a precomputed encoder output."""
    out = model(
        encoder_outputs=(enc_hidden,),
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        use_cache=False,
    )
    return out.logits


def decoder_inputs(sid_tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``[0, t_0, .., t_{length-2}]``: the teacher-forced decoder input whose step ``p`` predicts ``t_p``."""
    start = torch.zeros(sid_tokens.shape[0], 1, dtype=torch.long, device=sid_tokens.device)
    return torch.cat([start, sid_tokens[:, : length - 1].long()], dim=1)


@torch.no_grad()
def capture_wo(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    sites: Iterable[Site],
    with_values: bool = False,
    enc_hidden: torch.Tensor | None = None,
) -> dict[Site, tuple[torch.Tensor, torch.Tensor | None]]:
    """Keys (b, d_ff) and optionally values (b, d_model) of ``wo`` at each (layer, step) site, one forward.

    ``input_ids`` may be None when the encoder output ``enc_hidden`` is given.

    Runs the unedited model in eval mode. ``decoder_input_ids`` must be longer than the largest step.
    """
    sites = sorted(set(sites))
    max_t = max(t for _, t in sites)
    if decoder_input_ids.shape[1] <= max_t:
        raise ValueError(
            f"decoder_input_ids has {decoder_input_ids.shape[1]} steps but step {max_t} was requested"
        )
    steps_of: dict[int, list[int]] = {}
    for layer, t in sites:
        steps_of.setdefault(layer, []).append(t)
    found: dict[Site, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def make_hook(layer: int):
        def hook(module, inputs, output):
            for t in steps_of[layer]:
                value = output[:, t].detach().clone() if with_values else None
                found[(layer, t)] = (inputs[0][:, t].detach().clone(), value)

        return hook

    with eval_mode(model), wo_hooks(model, {layer: make_hook(layer) for layer in steps_of}):
        if enc_hidden is None:
            enc_hidden = encode(model, input_ids, attention_mask)
        # The decoder only needs to run up to the largest requested step.
        decoder_logits(model, enc_hidden, attention_mask, decoder_input_ids[:, : max_t + 1])
    return found


HistoryEncoder = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def iter_key_batches(
    model: nn.Module,
    history_encoder: HistoryEncoder,
    histories,
    sid_tokens,
    sites: Iterable[Site],
    batch_size: int,
    with_values: bool = False,
    encoded: list | None = None,
) -> Iterator[tuple[slice, dict[Site, tuple[torch.Tensor, torch.Tensor | None]]]]:
    """Teacher-forced key capture over rows in batches: yields (row slice, {site: (keys, values)}).

    ``histories`` (n, N) items are turned into encoder inputs by ``history_encoder``; ``sid_tokens`` (n, L+1)
    are the targets whose prefix is fed to the decoder. Tensors stay on the model's device. When ``encoded`` is
    a list, ``(rows, attention_mask, encoder output)`` of every batch is appended to it for reuse.
    """
    sites = sorted(set(sites))
    length = max(t for _, t in sites) + 1
    device = model_device(model)
    n = len(sid_tokens)
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        input_ids, attention_mask = history_encoder(histories[rows])
        tokens = torch.as_tensor(sid_tokens[rows], dtype=torch.long, device=device)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with torch.no_grad(), eval_mode(model):
            enc_hidden = encode(model, input_ids, attention_mask)
        if encoded is not None:
            encoded.append((rows, attention_mask, enc_hidden))
        found = capture_wo(
            model,
            input_ids,
            attention_mask,
            decoder_inputs(tokens, length),
            sites,
            with_values=with_values,
            enc_hidden=enc_hidden,
        )
        yield rows, found


def collect_keys(
    model: nn.Module,
    history_encoder: HistoryEncoder,
    histories,
    sid_tokens,
    sites: Iterable[Site],
    batch_size: int,
    encoded: list | None = None,
) -> dict[Site, torch.Tensor]:
    """Keys (n, d_ff) at each site for every row, gathered on the CPU in float32 (for the probe)."""
    sites = sorted(set(sites))
    out: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    batches = iter_key_batches(model, history_encoder, histories, sid_tokens, sites, batch_size, encoded=encoded)
    for _, found in batches:
        for s in sites:
            out[s].append(found[s][0].float().cpu())
    return {s: torch.cat(v) if v else torch.zeros(0) for s, v in out.items()}
