"""Edit sets and the One-One trigger (specs/genrecedit.md §5.4, §6; decision 5).

``PositionEdits`` holds one ΔW per SID position (never summed per layer) and implements the ``FFNEdit``
protocol of ``genrec.models.ffn_edit``: while the decoder computes the query of position p, the ``wo`` output of
layer l_p gets ``ΔW_p · key`` added. The model's weights are never modified, so removing the edit is simply not
passing it to the decoder.

``merged(model)`` is the "w/o one-one" ablation (§6.3): Σ_{p: l_p = l} ΔW_p is added to ``wo`` of layer l for the
duration of a ``with`` block (every step, every time step), then the original weights are restored bit for
bit. ``merge_into`` does the same permanently (the "merge before the next period" option of decision 6).

The reference teacher-forced scorer with One-One semantics is ``genrec.decoding.reference.reference_score_sids``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genrec.editing.keys import ffn_out_proj
from genrec.models.ffn_edit import FFNEdit

STATE_FORMAT = "genrec.position_edits/1"


class SidTableMismatchError(ValueError):
    """An edit set is applied to a model whose SID table differs from the one it was built for."""


class PositionEdits:
    """ΔW per SID position: ``{position: (layer, ΔW (d_model, d_ff))}``.

    ``one_one=False`` marks an edit set meant to be active at every step (the object-wise "w/o position-wise"
    ablation): it cannot be expressed through the per-step ``FFNEdit`` protocol and must be used through
    ``merged`` / ``activate``.
    """

    def __init__(
        self,
        deltas: dict[int, tuple[int, torch.Tensor]],
        cov_lambda: float,
        cold_items: np.ndarray | torch.Tensor,
        sid_table_hash: str,
        probe_accuracy: np.ndarray | torch.Tensor | None = None,
        one_one: bool = True,
        meta: dict | None = None,
    ) -> None:
        self._deltas = {int(p): (int(layer), dw.detach().to(torch.float32)) for p, (layer, dw) in deltas.items()}
        shapes = {tuple(dw.shape) for _, dw in self._deltas.values()}
        if len(shapes) > 1:
            raise ValueError(f"all ΔW must share one shape (d_model, d_ff), got {sorted(shapes)}")
        self.cov_lambda = float(cov_lambda)
        self.cold_items = np.asarray(cold_items, dtype=np.int64)
        self.sid_table_hash = str(sid_table_hash)
        self.probe_accuracy = None if probe_accuracy is None else np.asarray(probe_accuracy, dtype=np.float64)
        self.one_one = bool(one_one)
        self.meta = dict(meta or {})
        self._cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    # ----------------------------------------------------------------- FFNEdit protocol
    def layer_for_position(self, position: int) -> int | None:
        if not self.one_one:
            raise RuntimeError(
                "this edit set is not one-one (object-wise edit, active at every step); use "
                "PositionEdits.activate(model) or merged(model) instead of passing it to a decoder"
            )
        entry = self._deltas.get(int(position))
        return None if entry is None else entry[0]

    def delta(self, position: int, key: torch.Tensor) -> torch.Tensor:
        """``key (..., d_ff) @ ΔW_pᵀ`` in the key's dtype/device (ΔW copies cached per device and dtype)."""
        cache_key = (int(position), key.device, key.dtype)
        dw = self._cache.get(cache_key)
        if dw is None:
            dw = self._deltas[int(position)][1].to(device=key.device, dtype=key.dtype)
            self._cache[cache_key] = dw
        return key @ dw.T

    # ----------------------------------------------------------------- views
    @property
    def positions(self) -> list[int]:
        return sorted(self._deltas)

    @property
    def layers(self) -> dict[int, int]:
        """Chosen layer per position."""
        return {p: layer for p, (layer, _) in sorted(self._deltas.items())}

    def delta_weight(self, position: int) -> torch.Tensor:
        return self._deltas[int(position)][1]

    def summed_per_layer(self) -> dict[int, torch.Tensor]:
        """Σ ΔW_p over the positions that share a layer (only for the merged ablation)."""
        out: dict[int, torch.Tensor] = {}
        for layer, dw in self._deltas.values():
            out[layer] = out[layer] + dw if layer in out else dw.clone()
        return out

    # ----------------------------------------------------------------- merged activation
    @contextmanager
    def merged(self, model: nn.Module) -> Iterator[nn.Module]:
        """Add Σ ΔW per layer to the ``wo`` weights inside the block; restores the exact originals after."""
        saved = self.merge_into(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for layer, original in saved.items():
                    ffn_out_proj(model, layer).weight.copy_(original)

    def merge_into(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """Permanently add Σ ΔW per layer to ``wo``; returns copies of the original weights."""
        saved: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for layer, dw in self.summed_per_layer().items():
                w = ffn_out_proj(model, layer).weight
                if w.shape != dw.shape:
                    raise ValueError(f"ΔW shape {tuple(dw.shape)} does not match wo of layer {layer} {tuple(w.shape)}")
                saved[layer] = w.detach().clone()
                w.copy_((w.double() + dw.to(w.device, torch.float64)).to(w.dtype))
        return saved

    @contextmanager
    def activate(self, model: nn.Module) -> Iterator[FFNEdit | None]:
        """What a caller should do with this set: one-one → yields ``self`` (pass it to the decoder);
        otherwise merges the weights for the block and yields ``None``."""
        if self.one_one:
            yield self
        else:
            with self.merged(model):
                yield None

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Tensors and plain values only, loadable with ``torch.load(weights_only=True)``."""
        sd: dict = {
            "format": STATE_FORMAT,
            "positions": torch.tensor(self.positions, dtype=torch.long),
            "layers": torch.tensor([self._deltas[p][0] for p in self.positions], dtype=torch.long),
            "cov_lambda": self.cov_lambda,
            "cold_items": torch.from_numpy(self.cold_items.copy()),
            "sid_table_hash": self.sid_table_hash,
            "one_one": self.one_one,
            "meta": {k: v for k, v in self.meta.items() if isinstance(v, (int, float, str, bool))},
        }
        if self.probe_accuracy is not None:
            sd["probe_accuracy"] = torch.from_numpy(self.probe_accuracy.copy())
        for p in self.positions:
            sd[f"delta_w.{p}"] = self._deltas[p][1].clone()
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, sid_table_hash: str | None = None) -> PositionEdits:
        """Rebuild an edit set; with ``sid_table_hash`` raises ``SidTableMismatchError`` when it differs."""
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"not a GenRecEdit edit set: format {sd.get('format')!r}, expected {STATE_FORMAT!r}")
        if sid_table_hash is not None and sd["sid_table_hash"] != sid_table_hash:
            raise SidTableMismatchError(
                f"edit set was built for SID table {sd['sid_table_hash'][:16]}…, but the current table is "
                f"{sid_table_hash[:16]}…; the edited tokens would point at other items — rebuild the edits"
            )
        positions = sd["positions"].tolist()
        layers = sd["layers"].tolist()
        deltas = {p: (layer, sd[f"delta_w.{p}"]) for p, layer in zip(positions, layers)}
        acc = sd.get("probe_accuracy")
        return cls(
            deltas,
            cov_lambda=sd["cov_lambda"],
            cold_items=sd["cold_items"].numpy(),
            sid_table_hash=sd["sid_table_hash"],
            probe_accuracy=None if acc is None else acc.numpy(),
            one_one=sd["one_one"],
            meta=sd.get("meta"),
        )

    def save(self, path: str | Path) -> None:
        from genrec.files import atomic_torch_save

        atomic_torch_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path, sid_table_hash: str | None = None) -> PositionEdits:
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True), sid_table_hash)

    def __repr__(self) -> str:
        return (
            f"PositionEdits(layers={self.layers}, cov_lambda={self.cov_lambda}, "
            f"cold_items={len(self.cold_items)}, one_one={self.one_one})"
        )
