"""Training losses that mean the same under N processes as under one.

DDP averages gradients over ranks. With ``GlobalBatchSampler`` the ranks' local batches of a step together form the
one-process batch, but a rank's mean loss weighs its rows by 1/n_rank, not 1/n_global: local batches differ in size
(a global batch not divisible by N, padding rows). Scaling a rank's mean by n_rank · N / n_global makes the averaged
gradient the gradient of the mean over the global batch — the one-process step."""

from __future__ import annotations

import torch


def real_rows(batch: dict) -> torch.Tensor | None:
    """Bool mask of the batch's real rows, or None when every row is real (``GlobalBatchSampler`` pads with
    weight 0)."""
    w = batch.get("weight")
    if w is None or bool((w > 0).all()):
        return None
    return w > 0


def select_rows(batch: dict, rows: torch.Tensor | None) -> dict:
    """The batch restricted to ``rows``; a rank with only padding keeps its rows (its loss is then scaled by 0)."""
    if rows is None or not bool(rows.any()):
        return batch
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == rows.shape else v for k, v in batch.items()}


def global_mean(module, loss: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """``loss`` = the mean over this rank's ``count`` units (rows, tokens, positions) → the loss whose DDP-averaged
    gradient is that of the mean over every rank's units. One scalar all-reduce per step; identity in one process."""
    trainer = module._trainer
    if trainer is None or trainer.world_size <= 1:
        return loss
    count = torch.as_tensor(count, dtype=torch.float32, device=loss.device)
    total = trainer.strategy.reduce(count.clone(), reduce_op="sum")
    return loss * (count * trainer.world_size / total.clamp(min=1.0))
