"""Where work outside a Trainer runs: Lightning moves a module back to the CPU after every fit / validate / test,
so edits, validation sweeps and diagnostics between Trainer calls move it to the accelerator themselves."""

from __future__ import annotations

import torch


def accelerator_device(accelerator: str = "auto") -> torch.device:
    want_gpu = accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if want_gpu and torch.cuda.is_available() else "cpu")
