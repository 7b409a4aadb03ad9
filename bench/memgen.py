"""MemGen analysis benchmark: TIGER and SASRec trained on period 0, analysed on period 1 (specs/memgen.md §10).

    .venv/bin/python bench/memgen.py --data ../shared/data/office_products_2018_d3 --out memgen.json [--seeds 0 1 2]
    .venv/bin/python bench/memgen.py --scale --out memgen_scale.json     # labelling speed: 1M cases, 100k items

Per label (memorization, generalization, the 14 logic-with-hop labels, uncategorized): the share of period-1 test
cases and NDCG@10 / recall@10 of TIGER, SASRec and the fixed / adaptive ensembles (selected on validation NDCG@10
only); the token categories (largest memorized SID prefix) of the item-level generalization cases; the MSP bins.
The paper's claims to check: TIGER wins the generalization subsets, SASRec the memorization subset, and the adaptive
ensemble beats both single models and the best fixed α overall. With ``--seeds`` every key gets
``/mean``, ``/ci95_low``, ``/ci95_high`` over seeds, and ``ensemble_adaptive_vs_{tiger,sasrec,ensemble_fixed}``
paired tests (same test cases) on overall NDCG@10.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, report
from tiger import add_training_args

KEYS = ("overall", "memorization", "generalization", "uncategorized")


def run_one(args) -> tuple[dict, dict]:
    from _baselines import run_baselines
    from tiger import train_tiger

    from runners.analyze import analyze_modules

    modules: dict = {}
    res: dict = {}
    with tempfile.TemporaryDirectory() as work:
        prepared = str(Path(work) / "prepared")
        t0 = time.perf_counter()
        train_tiger(args, prepared, work, modules=modules)
        res["seconds/tiger_fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_baselines(args.data, args.sasrec_epochs, train_periods=(0,), eval_period=1, seed=args.seed,
                      prepared_dir=prepared, modules=modules)
        res["seconds/sasrec_fit"] = time.perf_counter() - t0
        dm, tiger, sasrec = modules["dm"], modules["tiger"], modules["sasrec"]
        sasrec.eval_item_mask = sasrec._mask(dm.catalogue(), sasrec.cfg.num_items)
        tiger.set_sid_table(tiger.sid_table, dm.catalogue(), dm.num_items)
        flat, tables = analyze_modules(tiger, sasrec, dm, num_candidates=args.num_candidates)
    res.update(flat)
    return res, tables


def main() -> dict:
    p = parser(__doc__.splitlines()[0])
    add_training_args(p)
    p.add_argument("--num_candidates", type=int, default=None, help="top-N of each model (default: beam width 20)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--seed_cache", default=None,
                   help="folder keeping each seed's results (seed<s>.json + .npz): a seed found there is not rerun, "
                        "so seeds can run as separate processes and one last call with every seed aggregates them")
    p.add_argument("--scale", action="store_true", help="only the labelling-speed run on synthetic data")
    p.add_argument("--scale_train", type=int, default=10_000_000)
    p.add_argument("--scale_test", type=int, default=1_000_000)
    p.add_argument("--scale_items", type=int, default=100_000)
    args = p.parse_args()
    if args.scale:
        from _memgen_scale import scale_run

        res = scale_run(args.scale_items, args.scale_train, args.scale_test, seed=args.seed)
        report(res, args.out, "MemGen labelling at scale")
        return res
    if args.full:
        args.epochs, args.sasrec_epochs, args.codebook_size = max(args.epochs, 200), max(args.sasrec_epochs, 200), 256
    seeds = args.seeds or [args.seed]
    runs = [cached_run(args, s) for s in seeds]
    if len(seeds) == 1:
        res, tables = runs[0]
    else:
        res, tables = aggregate(runs, seeds), runs[0][1]
    report(res, args.out, "MemGen: TIGER vs SASRec vs ensembles per label (period 1, trained on period 0)")
    if args.out:  # the per-label, token-category, MSP-bin and prediction tables of the first seed
        from genrec.files import atomic_write_json

        tables = {k: v for k, v in tables.items() if k != "per_case_ndcg"}
        atomic_write_json(Path(args.out).with_name(Path(args.out).stem + "_tables.json"), tables, sort_keys=False)
    print_table(res, len(seeds))
    return res


def cached_run(args, seed: int) -> tuple[dict, dict]:
    """``run_one`` for one seed, through ``--seed_cache`` when given (results and per-case NDCG saved atomically)."""
    import json

    import numpy as np

    run = argparse.Namespace(**{**vars(args), "seed": seed})
    if not args.seed_cache:
        return run_one(run)
    folder = Path(args.seed_cache)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in ("seed", "seeds", "out", "seed_cache")}
    settings = json.loads(json.dumps({**settings, "data": str(Path(args.data).resolve())}))  # as stored
    meta, arrays = folder / f"seed{seed}.json", folder / f"seed{seed}.npz"
    if meta.exists() and arrays.exists():
        saved = json.loads(meta.read_text())
        if saved["settings"] != settings:
            diff = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
            raise SystemExit(f"{meta} was made with other settings ({', '.join(diff)}): use another --seed_cache")
        with np.load(arrays) as z:
            saved["tables"]["per_case_ndcg"] = {k: z[k] for k in z.files}
        return saved["res"], saved["tables"]
    from genrec.files import atomic_write, atomic_write_json

    res, tables = run_one(run)
    folder.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in tables["per_case_ndcg"].items()})

    atomic_write(arrays, write)
    rest = {k: v for k, v in tables.items() if k != "per_case_ndcg"}
    atomic_write_json(meta, {"settings": settings, "res": res, "tables": rest}, sort_keys=False)
    return res, tables


def aggregate(runs, seeds) -> dict:
    """Means and 95% intervals over seeds, and paired tests of the adaptive ensemble on the same test cases."""
    import numpy as np

    from genrec.metrics.stats import comparison_keys, paired_keys

    out: dict = {}
    for seed, (res, _) in zip(seeds, runs):
        out.update({f"seed{seed}/{k}": v for k, v in res.items()})
    for k in runs[0][0]:
        out.update(comparison_keys(k, [res.get(k, float("nan")) for res, _ in runs]))
        out[k] = out[f"{k}/mean"]  # the plain key holds the mean over seeds
    per = [tables["per_case_ndcg"] for _, tables in runs]
    for base in ("tiger", "sasrec", "ensemble_fixed"):
        out.update(paired_keys("ensemble_adaptive", base, "ndcg@10/overall",
                               np.stack([p["ensemble_adaptive"] for p in per]), np.stack([p[base] for p in per])))
    return out


def print_table(res: dict, n_seeds: int) -> None:
    models = ("tiger", "sasrec", "ensemble_fixed", "ensemble_adaptive")
    print(f"\nNDCG@10 per subset ({n_seeds} seed(s){', mean [95% interval]' if n_seeds > 1 else ''})")
    print(f"{'subset':<16}{'share':>8}" + "".join(f"{m:>28}" for m in models))
    for subset in KEYS:
        share = res.get(f"memgen/ratio/{subset}", 1.0 if subset == "overall" else float("nan"))
        cells = []
        for m in models:
            k = f"{m}/test/ndcg@10/{subset}"
            if n_seeds > 1:
                cells.append(f"{res[k + '/mean']:.4f} [{res[k + '/ci95_low']:.4f},{res[k + '/ci95_high']:.4f}]")
            else:
                cells.append(f"{res[k]:.4f}")
        print(f"{subset:<16}{share:>8.3f}" + "".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    main()
