"""`genrec report PATH`: pictures of a run — ``report.html`` with PNG figures (and the same figures in W&B when a run
is active).

PATH may be a continual run folder, a folder of continual runs (a sweep or a ``bench/continual.py --workdir``:
one line per method, the band spans its seeds), or a ``genrec edit`` output folder. Figures: per-period HR@10 and
NDCG@10, code change per SID level, codebook usage per level, SID churn (kept / changed / new instances), CF
alignment of the tokenizer, HR@10 by SID status; for an edit: the probe accuracy heat map (decoder layer × SID
position) and the cold-vs-warm trade-off over the λ candidates.
"""

from __future__ import annotations

import html
import json
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

REPORT_DIR = "report"


# ----------------------------------------------------------------------------- reading runs
def continual_runs(path: Path) -> list[dict]:
    """Every continual run at or below ``path``: {name, method, seed, periods: {t: metrics}, dir}."""
    from genrec.files import read_marker

    dirs = [path] if (read_marker(path) or {}).get("kind") == "continual" else sorted(
        p for p in path.iterdir() if p.is_dir() and (read_marker(p) or {}).get("kind") == "continual")
    runs = []
    for d in dirs:
        info = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
        cont = info.get("config", {}).get("continual", {})
        periods = {}
        for done in sorted(d.glob("period_*/DONE")):
            t = int(done.parent.name.split("_")[1])
            periods[t] = json.loads((done.parent / "metrics.json").read_text())
        if periods:
            method = cont.get("method") or "+".join(cont.get("resolved") or ["run"])
            runs.append({"name": d.name, "method": method, "seed": cont.get("seed", 0), "periods": periods, "dir": d})
    return runs


def _series(runs: list[dict], key: str) -> dict[str, tuple[list[int], np.ndarray]]:
    """method → (periods, values (seeds, periods)) of one metric key."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_method[r["method"]].append(r["periods"])
    out = {}
    for method, seeds in by_method.items():
        ts = sorted(set().union(*(s.keys() for s in seeds)))
        vals = np.array([[_num(s.get(t, {}).get(key)) for t in ts] for s in seeds], dtype=np.float64)
        if np.isfinite(vals).any():
            out[method] = (ts, vals)
    return out


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else float("nan")


# ----------------------------------------------------------------------------- figures
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    return plt, fig, ax


def _save(plt, fig, out: Path, name: str) -> Path:
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def line_figure(runs, keys: dict[str, str], title: str, ylabel: str, out: Path, name: str) -> Path | None:
    """One line per (method, key label), the band spans the seeds."""
    plt, fig, ax = _figure()
    drawn = False
    for label, key in keys.items():
        for method, (ts, vals) in _series(runs, key).items():
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a period without the key: a gap, not a warning
                mean = np.nanmean(vals, axis=0)
            tag = method if len(keys) == 1 else f"{method} {label}"
            ax.plot(ts, mean, marker="o", label=tag)
            if len(vals) > 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    ax.fill_between(ts, np.nanmin(vals, axis=0), np.nanmax(vals, axis=0), alpha=0.2)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title=title, xlabel="period", ylabel=ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, out, name)


def codebook_usage_figure(runs, out: Path) -> Path | None:
    """Share of each level's codes used by the period's SID table (first run of each method)."""
    from genrec.tokenizers.sid import SemanticIdTable

    plt, fig, ax = _figure()
    drawn = False
    seen = set()
    for r in runs:
        if r["method"] in seen:
            continue
        seen.add(r["method"])
        usage = {}
        for t in sorted(r["periods"]):
            f = r["dir"] / f"period_{t}" / "sid_table.parquet"
            if f.exists():
                usage[t] = SemanticIdTable.load(f).codebook_usage()
        if not usage:
            continue
        ts = sorted(usage)
        for level in range(len(usage[ts[0]])):
            ax.plot(ts, [usage[t][level] for t in ts], marker="o", label=f"{r['method']} level {level + 1}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title="codebook usage per level", xlabel="period", ylabel="share of codes used", ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, out, "codebook_usage")


def churn_figure(runs, out: Path) -> Path | None:
    """Test instances whose target's SID was kept / changed / new, per period (first run of each method)."""
    plt, fig, ax = _figure()
    width, drawn = 0.8 / max(len({r["method"] for r in runs}), 1), False
    for i, r in enumerate({r["method"]: r for r in runs}.values()):
        ts = sorted(t for t in r["periods"] if "test/count/sid_kept" in r["periods"][t])
        if not ts:
            continue
        bottom = np.zeros(len(ts))
        for status in ("sid_kept", "sid_changed", "sid_new"):
            vals = np.array([_num(r["periods"][t].get(f"test/count/{status}")) for t in ts])
            ax.bar(np.array(ts) + i * width, np.nan_to_num(vals), width, bottom=bottom,
                   label=f"{r['method']} {status.removeprefix('sid_')}")
            bottom += np.nan_to_num(vals)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title="SID churn: test instances by their target's SID", xlabel="period", ylabel="instances")
    ax.legend(fontsize=7)
    return _save(plt, fig, out, "sid_churn")


def edit_figures(path: Path, out: Path) -> list[Path]:
    """The probe heat map and the λ trade-off of a ``genrec edit`` folder."""
    rep = json.loads((path / "report.json").read_text())
    figs = []
    acc = rep.get("probe_accuracy")
    if acc:
        plt, fig, ax = _figure()
        im = ax.imshow(np.array(acc), cmap="viridis", aspect="auto", vmin=0.5, vmax=1.0)
        ax.set(title="probe accuracy (decoder layer × SID position)", xlabel="SID position", ylabel="layer")
        fig.colorbar(im, ax=ax)
        figs.append(_save(plt, fig, out, "probe_heatmap"))
    table = (rep.get("selection") or {}).get("table") or []
    if table:
        plt, fig, ax = _figure()
        cold = [row.get("val/recall@10/cold") or 0.0 for row in table]
        warm = [row.get("val/ndcg@10/warm") or 0.0 for row in table]
        ax.plot(warm, cold, marker="o")
        for row, x, y in zip(table, warm, cold):
            ax.annotate(f"λ {row['lambda']:g}", (x, y), fontsize=7)
        ax.set(title="cold vs warm over λ (validation)", xlabel="warm NDCG@10", ylabel="cold recall@10")
        ax.grid(alpha=0.3)
        figs.append(_save(plt, fig, out, "lambda_tradeoff"))
    return figs


def cutoff(runs: list[dict]) -> int:
    """The metric cut-off to draw: 10 when logged, else the largest one below it (else the smallest)."""
    ks = sorted({int(k.split("@")[1].split("/")[0]) for r in runs for m in r["periods"].values() for k in m
                 if k.startswith("test/recall@")})
    below = [k for k in ks if k <= 10]
    return below[-1] if below else (ks[0] if ks else 10)


def continual_figures(runs: list[dict], out: Path) -> list[Path]:
    levels = sorted({k.split("/")[1] for r in runs for m in r["periods"].values() for k in m
                     if k.startswith("code_change/level") or k == "code_change/suffix"})
    k = cutoff(runs)
    figs = [
        line_figure(runs, {f"HR@{k}": f"test/recall@{k}/overall"}, f"HR@{k} per period", f"HR@{k}", out, "hr"),
        line_figure(runs, {f"NDCG@{k}": f"test/ndcg@{k}/overall"}, f"NDCG@{k} per period", f"NDCG@{k}", out, "ndcg"),
        line_figure(runs, {lv: f"code_change/{lv}" for lv in levels}, "code change per SID level",
                    "share of items whose code changed", out, "code_change"),
        codebook_usage_figure(runs, out),
        churn_figure(runs, out),
        line_figure(runs, {"CF alignment": "tokenizer/cf_alignment"}, "tokenizer–CF alignment (DACT Fig. 4)",
                    "mean cosine", out, "cf_alignment"),
        line_figure(runs, {s: f"test/recall@{k}/sid_{s}" for s in ("kept", "changed", "new")},
                    f"HR@{k} by the target's SID status (DACT Fig. 6)", f"HR@{k}", out, "hr_by_sid_status"),
        line_figure(runs, {"cold": f"test/recall@{k}/cold", "warm": f"test/recall@{k}/warm"},
                    f"warm vs cold recall@{k}", f"recall@{k}", out, "warm_cold"),
    ]
    return [f for f in figs if f is not None]


# ----------------------------------------------------------------------------- html and W&B
def write_html(path: Path, out: Path, figs: list[Path], title: str) -> Path:
    from genrec.files import atomic_write_text

    items = "\n".join(f'<figure><img src="{REPORT_DIR}/{f.name}" alt="{html.escape(f.stem)}">'
                      f"<figcaption>{html.escape(f.stem)}</figcaption></figure>" for f in figs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em} figure{display:inline-block;margin:1em}"
            "img{max-width:640px}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(str(path))}</p>{items}</body></html>\n")
    return atomic_write_text(path / "report.html", page)


def log_to_wandb(figs: list[Path]) -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.log({f"report/{f.stem}": wandb.Image(str(f)) for f in figs})


def make_report(path: str | Path) -> tuple[Path, list[Path]]:
    from genrec.errors import DataError
    from genrec.files import read_marker

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"genrec report {path}: not a folder (expected a continual run, a folder of runs or an "
                        "edit output)")
    out = path / REPORT_DIR
    out.mkdir(exist_ok=True)
    kind = (read_marker(path) or {}).get("kind")
    if kind == "edit":
        figs, title = edit_figures(path, out), f"GenRecEdit report: {path.name}"
    else:
        runs = continual_runs(path)
        if not runs:
            raise DataError(f"genrec report {path}: no finished continual period (period_<t>/DONE) or edit report "
                            "found here or one level below")
        figs, title = continual_figures(runs, out), f"continual report: {path.name} ({len(runs)} run(s))"
    page = write_html(path, out, figs, title)
    log_to_wandb(figs)
    return page, figs


def main(argv: list[str] | None = None) -> Path:
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="genrec report", description=__doc__, default_env=False, exit_on_error=False)
    p.add_argument("path", type=str, help="a continual run folder, a folder of runs, or a genrec edit folder")
    cfg = p.parse_args(argv)
    page, figs = make_report(cfg.path)
    print(f"{len(figs)} figures → {page}")
    return page
