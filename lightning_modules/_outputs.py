"""Stage outputs shared by the Lightning modules."""

from __future__ import annotations

import json
from pathlib import Path


def write_metrics_json(trainer, values: dict) -> None:
    """Every stage writes metrics.json with the logged keys (rank 0, in the logger's or default root dir)."""
    if trainer is None:
        return
    # Trainer.log_dir broadcasts under DDP: every rank must ask for it, or rank 0 waits forever.
    root = Path(trainer.log_dir or trainer.default_root_dir)
    if not trainer.is_global_zero:
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / "metrics.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(values)
    path.write_text(json.dumps(old, indent=1, sort_keys=True))
