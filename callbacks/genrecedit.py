"""GenRecEdit in the Lightning layer: edit cold-start items into a trained TigerModule before testing.

``GenRecEditCallback`` (specs/genrecedit.md §6–§7, decisions 5, 6, 8):

* ``on_test_start`` / ``apply(module, datamodule)``: the cold items are the items entering ``cold_period``
  (default: the datamodule's eval period) that the model never had as a training target; they get SIDs from
  the current SID table's tokenizer (``coder``) if the table lacks them; ``GenRecEditor`` builds the edit set from
  the training instances of the seen periods (pseudo-history source; warm items = their targets) and
  ``module.edit`` is set (the One-One path of the constrained beam search). Non-one-one edit sets (the
  "w/o one-one" / "w/o position-wise" ablations) are merged into the ``wo`` weights instead, reversibly.
* ``remove(module)`` restores the unedited model bit for bit; ``finish(module)`` removes or, with ``merge=True``,
  merges the edits permanently (decision 6: done before the next period's training, i.e. in ``on_fit_start``).
* Checkpoints carry the edit set (``checkpoint["genrecedit"]``); restoring it on a model whose SID table differs
  raises ``SidTableMismatchError``.
* DDP: rank 0 builds the edit set, the tensors reach every rank through ``trainer.strategy.broadcast``.

``runners.continual.edit_hook(edit_config)`` applies the callback inside ``genrec continual``: after period t's
recommender update it edits in period t+1's new items and evaluates on period t+1's test instances.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch

from genrec.data.splits import TEST, TRAIN, VALID
from genrec.editing import EditConfig, EditReport, GenRecEditor, PositionEdits, SidTableMismatchError
from genrec.editing.keys import ffn_out_proj
from genrec.editing.select import candidate_lambdas, choose_lambda
from genrec.errors import ConfigError
from genrec.tokenizers.reassign import reassign
from genrec.tokenizers.sid import SemanticIdTable

CHECKPOINT_KEY = "genrecedit"

__all__ = ["CHECKPOINT_KEY", "GenRecEditCallback", "SidTableMismatchError", "load_edits"]


def module_history_encoder(module) -> Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    """The module's own encoder input (so edit keys are computed on exactly what decoding sees)."""

    def encode(history: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return module.encode(torch.as_tensor(np.asarray(history, dtype=np.int64), device=module.device))

    return encode


def load_edits(module, checkpoint: dict | str | Path) -> PositionEdits | None:
    """The edit set stored in a checkpoint (dict or path), checked against ``module.sid_table``; None if absent."""
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = checkpoint.get(CHECKPOINT_KEY)
    if sd is None:
        return None
    if module.sid_table is None:
        raise ValueError("cannot restore GenRecEdit edits: the module has no SID table to check them against")
    return PositionEdits.from_state_dict(sd, module.sid_table.content_hash())


class GenRecEditCallback(L.Callback):
    """Edit the evaluation period's cold items into a TigerModule (see module docstring).

    Args:
        config: Every GenRecEdit knob (``genrec.editing.EditConfig``; paper defaults).
        cold_period: Period whose new items are edited in (None: the datamodule's ``eval_period``).
        merge: Decision 6 — at the next ``fit`` start the edits are merged into the weights (True) or removed
            (False, default).
        coder: Tokenizer of the current SID table (e.g. the RQ-VAE, anything with ``get_codes`` or a callable
            embeddings → codes); needed only when the module's SID table lacks some cold items.
        items: Explicit cold items (overrides the period's new items; items the model trained on are still dropped).
        embeddings: Item text embeddings (row = item); None: ``genrec.data.pipeline.item_embeddings`` (cached).
        edit_on_test: Edit in ``on_test_start`` (False: only restore/keep edits given explicitly or by checkpoint).
        verbose: Print one status line per edit phase and per λ candidate.
    """

    def __init__(
        self,
        config: EditConfig | None = None,
        cold_period: int | None = None,
        merge: bool = False,
        coder=None,
        items: np.ndarray | None = None,
        embeddings: np.ndarray | None = None,
        edit_on_test: bool = True,
        verbose: bool = True,
    ) -> None:
        self.config = config or EditConfig()
        self.cold_period = cold_period
        self.merge = merge
        self.coder = coder
        self.items = None if items is None else np.asarray(items, dtype=np.int64)
        self.embeddings = embeddings
        self.edit_on_test = edit_on_test
        self.verbose = verbose
        self.edits: PositionEdits | None = None
        self.report: EditReport | None = None
        self.metrics: dict[str, float] = {}
        self._saved_weights: dict[int, torch.Tensor] | None = None  # originals of merged (non-one-one) edits
        self._active_on = None  # module the edits are currently active on

    # ------------------------------------------------------------------ cold items and SIDs
    def cold_items(self, datamodule) -> np.ndarray:
        """Items entering the cold period minus the items the model was trained on (its training targets)."""
        ds = datamodule.load()
        period = self.cold_period if self.cold_period is not None else datamodule.eval_period
        candidates = ds.new_items(period) if self.items is None else self.items
        return np.setdiff1d(candidates, datamodule.train_targets())

    def ensure_sids(self, module, datamodule, cold: np.ndarray, embeddings: np.ndarray) -> SemanticIdTable:
        """Give SIDs to cold items the module's table lacks (old codes untouched) and put them in the trie."""
        table = module.sid_table
        if table is None:
            raise ValueError("GenRecEditCallback: the module has no SID table (call setup / set_sid_table first)")
        missing = cold[~np.isin(cold, table.items)]
        if len(missing):
            if self.coder is None:
                raise ValueError(
                    f"GenRecEditCallback: {len(missing)} cold items (e.g. {missing[:5].tolist()}) have no SID in the "
                    "module's SID table; pass `coder` (the tokenizer of that table, e.g. the RQ-VAE) to code them"
                )
            items = np.concatenate([table.items, missing])
            table = reassign(table, items, embeddings[items], self.coder, mode="reformer").table
        ds = datamodule.load()
        catalogue = np.union1d(datamodule.catalogue(), cold)
        module.set_sid_table(table, catalogue[np.isin(catalogue, table.items)], ds.num_items)
        return table

    # ------------------------------------------------------------------ edit / activate / remove
    def apply(self, module, datamodule, trainer: L.Trainer | None = None) -> PositionEdits:
        """Build the edit set for the cold items and activate it on ``module``; returns it."""
        # Lightning runs test hooks under inference mode; δ optimisation and the probe need autograd.
        with torch.inference_mode(False), torch.enable_grad():
            return self._apply(module, datamodule, trainer)

    def _apply(self, module, datamodule, trainer: L.Trainer | None) -> PositionEdits | None:
        if self._active_on is not None:
            self.remove(self._active_on)
        ds = datamodule.load()
        train = datamodule.split(TRAIN, datamodule.seen_periods)
        warm = np.unique(train.target)
        cold = self.cold_items(datamodule)
        if len(cold) == 0:
            raise ValueError("GenRecEditCallback: no cold items to edit in (every new item was a training target)")
        emb = self.embeddings
        if emb is None:
            from genrec.data.pipeline import item_embeddings

            emb = item_embeddings(ds, show_progress=False)
        if module.cfg.num_user_tokens > 0:
            raise ConfigError("GenRecEdit does not support a TIGER with user tokens (model.num_user_tokens > 0): "
                              "its pseudo histories have no user")
        table = self.ensure_sids(module, datamodule, cold, emb)
        cfg = dataclasses.replace(self.config, max_history_items=module.cfg.max_history_items)
        world = trainer.world_size if trainer is not None else 1
        rank0 = trainer is None or trainer.is_global_zero
        start = time.perf_counter()
        state, report, choice = None, None, None
        if rank0:
            eval_inst = None
            if cfg.knowledge == "upper_bound":
                period = self.cold_period if self.cold_period is not None else datamodule.eval_period
                eval_inst = datamodule.split(TEST, [period])
            plan = GenRecEditor(cfg).prepare(
                module.t5, table, cold, emb[cold], emb[warm], train.history, train.target, warm_items=warm,
                eval_history=None if eval_inst is None else eval_inst.history,
                eval_target=None if eval_inst is None else eval_inst.target,
                history_encoder=module_history_encoder(module), progress=self._say,
            )
            if cfg.cov_lambda == "auto":
                edits, choice = self.choose_lambda(plan, module, datamodule)
            else:
                edits = plan.solve(float(cfg.cov_lambda))
            report = plan.report(edits)
            if choice is not None:
                report.selection = {"cov_lambda": choice.cov_lambda, "reason": choice.reason, "table": choice.table}
            state = None if edits is None else edits.state_dict()
        if world > 1:
            # Only rank 0 optimises; the ΔW tensors (and the report) reach the others by broadcast.
            state, report = trainer.strategy.broadcast((state, report), src=0)
        edits = None if state is None else PositionEdits.from_state_dict(state, table.content_hash())
        self.report = report
        self.metrics = self._report_metrics(report, time.perf_counter() - start, len(cold), edits)
        if edits is None:
            self.edits = None
            warnings.warn(f"GenRecEdit: {report.selection.get('reason', 'no edit applied')}", stacklevel=2)
            return None
        self.activate(module, edits)
        return edits

    @staticmethod
    def locality_dataset(datamodule, rows: int, seed: int):
        """Up to ``rows`` validation instances of the seen periods before the cold one (a seeded draw), as an
        evaluation dataset with the datamodule's subset masks; None when there are none."""
        from datamodules.sequences import InstanceDataset

        earlier = [p for p in datamodule.seen_periods if p != datamodule.eval_period]
        if rows <= 0 or not earlier:
            return None
        inst = datamodule.split(VALID, earlier)
        if len(inst) == 0:
            return None
        if len(inst) > rows:
            inst = inst.select(np.sort(np.random.default_rng(seed).choice(len(inst), rows, replace=False)))
        return InstanceDataset(inst, datamodule.eval_masks(inst))

    def selection_batches(self, datamodule, cfg) -> _Batches:
        """The cold period's validation batches, then the locality rows (ids shifted so none collide)."""
        from torch.utils.data import DataLoader

        from datamodules.sequences import collate_batch

        val = datamodule.val_dataloader()
        extra = self.locality_dataset(datamodule, cfg.locality_rows, cfg.seed)
        if extra is None:
            return _Batches([val], [0])
        loader = DataLoader(extra, batch_size=val.batch_size, collate_fn=collate_batch)
        return _Batches([val, loader], [0, len(val.dataset)])

    def choose_lambda(self, plan, module, datamodule):
        """``cov_lambda auto``: each candidate λ = r·m on the cold period's validation split plus
        ``locality_rows`` validation rows of the earlier periods (this process only), chosen under the
        warm-NDCG constraint (``genrec.editing.select``); (edits or None, choice)."""
        cfg = plan.cfg
        loader = self.selection_batches(datamodule, cfg)
        t0 = time.perf_counter()
        module.edit = None
        unedited = module.evaluate_loader(loader)
        candidates = {}
        k = 10 if 10 in module.ks else max(module.ks)  # the cut-off the selection compares
        for lam in candidate_lambdas(plan.num_requests, cfg.auto_lambda_ratios):
            self.activate(module, plan.solve(lam))
            try:
                candidates[lam] = module.evaluate_loader(loader)
            finally:
                self.remove(module)
            m = candidates[lam]
            cold, warm = f"val/recall@{k}/cold", f"val/ndcg@{k}/warm"
            self._say(f"λ {lam:g}: {cold} {m.get(cold, float('nan')):.4f} (unedited "
                      f"{unedited.get(cold, float('nan')):.4f}), {warm} {m.get(warm, float('nan')):.4f} (unedited "
                      f"{unedited.get(warm, float('nan')):.4f})")
        choice = choose_lambda(unedited, candidates, cfg.max_warm_drop, k=k)
        self._say(choice.reason)
        plan.timers.times["select"] = time.perf_counter() - t0
        return (None if choice.cov_lambda is None else plan.solve(choice.cov_lambda)), choice

    def _say(self, message: str) -> None:
        if self.verbose:
            print(f"[edit] {message}", flush=True)

    @staticmethod
    def _report_metrics(report, seconds: float, num_cold: int, edits) -> dict[str, float]:
        out = {"edit/seconds/total": seconds, "edit/num_cold_items": float(num_cold),
               "edit/applied": float(edits is not None),
               "edit/cov_lambda": float("nan") if edits is None else float(edits.cov_lambda),
               "edit/num_requests": float(report.knowledge.get("num_histories", float("nan")))}
        out.update({f"edit/seconds/{k}": float(v) for k, v in report.times.items()})
        out.update({f"edit/success_rate/pos{p}": float(v) for p, v in report.success_rate.items()})
        out.update({f"edit/layer/pos{p}": float(v) for p, v in report.layers.items()})
        # efficacy (requests) and locality (training rows): teacher-forced top-1 rate of the target token
        for name, rates in report.diagnostics.items():
            out.update({f"edit/top1/{name}/pos{p}": float(v) for p, v in rates.items()})
        for row in (report.selection or {}).get("table", []):
            tag = f"edit/auto/lambda{row['lambda']:g}"
            out.update({f"{tag}/{k}": float(v) for k, v in row.items() if k.startswith("val/") and v is not None})
        return out

    def activate(self, module, edits: PositionEdits) -> None:
        """Put an edit set in force: One-One → ``module.edit``; otherwise merged into ``wo`` (reversibly)."""
        if self._active_on is not None:
            self.remove(self._active_on)
        if module.sid_table is None or edits.sid_table_hash != module.sid_table.content_hash():
            raise SidTableMismatchError(
                "edit set was built for another SID table than the module's; rebuild the edits for this table"
            )
        self.edits = edits
        if edits.one_one:
            module.edit = edits
        else:
            module.edit = None
            self._saved_weights = edits.merge_into(module.t5)
        self._active_on = module

    def remove(self, module) -> None:
        """Restore the unedited model exactly (weights copied back bit for bit; One-One edit detached)."""
        module.edit = None
        if self._saved_weights is not None:
            with torch.no_grad():
                for layer, original in self._saved_weights.items():
                    ffn_out_proj(module.t5, layer).weight.copy_(original)
            self._saved_weights = None
        self._active_on = None

    def finish(self, module) -> None:
        """Decision 6: before the next period the edits are removed, or (``merge=True``) merged for good."""
        if self._active_on is None or self.edits is None:
            return
        if not self.merge:
            self.remove(module)
            return
        if self._saved_weights is None:  # one-one edits are not yet in the weights
            self.edits.merge_into(module.t5)
        module.edit = None
        self._saved_weights = None
        self._active_on = None

    # ------------------------------------------------------------------ Lightning hooks
    def on_test_start(self, trainer, pl_module) -> None:
        if self._active_on is pl_module:
            return  # edits restored from a checkpoint or applied by hand stay in force
        if self.edits is not None and not self.edit_on_test:
            self.activate(pl_module, self.edits)
            return
        if not self.edit_on_test:
            return
        dm = trainer.datamodule
        if dm is None:
            raise ValueError("GenRecEditCallback needs the Trainer's datamodule (a SequenceDataModule)")
        self.apply(pl_module, dm, trainer)
        self._log(trainer, pl_module)

    def _log(self, trainer, pl_module) -> None:
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(self.metrics, step=trainer.global_step)
        # part of this test run's metrics.json (written once, by the module, at the end of the test epoch)
        pl_module.extra_test_metrics.update(self.metrics)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.finish(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.edits is not None and self._active_on is pl_module:
            checkpoint[CHECKPOINT_KEY] = self.edits.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        edits = load_edits(pl_module, checkpoint)
        if edits is not None:
            self.activate(pl_module, edits)

    # ------------------------------------------------------------------ persistence outside a Trainer
    def restore(self, module, checkpoint: dict | str | Path) -> PositionEdits | None:
        """Activate the edit set stored in a checkpoint (after ``load_from_checkpoint``)."""
        edits = load_edits(module, checkpoint)
        if edits is not None:
            self.activate(module, edits)
        return edits


class _Batches:
    """Iterate several loaders as one, shifting each loader's instance ids by its offset."""

    def __init__(self, loaders, offsets) -> None:
        self.loaders, self.offsets = loaders, offsets

    def __iter__(self):
        for loader, offset in zip(self.loaders, self.offsets):
            for batch in loader:
                yield {**batch, "index": batch["index"] + offset} if offset else batch
