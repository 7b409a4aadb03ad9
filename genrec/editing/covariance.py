"""Preserved-key second moment C̄0 (specs/genrecedit.md §5.1, decision 5).

C̄0^{(l,p)} = (1/N) Σ_n k_n k_nᵀ over one example per training row (history → its own target, teacher-forced
with the target's SID prefix), k_n = ``wo`` input at decoder layer l, step p. Accumulated in float64 and
cached on disk in float64. The released cache key ignored the checkpoint (a stale-cache hazard); here the
key holds a hash of the model's state_dict, the layer, the position, N and a hash of the exact token inputs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genrec.editing.keys import HistoryEncoder, Site, decoder_inputs, iter_key_batches
from genrec.files import atomic_torch_save

CACHE_FORMAT = "genrec.covariance/1"


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every state_dict entry (name, dtype, shape, bytes): the checkpoint hash."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def preservation_rows(num_rows: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Row indices of the preservation set: all rows, or a seeded subset of ``max_samples`` (sorted)."""
    if max_samples is None or num_rows <= max_samples:
        return np.arange(num_rows)
    g = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(num_rows, generator=g)[:max_samples].numpy())


def data_fingerprint(
    history_encoder: HistoryEncoder, histories: np.ndarray, sid_tokens: np.ndarray, length: int, batch_size: int
) -> str:
    """sha256 over the exact encoder and decoder token inputs (so any encoder layout or SID change misses)."""
    h = hashlib.sha256()
    for start in range(0, len(sid_tokens), batch_size):
        ids, mask = history_encoder(histories[start : start + batch_size])
        dec = decoder_inputs(torch.as_tensor(sid_tokens[start : start + batch_size]), length)
        for t in (ids, mask, dec):
            h.update(np.ascontiguousarray(t.cpu().numpy(), dtype="<i8").tobytes())
    h.update(f"{len(sid_tokens)}|{length}".encode())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, checkpoint_hash: str, data_hash: str, site: Site, n: int) -> Path:
    layer, position = site
    return Path(cache_dir) / f"cov_{checkpoint_hash[:16]}_{data_hash[:16]}_l{layer}_p{position}_n{n}.pt"


def _load_cached(path: Path, checkpoint_hash: str, data_hash: str, site: Site, n: int) -> torch.Tensor | None:
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    expected = {
        "format": CACHE_FORMAT,
        "checkpoint_hash": checkpoint_hash,
        "data_hash": data_hash,
        "layer": site[0],
        "position": site[1],
        "num_samples": n,
    }
    for k, v in expected.items():
        if blob.get(k) != v:
            raise ValueError(f"{path}: covariance cache field {k!r} is {blob.get(k)!r}, expected {v!r}")
    return blob["cov"]


def second_moments(
    model: nn.Module,
    history_encoder: HistoryEncoder,
    histories: np.ndarray,
    sid_tokens: np.ndarray,
    sites: list[Site],
    batch_size: int,
) -> dict[Site, torch.Tensor]:
    """Mean of k kᵀ (float64, CPU) at each site over all given rows, in one pass."""
    sums: dict[Site, torch.Tensor] = {}
    for _, found in iter_key_batches(model, history_encoder, histories, sid_tokens, sites, batch_size):
        for s in sites:
            k = found[s][0].double()
            sums[s] = sums[s] + k.T @ k if s in sums else k.T @ k
    n = len(sid_tokens)
    if n == 0:
        raise ValueError("the preservation set is empty: no training rows to estimate C̄0 from")
    return {s: (v / n).cpu() for s, v in sums.items()}


def preserved_covariances(
    model: nn.Module,
    history_encoder: HistoryEncoder,
    train_history: np.ndarray,
    train_sid_tokens: np.ndarray,
    sites: list[Site],
    max_samples: int | None = 400_000,
    seed: int = 0,
    batch_size: int = 1280,
    cache_dir: str | Path | None = None,
    checkpoint_hash: str | None = None,
) -> tuple[dict[Site, torch.Tensor], dict]:
    """C̄0 at each (layer, position) site, from the disk cache where possible.

    ``max_samples`` = mom2_n_samples (400,000 in the reference); a seeded subset is used above it. Returns
    ``({site: C̄0 float64 (d_ff, d_ff)}, info)`` with info listing cache hits and the sample count.
    """
    sites = sorted(set(sites))
    rows = preservation_rows(len(train_sid_tokens), max_samples, seed)
    histories, tokens = train_history[rows], train_sid_tokens[rows]
    n = len(rows)
    out: dict[Site, torch.Tensor] = {}
    info: dict = {"num_samples": n, "cache_hits": [], "computed": []}
    missing = list(sites)
    paths: dict[Site, Path] = {}
    if cache_dir is not None:
        checkpoint_hash = checkpoint_hash or model_fingerprint(model)
        data_hash = data_fingerprint(history_encoder, histories, tokens, max(p for _, p in sites) + 1, batch_size)
        missing = []
        for s in sites:
            paths[s] = cache_path(cache_dir, checkpoint_hash, data_hash, s, n)
            cached = _load_cached(paths[s], checkpoint_hash, data_hash, s, n)
            if cached is None:
                missing.append(s)
            else:
                out[s] = cached
                info["cache_hits"].append(list(s))
        info.update(checkpoint_hash=checkpoint_hash, data_hash=data_hash)
    if missing:
        out.update(second_moments(model, history_encoder, histories, tokens, missing, batch_size))
        info["computed"] = [list(s) for s in missing]
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            for s in missing:
                blob = {
                    "format": CACHE_FORMAT,
                    "cov": out[s],
                    "checkpoint_hash": checkpoint_hash,
                    "data_hash": data_hash,
                    "layer": s[0],
                    "position": s[1],
                    "num_samples": n,
                }
                atomic_torch_save(blob, paths[s])  # unique temporary: runs sharing the cache do not collide
    return out, info
