"""Lightning wrapper of DACT, the continual mode of the RQ-VAE tokenizer (spec dact.md §1.3–1.8).

Thin: losses, CDIM and the frozen/trainable model pair live in ``genrec.tokenizers.dact``; the
reassignment rules in ``genrec.tokenizers.reassign``. This module wires the optimiser and schedule
(reference recipe), per-epoch logging of every loss term, the drift ratio and CDIM confidence stats,
the periodic code-change check against the old tokenizer, and (optionally) the reassigned SID table
written at fit end. Batches are ``(x, cf, item_index)`` from ``ItemEmbeddingDataModule`` with CF
embeddings of the current period.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch

from genrec.schedules import warmup_schedule
from genrec.tokenizers.dact import DACTConfig, DACTModel, reassign_mode
from genrec.tokenizers.reassign import ReassignResult, reassign
from genrec.tokenizers.rqvae import RQVAE, RQVAEConfig
from genrec.tokenizers.sid import SemanticIdTable
from lightning_modules._hparams import save_plain_hparams


def load_previous_tokenizer(path: str | Path) -> tuple[dict, dict | None, dict | None]:
    """(RQVAE state dict, RQVAEConfig fields or None, CDIM state dict or None) from a checkpoint file.

    Accepts an ``RQVAEModule`` Lightning checkpoint (keys ``model.*``), a ``DACTModule`` checkpoint
    (keys ``model.current.*``; its CDIM is returned for the warm start of the next period) or a plain
    ``RQVAE`` state dict saved with ``torch.save``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"previous_checkpoint: {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in ckpt:  # plain RQVAE state dict
        return ckpt, None, None
    state = ckpt["state_dict"]
    hp = ckpt.get("hyper_parameters", {}) or {}
    if any(k.startswith("model.current.") for k in state):
        rq = {k[len("model.current.") :]: v for k, v in state.items() if k.startswith("model.current.")}
        cdim = {k[len("model.cdim.") :]: v for k, v in state.items() if k.startswith("model.cdim.")}
        return rq, hp.get("rqvae_config"), cdim or None
    if any(k.startswith("model.") for k in state):
        rq = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        return rq, hp.get("config"), None
    raise ValueError(
        f"previous_checkpoint: {path} holds neither RQVAEModule ('model.*') nor DACTModule weights"
    )


class DACTModule(L.LightningModule):
    """Fine-tunes the previous period's tokenizer with DACT.

    Args:
        rqvae_config: architecture of the tokenizer (dataclass or dict); None = read from
            ``previous_checkpoint``.
        dact_config: DACT knobs (dataclass or dict); the optimiser, schedule and clipping come from it.
        previous_checkpoint: file with the previous period's tokenizer (see ``load_previous_tokenizer``).
        previous_state_dict: the previous ``RQVAE`` state dict in memory (instead of a file).
        cdim_state_dict: CDIM weights to warm-start from; by default taken from a previous
            ``DACTModule`` checkpoint when ``warm_start_cdim`` (paper §3.1.1).
        warm_start_cdim: reuse the CDIM of a previous DACT checkpoint.
        code_change_every_n_epochs: log the per-level share of items whose argmin code differs from the
            old tokenizer every n epochs over the datamodule's catalogue (reference logs every 10); 0 = off.
        previous_sid_table: optional parquet ``SemanticIdTable`` of the previous period; with it the
            module reassigns SIDs at fit end (``reassign_mode(dact_config)``) into ``self.reassigned``.
        sid_table_dir: where the reassigned ``sid_table.parquet`` is written (None = checkpoint dir if
            any, else memory only).

    Without any previous weights the model starts from a random RQ-VAE: that is only meant for
    ``load_from_checkpoint`` (the checkpoint holds both the old and the current tokenizer; pass
    ``previous_checkpoint=None`` there if the original file has moved); ``fit`` refuses to start from it.
    ``fit`` runs for the Trainer's ``max_epochs`` (the reference: 5,000, ``DACTConfig.epochs``).
    """

    SID_TABLE_FILE = "sid_table.parquet"

    def __init__(
        self,
        rqvae_config: RQVAEConfig | dict | None = None,
        dact_config: DACTConfig | dict | None = None,
        previous_checkpoint: str | None = None,
        previous_state_dict: dict | None = None,
        cdim_state_dict: dict | None = None,
        warm_start_cdim: bool = True,
        code_change_every_n_epochs: int = 10,
        previous_sid_table: str | None = None,
        sid_table_dir: str | None = None,
    ) -> None:
        super().__init__()
        ckpt_config = None
        if previous_checkpoint is not None:
            if previous_state_dict is not None:
                raise ValueError("give previous_checkpoint or previous_state_dict, not both")
            previous_state_dict, ckpt_config, ckpt_cdim = load_previous_tokenizer(previous_checkpoint)
            if cdim_state_dict is None and warm_start_cdim:
                cdim_state_dict = ckpt_cdim
        if rqvae_config is None:
            rqvae_config = ckpt_config
        if isinstance(rqvae_config, dict):
            rqvae_config = RQVAEConfig(**rqvae_config)
        if rqvae_config is None:
            raise ValueError("rqvae_config is required when previous_checkpoint does not record it")
        if isinstance(dact_config, dict):
            dact_config = DACTConfig(**dact_config)
        dact_config = dact_config or DACTConfig()
        if code_change_every_n_epochs < 0:
            raise ValueError(f"code_change_every_n_epochs must be ≥ 0, got {code_change_every_n_epochs}")
        # Plain dicts in hparams: checkpoints stay loadable with torch.load(weights_only=True).
        save_plain_hparams(self, 
            {
                "rqvae_config": asdict(rqvae_config),
                "dact_config": asdict(dact_config),
                "previous_checkpoint": previous_checkpoint,
                "warm_start_cdim": warm_start_cdim,
                "code_change_every_n_epochs": code_change_every_n_epochs,
                "previous_sid_table": previous_sid_table,
                "sid_table_dir": sid_table_dir,
            }
        )
        self.rqvae_config, self.dact_config = rqvae_config, dact_config
        previous = RQVAE(rqvae_config)
        self._has_previous = previous_state_dict is not None
        if previous_state_dict is not None:
            previous.load_state_dict(previous_state_dict)
        self.model = DACTModel(previous, dact_config)
        if cdim_state_dict is not None and self.model.cdim is not None:
            self.model.cdim.load_state_dict(cdim_state_dict)
        self.reassigned: ReassignResult | None = None
        self.sid_table_path: Path | None = None

    @classmethod
    def from_model(cls, previous: RQVAE, dact_config: DACTConfig | None = None, **kwargs) -> DACTModule:
        """Module fine-tuning an in-memory ``RQVAE`` (its config and weights are copied)."""
        return cls(
            rqvae_config=previous.config,
            dact_config=dact_config,
            previous_state_dict=previous.state_dict(),
            **kwargs,
        )

    # ------------------------------------------------------------------ training
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._has_previous = True

    def on_fit_start(self) -> None:
        if not self._has_previous:
            raise RuntimeError(
                "DACTModule: no previous-period tokenizer (give previous_checkpoint or previous_state_dict)"
            )
        self.model.generator = torch.Generator().manual_seed(self.dact_config.seed)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, cf, _ = batch
        if cf is None:
            raise ValueError(
                "DACTModule: batches need CF embeddings (ItemEmbeddingDataModule cf_embeddings_path)"
            )
        out = self.model(x, cf)
        bs = x.shape[0]
        for name, value in out.items():
            key = "dact/train/loss" if name == "loss" else f"dact/train/{name}"
            self.log(
                key,
                value.detach() if name == "loss" else value,
                on_step=False,
                on_epoch=True,
                batch_size=bs,
                prog_bar=name in ("loss", "drift_ratio"),
            )
        return out["loss"]

    def _catalogue(self) -> torch.Tensor | None:
        dm = getattr(self.trainer, "datamodule", None)
        x = getattr(dm, "embeddings", None)
        return x if isinstance(x, torch.Tensor) else None

    def on_train_epoch_end(self) -> None:
        n = self.hparams.code_change_every_n_epochs
        last = self.current_epoch + 1 == self.trainer.max_epochs
        if n and ((self.current_epoch + 1) % n == 0 or last):
            x = self._catalogue()
            if x is not None:
                for key, value in self.model.code_change(x).items():
                    self.log(f"dact/train/{key}", value)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # The DACT recipe clips at config.grad_clip; a Trainer-level setting takes precedence.
        clip = gradient_clip_val if gradient_clip_val is not None else self.dact_config.grad_clip
        if clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm"
            )

    def configure_optimizers(self):
        c = self.dact_config
        opt = torch.optim.AdamW(self.model.trainable_parameters(), lr=c.lr, weight_decay=c.weight_decay)
        total = self.trainer.estimated_stepping_batches
        epochs = max(self.trainer.max_epochs or 1, 1)
        finite = np.isfinite(total) and total > 0
        per_epoch = total / epochs if finite else 1
        warmup = round(c.warmup_epochs * per_epoch)
        sched = warmup_schedule(opt, "linear", warmup, total if finite else math.inf)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ inference / reassignment
    @property
    def tokenizer(self) -> RQVAE:
        """The fine-tuned tokenizer of this period."""
        return self.model.current

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x, _, items = batch
        return {"items": torch.as_tensor(items), "codes": torch.as_tensor(self.model.current.get_codes(x))}

    def reassign(self, previous_table: SemanticIdTable, items: np.ndarray, embeddings) -> ReassignResult:
        """SID table of the new catalogue from the previous period's table (policy from the config)."""
        return reassign(
            previous_table, items, embeddings, self.model.current, reassign_mode(self.dact_config)
        )

    def on_fit_end(self) -> None:
        path = self.hparams.previous_sid_table
        if path is None:
            return
        x = self._catalogue()
        if x is None:
            raise RuntimeError("DACTModule: reassignment at fit end needs a datamodule exposing `embeddings`")
        self.reassigned = self.reassign(SemanticIdTable.load(path), np.arange(x.shape[0], dtype=np.int64), x)
        if self.logger is not None:  # self.log is closed at fit end; go to the logger directly
            stats = {f"dact/reassign/{k}": v for k, v in self.reassigned.stats.items()}
            self.logger.log_metrics(stats, step=self.global_step)
        directory = Path(self.hparams.sid_table_dir) if self.hparams.sid_table_dir else None
        if directory is None and self.trainer.checkpoint_callback is not None:
            dirpath = getattr(self.trainer.checkpoint_callback, "dirpath", None)
            directory = Path(dirpath) if dirpath else None
        if directory is not None and self.trainer.is_global_zero:
            self.sid_table_path = directory / self.SID_TABLE_FILE
            self.reassigned.table.save(self.sid_table_path)


__all__ = ["DACTModule", "load_previous_tokenizer"]
