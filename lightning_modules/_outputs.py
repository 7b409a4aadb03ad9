"""Stage outputs shared by the Lightning modules."""

from __future__ import annotations

from pathlib import Path

from genrec.files import atomic_write_json


def write_metrics_json(trainer, values: dict) -> Path | None:
    """Every test stage writes ``metrics.json`` with exactly its own logged keys (rank 0; in the run's own folder, else
    the logger's or the default root dir), replacing an earlier evaluation's file as a whole; empty subsets (NaN) are null."""
    if trainer is None:
        return None
    # Trainer.log_dir broadcasts under DDP: every rank must ask for it, or rank 0 waits forever.
    log_dir = trainer.log_dir
    root = Path(getattr(trainer, "genrec_run_dir", None) or log_dir or trainer.default_root_dir)  # the run's folder
    if not trainer.is_global_zero:
        return None
    return atomic_write_json(root / "metrics.json", values)
