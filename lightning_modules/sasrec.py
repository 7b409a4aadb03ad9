"""SASRecModule: thin Lightning wrapper of ``genrec.models.sasrec`` (baseline, ensemble member, CF signal).

Batches are the ``SequenceDataModule`` dicts (history left-padded with -1, target, subsets). Training masks the
softmax (or the negative pool) to the items known by the end of the training window; evaluation ranks the
items known by the end of the evaluation period (``dm.catalogue()``) and feeds the top-K item ids to
``RankingMetrics`` on the overall/warm/cold/new subsets.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch

from genrec.errors import CheckpointError, ConfigError
from genrec.metrics import RankingMetrics
from genrec.metrics.ranking import SUBSETS
from genrec.models.sasrec import SASRec, SASRecConfig
from lightning_modules._catalogue import CatalogueBound
from lightning_modules._ddp import global_mean, real_rows, select_rows
from lightning_modules._hparams import save_plain_hparams
from lightning_modules._outputs import write_metrics_json

_TOKEN_BASE = (1 << 16) - 1  # RankingMetrics packs tokens into 16 bits and reserves 0 for empty slots
# keys that only mean something for SID models (prefix matches, invalid SIDs): equal to the item keys or
# constant here, so they are not logged for item-only models
_SID_ONLY = ("_p", "ndcg_first", "invalid_rate")


def item_metrics(ks: tuple[int, ...], num_items: int, subsets=SUBSETS) -> RankingMetrics:
    """``RankingMetrics`` for an item-only ranker: every item is a 1-token "SID" (2 tokens past 65,534 items)."""
    width = 1 if num_items < _TOKEN_BASE else 2
    return RankingMetrics(ks=tuple(ks), sid_length=width, prefix_len=width, subsets=tuple(subsets))


def item_tokens(items: torch.Tensor, width: int) -> torch.Tensor:
    """(...,) item ids (-1 = empty) → (..., width) distinct non-zero tokens per item, all zeros for -1."""
    items = items.long()
    if width == 1:
        tok = (items + 1)[..., None]
    else:
        tok = torch.stack([items // _TOKEN_BASE + 1, items % _TOKEN_BASE + 1], dim=-1)
    return tok.masked_fill((items < 0)[..., None], 0)


def update_item_metrics(metrics: RankingMetrics, items: torch.Tensor, target: torch.Tensor, subsets,
                        instance_ids: torch.Tensor | None = None) -> None:
    """Feed ranked item lists (B, K) and targets (B,) to ``RankingMetrics`` with item-derived tokens."""
    width = metrics.sid_length
    metrics.update(items, item_tokens(items, width), target, item_tokens(target, width), subsets,
                   instance_ids=instance_ids)


def item_metric_values(metrics: RankingMetrics) -> dict[str, torch.Tensor]:
    """``metrics.compute()`` without the SID-only keys."""
    return {k: v for k, v in metrics.compute().items() if not any(t in k for t in _SID_ONLY)}


class SASRecModule(CatalogueBound, L.LightningModule):
    """Trains and evaluates a ``SASRec``.

    Args:
        model: architecture and loss (``SASRecConfig`` or a dict of its fields). ``num_items = 0`` takes the
            item count from the datamodule at setup.
        lr: Adam learning rate (paper: 1e-3).
        betas: Adam betas (paper: (0.9, 0.98)).
        weight_decay: Adam L2 weight decay (paper: 0).
        ks: cut-offs of the ranking metrics.
        restrict_train_items: mask the training softmax / negative pool to the items known by the end of the
            training window (items that launch later get no gradient from the loss's denominator).
        cf_dim: width of the exported CF table (None = hidden; smaller = top principal directions).
    """

    def __init__(
        self,
        model: SASRecConfig | dict | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        weight_decay: float = 0.0,
        ks: tuple[int, ...] = (5, 10, 20),
        restrict_train_items: bool = True,
        cf_dim: int | None = None,
    ):
        super().__init__()
        if isinstance(model, dict):
            model = SASRecConfig(**model)
        model = model or SASRecConfig()
        if not ks or min(ks) < 1:
            raise ConfigError(f"model.ks: expected positive metric cut-offs, got {list(ks)}")
        # plain-dict hparams (checkpoints load with weights_only=True); `loss` recorded on its own for sweeps
        save_plain_hparams(self, 
            {
                "model": asdict(model),
                "loss": model.loss,
                "lr": lr,
                "betas": tuple(betas),
                "weight_decay": weight_decay,
                "ks": tuple(ks),
                "restrict_train_items": restrict_train_items,
                "cf_dim": cf_dim,
            }
        )
        self.cfg = model
        self.ks = tuple(sorted(set(ks)))
        self.model: SASRec | None = SASRec(model) if model.num_items > 0 else None
        self.register_buffer("train_item_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.register_buffer("eval_item_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.val_metrics: RankingMetrics | None = None
        self.per_instance: dict[str, dict] = {}  # "val"/"test" → the last evaluation's per-instance values
        self.test_metrics: RankingMetrics | None = None
        if self.model is not None:
            self._build_metrics()

    def _build_metrics(self, subsets=SUBSETS) -> None:
        self.val_metrics = item_metrics(self.ks, self.cfg.num_items, subsets)
        self.test_metrics = item_metrics(self.ks, self.cfg.num_items, subsets)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        num_items = getattr(dm, "num_items", None)
        if self.model is None:
            if not num_items:
                raise ValueError("SASRecModule needs model.num_items > 0 or a datamodule exposing num_items")
            self.cfg = replace(self.cfg, num_items=int(num_items))
            self.hparams["model"]["num_items"] = self.cfg.num_items  # so the checkpoint rebuilds the same shape
            self.model = SASRec(self.cfg).to(self.device)
            self._build_metrics()
        elif num_items is not None and num_items != self.cfg.num_items:
            raise CheckpointError(f"the data has {num_items} items, the SASRec model was built for "
                                  f"{self.cfg.num_items}: use the data it was trained on")
        if dm is not None and hasattr(dm, "load"):
            self.bind_catalogue(dm.load())
        subsets = tuple(getattr(dm, "subset_names", self.test_metrics.subsets))
        if list(subsets) != list(self.test_metrics.subsets):  # the datamodule defines the evaluation subsets
            self._build_metrics(subsets)
        n = self.cfg.num_items
        if dm is not None and hasattr(dm, "catalogue"):
            self.eval_item_mask = self._mask(dm.catalogue(), n)
        if self.hparams.restrict_train_items and dm is not None and hasattr(dm, "load") and hasattr(
            dm, "train_periods"
        ):
            known = dm.load().catalogue_until(max(dm.train_periods))
            self.train_item_mask = self._mask(known, n)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.save_catalogue(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.load_catalogue(checkpoint)

    def _mask(self, items: np.ndarray, n: int) -> torch.Tensor:
        mask = torch.zeros(n, dtype=torch.bool, device=self.device)
        mask[torch.as_tensor(np.asarray(items, dtype=np.int64), device=self.device)] = True
        return mask

    # ------------------------------------------------------------------ training
    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """(B, N) histories → (B, num_items) raw last-position logits (unmasked)."""
        return self.model.scores(history)

    def training_step(self, batch, batch_idx):
        mask = self.train_item_mask if self.train_item_mask.numel() else None
        rows = real_rows(batch)
        batch = select_rows(batch, rows)
        loss = self.model.loss(batch["history"], batch["target"], item_mask=mask)
        self.log(f"train/loss_{self.cfg.loss}", loss, prog_bar=True, batch_size=len(batch["target"]))
        # the loss is a mean over predicted positions: their global count weighs each rank (0: padding only)
        count = self.model.num_positions(batch["history"]) if rows is None or rows.any() else 0
        return global_mean(self, loss, count)

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (items, logits) over the evaluation catalogue (items outside it are never returned)."""
        scores = self(history)
        if self.eval_item_mask.numel():
            scores = scores.masked_fill(~self.eval_item_mask[None], float("-inf"))
            k = min(k or max(self.ks), int(self.eval_item_mask.sum()))
        k = min(k or max(self.ks), scores.shape[1])
        values, items = scores.topk(k, dim=1)
        return items, values

    def _eval_step(self, batch, metrics: RankingMetrics) -> None:
        items, _ = self.recommend(batch["history"])
        update_item_metrics(metrics.to(self.device), items, batch["target"], batch["subsets"], batch.get("index"))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics)

    def _log_metrics(self, metrics: RankingMetrics, prefix: str) -> dict:
        values = {f"{prefix}/{k}": v.float() for k, v in item_metric_values(metrics).items()}
        self.log_dict(values, sync_dist=False)  # torchmetrics already reduced the states across ranks
        self.per_instance[prefix] = metrics.per_instance_table()  # for paired tests across methods
        metrics.reset()
        return values

    def on_validation_epoch_end(self):
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self):
        values = self._log_metrics(self.test_metrics, "test")
        write_metrics_json(self.trainer, {k: float(v) for k, v in values.items()})

    def predict_step(self, batch, batch_idx):
        items, scores = self.recommend(batch["history"])
        return {"index": batch["index"], "items": items, "scores": scores}

    # ------------------------------------------------------------------ CF signal
    def item_embeddings(self, dim: int | None = None) -> np.ndarray:
        """(num_items, dim) float32 item table (dim = ``cf_dim`` by default; see ``SASRec.item_embeddings``)."""
        if self.model is None:
            raise RuntimeError("the model is not built yet (fit or set model.num_items first)")
        dim = dim if dim is not None else self.hparams.cf_dim
        return self.model.item_embeddings(dim).cpu().numpy().astype(np.float32)

    def export_cf_embeddings(self, path: str | Path, dim: int | None = None) -> Path:
        """Write the CF item table as .npy (row i = item i) for the tokenizer's CF regulariser / DACT."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, self.item_embeddings(dim))
        return path
