"""SASRec and most-popular baselines on one period (importable by the tokenizer and TIGER benches).

    HF_HUB_OFFLINE=1 WANDB_MODE=offline .venv/bin/python bench/_baselines.py \
        [--data ../shared/data/office_products_2018_d3] [--epochs 50] [--out results.json]

Protocol: train on the train instances of ``train_periods`` (default period 0), select the epoch with the best
validation NDCG@10 (overall) of ``eval_period`` (early stopping with ``patience``), then test that checkpoint on
``eval_period``'s test instances. Items outside the catalogue known by the end of ``eval_period`` are never
recommended. The popularity list counts the same training targets. ``run_baselines`` returns one flat dict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "office_products_2018_d3"


def run_baselines(
    data_root: str | os.PathLike = DEFAULT_DATA,
    epochs: int = 50,
    *,
    train_periods: tuple[int, ...] = (0,),
    eval_period: int = 0,
    hidden: int = 64,
    num_layers: int = 2,
    dropout: float = 0.2,
    loss: str = "ce",
    lr: float = 1e-3,
    batch_size: int = 256,
    patience: int = 5,
    ks: tuple[int, ...] = (5, 10, 20),
    seed: int = 0,
    prepared_dir: str | None = None,
    cf_path: str | None = None,
    cf_dim: int | None = None,
    accelerator: str = "auto",
    per_instance: dict | None = None,
    modules: dict | None = None,
) -> dict:
    """Fit SASRec (Lightning) and evaluate it and the popularity list; returns flat float keys.

    Keys: ``sasrec/test/{recall,ndcg}@{k}/{overall,warm,cold,new}`` (and the other item metrics),
    ``popularity/test/...`` (same names), ``seconds/sasrec_fit``, ``sasrec/best_epoch``, ``sasrec/epochs_run``,
    ``sasrec/val/ndcg@10/overall`` (of the selected epoch). ``cf_path`` also writes the CF item table (.npy).
    ``per_instance`` (a dict) receives the per-instance test values of ``sasrec`` and ``popularity``; ``modules``
    the selected ``SASRecModule``.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from datamodules.sequences import SequenceDataModule
    from genrec.data.config import DataConfig
    from genrec.models.sasrec import SASRecConfig
    from lightning_modules.popularity import evaluate_popularity
    from lightning_modules.sasrec import SASRecModule

    L.seed_everything(seed, verbose=False)
    data = DataConfig(source="local", root=str(data_root), name=Path(data_root).name, seed=seed)
    dm = SequenceDataModule(data, prepared_dir=prepared_dir, train_periods=list(train_periods),
                            eval_period=eval_period, batch_size=batch_size, eval_batch_size=512)
    dm.setup("fit")
    out: dict[str, float] = {}
    tables: dict = {}
    out.update(evaluate_popularity(dm, ks=ks, splits=("test",), tables=tables))

    module = SASRecModule(SASRecConfig(hidden=hidden, num_layers=num_layers, dropout=dropout, loss=loss,
                                       max_len=data.max_history), lr=lr, ks=ks, cf_dim=cf_dim)
    monitor = "val/ndcg@10/overall"
    with tempfile.TemporaryDirectory(prefix="sasrec_bench_") as tmp:
        ckpt = ModelCheckpoint(dirpath=tmp, monitor=monitor, mode="max", save_top_k=1)
        stop = EarlyStopping(monitor=monitor, mode="max", patience=patience)
        trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                            callbacks=[ckpt, stop], enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        out["seconds/sasrec_fit"] = time.perf_counter() - t0
        best = SASRecModule.load_from_checkpoint(ckpt.best_model_path, weights_only=True)
        out["sasrec/best_epoch"] = float(torch_load_epoch(ckpt.best_model_path))
        out["sasrec/epochs_run"] = float(trainer.current_epoch)
        out["sasrec/val/ndcg@10/overall"] = float(ckpt.best_model_score)
        (res,) = trainer.test(best, datamodule=dm, verbose=False)
    out.update({f"sasrec/{k}": float(v) for k, v in res.items()})
    if modules is not None:
        modules["sasrec"] = best
    if per_instance is not None:
        per_instance["sasrec"] = best.per_instance.get("test")
        per_instance["popularity"] = tables.get("test")
    if cf_path:
        best.export_cf_embeddings(cf_path)
    return out


def torch_load_epoch(path: str) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--loss", default="ce", choices=["ce", "bce"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prepared-dir", default=None)
    ap.add_argument("--cf-path", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = run_baselines(a.data, a.epochs, hidden=a.hidden, dropout=a.dropout, loss=a.loss, lr=a.lr,
                        patience=a.patience, seed=a.seed, prepared_dir=a.prepared_dir, cf_path=a.cf_path)
    for sub in ("overall", "warm", "cold"):
        for k in (5, 10):
            print(f"recall@{k}/{sub:8s} sasrec {res[f'sasrec/test/recall@{k}/{sub}']:.4f}  "
                  f"popularity {res[f'popularity/test/recall@{k}/{sub}']:.4f}   "
                  f"ndcg@{k} sasrec {res[f'sasrec/test/ndcg@{k}/{sub}']:.4f}  "
                  f"popularity {res[f'popularity/test/ndcg@{k}/{sub}']:.4f}")
    print(f"sasrec fit {res['seconds/sasrec_fit']:.1f}s, best epoch {res['sasrec/best_epoch']:.0f}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, sort_keys=True))
    return res


if __name__ == "__main__":
    main()
