"""Trust: nothing of the user's is deleted or half-written, runs never mix silently, the tokenizer never sees the
future, metrics files hold exactly one evaluation, and every config field does something."""

from __future__ import annotations

import errno
import json

import lightning as L
import numpy as np
import pytest
import torch

from genrec.data.config import DataConfig
from genrec.data.synthetic import SyntheticConfig
from genrec.errors import CheckpointError, ConfigError, DiskFullError, OutputError, RunMismatchError
from genrec.files import atomic_write_json, atomic_write_text, claim_dir, staged_dir
from genrec.models.tiger import TigerConfig

TINY = TigerConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, d_kv=8, d_ff=32)


def synthetic(root, seed=0, users=120, items=70) -> DataConfig:
    return DataConfig(synthetic=SyntheticConfig(num_users=users, num_items=items, seed=seed),
                      period_fractions=[0.6, 0.2, 0.2], cache_dir=str(root / "cache"))


def tree(path) -> dict:
    """Every file under ``path`` with its bytes (to show that nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- atomic files, owned folders
def test_atomic_write_leaves_old_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def boom(tmp):
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    from genrec.files import atomic_write

    with pytest.raises(DiskFullError, match=f"disk full while writing {target}"):
        atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_json_is_strict_with_null_for_nan(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(0.5)})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": 0.5}


def test_claim_dir_refuses_user_folders_cwd_and_data_root(tmp_path, monkeypatch):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("precious")
    with pytest.raises(OutputError, match="files that genrec did not write"):
        claim_dir(user, "prepared", overwrite=True)
    monkeypatch.chdir(user)
    for bad in (".", "..", str(tmp_path)):
        with pytest.raises(OutputError, match="current directory"):
            claim_dir(bad, "prepared", overwrite=True)
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(OutputError, match="data root"):
        claim_dir(data, "prepared", overwrite=True, protected=(str(data),))
    assert claim_dir(data / "prepared", "prepared", protected=(str(data),)) == "new"  # inside is fine
    assert (user / "thesis.txt").read_text() == "precious"


def test_staged_dir_is_all_or_nothing_and_replaces_ours_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_dir(out, "edit") as tmp:
        atomic_write_text(tmp / "a.txt", "1")
        raise RuntimeError("failed half way")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_dir(out, "edit") as tmp:
        atomic_write_text(tmp / "a.txt", "1")
    with pytest.raises(OutputError, match="--overwrite"), staged_dir(out, "edit") as tmp:
        pass
    with pytest.raises(OutputError, match="another kind"):
        claim_dir(out, "prepared", overwrite=True)
    with staged_dir(out, "edit", overwrite=True) as tmp:
        atomic_write_text(tmp / "b.txt", "2")
    assert sorted(p.name for p in out.iterdir()) == [".genrec.json", "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old sibling left


# ----------------------------------------------------------------------------- prepare
def prepare_argv(out, *extra):
    return ["prepare", "--data.synthetic.num_users", "120", "--data.synthetic.num_items", "70",
            "--data.period_fractions", "[0.6, 0.2, 0.2]", "--output_dir", str(out), *extra]


def test_prepare_never_deletes_user_files_and_replaces_ours_only_with_overwrite(tmp_path, capsys):
    from genrec.cli import main

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert main(prepare_argv(user)) == 1
    assert "refusing to touch it" in capsys.readouterr().err and (user / "notes.txt").read_text() == "keep me"
    out = tmp_path / "prep"
    assert main(prepare_argv(out)) == 0
    before = tree(out)
    assert main(prepare_argv(out)) == 1 and "--overwrite true" in capsys.readouterr().err
    assert tree(out) == before
    assert main(prepare_argv(out, "--overwrite", "true")) == 0 and (out / "meta.json").exists()


def test_prepare_refuses_the_data_root_and_the_current_directory(tmp_path, monkeypatch, capsys):
    from genrec.cli import main

    root = tmp_path / "data"
    root.mkdir()
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\nu1,i3,3\n")
    (root / "items.jsonl").write_text('{"item_id": "i1"}\n{"item_id": "i2"}\n{"item_id": "i3"}\n')
    before = tree(root)
    monkeypatch.chdir(root)
    for out in (str(root), ".", str(tmp_path)):
        assert main(["prepare", "--data.source", "local", "--data.root", str(root), "--output_dir", out,
                     "--overwrite", "true"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("data root" in err or "current directory" in err), err
    assert tree(root) == before


def test_prepare_embed_failure_leaves_nothing(tmp_path, monkeypatch):
    from genrec.cli import run_prepare
    from genrec.data import pipeline

    def fail(ds, show_progress=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "item_embeddings", fail)
    with pytest.raises(OSError):
        run_prepare(prepare_argv(tmp_path / "out", "--embed", "true")[1:])
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == []


def test_prepared_cache_is_reused_only_for_the_same_data_settings(tmp_path):
    from genrec.data.pipeline import load_or_prepare

    cfg = synthetic(tmp_path)
    first = load_or_prepare(cfg, tmp_path / "prep")
    again = load_or_prepare(cfg, tmp_path / "prep")
    assert again.fingerprint == first.fingerprint
    other = synthetic(tmp_path)
    other.max_history = 5
    with pytest.raises(RunMismatchError, match=r"max_history: 20 → 5"):
        load_or_prepare(other, tmp_path / "prep")
    assert load_or_prepare(other, tmp_path / "prep", overwrite=True).instances.history.shape[1] == 5


def tiny_local_data(root):
    """A canonical folder: 12 users × 4 interactions over 9 items."""
    root.mkdir()
    rows = [f"u{u},i{(u + k) % 9},{10 * u + k}" for u in range(12) for k in range(4)]
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    (root / "items.jsonl").write_text("".join(f'{{"item_id": "i{i}", "title": "t{i}"}}\n' for i in range(9)))
    return root


def test_prepared_cache_notices_changed_source_files(tmp_path):
    from genrec.data.pipeline import load_or_prepare

    root = tiny_local_data(tmp_path / "data")
    cfg = DataConfig(source="local", root=str(root), period_fractions=[1.0], cache_dir=str(tmp_path / "c"))
    load_or_prepare(cfg, tmp_path / "prep")
    with open(root / "interactions.csv", "a") as fh:
        fh.write("u0,i1,999\n")
    with pytest.raises(RunMismatchError, match="source files changed"):
        load_or_prepare(cfg, tmp_path / "prep")


# ----------------------------------------------------------------------------- tokenizer scope
def test_period_tokenizer_never_sees_future_items():
    from genrec.tokenizers.period import rkmeans_sid_table

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 16)).astype(np.float32)
    fit = np.arange(40)  # items of the training periods; 40..59 launch later
    kw = {"num_levels": 2, "codebook_size": 4, "suffix_size": 16, "iters": 10, "seed": 0, "pca_dim": 8}
    a = rkmeans_sid_table(emb, fit, np.arange(60), **kw)
    changed = emb.copy()
    changed[45] = rng.normal(size=16) * 10  # a future item's text changes
    changed[50:] = changed[:10] + 1e-3  # future items that collide with known ones
    b = rkmeans_sid_table(changed, fit, np.arange(60), **kw)
    rows_a, rows_b = a.rows_of(fit), b.rows_of(fit)
    np.testing.assert_array_equal(a.codes[rows_a], b.codes[rows_b])
    np.testing.assert_array_equal(a.suffix[rows_a], b.suffix[rows_b])
    assert set(b.items) == set(range(60)) and len(np.unique(b.tokens(), axis=0)) == 60


def test_tiger_module_builds_sids_from_training_period_items_only(tmp_path, monkeypatch):
    from datamodules.sequences import SequenceDataModule
    from genrec.tokenizers import period
    from lightning_modules.tiger import TigerModule, build_sid_table_rkmeans

    seen = {}
    real = period.rkmeans_sid_table

    def spy(emb, fit_items, all_items=None, **kw):
        seen["fit"], seen["all"] = np.asarray(fit_items), np.asarray(all_items)
        return real(emb, fit_items, all_items, **kw)

    monkeypatch.setattr(period, "rkmeans_sid_table", spy)
    dm = SequenceDataModule(synthetic(tmp_path), train_periods=[0], eval_period=1)
    ds = dm.load()
    module = TigerModule(TINY, num_levels=2, codebook_size=8, suffix_size=32, rkmeans_iters=3, ks=(5,), num_beams=5)
    table = build_sid_table_rkmeans(ds, module.hparams, dm.tokenizer_periods())
    np.testing.assert_array_equal(seen["fit"], ds.catalogue_until(0))
    assert len(seen["fit"]) < ds.num_items and table.num_items == ds.num_items


# ----------------------------------------------------------------------------- checkpoints and fingerprints
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from datamodules.sequences import SequenceDataModule
    from lightning_modules.tiger import TigerModule

    root = tmp_path_factory.mktemp("safety_ckpt")
    L.seed_everything(0)
    dm = SequenceDataModule(synthetic(root), prepared_dir=str(root / "prep"), train_periods=[0], eval_period=1,
                            batch_size=64)
    module = TigerModule(TINY, num_levels=2, codebook_size=8, suffix_size=32, rkmeans_iters=3, ks=(5,), num_beams=5)
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
              limit_val_batches=0, default_root_dir=str(root)).fit(module, datamodule=dm)
    path = root / "tiger.ckpt"
    module.trainer.save_checkpoint(path)
    return root, path


def test_checkpoint_carries_the_catalogue_and_refuses_other_data(ckpt, tmp_path):
    from datamodules.sequences import SequenceDataModule
    from lightning_modules.tiger import TigerModule

    root, path = ckpt
    stored = torch.load(path, weights_only=True)["genrec_catalogue"]
    assert stored["num_items"] > 0 and len(stored["item_ids_sha256"]) == 64
    module = TigerModule.load_from_checkpoint(path, weights_only=True)
    same = SequenceDataModule(synthetic(root), prepared_dir=str(root / "prep"), train_periods=[0], eval_period=1)
    module.bind_catalogue(same.load())  # the training data: accepted
    other = SequenceDataModule(synthetic(tmp_path, seed=1), train_periods=[0], eval_period=1)
    with pytest.raises(CheckpointError, match=stored["item_ids_sha256"][:12]):
        module.bind_catalogue(other.load())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    fresh = TigerModule.load_from_checkpoint(path, weights_only=True)
    with pytest.raises(CheckpointError, match="another catalogue"):
        trainer.test(fresh, datamodule=other, verbose=False)


def test_edit_command_refuses_checkpoints_of_other_data_or_kind_and_writes_nothing(ckpt, tmp_path, capsys):
    from genrec.cli import main

    root, path = ckpt
    base = ["edit", "--ckpt_path", str(path), "--cold_period", "1", "--data.synthetic.num_users", "120",
            "--data.synthetic.num_items", "70", "--data.period_fractions", "[0.6, 0.2, 0.2]",
            "--data.cache_dir", str(root / "cache"), "--accelerator", "cpu"]
    out = tmp_path / "out"
    assert main([*base, "--data.synthetic.seed", "1", "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "another catalogue" in err and len(err.strip().splitlines()) == 1
    state = tmp_path / "state.pt"
    torch.save({"rqvae": {}, "tiger": {}, "seen_periods": [0]}, state)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    for bad, message in ((state, "genrec continual"), (empty, "empty"), (garbage, "not a readable PyTorch"),
                         (tmp_path / "missing.ckpt", "file not found")):
        assert main([*base, "--ckpt_path", str(bad), "--output_dir", str(out)]) == 1
        err = capsys.readouterr().err
        assert message in err and str(bad) in err, err
    assert not out.exists()


def test_metrics_json_holds_exactly_one_evaluation(ckpt, tmp_path):
    from datamodules.sequences import SequenceDataModule
    from lightning_modules.tiger import TigerModule

    root, path = ckpt
    module = TigerModule.load_from_checkpoint(path, weights_only=True)
    dm = SequenceDataModule(synthetic(root), prepared_dir=str(root / "prep"), train_periods=[0], eval_period=1)
    atomic_write_json(tmp_path / "metrics.json", {"stale/key": 1.0})
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
              default_root_dir=str(tmp_path)).test(module, datamodule=dm, verbose=False)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert "stale/key" not in written and "test/recall@5/overall" in written


# ----------------------------------------------------------------------------- config fields that do something
def test_user_tokens_enter_the_encoder_input(ckpt):
    from lightning_modules.tiger import TigerModule, user_tokens

    _, path = ckpt
    plain = TigerModule.load_from_checkpoint(path, weights_only=True)
    cfg = TigerConfig(**{**TINY.to_dict(), "num_user_tokens": 7})
    with_users = TigerModule(cfg, num_levels=2, codebook_size=8, suffix_size=32, ks=(5,), num_beams=5)
    with_users.set_sid_table(plain.sid_table)
    hist = torch.tensor([[-1, -1, 3, 4], [1, 2, 3, 4]])
    user = torch.tensor([5, 11])
    ids, mask = with_users.encode(hist, user)
    ref, _ = plain.encode(hist)
    tok = user_tokens(user, 7, with_users.vocab_size)
    assert ids.shape[1] == ref.shape[1] + 1 and ids.max() < with_users.t5.config.vocab_size
    assert ids[0, -ref[0].ne(0).sum() - 1] == tok[0] and ids[1, 0] == tok[1]
    np.testing.assert_array_equal(ids[:, 1:][ref != 0], ref[ref != 0])
    assert mask.sum() == (ref != 0).sum() + 2
    with pytest.raises(ValueError, match="needs the users"):
        with_users.encode(hist)
    loss = with_users(hist, torch.tensor([5, 6]), user)
    assert torch.isfinite(loss)


def test_string_options_are_checked_before_training():
    from lightning_modules.tiger import TigerModule

    with pytest.raises(ConfigError, match="scheduler"):
        TigerModule(TINY, scheduler="cosin")
    with pytest.raises(ConfigError, match="num_beams"):
        TigerModule(TINY, num_beams=5, ks=(5, 10))


def test_continual_config_rejects_contradictions():
    from runners.continual import ContinualConfig

    with pytest.raises(ConfigError, match="contradicts continual.method 'dact'"):
        ContinualConfig(method="dact", tokenizer="frozen")
    assert ContinualConfig(method=None, tokenizer="frozen", recommender="finetune").name == "ft_grm"
    assert ContinualConfig().resolved() == ("dact", "finetune")
    with pytest.raises(ConfigError, match="use_cf false cannot run the DACT"):
        ContinualConfig(method="dact", use_cf=False)
    with pytest.raises(ConfigError, match="num_beams"):
        ContinualConfig(num_beams=5)


def test_predict_writer_refuses_an_existing_file(tmp_path):
    from callbacks.predictions import RecommendationWriter

    target = tmp_path / "recs.parquet"
    target.write_bytes(b"someone's file")
    with pytest.raises(OutputError, match="exists"):
        RecommendationWriter(str(target)).on_predict_start(None, None)
    RecommendationWriter(str(target), overwrite=True).on_predict_start(None, None)
    assert target.read_bytes() == b"someone's file"


def test_help_lists_every_command_and_version(capsys):
    from genrec.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("prepare", "fit", "validate", "test", "predict", "continual", "edit", "demo"))
    assert set(COMMANDS) >= {"prepare", "continual", "edit", "demo"}
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("genrec ")
    assert main(["frobnicate"]) == 2 and "unknown command" in capsys.readouterr().err


def test_a_reused_prepared_cache_serves_the_request_encoder_and_seed(tmp_path):
    from genrec.data.pipeline import load_or_prepare

    root = tiny_local_data(tmp_path / "data")
    first = DataConfig(source="local", root=str(root), period_fractions=[1.0], cache_dir=str(tmp_path / "c"))
    load_or_prepare(first, tmp_path / "prep")
    again = DataConfig(source="local", root=str(root), period_fractions=[1.0], cache_dir=str(tmp_path / "c2"),
                       embedding_model="another-encoder", seed=7)
    ds = load_or_prepare(again, tmp_path / "prep")  # same content: reused, but with this request's encoder and seed
    assert (ds.config.embedding_model, ds.config.cache_dir, ds.config.seed) == ("another-encoder",
                                                                                str(tmp_path / "c2"), 7)


def test_outputs_get_the_usual_permissions_and_a_staged_target_must_stay_empty(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "m.json", "{}")
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
        with staged_dir(tmp_path / "out", "edit") as tmp:
            atomic_write_text(tmp / "a.txt", "1")
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
        target = tmp_path / "again"
        with pytest.raises(OutputError, match="files appeared in it"), staged_dir(target, "edit") as tmp:
            target.mkdir()
            (target / "cache.npz").write_text("written by something else meanwhile")
        assert (target / "cache.npz").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    finally:
        os.umask(mask)
