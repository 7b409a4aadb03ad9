"""Shared benchmark plumbing: the standard arguments, a flat JSON writer and a readable table."""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "office_products_2018_d3")


def parser(description: str) -> argparse.ArgumentParser:
    from genrec.quiet import quiet_third_party

    quiet_third_party()  # the tables, not the libraries' chatter (GENREC_VERBOSE=1 restores it)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=DEFAULT_DATA, help="dataset folder in the canonical layout")
    p.add_argument("--out", default=None, help="JSON file to write (flat keys)")
    p.add_argument("--full", action="store_true", help="paper-scale settings (slow on CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p


def report(results: dict, out: str | None, title: str) -> None:
    width = max(len(k) for k in results) + 2
    print(f"\n{title}\n" + "-" * (width + 16))
    for k, v in results.items():
        shown = f"{v:.4f}" if isinstance(v, float) else str(v)
        print(f"{k:<{width}}{shown:>16}")
    if out:
        from genrec.files import atomic_write_json

        atomic_write_json(out, results, sort_keys=False)  # strict JSON: NaN (an empty subset) is null
        print(f"→ {out}")


class PeakRSS:
    """Peak resident set size (MB) of this process while the block runs, sampled every 20 ms from /proc/self/statm;
    ``peak_anon`` is the peak of the part not backed by files (resident - shared: what no other process can share)."""

    def __enter__(self):
        self.start, self.start_anon = self._rss()
        self.peak, self.peak_anon = self.start, self.start_anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self._sample()

    def _sample(self):
        rss, anon = self._rss()
        self.peak, self.peak_anon = max(self.peak, rss), max(self.peak_anon, anon)

    @staticmethod
    def _rss() -> tuple[float, float]:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        page = os.sysconf("SC_PAGE_SIZE") / 2**20
        return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
