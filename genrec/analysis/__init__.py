"""MemGen analysis (specs/memgen.md §10): item relations, memorization/generalization labels, prefix n-gram
token memorization and the SASRec + TIGER adaptive ensemble. Pure numpy/torch; no Lightning import.

    rel = ItemRelations.from_chunks(train_chunks, num_items)          # §10.1
    labels = label_instances(rel, test_history, test_target)          # §10.2, (m, len(LABELS)) bool
    prel = PrefixRelations.from_relations(rel, sid_table)             # §10.3
    cats = token_categories(token_labels(prel, test_history, test_target))
    token_distribution(labels, cats, prel.num_lengths)
    evaluate_ensembles(val_inputs, test_inputs)                       # §10.4
"""

from genrec.analysis.ensemble import (
    ALPHA_GRID,
    K_GRID,
    TAU_GRID,
    Candidates,
    EnsembleInputs,
    adaptive_alpha,
    blend,
    candidates,
    evaluate_ensembles,
    hit_ndcg,
    minmax,
    msp_bins,
    rank_metrics,
    sasrec_msp,
    select_adaptive,
    select_fixed,
    target_rank,
)
from genrec.analysis.labels import (
    LABELS,
    LOGICS,
    label_instances,
    label_names,
    label_predictions,
    label_ratios,
    per_label_mean,
)
from genrec.analysis.relations import FAR, ItemRelations
from genrec.analysis.tokens import (
    NO_LABEL,
    UNSEEN,
    PrefixRelations,
    category_names,
    prefix_ids,
    token_categories,
    token_distribution,
    token_labels,
)

__all__ = [
    "ALPHA_GRID", "FAR", "K_GRID", "LABELS", "LOGICS", "NO_LABEL", "TAU_GRID", "UNSEEN",
    "Candidates", "EnsembleInputs", "ItemRelations", "PrefixRelations",
    "adaptive_alpha", "blend", "candidates", "category_names", "evaluate_ensembles", "hit_ndcg",
    "label_instances", "label_names", "label_predictions", "label_ratios", "minmax", "msp_bins",
    "per_label_mean", "prefix_ids", "rank_metrics", "sasrec_msp", "select_adaptive", "select_fixed",
    "target_rank", "token_categories", "token_distribution", "token_labels",
]
