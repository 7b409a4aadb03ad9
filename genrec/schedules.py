"""Learning-rate schedules: linear warm-up, then cosine / linear decay or constant — the `transformers` helpers
(one implementation for every trainer here, no hand-written lambdas)."""

from __future__ import annotations

import math
from typing import Literal

import torch


def warmup_schedule(optimizer: torch.optim.Optimizer, kind: Literal["cosine", "linear", "constant"],
                    warmup_steps: int, total_steps: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule; an unbounded run (``total_steps`` not finite) decays to nothing: warm-up, then flat."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup_steps = max(int(warmup_steps), 0)
    if kind == "constant" or not math.isfinite(total_steps):
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    total = max(int(total_steps), warmup_steps + 1)
    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, warmup_steps, total)
