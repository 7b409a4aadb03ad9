"""The MemGen analysis of one trained model pair on one evaluation period (specs/memgen.md §10), from plain arrays.

``analyze(train_history, train_target, val, test, sid_table, num_items)`` builds the relations of the model's
training instances, labels every validation and test case, and returns flat keys (the bench / W&B contract) and
tables: per label the share of cases and TIGER / SASRec / ensemble NDCG@10 and recall@10 (``labels``), the token
categories of the item-level generalization cases (``tokens``), the ensemble selection (``ensemble``), the MSP
bins (``msp_bins``) and the label distribution of TIGER's and SASRec's top-10 predictions (``predictions``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from genrec.analysis.ensemble import (
    EnsembleInputs,
    adaptive_alpha,
    evaluate_ensembles,
    hit_ndcg,
    msp_bins,
    rank_metrics,
    target_rank,
)
from genrec.analysis.labels import label_instances, label_names, label_predictions, label_ratios
from genrec.analysis.relations import ItemRelations
from genrec.analysis.tokens import (
    PrefixRelations,
    category_names,
    token_categories,
    token_distribution,
    token_labels,
)

MODELS = ("tiger", "sasrec", "ensemble_fixed", "ensemble_adaptive")


@dataclass
class SplitOutputs:
    """Both models' outputs on one split's cases."""

    history: np.ndarray  # (m, N) left-padded with -1
    target: np.ndarray  # (m,)
    tiger_items: np.ndarray  # (m, Nt) beam items, -1 = invalid / empty
    tiger_scores: np.ndarray  # (m, Nt) beam scores (log-prob)
    sasrec_items: np.ndarray  # (m, Ns)
    sasrec_scores: np.ndarray  # (m, Ns) logits
    msp: np.ndarray  # (m,) SASRec max softmax probability over the whole item vocabulary

    def ensemble_inputs(self) -> EnsembleInputs:
        return EnsembleInputs(self.sasrec_items, self.sasrec_scores, self.tiger_items, self.tiger_scores, self.msp,
                              self.target)


def _per_label(labels: np.ndarray, names, values: np.ndarray) -> dict[str, float]:
    return {name: float(values[labels[:, j]].mean()) if labels[:, j].any() else float("nan")
            for j, name in enumerate(names)}


def analyze(train_history: np.ndarray, train_target: np.ndarray, val: SplitOutputs, test: SplitOutputs, sid_table,
            num_items: int, max_hop: int = 4, k: int = 10) -> tuple[dict, dict]:
    """(flat metrics, tables) of the MemGen analysis; see the module docstring."""
    flat: dict = {}
    t0 = time.perf_counter()
    rel = ItemRelations.from_instances(train_history, train_target, num_items, max_hop)
    flat["seconds/relations"] = time.perf_counter() - t0
    names = label_names(max_hop)
    t0 = time.perf_counter()
    labels = label_instances(rel, test.history, test.target)
    val_labels = label_instances(rel, val.history, val.target)
    flat["seconds/labels"] = time.perf_counter() - t0
    flat["memgen/instances_per_second"] = (len(test.target) + len(val.target)) / max(flat["seconds/labels"], 1e-9)
    flat.update({f"memgen/ratio/{n}": v for n, v in label_ratios(labels, max_hop).items()})
    flat["memgen/count/cases"] = float(len(test.target))

    t0 = time.perf_counter()
    ens = evaluate_ensembles(val.ensemble_inputs(), test.ensemble_inputs(), k=k)
    flat["seconds/ensemble"] = time.perf_counter() - t0
    flat["ensemble_fixed/alpha"], flat["ensemble_adaptive/k"] = ens["fixed/alpha"], ens["adaptive/k"]
    flat["ensemble_adaptive/tau"] = ens["adaptive/tau"]
    per_case = _per_case_metrics(test, ens, k)

    tables: dict = {"labels": [], "msp_bins": {}, "predictions": {},
                    "per_case_ndcg": {m: ndcg for m, (_, ndcg) in per_case.items()}}  # paired tests over seeds
    for model, (hit, ndcg) in per_case.items():
        ndcg_by = _per_label(labels, names, ndcg)
        hit_by = _per_label(labels, names, hit)
        flat[f"{model}/test/ndcg@{k}/overall"], flat[f"{model}/test/recall@{k}/overall"] = (
            float(ndcg.mean()), float(hit.mean()))
        for n in names:
            flat[f"{model}/test/ndcg@{k}/{n}"], flat[f"{model}/test/recall@{k}/{n}"] = ndcg_by[n], hit_by[n]
    for j, n in enumerate(names):
        row = {"label": n, "count": int(labels[:, j].sum()), "ratio": flat[f"memgen/ratio/{n}"]}
        row.update({f"{m}/ndcg@{k}": flat[f"{m}/test/ndcg@{k}/{n}"] for m in MODELS})
        tables["labels"].append(row)
    flat["memgen/val_ratio/memorization"] = float(val_labels[:, 0].mean()) if len(val_labels) else float("nan")

    tables["tokens"] = _tokens(rel, sid_table, test, labels, max_hop, flat)
    bins = msp_bins(test.msp, labels[:, 0], per_case["sasrec"][1], per_case["tiger"][1])
    tables["msp_bins"] = {key: np.asarray(v).tolist() for key, v in bins.items() if key != "bin"}
    flat["memgen/msp_bins/correlation"] = float(bins["correlation"])
    for model, items in (("tiger", test.tiger_items), ("sasrec", test.sasrec_items)):
        pred = label_predictions(rel, test.history, items[:, :k]).reshape(-1, len(names))
        shares = label_ratios(pred, max_hop)
        tables["predictions"][model] = shares
        flat.update({f"memgen/prediction_ratio/{model}/{n}": v for n, v in shares.items()
                     if n in ("memorization", "generalization", "uncategorized")})
    tables["ensemble"] = {key: flat[key] for key in ("ensemble_fixed/alpha", "ensemble_adaptive/k",
                                                     "ensemble_adaptive/tau")}
    return flat, tables


def _per_case_metrics(test: SplitOutputs, ens: dict, k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    cands = test.ensemble_inputs().candidates()
    alphas = {"ensemble_fixed": ens["fixed/alpha"],
              "ensemble_adaptive": adaptive_alpha(test.msp, ens["adaptive/k"], ens["adaptive/tau"])}
    out = {"tiger": hit_ndcg(test.tiger_items, test.target, k), "sasrec": hit_ndcg(test.sasrec_items, test.target, k)}
    for name, alpha in alphas.items():
        out[name] = rank_metrics(target_rank(cands, alpha, test.target), k)
    return out


def _tokens(rel, sid_table, test: SplitOutputs, labels, max_hop: int, flat: dict) -> dict:
    """§10.3: token categories of the item-level generalization cases, with the ``{n}-gram`` shares in ``flat``."""
    prel = PrefixRelations.from_relations(rel, sid_table)
    cats = token_categories(token_labels(prel, test.history, test.target))
    dist = token_distribution(labels, cats, prel.num_lengths, max_hop)
    overall = dist.get("overall", {})
    for name in category_names(prel.num_lengths):
        flat[f"memgen/token/{name}"] = float(overall.get(name, float("nan")))
    return dist
