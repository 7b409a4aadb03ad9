"""RecommendationWriter: `genrec predict` → top-K recommendations per user with item ids and titles."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from genrec.errors import ConfigError, OutputError
from genrec.files import atomic_write


class RecommendationWriter(L.Callback):
    """Collects ``predict_step`` outputs (``items``, ``scores``) with the batch's users and writes one row per
    (instance, rank): user_id, rank, item_id, title, score. Format from the suffix: ``.parquet`` or ``.jsonl``.

    Args:
        output_path: File to write (atomically, via a temporary sibling).
        overwrite: Replace an existing file at ``output_path`` (otherwise refused before predicting).
    """

    def __init__(self, output_path: str = "recommendations.parquet", overwrite: bool = False):
        super().__init__()
        if not output_path.endswith((".parquet", ".jsonl")):
            raise ConfigError(f"output_path must end with .parquet or .jsonl, got {output_path!r}")
        self.output_path = output_path
        self.overwrite = overwrite
        self._users: list[torch.Tensor] = []
        self._items: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []
        self._index: list[torch.Tensor] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        path = Path(self.output_path)
        if path.is_dir():
            raise OutputError(f"recommendations output {path}: is a folder, expected a file path")
        if path.exists() and not self.overwrite:
            raise OutputError(f"recommendations output {path}: exists; pass "
                              "--trainer.callbacks.init_args.overwrite true (or another output_path) to replace it")

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._users, self._items, self._scores, self._index = [], [], [], []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._users.append(batch["user"].detach().cpu())
        self._items.append(outputs["items"].detach().cpu())
        self._scores.append(outputs["scores"].detach().float().cpu())
        if "index" in batch:
            self._index.append(batch["index"].detach().cpu())

    def gathered(self, trainer, pl_module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, items, scores) of every instance once, in instance order: under DDP each rank predicted its
        share (a padding sampler repeats some instances), so every share is gathered and one row kept per instance
        index."""
        parts = [torch.cat(x) if x else None for x in (self._users, self._items, self._scores, self._index)]
        if trainer.world_size > 1:
            if parts[3] is None:
                raise RuntimeError("RecommendationWriter under DDP needs batch['index'] (SequenceDataModule's "
                                   "batches carry it) to de-duplicate the ranks' padded shares")
            n = len(parts[3])
            sizes = pl_module.all_gather(torch.tensor(n, device=pl_module.device)).reshape(-1).tolist()
            pad = max(sizes) - n
            padded = [torch.cat([x, x[:1].expand(pad, *x.shape[1:])]) if pad else x for x in parts]
            gathered = [pl_module.all_gather(x.to(pl_module.device)).cpu() for x in padded]
            parts = [torch.cat([g[r, : sizes[r]] for r in range(len(sizes))]) for g in gathered]
        users, items, scores, index = (None if x is None else x.numpy() for x in parts)
        if index is not None:
            _, first = np.unique(index, return_index=True)  # sorted by instance index, padding repeats dropped
            users, items, scores = users[first], items[first], scores[first]
        return users, items, scores

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not self._items:
            return
        users, items, scores = self.gathered(trainer, pl_module)  # every rank takes part in the gather
        if not trainer.is_global_zero:
            return
        ds = trainer.datamodule.load()
        k = items.shape[1]
        valid = items >= 0  # empty slots (catalogue smaller than K) are not written
        row_user = np.repeat(users, k)[valid.reshape(-1)]
        flat_items = items[valid]
        titles = ds.catalog.fields.get("title", [None] * ds.num_items)
        table = pa.table({
            "user_id": ds.table.user_ids[row_user].astype(str),
            "rank": np.tile(np.arange(1, k + 1), len(users))[valid.reshape(-1)],
            "item_id": ds.table.item_ids[flat_items].astype(str),
            "title": [titles[i] for i in flat_items],
            "score": scores[valid],
        })
        path = Path(self.output_path)
        if path.suffix == ".parquet":
            atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        else:
            atomic_write(path, lambda tmp: table.to_pandas().to_json(tmp, orient="records", lines=True))
        print(f"recommendations for {len(users):,} instances → {path}")
