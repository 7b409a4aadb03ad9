"""LightningCLI for `genrec fit|validate|test|predict` (subclass mode: any module / datamodule by class path).

Run as ``genrec fit …`` or ``python -m lightning_modules.cli fit …``. Bad arguments raise (one line through
``genrec.cli``) instead of printing the usage; a ``--ckpt_path`` is read (``weights_only=True``) and checked to be a
Lightning checkpoint of the chosen model before anything else runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

# Import the shipped modules so short class names (e.g. `--model TigerModule`) resolve.
import datamodules.item_embeddings
import datamodules.sequences  # noqa: F401
import lightning_modules.rqvae
import lightning_modules.tiger  # noqa: F401
from genrec.checkpoints import read_checkpoint
from genrec.errors import ConfigError
from lightning_modules._run_folder import RunFolderConfig, latest_checkpoint

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _optional_imports() -> None:
    import importlib

    for name in ("lightning_modules.sasrec", "lightning_modules.dact"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


class GenrecCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        # LightningCLI warns whenever args and sys.argv both exist: `genrec fit …` always has both.
        from genrec.config_paths import resolve_config_args

        argv = list(args) if isinstance(args, (list, tuple)) else (sys.argv[1:] if args is None else None)
        # paths in a config file are relative to that file (also when GenrecCLI is used as a library)
        self.config = parser.parse_args(resolve_config_args(argv) if argv is not None else args)
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt in ("best", "last"):
            # Lightning looks for these before any run folder is known; ours live in <default_root_dir>/<run>/
            root = self.config[sub].get("trainer", {}).get("default_root_dir") or "."
            found = latest_checkpoint(root, ckpt)
            if found is None:
                raise ConfigError(f"--ckpt_path {ckpt}: no {ckpt}.ckpt under {root} (the run folders of earlier "
                                  "fits); pass the checkpoint's path")
            self.config[sub]["ckpt_path"] = str(found)
            print(f"--ckpt_path {ckpt}: {found}")
            ckpt = str(found)
        if ckpt and ckpt not in ("hpc", "registry") and not str(ckpt).startswith("registry:"):
            if not Path(ckpt).is_file():
                read_checkpoint(ckpt)  # raises "file not found"
            model = self.config[sub].get("model")
            cls = getattr(model, "class_path", None) if model is not None else None
            read_checkpoint(ckpt, expect=str(cls).rsplit(".", 1)[-1] if cls else None)

    def _finish_loggers(self) -> None:
        from lightning.pytorch.loggers import WandbLogger

        from lightning_modules._wandb import finish_wandb

        trainer = self.trainer
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                summary = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
                finish_wandb(logger, summary)
        folder = getattr(trainer, "genrec_run_dir", None)
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            print(f"outputs: {folder or log_dir or trainer.default_root_dir}")

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "best_model_path", "") and self.trainer.is_global_zero:
            print(f"best checkpoint: {ckpt.best_model_path}")
        self._finish_loggers()

    after_validate = after_test = after_predict = _finish_loggers


def run_lightning_cli(argv: list[str]) -> LightningCLI:
    _optional_imports()
    no_exit = {"exit_on_error": False}
    return GenrecCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunFolderConfig,  # config.yaml, best.ckpt, last.ckpt in one folder per run
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False, **no_exit, **{s: dict(no_exit) for s in SUBCOMMANDS}},
        args=argv,
        seed_everything_default=0,
    )


if __name__ == "__main__":
    from genrec.cli import main

    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        print(f"usage: python -m lightning_modules.cli {{{','.join(SUBCOMMANDS)}}} [options]  (same as `genrec fit …`)",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
