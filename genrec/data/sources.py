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
import pyarrow as pa
import pyarrow.parquet as pq

from genrec.data.schema import (
    ITEM_TEXT_FIELDS,
    MISSING_MARKERS,
    SPLIT_CODES,
    DataError,
    Origin,
    RawData,
    check_ids,
    check_timestamps,
    check_unique_columns,
    first_bad,
    is_id_value,
    require_columns,
    show,
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


def _read_table(path: Path, required: tuple[str, ...]) -> tuple[pd.DataFrame, Origin]:
    """CSV or parquet with the required columns, each named once; the Origin numbers rows as the user sees them."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        if path.suffix == ".parquet":
            check_unique_columns(pq.read_schema(path).names, str(path))
            df, where = pd.read_parquet(path), Origin(str(path), first=1)
        else:
            check_unique_columns(pd.read_csv(path, header=None, nrows=1, dtype=str).iloc[0].tolist(), str(path))
            # no NA guessing: an id cell reads as written ('' for empty), check_ids decides what is missing
            df = pd.read_csv(path, dtype={"user_id": str, "item_id": str, "split": str}, keep_default_na=False)
            where = Origin(str(path), first=2)  # data row i is file line i + 2 (after the header)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot be read as {path.suffix.lstrip('.') or 'csv'} ({_one_line(exc)})") from None
    if len(df) == 0:
        raise DataError(f"{path}: file has a header but no rows")
    require_columns(df, required, str(path))
    return df, where


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _read_json_lines(path: Path, allow_python_literals: bool = False) -> tuple[list[dict], np.ndarray]:
    """JSON objects, one a line (optionally gzip), and the line number of each (blank lines are skipped).

    Amazon 2014 meta files hold Python dict literals, hence the fallback.
    """
    if not path.exists():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    rows, lines = [], []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if line:
                    rows.append(_parse_object(line, path, lineno, allow_python_literals))
                    lines.append(lineno)
    except (UnicodeDecodeError, OSError, EOFError) as exc:  # not UTF-8, or a truncated / non-gzip .gz
        raise DataError(f"{path}: cannot be read as UTF-8 JSON lines ({_one_line(exc)})") from None
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows, np.asarray(lines, dtype=np.int64)


def _parse_object(line: str, path: Path, lineno: int, allow_python_literals: bool) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        if not allow_python_literals:
            raise DataError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
        try:
            value = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(f"{path}: line {lineno}: neither JSON nor a Python dict literal") from None
    if not isinstance(value, dict):
        raise DataError(
            f"{path}: line {lineno}: expected a JSON object ({{\"key\": value, ...}}), got a {_json_kind(value)}: "
            f"{_clip(line)}"
        )
    return value


def _json_kind(value) -> str:
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _items_frame(
    rows: list[dict], id_key: str, mapping: dict[str, str], where: Origin, unique: bool = False
) -> pd.DataFrame:
    """Select and clean text fields; ``mapping`` maps our field name → source key.

    ``unique``: a repeated id is an error (in a hand-made catalogue the first row would silently win); other
    sources keep the repeats and preprocessing drops and counts them.
    """
    out = {"item_id": []}
    for name in ITEM_TEXT_FIELDS:
        out[name] = []
    first_pos: dict[str, int] = {}
    for i, row in enumerate(rows):
        item_id = _item_id(row, id_key, where, i)
        if unique and first_pos.setdefault(item_id, i) != i:
            j = first_pos[item_id]
            raise DataError(
                f"{where.at(i, id_key)}: duplicate item id {item_id!r} (first on {where.place(j)}); "
                f"keep one row per item"
            )
        out["item_id"].append(item_id)
        for name in ITEM_TEXT_FIELDS:
            out[name].append(clean_text(row.get(mapping.get(name, name))))
    return pd.DataFrame(out)


def _item_id(row: dict, id_key: str, where: Origin, pos: int) -> str:
    """A non-empty string or integer id (an int matches the same digits in the interactions)."""
    if id_key not in row:
        raise DataError(f"{where.source}: {where.place(pos)}: missing field '{id_key}'")
    value = row[id_key]
    if not is_id_value(value):
        raise DataError(f"{where.at(pos, id_key)}: expected a string or integer id, got {show(value)}")
    item_id = str(value)
    if not item_id.strip() or item_id in MISSING_MARKERS:
        raise DataError(f"{where.at(pos, id_key)}: expected a non-empty id, got {item_id!r}")
    return item_id


def _ratings(values: pd.Series, counts: dict[str, int]) -> np.ndarray:
    """Ratings coerced to float; the NaNs (missing or not a number) are counted for the report, not dropped."""
    numeric = pd.to_numeric(values, errors="coerce").astype(np.float32)
    counts["ratings_missing_or_not_numeric"] = counts.get("ratings_missing_or_not_numeric", 0) + int(
        numeric.isna().sum()
    )
    return numeric.to_numpy()


def _interactions(df: pd.DataFrame, cols: tuple[str, str, str], where: Origin) -> pd.DataFrame:
    """user_id, item_id (checked strings) and timestamp (checked int64) from the source's column names."""
    user, item, time = cols
    return pd.DataFrame(
        {
            "user_id": check_ids(df[user], where, user).to_numpy(),
            "item_id": check_ids(df[item], where, item).to_numpy(),
            "timestamp": check_timestamps(df[time], where, time),
        }
    )


# ----------------------------------------------------------------------------- local canonical files
def load_local(root: str | Path, use_splits: bool = False) -> RawData:
    """Canonical layout (see ../shared/data/README.md); ``use_splits`` reads ``splits.csv`` with its labels."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (expected interactions.csv|parquet and items.jsonl)")
    if use_splits:
        path = root / "splits.csv"
        df, where = _read_table(path, ("user_id", "item_id", "timestamp", "split"))
        _check_split_labels(df["split"], where)
    else:
        path = _interactions_path(root)
        df, where = _read_table(path, ("user_id", "item_id", "timestamp"))
    inter, counts = _interactions(df, ("user_id", "item_id", "timestamp"), where), {}
    if use_splits:
        inter["split"] = df["split"].to_numpy()
    if "rating" in df:  # optional; other extra columns are not used
        inter["rating"] = _ratings(df["rating"], counts)
    items_path = root / "items.jsonl"
    rows, lines = _read_json_lines(items_path)
    items = _items_frame(rows, "item_id", {}, Origin(str(items_path), lines=lines), unique=True)
    return RawData(inter, items, str(root), counts)


def _interactions_path(root: Path) -> Path:
    csv, parquet = root / "interactions.csv", root / "interactions.parquet"
    if csv.exists() and parquet.exists():
        raise DataError(
            f"{root}: both interactions.csv and interactions.parquet are present; keep one (which one is meant is "
            f"ambiguous)"
        )
    return parquet if parquet.exists() else csv


def _check_split_labels(labels: pd.Series, where: Origin) -> None:
    bad = ~labels.isin(list(SPLIT_CODES))
    if bad.any():
        pos, more = first_bad(bad, "rows")
        value = labels.iloc[pos]
        got = "'' (missing label)" if pd.isna(value) or not str(value).strip() else show(value)
        raise DataError(f"{where.at(pos, 'split')}: expected one of {list(SPLIT_CODES)}, got {got}{more}")


# ----------------------------------------------------------------------------- Amazon 2014 / 2018
def load_amazon_legacy(reviews_path: str | Path, meta_path: str | Path) -> RawData:
    """Amazon Reviews 2014 / 2018: reviews (reviewerID, asin, unixReviewTime, overall) + meta (asin, title, ...)."""
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    rows, lines = _read_json_lines(reviews_path)
    df = pd.DataFrame(rows)
    require_columns(df, ("reviewerID", "asin", "unixReviewTime"), str(reviews_path))
    out = _interactions(df, ("reviewerID", "asin", "unixReviewTime"), Origin(str(reviews_path), lines=lines))
    counts: dict[str, int] = {}
    if "overall" in df:
        out["rating"] = _ratings(df["overall"], counts)
    meta_rows, meta_lines = _read_json_lines(meta_path, allow_python_literals=True)
    # 2014 meta: categories is a list of lists; 2018 meta: 'category' list and 'description' list.
    for r in meta_rows:
        if "categories" not in r and "category" in r:
            r["categories"] = r["category"]
    # the 2018 meta files repeat some asins: kept here, dropped (and counted) by preprocessing
    items = _items_frame(meta_rows, "asin", {}, Origin(str(meta_path), lines=meta_lines))
    return RawData(out, items, f"{reviews_path} + {meta_path}", counts)


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
    counts: dict[str, int] = {}
    if official_split:
        base = f"{root}/benchmark/{kcore}/timestamp_w_his/{category}"
        frames = _hf_files("csv", {s: f"{base}.{s}.csv" for s in ("train", "valid", "test")}, cache_dir)
        parts = []
        for split, df in frames.items():
            where = Origin(f"{base}.{split}.csv", first=2)
            part = _hub_interactions(df, where, counts)
            part["split"] = split
            parts.append(part)
        inter = pd.concat(parts, ignore_index=True)
    else:
        path = f"{root}/raw/review_categories/{category}.jsonl"
        df = _hf_files("json", {"full": path}, cache_dir)["full"]
        inter = _hub_interactions(df, Origin(path, first=1), counts)
    meta_path = f"{root}/raw/meta_categories/meta_{category}.jsonl"
    meta = _hf_files("json", {"full": meta_path}, cache_dir)["full"]
    require_columns(meta, ("parent_asin",), meta_path)
    if "store" in meta and "brand" not in meta:
        meta["brand"] = meta["store"]
    if "features" in meta:  # the GenRecEdit text uses title, features, categories, description
        descriptions = meta["description"] if "description" in meta else [None] * len(meta)
        meta["description"] = [clean_text([clean_text(f), clean_text(d)]) for f, d in zip(meta["features"], descriptions)]
    items = _items_frame(meta.to_dict("records"), "parent_asin", {}, Origin(meta_path, first=1))
    inter = inter.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return RawData(inter, items, f"{root} ({category})", counts)


def _hub_interactions(df: pd.DataFrame, where: Origin, counts: dict[str, int]) -> pd.DataFrame:
    """user_id, parent_asin, timestamp [ms], optional rating of one Amazon 2023 file."""
    require_columns(df, ("user_id", "parent_asin", "timestamp"), where.source)
    out = _interactions(df, ("user_id", "parent_asin", "timestamp"), where)
    if "rating" in df:
        out["rating"] = _ratings(df["rating"], counts)
    return out
