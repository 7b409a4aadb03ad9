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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from genrec.data.schema import (
    ITEM_TEXT_FIELDS,
    MISSING_MARKERS,
    SPLIT_CODES,
    DataError,
    Origin,
    RawData,
    arrow_ids,
    arrow_labels,
    arrow_numbers,
    arrow_timestamps,
    check_ids,
    check_timestamps,
    check_unique_columns,
    first_bad,
    is_id_value,
    require_columns,
    show,
)
from genrec.data.stream import Chunk, Stream, StringVocab

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


CHUNK_ROWS = 1 << 20  # rows per chunk a reader yields (prepare passes one sized from the memory budget)


class _Rows:
    """One chunk of an interaction file: its arrow columns, checked on arrow's fast path, with the pandas checks of
    ``schema`` as the fallback that names the bad row. ``frame()`` gives the chunk as pandas would have read it
    (same type inference), built only when a fast path declines."""

    def __init__(self, batch, where: Origin, frame: Callable[[], pd.DataFrame]):
        self.batch, self.where, self._frame_fn, self._frame = batch, where, frame, None
        self.names = list(batch.schema.names)

    def __len__(self) -> int:
        return self.batch.num_rows

    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            self._frame = self._frame_fn()
        return self._frame

    def col(self, name: str):
        return self.batch.column(self.names.index(name))

    def ids(self, name: str) -> pa.Array:
        ids = arrow_ids(self.col(name))
        if ids is None:
            ids = pa.array(check_ids(self.frame()[name], self.where, name).to_numpy(dtype=object), pa.string())
        return ids

    def timestamps(self, name: str) -> np.ndarray:
        ts = arrow_timestamps(self.col(name))
        return ts if ts is not None else check_timestamps(self.frame()[name], self.where, name)

    def ratings(self, name: str, counts: dict[str, int]) -> np.ndarray:
        values = arrow_numbers(self.col(name))
        if values is None:
            return _ratings(self.frame()[name], counts)
        values = values.astype(np.float32)
        counts["ratings_missing_or_not_numeric"] = counts.get("ratings_missing_or_not_numeric", 0) + int(
            np.isnan(values).sum())
        return values

    def split_labels(self, name: str) -> np.ndarray:
        codes = arrow_labels(self.col(name), SPLIT_CODES)
        if codes is None:
            labels = self.frame()[name]
            _check_split_labels(labels, self.where)
            codes = labels.map(SPLIT_CODES).to_numpy().astype(np.int8)
        return codes


def _table_rows(path: Path, required: tuple[str, ...], rows: int = CHUNK_ROWS) -> Iterator[_Rows]:
    """CSV or parquet chunk by chunk, with the required columns, each named once; rows numbered as the user sees
    them (CSV: data row i is file line i + 2, after the header; parquet: row i + 1)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    parquet = path.suffix == ".parquet"
    first, offset = (1 if parquet else 2), 0
    batches = _open_table(path, parquet, rows)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(path, parquet, exc) from None
        if batch is None:
            break
        if batch.num_rows == 0:
            continue
        if offset == 0:
            require_columns(batch.schema.names, required, str(path))
        frame = (lambda b=batch: b.to_pandas()) if parquet else (lambda o=offset, k=batch.num_rows: _csv_frame(
            path, o, k))
        yield _Rows(batch, Origin(str(path), first=first + offset), frame)
        offset += batch.num_rows
    if offset == 0:
        raise DataError(f"{path}: file has a header but no rows")


def _open_table(path: Path, parquet: bool, rows: int) -> Iterator:
    try:
        if parquet:
            pf = pq.ParquetFile(path)
            check_unique_columns(pf.schema_arrow.names, str(path))
            return pf.iter_batches(batch_size=rows)
        header = pd.read_csv(path, header=None, nrows=1, dtype=str).iloc[0].tolist()
        check_unique_columns(header, str(path))
        # every column as text, '' never null: the same cells pandas sees with keep_default_na=False
        types = {n if isinstance(n, str) else "": pa.string() for n in header}
        return pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=max(rows * 32, 1 << 16)),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),  # quoted cells may span lines, as in pandas
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, pa.ArrowException) as exc:
        raise _unreadable(path, parquet, exc) from None


def _csv_frame(path: Path, offset: int, nrows: int) -> pd.DataFrame:
    # no NA guessing: an id cell reads as written ('' for empty), check_ids decides what is missing
    return pd.read_csv(path, dtype={"user_id": str, "item_id": str, "split": str}, keep_default_na=False,
                       skiprows=range(1, offset + 1), nrows=nrows)


def _unreadable(path: Path, parquet: bool, exc: Exception) -> DataError:
    """The reading error in pandas' words where pandas fails too (it names the file line)."""
    if not parquet and isinstance(exc, pa.ArrowException):
        try:
            for _ in pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS):
                pass
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as pd_exc:
            exc = pd_exc
    kind = "parquet" if parquet else (path.suffix.lstrip(".") or "csv")
    return DataError(f"{path}: cannot be read as {kind} ({_one_line(exc)})")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _read_json_lines(path: Path, allow_python_literals: bool = False) -> tuple[list[dict], np.ndarray]:
    """JSON objects, one a line (optionally gzip), and the line number of each (blank lines are skipped).

    Amazon 2014 meta files hold Python dict literals, hence the fallback.
    """
    rows, lines = [], []
    for part, part_lines in _json_line_chunks(path, allow_python_literals):
        rows += part
        lines.append(part_lines)
    return rows, np.concatenate(lines)


def _json_line_chunks(path: Path, allow_python_literals: bool = False, rows: int = CHUNK_ROWS
                      ) -> Iterator[tuple[list[dict], np.ndarray]]:
    """``_read_json_lines`` in chunks of ``rows`` objects."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    part, lines, total = [], [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if line:
                    part.append(_parse_object(line, path, lineno, allow_python_literals))
                    lines.append(lineno)
                if len(part) >= rows:
                    total += len(part)
                    yield part, np.asarray(lines, dtype=np.int64)
                    part, lines = [], []
    except (UnicodeDecodeError, OSError, EOFError) as exc:  # not UTF-8, or a truncated / non-gzip .gz
        raise DataError(f"{path}: cannot be read as UTF-8 JSON lines ({_one_line(exc)})") from None
    if part or not total:
        if not part:
            raise DataError(f"{path}: file is empty")
        yield part, np.asarray(lines, dtype=np.int64)


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


def _encode(rows: _Rows, cols: tuple[str, str, str], stream: Stream) -> Chunk:
    """user, item codes and timestamps (checked) from the source's column names."""
    user, item, time = cols
    u, i = rows.ids(user), rows.ids(item)
    return Chunk(stream.users.encode(u), stream.item_vocab.encode(i), rows.timestamps(time))


def _new_stream(source: str, items: Callable[[], pd.DataFrame]) -> Stream:
    return Stream(iter(()), items, source, StringVocab(), StringVocab())


# ----------------------------------------------------------------------------- local canonical files
def stream_local(root: str | Path, use_splits: bool = False, rows: int = CHUNK_ROWS) -> Stream:
    """Canonical layout (see ../shared/data/README.md) chunk by chunk; ``use_splits`` reads ``splits.csv``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (expected interactions.csv|parquet and items.jsonl)")
    path = root / "splits.csv" if use_splits else _interactions_path(root)
    required = ("user_id", "item_id", "timestamp") + (("split",) if use_splits else ())
    items_path = root / "items.jsonl"

    def items() -> pd.DataFrame:
        found, lines = _read_json_lines(items_path)
        return _items_frame(found, "item_id", {}, Origin(str(items_path), lines=lines), unique=True)

    stream = _new_stream(str(root), items)

    def chunks():
        for part in _table_rows(path, required, rows):
            split = part.split_labels("split") if use_splits else None
            chunk = _encode(part, ("user_id", "item_id", "timestamp"), stream)
            chunk.split = split
            if "rating" in part.names:  # optional; other extra columns are not used
                chunk.rating = part.ratings("rating", stream.counts)
            yield chunk

    stream.chunks = chunks()
    return stream


def load_local(root: str | Path, use_splits: bool = False) -> RawData:
    """``stream_local`` as one frame."""
    return stream_local(root, use_splits).to_raw()


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
LEGACY_COLUMNS = ("reviewerID", "asin", "unixReviewTime")


def stream_amazon_legacy(reviews_path: str | Path, meta_path: str | Path, rows: int = CHUNK_ROWS) -> Stream:
    """Amazon Reviews 2014 / 2018: reviews (reviewerID, asin, unixReviewTime, overall) + meta (asin, title, ...)."""
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)

    def items() -> pd.DataFrame:
        meta_rows, meta_lines = _read_json_lines(meta_path, allow_python_literals=True)
        # 2014 meta: categories is a list of lists; 2018 meta: 'category' list and 'description' list.
        for r in meta_rows:
            if "categories" not in r and "category" in r:
                r["categories"] = r["category"]
        # the 2018 meta files repeat some asins: kept here, dropped (and counted) by preprocessing
        return _items_frame(meta_rows, "asin", {}, Origin(str(meta_path), lines=meta_lines))

    stream = _new_stream(f"{reviews_path} + {meta_path}", items)

    def chunks():
        parts = _json_line_chunks(reviews_path, rows=rows)
        keys: dict = {}  # every key seen so far, in order: the columns one frame of the whole file would have
        rated, unrated = False, 0  # a rating column exists once a line has 'overall'; earlier rows then miss it
        for found, lines in parts:
            df = pd.DataFrame(found)
            keys.update(dict.fromkeys(df.columns))
            for c in LEGACY_COLUMNS:
                if c not in df:
                    _require_later(c, keys, parts, reviews_path)
                    df[c] = None  # the key comes later in the file: these rows miss it (named by check_ids)
            where = Origin(str(reviews_path), lines=lines)
            user, item = (pa.array(check_ids(df[c], where, c).to_numpy(dtype=object), pa.string())
                          for c in LEGACY_COLUMNS[:2])
            chunk = Chunk(stream.users.encode(user), stream.item_vocab.encode(item),
                          check_timestamps(df[LEGACY_COLUMNS[2]], where, LEGACY_COLUMNS[2]))
            if "overall" in df:
                chunk.rating = _ratings(df["overall"], stream.counts)
                stream.counts["ratings_missing_or_not_numeric"] += 0 if rated else unrated
                rated = True
            elif rated:
                stream.counts["ratings_missing_or_not_numeric"] += len(df)
            else:
                unrated += len(df)
            yield chunk

    stream.chunks = chunks()
    return stream


def _require_later(column: str, keys: dict, parts: Iterator, path: Path) -> None:
    """A required key absent from a chunk: an error naming the missing column unless a later line has it."""
    if column in keys:
        return
    for found, _ in parts:
        for row in found:
            keys.update(dict.fromkeys(row))
        if column in keys:
            return
    require_columns(list(keys), LEGACY_COLUMNS, str(path))


def load_amazon_legacy(reviews_path: str | Path, meta_path: str | Path) -> RawData:
    return stream_amazon_legacy(reviews_path, meta_path).to_raw()


# ----------------------------------------------------------------------------- Amazon 2023 (hub)
AMAZON_2023_HUB = "hf://datasets/McAuley-Lab/Amazon-Reviews-2023"


def _hf_datasets(kind: str, files: dict[str, str], cache_dir: str | None):
    """The files as ``datasets`` splits (Arrow, memory-mapped from the cache: read in chunks without a copy)."""
    import datasets

    try:
        return datasets.load_dataset(kind, data_files=files, cache_dir=cache_dir)
    except FileNotFoundError as exc:
        raise DataError(f"Amazon 2023 files not found: {files} ({exc})") from None


def _hf_files(kind: str, files: dict[str, str], cache_dir: str | None) -> dict[str, pd.DataFrame]:
    ds = _hf_datasets(kind, files, cache_dir)
    return {split: ds[split].to_pandas() for split in files}


def stream_amazon_2023(
    category: str,
    root: str = AMAZON_2023_HUB,
    official_split: bool = True,
    kcore: str = "5core",
    cache_dir: str | None = None,
    rows: int = CHUNK_ROWS,
) -> Stream:
    """Amazon Reviews 2023 for one category, chunk by chunk.

    ``official_split``: the benchmark's absolute-timestamp split CSVs
    (``benchmark/<kcore>/timestamp_w_his/<category>.{train,valid,test}.csv``: user_id, parent_asin, rating, timestamp
    [ms], history) give one interaction per row with its split label. Otherwise the raw review JSONL
    (``raw/review_categories/<category>.jsonl``) is read and split by periods later.
    Item text always comes from ``raw/meta_categories/meta_<category>.jsonl``.
    """
    root = root.rstrip("/")
    if official_split:
        base = f"{root}/benchmark/{kcore}/timestamp_w_his/{category}"
        files = {s: (f"{base}.{s}.csv", 2) for s in ("train", "valid", "test")}
        kind = "csv"
    else:
        files = {"full": (f"{root}/raw/review_categories/{category}.jsonl", 1)}
        kind = "json"
    ds = _hf_datasets(kind, {s: f for s, (f, _) in files.items()}, cache_dir)
    meta_path = f"{root}/raw/meta_categories/meta_{category}.jsonl"

    def items() -> pd.DataFrame:
        meta = _hf_files("json", {"full": meta_path}, cache_dir)["full"]
        require_columns(meta, ("parent_asin",), meta_path)
        if "store" in meta and "brand" not in meta:
            meta["brand"] = meta["store"]
        if "features" in meta:  # the GenRecEdit text uses title, features, categories, description
            descriptions = meta["description"] if "description" in meta else [None] * len(meta)
            meta["description"] = [clean_text([clean_text(f), clean_text(d)])
                                   for f, d in zip(meta["features"], descriptions)]
        return _items_frame(meta.to_dict("records"), "parent_asin", {}, Origin(meta_path, first=1))

    stream = _new_stream(f"{root} ({category})", items)

    def chunks():
        for split, (path, first) in files.items():
            data = ds[split]
            require_columns(data.column_names, ("user_id", "parent_asin", "timestamp"), path)
            offset, frames = 0, data.with_format("pandas")  # pandas as `datasets` decodes it (e.g. Json cells)
            for batch in data.with_format("arrow").iter(batch_size=rows):
                part = _Rows(batch, Origin(path, first=first + offset),
                             lambda o=offset, k=batch.num_rows, f=frames: f[o:o + k].reset_index(drop=True))
                chunk = _encode(part, ("user_id", "parent_asin", "timestamp"), stream)
                if "rating" in part.names:
                    chunk.rating = part.ratings("rating", stream.counts)
                if official_split:
                    chunk.split = np.full(len(part), SPLIT_CODES[split], dtype=np.int8)
                offset += len(part)
                yield chunk

    stream.chunks = chunks()
    return stream


def load_amazon_2023(category: str, root: str = AMAZON_2023_HUB, official_split: bool = True, kcore: str = "5core",
                     cache_dir: str | None = None) -> RawData:
    """``stream_amazon_2023`` as one time-sorted frame."""
    return stream_amazon_2023(category, root, official_split, kcore, cache_dir).to_raw(sort=True)
