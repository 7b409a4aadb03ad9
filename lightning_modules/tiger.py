"""TigerModule: thin Lightning wrapper around the TIGER T5, constrained beam search and ranking metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch

from genrec.decoding.beam_search import constrained_beam_search
from genrec.decoding.modes import DecodingConfig, decode
from genrec.decoding.trie import SidTrie
from genrec.errors import CheckpointError, ConfigError
from genrec.metrics import RankingMetrics
from genrec.models.dense import DenseScorerConfig
from genrec.models.ffn_edit import FFNEdit
from genrec.models.tiger import TigerConfig, build_tiger
from genrec.tokenizers.sid import PAD_TOKEN, SemanticIdTable
from lightning_modules._arena import ArenaMixin
from lightning_modules._catalogue import CatalogueBound
from lightning_modules._ddp import global_mean, real_rows, select_rows
from lightning_modules._hparams import save_plain_hparams
from lightning_modules._outputs import write_metrics_json


def item_token_matrix(table: SemanticIdTable, num_items: int) -> torch.Tensor:
    """(num_items, L+1) token ids per item index; rows of items without a SID are 0 (padding)."""
    out = np.zeros((num_items, table.sid_length), dtype=np.int64)
    out[table.items] = table.tokens()
    return torch.from_numpy(out)


class TigerModule(ArenaMixin, CatalogueBound, L.LightningModule):
    """TIGER recommender.

    Args:
        model: T5 architecture.
        sid_table_path: Parquet SID table (from the RQ-VAE or residual k-means). None: build one at setup with residual
            k-means fitted on the text embeddings of the items known by the end of the datamodule's training
            periods only (later items are coded by inference: the tokenizer never sees the future).
        num_levels: Residual levels L of the SID table (fixes the vocabulary before the table is loaded).
        codebook_size: Codes per level K.
        suffix_size: Collision-suffix values.
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        scheduler: ``cosine`` | ``linear`` decay after warm-up, or ``constant``.
        grad_clip: Gradient-norm clip (used when the Trainer sets no ``gradient_clip_val``).
        num_beams: Beam width of evaluation decoding.
        ks: Cut-offs of the ranking metrics.
        constrained: Trie-constrained decoding (decision 4); False only as an explicit ablation.
        rkmeans_iters: Lloyd iterations when the SID table is built at setup.
        dense: Dense content scorer beside TIGER (the LIGER-style hybrid of the cold-start arena); None = none.
        dense_loss_weight: Weight of the dense scorer's softmax loss next to TIGER's CE (``dense_train joint``).
        dense_train: ``joint`` (both losses, gradients reach the encoder) or ``post_hoc`` (TIGER frozen; only the
            dense scorer trains, on detached encoder states).
        text_dim: Width of the item text embeddings the dense scorer reads (recorded at setup; set it only to
            rebuild a dense scorer before its checkpoint is loaded).
        decoding: Decoding mode (beam | diverse | hybrid | mmr) and its knobs (``genrec.decoding.modes``).
    """

    def __init__(
        self,
        model: TigerConfig | None = None,
        sid_table_path: str | None = None,
        num_levels: int = 3,
        codebook_size: int = 256,
        suffix_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        grad_clip: float = 1.0,
        num_beams: int = 20,
        ks: tuple[int, ...] = (5, 10, 20),
        constrained: bool = True,
        rkmeans_iters: int = 50,
        dense: DenseScorerConfig | None = None,
        dense_loss_weight: float = 1.0,
        dense_train: Literal["joint", "post_hoc"] = "joint",
        text_dim: int | None = None,
        decoding: DecodingConfig | None = None,
    ):
        super().__init__()
        if not ks or min(ks) < 1:
            raise ConfigError(f"model.ks: expected positive metric cut-offs, got {list(ks)}")
        if num_beams < max(ks):
            raise ConfigError(f"model.num_beams ({num_beams}) must be at least the largest metric cut-off "
                              f"max(ks) = {max(ks)}")
        if scheduler not in ("cosine", "linear", "constant"):
            raise ConfigError(f"model.scheduler: expected cosine, linear or constant, got {scheduler!r}")
        if isinstance(model, dict):
            model = TigerConfig(**model)
        self.cfg = model or TigerConfig()
        # plain types only in hparams, so checkpoints load with torch.load(weights_only=True)
        save_plain_hparams(self, {"model": self.cfg.to_dict(), "sid_table_path": sid_table_path,
                                   "num_levels": num_levels, "codebook_size": codebook_size,
                                   "suffix_size": suffix_size, "lr": lr, "weight_decay": weight_decay,
                                   "warmup_steps": warmup_steps, "scheduler": scheduler, "grad_clip": grad_clip,
                                   "num_beams": num_beams, "ks": list(ks), "constrained": constrained,
                                   "rkmeans_iters": rkmeans_iters,
                                   "dense": _plain(dense), "dense_loss_weight": dense_loss_weight,
                                   "dense_train": dense_train, "text_dim": text_dim, "decoding": _plain(decoding)})
        self.vocab_size = 1 + num_levels * codebook_size + suffix_size  # SID tokens; user tokens follow them
        self.t5 = build_tiger(self.cfg, self.vocab_size)
        self.sid_table: SemanticIdTable | None = None
        self.trie: SidTrie | None = None
        self.edit: FFNEdit | None = None  # set by the GenRecEdit callback
        self.register_buffer("item_tokens", torch.zeros(0, num_levels + 1, dtype=torch.long), persistent=False)
        self.ks = tuple(ks)
        self.val_metrics = RankingMetrics(ks=self.ks, sid_length=num_levels + 1)
        self.test_metrics = RankingMetrics(ks=self.ks, sid_length=num_levels + 1)
        self.predictions: list[dict] = []
        self.extra_test_metrics: dict[str, float] = {}  # e.g. the GenRecEdit callback's edit report
        self.per_instance: dict[str, dict] = {}  # "val"/"test" → the last evaluation's per-instance values
        self.init_arena()

    # ------------------------------------------------------------------ SIDs
    def set_sid_table(self, table: SemanticIdTable, catalogue: np.ndarray | None = None, num_items: int | None = None):
        hp = self.hparams
        if (table.num_levels, table.codebook_size, table.suffix_size) != (hp.num_levels, hp.codebook_size,
                                                                           hp.suffix_size):
            raise ValueError(
                f"SID table layout (L={table.num_levels}, K={table.codebook_size}, S={table.suffix_size}) does not "
                f"match the model's (L={hp.num_levels}, K={hp.codebook_size}, S={hp.suffix_size})"
            )
        self.sid_table = table
        n = max(int(table.items.max()) + 1, num_items or 0)
        self.item_tokens = item_token_matrix(table, n).to(self.device)
        valid = table if catalogue is None else _restrict(table, catalogue)
        self.trie = SidTrie.from_table(valid, device=self.device)

    def _catalogue_of_datamodule(self):
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        catalogue = dm.catalogue() if dm is not None and hasattr(dm, "catalogue") else None
        num_items = dm.num_items if dm is not None and hasattr(dm, "num_items") else None
        return dm, catalogue, num_items

    def setup(self, stage: str) -> None:
        dm, catalogue, num_items = self._catalogue_of_datamodule()
        subsets = list(getattr(dm, "subset_names", self.test_metrics.subsets))
        if subsets != list(self.test_metrics.subsets):  # the datamodule defines the evaluation subsets
            sid_length = self.hparams.num_levels + 1
            self.val_metrics = RankingMetrics(ks=self.ks, sid_length=sid_length, subsets=subsets).to(self.device)
            self.test_metrics = RankingMetrics(ks=self.ks, sid_length=sid_length, subsets=subsets).to(self.device)
        if self.sid_table is None and getattr(self.trainer, "ckpt_path", None):
            return  # the checkpoint about to be restored carries the SID table (on_load_checkpoint)
        if dm is not None and hasattr(dm, "load"):
            self.bind_catalogue(dm.load())  # refuses data other than what restored weights were trained on
        if self.sid_table is None:
            if self.hparams.sid_table_path:
                table = SemanticIdTable.load(self.hparams.sid_table_path)
            elif dm is not None and hasattr(dm, "load"):
                table = build_sid_table_rkmeans(dm.load(), self.hparams, dm.tokenizer_periods())
            else:
                raise ValueError("TigerModule needs sid_table_path or a SequenceDataModule to build SIDs from")
            self.set_sid_table(table, catalogue, num_items)
        elif catalogue is not None:
            self.set_sid_table(self.sid_table, catalogue, num_items)
        self.setup_arena(dm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.save_catalogue(checkpoint)
        t = self.sid_table
        checkpoint["sid_table"] = {"items": torch.from_numpy(t.items), "codes": torch.from_numpy(t.codes),
                                   "suffix": torch.from_numpy(t.suffix),
                                   "codebook_size": t.codebook_size, "suffix_size": t.suffix_size,
                                   "hash": t.content_hash()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        s = checkpoint.get("sid_table")
        if s is not None:
            table = SemanticIdTable(s["items"].numpy(), s["codes"].numpy(), s["suffix"].numpy(),
                                    int(s["codebook_size"]), int(s["suffix_size"]))
            if table.content_hash() != s["hash"]:
                raise CheckpointError("checkpoint SID table hash mismatch (the checkpoint is corrupt)")
            self.load_catalogue(checkpoint)
            # restrict decoding to the attached datamodule's catalogue, exactly as setup() does
            _, catalogue, num_items = self._catalogue_of_datamodule()
            self.set_sid_table(table, catalogue, num_items)

    # ------------------------------------------------------------------ encoding
    def encode(self, history: torch.Tensor, user: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded item histories (B, N; -1 = pad) → encoder tokens, on the device, no host round trip. With
        ``num_user_tokens > 0`` the hashed token of ``user`` (B,) sits right before the first history token."""
        hist = history[:, -self.cfg.max_history_items:]
        tok = self.item_tokens[hist.clamp(min=0)] * (hist >= 0).unsqueeze(-1)
        if torch.any((hist >= 0) & (self.item_tokens[hist.clamp(min=0), 0] == PAD_TOKEN)):
            raise KeyError("a history item has no semantic ID in the model's SID table")
        input_ids = tok.reshape(tok.shape[0], -1)
        if self.cfg.num_user_tokens > 0:
            if user is None:
                raise ValueError("this TIGER has user tokens (num_user_tokens > 0): encode() needs the users")
            n_real = (input_ids != PAD_TOKEN).sum(1)  # (B,)
            input_ids = torch.cat([torch.zeros_like(input_ids[:, :1]), input_ids], dim=1)
            pos = input_ids.shape[1] - 1 - n_real
            rows = torch.arange(len(input_ids), device=input_ids.device)
            input_ids[rows, pos] = user_tokens(user.to(input_ids.device), self.cfg.num_user_tokens, self.vocab_size)
        return input_ids, (input_ids != PAD_TOKEN).long()

    def targets(self, target: torch.Tensor) -> torch.Tensor:
        return self.item_tokens[target]

    # ------------------------------------------------------------------ training
    def forward(self, history: torch.Tensor, target: torch.Tensor, user: torch.Tensor | None = None) -> torch.Tensor:
        input_ids, mask = self.encode(history, user)
        return self.dense_or_joint_loss(input_ids, mask, self.targets(target), target)[0]

    def training_step(self, batch, batch_idx):
        rows = real_rows(batch)
        batch = select_rows(batch, rows)
        n = len(batch["target"]) if rows is None or rows.any() else 0  # 0: a rank holding padding only
        input_ids, mask = self.encode(batch["history"], batch.get("user"))
        loss, dense = self.dense_or_joint_loss(input_ids, mask, self.targets(batch["target"]), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=max(n, 1))
        if dense is not None:
            self.log("train/dense_loss", dense, batch_size=max(n, 1))
        # every row has L+1 target tokens: the global mean over rows is TIGER's one-process token mean
        return global_mean(self, loss, n)

    def on_train_epoch_start(self) -> None:
        if self.dense is not None and self.hparams.dense_train == "post_hoc":
            self.t5.eval()  # frozen: no dropout in the states the dense scorer learns from

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val or self.hparams.grad_clip, gradient_clip_algorithm or "norm")

    def configure_optimizers(self):
        """AdamW with warm-up and decay (``--optimizer`` / ``--lr_scheduler`` on the CLI replace both)."""
        from genrec.schedules import warmup_schedule

        hp = self.hparams
        opt = torch.optim.AdamW(self.arena_parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        sched = warmup_schedule(opt, hp.scheduler, hp.warmup_steps, self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def recommend(self, history: torch.Tensor, top_k: int | None = None, edit: FFNEdit | None = None,
                  user: torch.Tensor | None = None):
        """(items, scores, tokens) of the configured decoding mode (``decoding``); tokens are the items' SIDs, or
        the generated tokens in plain beam mode (invalid SIDs included when unconstrained)."""
        input_ids, mask = self.encode(history, user)
        k, edit = top_k or max(self.ks), edit if edit is not None else self.edit
        if self.decoding.mode == "beam":
            return constrained_beam_search(
                self.t5, input_ids, mask, self.trie, num_beams=self.hparams.num_beams, top_k=k, edit=edit,
                unconstrained=not self.hparams.constrained, return_tokens=True,
            )
        items, scores = decode(self.t5, input_ids, mask, self.trie, self.decoding, self.hparams.num_beams, k,
                               edit=edit, ctx=self.decode_context(input_ids, mask))
        tokens = self.item_tokens[items.clamp(min=0)] * (items >= 0).unsqueeze(-1)
        return items, scores, tokens

    def _eval_step(self, batch, metrics: RankingMetrics, diversity=None):
        items, _, tokens = self.recommend(batch["history"], user=batch.get("user"))
        metrics.update(items, tokens, batch["target"], self.targets(batch["target"]), batch["subsets"],
                       instance_ids=batch["index"])
        if diversity is not None:
            diversity.update(items, batch["subsets"], instance_ids=batch["index"])

    @torch.no_grad()
    def evaluate_loader(self, loader, prefix: str = "val") -> dict[str, float]:
        """Metrics of the current model (and edit) over a dataloader, outside any Trainer and on this process only
        (the GenRecEdit λ selection runs it on rank 0)."""
        metrics = RankingMetrics(ks=self.ks, sid_length=self.hparams.num_levels + 1, subsets=self.val_metrics.subsets,
                                 sync_on_compute=False)
        metrics = metrics.to(self.device)
        was_training = self.training
        self.eval()
        try:
            for batch in loader:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                self._eval_step(batch, metrics)
        finally:
            self.train(was_training)
        return {f"{prefix}/{k}": float(v) for k, v in metrics.compute().items()}

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self(batch["history"], batch["target"], batch.get("user")), batch_size=len(batch["target"]),
                 sync_dist=True)
        self._eval_step(batch, self.val_metrics, self.val_diversity)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, self.test_diversity)

    def _log_metrics(self, metrics: RankingMetrics, prefix: str) -> dict:
        values = {f"{prefix}/{k}": v for k, v in metrics.compute().items()}
        diversity = self.val_diversity if prefix == "val" else self.test_diversity
        if diversity is not None:
            values.update({f"{prefix}/{k}": v for k, v in diversity.compute().items()})
            diversity.reset()
        self.log_dict(values, sync_dist=False)  # states are already reduced across ranks by torchmetrics
        self.per_instance[prefix] = metrics.per_instance_table()  # for paired tests across methods
        metrics.reset()
        return values

    def on_validation_epoch_start(self) -> None:
        self.reset_item_vectors()  # the dense towers changed during training

    def on_test_epoch_start(self) -> None:
        self.reset_item_vectors()

    def on_validation_epoch_end(self):
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self):
        values = {k: float(v) for k, v in self._log_metrics(self.test_metrics, "test").items()}
        write_metrics_json(self.trainer, {**values, **self.extra_test_metrics})
        log_wandb_results(self.trainer, values, self.sid_table)

    def predict_step(self, batch, batch_idx):
        items, scores, _ = self.recommend(batch["history"], user=batch.get("user"))
        return {"user": batch["user"].cpu(), "items": items.cpu(), "scores": scores.cpu()}


def _plain(cfg) -> dict | None:
    """A config dataclass (or dict) as a plain dict for the hyper-parameters (weights_only checkpoints)."""
    if cfg is None or isinstance(cfg, dict):
        return cfg
    from dataclasses import asdict

    return asdict(cfg)


def _restrict(table: SemanticIdTable, items: np.ndarray) -> SemanticIdTable:
    keep = np.isin(table.items, items)
    return SemanticIdTable(table.items[keep], table.codes[keep], table.suffix[keep], table.codebook_size,
                           table.suffix_size)


def build_sid_table_rkmeans(ds, hp, periods) -> SemanticIdTable:
    """SIDs from residual k-means over item text embeddings, fitted on the items known by the end of ``periods``
    only; every later item is coded by inference (``genrec.tokenizers.period``)."""
    from genrec.data.pipeline import item_embeddings
    from genrec.tokenizers.period import items_known_until, rkmeans_sid_table

    emb = item_embeddings(ds, show_progress=False)
    fit_items = items_known_until(ds.item_first_period(), periods)
    return rkmeans_sid_table(emb, fit_items, np.arange(len(emb)), num_levels=hp.num_levels,
                             codebook_size=hp.codebook_size, suffix_size=hp.suffix_size, iters=hp.rkmeans_iters,
                             seed=ds.config.seed)


def user_tokens(user: torch.Tensor, num_user_tokens: int, offset: int) -> torch.Tensor:
    """``genrec.models.tiger.user_token_ids`` on the device: splitmix64 of the user index, mod the token count.
    int64 products wrap like uint64; the right shifts are made logical by masking the sign extension."""
    def shr(x, n):
        return (x >> n) & ((1 << (64 - n)) - 1)

    u = user.long() + _signed(0x9E3779B97F4A7C15)
    u = (u ^ shr(u, 30)) * _signed(0xBF58476D1CE4E5B9)
    u = (u ^ shr(u, 27)) * _signed(0x94D049BB133111EB)
    u = u ^ shr(u, 31)
    # unsigned modulo of a value stored as signed int64: split off the top bit
    top = (u < 0).long()
    low = u & ((1 << 63) - 1)
    rem = (low % num_user_tokens + top * ((1 << 63) % num_user_tokens)) % num_user_tokens
    return rem + offset


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def log_wandb_results(trainer, values: dict, sid_table: SemanticIdTable | None) -> None:
    """With a W&B logger: a metric × subset table and the SID table as a versioned artifact (rank 0)."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = [lg for lg in (trainer.loggers if trainer else []) if isinstance(lg, WandbLogger)]
    if not loggers or not trainer.is_global_zero:
        return
    subsets = sorted({k.rsplit("/", 1)[1] for k in values})
    metrics = sorted({k.rsplit("/", 1)[0] for k in values})
    rows = [[m] + [values.get(f"{m}/{s}") for s in subsets] for m in metrics]
    for logger in loggers:
        logger.log_table("test/results_by_subset", columns=["metric", *subsets], data=rows)
        if sid_table is not None:
            import wandb

            path = Path(logger.experiment.dir) / "sid_table.parquet"  # this run's own folder (runs never share it)
            digest = sid_table.save(path)
            artifact = wandb.Artifact(f"sid_table-{digest[:16]}", type="sid_table", metadata={"hash": digest})
            artifact.add_file(str(path))
            logger.experiment.log_artifact(artifact)
