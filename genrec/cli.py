"""`genrec` entry point: one dispatcher for every subcommand, one-line user errors.

A user error (``genrec.errors.GenrecError``: bad data, config, checkpoint or output path; or a bad argument) prints
one line ``genrec <command>: error: …`` on stderr, after any W&B banner, and exits with 2 (arguments and config)
or 1 (data, files, checkpoints). ``--debug`` (anywhere on the command line) or ``GENREC_DEBUG=1`` shows the
traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from genrec.errors import ConfigError, GenrecError

# name → (module:function, one-line description). Lightning subcommands run through LightningCLI; the others
# are jsonargparse parsers in genrec.cli and the top-level `runners` package (they drive Trainers).
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("genrec.cli:run_prepare", "load, split and write a prepared dataset folder"),
    "fit": ("lightning_modules.cli:run_lightning_cli", "train a model (LightningCLI: --model, --data, --trainer)"),
    "validate": ("lightning_modules.cli:run_lightning_cli", "evaluate on the validation split"),
    "test": ("lightning_modules.cli:run_lightning_cli", "evaluate on the test split (writes metrics.json)"),
    "predict": ("lightning_modules.cli:run_lightning_cli", "top-K recommendations per user to a file"),
    "continual": ("runners.continual:main", "the continual-period loop (DACT, fine-tuning, GenRecEdit)"),
    "edit": ("runners.edit:main", "inject cold-start items into a TIGER checkpoint (GenRecEdit)"),
    "analyze": ("runners.analyze:main", "MemGen memorization/generalization analysis and the TIGER+SASRec ensemble"),
    "report": ("runners.report:main", "report.html with figures of a continual run, a folder of runs or an edit"),
    "demo": ("runners.demo:main", "the main job end to end on the synthetic catalogue (offline, CPU)"),
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def usage() -> str:
    from genrec import __version__

    lines = [f"usage: genrec <command> [--help] [options]     (genrec {__version__})", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`genrec <command> --help` lists every option with its default and doc.",
              "--config FILE: input paths in FILE (data.root, reviews_path, ckpt_path, …) are relative to FILE;",
              "outputs (default_root_dir, output_dir, prepared_dir, …) and command-line paths to the current folder.",
              "--debug (or GENREC_DEBUG=1) shows the traceback of an error;",
              "--verbose (or GENREC_VERBOSE=1) keeps third-party log lines and warnings; --version the version."]
    return "\n".join(lines)


def prepare_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from genrec.data.config import DataConfig

    parser = ArgumentParser(prog="genrec prepare", description="Load, split and write a prepared dataset folder.",
                            default_env=False, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with `data:` (and optionally `output_dir:`)")
    parser.add_class_arguments(DataConfig, "data", help="Data source, protocol and text settings")
    parser.add_argument("--output_dir", type=str, required=True,
                        help="Folder to write (staged and renamed: never half-written). It must be new, empty or an "
                             "earlier prepared folder (then --overwrite true); never the data root or the current "
                             "directory")
    parser.add_argument("--overwrite", type=bool, default=False, help="Replace an earlier prepared folder")
    parser.add_argument("--embed", type=bool, default=False,
                        help="Also compute item text embeddings (cached) and store item_embeddings.npy")
    return parser


def run_prepare(argv: list[str]) -> dict:
    import json

    from genrec.data.pipeline import item_embeddings, prepare
    from genrec.files import check_not_protected, claim_dir

    parser = prepare_parser()
    cfg = parser.parse_args(argv)
    data_cfg = parser.instantiate(cfg).data
    # refuse the output folder before reading any data
    check_not_protected(cfg.output_dir, (data_cfg.root,), "prepared folder")
    claim_dir(cfg.output_dir, "prepared", overwrite=cfg.overwrite, protected=(data_cfg.root,), what="prepared folder")
    ds = prepare(data_cfg)
    emb = item_embeddings(ds) if cfg.embed else None
    out = ds.save(cfg.output_dir, overwrite=cfg.overwrite, embeddings=emb)
    stats = ds.stats()
    print(f"prepared {stats['name']}: {stats['num_interactions']:,} interactions, {stats['num_users']:,} users, "
          f"{stats['num_items']:,} items")
    header = f"{'period':>6} {'inter.':>8} {'new items':>9} {'train':>7} {'valid':>6} {'test':>6} {'cold test':>9}"
    print(header)
    for p in stats["periods"]:
        print(f"{p['period']:>6} {p['num_interactions']:>8,} {p['num_new_items']:>9} {p['num_train']:>7} "
              f"{p['num_valid']:>6} {p['num_test']:>6} {p['num_cold_test']:>9}")
    removed = {k: v for k, v in stats["preprocessing"].items()
               if k.startswith(("removed", "ratings_")) and v}
    if removed or stats["items_text_fallback"]:
        print("removed / fell back:", json.dumps({**removed, "items_text_fallback": stats["items_text_fallback"]}))
    print(f"→ {out}")
    return stats


def _resolve(target: str):
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def user_error(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc`` (itself or its explicit cause: frameworks wrap exceptions), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (GenrecError, argparse.ArgumentError)):
            return exc
        # only an explicit cause (`raise Wrapper(...) from user_error`): an error raised while *handling* a user
        # error is a bug of its own and keeps its traceback
        exc = exc.__cause__
    return None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _finish_wandb() -> None:
    """Close an active W&B run first, so its banner does not bury the error line."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        with contextlib.suppress(Exception):  # the user's error matters more than W&B's teardown
            wandb.finish(exit_code=1, quiet=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("GENREC_DEBUG", "") not in ("", "0", "false", "False")
    if "--verbose" in argv:
        os.environ["GENREC_VERBOSE"] = "1"
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from genrec import __version__

        print(f"genrec {__version__}")
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"genrec: error: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)} (genrec --help)",
              file=sys.stderr)
        return 2
    from genrec.quiet import quiet_third_party

    quiet_third_party()
    fn = _resolve(COMMANDS[cmd][0])
    try:
        from genrec.config_paths import resolve_config_args

        argv = resolve_config_args(argv)  # paths in a config file are relative to that file
        fn(argv if cmd in LIGHTNING_SUBCOMMANDS else argv[1:])
    except SystemExit as exc:  # --help, or a parser that exits by itself
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except BaseException as exc:
        err = user_error(exc)
        if err is None or debug:
            raise
        _finish_wandb()
        print(f"genrec {cmd}: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, (ConfigError, argparse.ArgumentError)) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
