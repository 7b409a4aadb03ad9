"""`genrec analyze`: the MemGen analysis of a TIGER + SASRec checkpoint pair on one period (specs/memgen.md §10).

    genrec analyze --config configs/data/office_products_2018_d3.yaml --tiger_ckpt tiger.ckpt \
        --sasrec_ckpt sasrec.ckpt [--train_periods [0]] [--eval_period 1] [--output_dir runs/analyze]

Labels every validation and test case of ``eval_period`` as memorization / generalization (14 logic-with-hop labels)
/ uncategorized against the relations of the training instances of ``seen_periods`` (default ``train_periods``),
reports both models' NDCG@10 / recall@10 per label, the token categories of the item-level generalization cases, the
fixed and adaptive ensembles (selected on validation NDCG@10 only) and the MSP bins. Writes ``analysis.json`` (flat
keys), ``labels.csv``, ``tokens.csv``, ``ensemble.json`` and ``msp_bins.json`` in one staged folder.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from genrec.analysis.report import MODELS, SplitOutputs, analyze
from genrec.data.config import DataConfig

ANALYZE_KIND = "analyze"


@torch.no_grad()
def collect_outputs(tiger, sasrec, inst, batch_size: int = 256, num_candidates: int | None = None) -> SplitOutputs:
    """Both models' top-N lists on ``inst`` (TIGER: constrained beam search; SASRec: the evaluation catalogue)
    and SASRec's MSP over the whole item vocabulary (§10.4)."""
    n = num_candidates or tiger.hparams.num_beams
    tiger.eval()
    sasrec.eval()
    parts: dict[str, list] = {k: [] for k in ("ti", "ts", "si", "ss", "msp")}
    for lo in range(0, len(inst), batch_size):
        rows = slice(lo, lo + batch_size)
        hist = torch.as_tensor(inst.history[rows], device=tiger.device)
        user = torch.as_tensor(inst.user[rows], device=tiger.device)
        items, scores, _ = tiger.recommend(hist, top_k=min(n, tiger.hparams.num_beams), user=user)
        parts["ti"].append(items.cpu().numpy())
        parts["ts"].append(scores.float().cpu().numpy())
        logits = sasrec(hist.to(sasrec.device))
        parts["msp"].append(torch.softmax(logits.float(), dim=-1).max(dim=-1).values.cpu().numpy())
        s_items, s_scores = sasrec.recommend(hist.to(sasrec.device), n)
        parts["si"].append(s_items.cpu().numpy())
        parts["ss"].append(s_scores.float().cpu().numpy())
    cat = {k: np.concatenate(v) if v else np.zeros((0, n)) for k, v in parts.items()}
    return SplitOutputs(np.asarray(inst.history), np.asarray(inst.target), cat["ti"], cat["ts"], cat["si"],
                        cat["ss"], cat["msp"])


def analyze_modules(tiger, sasrec, dm, num_candidates: int | None = None, max_hop: int = 4) -> tuple[dict, dict]:
    """The analysis of two modules on a ``SequenceDataModule``'s evaluation period (training relations from its
    ``seen_periods``)."""
    from genrec.data.splits import TEST, TRAIN, VALID

    ds = dm.load()
    train = dm.split(TRAIN, dm.seen_periods)
    val = collect_outputs(tiger, sasrec, dm.eval_instances(VALID), num_candidates=num_candidates)
    test = collect_outputs(tiger, sasrec, dm.eval_instances(TEST), num_candidates=num_candidates)
    return analyze(train.history, train.target, val, test, tiger.sid_table, ds.num_items, max_hop=max_hop)


def format_tables(flat: dict, tables: dict) -> str:
    lines = ["label                   share   count  " + "  ".join(f"{m:>17}" for m in MODELS)]
    for row in tables["labels"]:
        vals = "  ".join(f"{row[f'{m}/ndcg@10']:>17.4f}" for m in MODELS)
        lines.append(f"{row['label']:<22} {row['ratio']:>6.3f} {row['count']:>7}  {vals}")
    lines.append("(NDCG@10 per label; ensembles selected on validation: fixed α "
                 f"{flat['ensemble_fixed/alpha']:.1f}, adaptive k {flat['ensemble_adaptive/k']:g} τ "
                 f"{flat['ensemble_adaptive/tau']:.1f})")
    tok = {k.split("/")[-1]: v for k, v in flat.items() if k.startswith("memgen/token/")}
    lines.append("token categories of the generalization cases: " + ", ".join(f"{k} {v:.3f}" for k, v in tok.items()))
    return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(out: Path, flat: dict, tables: dict) -> None:
    from genrec.files import atomic_write_json, atomic_write_text

    atomic_write_json(out / "analysis.json", flat)
    atomic_write_text(out / "labels.csv", _csv(tables["labels"]))
    atomic_write_text(out / "tokens.csv", _csv([{"row": k, **v} for k, v in tables["tokens"].items()]))
    atomic_write_json(out / "ensemble.json", tables["ensemble"])
    atomic_write_json(out / "msp_bins.json", tables["msp_bins"])
    atomic_write_json(out / "predictions.json", tables["predictions"])


def parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="genrec analyze", description=__doc__, default_env=False, exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--tiger_ckpt", type=str, required=True, help="TigerModule checkpoint")
    p.add_argument("--sasrec_ckpt", type=str, required=True, help="SASRecModule checkpoint")
    p.add_argument("--train_periods", type=list[int], default=[0], help="Periods the checkpoints were trained on")
    p.add_argument("--seen_periods", type=list[int] | None, default=None,
                   help="Periods whose training instances give the relations (default: train_periods)")
    p.add_argument("--eval_period", type=int | None, default=None,
                   help="Period whose validation/test cases are analysed (default: the one after train_periods)")
    p.add_argument("--num_candidates", type=int | None, default=None,
                   help="Top-N of each model for the ensemble (default: TIGER's beam width)")
    p.add_argument("--max_hop", type=int, default=4, help="H of the relations R_1..R_H")
    p.add_argument("--output_dir", type=str, default="runs/analyze")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace an earlier analysis folder")
    p.add_argument("--prepared_dir", type=str | None, default=None)
    p.add_class_arguments(DataConfig, "data", help="Data source")
    return p


def main(argv: list[str] | None = None) -> dict:
    from datamodules.sequences import SequenceDataModule
    from genrec.checkpoints import read_checkpoint
    from genrec.errors import ConfigError
    from genrec.files import claim_dir, staged_dir
    from lightning_modules.sasrec import SASRecModule
    from lightning_modules.tiger import TigerModule

    p = parser()
    cfg = p.parse_args(argv)
    data = p.instantiate(cfg).data
    claim_dir(cfg.output_dir, ANALYZE_KIND, overwrite=cfg.overwrite, protected=(data.root,), what="analysis folder")
    read_checkpoint(cfg.tiger_ckpt, expect="TigerModule")
    read_checkpoint(cfg.sasrec_ckpt, expect="SASRecModule")
    eval_period = cfg.eval_period if cfg.eval_period is not None else max(cfg.train_periods) + 1
    if not 1 <= cfg.max_hop <= 8:
        raise ConfigError(f"--max_hop: expected 1..8, got {cfg.max_hop}")
    dm = SequenceDataModule(data, prepared_dir=cfg.prepared_dir, train_periods=cfg.train_periods,
                            eval_period=eval_period, seen_periods=cfg.seen_periods)
    ds = dm.load()
    tiger = TigerModule.load_from_checkpoint(cfg.tiger_ckpt, map_location="cpu", weights_only=True)
    tiger.bind_catalogue(ds)
    tiger.set_sid_table(tiger.sid_table, dm.catalogue(), ds.num_items)
    sasrec = SASRecModule.load_from_checkpoint(cfg.sasrec_ckpt, map_location="cpu", weights_only=True)
    sasrec.bind_catalogue(ds)
    sasrec.eval_item_mask = sasrec._mask(dm.catalogue(), sasrec.cfg.num_items)
    flat, tables = analyze_modules(tiger, sasrec, dm, cfg.num_candidates, cfg.max_hop)
    with staged_dir(cfg.output_dir, ANALYZE_KIND, overwrite=cfg.overwrite, protected=(data.root,),
                    what="analysis folder") as out:
        write_outputs(out, flat, tables)
    print(format_tables(flat, tables))
    print(f"→ {cfg.output_dir}")
    return flat
