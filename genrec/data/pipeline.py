"""Source → preprocessing → split → instances, and the prepared-dataset folder (written atomically)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrec.data.config import DataConfig
from genrec.data.fingerprint import (
    catalogue_fingerprint,
    content_config,
    dataset_fingerprint,
    require_same,
    source_fingerprint,
)
from genrec.data.preprocess import preprocess
from genrec.data.schema import DataError, InteractionTable, ItemCatalog, RawData
from genrec.data.splits import (
    TEST,
    TRAIN,
    VALID,
    Instances,
    build_period_instances,
    build_timestamp_instances,
)
from genrec.data.text import item_texts
from genrec.errors import RunMismatchError
from genrec.files import atomic_write_json, read_marker, staged_dir

FORMAT_VERSION = 1
PREPARED_KIND = "prepared"


def load_raw(cfg: DataConfig) -> RawData:
    from genrec.data import sources
    from genrec.data.synthetic import generate_synthetic

    if cfg.source == "synthetic":
        return generate_synthetic(dataclasses.replace(cfg.synthetic, seed=cfg.synthetic.seed + cfg.seed))
    if cfg.source == "local":
        if not cfg.root:
            raise DataError("data.root is required for source 'local' (a folder with interactions.csv and items.jsonl)")
        return sources.load_local(cfg.root, use_splits=cfg.protocol == "timestamp")
    if cfg.source in ("amazon2014", "amazon2018"):
        if not (cfg.reviews_path and cfg.meta_path):
            raise DataError(f"data.reviews_path and data.meta_path are required for source '{cfg.source}'")
        return sources.load_amazon_legacy(cfg.reviews_path, cfg.meta_path)
    if cfg.source == "amazon2023":
        if not cfg.category:
            raise DataError("data.category is required for source 'amazon2023' (e.g. Video_Games)")
        return sources.load_amazon_2023(
            cfg.category,
            root=cfg.root or sources.AMAZON_2023_HUB,
            official_split=cfg.protocol == "timestamp",
            cache_dir=str(Path(cfg.cache_dir) / "hub"),
        )
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

    # ------------------------------------------------------------------ facts
    @property
    def num_items(self) -> int:
        return self.table.num_items

    @property
    def num_periods(self) -> int:
        return int(self.period_rows.max()) + 1

    def item_first_period(self) -> np.ndarray:
        first = np.full(self.num_items, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, self.table.item, self.period_rows.astype(np.int64))
        return first

    def new_items(self, period: int) -> np.ndarray:
        """Items whose first interaction falls in ``period`` (what the editing callback injects)."""
        return np.flatnonzero(self.item_first_period() == period)

    def catalogue_until(self, period: int) -> np.ndarray:
        """Items known by the end of ``period``."""
        return np.flatnonzero(self.item_first_period() <= period)

    def stats(self) -> dict:
        inst = self.instances
        periods = []
        first = self.item_first_period()
        for p in range(self.num_periods):
            rows = self.period_rows == p
            sel = inst.period == p
            test = sel & (inst.split == TEST)
            ts = self.table.timestamp[rows]
            periods.append(
                {
                    "period": p,
                    "num_interactions": int(rows.sum()),
                    "num_users": len(np.unique(self.table.user[rows])),
                    "num_distinct_items": len(np.unique(self.table.item[rows])),
                    "num_new_items": int((first == p).sum()) if p > 0 else 0,
                    "num_catalogue_items": int((first <= p).sum()),
                    "time_min": int(ts.min()),
                    "time_max": int(ts.max()),
                    "num_train": int((sel & (inst.split == TRAIN)).sum()),
                    "num_valid": int((sel & (inst.split == VALID)).sum()),
                    "num_test": int(test.sum()),
                    "num_cold_test": int((test & inst.cold).sum()),
                    "num_cold_test_previous_model": int((test & inst.cold_prev).sum()),
                    "num_new_item_test": int((test & inst.new_item).sum()),
                }
            )
        return {
            "name": self.config.name,
            "source": self.config.source,
            "protocol": self.config.protocol,
            "num_users": self.table.num_users,
            "num_items": self.table.num_items,
            "num_interactions": len(self.table),
            "num_instances": len(inst),
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
            t = self.table
            cols = {"user": t.user, "item": t.item, "timestamp": t.timestamp, "period": self.period_rows}
            if t.rating is not None:
                cols["rating"] = t.rating
            if t.split is not None:
                cols["split"] = t.split
            pq.write_table(pa.table(cols), tmp / "interactions.parquet")
            items = {"item": np.arange(t.num_items), "item_id": t.item_ids.astype(str), "text": self.texts}
            for name, values in self.catalog.fields.items():
                items[name] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
            pq.write_table(pa.table(items), tmp / "items.parquet")
            pq.write_table(pa.table({"user": np.arange(t.num_users), "user_id": t.user_ids.astype(str)}),
                           tmp / "users.parquet")
            inst = self.instances
            h = inst.history.shape[1]
            history = pa.FixedSizeListArray.from_arrays(pa.array(inst.history.reshape(-1)), h)
            icols = {f.name: getattr(inst, f.name) for f in dataclasses.fields(inst) if f.name != "history"}
            icols["history"] = history
            pq.write_table(pa.table(icols), tmp / "instances.parquet")
            if embeddings is not None:
                np.save(tmp / "item_embeddings.npy", np.asarray(embeddings, dtype=np.float32))
            meta = {"format_version": FORMAT_VERSION, "report": self.report, "config": dataclasses.asdict(self.config),
                    "content_config": content_config(self.config), "fingerprint": self.fingerprint, "catalogue": self.catalogue_fingerprint,
                    "sources": source_fingerprint(self.config),
                    "embedding_model": None if embeddings is None else self.config.embedding_model}
            atomic_write_json(tmp / "meta.json", meta, sort_keys=False)
            atomic_write_json(tmp / "stats.json", self.stats(), sort_keys=False)
        return Path(output_dir)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PreparedDataset:
        from genrec.data.synthetic import SyntheticConfig

        path = Path(path)
        if not (path / "meta.json").exists():
            raise DataError(f"{path}: not a prepared dataset (no meta.json); run `genrec prepare` first")
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        cfg_dict = dict(meta["config"])
        cfg_dict["synthetic"] = SyntheticConfig(**cfg_dict["synthetic"])
        cfg = DataConfig(**cfg_dict)
        inter = pq.read_table(path / "interactions.parquet")
        items = pq.read_table(path / "items.parquet").to_pandas()
        users = pq.read_table(path / "users.parquet")
        table = InteractionTable(
            user=inter["user"].to_numpy(),
            item=inter["item"].to_numpy(),
            timestamp=inter["timestamp"].to_numpy(),
            user_ids=users["user_id"].to_numpy(zero_copy_only=False).astype(object),
            item_ids=items["item_id"].to_numpy().astype(object),
            rating=inter["rating"].to_numpy() if "rating" in inter.column_names else None,
            split=inter["split"].to_numpy() if "split" in inter.column_names else None,
        )
        fields = {c: [None if v is None else v for v in items[c]] for c in items.columns
                  if c not in ("item", "item_id", "text")}
        it = pq.read_table(path / "instances.parquet")
        hist = it["history"].combine_chunks()
        h = hist.type.list_size
        kw = {c: it[c].to_numpy() for c in it.column_names if c != "history"}
        kw["history"] = hist.flatten().to_numpy().reshape(-1, h)
        return cls(
            table=table,
            period_rows=inter["period"].to_numpy(),
            catalog=ItemCatalog(table.item_ids, fields),
            texts=list(items["text"]),
            instances=Instances(**kw),
            report=meta["report"],
            config=cfg,
            _fingerprint=meta.get("fingerprint"),
        )


def prepare(cfg: DataConfig) -> PreparedDataset:
    raw = load_raw(cfg)
    table, catalog, report = preprocess(
        raw, dedup=cfg.dedup, kcore=cfg.kcore, drop_items_without_metadata=cfg.drop_items_without_metadata
    )
    texts, fallback = item_texts(catalog, cfg.text_template)  # a template typo fails before the split
    report["items_text_fallback"] = fallback
    try:
        if cfg.protocol == "periods":
            instances, period_rows = build_period_instances(table, cfg.period_fractions, cfg.max_history)
        else:
            instances, period_rows = build_timestamp_instances(table, cfg.max_history)
    except DataError as exc:  # the builders see arrays only: name the data they came from
        raise DataError(f"{raw.source}: {exc}") from None
    return PreparedDataset(table, period_rows, catalog, texts, instances, report, cfg)


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
    if prepared_dir and not overwrite and read_marker(prepared_dir) is not None:
        path = Path(prepared_dir)
        meta = json.loads((path / "meta.json").read_text())
        hint = f"use another prepared folder, or pass overwrite to re-prepare {path}"
        require_same(meta.get("content_config") or content_config(meta["config"]), content_config(cfg), f"prepared folder {path}", hint)
        if meta.get("sources", {}) != source_fingerprint(cfg):
            raise RunMismatchError(f"prepared folder {path}: its source files changed since it was prepared "
                                   f"(size or modification time); {hint}")
        return PreparedDataset.load(path)
    ds = prepare(cfg)
    if prepared_dir:
        ds.save(prepared_dir, overwrite=overwrite)
    return ds
