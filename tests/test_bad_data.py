"""Bad input data is refused at load time with one line naming the file, the row / line, the field, what was
expected and what was found; the valid edge cases next to each still load."""

import csv
import gzip
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrec.data.config import DataConfig
from genrec.data.pipeline import prepare
from genrec.data.preprocess import preprocess
from genrec.data.schema import MAX_TIMESTAMP, DataError
from genrec.data.sources import load_amazon_2023, load_amazon_legacy, load_local
from genrec.data.splits import build_period_instances, build_timestamp_instances, check_instances
from genrec.data.synthetic import SyntheticConfig
from genrec.data.text import item_texts
from genrec.errors import ConfigError, GenrecError

# two users with 4 interactions each: with one period every split is non-empty
GOOD = [("a", "i1", 1), ("b", "i2", 2), ("a", "i2", 3), ("b", "i3", 4),
        ("a", "i3", 5), ("b", "i1", 6), ("a", "i4", 7), ("b", "i4", 8)]


def write_folder(root, rows=GOOD, items=None, splits=None, header=("user_id", "item_id", "timestamp")):
    """A canonical folder from Python lists; ``items`` entries are JSON values (dicts) or raw line strings."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "interactions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    if items is None:
        items = [{"item_id": it, "title": f"title {it}"} for it in sorted({str(r[1]) for r in rows})]
    with open(root / "items.jsonl", "w") as fh:
        fh.writelines((it if isinstance(it, str) else json.dumps(it)) + "\n" for it in items)
    if splits is not None:
        with open(root / "splits.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("user_id", "item_id", "timestamp", "split"), *splits])
    return root


def raises(match, fn, *args, exc=DataError, **kw):
    """The error type, a message matching ``match`` and on one line."""
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value) and isinstance(info.value, GenrecError)
    return str(info.value)


def local_cfg(root, **kw):
    return DataConfig(source="local", root=str(root), period_fractions=[1.0], **kw)


# ----------------------------------------------------------------------------- 1. empty / missing ids
@pytest.mark.parametrize("value", ["", "   ", "nan", "None"])
@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_empty_or_missing_id_in_csv_names_row_and_column(tmp_path, value, column):
    rows = list(GOOD)
    rows[5] = (value, "i1", 6) if column == "user_id" else ("b", value, 6)  # data row 5 → file line 7
    root = write_folder(tmp_path / "d", rows, items=[{"item_id": "i1", "title": "t"}])
    raises(rf"interactions.csv: row 7, column '{column}': expected a non-empty id, got {re.escape(repr(value))}$",
           load_local, root)


def test_null_id_in_parquet_names_row(tmp_path):
    root = write_folder(tmp_path / "d")
    df = pd.DataFrame(GOOD, columns=["user_id", "item_id", "timestamp"]).astype({"user_id": object})
    df.loc[2, "user_id"] = None
    (root / "interactions.csv").unlink()
    df.to_parquet(root / "interactions.parquet")
    raises(r"interactions.parquet: row 3, column 'user_id': expected a non-empty id, got ''$", load_local, root)


def test_many_bad_rows_are_counted_and_the_first_shown(tmp_path):
    rows = [("", "i1", 1), ("a", "i2", 2), ("", "i3", 3)]
    msg = raises(r"row 2, column 'user_id'", load_local, write_folder(tmp_path / "d", rows))
    assert "(2 rows like this; first shown)" in msg


def test_float_ids_in_parquet_are_refused(tmp_path):
    root = write_folder(tmp_path / "d")
    (root / "interactions.csv").unlink()
    df = pd.DataFrame({"user_id": ["a", "b"], "item_id": [1.5, 2.0], "timestamp": [1, 2]})
    df.to_parquet(root / "interactions.parquet")
    raises(r"interactions.parquet: row 1, column 'item_id': expected a string or integer id, got 1.5", load_local, root)


def test_int_ids_in_parquet_and_items_jsonl_match_csv_style_ids(tmp_path):
    rows = [(u, i, t) for (u, _, t), i in zip(GOOD, [10, 20, 20, 30, 30, 10, 40, 40])]
    root = write_folder(tmp_path / "d", rows, items=[{"item_id": i, "title": f"t{i}"} for i in (10, 20, 30, 40)])
    raw = load_local(root)
    assert set(raw.interactions["item_id"]) == set(raw.items["item_id"]) == {"10", "20", "30", "40"}
    (root / "interactions.csv").unlink()
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_parquet(root / "interactions.parquet")
    ds = prepare(local_cfg(root))
    assert ds.report["interactions_on_items_without_metadata"] == 0 and ds.texts[0].startswith("t10")


# ----------------------------------------------------------------------------- 2. timestamps
@pytest.mark.parametrize("value, shown", [
    ("inf", "inf"), ("-inf", "-inf"), ("nan", "'nan'"), ("", "''"), ("1.5", "1.5"), ("-1", "-1"),
    ("1e20", "1e+20"), (str(2**63), None), ("12:30", "'12:30'"),
])
def test_bad_timestamp_names_row_and_shows_value(tmp_path, value, shown):
    rows = list(GOOD)
    rows[3] = ("b", "i3", value)
    msg = raises(r"interactions.csv: row 5, column 'timestamp': expected a non-negative integer \(unix time\) "
                 r"up to 2\*\*62, got ", load_local, write_folder(tmp_path / "d", rows))
    if shown is not None:
        assert msg.endswith(f"got {shown}")


def test_large_integer_timestamps_stay_exact(tmp_path):
    rows = [("a", "i1", MAX_TIMESTAMP - 1), ("a", "i2", MAX_TIMESTAMP), ("b", "i1", 10)]
    raw = load_local(write_folder(tmp_path / "d", rows))
    assert raw.interactions["timestamp"].tolist() == [MAX_TIMESTAMP - 1, MAX_TIMESTAMP, 10]
    assert raw.interactions["timestamp"].dtype == np.int64
    raw = load_local(write_folder(tmp_path / "e", [("a", "i1", "10.0"), ("a", "i2", 11)]))  # integral floats
    assert raw.interactions["timestamp"].tolist() == [10, 11]


def test_parquet_nan_and_datetime_timestamps(tmp_path):
    root = write_folder(tmp_path / "d")
    (root / "interactions.csv").unlink()
    df = pd.DataFrame(GOOD, columns=["user_id", "item_id", "timestamp"]).astype({"timestamp": float})
    df.loc[1, "timestamp"] = np.nan
    df.to_parquet(root / "interactions.parquet")
    raises(r"interactions.parquet: row 2, column 'timestamp': .* got nan$", load_local, root)
    df["timestamp"] = pd.to_datetime(np.arange(len(df)), unit="D")
    df.to_parquet(root / "interactions.parquet")
    raises(r"interactions.parquet: column 'timestamp': expected integer unix times, got a datetime64", load_local, root)


# ----------------------------------------------------------------------------- 3. duplicate columns
def test_duplicate_csv_header_names_the_column(tmp_path):
    root = write_folder(tmp_path / "d", [("a", "i1", 1, "x")], header=("user_id", "item_id", "timestamp", "user_id"))
    raises(r"interactions.csv: duplicate column name\(s\) \['user_id'\]", load_local, root)


def test_duplicate_parquet_column_names_the_column(tmp_path):
    root = write_folder(tmp_path / "d")
    (root / "interactions.csv").unlink()
    arrays = [pa.array(["a"]), pa.array(["i1"]), pa.array([1]), pa.array([2])]
    pq.write_table(pa.Table.from_arrays(arrays, names=["user_id", "item_id", "timestamp", "timestamp"]),
                   root / "interactions.parquet")
    raises(r"interactions.parquet: duplicate column name\(s\) \['timestamp'\]", load_local, root)


# ----------------------------------------------------------------------------- 4. duplicate items
def test_duplicate_item_id_names_both_lines(tmp_path):
    items = [{"item_id": "i1", "title": "a"}, {"item_id": "i2", "title": "b"}, "", {"item_id": "i1", "title": "c"}]
    raises(r"items.jsonl: line 4, field 'item_id': duplicate item id 'i1' \(first on line 1\)",
           load_local, write_folder(tmp_path / "d", items=items))
    items = [{"item_id": 12, "title": "a"}, {"item_id": "12", "title": "b"}]  # the same id once stringified
    raises(r"line 2, field 'item_id': duplicate item id '12' \(first on line 1\)",
           load_local, write_folder(tmp_path / "e", items=items))


def test_repeated_amazon_meta_rows_are_counted_not_silent(tmp_path):
    rev, meta = tmp_path / "reviews.json", tmp_path / "meta.json"
    rev.write_text("\n".join(json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t})
                             for u, i, t in [("u1", "A", 1), ("u1", "B", 2), ("u2", "A", 3)]))
    meta.write_text('{"asin": "A", "title": "first"}\n{"asin": "A", "title": "second"}\n{"asin": "B"}\n')
    _, catalog, report = preprocess(load_amazon_legacy(rev, meta))
    assert report["removed_duplicate_catalogue_rows"] == 1 and catalog.fields["title"][0] == "first"


# ----------------------------------------------------------------------------- 5. csv and parquet
def test_both_interaction_files_is_ambiguous(tmp_path):
    root = write_folder(tmp_path / "d")
    pd.DataFrame(GOOD, columns=["user_id", "item_id", "timestamp"]).to_parquet(root / "interactions.parquet")
    raises(r"both interactions.csv and interactions.parquet are present; keep one", load_local, root)


# ----------------------------------------------------------------------------- 6. items.jsonl lines and ids
@pytest.mark.parametrize("line, kind", [("5", "number"), ("[1, 2]", "list"), ('"i1"', "string"), ("null", "null")])
def test_items_line_that_is_not_an_object(tmp_path, line, kind):
    items = [{"item_id": "i1", "title": "a"}, line]
    raises(rf"items.jsonl: line 2: expected a JSON object .*, got a {kind}", load_local,
           write_folder(tmp_path / "d", items=items))


@pytest.mark.parametrize("value", [["i1"], None, 1.0, True, "", {"id": 1}])
def test_items_id_of_wrong_type_or_empty(tmp_path, value):
    items = [{"item_id": "i1", "title": "a"}, {"item_id": value, "title": "b"}]
    msg = raises(r"items.jsonl: line 2, field 'item_id': expected a (string or integer|non-empty) id, got ",
                 load_local, write_folder(tmp_path / "d", items=items))
    assert repr(value) in msg


def test_items_line_without_id_names_the_line_after_blank_lines(tmp_path):
    items = [{"item_id": "i1"}, "", "", {"title": "no id"}]
    raises(r"items.jsonl: line 4: missing field 'item_id'$", load_local,
           write_folder(tmp_path / "d", items=items))


# ----------------------------------------------------------------------------- 7. text template fields
def test_template_field_unknown_to_the_catalogue(tmp_path):
    msg = raises(r"data.text_template '\{title\} in \{colour\}': unknown item field\(s\) \['colour'\]; "
                 r"available fields: \['title', 'brand', 'categories', 'description'\]",
                 prepare, local_cfg(write_folder(tmp_path / "d"), text_template="{title} in {colour}"))
    assert "colour" in msg


def test_template_field_missing_for_some_items_drops_that_segment(tmp_path):
    items = [{"item_id": "i1", "title": "Pen", "brand": "Acme"}, {"item_id": "i2", "title": "Cup"},
             {"item_id": "i3", "title": "Lamp"}, {"item_id": "i4", "title": "Mug"}]
    ds = prepare(local_cfg(write_folder(tmp_path / "d", items=items), text_template="{title}. Brand: {brand}"))
    assert ds.texts[:2] == ["Pen. Brand: Acme", "Cup."]


@pytest.mark.parametrize("template", ["{title", "{title:10}", "{title!r}", "{} {title}", "no field"])
def test_malformed_template_is_a_config_error(template):
    raises(r"^data.text_template: ", DataConfig, text_template=template, exc=ConfigError)


# ----------------------------------------------------------------------------- 8. config values
@pytest.mark.parametrize("field, value, expected", [
    ("max_history", 0, "an integer >= 1"), ("max_history", True, "an integer >= 1"),
    ("kcore", -1, "an integer >= 0"), ("embedding_batch_size", 0, "an integer >= 1"),
    ("period_fractions", [], "a non-empty list of positive numbers"),
    ("period_fractions", [0.5, 0.0, 0.5], "a non-empty list of positive numbers"),
    ("period_fractions", [1.5, -0.5], "a non-empty list of positive numbers"),
    ("period_fractions", [0.5, 0.6], "shares summing to 1"),
    ("period_fractions", [float("nan")], "a non-empty list of positive numbers"),
])
def test_data_config_values_are_checked_on_construction(field, value, expected):
    raises(rf"^data.{field}: expected {expected}, got ", DataConfig, **{field: value}, exc=ConfigError)


@pytest.mark.parametrize("field, value", [
    ("num_users", 0), ("num_items", 0), ("num_categories", 0), ("num_categories", 13), ("num_time_steps", 1),
    ("initial_item_fraction", 1.5), ("stay_probability", -0.1), ("drift_start", float("nan")),
    ("interactions_per_user", -1.0), ("novelty_boost", -1.0),
])
def test_synthetic_config_values_are_checked(field, value):
    raises(rf"^data.synthetic.{field}: expected ", SyntheticConfig, **{field: value}, exc=ConfigError)


def test_prepare_command_rejects_a_bad_value_before_reading_files(tmp_path):
    from genrec.cli import run_prepare

    raises(r"^data.max_history: expected an integer >= 1, got 0$", run_prepare,
           ["--data.source", "local", "--data.root", str(tmp_path / "absent"), "--data.max_history", "0",
            "--output_dir", str(tmp_path / "out")], exc=ConfigError)


# ----------------------------------------------------------------------------- 9. empty splits
def test_period_without_train_names_counts_and_advice(tmp_path):
    cfg = DataConfig(source="local", root=str(write_folder(tmp_path / "d")), period_fractions=[0.5, 0.5])
    raises(r"missing in period 0 \(train 0, valid 0, test 2\), period 1 \(train 0, valid 2, test 2\); "
           r"8 interactions cut by period_fractions \[0.5, 0.5\]: use fewer periods", prepare, cfg)


def test_no_user_with_two_interactions(tmp_path):
    rows = [("a", "i1", 1), ("b", "i2", 2), ("c", "i1", 3)]
    table = preprocess(load_local(write_folder(tmp_path / "d", rows)))[0]
    raises(r"no prediction instance at all: .* users need at least 2 interactions\); 3 interactions cut by",
           build_period_instances, table, [1.0])
    raises(r"no prediction instance", check_instances, build_period_instances(table, [1.0], check=False)[0], 1, "")
    with pytest.raises(DataError, match="no prediction instance"):
        prepare(local_cfg(write_folder(tmp_path / "e", rows)))


def test_timestamp_split_without_valid_rows(tmp_path):
    labels = ["train", "train", "train", "test", "train", "test", "test", "test"]
    root = write_folder(tmp_path / "d", splits=[r + (s,) for r, s in zip(GOOD, labels)])
    table = preprocess(load_local(root, use_splits=True))[0]
    raises(r"missing in period 0 \(train 2, valid 0, test 4\); check the split labels", build_timestamp_instances,
           table)


# ----------------------------------------------------------------------------- 10. split labels
@pytest.mark.parametrize("label, shown", [("", r"'' \(missing label\)"), ("  ", r"'' \(missing label\)"),
                                          ("dev", "'dev'")])
def test_missing_or_unknown_split_label(tmp_path, label, shown):
    labels = ["train", "valid", label, "test", "train", "valid", "test", "test"]
    root = write_folder(tmp_path / "d", splits=[r + (s,) for r, s in zip(GOOD, labels)])
    raises(rf"splits.csv: row 4, column 'split': expected one of \['train', 'valid', 'test', 'history_only'\], "
           rf"got {shown}$", load_local, root, use_splits=True)


# ----------------------------------------------------------------------------- 11. more of the same kinds
def test_unreadable_files_are_data_errors(tmp_path):
    root = write_folder(tmp_path / "d")
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\na,i1,1\nb,i2,2,extra,cells\n")
    raises(r"interactions.csv: cannot be read as csv \(.*line 3", load_local, root)
    (root / "interactions.csv").write_bytes(b"user_id,item_id,timestamp\n\xff\xfe,i1,1\n")
    raises(r"interactions.csv: cannot be read as csv", load_local, root)
    (root / "interactions.csv").unlink()
    (root / "interactions.parquet").write_bytes(b"not parquet at all")
    raises(r"interactions.parquet: cannot be read as parquet", load_local, root)
    (root / "interactions.parquet").unlink()
    write_folder(root)
    (root / "items.jsonl").write_bytes(b'{"item_id": "\xff"}\n')
    raises(r"items.jsonl: cannot be read as UTF-8 JSON lines", load_local, root)


def test_amazon_legacy_reviews_name_the_file_line(tmp_path):
    rev, meta = tmp_path / "reviews.json.gz", tmp_path / "meta.json"
    meta.write_text('{"asin": "A", "title": "a"}\n')
    lines = [{"reviewerID": "u1", "asin": "A", "unixReviewTime": 1}, {}, {"reviewerID": None, "asin": "A",
                                                                        "unixReviewTime": 2}]
    with gzip.open(rev, "wt") as fh:
        fh.write(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[2]) + "\n")
    raises(r"reviews.json.gz: line 3, field 'reviewerID': expected a non-empty id, got ''", load_amazon_legacy,
           rev, meta)
    with gzip.open(rev, "wt") as fh:
        fh.write(json.dumps(lines[0]) + "\n" + json.dumps({**lines[0], "unixReviewTime": 1e20}) + "\n")
    raises(r"line 2, field 'unixReviewTime': .* got 1e\+20", load_amazon_legacy, rev, meta)
    with gzip.open(rev, "wt") as fh:
        fh.write(json.dumps(lines[0]) + "\n[1, 2]\n")
    raises(r"reviews.json.gz: line 2: expected a JSON object", load_amazon_legacy, rev, meta)
    rev.write_bytes(gzip.compress(b'{"reviewerID": "u1"}\n' * 50)[:30])  # truncated download
    raises(r"reviews.json.gz: cannot be read", load_amazon_legacy, rev, meta)


def test_non_numeric_ratings_are_kept_and_counted(tmp_path):
    rows = [r + (v,) for r, v in zip(GOOD, ["5", "", "four", "3", "1", "2", "5", "4"])]
    root = write_folder(tmp_path / "d", rows, header=("user_id", "item_id", "timestamp", "rating"))
    ds = prepare(local_cfg(root))
    assert ds.report["ratings_missing_or_not_numeric"] == 2 and len(ds.table) == 8
    assert np.isnan(ds.table.rating).sum() == 2


def test_every_removal_is_counted_in_the_report(tmp_path):
    rows = GOOD + [GOOD[0], ("c", "zz", 9)]
    ds = prepare(local_cfg(write_folder(tmp_path / "d", rows, items=[{"item_id": f"i{k}"} for k in range(1, 5)]),
                           drop_items_without_metadata=True))
    rep = ds.report
    assert rep["removed_exact_duplicates"] == 1 and rep["removed_items_without_metadata"] == 1
    assert rep["removed_duplicate_catalogue_rows"] == 0
    assert rep["raw_interactions"] - rep["removed_exact_duplicates"] - rep["removed_items_without_metadata"] == len(
        ds.table)
    texts, fallback = item_texts(ds.catalog, "{title}")
    assert fallback == 4 and texts == ["i1", "i2", "i3", "i4"]  # no title anywhere: the id, counted


def test_amazon_2023_meta_with_features_but_no_description(tmp_path):
    hub = tmp_path / "hub"
    (hub / "raw" / "review_categories").mkdir(parents=True)
    (hub / "raw" / "meta_categories").mkdir(parents=True)
    (hub / "raw" / "meta_categories" / "meta_Toys.jsonl").write_text("".join(
        json.dumps({"parent_asin": a, "title": f"Toy {a}", "features": ["small"]}) + "\n" for a in "AB"))

    def load(last_time):
        reviews = [("u1", "A", 1000), ("u1", "B", 2000), ("u2", "A", 3000), ("u2", "B", last_time)]
        (hub / "raw" / "review_categories" / "Toys.jsonl").write_text("".join(
            json.dumps({"user_id": u, "parent_asin": a, "rating": "n/a", "timestamp": t}) + "\n"
            for u, a, t in reviews))
        return load_amazon_2023("Toys", root=str(hub), official_split=False, cache_dir=str(tmp_path / "cache"))

    raises(r"Toys.jsonl: row 4, column 'timestamp': .* got ''$", load, "")
    raw = load(4000)
    assert raw.items["description"].tolist() == ["small", "small"] and raw.counts["ratings_missing_or_not_numeric"] == 4
