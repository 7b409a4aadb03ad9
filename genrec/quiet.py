"""Quiet runs: third-party chatter off by default (``--verbose`` or ``GENREC_VERBOSE=1`` restores it).

What goes: W&B's console lines (``WANDB_SILENT``: the run folder is in our own last line), Lightning's info lines (GPU/TPU availability, the litlogger tip, "Seed set to", "`Trainer.fit` stopped"),
deprecation / future warnings of the libraries, Lightning's hints that do not apply to our setups (small log
interval, few dataloader workers, eval-mode submodules), the weight-loading bars of transformers and its "[INFO]
Running in WANDB offline mode" print. Our own progress bars and status lines, real warnings and errors stay;
warnings print on one line (no source line).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

_HINTS = (
    r".*does not have many workers.*",
    r".*smaller than the logging interval.*",
    r".*module\(s\) in eval mode.*",
    r".*LeafSpec.*",
    r".*`past_key_values` is deprecated.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*GPU available but not used.*",
    r".*The '.*_dataloader' does not have many workers.*",
    # our epoch metrics are torchmetrics states already reduced across ranks, so sync_dist would reduce twice
    r".*sync_dist=True.*when logging on epoch level in distributed setting.*",
)


def verbose_requested() -> bool:
    return os.environ.get("GENREC_VERBOSE", "") not in ("", "0", "false", "False")


def quiet_third_party(verbose: bool | None = None) -> None:
    if verbose if verbose is not None else verbose_requested():
        return
    # the child loggers that emit them: importing lightning resets its package loggers to INFO
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning_utilities.core.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for message in _HINTS:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.formatwarning = _one_line_warning
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}\n"


def quiet_stdout():
    """Context swallowing what a library prints to stdout on import (unless verbose)."""
    return contextlib.nullcontext() if verbose_requested() else contextlib.redirect_stdout(io.StringIO())
