"""`genrec edit`: inject a period's cold-start items into a trained TIGER checkpoint with GenRecEdit.

    genrec edit --ckpt_path runs/.../last.ckpt --config configs/edit/office_products_2018_d3.yaml \
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

from genrec.data.config import DataConfig
from genrec.editing import EditConfig


def read_items(path: str) -> np.ndarray:
    """Item indices from a ``.npy`` file, a JSON list, or a text file with one index per line."""
    p = Path(path)
    if p.suffix == ".npy":
        items = np.load(p)
    elif p.suffix == ".json":
        items = np.asarray(json.loads(p.read_text()))
    else:
        items = np.asarray([int(line) for line in p.read_text().split() if line.strip()])
    items = np.asarray(items, dtype=np.int64).ravel()
    if items.size == 0:
        raise ValueError(f"--items {path}: no item indices found")
    return items


def parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="genrec edit", description=__doc__, default_env=False)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--ckpt_path", type=str, required=True, help="TigerModule checkpoint (Lightning .ckpt)")
    p.add_argument("--output_dir", type=str, default="runs/edit", help="Where edits.pt and metrics.json go")
    p.add_argument("--cold_period", type=int | None, default=None,
                   help="Period whose new items are edited in and whose test instances are evaluated "
                        "(default: the period after the last train period)")
    p.add_argument("--items", type=str | None, default=None,
                   help="File of cold item indices (.npy, .json list, or one per line) instead of the period's "
                        "new items; items the model trained on are dropped")
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
    from callbacks.genrecedit import GenRecEditCallback
    from datamodules.sequences import SequenceDataModule
    from lightning_modules.tiger import TigerModule

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cold_period = cfg.cold_period if cfg.cold_period is not None else max(cfg.train_periods) + 1
    dm = SequenceDataModule(data, prepared_dir=cfg.prepared_dir, train_periods=cfg.train_periods,
                            eval_period=cold_period, seen_periods=cfg.seen_periods,
                            eval_batch_size=cfg.eval_batch_size)
    dm.load()  # validates the periods
    module = TigerModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    if module.sid_table is None:
        raise ValueError(f"checkpoint {cfg.ckpt_path} carries no SID table (expected checkpoint['sid_table'])")
    metrics: dict[str, float] = {}
    if cfg.evaluate_unedited:
        before = _evaluate(module, dm, out / "unedited", cfg.accelerator)
        metrics.update({f"unedited/{k}": v for k, v in before.items()})
    items_file = cfg["items"]  # (Namespace.items is a method)
    items = read_items(items_file) if items_file else None
    cb = GenRecEditCallback(edit, cold_period=cold_period, items=items)
    edits = cb.apply(module, dm)
    times = cb.report.times
    # Decision 8: the edit is timed from prepared knowledge to updated model; C̄0 (reusable) on its own.
    metrics["seconds/edit"] = cb.report.edit_seconds
    metrics["seconds/covariance"] = float(times["covariance"])
    metrics["seconds/knowledge"] = float(times["knowledge"])
    metrics.update({k: v for k, v in cb.metrics.items()})
    metrics.update({f"edited/{k}": v for k, v in _evaluate(module, dm, out / "edited", cfg.accelerator).items()})
    edits.save(out / "edits.pt")
    (out / "report.json").write_text(json.dumps(cb.report.to_dict(), indent=1, default=str))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    _log(cfg, data, edit, metrics, out)
    for key in ("recall@10/cold", "recall@10/warm", "recall@10/overall"):
        print(f"{key:>20}: unedited {metrics.get(f'unedited/test/{key}', float('nan')):.4f} → "
              f"edited {metrics.get(f'edited/test/{key}', float('nan')):.4f}")
    print(f"edit {metrics['seconds/edit']:.1f}s (+ C̄0 {metrics['seconds/covariance']:.1f}s) → {out / 'metrics.json'}")
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


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    cfg = p.parse_args(argv)
    init = p.instantiate_classes(cfg)
    return run(cfg, init.data, init.edit)
