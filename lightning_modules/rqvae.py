"""Lightning wrapper of the RQ-VAE tokenizer (period-0 training, spec dact.md §1.2).

Thin: the model and its losses live in ``genrec.tokenizers.rqvae``; this module wires the optimiser and
schedule, the k-means init, per-epoch tokenizer diagnostics and the SID table written at fit end.
Batches are ``(x, cf_or_None, item_index)`` as served by ``ItemEmbeddingDataModule``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from genrec.schedules import warmup_schedule
from genrec.tokenizers.rqvae import (
    RQVAE,
    RQVAEConfig,
    build_sid_table,
    codebook_perplexity,
    codebook_usage,
    collision_rate,
)
from genrec.tokenizers.sid import SemanticIdTable, SuffixOverflowError
from lightning_modules._hparams import save_plain_hparams


class RQVAEModule(L.LightningModule):
    """Trains an ``RQVAE``.

    Args:
        config: model config (dataclass or dict of its fields).
        lr: peak learning rate (period 0: 1e-3).
        weight_decay: AdamW weight decay (reference 1e-4).
        optimizer: "adamw" (reference) or "adam".
        warmup_epochs: linear warm-up length in epochs (reference 50).
        lr_schedule: "linear" (warm-up then linear decay to 0 at the last step, reference) or "constant"
            (warm-up then flat).
        kmeans_init_on: "full" = k-means init on the whole embedding matrix at fit start (needs a
            datamodule exposing ``embeddings``; falls back to the first batch); "first_batch" = the
            reference's init on the first training batch.
        suffix_size: collision-suffix values of the SID table built at fit end.
        sid_table_dir: where ``sid_table.parquet`` is written at fit end; None = the checkpoint
            directory if a ModelCheckpoint callback exists, otherwise the table is kept in memory only
            (``self.sid_table``).
    """

    SID_TABLE_FILE = "sid_table.parquet"

    def __init__(
        self,
        config: RQVAEConfig | dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: Literal["adamw", "adam"] = "adamw",
        warmup_epochs: int = 50,
        lr_schedule: Literal["linear", "constant"] = "linear",
        kmeans_init_on: Literal["full", "first_batch"] = "full",
        suffix_size: int = 256,
        sid_table_dir: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = RQVAEConfig(**config)
        config = config or RQVAEConfig()
        if optimizer not in ("adamw", "adam"):
            raise ValueError(f"optimizer must be 'adamw' or 'adam', got {optimizer!r}")
        if lr_schedule not in ("linear", "constant"):
            raise ValueError(f"lr_schedule must be 'linear' or 'constant', got {lr_schedule!r}")
        if kmeans_init_on not in ("full", "first_batch"):
            raise ValueError(f"kmeans_init_on must be 'full' or 'first_batch', got {kmeans_init_on!r}")
        # Plain dict in hparams: checkpoints stay loadable with torch.load(weights_only=True).
        save_plain_hparams(self, 
            {
                "config": asdict(config),
                "lr": lr,
                "weight_decay": weight_decay,
                "optimizer": optimizer,
                "warmup_epochs": warmup_epochs,
                "lr_schedule": lr_schedule,
                "kmeans_init_on": kmeans_init_on,
                "suffix_size": suffix_size,
                "sid_table_dir": sid_table_dir,
            }
        )
        self.config = config
        self.model = RQVAE(config)
        self.sid_table: SemanticIdTable | None = None
        self.sid_table_path: Path | None = None
        self._epoch_codes: list[torch.Tensor] = []
        self._epoch_items: list[torch.Tensor] = []
        self._epoch_align: list[torch.Tensor] = []
        self._table_cache: tuple[int, SemanticIdTable | None] | None = None

    # ------------------------------------------------------------------ data access
    def _catalogue(self) -> tuple[np.ndarray, torch.Tensor] | None:
        """(items, embeddings) of the whole catalogue: the datamodule's matrix, else one pass over train data."""
        dm = getattr(self.trainer, "datamodule", None)
        x = getattr(dm, "embeddings", None)
        if isinstance(x, torch.Tensor):
            return np.arange(x.shape[0], dtype=np.int64), x
        loader = self.trainer.train_dataloader
        if loader is None:
            return None
        xs, items = [], []
        for batch in loader:
            xs.append(batch[0])
            items.append(torch.as_tensor(batch[2]))
        item_t = torch.cat(items)
        uniq, first = np.unique(item_t.numpy(), return_index=True)
        return uniq.astype(np.int64), torch.cat(xs)[torch.as_tensor(first)]

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        needs_init = self.config.kmeans_init and not bool(self.model.codebooks_initialized)
        if needs_init and self.hparams.kmeans_init_on == "full":
            cat = self._catalogue()
            if cat is not None and cat[1].shape[0] >= self.config.codebook_size:
                self.model.init_codebooks_kmeans(cat[1])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Reference behaviour (and fallback): k-means init on the first training batch.
        if self.config.kmeans_init and not bool(self.model.codebooks_initialized):
            self.model.init_codebooks_kmeans(batch[0])

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, cf, items = batch
        losses = self.model.compute_loss(x, cf)
        out = losses.pop("output")
        bs = x.shape[0]
        for name, value in losses.items():
            key = "rqvae/train/loss" if name == "total" else f"rqvae/train/loss_{name}"
            self.log(key, value, on_step=False, on_epoch=True, batch_size=bs, prog_bar=name == "total")
        # Codes of this epoch's forwards cover the catalogue once per epoch: diagnostics at no extra pass.
        self._epoch_codes.append(out.codes.detach().cpu())
        self._epoch_items.append(torch.as_tensor(items).detach().cpu())
        if cf is not None:
            with torch.no_grad():
                cos = F.cosine_similarity(out.z_q, self.model.project_cf(cf), dim=-1)
            self._epoch_align.append(cos.detach().cpu())
        return losses["total"]

    def on_train_epoch_end(self) -> None:
        if self._epoch_codes:
            for key, value in self.code_metrics(torch.cat(self._epoch_codes), torch.cat(self._epoch_items)).items():
                self.log(f"rqvae/train/{key}", value)
        if self._epoch_align:
            self.log("rqvae/train/cf_alignment", float(torch.cat(self._epoch_align).mean()))
        self._epoch_codes, self._epoch_items, self._epoch_align = [], [], []
        if self.config.dead_code_reset:
            cat = self._catalogue()
            if cat is not None:
                reset = self.model.reset_dead_codes(cat[1])
                for level, n in enumerate(reset, start=1):
                    self.log(f"rqvae/train/dead_codes_reset/level{level}", float(n))

    def code_metrics(self, codes: torch.Tensor, items: torch.Tensor) -> dict[str, float]:
        """Usage, perplexity per level and pre-suffix collision rate of one code per item."""
        codes_np, items_np = codes.numpy(), items.numpy()
        _, last = np.unique(items_np[::-1], return_index=True)  # latest code per item
        codes_np = codes_np[::-1][last]
        k = self.config.codebook_size
        out = {"collision_rate": collision_rate(codes_np)}
        for level, (u, p) in enumerate(zip(codebook_usage(codes_np, k), codebook_perplexity(codes_np, k)), 1):
            out[f"codebook_usage/level{level}"] = u
            out[f"perplexity/level{level}"] = p
        return out

    def configure_optimizers(self):
        hp = self.hparams
        opt_cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        opt = opt_cls(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        # Schedule in optimiser steps; warm-up is given in epochs like the reference.
        total = self.trainer.estimated_stepping_batches
        epochs = self.trainer.max_epochs or -1
        if np.isfinite(total) and total > 0 and epochs > 0:
            per_epoch = total / epochs
        else:  # unbounded run: count one epoch as one pass of the train loader
            per_epoch = max(len(self.trainer.datamodule.train_dataloader()), 1) if self.trainer.datamodule else 1
        warmup = round(hp.warmup_epochs * per_epoch)
        sched = warmup_schedule(opt, hp.lr_schedule, warmup, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ inference and SID table
    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x, _, items = batch
        return {"items": torch.as_tensor(items), "codes": torch.as_tensor(self.model.get_codes(x))}

    def build_sid_table(self) -> SemanticIdTable:
        """SID table of the whole catalogue from the current weights (suffixes in item order)."""
        cat = self._catalogue()
        if cat is None:
            raise RuntimeError("RQVAEModule.build_sid_table: no datamodule embeddings and no train dataloader")
        items, x = cat
        codes = self.model.get_codes(x)
        return build_sid_table(codes, items, self.config.codebook_size, self.hparams.suffix_size)

    def _table_now(self) -> SemanticIdTable | None:
        step = int(self.global_step)
        if self._table_cache is None or self._table_cache[0] != step:
            try:
                table = self.build_sid_table()
            except SuffixOverflowError as err:
                warnings.warn(f"no SID table for the checkpoint at step {step}: {err}", stacklevel=2)
                table = None
            self._table_cache = (step, table)
        return self._table_cache[1]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is None:
            return
        table = self._table_now()
        checkpoint["genrec_sid_table"] = {
            "content_hash": None if table is None else table.content_hash(),
            "file": self.SID_TABLE_FILE,
        }

    def _sid_table_dir(self) -> Path | None:
        if self.hparams.sid_table_dir is not None:
            return Path(self.hparams.sid_table_dir)
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return None

    def on_fit_end(self) -> None:
        table = self._table_now()
        if table is None:  # suffix overflow: raise it now, naming the crowded prefix
            table = self.build_sid_table()
        self.sid_table = table
        directory = self._sid_table_dir()
        if directory is not None and self.trainer.is_global_zero:
            self.sid_table_path = directory / self.SID_TABLE_FILE
            table.save(self.sid_table_path)
