"""Accuracy–diversity curves of diversity-aware decoding: MMR re-ranking over the MMR λ and diverse beam groups over
the group penalty, on period-1 test instances of a TIGER trained on period 0.

    .venv/bin/python bench/diversity.py --data ../shared/data/office_products_2018_d3 --out diversity.json

Per setting: recall@10 / NDCG@10 and intra-list diversity (mean pairwise cosine distance of item text embeddings),
distinct first-level codes, novelty and catalogue coverage of the top-10 (overall). Keys
``mmr_lambda<λ>/test/<metric>@10/overall`` and ``groups_penalty<p>/test/…``; ``best_mmr/…`` is the largest
intra-list-diversity gain at a recall@10 loss of at most 5% relative to plain beam search.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, report
from tiger import add_training_args

METRICS = ("recall", "ndcg", "ild", "distinct_l1", "novelty", "coverage")


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    add_training_args(p, sasrec_epochs=0)
    p.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3])
    p.add_argument("--penalties", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 5.0])
    p.add_argument("--groups", type=int, default=4)
    args = p.parse_args(argv)
    import lightning as L
    from tiger import train_tiger

    from genrec.decoding.modes import DecodingConfig

    res: dict = {}
    modules: dict = {}
    with tempfile.TemporaryDirectory(prefix="genrec_diversity_") as work:
        res.update({k: v for k, v in train_tiger(args, str(Path(work) / "prepared"), work, modules=modules).items()
                    if k.startswith("seconds/")})
        tiger, dm = modules["tiger"], modules["dm"]
        trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=work)

        def run(name: str, cfg: DecodingConfig) -> None:
            tiger.decoding = cfg
            out = trainer.test(tiger, datamodule=dm, verbose=False)[0]
            for m in METRICS:
                res[f"{name}/test/{m}@10/overall"] = float(out.get(f"test/{m}@10/overall", float("nan")))

        run("beam", DecodingConfig(diversity_metrics=True))
        for lam in args.lambdas:
            run(f"mmr_lambda{lam:g}", DecodingConfig(mode="mmr", mmr_lambda=lam, diversity_metrics=True))
        for pen in args.penalties:
            run(f"groups_penalty{pen:g}", DecodingConfig(mode="diverse", num_groups=args.groups,
                                                          diversity_penalty=pen, diversity_metrics=True))
    best_curve(res, args.lambdas)
    report(res, args.out, "accuracy vs diversity (period-1 test, TIGER trained on period 0)")
    return res


def best_curve(res: dict, lambdas) -> None:
    """The MMR setting with the largest ILD gain whose recall@10 stays within 5% of plain beam search."""
    base_r, base_ild = res["beam/test/recall@10/overall"], res["beam/test/ild@10/overall"]
    best = None
    for lam in lambdas:
        r, ild = res[f"mmr_lambda{lam:g}/test/recall@10/overall"], res[f"mmr_lambda{lam:g}/test/ild@10/overall"]
        if r >= 0.95 * base_r and (best is None or ild > best[1]):
            best = (lam, ild, r)
    if best is not None:
        res["best_mmr/lambda"] = best[0]
        res["best_mmr/ild_gain"] = best[1] / base_ild - 1 if base_ild else float("nan")
        res["best_mmr/recall_ratio"] = best[2] / base_r if base_r else float("nan")


if __name__ == "__main__":
    main()
