"""`genrec continual`: the continual-period loop (DESIGN.md "The continual loop").

For period t = 0..T: CF embeddings (SASRec, fine-tuned per period) → tokenizer (t = 0: RQ-VAE; t > 0:
dact | finetune | frozen | reformer) → SID reassignment (+ trie) → recommender (t = 0: TIGER; t > 0:
finetune | retrain | frozen) → hooks (e.g. GenRecEdit) → evaluation on period t's test instances
(overall / warm / cold / new) → period folder (SID table, tokenizer, checkpoints, metrics.json, sid_diff.json).

Resumable: each finished period writes ``period_<t>/DONE`` last; re-running the same command continues after
the last finished period. Every period re-seeds with ``seed + t``, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from genrec import distributed
from genrec.data.config import DataConfig
from genrec.data.fingerprint import content_config, require_same
from genrec.data.pipeline import PreparedDataset, item_embeddings, load_or_prepare
from genrec.editing import EditConfig
from genrec.errors import ConfigError, RunMismatchError
from genrec.files import (
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    claim_dir,
    read_marker,
    remove_ours,
    write_marker,
)
from genrec.models.sasrec import SASRecConfig
from genrec.models.tiger import TigerConfig
from genrec.tokenizers.dact import DACTConfig
from genrec.tokenizers.reassign import reassign
from genrec.tokenizers.rqvae import RQVAE, RQVAEConfig, build_sid_table
from genrec.tokenizers.sid import SemanticIdTable

TOKENIZER_METHODS = ("dact", "finetune", "frozen", "reformer")
RECOMMENDER_METHODS = ("finetune", "retrain", "frozen")
# The DACT paper's table rows as (tokenizer, recommender).
METHODS = {
    "frozen": ("frozen", "frozen"),
    "ft_tok": ("finetune", "frozen"),
    "ft_grm": ("frozen", "finetune"),
    "ft_both": ("finetune", "finetune"),
    "ft_tok_rt_grm": ("finetune", "retrain"),
    "reformer": ("reformer", "finetune"),
    "dact": ("dact", "finetune"),
}


@dataclass
class StageConfig:
    """Epochs and optimiser settings of one training stage (period 0 and later periods differ).

    Args:
        epochs: Training epochs.
        lr: Peak learning rate.
        batch_size: Mini-batch size.
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 256


MethodName = Literal["frozen", "ft_tok", "ft_grm", "ft_both", "ft_tok_rt_grm", "reformer", "dact"]


@dataclass
class ContinualConfig:
    """The continual run.

    Args:
        run_dir: Output folder (one sub-folder per period). Default:
            ``runs/<data.name>/continual/<method>-seed<seed>-<hash of the settings>``, so methods, seeds and swept
            settings never share a folder. Re-running the same command resumes after the last finished
            period; a folder made with other settings or other data is refused (the error lists what differs).
        overwrite: Replace an existing run folder of ours instead of resuming it.
        method: The DACT paper's rows as (tokenizer, recommender): frozen, ft_tok, ft_grm, ft_both, ft_tok_rt_grm,
            reformer, dact (default, when neither ``tokenizer`` nor ``recommender`` is given).
        tokenizer: Tokenizer update for t > 0: dact | finetune | frozen | reformer (codes for new items only). With
            ``method`` set it must agree with it.
        recommender: Recommender update for t > 0: finetune | retrain | frozen. With ``method`` set it must agree.
        last_period: Stop after this period (default: the last one); a later run may extend a run folder.
        init_from: Run folder of an earlier run on the same data whose finished period 0 (CF model, tokenizer,
            TIGER, metrics) this run copies instead of training its own; its period-0 settings must equal this
            run's (the error lists what differs). Lets methods and seeds of a sweep share one period 0.
        use_cf: Train SASRec per period and feed its item embeddings to the tokenizer's CF regulariser and DACT
            (DACT needs them).
        edit: Run GenRecEdit after each period's recommender update on the next period's new items (decision 6:
            edits are evaluated on period t+1's test instances and removed before the next period's training).
        edit_config: GenRecEdit settings used when ``edit`` is on.
        analyze: Run the MemGen analysis (``genrec analyze``) of each period's TIGER and its CF SASRec on the
            period's validation/test cases: ``memgen/…`` keys in the period's metrics, tables in
            ``period_<t>/analysis/`` (needs ``use_cf``).
        seed: One seed for everything (period t uses seed + t).
        accelerator: Lightning accelerator of every stage (auto | cpu | gpu).
        devices: Processes (one per GPU, or CPU processes) of the run. N > 1 launches N local processes of one
            process group (``torchrun --nproc_per_node N -m genrec continual …`` does the same; under torchrun or
            SLURM the launcher's world size is used). The CF model and TIGER train data-parallel on the one-process
            global batches (``batch_size`` stays the global batch) and evaluation is sharded; the item-level
            tokenizer stages (RQ-VAE, fine-tune, DACT), reassignment and GenRecEdit are computed identically on
            every rank from rank 0's broadcast state; rank 0 writes the run folder, the others wait. Without
            dropout the metrics equal the one-process run up to float rounding (each rank draws its own dropout
            masks otherwise).
        precision: Lightning precision of every stage (``bf16-mixed`` on recent GPUs; the closed-form edit and C̄0
            stay float64 regardless).
        logger: wandb (offline unless WANDB_MODE says otherwise) | csv | none.
        wandb_project: W&B project; runs are grouped by dataset and named <method>-seed<seed>; a resumed run
            continues the same W&B run.
        dact: DACT knobs of the tokenizer stage for t > 0 with ``tokenizer dact``, including its epochs, learning
            rate and batch size (``finetune_tokenizer_stage`` is for finetune / reformer).
        select_on_val: Keep the recommender epoch with the best validation recall@10 of the period (early
            stopping, as in the papers); a fine-tune also competes with its starting point (epoch 0), so it never
            ends below the model it started from on validation. False: the last epoch of a fixed budget.
        select_every_n_epochs: Validation interval of from-scratch training (fine-tunes validate every epoch).
        replay_changed: A recommender fine-tune also trains on the earlier periods' training rows whose target's SID
            changed in this period's reassignment, so it re-learns moved codes (without them a period's few rows
            leave changed items unreachable: measured HR@10 0 on them). No effect when no code changed.
    """

    run_dir: str | None = None
    overwrite: bool = False
    method: MethodName | None = None
    tokenizer: Literal["dact", "finetune", "frozen", "reformer"] | None = None
    recommender: Literal["finetune", "retrain", "frozen"] | None = None
    last_period: int | None = None
    init_from: str | None = None
    use_cf: bool = True
    edit: bool = False
    edit_config: EditConfig = field(default_factory=EditConfig)
    analyze: bool = False
    seed: int = 0
    accelerator: str = "auto"
    devices: int = 1
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    logger: Literal["wandb", "csv", "none"] = "wandb"
    wandb_project: str = "genrec"
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    rqvae_stage: StageConfig = field(default_factory=lambda: StageConfig(epochs=200, lr=1e-3, batch_size=1024))
    rqvae_warmup_epochs: int = 10
    finetune_tokenizer_stage: StageConfig = field(default_factory=lambda: StageConfig(epochs=50, lr=1e-4,
                                                                                      batch_size=1024))
    dact: DACTConfig = field(default_factory=lambda: DACTConfig(epochs=50, warmup_epochs=5))
    sasrec: SASRecConfig = field(default_factory=lambda: SASRecConfig(hidden=32))
    sasrec_stage: StageConfig = field(default_factory=lambda: StageConfig(epochs=30, lr=1e-3, batch_size=256))
    sasrec_finetune_stage: StageConfig = field(default_factory=lambda: StageConfig(epochs=10, lr=1e-3))
    tiger: TigerConfig = field(default_factory=TigerConfig)
    tiger_stage: StageConfig = field(default_factory=lambda: StageConfig(epochs=60, lr=1e-3, batch_size=256))
    tiger_finetune_stage: StageConfig = field(default_factory=lambda: StageConfig(epochs=20, lr=3e-4,
                                                                                  batch_size=256))
    tiger_warmup_steps: int = 200
    select_on_val: bool = True
    select_every_n_epochs: int = 5
    replay_changed: bool = True
    num_beams: int = 20
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    suffix_size: int = 256

    def __post_init__(self) -> None:
        tok, _ = self.resolved()
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"continual.ks: expected positive metric cut-offs, got {self.ks}")
        if self.num_beams < max(self.ks):
            raise ConfigError(f"continual.num_beams ({self.num_beams}) must be at least the largest metric cut-off "
                              f"max(ks) = {max(self.ks)}")
        if tok == "dact" and not self.use_cf:
            raise ConfigError("continual.use_cf false cannot run the DACT tokenizer: its drift module and CF "
                              "alignment read the period's CF (SASRec) embeddings; use use_cf true or another method")
        if self.analyze and not self.use_cf:
            raise ConfigError("continual.analyze true needs use_cf true: the SASRec half of the analysis is the "
                              "period's CF model")
        if self.edit and self.tiger.num_user_tokens > 0:
            raise ConfigError("continual.edit true needs tiger.num_user_tokens 0 (GenRecEdit's pseudo histories "
                              "have no user)")
        if self.devices < 1:
            raise ConfigError(f"continual.devices: expected >= 1, got {self.devices}")
        if self.last_period is not None and self.last_period < 0:
            raise ConfigError(f"continual.last_period: expected >= 0, got {self.last_period}")
        for name in ("rqvae_stage", "finetune_tokenizer_stage", "sasrec_stage", "sasrec_finetune_stage",
                     "tiger_stage", "tiger_finetune_stage"):
            st = getattr(self, name)
            if st.epochs < 0 or st.batch_size < 1 or st.lr <= 0:
                raise ConfigError(f"continual.{name}: expected epochs >= 0, batch_size >= 1 and lr > 0, got {st}")

    def resolved(self) -> tuple[str, str]:
        """(tokenizer, recommender): ``method``'s row, or the explicit fields; a contradiction is an error."""
        if self.method is None:
            return self.tokenizer or "dact", self.recommender or "finetune"
        if self.method not in METHODS:
            raise ConfigError(f"continual.method must be one of {list(METHODS)}, got {self.method!r}")
        tok, rec = METHODS[self.method]
        for name, given, implied in (("tokenizer", self.tokenizer, tok), ("recommender", self.recommender, rec)):
            if given is not None and given != implied:
                raise ConfigError(f"continual.{name} {given!r} contradicts continual.method {self.method!r} (which "
                                  f"means tokenizer {tok!r}, recommender {rec!r}); give either the method or the "
                                  "two fields")
        return tok, rec

    @property
    def name(self) -> str:
        pair = self.resolved()
        named = [m for m, p in METHODS.items() if p == pair]
        return self.method or (named[0] if named else f"{pair[0]}+{pair[1]}")


# Fields that do not change a run's results: a run folder may be resumed with other values.
NON_RESULT_FIELDS = ("run_dir", "overwrite", "last_period", "logger", "wandb_project", "accelerator", "devices")
RUN_KIND = "continual"
# Fields that shape period 0 (what `init_from` must agree on).
PERIOD0_FIELDS = ("use_cf", "edit", "edit_config", "rqvae", "rqvae_stage", "rqvae_warmup_epochs", "sasrec",
                  "sasrec_stage", "tiger", "tiger_stage", "tiger_warmup_steps", "num_beams", "ks", "suffix_size",
                  "select_on_val", "select_every_n_epochs", "precision", "analyze")


# Hooks called after the recommender update of period t: fn(runner, period, tiger_module) -> metrics dict.
PeriodHook = Callable[["ContinualRunner", int, object], dict]


class ContinualRunner:
    def __init__(self, data: DataConfig, cfg: ContinualConfig, hooks: list[PeriodHook] | None = None):
        self.data, self.cfg = data, cfg
        self.tok_method, self.rec_method = cfg.resolved()
        self.run_dir = Path(cfg.run_dir or self.default_run_dir())
        self.wandb_id: str | None = None
        self.last_per_instance: dict | None = None
        self.previous_sid_table: SemanticIdTable | None = None
        self.seen_periods: list[int] = [0]  # periods whose training targets the current recommender has learned
        self.diagnostics: dict[str, float] = {}
        self._created = False
        self._replaced: Path | None = None
        self._last = 0
        self.hooks = list(hooks or [])
        if cfg.edit:
            self.hooks.append(edit_hook(cfg.edit_config))
        self.dataset: PreparedDataset | None = None
        self.embeddings: np.ndarray | None = None
        # state carried from period to period
        self.rqvae: RQVAE | None = None
        self.dact_cdim: dict | None = None
        self.sid_table: SemanticIdTable | None = None
        self.tiger_state: dict | None = None
        self.sasrec_state: dict | None = None
        self.results: dict[int, dict] = {}
        self._logger = None

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if distributed.is_main():
            print(f"[continual {self.cfg.name}] {msg}", flush=True)

    @property
    def device(self) -> torch.device:
        """Where work outside a Trainer runs (Lightning moves modules back to the CPU after each fit/test)."""
        from lightning_modules._device import accelerator_device

        return accelerator_device(self.cfg.accelerator)

    def period_dir(self, t: int) -> Path:
        return self.run_dir / f"period_{t}"

    def trainer(self, epochs: int, t: int, stage: str, parallel: bool = True, **kw):
        """A stage's Trainer: data-parallel over the run's processes (``parallel``), else this process alone (the
        item-level tokenizer stages, computed identically on every rank)."""
        import lightning as L

        from lightning_modules._progress import progress_kwargs

        progress = progress_kwargs(f"continual {self.cfg.name}] [period {t} {stage}")
        if not distributed.is_main():  # one progress report per run, not per rank
            progress = {"enable_progress_bar": False, "callbacks": []}
        callbacks = progress.pop("callbacks") + kw.pop("callbacks", [])
        from lightning.pytorch.callbacks import ModelCheckpoint

        checkpointing = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)  # only the selection's own
        world = distributed.world()
        if world > 1 and parallel:
            placement = {"devices": distributed.local_world(), "num_nodes": world // distributed.local_world(),
                         "strategy": "ddp"}
        elif world > 1 and self.device.type == "cuda":
            placement = {"devices": [distributed.local_rank()]}
        else:
            placement = {"devices": 1}
        return L.Trainer(
            max_epochs=epochs, accelerator=self.cfg.accelerator, precision=self.cfg.precision, logger=False,
            enable_checkpointing=checkpointing, enable_model_summary=False, callbacks=callbacks,
            num_sanity_val_steps=0, deterministic=True, default_root_dir=str(self.period_dir(t) / stage),
            **placement, **progress, **kw,
        )

    def seed(self, t: int) -> None:
        import lightning as L

        L.seed_everything(self.cfg.seed + t, workers=True, verbose=False)

    def sequence_dm(self, train_periods, eval_period, seen_periods, batch_size):
        from datamodules.sequences import SequenceDataModule

        dm = SequenceDataModule(self.data, train_periods=train_periods, eval_period=eval_period,
                                seen_periods=seen_periods, batch_size=batch_size, eval_batch_size=256)
        dm.dataset = self.dataset
        return dm

    # ------------------------------------------------------------------ stages
    def stage_cf(self, t: int) -> np.ndarray | None:
        if not self.cfg.use_cf:
            return None
        from lightning_modules.sasrec import SASRecModule

        stage = self.cfg.sasrec_stage if t == 0 else self.cfg.sasrec_finetune_stage
        # the item table covers the whole catalogue from the start, so later periods fine-tune the same shape
        sas_cfg = dataclasses.replace(self.cfg.sasrec, num_items=self.dataset.num_items)
        module = SASRecModule(sas_cfg, lr=stage.lr, ks=tuple(self.cfg.ks))
        if self.sasrec_state is not None:
            module.load_state_dict(self.sasrec_state)
        dm = self.sequence_dm([t], t, list(range(t + 1)), stage.batch_size)
        self.trainer(stage.epochs, t, "sasrec").fit(module, datamodule=dm)
        self.sasrec_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return module.item_embeddings()

    def stage_tokenizer(self, t: int, cf: np.ndarray | None) -> tuple[SemanticIdTable, dict]:
        from datamodules.item_embeddings import ItemEmbeddingDataModule

        items = self.dataset.catalogue_until(t)
        x = self.embeddings[items]
        cf_rows = None if cf is None else cf[items]
        rq_cfg = dataclasses.replace(self.cfg.rqvae, input_dim=x.shape[1],
                                     cf_dim=None if cf is None else cf.shape[1],
                                     cf_weight=self.cfg.rqvae.cf_weight if cf is not None else 0.0)
        if t == 0 or self.rqvae is None:
            from lightning_modules.rqvae import RQVAEModule

            st = self.cfg.rqvae_stage
            module = RQVAEModule(rq_cfg, lr=st.lr, warmup_epochs=self.cfg.rqvae_warmup_epochs,
                                 suffix_size=self.cfg.suffix_size)
            dm = ItemEmbeddingDataModule.from_arrays(x, cf_rows, batch_size=st.batch_size)
            self.trainer(st.epochs, t, "rqvae", parallel=False).fit(module, datamodule=dm)
            self.rqvae = self.same_on_every_rank(module.model).eval()
            codes = self.rqvae.get_codes(torch.from_numpy(x))
            table = build_sid_table(codes, items, rq_cfg.codebook_size, self.cfg.suffix_size)
            return table, {}
        previous = self.rqvae
        method = self.tok_method
        if method == "frozen":
            res = reassign(self.sid_table, items, x, previous, mode="frozen")
            return res.table, res.stats
        if method == "dact":
            from lightning_modules.dact import DACTModule

            # its epochs, lr and batch size drive this stage; the run's seed reaches its random draws
            dcfg = dataclasses.replace(self.cfg.dact, seed=self.cfg.seed + t)
            module = DACTModule.from_model(previous, dcfg, cdim_state_dict=self.dact_cdim)
            dm = ItemEmbeddingDataModule.from_arrays(x, cf_rows, batch_size=dcfg.batch_size)
            self.trainer(dcfg.epochs, t, "dact", parallel=False).fit(module, datamodule=dm)
            current = self.same_on_every_rank(module.tokenizer).eval()
            if module.model.cdim is not None:
                self.dact_cdim = distributed.broadcast(
                    {k: v.detach().cpu().clone() for k, v in module.model.cdim.state_dict().items()})
            from genrec.tokenizers.dact import reassign_mode

            res = reassign(self.sid_table, items, x, current, mode=reassign_mode(dcfg))
        else:  # finetune / reformer: plain fine-tuning of the previous tokenizer
            from lightning_modules.rqvae import RQVAEModule

            st = self.cfg.finetune_tokenizer_stage
            module = RQVAEModule(rq_cfg, lr=st.lr, warmup_epochs=0, lr_schedule="constant",
                                 suffix_size=self.cfg.suffix_size)
            module.model.load_state_dict(previous.state_dict())
            dm = ItemEmbeddingDataModule.from_arrays(x, cf_rows, batch_size=st.batch_size)
            self.trainer(st.epochs, t, "tokenizer", parallel=False).fit(module, datamodule=dm)
            current = self.same_on_every_rank(module.model).eval()
            res = reassign(self.sid_table, items, x, current, mode=method)
        self.rqvae = current
        return res.table, res.stats

    @staticmethod
    def same_on_every_rank(model: torch.nn.Module) -> torch.nn.Module:
        """Rank 0's weights on every rank: replicated training is bitwise identical on CPU, but GPU kernels need not
        be, and the SID tables built from these weights must agree."""
        if distributed.world() > 1:
            state = distributed.broadcast({k: v.detach().cpu() for k, v in model.state_dict().items()})
            model.load_state_dict(state)
        return model

    def stage_recommender(self, t: int, table: SemanticIdTable):
        from lightning_modules.tiger import TigerModule

        c = self.cfg
        self.diagnostics = {}
        first = t == 0 or self.tiger_state is None
        method = "retrain" if first else self.rec_method
        stage = c.tiger_stage if method == "retrain" else c.tiger_finetune_stage
        train_periods = list(range(t + 1)) if method == "retrain" else [t]
        seen = list(range(t + 1)) if method != "frozen" else self.seen_periods
        if method != "frozen":
            self.seen_periods = list(range(t + 1))
        module = TigerModule(c.tiger, num_levels=c.rqvae.num_levels, codebook_size=c.rqvae.codebook_size,
                             suffix_size=c.suffix_size, lr=stage.lr, warmup_steps=c.tiger_warmup_steps if first else 0,
                             num_beams=c.num_beams, ks=tuple(c.ks))
        dm = self.sequence_dm(train_periods, t, seen, stage.batch_size)
        if method == "finetune" and c.replay_changed and t > 0:
            dm.replay = self.changed_rows(dm, t)
            self.diagnostics["recommender/replay_rows"] = float(len(dm.replay))
        if method in ("finetune", "frozen"):
            module.load_state_dict(self.tiger_state)
        module.set_sid_table(table, dm.catalogue(), self.dataset.num_items)
        if method != "frozen":
            tuned = method == "finetune"  # "before" means the carried-over model, which only a fine-tune has
            before = self.changed_item_losses(module.to(self.device), dm) if tuned else {}
            self.fit_recommender(t, module, dm, stage.epochs, from_scratch=method == "retrain")
            after = self.changed_item_losses(module.to(self.device), dm) if tuned else {}
            self.diagnostics.update({f"recommender/loss_{k}/before": v for k, v in before.items()})
            self.diagnostics.update({f"recommender/loss_{k}/after": v for k, v in after.items()})
        self.tiger_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return module, dm

    def stage_analyze(self, t: int, module, dm) -> dict[str, float]:
        """MemGen analysis of this period's TIGER and CF SASRec; tables into ``period_<t>/analysis``."""
        from lightning_modules.sasrec import SASRecModule
        from runners.analyze import analyze_modules, write_outputs

        n = self.dataset.num_items
        sas = SASRecModule(dataclasses.replace(self.cfg.sasrec, num_items=n), ks=tuple(self.cfg.ks))
        sas.load_state_dict(self.sasrec_state)
        sas.eval_item_mask = sas._mask(dm.catalogue(), n)
        module, sas = module.to(self.device), sas.to(self.device)
        flat, tables = analyze_modules(module, sas, dm)
        if distributed.is_main():
            out = self.period_dir(t) / "analysis"
            out.mkdir(parents=True, exist_ok=True)
            write_outputs(out, flat, tables)
        keep = {k: v for k, v in flat.items() if not k.startswith("seconds/")}
        return {f"memgen/{k}" if not k.startswith("memgen/") else k: v for k, v in keep.items()}

    def fit_recommender(self, t: int, module, dm, epochs: int, from_scratch: bool) -> None:
        """Train TIGER; with ``select_on_val`` keep the epoch (or, for a fine-tune, the starting point) with the best
        validation recall@10 of period t."""
        from lightning_modules._selection import fit_selecting_on_val, monitor_key

        c = self.cfg
        if not c.select_on_val or epochs == 0:
            self.trainer(epochs, t, "tiger", check_val_every_n_epoch=max(epochs, 1)).fit(module, datamodule=dm)
            return
        every = c.select_every_n_epochs if from_scratch else 1
        self.diagnostics["recommender/selected_epoch"] = float(fit_selecting_on_val(
            lambda **kw: self.trainer(epochs, t, "tiger", **kw), module, self.period_dir(t) / "tiger" / "select",
            epochs=epochs, from_scratch=from_scratch, monitor=monitor_key(c.ks), val_loader=dm.val_dataloader(),
            every=every, datamodule=dm, device=self.device))

    # ------------------------------------------------------------------ diagnostics (DACT Fig. 4 / Fig. 6)
    def sid_status(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """Masks over ``items``: SID kept / changed since the previous period, or new this period."""
        prev, cur = self.previous_sid_table, self.sid_table
        if prev is None:
            return {}
        known = np.isin(items, prev.items)
        same = np.zeros(len(items), dtype=bool)
        both = known & np.isin(items, cur.items)
        rows_prev, rows_cur = prev.rows_of(items[both]), cur.rows_of(items[both])
        same[both] = (prev.full_codes()[rows_prev] == cur.full_codes()[rows_cur]).all(1)
        return {"sid_kept": known & same, "sid_changed": known & ~same, "sid_new": ~known}

    def changed_rows(self, dm, t: int):
        """Earlier periods' training rows whose target's SID changed in this period's reassignment."""
        from genrec.data.splits import TRAIN

        earlier = dm.split(TRAIN, list(range(t)))
        changed = self.sid_status(earlier.target).get("sid_changed")
        return earlier.select(changed) if changed is not None else earlier.select(np.zeros(len(earlier), bool))

    @torch.no_grad()
    def changed_item_losses(self, module, dm) -> dict[str, float]:
        """TIGER's token CE on this period's train rows whose target SID changed vs kept (before/after fine-tune:
        does the recommender re-learn moved codes?)."""
        from genrec.data.splits import TRAIN

        inst = dm.split(TRAIN, [dm.eval_period])
        status = self.sid_status(inst.target)
        out = {}
        was = module.training
        module.eval()
        for name, mask in status.items():
            if name == "sid_new" or not mask.any():
                continue
            rows = np.flatnonzero(mask)[:4096]
            hist = torch.as_tensor(inst.histories(rows), device=module.device)
            target = torch.as_tensor(inst.target[rows], device=module.device)
            user = torch.as_tensor(inst.user[rows], device=module.device)
            out[name.removeprefix("sid_")] = float(module(hist, target, user))
        module.train(was)
        return out

    def cf_alignment(self, t: int, cf: np.ndarray | None) -> dict[str, float]:
        """DACT Fig. 4: mean cosine between the tokenizer's quantised latents and its projection of this period's
        CF embeddings, over the items known by the end of the period."""
        if cf is None or self.rqvae is None:
            return {}
        from genrec.tokenizers.rqvae import cf_alignment

        items = self.dataset.catalogue_until(t)
        with torch.no_grad():
            model = self.rqvae.eval()
            param = next(model.parameters())
            x = torch.as_tensor(self.embeddings[items], device=param.device)
            z_q = model.quantize(model.encode(x)).quantized
            cf_latent = model.project_cf(torch.as_tensor(cf[items], device=param.device, dtype=x.dtype))
        return {"tokenizer/cf_alignment": cf_alignment(z_q, cf_latent)}

    def per_status_metrics(self, dm) -> dict[str, float]:
        """DACT Fig. 6: test HR@K (= recall@K) over instances whose target's SID was kept / changed / new."""
        table = self.last_per_instance
        if table is None:
            return {}
        from genrec.data.splits import TEST

        targets = dm.eval_instances(TEST).target[table["instance_id"]]
        out = {}
        for name, mask in self.sid_status(targets).items():
            table[f"mask/{name}"] = mask  # saved per instance: other methods can be scored on this method's rows
            out[f"test/count/{name}"] = float(mask.sum())
            for k in self.cfg.ks:
                col = table.get(f"recall@{k}")
                if col is not None and mask.any():
                    out[f"test/recall@{k}/{name}"] = float(col[mask].mean())
        return out

    def evaluate(self, t: int, module, dm) -> dict:
        trainer = self.trainer(1, t, "eval")
        res = trainer.test(module, datamodule=dm, verbose=False)[0]
        self.last_per_instance = module.per_instance.get("test")
        return {k: float(v) for k, v in res.items() if k.startswith("test/")}

    # ------------------------------------------------------------------ persistence
    def save_period(self, t: int, table: SemanticIdTable, metrics: dict, diff: dict, timings: dict) -> None:
        """Every file atomically; ``DONE`` last, so a period folder without it is incomplete. Rank 0 writes; the
        others wait until it has."""
        if distributed.is_main():
            self._write_period(t, table, metrics, diff, timings)
        distributed.barrier()

    def _write_period(self, t: int, table: SemanticIdTable, metrics: dict, diff: dict, timings: dict) -> None:
        d = self.period_dir(t)
        d.mkdir(parents=True, exist_ok=True)
        table.save(d / "sid_table.parquet")
        state = {"rqvae": self.rqvae.state_dict(), "rqvae_config": dataclasses.asdict(self.rqvae.config),
                 "tiger": self.tiger_state, "sasrec": self.sasrec_state, "dact_cdim": self.dact_cdim,
                 "seen_periods": self.seen_periods}
        atomic_torch_save(state, d / "state.pt")
        atomic_write_json(d / "metrics.json", metrics)
        atomic_write_json(d / "sid_diff.json", diff)
        atomic_write_json(d / "timings.json", timings)
        if self.last_per_instance is not None:  # per-instance values: paired tests across methods and seeds
            save_per_instance(d / PER_INSTANCE_FILE, self.last_per_instance)
        atomic_write_text(d / "DONE", time.strftime("%Y-%m-%d %H:%M:%S") + "\n")

    def load_period(self, t: int) -> dict:
        d = self.period_dir(t)
        state = torch.load(d / "state.pt", weights_only=True)
        cfg = dict(state["rqvae_config"])
        cfg["hidden_dims"] = tuple(cfg["hidden_dims"])
        self.rqvae = RQVAE(RQVAEConfig(**cfg))
        self.rqvae.load_state_dict(state["rqvae"])
        self.rqvae.eval()
        self.tiger_state, self.sasrec_state, self.dact_cdim = state["tiger"], state["sasrec"], state["dact_cdim"]
        self.seen_periods = list(state["seen_periods"])
        self.sid_table = SemanticIdTable.load(d / "sid_table.parquet")
        # null in the file is an empty subset: NaN in memory, as in an uninterrupted run
        return {k: float("nan") if v is None else v for k, v in json.loads((d / "metrics.json").read_text()).items()}

    # ------------------------------------------------------------------ main loop
    def default_run_dir(self) -> str:
        """``runs/<data>/continual/<method>-seed<seed>-<settings hash>``: the same command resumes its own folder,
        other settings (a sweep) get another one, so runs never share a folder."""
        import hashlib

        digest = hashlib.sha256(json.dumps(self.run_config(), sort_keys=True).encode()).hexdigest()[:8]
        return f"runs/{self.data.name}/continual/{self.cfg.name}-seed{self.cfg.seed}-{digest}"

    def run_config(self) -> dict:
        """The settings that determine this run's results (compared on resume)."""
        cont = {k: v for k, v in _jsonable(dataclasses.asdict(self.cfg)).items() if k not in NON_RESULT_FIELDS}
        cont["resolved"] = list(self.cfg.resolved())
        data = {**content_config(self.data), "embedding_model": self.data.embedding_model}  # the encoder shapes SIDs
        return {"data": _jsonable(data), "continual": cont}

    def claim_run_dir(self) -> bool:
        """Create, resume or (``overwrite``) replace the run folder; True when this command created it."""
        state = claim_dir(self.run_dir, RUN_KIND, overwrite=self.cfg.overwrite, protected=(self.data.root,),
                          allow_existing=True, what="run folder")
        if state == "ours":
            info = json.loads((self.run_dir / "run.json").read_text())
            require_same(info["config"], self.run_config(), f"run folder {self.run_dir}",
                         "use another --continual.run_dir (each method and seed has its own by default), or pass "
                         "--continual.overwrite true to start it again")
            self.wandb_id = info.get("wandb_id")
            return False
        if state == "replace":  # kept aside until the new run has started (restored if it fails before)
            self._replaced = self.run_dir.with_name(f".{self.run_dir.name}.replaced-{os.getpid()}")
            os.replace(self.run_dir, self._replaced)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(self.run_dir, RUN_KIND)
        return True

    def setup(self) -> None:
        if self.data.protocol != "periods":
            raise ConfigError("genrec continual needs data.protocol periods (got "
                              f"{self.data.protocol!r})")
        launched = distributed.launched_world()
        if launched > 1 and self.cfg.devices not in (1, launched):
            raise ConfigError(f"continual.devices {self.cfg.devices} contradicts the launcher's {launched} processes "
                              "(WORLD_SIZE); leave devices at 1 under torchrun/SLURM")
        distributed.init(use_cuda=self.device.type == "cuda")
        if distributed.is_main():
            self.setup_folder()
        distributed.barrier()  # rank 0 claimed the folder, prepared the data and cached the item embeddings
        if not distributed.is_main():
            self.dataset = load_or_prepare(self.data, str(self.run_dir / "prepared"))
            self.embeddings = item_embeddings(self.dataset, show_progress=False)
            self.seen_periods, self._last = [0], self.last_period()

    def setup_folder(self) -> None:
        created = self._created = self.claim_run_dir()
        info_path = self.run_dir / "run.json"
        try:
            self.dataset = load_or_prepare(self.data, str(self.run_dir / "prepared"))
            if created:
                import secrets

                self.wandb_id = secrets.token_hex(6) if self.cfg.logger == "wandb" else None
                atomic_write_json(info_path, {"config": self.run_config(), "data_fingerprint": self.dataset.fingerprint,
                                              "wandb_id": self.wandb_id}, sort_keys=False)
            else:
                stored = json.loads(info_path.read_text()).get("data_fingerprint")
                if stored != self.dataset.fingerprint:
                    raise RunMismatchError(f"run folder {self.run_dir} was made from other data (fingerprint "
                                           f"{str(stored)[:12]}, now {self.dataset.fingerprint[:12]}); use another "
                                           "run_dir or --continual.overwrite true")
            if self.cfg.init_from and not (self.period_dir(0) / "DONE").exists():
                self.copy_period0(Path(self.cfg.init_from))
            self.embeddings = item_embeddings(self.dataset, show_progress=True)
            last = self.last_period()
        except BaseException:
            if created:  # a run that never started leaves nothing behind
                remove_ours(self.run_dir, RUN_KIND)
                if self._replaced is not None:  # the run it was to replace comes back
                    os.replace(self._replaced, self.run_dir)
                    self._replaced = None
            raise
        if self._replaced is not None:
            import shutil

            shutil.rmtree(self._replaced, ignore_errors=True)
            self._replaced = None
        self.seen_periods = [0]
        self._last = last

    def last_period(self) -> int:
        last = self.dataset.num_periods - 1 if self.cfg.last_period is None else self.cfg.last_period
        if last >= self.dataset.num_periods:
            raise ConfigError(f"continual.last_period {last}: the data has periods 0..{self.dataset.num_periods - 1}")
        return last

    def copy_period0(self, src: Path) -> None:
        """Start from another run's finished period 0 (same data and period-0 settings, checked)."""
        import shutil

        if read_marker(src) is None or read_marker(src).get("kind") != RUN_KIND or not (src / "run.json").exists():
            raise ConfigError(f"continual.init_from {src}: not a genrec continual run folder")
        if not (src / "period_0" / "DONE").exists():
            raise ConfigError(f"continual.init_from {src}: its period 0 has not finished")
        info = json.loads((src / "run.json").read_text())
        mine = self.run_config()
        hint = "init_from needs a run with the same data and period-0 settings"
        require_same(info["config"]["data"], mine["data"], f"continual.init_from {src}", hint)
        if info.get("data_fingerprint") != self.dataset.fingerprint:
            raise RunMismatchError(f"continual.init_from {src}: made from other data; {hint}")
        theirs = {k: info["config"]["continual"].get(k) for k in PERIOD0_FIELDS}
        require_same(theirs, {k: mine["continual"].get(k) for k in PERIOD0_FIELDS},
                     f"period 0 of continual.init_from {src}", hint)
        tmp = self.period_dir(0).with_name(".period_0.copy")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / "period_0", tmp, ignore=shutil.ignore_patterns("DONE"))
        shutil.rmtree(self.period_dir(0), ignore_errors=True)  # an unfinished copy of ours
        os.replace(tmp, self.period_dir(0))
        atomic_write_text(self.period_dir(0) / "DONE", (src / "period_0" / "DONE").read_text())  # finished: last
        self.log(f"period 0 copied from {src}")

    def run(self) -> dict[int, dict]:
        self.setup()
        last = self._last
        start = 0
        for t in range(last + 1):
            if (self.period_dir(t) / "DONE").exists():
                self.results[t] = self.load_period(t)
                start = t + 1
            else:
                break
        if start:
            self.log(f"resuming after period {start - 1} (found {self.period_dir(start - 1) / 'DONE'})")
        for t in range(start, last + 1):
            self.clear_period(t)
            try:
                self.run_period(t)
            except BaseException:
                self.clear_period(t)  # an unfinished period leaves nothing half-written
                if self._created and not self.results and distributed.is_main():
                    remove_ours(self.run_dir, RUN_KIND)  # nothing finished: leave no run folder behind
                raise
        self.finish()
        return self.results

    def clear_period(self, t: int) -> None:
        import shutil

        d = self.period_dir(t)
        if distributed.is_main() and d.exists() and not (d / "DONE").exists():
            shutil.rmtree(d)

    def run_period(self, t: int) -> None:
        self.seed(t)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        cf = self.stage_cf(t)
        timings["cf"] = time.perf_counter() - t0
        self.log(f"period {t}: CF embeddings {'skipped' if cf is None else 'ready'} ({timings['cf']:.1f}s)")
        t0 = time.perf_counter()
        # every stage starts from the period's seed: its draws do not depend on how many random numbers the stages
        # before it took (which differs with the process count: Lightning's DDP re-seeds at each fit)
        self.seed(t)
        table, reassign_stats = self.stage_tokenizer(t, cf)
        diff = self.sid_table.diff(table) if self.sid_table is not None else {}
        diff.update({f"reassign/{k}": v for k, v in reassign_stats.items() if k not in diff})
        self.previous_sid_table, self.sid_table = self.sid_table, table
        timings["tokenizer"] = time.perf_counter() - t0
        self.log(f"period {t}: tokenizer ({'rqvae' if t == 0 else self.tok_method}) "
                 f"{timings['tokenizer']:.1f}s; code change {diff.get('overall', 0.0):.3f}")
        t0 = time.perf_counter()
        self.seed(t)
        module, dm = self.stage_recommender(t, table)
        timings["recommender"] = time.perf_counter() - t0
        self.log(f"period {t}: recommender ({'train' if t == 0 else self.rec_method}) "
                 f"{timings['recommender']:.1f}s")
        metrics: dict[str, float] = {}
        for hook in self.hooks:
            self.seed(t)
            metrics.update(hook(self, t, module) or {})
        t0 = time.perf_counter()
        metrics.update(self.evaluate(t, module, dm))
        timings["evaluate"] = time.perf_counter() - t0
        metrics.update(self.per_status_metrics(dm))
        if self.cfg.analyze:
            t0 = time.perf_counter()
            metrics.update(self.stage_analyze(t, module, dm))
            timings["analyze"] = time.perf_counter() - t0
        metrics.update(self.cf_alignment(t, cf))
        metrics.update(self.diagnostics)
        for k, v in diff.items():
            metrics[f"code_change/{k}"] = float(v)
        metrics.update({f"seconds/{k}": v for k, v in timings.items()})
        self.save_period(t, table, metrics, diff, timings)
        self.results[t] = metrics
        self.log(f"period {t}: test recall@10 {metrics.get('test/recall@10/overall', float('nan')):.4f} "
                 f"(warm {metrics.get('test/recall@10/warm', float('nan')):.4f}, "
                 f"cold {metrics.get('test/recall@10/cold', float('nan')):.4f})")
        self.log_period(t, metrics)

    # ------------------------------------------------------------------ logging
    def log_period(self, t: int, metrics: dict) -> None:
        logger = self.logger()
        if logger is not None:
            logger.log_metrics({**metrics, "period": t}, step=t)
            if self.cfg.logger == "wandb":
                self.log_period_artifact(logger, t)

    def log_period_artifact(self, logger, t: int) -> None:
        """Period t's SID table, metrics and code changes as one versioned W&B artifact (alias ``period<t>``); its
        metadata names the previous period's version it was derived from (lineage of the tokenizer)."""
        import wandb

        d = self.period_dir(t)
        name = f"{self.cfg.name}-seed{self.cfg.seed}-period-state"
        meta = {"period": t, "method": self.cfg.name, "seed": self.cfg.seed, "data": self.data.name,
                "sid_table_hash": self.sid_table.content_hash() if self.sid_table is not None else None,
                "derived_from": f"{name}:period{t - 1}" if t > 0 else None}
        art = wandb.Artifact(name, type="continual-period", metadata=meta)
        for f in ("sid_table.parquet", "metrics.json", "sid_diff.json"):
            if (d / f).exists():
                art.add_file(str(d / f))
        logger.experiment.log_artifact(art, aliases=[f"period{t}"])
        index = Path(logger.experiment.dir) / "artifacts.json"  # a readable list of what was logged
        logged = json.loads(index.read_text()) if index.exists() else []
        atomic_write_json(index, [*logged, {"name": name, "alias": f"period{t}", **meta}], sort_keys=False)

    def logger(self):
        if self._logger is None and self.cfg.logger != "none" and distributed.is_main():
            from lightning.pytorch.loggers import CSVLogger, WandbLogger

            name = f"{self.cfg.name}-seed{self.cfg.seed}"
            if self.cfg.logger == "wandb":
                # the run id lives in run.json: a resumed run continues the same W&B run
                self._logger = WandbLogger(project=self.cfg.wandb_project, group=self.data.name, name=name,
                                           id=self.wandb_id, resume="allow", save_dir=str(self.run_dir),
                                           offline=os.environ.get("WANDB_MODE") != "online",
                                           config={"data": _jsonable(dataclasses.asdict(self.data)),
                                                   "continual": _jsonable(dataclasses.asdict(self.cfg))})
            else:
                logs = self.run_dir / "logs"
                part = len(list(logs.glob(f"{name}-part*"))) if logs.exists() else 0
                # a new version per invocation: Lightning empties an existing version's metrics.csv
                self._logger = CSVLogger(str(self.run_dir), name="logs", version=f"{name}-part{part}")
        return self._logger

    def finish(self) -> None:
        if not distributed.is_main():
            return
        table = summary_rows(self.results)
        atomic_write_json(self.run_dir / "summary.json", table, sort_keys=False)
        logger = self.logger()
        if logger is not None and self.cfg.logger == "wandb" and table:
            cols = sorted({k for r in table for k in r})
            logger.log_table("periods", columns=cols, data=[[r.get(c) for c in cols] for r in table])
        if logger is not None:
            logger.finalize("success")
            if self.cfg.logger == "wandb":
                from lightning_modules._wandb import finish_wandb

                finish_wandb(logger, run_summary(self.results))
        print(format_summary(table, self.cfg.name))
        print(f"[continual {self.cfg.name}] outputs: {self.run_dir}")


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


PER_INSTANCE_FILE = "per_instance.npz"


def save_per_instance(path: Path, table: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k.replace("/", "__"): np.asarray(v) for k, v in table.items()})

    atomic_write(path, write)


# ---------------------------------------------------------------------- GenRecEdit after each period
def edit_hook(edit_config: EditConfig | None = None, merge: bool = False, evaluate_unedited: bool = True):
    """``fn(runner, t, module) -> dict`` for ``ContinualRunner(hooks=[...])``.

    After period t's recommender update: period t+1's new items get SIDs from period t's tokenizer
    (``runner.rqvae``, codes of old items untouched), are edited in, and period t+1's test instances are
    evaluated (warm/cold = training target of this model or not). Keys: ``edit/period{t+1}/edited/test/...``,
    ``edit/period{t+1}/unedited/test/...`` (with ``evaluate_unedited``), ``edit/period{t+1}/edit/...``.
    The module is then restored (SID table, trie, weights) so period t's own evaluation is unaffected;
    ``merge=True`` instead adds the edits to the carried-over recommender state for period t+1 (decision 6).
    """
    from callbacks.genrecedit import GenRecEditCallback
    from genrec.editing.keys import ffn_out_proj

    config = edit_config or EditConfig()

    def hook(runner, t: int, module) -> dict:
        ds = runner.dataset
        if t + 1 >= ds.num_periods:
            return {}
        nxt = t + 1
        seen = list(runner.seen_periods)  # the periods whose targets this model has learned
        dm = runner.sequence_dm([t], nxt, seen, 256)
        original_table = module.sid_table
        seeded = dataclasses.replace(config, seed=runner.cfg.seed + t)  # one seed reaches every draw
        # every rank computes the same edit (replicated, like the tokenizer); rank 0 reports it
        cb = GenRecEditCallback(seeded, cold_period=nxt, merge=merge, coder=runner.rqvae,
                                embeddings=runner.embeddings, verbose=distributed.is_main())
        prefix = f"edit/period{nxt}"
        out: dict[str, float] = {}
        try:
            if evaluate_unedited:
                cb.ensure_sids(module, dm, cb.cold_items(dm), runner.embeddings)
                res = runner.evaluate(t, module, dm)
                out.update({f"{prefix}/unedited/{k}": v for k, v in res.items()})
            with warnings.catch_warnings():
                if not distributed.is_main():
                    warnings.simplefilter("ignore")
                edits = cb.apply(module.to(runner.device), dm)  # None: cov_lambda auto found no safe edit
            out.update({f"{prefix}/{k}": v for k, v in cb.metrics.items()})
            res = runner.evaluate(t, module, dm)
            out.update({f"{prefix}/edited/{k}": v for k, v in res.items()})
        finally:
            cb.remove(module)
            module.set_sid_table(original_table, ds.catalogue_until(t), ds.num_items)
        if merge and edits is not None and runner.tiger_state is not None:
            names = {id(p): n for n, p in module.named_parameters()}
            for layer, dw in edits.summed_per_layer().items():
                name = names[id(ffn_out_proj(module.t5, layer).weight)]
                w = runner.tiger_state[name]
                runner.tiger_state[name] = (w.double() + dw.double()).to(w.dtype)
        return out

    return hook


def load_per_instance(period_dir: str | Path) -> dict[str, np.ndarray]:
    """A period's per-instance test values (``instance_id``, metric columns, ``mask/<subset>``)."""
    with np.load(Path(period_dir) / PER_INSTANCE_FILE, allow_pickle=False) as z:
        return {k.replace("__", "/"): z[k] for k in z.files}


def run_summary(results: dict[int, dict]) -> dict:
    """W&B summary: every metric of the last period, plus period means (t ≥ 1) of the test metrics."""
    if not results:
        return {}
    last = max(results)
    out = {f"last/{k}": v for k, v in results[last].items()}
    later = [m for t, m in results.items() if t > 0]
    for k in sorted({k for m in later for k in m if k.startswith("test/")}):
        vals = [m[k] for m in later if isinstance(m.get(k), (int, float))]
        if vals:
            out[f"mean/{k}"] = sum(vals) / len(vals)
    return out


def summary_rows(results: dict[int, dict]) -> list[dict]:
    return [{"period": t, **m} for t, m in sorted(results.items())]


def format_summary(rows: list[dict], name: str) -> str:
    keys = ["test/hr@5/overall", "test/hr@10/overall", "test/ndcg@5/overall", "test/ndcg@10/overall",
            "test/recall@10/cold", "code_change/level1", "code_change/overall"]
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = [f"{name}: per-period results", "period " + " ".join(f"{k.split('/', 1)[1]:>20}" for k in keys)]
    for r in rows:
        lines.append(f"{r['period']:>6} " + " ".join(f"{r.get(k, float('nan')):>20.4f}" for k in keys))
    return "\n".join(lines)


def parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="genrec continual", description=__doc__, default_env=False, exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(DataConfig, "data", help="Data source (periods protocol)")
    p.add_class_arguments(ContinualConfig, "continual", help="Continual run settings")
    return p


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    cfg = p.parse_args(argv)
    init = p.instantiate(cfg)
    n = init.continual.devices
    if n > 1 and distributed.launched_world() == 1:  # our own launcher: N processes run this same command
        code = distributed.spawn(["continual", *argv], n)
        if code:
            raise SystemExit(code)  # the failing rank has printed its error
        return {}
    return ContinualRunner(init.data, init.continual).run()
