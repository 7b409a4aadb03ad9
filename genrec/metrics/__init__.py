"""Evaluation metrics (torchmetrics ``Metric`` classes; no Lightning imports)."""

from genrec.metrics.ranking import RankingMetrics, dedup_ranked, first_hit_rank, prefix_keys

__all__ = ["RankingMetrics", "dedup_ranked", "first_hit_rank", "prefix_keys"]
