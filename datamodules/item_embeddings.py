"""Item-embedding batches for tokenizer training (RQ-VAE / DACT).

Row i of the embedding matrix is item i (dense item index). Batches are tuples
``(x, cf, items)``: x (B, dim) float32, cf (B, cf_dim) float32 or None, items (B,) int64.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler


def _load_matrix(path: str | Path, name: str) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} does not exist (expected a .npy float matrix, row i = item i)")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name}: {path} must hold a 2-D float (n_items, dim) matrix, got {arr.dtype} {arr.shape}")
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        raise ValueError(f"{name}: {path} has non-finite values in rows {bad[:10].tolist()}")
    return np.ascontiguousarray(arr, dtype=np.float32)


class _RowBatches(Dataset):
    """Indexed by a list of row ids (one whole batch per fetch: no per-item collate overhead)."""

    def __init__(self, x: torch.Tensor, cf: torch.Tensor | None) -> None:
        self.x, self.cf = x, cf

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, rows):
        idx = torch.as_tensor(rows, dtype=torch.long)
        return self.x[idx], (self.cf[idx] if self.cf is not None else None), idx


def _as_is(batch):
    return batch


class ItemEmbeddingDataModule(L.LightningDataModule):
    """Serves an item-embedding matrix (and optional CF embeddings with the same rows) in batches.

    Args:
        embeddings_path: .npy float matrix (n_items, dim), row i = item i.
        cf_embeddings_path: optional .npy float matrix (n_items, cf_dim), same rows.
        batch_size: training batch (DACT 1024, GenRecEdit's RQ-VAE 2048).
        num_workers: DataLoader workers.
        shuffle: shuffle training batches every epoch.
        predict_batch_size: None = the whole catalogue in one predict batch.
    """

    def __init__(
        self,
        embeddings_path: str,
        cf_embeddings_path: str | None = None,
        batch_size: int = 1024,
        num_workers: int = 0,
        shuffle: bool = True,
        predict_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.embeddings_path = embeddings_path
        self.cf_embeddings_path = cf_embeddings_path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.predict_batch_size = predict_batch_size
        self.embeddings: torch.Tensor | None = None
        self.cf_embeddings: torch.Tensor | None = None

    @classmethod
    def from_arrays(cls, embeddings: np.ndarray, cf_embeddings: np.ndarray | None = None, **kwargs):
        """In-memory variant (tests, pipelines that already hold the matrix)."""
        dm = cls(embeddings_path="<memory>", **kwargs)
        dm._set(np.ascontiguousarray(embeddings, dtype=np.float32),
                None if cf_embeddings is None else np.ascontiguousarray(cf_embeddings, dtype=np.float32))
        return dm

    def _set(self, x: np.ndarray, cf: np.ndarray | None) -> None:
        if x.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (n_items, dim), got shape {x.shape}")
        if cf is not None and (cf.ndim != 2 or cf.shape[0] != x.shape[0]):
            raise ValueError(
                f"cf_embeddings must be (n_items={x.shape[0]}, cf_dim) with the same rows as the embeddings, "
                f"got shape {cf.shape}"
            )
        self.embeddings = torch.from_numpy(x)
        self.cf_embeddings = None if cf is None else torch.from_numpy(cf)

    def setup(self, stage: str | None = None) -> None:
        if self.embeddings is not None:
            return
        x = _load_matrix(self.embeddings_path, "embeddings_path")
        cf = None
        if self.cf_embeddings_path is not None:
            cf = _load_matrix(self.cf_embeddings_path, "cf_embeddings_path")
        self._set(x, cf)

    # ------------------------------------------------------------------ facts
    @property
    def num_items(self) -> int:
        self._require()
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        self._require()
        return self.embeddings.shape[1]

    @property
    def cf_dim(self) -> int | None:
        self._require()
        return None if self.cf_embeddings is None else self.cf_embeddings.shape[1]

    def _require(self) -> None:
        if self.embeddings is None:
            raise RuntimeError("ItemEmbeddingDataModule: call setup() before using the data")

    # ------------------------------------------------------------------ loaders
    def _loader(self, batch_size: int, shuffle: bool) -> DataLoader:
        self._require()
        ds = _RowBatches(self.embeddings, self.cf_embeddings)
        sampler = RandomSampler(ds) if shuffle else SequentialSampler(ds)
        return DataLoader(
            ds,
            sampler=BatchSampler(sampler, batch_size, drop_last=False),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.batch_size, self.shuffle)

    def predict_dataloader(self) -> DataLoader:
        self._require()
        return self._loader(self.predict_batch_size or max(self.num_items, 1), False)
