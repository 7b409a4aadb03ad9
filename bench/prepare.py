"""Data preparation at scale: streaming `prepare` (seconds, rows/s, peak RSS), one training epoch of the
DataModule over the prepared folder (peak RSS increase), two DDP-style ranks reading that folder through one memory
map (RSS and shared pages per rank), and the --data folder.

    .venv/bin/python bench/prepare.py --out prepare.json                                   # ≈1M interactions
    nice -n 10 .venv/bin/python bench/prepare.py --synthetic_users 840000 --out p10m.json  # ≈10M
    nice -n 10 .venv/bin/python bench/prepare.py --huge --phases generate prepare --out p100m.json  # ≈100M

Each phase runs in a process of its own, so their memory never mixes; peak RSS is sampled from /proc/self/statm.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
from _common import PeakRSS, parser, report

PHASES = ("generate", "prepare", "datamodule", "ddp", "data", "csv")
DEFAULT_PHASES = PHASES[:-1]
HUGE_USERS = 8_400_000  # ≈100M interactions


def data_config(args):
    from genrec.data.config import DataConfig
    from genrec.data.synthetic import SyntheticConfig

    return DataConfig(synthetic=SyntheticConfig(num_users=args.synthetic_users, num_items=args.synthetic_items,
                                                seed=args.seed),
                      cache_dir=str(Path(args.workdir) / "cache"), memory_budget_gb=args.budget_gb)


def folder(args) -> Path:
    return Path(args.workdir) / "prepared"


# ----------------------------------------------------------------------------- phases (one process each)
def phase_generate(args) -> dict:
    """The synthetic walks alone (consumed, not kept): what streaming preparation spends generating."""
    from genrec.data.synthetic import synthetic_chunks

    start = time.perf_counter()
    n = sum(len(u) for u, _, _ in synthetic_chunks(data_config(args).synthetic)[1])
    return {"seconds/generate_synthetic": time.perf_counter() - start, "generate/num_interactions": n}


def phase_prepare(args) -> dict:
    from genrec.data.pipeline import prepare

    cfg = data_config(args)
    with PeakRSS() as mem:
        start = time.perf_counter()
        ds = prepare(cfg)
        mid = time.perf_counter()
        ds.save(folder(args), overwrite=True)
        end = time.perf_counter()
    n = len(ds.table)
    return {"seconds/prepare_synthetic": mid - start, "seconds/save": end - mid, "prepare/num_interactions": n,
            "prepare/num_instances": len(ds.instances), "prepare/rows_per_second": n / (end - start),
            "prepare/peak_rss_mb": mem.peak, "prepare/peak_anon_rss_mb": mem.peak_anon,
            "prepare/rss_before_mb": mem.start, "prepare/spilled_to_disk": bool(ds._workspace.spill),
            "prepare/folder_mb": sum(p.stat().st_size for p in folder(args).rglob("*") if p.is_file()) / 2**20}


def _epoch(loader) -> tuple[int, int, float]:
    start, batches, rows = time.perf_counter(), 0, 0
    for batch in loader:
        batches += 1
        rows += len(batch["target"])
    return batches, rows, time.perf_counter() - start


def phase_datamodule(args) -> dict:
    from datamodules.sequences import SequenceDataModule

    with PeakRSS() as mem:
        dm = SequenceDataModule(data_config(args), prepared_dir=str(folder(args)), batch_size=args.batch_size)
        dm.setup("fit")
        batches, rows, seconds = _epoch(dm.train_dataloader())
    return {"datamodule/peak_rss_mb": mem.peak - mem.start, "datamodule/peak_anon_rss_mb": mem.peak_anon - mem.start_anon,
            "datamodule/rss_before_mb": mem.start, "datamodule/epoch_seconds": seconds, "datamodule/batches": batches,
            "datamodule/instances_per_second": rows / seconds, "datamodule/train_instances": rows}


def phase_rank(args) -> dict:
    """One of ``args.world`` ranks: its DistributedSampler share of a training epoch, then /proc/self/smaps_rollup
    read while every rank still maps the folder (file barriers)."""
    from torch.utils.data import DataLoader

    from datamodules.sequences import InstanceSampler, SequenceDataModule, collate_batch

    with PeakRSS() as mem:
        dm = SequenceDataModule(data_config(args), prepared_dir=str(folder(args)), batch_size=args.batch_size)
        ds = dm.train_dataloader().dataset
        sampler = InstanceSampler(ds, num_replicas=args.world, rank=args.rank, shuffle=True, seed=args.seed)
        loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, collate_fn=collate_batch)
        _, rows, seconds = _epoch(loader)
    _barrier(args, "epoch")
    smaps, mine = _smaps_rollup(), _smaps_under(folder(args))
    _barrier(args, "measured")
    out = {f"ddp/rank{args.rank}/{k}_mb": v for k, v in smaps.items()}
    out.update({f"ddp/rank{args.rank}/prepared_folder_{k}_mb": v for k, v in mine.items()})
    out.update({f"ddp/rank{args.rank}/peak_rss_increase_mb": mem.peak - mem.start,
                f"ddp/rank{args.rank}/peak_anon_increase_mb": mem.peak_anon - mem.start_anon,
                f"ddp/rank{args.rank}/instances": rows, f"ddp/rank{args.rank}/epoch_seconds": seconds})
    return out


def _barrier(args, name: str) -> None:
    base = Path(args.workdir) / f"barrier-{name}"
    base.mkdir(exist_ok=True)
    (base / str(args.rank)).touch()
    while len(list(base.iterdir())) < args.world:
        time.sleep(0.05)


def _smaps_rollup() -> dict[str, float]:
    keys = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty", "Anonymous")
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            out[name.lower()] = int(rest.split()[0]) / 1024
    return out


def _smaps_under(path: Path) -> dict[str, float]:
    """Rss / Pss / Shared_Clean / Private of the mappings of files inside ``path`` (the prepared folder's arrays)."""
    keys, out, inside = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty"), {}, False
    prefix = str(path.resolve()) + "/"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's header line
            inside = len(head) >= 6 and head[5].startswith(prefix)
        elif inside and head and head[0].rstrip(":") in keys:
            k = head[0].rstrip(":").lower()
            out[k] = out.get(k, 0.0) + int(head[1]) / 1024
    return out


def phase_ddp(args) -> dict:
    procs = [_spawn(args, "rank", ["--rank", str(r), "--world", "2"]) for r in range(2)]
    res: dict = {}
    for p in procs:
        res.update(_result(p))
    res["ddp/instances_both_ranks"] = res["ddp/rank0/instances"] + res["ddp/rank1/instances"]
    return res


def phase_data(args) -> dict:
    from genrec.data.config import DataConfig
    from genrec.data.pipeline import prepare

    if not Path(args.data).exists():
        return {}
    cfg = DataConfig(source="local", root=args.data, name=Path(args.data).name,
                     cache_dir=str(Path(args.workdir) / "cache"))
    with PeakRSS() as mem:
        start = time.perf_counter()
        ds = prepare(cfg)
        seconds = time.perf_counter() - start
    return {"seconds/prepare_data": seconds, "prepare/data/num_interactions": len(ds.table),
            "prepare/data/rows_per_second": len(ds.table) / seconds, "prepare/data/peak_rss_mb": mem.peak}


def phase_csv(args) -> dict:
    """Preparation streaming a local CSV (pyarrow chunks, ids dictionary-encoded per chunk)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from genrec.data.config import DataConfig
    from genrec.data.pipeline import prepare
    from genrec.data.synthetic import synthetic_chunks

    root = Path(args.workdir) / "csv"
    root.mkdir(exist_ok=True)
    items, chunks = synthetic_chunks(data_config(args).synthetic)
    items.to_json(root / "items.jsonl", orient="records", lines=True)
    with pacsv.CSVWriter(root / "interactions.csv", pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                                               ("timestamp", pa.int64())])) as out:
        for u, i, t in chunks:
            out.write_table(pa.table({"user_id": np.char.add("U", np.char.zfill(u.astype(str), 7)),
                                      "item_id": np.char.add("S", np.char.zfill(i.astype(str), 7)), "timestamp": t}))
    cfg = DataConfig(source="local", root=str(root), cache_dir=str(Path(args.workdir) / "cache"),
                     memory_budget_gb=args.budget_gb)
    with PeakRSS() as mem:
        start = time.perf_counter()
        ds = prepare(cfg)
        seconds = time.perf_counter() - start
    return {"seconds/prepare_csv": seconds, "prepare/csv/num_interactions": len(ds.table),
            "prepare/csv/rows_per_second": len(ds.table) / seconds, "prepare/csv/peak_rss_mb": mem.peak,
            "prepare/csv/peak_anon_rss_mb": mem.peak_anon, "prepare/csv/file_mb": (root / "interactions.csv").stat().st_size / 2**20}


# ----------------------------------------------------------------------------- driver
def _spawn(args, phase: str, extra=()) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--phase", phase, "--workdir", args.workdir, "--seed", str(args.seed),
           "--synthetic_users", str(args.synthetic_users), "--synthetic_items", str(args.synthetic_items),
           "--budget_gb", str(args.budget_gb), "--batch_size", str(args.batch_size), "--data", args.data, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"bench/prepare.py: a phase failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main() -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--synthetic_users", type=int, default=84_000, help="≈12 interactions each: 840000 → ≈10M")
    p.add_argument("--synthetic_items", type=int, default=40_000)
    p.add_argument("--huge", action="store_true", help=f"{HUGE_USERS} synthetic users (≈100M interactions)")
    p.add_argument("--budget_gb", type=float, default=4.0, help="data.memory_budget_gb")
    p.add_argument("--batch_size", type=int, default=256, help="DataModule batch size")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(DEFAULT_PHASES),
                   help="csv: the synthetic interactions written as a local CSV folder, then prepared from it")
    p.add_argument("--workdir", default=None, help="keep the prepared folder here (default: a temporary folder)")
    p.add_argument("--phase", default=None, help=argparse_hidden())
    p.add_argument("--rank", type=int, default=0, help=argparse_hidden())
    p.add_argument("--world", type=int, default=1, help=argparse_hidden())
    args = p.parse_args()
    if args.huge:
        args.synthetic_users = HUGE_USERS
    if args.phase:  # a child process: one phase, its result as the last stdout line
        print(json.dumps(globals()[f"phase_{args.phase}"](args)))
        return {}
    keep = args.workdir is not None
    args.workdir = str(Path(args.workdir or tempfile.mkdtemp(prefix="genrec-bench-prepare-")).resolve())
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    res: dict = {"synthetic_users": args.synthetic_users, "memory_budget_gb": args.budget_gb}
    try:
        for phase in args.phases:
            res.update(phase_ddp(args) if phase == "ddp" else _result(_spawn(args, phase)))
    finally:
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if "seconds/generate_synthetic" in res and "seconds/prepare_synthetic" in res:
        seconds = res["seconds/prepare_synthetic"] + res["seconds/save"] - res["seconds/generate_synthetic"]
        res["prepare/rows_per_second_without_generation"] = res["prepare/num_interactions"] / seconds
    report(res, args.out, "prepare benchmark")
    return res


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
