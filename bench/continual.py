"""DACT comparison table: every continual method on one dataset, period 0 shared, 4 continual periods.

    .venv/bin/python bench/continual.py --data ../shared/data/office_products_2018_d3 --out continual.json

Methods (tokenizer / recommender update per continual period): dact (DACT / finetune), ft_both (finetune /
finetune), ft_tok (finetune / frozen), ft_grm (frozen / finetune), frozen (frozen / frozen), reformer (codes for
new items only / finetune). Period 0 (SASRec CF, RQ-VAE, TIGER) is trained once and copied into every method's
run folder, which the runner then resumes from, so all methods start from the same models.
HR@K equals Recall@K here (one target per instance). Code change = share of items present in both periods whose
SID changed (per level and overall), averaged over the continual periods. Single-seed HR on ~850 test instances
per period has a standard error of ≈0.005, so ``--seeds 0 1 2`` repeats the continual periods with several seeds
(period 0 shared) and reports means and spreads.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, report

METHODS = ("dact", "ft_both", "ft_tok", "ft_grm", "frozen", "reformer")


def base_config(args, run_dir: str):
    from runners.continual import parser as continual_parser

    p = continual_parser()
    cfg = p.parse_args(["--config", str(Path(__file__).resolve().parents[1] / "configs/continual/"
                                        "office_products_2018_d3.yaml"),
                        "--data.root", args.data, "--data.name", Path(args.data).name,
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
    """Flat keys of one run: per-period HR/NDCG/cold recall and code change, period means."""
    res: dict = {}
    periods = sorted(t for t in results if t > 0)
    for t, m in sorted(results.items()):
        for k in (5, 10):
            res[f"{method}/period{t}/test/hr@{k}/overall"] = m[f"test/recall@{k}/overall"]
            res[f"{method}/period{t}/test/ndcg@{k}/overall"] = m[f"test/ndcg@{k}/overall"]
        res[f"{method}/period{t}/test/recall@10/cold"] = m["test/recall@10/cold"]
        if t > 0:
            res[f"{method}/period{t}/code_change/level1"] = m.get("code_change/level1", 0.0)
            res[f"{method}/period{t}/code_change/overall"] = m.get("code_change/overall", 0.0)
    n = max(len(periods), 1)
    for k in (5, 10):
        res[f"{method}/hr@{k}/mean"] = sum(results[t][f"test/recall@{k}/overall"] for t in periods) / n
        res[f"{method}/ndcg@{k}/mean"] = sum(results[t][f"test/ndcg@{k}/overall"] for t in periods) / n
    for level in ("level1", "level2", "level3", "overall"):
        res[f"{method}/code_change/{level}/mean"] = sum(results[t].get(f"code_change/{level}", 0.0) for t in periods) / n
    return res


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
                   help="seeds of the continual periods (period 0 is trained once, with the first seed, and shared); "
                        "with several, `<method>/...` keys are means over seeds and `<method>/seed<s>/...` per seed")
    p.add_argument("--workdir", default=None, help="keep run folders here (default: a temporary folder)")
    args = p.parse_args()
    seeds = args.seeds or [args.seed]
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        shared = root / "period0"
        first = True
        for method in args.methods:
            per_seed = []
            for seed in seeds:
                run_dir = root / (method if len(seeds) == 1 else f"{method}_seed{seed}")
                if not first and not (run_dir / "period_0" / "DONE").exists():
                    run_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copytree(shared / "period_0", run_dir / "period_0", dirs_exist_ok=True)
                    if (shared / "prepared").exists():
                        shutil.copytree(shared / "prepared", run_dir / "prepared", dirs_exist_ok=True)
                data, cfg = base_config(args, str(run_dir))
                cfg.method = method
                cfg.seed = seed  # period t > 0 uses seed + t; period 0 comes from the shared folder
                t0 = time.perf_counter()
                results = ContinualRunner(data, cfg).run()
                seconds = time.perf_counter() - t0
                if first:
                    shared.mkdir(parents=True, exist_ok=True)
                    shutil.copytree(run_dir / "period_0", shared / "period_0", dirs_exist_ok=True)
                    shutil.copytree(run_dir / "prepared", shared / "prepared", dirs_exist_ok=True)
                    first = False
                one = method_results(method, results)
                if len(seeds) == 1:
                    res.update(one)
                    res[f"seconds/{method}"] = seconds
                else:
                    res.update({k.replace(f"{method}/", f"{method}/seed{seed}/", 1): v for k, v in one.items()})
                    res[f"seconds/{method}/seed{seed}"] = seconds
                per_seed.append(one)
            if len(seeds) > 1:
                for k in per_seed[0]:
                    vals = [r[k] for r in per_seed]
                    res[k] = sum(vals) / len(vals)
                    if k.endswith("/mean"):
                        mean = res[k]
                        res[k.replace("/mean", "/std_over_seeds")] = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    report(res, args.out, "continual methods (HR/NDCG per period, code change)")
    return res


if __name__ == "__main__":
    main()
