"""DACT comparison table: every continual method on one dataset, period 0 shared, 4 continual periods.

    .venv/bin/python bench/continual.py --data ../shared/data/office_products_2018_d3 --out continual.json

Methods (tokenizer / recommender update per continual period): dact (DACT / finetune), ft_both (finetune /
finetune), ft_tok (finetune / frozen), ft_grm (frozen / finetune), frozen (frozen / frozen), reformer (codes for
new items only / finetune). Period 0 (SASRec CF, RQ-VAE, TIGER) is trained once and copied into every method's
run folder, which the runner then resumes from, so all methods start from the same models.
HR@K equals Recall@K here (one target per instance). Code change = share of items present in both periods whose
SID changed (per level and overall), averaged over the continual periods. Single-seed HR on ~850 test instances
per period has a standard error of ≈0.005, so ``--seeds 0 1 2`` repeats the continual periods with several seeds
(period 0 shared through ``continual.init_from``) and reports, per method, the mean over seeds of the period-mean
HR@10 / NDCG@10 with its 95% interval (``<method>/hr@10/{mean,ci95_low,ci95_high}``), and paired sign-flip tests
against frozen / ft_grm / ft_both on the same test instances (``<method>_vs_<baseline>/hr@10/p_value``). Per period
it also records the DACT diagnostics: CF alignment of the quantised latents (Fig. 4), HR@10 on instances whose
target SID was kept / changed / new (Fig. 6), and TIGER's loss on changed vs kept items before/after fine-tuning.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, report

METHODS = ("dact", "ft_both", "ft_tok", "ft_grm", "frozen", "reformer")


def base_config(args, run_dir: str):
    from runners.continual import parser as continual_parser

    p = continual_parser()
    if args.synthetic:  # the embedded catalogue: co-occurrence drift from 60% of the time axis on, by construction
        data_args = ["--data.source", "synthetic", "--data.name", "synthetic_drift", "--data.root", "null",
                     "--data.synthetic.num_users", str(args.synthetic_users),
                     "--data.synthetic.num_items", str(args.synthetic_items)]
    else:
        data_args = ["--data.root", args.data, "--data.name", Path(args.data).name]
    cfg = p.parse_args(["--config", str(Path(__file__).resolve().parents[1] / "configs/continual/"
                                        "office_products_2018_d3.yaml"), *data_args,
                        "--continual.run_dir", run_dir, "--continual.logger", "none",
                        "--continual.seed", str(args.seed)])
    init = p.instantiate(cfg)
    data, c = init.data, init.continual
    if not args.full:  # CPU-sized: smaller TIGER, fewer epochs (the config keeps the documented defaults)
        c.tiger = dataclasses.replace(c.tiger, num_encoder_layers=2, num_decoder_layers=2, d_model=64, num_heads=4,
                                      d_kv=16, d_ff=256)
        c.sasrec_stage = dataclasses.replace(c.sasrec_stage, epochs=args.sasrec_epochs)
        c.sasrec_finetune_stage = dataclasses.replace(c.sasrec_finetune_stage, epochs=max(args.sasrec_epochs // 3, 1))
        c.rqvae_stage = dataclasses.replace(c.rqvae_stage, epochs=args.rqvae_epochs)
        c.tiger_stage = dataclasses.replace(c.tiger_stage, epochs=args.tiger_epochs, lr=2e-3)
        # 64 codes per level: 3.3k items give each code ~50 items, enough training signal for the CPU-sized TIGER
        c.rqvae = dataclasses.replace(c.rqvae, codebook_size=args.codebook_size)
        c.tiger_finetune_stage = dataclasses.replace(c.tiger_finetune_stage, epochs=args.finetune_epochs)
        c.finetune_tokenizer_stage = dataclasses.replace(c.finetune_tokenizer_stage, epochs=args.tokenizer_epochs)
        c.dact = dataclasses.replace(c.dact, epochs=args.tokenizer_epochs)
    return data, c


def method_results(method: str, results: dict) -> dict:
    """Flat keys of one run: per-period HR/NDCG/cold recall, code change and DACT diagnostics, period means."""
    res: dict = {}
    periods = sorted(t for t in results if t > 0)
    for t, m in sorted(results.items()):
        for k in (5, 10):
            res[f"{method}/period{t}/test/hr@{k}/overall"] = m[f"test/recall@{k}/overall"]
            res[f"{method}/period{t}/test/ndcg@{k}/overall"] = m[f"test/ndcg@{k}/overall"]
        res[f"{method}/period{t}/test/recall@10/cold"] = m["test/recall@10/cold"]
        if t > 0:
            for key in ("code_change/level1", "code_change/overall", "tokenizer/cf_alignment",
                        "test/recall@10/sid_kept", "test/recall@10/sid_changed", "test/recall@10/sid_new",
                        "test/count/sid_changed", "recommender/loss_changed/before", "recommender/loss_changed/after",
                        "recommender/loss_kept/before", "recommender/loss_kept/after",
                        "code_change/reassign/num_suffix_moved"):
                if key in m:
                    res[f"{method}/period{t}/{key}"] = m[key]
    n = max(len(periods), 1)
    for k in (5, 10):
        res[f"{method}/hr@{k}/period_mean"] = sum(results[t][f"test/recall@{k}/overall"] for t in periods) / n
        res[f"{method}/ndcg@{k}/period_mean"] = sum(results[t][f"test/ndcg@{k}/overall"] for t in periods) / n
    for level in ("level1", "level2", "level3", "overall"):
        res[f"{method}/code_change/{level}/period_mean"] = sum(
            results[t].get(f"code_change/{level}", 0.0) for t in periods) / n
    return res


def instance_masks(run_dir: Path, periods: list[int], subset: str) -> np.ndarray | None:
    """``mask/<subset>`` of a run in ``instance_hits``' row order (None when a period did not record it)."""
    from runners.continual import load_per_instance

    parts = []
    for t in periods:
        table = load_per_instance(run_dir / f"period_{t}")
        if f"mask/{subset}" not in table:
            return None
        parts.append(table[f"mask/{subset}"][np.argsort(table["instance_id"], kind="stable")])
    return np.concatenate(parts).astype(bool)


def instance_hits(run_dir: Path, periods: list[int], column: str) -> np.ndarray:
    """Per-instance values of ``column`` over the continual periods, concatenated in (period, instance id)
    order: the same rows for every method and seed on the same data, so comparisons can be paired."""
    from runners.continual import load_per_instance

    parts = []
    for t in periods:
        table = load_per_instance(run_dir / f"period_{t}")
        parts.append(table[column][np.argsort(table["instance_id"], kind="stable")])
    return np.concatenate(parts)


BASELINES = ("frozen", "ft_grm", "ft_both")


def statistics(runs: dict[str, dict[int, tuple[Path, dict]]], periods: list[int]) -> dict:
    """Mean and 95% interval over seeds of the period means, and paired tests of each method against each
    baseline on the same (period, instance) rows, averaged over seeds."""
    from genrec.metrics.stats import comparison_keys, paired_keys

    res: dict = {}
    hits: dict[str, dict[str, np.ndarray]] = {}
    for method, by_seed in runs.items():
        for metric, column in (("hr@10", "recall@10"), ("ndcg@10", "ndcg@10")):
            per_seed = [sum(r[t][f"test/{column}/overall"] for t in periods) / len(periods)
                        for _, r in by_seed.values()]
            res.update(comparison_keys(f"{method}/{metric}", per_seed))
            hits.setdefault(method, {})[metric] = np.stack(
                [instance_hits(d, periods, column) for d, _ in by_seed.values()])
        changes = [sum(r[t].get("code_change/overall", 0.0) for t in periods) / len(periods)
                   for _, r in by_seed.values()]
        res.update(comparison_keys(f"{method}/code_change", changes))
    for method in runs:
        for base in BASELINES:
            if base != method and base in runs:
                for metric in ("hr@10", "ndcg@10"):
                    res.update(paired_keys(method, base, metric, hits[method][metric], hits[base][metric]))
                res.update(changed_rows_comparison(method, base, runs, hits, periods))
    return res


def changed_rows_comparison(method: str, base: str, runs, hits, periods: list[int]) -> dict:
    """Both methods scored on the test instances whose target SID *method* changed (DACT Fig. 6 across methods:
    does the loss come from moved codes?), paired per seed: ``<method>_vs_<base>/hr@10/sid_changed_rows/...``."""
    seeds = [s for s in runs[method] if s in runs[base]]
    masks = [instance_masks(runs[method][s][0], periods, "sid_changed") for s in seeds]
    if not seeds or any(m is None for m in masks) or not sum(int(m.sum()) for m in masks):
        return {}
    from genrec.metrics.stats import paired_test

    row = {s: i for i, s in enumerate(runs[method])}
    brow = {s: i for i, s in enumerate(runs[base])}
    a = np.concatenate([hits[method]["hr@10"][row[s]][m] for s, m in zip(seeds, masks)])
    b = np.concatenate([hits[base]["hr@10"][brow[s]][m] for s, m in zip(seeds, masks)])
    key = f"{method}_vs_{base}/hr@10/sid_changed_rows"
    t = paired_test(a, b)
    return {f"{key}/{method}": float(a.mean()), f"{key}/{base}": float(b.mean()), f"{key}/count": float(len(a)),
            f"{key}/diff": t["diff"], f"{key}/p_value": t["p_value"]}


def main() -> dict:
    from runners.continual import ContinualRunner

    p = parser(__doc__)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS) + ["ft_tok_rt_grm"])
    p.add_argument("--rqvae_epochs", type=int, default=150)
    p.add_argument("--tiger_epochs", type=int, default=30)
    p.add_argument("--finetune_epochs", type=int, default=8)
    p.add_argument("--tokenizer_epochs", type=int, default=30)
    p.add_argument("--sasrec_epochs", type=int, default=30)
    p.add_argument("--codebook_size", type=int, default=64, help="RQ-VAE codes per level (CPU size; --full keeps 256)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds of the continual periods (period 0 is trained once, with the first seed, and shared "
                        "through continual.init_from); keys `<method>/<metric>/{mean,ci95_low,ci95_high}` over "
                        "seeds and `<method>_vs_<baseline>/<metric>/p_value` (paired, same instances)")
    p.add_argument("--workdir", default=None, help="keep run folders here (default: a temporary folder)")
    p.add_argument("--init_from", default=None,
                   help="start every run from this earlier run folder's finished period 0 (same data and period-0 "
                        "settings), e.g. a run of an earlier bench/continual --workdir")
    p.add_argument("--synthetic", action="store_true",
                   help="use the synthetic catalogue (its category transitions drift from 60%% of the time axis on) "
                        "instead of --data")
    p.add_argument("--synthetic_users", type=int, default=3000)
    p.add_argument("--synthetic_items", type=int, default=1500)
    args = p.parse_args()
    seeds = args.seeds or [args.seed]
    res: dict = {}
    runs: dict[str, dict[int, tuple[Path, dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        shared = args.init_from  # the first run's folder: every other run starts from its period 0
        for method in args.methods:
            for seed in seeds:
                run_dir = root / f"{method}_seed{seed}"
                data, cfg = base_config(args, str(run_dir))
                cfg.method, cfg.seed, cfg.init_from = method, seed, shared
                t0 = time.perf_counter()
                results = ContinualRunner(data, cfg).run()
                res[f"seconds/{method}/seed{seed}"] = time.perf_counter() - t0
                shared = shared or str(run_dir)
                runs.setdefault(method, {})[seed] = (run_dir, results)
                res.update({k.replace(f"{method}/", f"{method}/seed{seed}/", 1): v
                            for k, v in method_results(method, results).items()})
        periods = sorted(t for t in next(iter(runs.values()))[seeds[0]][1] if t > 0)
        res.update(statistics(runs, periods))
    report(res, args.out, "continual methods (HR/NDCG per period, code change)")
    print_table(res, list(runs), seeds)
    return res


def print_table(res: dict, methods: list[str], seeds: list[int]) -> None:
    print(f"\nperiod-mean HR@10 over {len(seeds)} seed(s): mean [95% interval]; p vs baselines (paired)")
    for m in methods:
        ps = "  ".join(f"vs {b} p={res[f'{m}_vs_{b}/hr@10/p_value']:.3f}" for b in BASELINES
                       if f"{m}_vs_{b}/hr@10/p_value" in res)
        print(f"{m:>14} {res[f'{m}/hr@10/mean']:.4f} [{res[f'{m}/hr@10/ci95_low']:.4f}, "
              f"{res[f'{m}/hr@10/ci95_high']:.4f}]  code change {res[f'{m}/code_change/mean']:.3f}  {ps}")
    rows = [(m, b) for m in methods for b in BASELINES if f"{m}_vs_{b}/hr@10/sid_changed_rows/count" in res]
    if rows:
        print("\nHR@10 on the test instances whose target SID the method changed (both methods on the same rows)")
        for m, b in rows:
            key = f"{m}_vs_{b}/hr@10/sid_changed_rows"
            print(f"{m:>14} {res[f'{key}/{m}']:.4f} vs {b} {res[f'{key}/{b}']:.4f}  "
                  f"({int(res[f'{key}/count'])} rows, p={res[f'{key}/p_value']:.3f})")


if __name__ == "__main__":
    main()
