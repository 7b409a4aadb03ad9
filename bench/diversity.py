"""Accuracy–diversity curves of diversity-aware decoding: MMR re-ranking over the MMR λ and diverse beam groups over
the group penalty, on period-1 test instances of a TIGER trained on period 0.

    .venv/bin/python bench/diversity.py --data ../shared/data/office_products_2018_d3 --out diversity.json

Per setting: recall@10 / NDCG@10 and intra-list diversity (mean pairwise cosine distance of item text embeddings),
distinct first-level codes, novelty and catalogue coverage of the top-10 (overall). Keys
``mmr_lambda<λ>/{val,test}/<metric>@10/overall`` and ``groups_penalty<p>/{val,test}/…``. ``best_mmr/…``: the λ
with the largest intra-list-diversity gain whose recall@10 stays within 5% of plain beam search, chosen on the
period's **validation** split; ``best_mmr/test/…`` are that λ's test values (test never takes part in the choice).
``--pool N``: every row decodes with N beams, so MMR re-ranks N candidates into the top 10 (plain beam search at the
same width is the baseline); ``--mmr_similarity prefix`` uses shared leading SID tokens instead of text cosine;
``--ckpt`` reuses a trained period-0 TigerModule (e.g. ``bench/edit.py --save_ckpt``) instead of training one.
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
    p.add_argument("--pool", type=int, default=20, help="beam width of every row: MMR's candidate pool")
    p.add_argument("--mmr_similarity", choices=["text", "prefix"], default="text")
    p.add_argument("--ckpt", default=None, help="a trained period-0 TigerModule checkpoint to reuse")
    args = p.parse_args(argv)
    if args.pool < 10 or args.pool % args.groups:
        p.error(f"--pool must be at least 10 (the top-10 is re-ranked from it) and a multiple of --groups "
                f"({args.groups}: the diverse beam groups split it), got {args.pool}")
    import lightning as L
    from tiger import train_tiger

    from genrec.decoding.modes import DecodingConfig

    res: dict = {}
    modules: dict = {}
    with tempfile.TemporaryDirectory(prefix="genrec_diversity_") as work:
        if args.ckpt:
            tiger, dm = load_tiger(args, str(Path(work) / "prepared"))
        else:
            res.update({k: v for k, v in train_tiger(args, str(Path(work) / "prepared"), work, modules=modules).items()
                        if k.startswith("seconds/")})
            tiger, dm = modules["tiger"], modules["dm"]
        tiger.hparams.num_beams = args.pool
        res["config/pool"] = float(args.pool)
        trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=work)

        def run(name: str, cfg: DecodingConfig) -> None:
            tiger.decoding = cfg
            for split, fn in (("val", trainer.validate), ("test", trainer.test)):
                out = fn(tiger, datamodule=dm, verbose=False)[0]
                for m in METRICS:
                    res[f"{name}/{split}/{m}@10/overall"] = float(out.get(f"{split}/{m}@10/overall", float("nan")))

        run("beam", DecodingConfig(diversity_metrics=True))
        for lam in args.lambdas:
            run(f"mmr_lambda{lam:g}", DecodingConfig(mode="mmr", mmr_lambda=lam, mmr_similarity=args.mmr_similarity,
                                                     diversity_metrics=True))
        for pen in args.penalties:
            run(f"groups_penalty{pen:g}", DecodingConfig(mode="diverse", num_groups=args.groups,
                                                          diversity_penalty=pen, diversity_metrics=True))
    best_curve(res, args.lambdas)
    report(res, args.out, "accuracy vs diversity (period-1 test, TIGER trained on period 0)")
    return res


def load_tiger(args, prepared_dir: str):
    """A saved period-0 TigerModule and the period-1 datamodule of the same data (catalogue checked)."""
    from tiger import period0_datamodule

    from lightning_modules.tiger import TigerModule

    dm = period0_datamodule(args, prepared_dir)
    tiger = TigerModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True)
    tiger.set_sid_table(tiger.sid_table, dm.catalogue(), dm.num_items)
    return tiger, dm


def best_curve(res: dict, lambdas, max_recall_drop: float = 0.05) -> None:
    """Choose the MMR λ on validation (largest ILD gain with recall@10 ≥ (1 − drop) × beam search's) and report
    its test values next to beam search's."""
    def val(name, m):
        return res[f"{name}/val/{m}@10/overall"]

    best = None
    for lam in lambdas:
        name = f"mmr_lambda{lam:g}"
        if val(name, "recall") >= (1 - max_recall_drop) * val("beam", "recall") and (
                best is None or val(name, "ild") > val(best, "ild")):
            best = name
    if best is None:
        return
    res["best_mmr/lambda"] = float(best.removeprefix("mmr_lambda"))
    for m in METRICS:
        res[f"best_mmr/test/{m}@10/overall"] = res[f"{best}/test/{m}@10/overall"]
    base_r, base_ild = res["beam/test/recall@10/overall"], res["beam/test/ild@10/overall"]
    res["best_mmr/test/ild_gain"] = res[f"{best}/test/ild@10/overall"] / base_ild - 1 if base_ild else float("nan")
    res["best_mmr/test/recall_ratio"] = res[f"{best}/test/recall@10/overall"] / base_r if base_r else float("nan")


if __name__ == "__main__":
    main()
