"""Evaluation metrics (torchmetrics ``Metric`` classes; no Lightning imports)."""

from genrec.metrics.diversity import (
    DiversityMetrics,
    coverage,
    distinct_first_codes,
    intra_list_diversity,
    item_popularity,
    novelty,
)
from genrec.metrics.ranking import RankingMetrics, dedup_ranked, first_hit_rank, prefix_keys

__all__ = [
    "DiversityMetrics", "RankingMetrics", "coverage", "dedup_ranked", "distinct_first_codes", "first_hit_rank",
    "intra_list_diversity", "item_popularity", "novelty", "prefix_keys",
]
