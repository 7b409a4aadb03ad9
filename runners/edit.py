"""`genrec edit`: inject a period's cold-start items into a trained TIGER checkpoint with GenRecEdit.

    genrec edit --ckpt_path runs/office_products_2018_d3/tiger/fit-<id>/best.ckpt --config configs/edit/office_products_2018_d3.yaml \
        [--cold_period P] [--items FILE] [--edit.cov_lambda 1000] [--output_dir DIR]

Loads the TigerModule (``load_from_checkpoint(..., weights_only=True)``; the checkpoint carries its SID table),
evaluates the unedited model on the cold period's validation and test instances, edits the cold items in
(``GenRecEditCallback``: items new in the period that the model never had as a training target, or the ids in
``--items``), evaluates again, and writes ``edits.pt`` (``PositionEdits.save``), ``report.json`` (the editor's
report) and ``metrics.json`` (``unedited/{val,test}/...``, ``edited/{val,test}/...``, ``seconds/edit``,
``seconds/covariance``, ``edit/...``). Choose λ or the pseudo-history policy on ``val``, report ``test``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np

from genrec.checkpoints import read_checkpoint
from genrec.data.config import DataConfig
from genrec.editing import EditConfig
from genrec.errors import CheckpointError, ConfigError, DataError
from genrec.files import atomic_write_json, claim_dir, staged_dir

EDIT_KIND = "edit"


def read_items(path: str, item_ids: np.ndarray) -> np.ndarray:
    """Dense item indices of the items listed in ``path``: a text file (one item id per line, as in the data's
    files) or a JSON list of ids; a ``.npy`` file holds dense item indices. Unknown ids are an error naming the
    line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--items {path}: file not found")
    n = len(item_ids)
    if p.suffix == ".npy":
        try:
            items = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"--items {path}: not a numpy array of item indices ({exc})") from None
        if items.dtype.kind not in "iu":
            raise DataError(f"--items {path}: expected integer item indices, found dtype {items.dtype}")
        items = np.asarray(items, dtype=np.int64).ravel()
        bad = (items < 0) | (items >= n)
        if bad.any():
            raise DataError(f"--items {path}: entry {int(np.flatnonzero(bad)[0])}: item index "
                            f"{int(items[bad][0])} outside 0..{n - 1}")
    else:
        if p.suffix == ".json":
            try:
                tokens = [str(v) for v in json.loads(p.read_text())]
            except (ValueError, TypeError):
                raise DataError(f"--items {path}: expected a JSON list of item ids") from None
            where = "entry"
        else:
            tokens = [line.strip() for line in p.read_text().splitlines()]
            where = "line"
        index = {str(v): i for i, v in enumerate(item_ids)}
        items = []
        for pos, tok in enumerate(tokens, 1):
            if not tok:
                continue
            if tok not in index:
                raise DataError(f"--items {path}: {where} {pos}: unknown item id {tok!r} (expected ids as in the "
                                "data's item file; a .npy file holds dense indices)")
            items.append(index[tok])
        items = np.asarray(items, dtype=np.int64)
    if items.size == 0:
        raise DataError(f"--items {path}: no items listed")
    return items


def parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="genrec edit", description=__doc__, default_env=False, exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--ckpt_path", type=str, required=True, help="TigerModule checkpoint (Lightning .ckpt)")
    p.add_argument("--output_dir", type=str, default="runs/edit",
                   help="Where edits.pt, report.json and metrics.json go (written in one go at the end; an existing "
                        "edit folder needs --overwrite true; other folders are refused)")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace an earlier edit output folder")
    p.add_argument("--cold_period", type=int | None, default=None,
                   help="Period whose new items are edited in and whose test instances are evaluated "
                        "(default: the period after the last train period)")
    p.add_argument("--items", type=str | None, default=None,
                   help="File of cold item ids (one per line, or a .json list; a .npy file holds dense indices) "
                        "instead of the period's new items; items the model trained on are dropped")
    p.add_argument("--train_periods", type=list[int], default=[0], help="Periods the checkpoint was trained on")
    p.add_argument("--seen_periods", type=list[int] | None, default=None,
                   help="Periods whose train targets the model learned (default: train_periods)")
    p.add_argument("--prepared_dir", type=str | None, default=None, help="Prepared dataset folder (cache)")
    p.add_argument("--eval_batch_size", type=int, default=256)
    p.add_argument("--accelerator", type=str, default="auto")
    p.add_argument("--evaluate_unedited", type=bool, default=True, help="Also evaluate the model before editing")
    p.add_argument("--logger", type=Literal["wandb", "csv", "none"], default="none",
                   help="Where the final metrics are also logged (W&B sweeps need wandb)")
    p.add_argument("--wandb_project", type=str, default="genrec")
    p.add_class_arguments(DataConfig, "data", help="Data source (periods protocol)")
    p.add_class_arguments(EditConfig, "edit", help="GenRecEdit settings (genrec.editing.EditConfig)")
    return p


def _evaluate(module, dm, root: Path, accelerator: str) -> dict:
    """``val/…`` (the cold period's validation split: select λ / policy on these) and ``test/…`` metrics."""
    import lightning as L

    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root))
    res = dict(trainer.validate(module, datamodule=dm, verbose=False)[0])
    res.update(trainer.test(module, datamodule=dm, verbose=False)[0])
    return {k: float(v) for k, v in res.items() if k.startswith(("val/", "test/"))}


def run(cfg, data: DataConfig, edit: EditConfig) -> dict:
    from datamodules.sequences import SequenceDataModule
    from lightning_modules.tiger import TigerModule

    # every check that can run before the work runs first: output folder, checkpoint, data, items
    claim_dir(cfg.output_dir, EDIT_KIND, overwrite=cfg.overwrite, protected=(data.root,), what="edit output folder")
    if edit.cov_cache_dir and Path(cfg.output_dir).resolve() in [Path(edit.cov_cache_dir).resolve(),
                                                                *Path(edit.cov_cache_dir).resolve().parents]:
        raise ConfigError(f"edit.cov_cache_dir {edit.cov_cache_dir} lies inside --output_dir {cfg.output_dir} (which is "
                          "written in one go at the end): put the C̄0 cache outside it")
    read_checkpoint(cfg.ckpt_path, expect="TigerModule")
    cold_period = cfg.cold_period if cfg.cold_period is not None else max(cfg.train_periods) + 1
    dm = SequenceDataModule(data, prepared_dir=cfg.prepared_dir, train_periods=cfg.train_periods,
                            eval_period=cold_period, seen_periods=cfg.seen_periods,
                            eval_batch_size=cfg.eval_batch_size)
    ds = dm.load()  # validates the periods
    if cold_period == 0:
        raise ConfigError("--cold_period 0: period 0 has no earlier model to edit; use a later period")
    items_file = cfg["items"]  # (Namespace.items is a method)
    items = read_items(items_file, ds.table.item_ids) if items_file else None
    module = TigerModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    if module.sid_table is None:
        raise CheckpointError(f"checkpoint {cfg.ckpt_path} carries no SID table (expected checkpoint['sid_table'])")
    module.bind_catalogue(ds)  # refuses a checkpoint trained on another catalogue
    import lightning as L

    L.seed_everything(edit.seed, workers=True, verbose=False)  # edit.seed is the command's one seed
    with staged_dir(cfg.output_dir, EDIT_KIND, overwrite=cfg.overwrite, protected=(data.root,),
                    what="edit output folder") as out:
        metrics = _edit_and_evaluate(cfg, module, dm, cold_period, items, edit, out)
        _log(cfg, data, edit, metrics, out)
    out = Path(cfg.output_dir)
    for key in ("recall@10/cold", "recall@10/warm", "recall@10/overall"):
        print(f"{key:>20}: unedited {metrics.get(f'unedited/test/{key}', float('nan')):.4f} → "
              f"edited {metrics.get(f'edited/test/{key}', float('nan')):.4f}")
    print(f"edit {metrics['seconds/edit']:.1f}s (+ C̄0 {metrics['seconds/covariance']:.1f}s) → {out / 'metrics.json'}")
    return metrics


def _edit_and_evaluate(cfg, module, dm, cold_period: int, items, edit: EditConfig, out: Path) -> dict:
    from callbacks.genrecedit import GenRecEditCallback

    metrics: dict[str, float] = {}
    if cfg.evaluate_unedited:
        before = _evaluate(module, dm, out / "unedited", cfg.accelerator)
        metrics.update({f"unedited/{k}": v for k, v in before.items()})
    from lightning_modules._device import accelerator_device

    cb = GenRecEditCallback(edit, cold_period=cold_period, items=items)
    edits = cb.apply(module.to(accelerator_device(cfg.accelerator)), dm)  # (the Trainer left it on the CPU)
    times = cb.report.times
    # Decision 8: the edit is timed from prepared knowledge to updated model; C̄0 (reusable) on its own.
    metrics["seconds/edit"] = cb.report.edit_seconds
    metrics["seconds/covariance"] = float(times["covariance"])
    metrics["seconds/knowledge"] = float(times["knowledge"])
    metrics["seconds/select"] = float(times.get("select", 0.0))  # cov_lambda auto: candidates on validation
    metrics.update(cb.metrics)
    metrics.update({f"edited/{k}": v for k, v in _evaluate(module, dm, out / "edited", cfg.accelerator).items()})
    if edits is not None:  # cov_lambda auto may find no edit that keeps warm recommendations
        edits.save(out / "edits.pt")
    else:
        print(f"genrec edit: {cb.report.selection.get('reason', 'no edit applied')}")
    atomic_write_json(out / "report.json", cb.report.to_dict(), sort_keys=False)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _log(cfg, data: DataConfig, edit: EditConfig, metrics: dict, out: Path) -> None:
    if cfg.logger == "none":
        return
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    if cfg.logger == "wandb":
        logger = WandbLogger(project=cfg.wandb_project, group=data.name, save_dir=str(out),
                             offline=os.environ.get("WANDB_MODE") != "online",
                             config={"edit": dataclasses.asdict(edit), "ckpt_path": cfg.ckpt_path})
    else:
        logger = CSVLogger(str(out), name="logs")
    logger.log_metrics(metrics, step=0)
    logger.finalize("success")
    if cfg.logger == "wandb":
        from lightning_modules._wandb import finish_wandb

        finish_wandb(logger, metrics)  # before the staged folder is renamed: W&B has written everything


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    cfg = p.parse_args(argv)
    init = p.instantiate(cfg)
    return run(cfg, init.data, init.edit)
