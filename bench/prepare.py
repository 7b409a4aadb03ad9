"""Data preparation throughput: preprocessing + period split + vectorised sequence building.

Measures a 1M-interaction synthetic set (target: < 60 s on 2 CPU cores) and the --data folder.
    .venv/bin/python bench/prepare.py --data ../shared/data/office_products_2018_d3 --out prepare.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, report

from genrec.data.config import DataConfig
from genrec.data.pipeline import load_raw, prepare
from genrec.data.synthetic import SyntheticConfig, generate_synthetic


def time_prepare(cfg: DataConfig, raw=None) -> tuple[float, int, int]:
    import genrec.data.pipeline as pl

    if raw is not None:  # time preparation only, not the generation / file reading
        orig = pl.load_raw
        pl.load_raw = lambda _cfg: raw
    try:
        t0 = time.perf_counter()
        ds = prepare(cfg)
        seconds = time.perf_counter() - t0
    finally:
        if raw is not None:
            pl.load_raw = orig
    return seconds, len(ds.table), len(ds.instances)


def main() -> dict:
    p = parser(__doc__)
    p.add_argument("--synthetic_users", type=int, default=84_000, help="≈12 interactions each → ≈1M")
    args = p.parse_args()
    res: dict = {}
    syn_cfg = SyntheticConfig(num_users=args.synthetic_users, num_items=40_000, seed=args.seed)
    t0 = time.perf_counter()
    raw = generate_synthetic(syn_cfg)
    res["seconds/generate_synthetic"] = time.perf_counter() - t0
    seconds, n, n_inst = time_prepare(DataConfig(synthetic=syn_cfg), raw)
    res["seconds/prepare_synthetic"] = seconds
    res["prepare/num_interactions"] = n
    res["prepare/num_instances"] = n_inst
    res["prepare/rows_per_second"] = n / seconds
    if Path(args.data).exists():
        cfg = DataConfig(source="local", root=args.data, name=Path(args.data).name)
        t0 = time.perf_counter()
        raw_real = load_raw(cfg)
        res["seconds/read_data"] = time.perf_counter() - t0
        seconds, n, n_inst = time_prepare(cfg, raw_real)
        res["seconds/prepare_data"] = seconds
        res["prepare/data/num_interactions"] = n
        res["prepare/data/rows_per_second"] = n / seconds
    report(res, args.out, "prepare benchmark")
    return res


if __name__ == "__main__":
    main()
