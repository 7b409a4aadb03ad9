"""Bad input through the real CLI (`genrec.cli.main`): each case exits with the right code, prints exactly one line
that names the file / row / field, no traceback, and writes or deletes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from genrec.cli import main

ROWS = [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 3), ("u2", "c", 4), ("u3", "b", 5), ("u3", "c", 6),
        ("u1", "c", 7), ("u2", "b", 8), ("u3", "a", 9), ("u4", "a", 10), ("u4", "b", 11), ("u4", "c", 12)]
ITEMS = [{"item_id": i, "title": f"item {i}", "brand": "acme"} for i in "abc"]


def write_folder(root, rows=ROWS, items=ITEMS, header="user_id,item_id,timestamp", splits=None):
    root.mkdir(parents=True, exist_ok=True)
    body = "\n".join(",".join(str(v) for v in r) for r in rows)
    (root / "interactions.csv").write_text(f"{header}\n{body}\n")
    (root / "items.jsonl").write_text("".join((json.dumps(i) if not isinstance(i, str) else i) + "\n" for i in items))
    if splits is not None:
        (root / "splits.csv").write_text("user_id,item_id,timestamp,split\n" + "\n".join(
            ",".join(str(v) for v in r) for r in splits) + "\n")
    return root


def prepare(root, *extra, out="out"):
    return ["prepare", "--data.source", "local", "--data.root", str(root), "--data.period_fractions", "[1.0]",
            "--output_dir", out, *extra]


# ----------------------------------------------------------------------------- the cases
# Each case: setup(tmp_path) → argv; expected exit code; fragments the one line must contain.
def bad_rows(rows):
    return lambda tmp: prepare(write_folder(tmp / "data", rows=rows))


def bad_items(items):
    return lambda tmp: prepare(write_folder(tmp / "data", items=items))


def both_tables(tmp):
    root = write_folder(tmp / "data")
    import pandas as pd

    pd.DataFrame(ROWS, columns=["user_id", "item_id", "timestamp"]).to_parquet(root / "interactions.parquet")
    return prepare(root)


def duplicate_header(tmp):
    root = write_folder(tmp / "data", rows=[r + (9,) for r in ROWS], header="user_id,item_id,timestamp,user_id")
    return prepare(root)


def empty_file(tmp):
    root = write_folder(tmp / "data")
    (root / "interactions.csv").write_text("")
    return prepare(root)


def timestamp_splits(tmp):
    splits = [r + ("train",) for r in ROWS]
    splits[4] = ROWS[4] + ("training",)
    return prepare(write_folder(tmp / "data", splits=splits), "--data.protocol", "timestamp")


def user_folder(tmp):
    root = write_folder(tmp / "data")
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("x")
    return prepare(root, out=str(tmp / "mine"))


def lightning(sub, *extra):
    # (no seed: Lightning's "Seed set to" log line is not ours to test here)
    return lambda tmp: [sub, "--model", "TigerModule", "--data", "SequenceDataModule", "--trainer.logger", "false",
                        "--seed_everything", "false", *extra]


def ckpt_file(content: bytes | None, sub="validate"):
    def make(tmp):
        path = tmp / "model.ckpt"
        if content is not None:
            path.write_bytes(content)
        return lightning(sub, "--ckpt_path", str(path))(tmp)
    return make


def continual_state(tmp):
    path = tmp / "state.pt"
    torch.save({"rqvae": {}, "tiger": {}, "seen_periods": [0]}, path)
    return ["edit", "--ckpt_path", str(path), "--output_dir", str(tmp / "edit")]


def edit_items(tmp, tiny_ckpt):
    _, ckpt, data_args = tiny_ckpt
    (tmp / "items.txt").write_text("S0000001\nnot-an-item\n")
    return ["edit", "--ckpt_path", str(ckpt), "--items", str(tmp / "items.txt"), "--output_dir", str(tmp / "edit"),
            *data_args]


def edit_period0(tmp, tiny_ckpt):
    _, ckpt, data_args = tiny_ckpt
    return ["edit", "--ckpt_path", str(ckpt), "--cold_period", "0", "--output_dir", str(tmp / "edit"), *data_args]


def edit_other_catalogue(tmp, tiny_ckpt):
    _, ckpt, data_args = tiny_ckpt
    return ["edit", "--ckpt_path", str(ckpt), "--output_dir", str(tmp / "edit"), *data_args,
            "--data.synthetic.num_items", "60"]


CASES = {
    # interactions file
    "empty user_id": (bad_rows([("", "a", 1)] + ROWS), 1, ["interactions.csv", "row 2", "user_id", "non-empty"]),
    "empty item_id": (bad_rows(ROWS[:3] + [("u9", "", 4)] + ROWS[3:]), 1, ["interactions.csv", "row 5", "item_id"]),
    "inf timestamp": (bad_rows(ROWS[:1] + [("u1", "b", "inf")] + ROWS[2:]), 1, ["row 3", "timestamp", "inf"]),
    "huge timestamp": (bad_rows(ROWS[:2] + [("u2", "a", "1e20")] + ROWS[3:]), 1, ["row 4", "timestamp", "2**62"]),
    "negative timestamp": (bad_rows(ROWS[:5] + [("u3", "c", -6)] + ROWS[6:]), 1, ["row 7", "timestamp"]),
    "text timestamp": (bad_rows([("u1", "a", "yesterday")] + ROWS[1:]), 1, ["row 2", "timestamp", "yesterday"]),
    "fractional timestamp": (bad_rows([("u1", "a", "1.5")] + ROWS[1:]), 1, ["row 2", "timestamp", "1.5"]),
    "duplicate column": (duplicate_header, 1, ["interactions.csv", "duplicate column", "user_id"]),
    "csv and parquet": (both_tables, 1, ["interactions.csv", "interactions.parquet"]),
    "empty interactions": (empty_file, 1, ["interactions.csv", "empty"]),
    "missing column": (lambda tmp: prepare(write_folder(tmp / "data", rows=[r[:2] for r in ROWS],
                                                        header="user_id,item_id")), 1,
                       ["interactions.csv", "timestamp"]),
    "no folder": (lambda tmp: prepare(tmp / "nowhere"), 1, ["nowhere", "not found"]),
    "single interactions only": (bad_rows([(f"u{i}", "abc"[i % 3], i) for i in range(9)]), 1,
                                 ["instance", "interaction"]),
    "unknown split label": (timestamp_splits, 1, ["splits.csv", "row 6", "split", "training"]),
    # item file
    "duplicate item": (bad_items(ITEMS + [{"item_id": "b", "title": "again"}]), 1,
                       ["items.jsonl", "line 4", "duplicate", "'b'", "line 2"]),
    "item line is a number": (bad_items(ITEMS[:1] + ["42"] + ITEMS[1:]), 1, ["items.jsonl", "line 2", "object"]),
    "item line is a list": (bad_items(ITEMS + ['["a", "b"]']), 1, ["items.jsonl", "line 4", "object"]),
    "item line not json": (bad_items(ITEMS[:2] + ["{title: x}"] + ITEMS[2:]), 1, ["items.jsonl", "line 3", "JSON"]),
    "item id is a list": (bad_items(ITEMS + [{"item_id": ["d"], "title": "t"}]), 1, ["items.jsonl", "line 4",
                                                                                      "item_id"]),
    "template typo": (lambda tmp: prepare(write_folder(tmp / "data"), "--data.text_template", "{title} in {colour}"),
                      1, ["colour", "text_template", "available fields"]),
    # config values
    "max_history 0": (lambda tmp: prepare(write_folder(tmp / "data"), "--data.max_history", "0"), 2,
                      ["data.max_history", "0"]),
    "fractions do not sum to 1": (lambda tmp: prepare(write_folder(tmp / "data"), "--data.period_fractions",
                                                      "[0.5, 0.2]"), 2, ["period_fractions", "sum"]),
    "unknown field": (lambda tmp: prepare(write_folder(tmp / "data"), "--data.colour", "red"), 2, ["data.colour"]),
    "wrong type": (lambda tmp: prepare(write_folder(tmp / "data"), "--data.kcore", "many"), 2, ["kcore", "many"]),
    "unknown command": (lambda tmp: ["fitt"], 2, ["unknown command", "fitt"]),
    # output folders
    "output is the data root": (lambda tmp: prepare(write_folder(tmp / "data"), out=str(tmp / "data")), 1,
                                ["data root"]),
    "output is the current directory": (lambda tmp: prepare(write_folder(tmp / "data"), "--overwrite", "true",
                                                            out="."), 1, ["current directory"]),
    "output is a user folder": (user_folder, 1, ["mine", "did not write"]),
    # Lightning commands
    "num_beams below max(ks)": (lightning("fit", "--model.num_beams", "5"), 2, ["num_beams", "max(ks)"]),
    "scheduler typo": (lightning("fit", "--model.scheduler", "cosin"), 2, ["scheduler", "cosin"]),
    "empty checkpoint": (ckpt_file(b""), 1, ["model.ckpt", "empty"]),
    "corrupt checkpoint": (ckpt_file(b"PK\x03\x04 a truncated zip"), 1, ["model.ckpt", "not a readable"]),
    "pickled object checkpoint": (ckpt_file(b"\x80\x02cos\nsystem\n."), 1, ["model.ckpt", "weights_only"]),
    "missing checkpoint": (ckpt_file(None, sub="test"), 1, ["model.ckpt", "not found"]),
    "demo epochs 0": (lambda tmp: ["demo", "--epochs", "0", "--output_dir", str(tmp / "demo")], 2, ["--epochs"]),
    # continual
    "method contradicts tokenizer": (lambda tmp: ["continual", "--continual.method", "dact",
                                                  "--continual.tokenizer", "frozen"], 2,
                                     ["continual.tokenizer", "contradicts", "dact"]),
    "dact without cf": (lambda tmp: ["continual", "--continual.use_cf", "false"], 2, ["use_cf", "DACT"]),
    "beams in continual": (lambda tmp: ["continual", "--continual.num_beams", "4"], 2, ["num_beams"]),
    # edit
    "continual state to edit": (continual_state, 1, ["state.pt", "genrec continual"]),
}
NEEDS_CKPT = {
    "edit unknown item id": (edit_items, 1, ["items.txt", "line 2", "not-an-item"]),
    "edit period 0": (edit_period0, 2, ["--cold_period 0"]),
    "edit other catalogue": (edit_other_catalogue, 1, ["catalogue of 68 items", "fingerprint"]),
}


def snapshot(path) -> dict:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def check(tmp_path, monkeypatch, capsys, argv, code, fragments):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    got = main(argv)
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert got == code, (got, err)
    assert len(lines) == 1 and lines[0].startswith("genrec") and "Traceback" not in err, err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert snapshot(tmp_path) == before, "the failed command wrote or deleted files"


def test_the_sweep_covers_at_least_thirty_bad_inputs():
    assert len(CASES) + len(NEEDS_CKPT) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(name, tmp_path, monkeypatch, capsys):
    setup, code, fragments = CASES[name]
    argv = setup(tmp_path)
    check(tmp_path, monkeypatch, capsys, argv, code, fragments)


@pytest.mark.parametrize("name", sorted(NEEDS_CKPT))
def test_bad_edit_input_is_one_clear_line_and_changes_nothing(name, tiny_ckpt, tmp_path, monkeypatch, capsys):
    setup, code, fragments = NEEDS_CKPT[name]
    argv = setup(tmp_path, tiny_ckpt)
    check(tmp_path, monkeypatch, capsys, argv, code, fragments)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from genrec.errors import OutputError

    root = write_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError):
        main([*prepare(root, out=str(root)), "--debug"])
