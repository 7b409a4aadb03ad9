"""Popularity baseline evaluated with the same top-K lists and ``RankingMetrics`` as the learned models.

No training loop, so no LightningModule: counts come from the datamodule's training instances, the top-K list
is the same for every evaluation instance, and the metrics are the SASRec/TIGER ones.
"""

from __future__ import annotations

from genrec.metrics.ranking import SUBSETS
from genrec.models.popularity import PopularityRecommender
from lightning_modules.sasrec import item_metric_values, item_metrics, update_item_metrics

_LOADERS = {"val": "val_dataloader", "test": "test_dataloader"}


def popularity_recommender(dm) -> PopularityRecommender:
    """Counts over the targets of ``dm.train_instances()``, candidates = ``dm.catalogue()``."""
    return PopularityRecommender(dm.num_items, dm.train_instances().target, dm.catalogue())


def evaluate_popularity(dm, ks: tuple[int, ...] = (5, 10, 20), splits: tuple[str, ...] = ("test",),
                        tables: dict | None = None) -> dict:
    """Metrics of the most-popular list on the datamodule's evaluation split(s).

    Returns flat float keys ``popularity/{split}/{metric}@{k}/{subset}`` (e.g. ``popularity/test/recall@10/cold``);
    ``tables`` (a dict) receives each split's per-instance values (paired tests).
    """
    bad = [s for s in splits if s not in _LOADERS]
    if bad:
        raise ValueError(f"splits must be among {tuple(_LOADERS)}, got {bad}")
    dm.setup("test")
    rec = popularity_recommender(dm)
    out: dict[str, float] = {}
    for split in splits:
        metrics = item_metrics(tuple(ks), dm.num_items, getattr(dm, "subset_names", SUBSETS))
        for batch in getattr(dm, _LOADERS[split])():
            items = rec.top_k(max(ks), len(batch["target"]))
            update_item_metrics(metrics, items, batch["target"], batch["subsets"], batch["index"])
        out.update({f"popularity/{split}/{k}": float(v) for k, v in item_metric_values(metrics).items()})
        if tables is not None:
            tables[split] = metrics.per_instance_table()
    return out
