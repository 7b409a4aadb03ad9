"""Source → preprocessing → split → instances, and the prepared-dataset folder (written atomically).

The folder (format 2) holds ``meta.json``, ``stats.json``, ``items.parquet`` (ids, text, first period, fields),
``users.parquet`` and three folders of ``.npy`` columns read memory-mapped: ``interactions/`` (user, item,
timestamp, period[, rating][, split]; time order), ``sequences/`` (offsets, item, timestamp: every user's items
in time order, CSR) and ``instances/`` (one row per prediction instance; histories are gathered from the
sequences). Its size is O(interactions).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrec.data.columns import Workspace
from genrec.data.config import DataConfig
from genrec.data.fingerprint import (
    NON_CONTENT_FIELDS,
    catalogue_fingerprint,
    content_config,
    dataset_fingerprint,
    require_same,
    source_fingerprint,
)
from genrec.data.preprocess import preprocess_stream
from genrec.data.schema import DataError, InteractionTable, ItemCatalog, RawData
from genrec.data.splits import (
    INSTANCE_COLUMNS,
    TEST,
    TRAIN,
    VALID,
    Instances,
    Sequences,
    build_period_instances,
    build_timestamp_instances,
    item_first_period,
    open_instances,
    open_sequences,
    split_counts,
)
from genrec.data.stream import Stream
from genrec.data.text import item_texts
from genrec.errors import RunMismatchError
from genrec.files import atomic_write_json, exclusive, read_marker, staged_dir

FORMAT_VERSION = 2  # 1: every instance's history materialised in instances.parquet
PREPARED_KIND = "prepared"
# (folder, columns) of the arrays: .npy files, memory-mapped on load (processes reading one folder share the pages)
TABLE_DIR, SEQUENCES_DIR, INSTANCES_DIR = "interactions", "sequences", "instances"
READ_CHUNK_ROWS = 1 << 20


def load_raw(cfg: DataConfig) -> RawData:
    """The source as one frame (small data; preparation streams it instead: ``open_stream``)."""
    from genrec.data import sources
    from genrec.data.synthetic import generate_synthetic

    if cfg.source == "synthetic":
        return generate_synthetic(_synthetic_config(cfg))
    _check_source(cfg)
    if cfg.source == "local":
        return sources.load_local(cfg.root, use_splits=cfg.protocol == "timestamp")
    if cfg.source in ("amazon2014", "amazon2018"):
        return sources.load_amazon_legacy(cfg.reviews_path, cfg.meta_path)
    return sources.load_amazon_2023(cfg.category, root=cfg.root or sources.AMAZON_2023_HUB,
                                    official_split=cfg.protocol == "timestamp",
                                    cache_dir=str(Path(cfg.cache_dir) / "hub"))


def open_stream(cfg: DataConfig, rows: int = READ_CHUNK_ROWS) -> Stream:
    """The source as a stream of chunks of ``rows`` interactions."""
    from genrec.data import sources
    from genrec.data.synthetic import synthetic_stream

    if cfg.source == "synthetic":
        return synthetic_stream(_synthetic_config(cfg))
    _check_source(cfg)
    if cfg.source == "local":
        return sources.stream_local(cfg.root, use_splits=cfg.protocol == "timestamp", rows=rows)
    if cfg.source in ("amazon2014", "amazon2018"):
        return sources.stream_amazon_legacy(cfg.reviews_path, cfg.meta_path, rows=rows)
    return sources.stream_amazon_2023(cfg.category, root=cfg.root or sources.AMAZON_2023_HUB,
                                      official_split=cfg.protocol == "timestamp",
                                      cache_dir=str(Path(cfg.cache_dir) / "hub"), rows=rows)


def _synthetic_config(cfg: DataConfig):
    return dataclasses.replace(cfg.synthetic, seed=cfg.synthetic.seed + cfg.seed)


def _check_source(cfg: DataConfig) -> None:
    if cfg.source == "local":
        if not cfg.root:
            raise DataError("data.root is required for source 'local' (a folder with interactions.csv and items.jsonl)")
    elif cfg.source in ("amazon2014", "amazon2018"):
        if not (cfg.reviews_path and cfg.meta_path):
            raise DataError(f"data.reviews_path and data.meta_path are required for source '{cfg.source}'")
    elif cfg.source == "amazon2023":
        if not cfg.category:
            raise DataError("data.category is required for source 'amazon2023' (e.g. Video_Games)")
    else:
        raise DataError(f"unknown data.source {cfg.source!r}")


@dataclass
class PreparedDataset:
    table: InteractionTable
    period_rows: np.ndarray  # period of each interaction
    catalog: ItemCatalog
    texts: list[str]
    instances: Instances
    report: dict
    config: DataConfig
    _fingerprint: str | None = dataclasses.field(default=None, repr=False, compare=False)
    _first_period: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    _workspace: Workspace | None = dataclasses.field(default=None, repr=False, compare=False)  # owns scratch files
    _path: Path | None = dataclasses.field(default=None, repr=False, compare=False)  # the folder it was loaded from

    def __reduce__(self):
        # a loaded dataset travels as its path (spawned ranks and workers map the same pages instead of copies)
        return (PreparedDataset.load, (self._path,)) if self._path is not None else super().__reduce__()

    # ------------------------------------------------------------------ facts
    @property
    def num_items(self) -> int:
        return self.table.num_items

    @property
    def num_periods(self) -> int:
        return int(self.period_rows.max()) + 1

    @property
    def sequences(self) -> Sequences:
        return self.instances.sequences

    def item_first_period(self) -> np.ndarray:
        if self._first_period is None:
            self._first_period = item_first_period(self.table.item, self.period_rows, self.num_items,
                                                   fill=np.iinfo(np.int64).max, dtype=np.int64)
        return self._first_period

    def new_items(self, period: int) -> np.ndarray:
        """Items whose first interaction falls in ``period`` (what the editing callback injects)."""
        return np.flatnonzero(self.item_first_period() == period)

    def catalogue_until(self, period: int) -> np.ndarray:
        """Items known by the end of ``period``."""
        return np.flatnonzero(self.item_first_period() <= period)

    def stats(self) -> dict:
        t, n_periods, rows = self.table, self.num_periods, 1 << 22
        cuts = np.searchsorted(self.period_rows, np.arange(n_periods + 1))  # periods: contiguous row ranges
        first = self.item_first_period()
        counts, tests = split_counts(self.instances, n_periods), _test_flag_counts(self.instances, n_periods, rows)
        periods = []
        for p in range(n_periods):
            a, b = int(cuts[p]), int(cuts[p + 1])
            periods.append(
                {
                    "period": p,
                    "num_interactions": b - a,
                    "num_users": _distinct(t.user, a, b, t.num_users, rows),
                    "num_distinct_items": _distinct(t.item, a, b, t.num_items, rows),
                    "num_new_items": int((first == p).sum()) if p > 0 else 0,
                    "num_catalogue_items": int((first <= p).sum()),
                    "time_min": min(int(t.timestamp[x:y].min()) for x, y in spans_of(a, b, rows)),
                    "time_max": max(int(t.timestamp[x:y].max()) for x, y in spans_of(a, b, rows)),
                    "num_train": int(counts[p, TRAIN]),
                    "num_valid": int(counts[p, VALID]),
                    "num_test": int(counts[p, TEST]),
                    "num_cold_test": int(tests["cold"][p]),
                    "num_cold_test_previous_model": int(tests["cold_prev"][p]),
                    "num_new_item_test": int(tests["new_item"][p]),
                }
            )
        return {
            "name": self.config.name,
            "source": self.config.source,
            "protocol": self.config.protocol,
            "num_users": self.table.num_users,
            "num_items": self.table.num_items,
            "num_interactions": len(self.table),
            "num_instances": len(self.instances),
            "max_history": self.config.max_history,
            "items_text_fallback": self.report.get("items_text_fallback", 0),
            "preprocessing": {k: v for k, v in self.report.items() if k != "items_text_fallback"},
            "periods": periods,
        }

    # ------------------------------------------------------------------ fingerprints
    @property
    def fingerprint(self) -> str:
        """Content hash of the interactions, ids and periods (cached)."""
        if self._fingerprint is None:
            self._fingerprint = dataset_fingerprint(self.table, self.period_rows)
        return self._fingerprint

    @property
    def catalogue_fingerprint(self) -> dict:
        return catalogue_fingerprint(self.table.item_ids)

    # ------------------------------------------------------------------ persistence
    def save(self, output_dir: str | os.PathLike, overwrite: bool = False,
             embeddings: np.ndarray | None = None) -> Path:
        """Write the folder (staged in a temporary sibling, then renamed: never half-written). A folder that is not
        a prepared folder of ours is refused; replacing one of ours needs ``overwrite``; the data root and the
        current directory are refused. ``embeddings`` (row = item) are stored as ``item_embeddings.npy``."""
        with staged_dir(output_dir, PREPARED_KIND, overwrite=overwrite, protected=(self.config.root,),
                        what="prepared folder") as tmp:
            t, seqs, inst = self.table, self.sequences, self.instances
            cols = {"user": t.user, "item": t.item, "timestamp": t.timestamp, "period": self.period_rows}
            if t.rating is not None:
                cols["rating"] = t.rating
            if t.split is not None:
                cols["split"] = t.split
            self._write_arrays(tmp / TABLE_DIR, cols)
            self._write_arrays(tmp / SEQUENCES_DIR, {"offsets": seqs.offsets, "item": seqs.item,
                                                     "timestamp": seqs.timestamp})
            self._write_arrays(tmp / INSTANCES_DIR, {k: inst.column(k) for k in INSTANCE_COLUMNS})
            items = {"item": np.arange(t.num_items), "item_id": t.item_ids.astype(str), "text": self.texts,
                     "first_period": self.item_first_period()}
            for name, values in self.catalog.fields.items():
                items[name] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
            pq.write_table(pa.table(items), tmp / "items.parquet")
            pq.write_table(pa.table({"user": np.arange(t.num_users), "user_id": pa.array(np.asarray(t.user_ids), pa.string())}),
                           tmp / "users.parquet")
            if embeddings is not None:
                np.save(tmp / "item_embeddings.npy", np.asarray(embeddings, dtype=np.float32))
            meta = {"format_version": FORMAT_VERSION, "report": self.report, "config": dataclasses.asdict(self.config),
                    "content_config": content_config(self.config), "fingerprint": self.fingerprint, "catalogue": self.catalogue_fingerprint,
                    "sources": source_fingerprint(self.config),
                    "embedding_model": None if embeddings is None else self.config.embedding_model}
            atomic_write_json(tmp / "meta.json", meta, sort_keys=False)
            atomic_write_json(tmp / "stats.json", self.stats(), sort_keys=False)
        return Path(output_dir)

    def _write_arrays(self, folder: Path, arrays: dict[str, np.ndarray]) -> None:
        folder.mkdir()
        for name, arr in arrays.items():
            _write_array(folder / f"{name}.npy", arr, self._workspace)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PreparedDataset:
        """Open a prepared folder: its arrays are memory-mapped, read as they are used."""
        from genrec.data.synthetic import SyntheticConfig

        path = Path(path)
        if not (path / "meta.json").exists():
            raise DataError(f"{path}: not a prepared dataset (no meta.json); run `genrec prepare` first")
        meta = json.loads((path / "meta.json").read_text())
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{path}: prepared folder of format version {version}, this version reads format {FORMAT_VERSION} "
                "(per-user sequences instead of materialised histories): prepare it again (`genrec prepare "
                "--overwrite true`, or overwrite_prepared / --continual.overwrite true)")
        cfg_dict = dict(meta["config"])
        cfg_dict["synthetic"] = SyntheticConfig(**cfg_dict["synthetic"])
        cfg = DataConfig(**cfg_dict)
        inter = {p.stem: _open_npy(p) for p in (path / TABLE_DIR).glob("*.npy")}
        items = pq.read_table(path / "items.parquet").to_pandas()
        table = InteractionTable(
            user=inter["user"], item=inter["item"], timestamp=inter["timestamp"],
            user_ids=LazyIds(path / "users.parquet", "user_id"),
            item_ids=items["item_id"].to_numpy().astype(object),
            rating=inter.get("rating"), split=inter.get("split"),
        )
        fields = {c: [None if v is None else v for v in items[c]] for c in items.columns
                  if c not in ("item", "item_id", "text", "first_period")}
        seqs = open_sequences(path / SEQUENCES_DIR, cfg.max_history)
        return cls(
            table=table,
            period_rows=inter["period"],
            catalog=ItemCatalog(table.item_ids, fields),
            texts=list(items["text"]),
            instances=open_instances(path / INSTANCES_DIR, seqs),
            report=meta["report"],
            config=cfg,
            _fingerprint=meta.get("fingerprint"),
            _first_period=items["first_period"].to_numpy().astype(np.int64),
            _path=path,
        )


class LazyIds:
    """A parquet column of raw ids, read on first use (training never needs the user ids: millions of strings)."""

    def __init__(self, path: Path, column: str):
        self.path, self.column = path, column
        self._n = pq.ParquetFile(path).metadata.num_rows
        self._values: np.ndarray | None = None

    @property
    def values(self) -> np.ndarray:
        if self._values is None:
            col = pq.read_table(self.path, columns=[self.column])[self.column]
            self._values = col.to_numpy(zero_copy_only=False).astype(object)
        return self._values

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, idx):
        return self.values[idx]

    def __iter__(self):
        return iter(self.values)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return self.values.astype(dtype)


def spans_of(a: int, b: int, rows: int):
    return ((x, min(x + rows, b)) for x in range(a, max(b, a + 1), rows))


def _distinct(values: np.ndarray, a: int, b: int, size: int, rows: int) -> int:
    seen = np.zeros(size, dtype=bool)
    for x, y in spans_of(a, b, rows):
        seen[values[x:y]] = True
    return int(seen.sum())


def _test_flag_counts(inst: Instances, n_periods: int, rows: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros(n_periods, dtype=np.int64) for k in ("cold", "cold_prev", "new_item")}
    for a, b in spans_of(0, len(inst), rows):
        test = inst.split[a:b] == TEST
        period = inst.period[a:b][test].astype(np.int64)
        for k, v in out.items():
            v += np.bincount(period[inst.column(k)[a:b][test]], minlength=n_periods)[:n_periods]
    return out


def _write_array(path: Path, arr: np.ndarray, ws: Workspace | None) -> None:
    """``np.save``; an array that is already a ``.npy`` file of this dataset's scratch folder is hard-linked (and
    made read-only here: it is the saved file from now on)."""
    base = arr.base if isinstance(arr.base, np.memmap) else arr
    src = getattr(base, "filename", None)
    if ws is not None and ws.spill and src and base.shape == arr.shape and Path(src).parent == ws.dir:
        base.flush()
        try:
            os.link(src, path)
            arr.flags.writeable = False
            return
        except OSError:  # another file system: copy
            pass
    np.save(path, arr)


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.asarray(np.load(path, mmap_mode="c"))
    except ValueError:  # numpy cannot map an empty array
        return np.load(path)


def prepare(cfg: DataConfig, ws: Workspace | None = None) -> PreparedDataset:
    """Stream the source through preprocessing and the split within ``data.memory_budget_gb``."""
    ws = ws or Workspace(cfg.memory_budget_gb, Path(cfg.cache_dir) / "scratch")
    stream = open_stream(cfg, rows=min(ws.rows(256), READ_CHUNK_ROWS))
    table, catalog, report = preprocess_stream(
        stream, dedup=cfg.dedup, kcore=cfg.kcore, drop_items_without_metadata=cfg.drop_items_without_metadata, ws=ws
    )
    texts, fallback = item_texts(catalog, cfg.text_template)  # a template typo fails before the split
    report["items_text_fallback"] = fallback
    try:
        if cfg.protocol == "periods":
            instances, period_rows = build_period_instances(table, cfg.period_fractions, cfg.max_history, ws=ws)
        else:
            instances, period_rows = build_timestamp_instances(table, cfg.max_history, ws=ws)
    except DataError as exc:  # the builders see arrays only: name the data they came from
        raise DataError(f"{stream.source}: {exc}") from None
    return PreparedDataset(table, period_rows, catalog, texts, instances, report, cfg, _workspace=ws)


def item_embeddings(ds: PreparedDataset, show_progress: bool = True) -> np.ndarray:
    """Text embeddings of every item (row i = item i), through the on-disk cache."""
    from genrec.data.embeddings import encode_texts

    return encode_texts(
        ds.texts,
        model_name=ds.config.embedding_model,
        cache_dir=Path(ds.config.cache_dir) / "embeddings",
        batch_size=ds.config.embedding_batch_size,
        show_progress=show_progress,
    )


def load_or_prepare(cfg: DataConfig, prepared_dir: str | os.PathLike | None, overwrite: bool = False
                    ) -> PreparedDataset:
    """The prepared dataset of ``cfg``, cached in ``prepared_dir``: reused only when it was made from the same
    data settings and unchanged source files (else an error says what differs; ``overwrite`` re-prepares)."""
    if not prepared_dir:
        return prepare(cfg)
    # One process prepares, the others (DDP ranks, which build their datamodules before any process group exists,
    # and concurrent runs sharing the cache) wait for it and read the finished folder. Only the first rank
    # overwrites: the others reuse its result, and the source check still refuses a stale folder loudly.
    overwrite = overwrite and not _secondary_rank()
    if not overwrite and read_marker(prepared_dir) is not None:
        return _reuse(cfg, Path(prepared_dir))  # a finished folder is read without the lock (read-only storage)
    with exclusive(prepared_dir):
        if not overwrite and read_marker(prepared_dir) is not None:  # another process finished it meanwhile
            return _reuse(cfg, Path(prepared_dir))
        ds = prepare(cfg)  # the saved folder, memory-mapped: what every later run (and every other rank) reads
        return _with_request(PreparedDataset.load(ds.save(prepared_dir, overwrite=overwrite)), cfg)


def _reuse(cfg: DataConfig, path: Path) -> PreparedDataset:
    meta = json.loads((path / "meta.json").read_text())
    hint = f"use another prepared folder, or pass overwrite to re-prepare {path}"
    require_same(meta.get("content_config") or content_config(meta["config"]), content_config(cfg),
                 f"prepared folder {path}", hint)
    if meta.get("sources", {}) != source_fingerprint(cfg):
        raise RunMismatchError(f"prepared folder {path}: its source files changed since it was prepared "
                               f"(size or modification time); {hint}")
    return _with_request(PreparedDataset.load(path), cfg)


def _secondary_rank() -> bool:
    """A non-first process of a distributed launch: torchrun (RANK), Lightning's launcher (LOCAL_RANK, NODE_RANK),
    SLURM (SLURM_PROCID), MPI (OMPI_COMM_WORLD_RANK, PMI_RANK)."""
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in keys)


def _with_request(ds: PreparedDataset, cfg: DataConfig) -> PreparedDataset:
    """A reused folder serves this request: the fields that do not shape its content (encoder, caches, name, the
    seed of non-synthetic data) come from the request, not from whoever prepared it first."""
    keep = {k: getattr(cfg, k) for k in NON_CONTENT_FIELDS if hasattr(cfg, k)}
    if cfg.source != "synthetic":
        keep["seed"] = cfg.seed
    ds.config = dataclasses.replace(ds.config, **keep)
    return ds
