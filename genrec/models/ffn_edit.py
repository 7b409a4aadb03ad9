"""Interface between decoders and decoder-FFN edits (GenRecEdit's One-One trigger).

A decoder that supports edits takes an object with this protocol. Semantics (specs/genrecedit.md §6.1):
while the decoder computes the query of SID position ``p`` (decoder input index ``p``: the step that
predicts SID token ``p``), the output of ``decoder.block[l].layer[-1].DenseReluDense.wo`` at layer
``l = layer_for_position(p)`` gets ``delta(p, key)`` added, where ``key`` is that ``wo``'s input at that
step. Only that step's query is edited: states of earlier steps (the prefix, and any KV cache built from
it) are those of the unedited model. ``layer_for_position`` returns None where no edit applies.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class FFNEdit(Protocol):
    def layer_for_position(self, position: int) -> int | None: ...

    def delta(self, position: int, key: torch.Tensor) -> torch.Tensor:
        """Map ``key`` (..., d_ff) to the additive change of the ``wo`` output (..., d_model)."""
        ...
