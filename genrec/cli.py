"""`genrec` entry point.

* ``genrec prepare --config configs/data/<name>.yaml [--data.root DIR] --output_dir DIR``: prepared dataset folder.
* ``genrec fit|validate|test|predict --config ...``: LightningCLI (the Lightning layer lives outside ``genrec/``;
  it is imported only for these subcommands).
* ``genrec demo`` / ``genrec continual`` / ``genrec edit``: orchestration in the top-level ``runners`` package.
"""

from __future__ import annotations

import os
import sys

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Orchestration commands live in the top-level `runners` package (they drive Lightning Trainers).
RUNNER_SUBCOMMANDS = ("demo", "continual", "edit")


def prepare_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from genrec.data.config import DataConfig

    parser = ArgumentParser(prog="genrec prepare", description="Load, split and write a prepared dataset folder.",
                            default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with `data:` (and optionally `output_dir:`)")
    parser.add_class_arguments(DataConfig, "data", help="Data source, protocol and text settings")
    parser.add_argument("--output_dir", type=str, required=True, help="Folder to write (replaced atomically)")
    parser.add_argument("--embed", type=bool, default=False,
                        help="Also compute item text embeddings (cached) and store items_embeddings.npy")
    return parser


def run_prepare(argv: list[str]) -> dict:
    import json

    import numpy as np

    from genrec.data.pipeline import item_embeddings, prepare

    parser = prepare_parser()
    cfg = parser.parse_args(argv)
    data_cfg = parser.instantiate_classes(cfg).data
    ds = prepare(data_cfg)
    out = ds.save(cfg.output_dir)
    if cfg.embed:
        emb = item_embeddings(ds)
        tmp = out / "item_embeddings.tmp.npy"
        np.save(tmp, emb)
        os.replace(tmp, out / "item_embeddings.npy")
    stats = ds.stats()
    print(f"prepared {stats['name']}: {stats['num_interactions']:,} interactions, {stats['num_users']:,} users, "
          f"{stats['num_items']:,} items → {out}")
    header = f"{'period':>6} {'inter.':>8} {'new items':>9} {'train':>7} {'valid':>6} {'test':>6} {'cold test':>9}"
    print(header)
    for p in stats["periods"]:
        print(f"{p['period']:>6} {p['num_interactions']:>8,} {p['num_new_items']:>9} {p['num_train']:>7} "
              f"{p['num_valid']:>6} {p['num_test']:>6} {p['num_cold_test']:>9}")
    removed = {k: v for k, v in stats["preprocessing"].items() if k.startswith("removed") and v}
    if removed or stats["items_text_fallback"]:
        print("removed / fell back:", json.dumps({**removed, "items_text_fallback": stats["items_text_fallback"]}))
    return stats


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else None
    if cmd == "prepare":
        run_prepare(argv[1:])
    elif cmd in RUNNER_SUBCOMMANDS:
        import importlib

        importlib.import_module(f"runners.{cmd}").main(argv[1:])
    else:
        from lightning_modules.cli import run_lightning_cli

        run_lightning_cli(argv)


if __name__ == "__main__":
    main()
