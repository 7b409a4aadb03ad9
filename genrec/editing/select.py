"""Choosing λ on validation under a locality constraint (``EditConfig.cov_lambda = "auto"``).

Pure: the candidates' validation metrics come in, the choice comes out, so the rule is testable on a hand-made
table. Rule: among candidates whose warm validation NDCG@10 is at least (1 − max_warm_drop) × the unedited
model's, take the largest cold validation recall@10 gain over the unedited model (ties: larger cold NDCG@10, then
the larger λ, i.e. the more conservative edit); a candidate must raise cold recall to be applied at all. None
qualifying → no edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def keys(k: int = 10) -> tuple[str, str, str]:
    """(cold gain, cold tie-break, warm constraint) validation keys at cut-off ``k``."""
    return f"val/recall@{k}/cold", f"val/ndcg@{k}/cold", f"val/ndcg@{k}/warm"


@dataclass
class LambdaChoice:
    cov_lambda: float | None  # None: no edit applied
    reason: str
    table: list[dict]  # one row per candidate: lambda, its metrics, warm_ratio, cold_gain, feasible


def candidate_lambdas(num_requests: int, ratios) -> list[float]:
    return [float(r) * max(int(num_requests), 1) for r in ratios]


def _value(metrics: dict, key: str) -> float:
    v = metrics.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else 0.0


def choose_lambda(unedited: dict, candidates: dict[float, dict], max_warm_drop: float = 0.05,
                  name: str = "λ", k: int = 10) -> LambdaChoice:
    """``unedited`` / ``candidates[λ]``: validation metrics (keys ``val/recall@10/cold``, ``val/ndcg@10/warm``…).
    The same rule chooses any knob that trades cold gains against warm quality (``name`` labels it in the
    reason; e.g. the hybrid re-ranking weight of ``bench/coldstart.py``); ``k`` is the metric cut-off."""
    cold_key, tie_key, warm_key = keys(k)
    if not candidates or all(cold_key not in m for m in candidates.values()):
        raise ValueError(f"choose_lambda: the candidates carry no {cold_key!r} (is {k} among the metric cut-offs?)")
    warm0, cold0 = _value(unedited, warm_key), _value(unedited, cold_key)
    rows, best = [], None
    for lam in sorted(candidates):
        m = candidates[lam]
        warm, gain = _value(m, warm_key), _value(m, cold_key) - cold0
        ratio = warm / warm0 if warm0 > 0 else (1.0 if warm >= warm0 else 0.0)
        feasible = ratio >= 1.0 - max_warm_drop - 1e-12
        rows.append({"lambda": lam, **{key: m.get(key) for key in (cold_key, tie_key, warm_key)},
                     "warm_ratio": ratio, "cold_gain": gain, "feasible": feasible})
        if feasible and gain > 0:
            rank = (gain, _value(m, tie_key), lam)
            if best is None or rank > best[0]:
                best = (rank, lam)
    if best is not None:
        lam = best[1]
        row = next(r for r in rows if r["lambda"] == lam)
        return LambdaChoice(lam, f"{name} {lam:g}: cold val recall@{k} +{row['cold_gain']:.4f}, warm val NDCG@{k} "
                                 f"{row['warm_ratio']:.3f}× unedited", rows)
    if not any(r["feasible"] for r in rows):
        why = f"every candidate dropped warm val NDCG@{k} by more than {max_warm_drop:.0%}"
    else:
        why = f"no candidate within the warm limit raised cold val recall@{k}"
    return LambdaChoice(None, f"no edit applied: {why}", rows)
