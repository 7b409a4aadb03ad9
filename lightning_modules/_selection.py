"""Epoch selection on validation, shared by the continual runner and the edit benchmark's baselines: train, keep
the epoch with the best validation metric, and for a fine-tune keep the starting point when no epoch beats it
(so a baseline never reports a model that validation would have rejected)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch


def monitor_key(ks, subset: str = "overall") -> str:
    k = 10 if 10 in tuple(ks) else max(ks)
    return f"val/recall@{k}/{subset}"


def fit_selecting_on_val(make_trainer: Callable, module, folder: Path, *, epochs: int, from_scratch: bool,
                         monitor: str, val_loader, every: int = 1, datamodule=None, train_loader=None,
                         device: torch.device | None = None) -> int:
    """Fit ``module`` for ``epochs`` validating every ``every`` epochs; load the best state and return the chosen
    epoch (0 = the starting point of a fine-tune). ``make_trainer(check_val_every_n_epoch=…, callbacks=[…])``
    builds the Trainer; ``folder`` holds the selection's checkpoint and is removed afterwards."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    start = start_state = None
    if not from_scratch:
        if device is not None:
            module = module.to(device)
        start = module.evaluate_loader(val_loader).get(monitor)
        start_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    every = max(min(every, epochs), 1)
    ckpt = ModelCheckpoint(dirpath=str(folder), monitor=monitor, mode="max", save_top_k=1, save_weights_only=True)
    trainer = make_trainer(check_val_every_n_epoch=every, callbacks=[ckpt])
    if datamodule is not None:
        trainer.fit(module, datamodule=datamodule)
    else:
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    best = None if ckpt.best_model_score is None else float(ckpt.best_model_score)
    last = None
    if epochs % every and trainer.current_epoch == epochs:
        # the last epoch fell between validations: score it too, so it can be chosen like any other
        last = float(trainer.validate(module, dataloaders=val_loader, verbose=False)[0][monitor])
    candidates = {"start": start, "best": best, "last": last}
    choice = max((k for k, v in candidates.items() if v is not None), key=lambda k: candidates[k], default="last")
    if choice == "start":  # ties go to the start: training never beat it on validation
        module.load_state_dict(start_state)
        chosen = 0
    elif choice == "best":
        saved = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(saved["state_dict"])
        chosen = int(saved["epoch"]) + 1
    else:  # the module as trained: the unvalidated last epoch, or no validation at all
        chosen = epochs
    trainer.strategy.barrier("genrec-selection")  # every rank has read the checkpoint before rank 0 removes it
    if trainer.is_global_zero:
        shutil.rmtree(folder, ignore_errors=True)
    return chosen
