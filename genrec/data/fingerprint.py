"""Fingerprints that keep runs from mixing: the catalogue (item ids in dense order), the prepared data (its
content) and the source files a prepared folder was made from.

A checkpoint stores the catalogue fingerprint of the data it was trained on; a command that loads it checks the
data it is given. The catalogue may have grown since (later periods add items after the known ones: dense ids
follow first appearance), so the check compares the first ``num_items`` ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from genrec.errors import CheckpointError, RunMismatchError

_BLOCK = 1 << 22  # elements hashed at a time: a memory-mapped column is never copied whole


def _sha(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.dtype.str, a.shape)).encode())
        flat = a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)
        for s in range(0, len(flat), _BLOCK):
            h.update(np.ascontiguousarray(flat[s:s + _BLOCK]).view(np.uint8))
    return h.hexdigest()


def ids_sha256(ids) -> str:
    """sha256 of the ids joined by newlines (hashed in blocks: the same digest without one huge string)."""
    h = hashlib.sha256()
    for s in range(0, len(ids), 1 << 16):
        block = "\n".join(map(str, ids[s:s + (1 << 16)]))
        h.update(((("\n" if s else "") + block)).encode("utf-8"))
    return h.hexdigest()


def catalogue_fingerprint(item_ids) -> dict:
    """What a model's item indices mean: the raw id of every dense item index."""
    return {"num_items": len(item_ids), "item_ids_sha256": ids_sha256(item_ids)}


def check_catalogue(stored: dict | None, item_ids, what: str) -> None:
    """Refuse data whose first ``stored['num_items']`` item ids are not the ones ``what`` was trained on."""
    if not stored:
        return
    n = int(stored["num_items"])
    if len(item_ids) < n:
        raise CheckpointError(
            f"{what} was trained on a catalogue of {n} items (fingerprint {stored['item_ids_sha256'][:12]}), but the "
            f"data given has only {len(item_ids)} items: use the data the model was trained on")
    found = ids_sha256(list(item_ids)[:n])
    if found != stored["item_ids_sha256"]:
        raise CheckpointError(
            f"{what} belongs to another catalogue: its item-id fingerprint is {stored['item_ids_sha256'][:12]} "
            f"({n} items), the data given has {found[:12]} for its first {n} items: use the data (and data "
            "config) the model was trained on")


def dataset_fingerprint(table, period_rows) -> str:
    """Content hash of a prepared interaction table (ids, times, periods): two runs on it see the same data."""
    parts = [table.user, table.item, table.timestamp, np.asarray(period_rows)]
    if table.split is not None:
        parts.append(table.split)
    return _sha(parts + [np.frombuffer(ids_sha256(table.item_ids).encode(), np.uint8),
                         np.frombuffer(ids_sha256(table.user_ids).encode(), np.uint8)])


def source_files(cfg) -> list[Path]:
    """The input files of a data config (empty for the synthetic source and hub URLs)."""
    paths: list[Path] = []
    if cfg.source == "local" and cfg.root:
        root = Path(cfg.root)
        paths = [root / n for n in ("interactions.csv", "interactions.parquet", "items.jsonl", "splits.csv")]
    elif cfg.source in ("amazon2014", "amazon2018"):
        paths = [Path(p) for p in (cfg.reviews_path, cfg.meta_path) if p]
    return [p for p in paths if p.exists()]


def source_fingerprint(cfg) -> dict:
    """Name → (size, mtime) of each input file: a prepared cache is stale when its sources changed."""
    out = {}
    for p in source_files(cfg):
        st = os.stat(p)
        out[p.name] = [int(st.st_size), int(st.st_mtime_ns)]
    return out


# DataConfig fields that do not change the prepared content (labels and encoder settings).
NON_CONTENT_FIELDS = ("name", "cache_dir", "embedding_model", "embedding_batch_size", "memory_budget_gb")


def content_config(cfg) -> dict:
    """The data settings that shape a prepared folder's content (the data seed only shapes synthetic data)."""
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    for k in NON_CONTENT_FIELDS:
        d.pop(k, None)
    if d.get("source") != "synthetic":
        d.pop("seed", None)
    if d.get("root"):
        d["root"] = str(Path(d["root"]).expanduser().resolve())
    return d


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``field: old → new`` for every differing (nested) field."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif _norm(a) != _norm(b):
            out.append(f"{prefix}{k}: {a!r} → {b!r}")
    return out


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def require_same(old: dict, new: dict, what: str, hint: str) -> None:
    diffs = config_differences(old, new)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; … ({len(diffs) - 6} more)" if len(diffs) > 6 else "")
        raise RunMismatchError(f"{what} was made with other settings ({shown}); {hint}")
