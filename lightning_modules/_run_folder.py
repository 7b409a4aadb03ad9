"""One folder per `genrec fit|validate|test|predict` run, holding its ``config.yaml``, its ``metrics.json`` and, for
fit, ``best.ckpt`` (with a monitored ModelCheckpoint) and ``last.ckpt``: runs never overwrite each other's files,
and the checkpoint a user wants has a name they can type without looking it up."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

CONFIG = "config.yaml"


def _claim(path: Path) -> Path:
    """Create ``path`` (or ``path-1``, ``path-2`` …) atomically: two runs started in the same second never share."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(10_000):
        candidate = path if k == 0 else path.parent / f"{path.name}-{k}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder next to {path}")


def _resumed_folder(ckpt, stage: str) -> Path | None:
    """A fit resumed from one of our checkpoints continues in that checkpoint's folder (its best-model state and
    early-stopping state refer to it)."""
    if stage != "fit" or not ckpt or not Path(str(ckpt)).is_file():
        return None
    folder = Path(str(ckpt)).parent
    return folder if (folder / CONFIG).exists() else None


def run_folder(trainer, stage: str, ckpt_path=None) -> Path:
    """Rank 0 chooses, every rank gets the same folder: a resumed fit's own folder; else the logger's versioned
    folder (CSV / TensorBoard); else a new ``<default_root_dir>/<stage>-<W&B run id | timestamp>``."""
    from lightning.pytorch.loggers import WandbLogger

    path = None
    if trainer.is_global_zero:
        logger = trainer.logger
        root = Path(trainer.default_root_dir)
        path = _resumed_folder(ckpt_path, stage)
        if path is None and logger is not None and not isinstance(logger, WandbLogger) and getattr(
                logger, "log_dir", None):
            path = Path(logger.log_dir)  # the logger writes its metrics there: keep config and checkpoints with them
            path.mkdir(parents=True, exist_ok=True)
        elif path is None:
            name = logger.experiment.id if isinstance(logger, WandbLogger) else time.strftime("%Y%m%d-%H%M%S")
            path = _claim(root / f"{stage}-{name}")
    return Path(trainer.strategy.broadcast(str(path) if path is not None else None))


def _free_config_name(folder: Path) -> Path:
    """``config.yaml``, or ``config-<k>.yaml`` when the folder already holds one (a resumed fit, a pinned version)."""
    path, k = folder / CONFIG, 1
    while path.exists():
        path, k = folder / f"config-{k}.yaml", k + 1
    return path


def name_checkpoints(callbacks, folder: Path) -> None:
    """Point ModelCheckpoints without a ``dirpath`` at the run folder; a monitored top-1 callback saves
    ``best.ckpt``, an unmonitored one without ``save_last`` ``last.ckpt`` (Lightning's default callback);
    ``save_last`` writes ``last.ckpt`` itself."""
    mine = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath is None]
    monitored = [cb for cb in mine if cb.monitor is not None and cb.save_top_k == 1 and cb.filename is None]
    for cb in mine:
        # realpath, as ModelCheckpoint does with a dirpath of its own: a resumed fit must find the same string, or
        # Lightning drops the callback's best-model state and versions the file names
        cb.dirpath = os.path.realpath(folder)
        if cb.filename is not None or cb.save_top_k != 1:
            continue
        if cb.monitor is not None:
            # several monitored callbacks: best-<metric>.ckpt each, so one never shadows the other
            cb.filename = "best" if len(monitored) == 1 else "best-" + cb.monitor.replace("/", "_")
        elif not cb.save_last:
            cb.filename = "last"


class RunFolderConfig(SaveConfigCallback):
    """LightningCLI's config saver, writing into the run's own folder and pointing its checkpoints there."""

    run_dir: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        ckpt = self.config.get("ckpt_path") if hasattr(self.config, "get") else None
        self.run_dir = run_folder(trainer, str(getattr(stage, "value", stage)), ckpt)
        trainer.genrec_run_dir = self.run_dir  # metrics.json and the final line read it
        name_checkpoints(trainer.callbacks, self.run_dir)
        if trainer.is_global_zero:
            self.parser.save(self.config, str(_free_config_name(self.run_dir)), skip_none=False, overwrite=True,
                             multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)


def latest_checkpoint(root: str | os.PathLike, name: str) -> Path | None:
    """The newest ``<name>.ckpt`` under ``root`` (the run folders of earlier fits)."""
    found = [p for p in Path(root).rglob(f"{name}.ckpt") if p.is_file()] if Path(root).is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
