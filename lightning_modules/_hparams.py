"""Hyper-parameters as plain types (checkpoints load with ``weights_only=True``) plus the class path that
LightningCLI needs to re-parse them from a checkpoint (`genrec validate --ckpt_path ...` in subclass mode)."""

from __future__ import annotations


def save_plain_hparams(module, values: dict) -> None:
    cls = type(module)
    module.save_hyperparameters({**values, "_class_path": f"{cls.__module__}.{cls.__qualname__}"})
