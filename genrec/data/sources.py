"""Readers for every supported source, all returning a ``RawData``.

* local canonical files (``interactions.csv|parquet`` + ``items.jsonl`` [+ ``splits.csv``]): bring your own data;
* Amazon Reviews 2014 / 2018 review + meta files (json / json.gz, local paths);
* Amazon Reviews 2023 from the Hugging Face hub (``hf://datasets/McAuley-Lab/Amazon-Reviews-2023``) read with
  ``datasets`` data files, no loading script; any folder with the same relative layout works offline.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from genrec.data.schema import (
    ITEM_TEXT_FIELDS,
    SPLIT_CODES,
    DataError,
    RawData,
    check_timestamps,
    require_columns,
)

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def clean_text(value) -> str | None:
    """Flatten lists, unescape HTML, strip tags and collapse whitespace; None when empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        flat = []
        for v in value:
            c = clean_text(v)
            if c:
                flat.append(c)
        value = ", ".join(flat)
    text = _SPACE.sub(" ", _TAG.sub(" ", html.unescape(str(value)))).strip()
    return text or None


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype={"user_id": str, "item_id": str})
    if len(df) == 0:
        raise DataError(f"{path}: file has a header but no rows")
    return df


def _read_json_lines(path: Path, allow_python_literals: bool = False) -> list[dict]:
    """JSON lines (optionally gzip); Amazon 2014 meta files hold Python dict literals, hence the fallback."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if not allow_python_literals:
                    raise DataError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
                try:
                    rows.append(ast.literal_eval(line))
                except (ValueError, SyntaxError):
                    raise DataError(f"{path}: line {lineno}: neither JSON nor a Python dict literal") from None
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def _items_frame(rows: list[dict], id_key: str, mapping: dict[str, str], source: str) -> pd.DataFrame:
    """Select and clean text fields; ``mapping`` maps our field name → source key."""
    out = {"item_id": []}
    for name in ITEM_TEXT_FIELDS:
        out[name] = []
    for i, row in enumerate(rows):
        if id_key not in row:
            raise DataError(f"{source}: row {i + 1}: missing field '{id_key}'")
        out["item_id"].append(str(row[id_key]))
        for name in ITEM_TEXT_FIELDS:
            out[name].append(clean_text(row.get(mapping.get(name, name))))
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- local canonical files
def load_local(root: str | Path, use_splits: bool = False) -> RawData:
    """Canonical layout (see ../shared/data/README.md); ``use_splits`` reads ``splits.csv`` with its labels."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (expected interactions.csv|parquet and items.jsonl)")
    if use_splits:
        path = root / "splits.csv"
        df = _read_table(path)
        require_columns(df, ("user_id", "item_id", "timestamp", "split"), str(path))
        unknown = ~df["split"].isin(list(SPLIT_CODES))
        if unknown.any():
            pos = int(np.flatnonzero(unknown.to_numpy())[0])
            raise DataError(
                f"{path}: row {pos + 2}, column 'split': expected one of {list(SPLIT_CODES)}, got {df['split'].iloc[pos]!r}"
            )
    else:
        path = root / "interactions.parquet" if (root / "interactions.parquet").exists() else root / "interactions.csv"
        df = _read_table(path)
        require_columns(df, ("user_id", "item_id", "timestamp"), str(path))
    df["timestamp"] = check_timestamps(df["timestamp"], str(path))
    df["user_id"] = df["user_id"].astype(str)
    df["item_id"] = df["item_id"].astype(str)
    items_path = root / "items.jsonl"
    rows = _read_json_lines(items_path)
    items = _items_frame(rows, "item_id", {}, str(items_path))
    return RawData(df, items, str(root))


# ----------------------------------------------------------------------------- Amazon 2014 / 2018
def load_amazon_legacy(reviews_path: str | Path, meta_path: str | Path) -> RawData:
    """Amazon Reviews 2014 / 2018: reviews (reviewerID, asin, unixReviewTime, overall) + meta (asin, title, ...)."""
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    rows = _read_json_lines(reviews_path)
    df = pd.DataFrame(rows)
    require_columns(df, ("reviewerID", "asin", "unixReviewTime"), str(reviews_path))
    out = pd.DataFrame(
        {
            "user_id": df["reviewerID"].astype(str),
            "item_id": df["asin"].astype(str),
            "timestamp": check_timestamps(df["unixReviewTime"], str(reviews_path), "unixReviewTime", 1),
        }
    )
    if "overall" in df:
        out["rating"] = pd.to_numeric(df["overall"], errors="coerce").astype(np.float32)
    meta_rows = _read_json_lines(meta_path, allow_python_literals=True)
    # 2014 meta: categories is a list of lists; 2018 meta: 'category' list and 'description' list.
    for r in meta_rows:
        if "categories" not in r and "category" in r:
            r["categories"] = r["category"]
    items = _items_frame(meta_rows, "asin", {}, str(meta_path))
    return RawData(out, items, f"{reviews_path} + {meta_path}")


# ----------------------------------------------------------------------------- Amazon 2023 (hub)
AMAZON_2023_HUB = "hf://datasets/McAuley-Lab/Amazon-Reviews-2023"


def _hf_files(kind: str, files: dict[str, str], cache_dir: str | None) -> dict[str, pd.DataFrame]:
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=files, cache_dir=cache_dir)
    except FileNotFoundError as exc:
        raise DataError(f"Amazon 2023 files not found: {files} ({exc})") from None
    return {split: ds[split].to_pandas() for split in files}


def load_amazon_2023(
    category: str,
    root: str = AMAZON_2023_HUB,
    official_split: bool = True,
    kcore: str = "5core",
    cache_dir: str | None = None,
) -> RawData:
    """Amazon Reviews 2023 for one category.

    ``official_split``: the benchmark's absolute-timestamp split CSVs
    (``benchmark/<kcore>/timestamp_w_his/<category>.{train,valid,test}.csv``: user_id, parent_asin, rating, timestamp
    [ms], history) give one interaction per row with its split label. Otherwise the raw review JSONL
    (``raw/review_categories/<category>.jsonl``) is read and split by periods later.
    Item text always comes from ``raw/meta_categories/meta_<category>.jsonl``.
    """
    root = root.rstrip("/")
    if official_split:
        base = f"{root}/benchmark/{kcore}/timestamp_w_his/{category}"
        frames = _hf_files("csv", {s: f"{base}.{s}.csv" for s in ("train", "valid", "test")}, cache_dir)
        parts = []
        for split, df in frames.items():
            require_columns(df, ("user_id", "parent_asin", "timestamp"), f"{base}.{split}.csv")
            part = pd.DataFrame(
                {
                    "user_id": df["user_id"].astype(str),
                    "item_id": df["parent_asin"].astype(str),
                    "timestamp": check_timestamps(df["timestamp"], f"{base}.{split}.csv"),
                    "split": split,
                }
            )
            if "rating" in df:
                part["rating"] = pd.to_numeric(df["rating"], errors="coerce").astype(np.float32)
            parts.append(part)
        inter = pd.concat(parts, ignore_index=True)
    else:
        path = f"{root}/raw/review_categories/{category}.jsonl"
        df = _hf_files("json", {"full": path}, cache_dir)["full"]
        require_columns(df, ("user_id", "parent_asin", "timestamp"), path)
        inter = pd.DataFrame(
            {
                "user_id": df["user_id"].astype(str),
                "item_id": df["parent_asin"].astype(str),
                "timestamp": check_timestamps(df["timestamp"], path),
            }
        )
        if "rating" in df:
            inter["rating"] = pd.to_numeric(df["rating"], errors="coerce").astype(np.float32)
    meta_path = f"{root}/raw/meta_categories/meta_{category}.jsonl"
    meta = _hf_files("json", {"full": meta_path}, cache_dir)["full"]
    require_columns(meta, ("parent_asin",), meta_path)
    if "store" in meta and "brand" not in meta:
        meta["brand"] = meta["store"]
    if "features" in meta:  # the GenRecEdit text uses title, features, categories, description
        meta["description"] = [
            clean_text([clean_text(f), clean_text(d)]) for f, d in zip(meta["features"], meta.get("description", []))
        ]
    items = _items_frame(meta.to_dict("records"), "parent_asin", {}, meta_path)
    inter = inter.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return RawData(inter, items, f"{root} ({category})")
