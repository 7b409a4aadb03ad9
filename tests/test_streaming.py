"""The streaming, out-of-core data layout gives the same instances, histories and statistics as the materialised
pipeline it replaced (kept below as the reference), at any memory budget; batches are gathered per batch and
shard correctly across DDP ranks."""

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import real_data
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.sequences import (
    GlobalBatchSampler,
    InstanceSampler,
    SequenceDataModule,
    collate_batch,
)
from genrec.data.columns import Workspace, stable_argsort
from genrec.data.config import DataConfig
from genrec.data.pipeline import PreparedDataset, load_raw, prepare
from genrec.data.schema import SPLIT_CODES, DataError
from genrec.data.sources import load_amazon_legacy, load_local, stream_amazon_legacy, stream_local
from genrec.data.splits import NEVER, TEST, TRAIN, VALID, period_of_rows
from genrec.data.synthetic import SyntheticConfig, generate_synthetic, synthetic_stream

TINY = 1e-6  # GiB: chunks of 64 rows, every big array a memory-mapped file, the time sort bucketed


# ----------------------------------------------------------------------------- the materialised reference
def reference(cfg: DataConfig) -> dict:
    """The pre-streaming pipeline: pandas preprocessing, then every instance's history materialised."""
    raw = load_raw(cfg)
    df = raw.interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)
    if cfg.dedup:
        df = df[~df.duplicated(subset=["user_id", "item_id", "timestamp"], keep="first")].reset_index(drop=True)
    if cfg.drop_items_without_metadata:
        df = df[df["item_id"].isin(set(raw.items["item_id"]))].reset_index(drop=True)
    if cfg.kcore:
        keep = _kcore(pd.factorize(df["user_id"])[0], pd.factorize(df["item_id"])[0], cfg.kcore)
        df = df[keep].reset_index(drop=True)
    user, user_ids = pd.factorize(df["user_id"])
    item, item_ids = pd.factorize(df["item_id"])
    t = {"user": user.astype(np.int64), "item": item.astype(np.int64),
         "timestamp": df["timestamp"].to_numpy().astype(np.int64), "user_ids": list(user_ids),
         "item_ids": list(item_ids)}
    n = len(df)
    order = np.lexsort((np.arange(n), t["user"]))
    users = t["user"][order]
    starts = np.maximum.accumulate(np.where(np.r_[True, users[1:] != users[:-1]], np.arange(n), 0))
    if cfg.protocol == "periods":
        period_rows = period_of_rows(n, cfg.period_fractions)
        pos = np.flatnonzero(np.arange(n) != starts)
        key = users[pos] * (len(cfg.period_fractions) + 1) + period_rows[order][pos]
        last = np.r_[key[1:] != key[:-1], True]
        end = np.minimum.accumulate(np.where(last, np.arange(len(pos)), len(pos))[::-1])[::-1]
        rank = end - np.arange(len(pos))
        split = np.where(rank == 0, TEST, np.where(rank == 1, VALID, TRAIN))
    else:
        period_rows = np.zeros(n, dtype=np.int16)
        labels = df["split"].map(SPLIT_CODES).to_numpy().astype(np.int8)[order]
        pos = np.flatnonzero((np.arange(n) != starts) & (labels <= TEST))
        split = labels[pos]
    rows = order[pos]
    h = cfg.max_history
    idx = pos[:, None] - h + np.arange(h)[None, :]
    history = np.where(idx >= starts[pos][:, None], t["item"][order][np.maximum(idx, 0)], -1)
    target, period = t["item"][rows], period_rows[rows].astype(np.int16)
    first_seen = np.full(len(item_ids), NEVER, dtype=np.int16)
    np.minimum.at(first_seen, t["item"], period_rows.astype(np.int16))
    first_train = np.full(len(item_ids), NEVER, dtype=np.int16)
    np.minimum.at(first_train, target[split == TRAIN], period[split == TRAIN])
    by_time = np.argsort(rows, kind="stable")
    inst = {"user": t["user"][rows], "target": target, "history": history, "timestamp": t["timestamp"][rows],
            "split": split.astype(np.int8), "period": period, "row": rows.astype(np.int64),
            "new_item": first_seen[target] == period, "cold": first_train[target] > period,
            "cold_prev": first_train[target] >= period}
    return {"table": t, "period_rows": period_rows, "instances": {k: v[by_time] for k, v in inst.items()}}


def _kcore(users, items, k):
    keep = np.ones(len(users), dtype=bool)
    while True:
        new = keep & (np.bincount(users[keep], minlength=users.max() + 1)[users] >= k) & (
            np.bincount(items[keep], minlength=items.max() + 1)[items] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def assert_same(ds: PreparedDataset, ref: dict, sample: int | None = None, seed: int = 0) -> None:
    t = ref["table"]
    for k in ("user", "item", "timestamp"):
        np.testing.assert_array_equal(getattr(ds.table, k), t[k], err_msg=k)
    assert list(ds.table.user_ids) == t["user_ids"] and list(ds.table.item_ids) == t["item_ids"]
    np.testing.assert_array_equal(ds.period_rows, ref["period_rows"])
    inst, want = ds.instances, ref["instances"]
    for k, v in want.items():
        if k != "history":
            got = getattr(inst, k)
            assert got.dtype == v.dtype and np.array_equal(got, v), k
    # histories gathered from the sequences = the materialised ones, on random instances (or all)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(inst)) if sample is None else rng.choice(len(inst), size=min(sample, len(inst)), replace=False)
    np.testing.assert_array_equal(inst.histories(idx), want["history"][idx])
    users = rng.choice(ds.table.num_users, size=min(50, ds.table.num_users), replace=False)
    sel = np.flatnonzero(np.isin(inst.user, users))
    np.testing.assert_array_equal(inst.select(sel).history, want["history"][sel])


SYNTH = DataConfig(synthetic=SyntheticConfig(num_users=300, num_items=200))


@pytest.mark.parametrize("budget", [4.0, TINY])
def test_synthetic_matches_the_materialised_reference(budget, tmp_path):
    ds = prepare(SYNTH, ws=Workspace(budget, tmp_path))
    assert ds._workspace.spill == (budget == TINY)
    assert_same(ds, reference(SYNTH))


@pytest.mark.parametrize("cfg", [
    {"protocol": "periods"}, {"protocol": "timestamp"}, {"protocol": "periods", "kcore": 3, "max_history": 7},
    {"protocol": "periods", "drop_items_without_metadata": True, "dedup": False},
])
def test_office_matches_the_materialised_reference(cfg, tmp_path):
    root = real_data("office_products_2018_d3")
    cfg = DataConfig(source="local", root=str(root), **cfg)
    ref = reference(cfg)
    assert_same(prepare(cfg), ref, sample=3000)
    assert_same(prepare(cfg, ws=Workspace(2e-5, tmp_path)), ref, sample=3000, seed=1)


def test_any_budget_gives_the_same_prepared_content(tmp_path):
    cfg = DataConfig(synthetic=SyntheticConfig(num_users=200, num_items=150), kcore=2)
    a, b = prepare(cfg), prepare(cfg, ws=Workspace(TINY, tmp_path / "ws"))
    assert a.fingerprint == b.fingerprint and a.stats() == b.stats() and a.report == b.report
    np.testing.assert_array_equal(a.instances.history, b.instances.history)
    np.testing.assert_array_equal(a.item_first_period(), b.item_first_period())
    # the spilled arrays are hard-linked into the saved folder, which then reads back the same
    out = b.save(tmp_path / "prep")
    back = PreparedDataset.load(out)
    assert back.fingerprint == a.fingerprint and back.stats() == a.stats()
    np.testing.assert_array_equal(back.instances.history, a.instances.history)


def test_stats_match_the_old_formulas():
    ds = prepare(SYNTH)
    s, inst, t = ds.stats(), ds.instances, ds.table
    first = np.full(t.num_items, np.iinfo(np.int64).max)
    np.minimum.at(first, t.item, ds.period_rows.astype(np.int64))
    for p, got in enumerate(s["periods"]):
        rows = ds.period_rows == p
        test = (inst.period == p) & (inst.split == TEST)
        assert got == {
            "period": p, "num_interactions": int(rows.sum()), "num_users": len(np.unique(t.user[rows])),
            "num_distinct_items": len(np.unique(t.item[rows])), "num_new_items": int((first == p).sum()) if p else 0,
            "num_catalogue_items": int((first <= p).sum()), "time_min": int(t.timestamp[rows].min()),
            "time_max": int(t.timestamp[rows].max()),
            "num_train": int(((inst.period == p) & (inst.split == TRAIN)).sum()),
            "num_valid": int(((inst.period == p) & (inst.split == VALID)).sum()), "num_test": int(test.sum()),
            "num_cold_test": int((test & inst.cold).sum()), "num_cold_test_previous_model": int((test & inst.cold_prev).sum()),
            "num_new_item_test": int((test & inst.new_item).sum())}
    np.testing.assert_array_equal(ds.item_first_period(), first)


# ----------------------------------------------------------------------------- the folder
def test_prepared_folder_is_memory_mapped_and_old_folders_are_refused(tmp_path):
    ds = prepare(SYNTH)
    out = ds.save(tmp_path / "prep")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"meta.json", "stats.json", "items.parquet", "users.parquet", ".genrec.json", "sequences/offsets.npy",
            "sequences/item.npy", "sequences/timestamp.npy", "interactions/user.npy", "interactions/period.npy",
            "instances/user.npy", "instances/position.npy", "instances/target.npy"} <= names
    assert not any(n.endswith("instances.parquet") for n in names)  # no materialised histories any more
    back = PreparedDataset.load(out)
    for arr in (back.table.user, back.sequences.item, back.instances.target, back.period_rows):
        assert isinstance(arr.base, np.memmap)
    assert back.sequences.item.dtype == np.int32 and back.sequences.offsets.dtype == np.int64
    assert len(back.sequences.item) == len(ds.table)  # O(interactions)
    # pickled by path: a DataLoader worker or another rank maps the same pages
    blob = pickle.dumps(back.instances.where(split=TRAIN))
    assert len(blob) < 8 * len(back.instances) + 4096
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.history, back.instances.where(split=TRAIN).history)
    meta = json.loads((out / "meta.json").read_text())
    meta["format_version"] = 1
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"format version 1, this version reads format 2 .*prepare it again"):
        PreparedDataset.load(out)


def test_instances_select_keeps_the_source_and_gathers_lazily():
    ds = prepare(SYNTH)
    inst = ds.instances
    train = inst.where(split=TRAIN)
    assert train.index is not None and train.columns is inst.columns
    sub = train.select(np.arange(5, 25))
    np.testing.assert_array_equal(sub.history, inst.history[train.index[5:25]])
    np.testing.assert_array_equal(sub.target, inst.target[train.index[5:25]])
    np.testing.assert_array_equal(sub.histories([0, 3]), inst.histories(train.index[[5, 8]]))
    b = sub.batch(np.array([1, 2]))
    np.testing.assert_array_equal(b["history"], sub.history[1:3])
    chunks = list(train.iter_histories(batch_size=100))
    np.testing.assert_array_equal(np.concatenate([h for h, _ in chunks]), train.history)
    np.testing.assert_array_equal(np.concatenate([t for _, t in chunks]), train.target)
    with pytest.raises(IndexError):
        train.select(np.ones(3, dtype=bool))


# ----------------------------------------------------------------------------- streaming readers
def test_chunked_reading_names_the_right_line_and_gives_the_same_data(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    rows = [(f"u{i % 3}", f"i{i % 5}", i) for i in range(10)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(root / "interactions.csv", index=False)
    (root / "items.jsonl").write_text("".join(json.dumps({"item_id": f"i{k}"}) + "\n" for k in range(5)))
    whole = load_local(root)
    parts = stream_local(root, rows=3).to_raw()
    pd.testing.assert_frame_equal(whole.interactions, parts.interactions)
    bad = rows[:7] + [("u1", "i2", "soon")] + rows[8:]
    pd.DataFrame(bad, columns=["user_id", "item_id", "timestamp"]).to_csv(root / "interactions.csv", index=False)
    with pytest.raises(DataError, match=r"interactions.csv: row 9, column 'timestamp'.*got 'soon'$"):
        stream_local(root, rows=3).to_raw()
    (root / "interactions.csv").unlink()
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype({"user_id": object})
    df.loc[8, "user_id"] = None
    df.to_parquet(root / "interactions.parquet")
    with pytest.raises(DataError, match=r"interactions.parquet: row 9, column 'user_id': expected a non-empty id"):
        stream_local(root, rows=4).to_raw()


def test_chunked_json_reviews_match_one_frame(tmp_path):
    rev, meta = tmp_path / "reviews.json", tmp_path / "meta.json"
    lines = [{"reviewerID": f"u{i % 2}", "asin": "AB"[i % 2], "unixReviewTime": i} for i in range(5)]
    lines += [{"reviewerID": "u1", "asin": "A", "unixReviewTime": 9, "overall": "x"}]  # the rating column starts late
    rev.write_text("".join(json.dumps(r) + "\n" for r in lines))
    meta.write_text('{"asin": "A"}\n{"asin": "B"}\n')
    whole = load_amazon_legacy(rev, meta)
    parts = stream_amazon_legacy(rev, meta, rows=2)
    raw = parts.to_raw()
    pd.testing.assert_frame_equal(whole.interactions, raw.interactions)
    assert whole.counts == raw.counts == {"ratings_missing_or_not_numeric": 6}
    lines[1].pop("asin")
    rev.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError, match=r"reviews.json: line 2, field 'asin': expected a non-empty id"):
        stream_amazon_legacy(rev, meta, rows=1).to_raw()
    rev.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "asin"}) + "\n" for r in lines))
    with pytest.raises(DataError, match=r"missing column\(s\) \['asin'\].*found \['reviewerID', 'unixReviewTime', "
                                         r"'overall'\]"):
        stream_amazon_legacy(rev, meta, rows=2).to_raw()


def test_synthetic_stream_is_the_synthetic_frame():
    cfg = SyntheticConfig(num_users=150, num_items=80, seed=5)
    raw = generate_synthetic(cfg)
    pd.testing.assert_frame_equal(synthetic_stream(cfg).to_raw(sort=True).interactions, raw.interactions)


def test_stable_argsort_is_numpys_stable_argsort():
    rng = np.random.default_rng(0)
    for n, hi in ((0, 1), (1, 5), (1000, 3), (5000, 2**40), (3000, 2**62)):
        keys = rng.integers(-hi, hi, n)
        np.testing.assert_array_equal(stable_argsort(keys), np.argsort(keys, kind="stable"))


# ----------------------------------------------------------------------------- batches and ranks
@pytest.fixture(scope="module")
def module_dm(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    dm = SequenceDataModule(SYNTH, prepared_dir=str(root / "prep"), train_periods=[0, 1], eval_period=1,
                            batch_size=64, eval_batch_size=50)
    dm.setup()
    return dm


def _rows(batches) -> list[tuple]:
    return sorted((tuple(h), int(t)) for b in batches for h, t in zip(b["history"].tolist(), b["target"].tolist()))


def test_a_datamodule_epoch_yields_the_reference_rows(module_dm):
    ref = reference(SYNTH)["instances"]
    train = np.isin(ref["period"], [0, 1]) & (ref["split"] == TRAIN)
    batches = list(module_dm.train_dataloader())
    assert all(b["history"].dtype == torch.int64 and b["history"].shape[1] == SYNTH.max_history for b in batches)
    assert _rows(batches) == sorted((tuple(h), int(t)) for h, t in zip(ref["history"][train].tolist(),
                                                                      ref["target"][train]))
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(int(train.sum())))  # shuffled
    assert torch.cat([b["index"] for b in batches]).tolist() != list(range(int(train.sum())))
    for split, loader in ((VALID, module_dm.val_dataloader()), (TEST, module_dm.test_dataloader())):
        batches = list(loader)
        index = torch.cat([b["index"] for b in batches]).tolist()
        assert index == list(range(len(module_dm.eval_instances(split))))  # unique: DDP de-duplication works
        sel = (ref["period"] == 1) & (ref["split"] == split)
        assert _rows(batches) == sorted((tuple(h), int(t)) for h, t in zip(ref["history"][sel].tolist(),
                                                                           ref["target"][sel]))
        assert torch.cat([b["subsets"] for b in batches]).shape == (len(index), 4)


def test_two_ranks_cover_the_train_split_exactly_once(module_dm):
    ds = module_dm.train_dataloader().dataset
    n = len(ds)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        mine = InstanceSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            mine.set_epoch(epoch)
            assert [int(i) for i in mine] == list(sampler)  # the order Lightning's injected sampler gives
        index = torch.cat([b["index"] for b in DataLoader(ds, batch_size=32, sampler=mine, collate_fn=collate_batch)])
        seen.append(index.tolist())
    assert not set(seen[0]) & set(seen[1]) or n % 2  # disjoint up to DistributedSampler's padding
    assert sorted(set(seen[0]) | set(seen[1])) == list(range(n))
    assert len(seen[0]) + len(seen[1]) == n + n % 2


def test_lightning_sampler_injection_keeps_the_batch_gather(module_dm):
    from lightning.pytorch.utilities.data import _update_dataloader

    loader = module_dm.train_dataloader()
    assert isinstance(loader.sampler, GlobalBatchSampler)  # a DistributedSampler: Lightning keeps it
    injected = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=True))
    batch = next(iter(injected))
    assert set(batch) == {"history", "target", "user", "index", "subsets", "weight"} and len(batch["target"]) == 64


class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n,batch,world", [(10, 4, 2), (11, 4, 2), (13, 5, 3), (7, 8, 3), (2, 8, 3), (100, 32, 1)])
def test_global_batches_are_the_one_process_batches_under_any_world(n, batch, world):
    """Step k's local batches of N ranks hold exactly the rows of the one-process batch k; ranks run the same number
    of steps (padding rows, encoded -(row + 1), fill uneven splits)."""
    one = list(GlobalBatchSampler(_Sized(n), batch, 1, 0, seed=5))
    assert sorted(int(i) for i in one) == list(range(n))
    reference = [sorted(int(i) for i in one[i:i + batch]) for i in range(0, n, batch)]
    samplers = [GlobalBatchSampler(_Sized(n), batch, world, r, seed=5) for r in range(world)]
    local = samplers[0].local_batch
    per_rank = []
    for s in samplers:
        rows = [int(i) for i in s]
        assert len(rows) == len(s)
        per_rank.append([rows[i:i + local] for i in range(0, len(rows), local)])
    assert len({len(b) for b in per_rank}) == 1
    for k, expected in enumerate(reference):
        real = sorted(i for b in per_rank for i in b[k] if i >= 0)
        padding = [i for b in per_rank for i in b[k] if i < 0]
        assert real == expected and all(-i - 1 in expected for i in padding)
    samplers[0].set_epoch(1)
    assert [int(i) for i in samplers[0]] != [int(i) for i in GlobalBatchSampler(_Sized(n), batch, world, 0, seed=5)] \
        or n <= batch


def test_padding_rows_carry_weight_zero(module_dm):
    ds = module_dm.train_dataloader().dataset
    batch = ds.__getitems__([3, -4, 5])
    assert batch["weight"].tolist() == [1.0, 0.0, 1.0] and batch["index"].tolist() == [3, 3, 5]
    assert torch.equal(batch["history"][0], batch["history"][1])


def _prepare_in_process(args):
    prepared, counter, rank = args
    import os

    os.environ["LOCAL_RANK"] = str(rank)
    from genrec.data import pipeline

    real = pipeline.prepare

    def counting(cfg):
        with open(counter, "a") as fh:
            fh.write(f"{rank}\n")
        return real(cfg)

    pipeline.prepare = counting
    ds = pipeline.load_or_prepare(SYNTH, prepared, overwrite=True)
    return ds.fingerprint


def test_two_ranks_preparing_one_folder_prepare_it_once(tmp_path):
    """DDP ranks build their datamodules before a process group exists: the folder's lock makes one of them prepare
    (and, with overwrite, only rank 0 re-prepares) while the other waits and reads the finished folder."""
    import multiprocessing as mp

    prepared, counter = str(tmp_path / "prepared"), str(tmp_path / "calls.txt")
    with mp.get_context("spawn").Pool(2) as pool:
        a, b = pool.map(_prepare_in_process, [(prepared, counter, 0), (prepared, counter, 1)])
    calls = Path(counter).read_text().split()
    assert a == b
    # rank 0 always prepares (overwrite); rank 1 prepares only if it took the lock first and found no folder
    assert calls.count("0") == 1 and calls.count("1") <= 1
    assert len(list((tmp_path).glob(".prepared.lock"))) == 1
    # a rank other than 0 started after the folder exists reuses it even when asked to overwrite
    later = str(tmp_path / "later.txt")
    with mp.get_context("spawn").Pool(1) as pool:
        (c,) = pool.map(_prepare_in_process, [(prepared, later, 1)])
    assert c == a and not Path(later).exists()
