"""Finishing a W&B run the way its users expect: summary metrics, and the run's `files/` folder holding
``config.yaml`` and ``wandb-summary.json`` (offline runs of recent W&B keep both only inside the .wandb file)."""

from __future__ import annotations

import json
from pathlib import Path

from genrec.files import atomic_write_text, jsonable


def finish_wandb(logger, summary: dict | None = None) -> None:
    """Set ``summary`` on the run, finish it cleanly (no abandoned handle) and leave the two files in `files/`."""
    import yaml

    run = logger.experiment
    files = Path(run.dir)
    summary = jsonable(dict(summary or {}))
    for key, value in summary.items():
        run.summary[key] = value
    config = {k: {"value": v} for k, v in jsonable(dict(run.config)).items()}
    run.finish()
    if not (files / "config.yaml").exists():
        atomic_write_text(files / "config.yaml", yaml.safe_dump(config, sort_keys=True))
    if not (files / "wandb-summary.json").exists():
        atomic_write_text(files / "wandb-summary.json", json.dumps(summary, indent=1, sort_keys=True))
