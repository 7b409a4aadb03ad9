"""Progress a person can follow: Lightning's bar on a terminal, a steady status line in redirected logs."""

from __future__ import annotations

import sys
import time

import lightning as L


def on_terminal() -> bool:
    return sys.stdout.isatty()


class StatusLine(L.Callback):
    """One line per ~10% of the epochs (at least every 30 s): ``[label] epoch 12/40 train/loss 3.21 (41s)``."""

    def __init__(self, label: str, min_seconds: float = 30.0) -> None:
        self.label, self.min_seconds = label, min_seconds
        self._start = self._last = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch, total = trainer.current_epoch + 1, max(trainer.max_epochs or 1, 1)
        now = time.perf_counter()
        step = max(total // 10, 1)
        if epoch == total or epoch % step == 0 or now - self._last >= self.min_seconds:
            loss = trainer.callback_metrics.get("train/loss")
            shown = f" train/loss {float(loss):.4f}" if loss is not None else ""
            print(f"[{self.label}] epoch {epoch}/{total}{shown} ({now - self._start:.0f}s)", flush=True)
            self._last = now


def progress_kwargs(label: str) -> dict:
    """Trainer kwargs: the progress bar on a terminal, else a status-line callback."""
    if on_terminal():
        return {"enable_progress_bar": True, "callbacks": []}
    return {"enable_progress_bar": False, "callbacks": [StatusLine(label)]}
