"""One folder per `genrec fit|validate|test|predict` run, holding its ``config.yaml`` and, for fit, ``best.ckpt``
and ``last.ckpt``: runs never overwrite each other's config, and the checkpoint a user wants has a name they can
type without looking it up."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback


def run_folder_name(trainer, stage: str) -> Path:
    """Rank 0 names the folder, every rank gets the same: the logger's own versioned folder (CSV / TensorBoard),
    else ``<default_root_dir>/<stage>-<W&B run id>`` or ``<stage>-<timestamp>`` (no logger)."""
    from lightning.pytorch.loggers import WandbLogger

    path = None
    if trainer.is_global_zero:
        logger = trainer.logger
        root = Path(trainer.default_root_dir)
        if logger is None:
            path = root / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        elif isinstance(logger, WandbLogger):
            path = root / f"{stage}-{logger.experiment.id}"
        else:
            path = Path(logger.log_dir) if getattr(logger, "log_dir", None) else root / f"{stage}-{logger.version}"
        path = _unique(path)
    return Path(trainer.strategy.broadcast(str(path) if path is not None else None))


def _unique(path: Path) -> Path:
    if not (path / "config.yaml").exists():
        return path
    k = 1
    while (path.parent / f"{path.name}-{k}" / "config.yaml").exists():
        k += 1
    return path.parent / f"{path.name}-{k}"


class RunFolderConfig(SaveConfigCallback):
    """LightningCLI's config saver, writing into the run's own folder and pointing every ModelCheckpoint that has
    no ``dirpath`` there (``best.ckpt`` when it keeps one model, ``last.ckpt`` with ``save_last``)."""

    run_dir: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        self.run_dir = run_folder_name(trainer, str(getattr(stage, "value", stage)))
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(self.run_dir)
                if cb.filename is None and cb.save_top_k == 1:
                    # the monitored best, or (no monitor: Lightning's default callback) simply the latest epoch
                    cb.filename = "best" if cb.monitor is not None else "last"
        if trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(self.run_dir / self.config_filename), skip_none=False,
                             overwrite=True, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)
