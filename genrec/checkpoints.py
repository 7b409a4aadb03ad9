"""Reading checkpoints safely: ``weights_only=True`` always, and one clear error for every way a file can be wrong
(missing, empty, truncated, not a PyTorch file, unsafe pickle, the wrong kind of checkpoint)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from genrec.errors import CheckpointError

CONTINUAL_STATE_KEYS = {"rqvae", "tiger", "seen_periods"}


def read_checkpoint(path: str | os.PathLike, expect: str | None = None) -> dict:
    """The checkpoint dict at ``path``. ``expect`` (a LightningModule class name, e.g. ``TigerModule``) also checks
    that it is a Lightning checkpoint of that module."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (an interrupted save?)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise CheckpointError(f"checkpoint {path}: refused, it holds Python objects other than tensors and plain "
                                  "values (only weights_only=True checkpoints are loaded)") from None
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch checkpoint (corrupt or truncated)") from None
    except Exception as exc:  # noqa: BLE001 — any failure to parse the file means it is not a checkpoint
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch checkpoint (corrupt or truncated: "
                              f"{detail})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict of tensors, found a {type(ckpt).__name__}")
    if expect is not None:
        check_kind(ckpt, expect, path)
    return ckpt


def check_kind(ckpt: dict, expect: str, path) -> None:
    if CONTINUAL_STATE_KEYS <= set(ckpt):
        raise CheckpointError(
            f"checkpoint {path}: this is the period state of a `genrec continual` run (state.pt), not a {expect} "
            "checkpoint; use a Lightning checkpoint (.ckpt) written by `genrec fit`")
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"checkpoint {path}: not a Lightning checkpoint (expected keys 'state_dict' and "
                              f"'hyper_parameters', found {sorted(ckpt)[:8]})")
    cls = str((ckpt.get("hyper_parameters") or {}).get("_class_path", ""))
    if cls and cls.rsplit(".", 1)[-1] != expect:
        raise CheckpointError(f"checkpoint {path}: a {cls.rsplit('.', 1)[-1]} checkpoint, expected a {expect} one")
