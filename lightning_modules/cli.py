"""LightningCLI for `genrec fit|validate|test|predict` (subclass mode: any module / datamodule by class path)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

# Import the shipped modules so short class names (e.g. `--model TigerModule`) resolve.
import datamodules.item_embeddings
import datamodules.sequences  # noqa: F401
import lightning_modules.rqvae
import lightning_modules.tiger  # noqa: F401


def _optional_imports() -> None:
    import importlib

    for name in ("lightning_modules.sasrec", "lightning_modules.dact"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def run_lightning_cli(argv: list[str]) -> LightningCLI:
    _optional_imports()
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
        args=argv,
        seed_everything_default=0,
    )
