import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.sequences import SequenceDataModule
from genrec.data.config import DataConfig
from genrec.data.synthetic import SyntheticConfig
from genrec.models.tiger import TigerConfig, encode_histories
from lightning_modules.tiger import TigerModule

TINY = TigerConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=32, num_heads=2, d_kv=16, d_ff=64)


def small_dm(tmp_path):
    cfg = DataConfig(synthetic=SyntheticConfig(num_users=150, num_items=80))
    return SequenceDataModule(cfg, prepared_dir=str(tmp_path / "prep"), train_periods=[0], eval_period=1,
                              batch_size=64, eval_batch_size=64)


def trainer(tmp_path, **kw):
    return L.Trainer(max_epochs=kw.pop("max_epochs", 2), accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                     deterministic=True, **kw)


def test_device_encoding_equals_reference_encoder(tmp_path):
    dm = small_dm(tmp_path)
    model = TigerModule(TINY, num_levels=2, codebook_size=16, suffix_size=16, rkmeans_iters=5)
    t = trainer(tmp_path)
    model.trainer = t  # setup needs a trainer reference only for the datamodule
    t.datamodule = dm
    model.setup("fit")
    hist = torch.from_numpy(dm.train_instances().history[:50])
    ours, mask = model.encode(hist)
    ref, ref_mask = encode_histories(hist, model.sid_table, max_items=20)
    # the reference trims columns that are padding in every row; compare right-aligned
    assert torch.equal(ours[:, -ref.shape[1]:], ref) and (ours[:, : ours.shape[1] - ref.shape[1]] == 0).all()
    assert torch.equal(mask[:, -ref.shape[1]:], ref_mask)


def test_fit_then_validate_from_checkpoint_reproduces_metrics(tmp_path):
    L.seed_everything(0)
    dm = small_dm(tmp_path)
    model = TigerModule(TINY, num_levels=2, codebook_size=16, suffix_size=16, rkmeans_iters=5, ks=(5, 10),
                        num_beams=10, warmup_steps=5, lr=3e-3)
    t = trainer(tmp_path)
    t.fit(model, datamodule=dm)
    first = t.validate(model, datamodule=dm, verbose=False)[0]
    ckpt = tmp_path / "m.ckpt"
    t.save_checkpoint(ckpt)
    loaded = TigerModule.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.sid_table.content_hash() == model.sid_table.content_hash()
    second = trainer(tmp_path).validate(loaded, datamodule=small_dm(tmp_path), verbose=False)[0]
    for key in ("val/recall@10/overall", "val/ndcg@10/cold", "val/recall@5/warm"):
        assert key in first
        assert second[key] == pytest.approx(first[key], abs=1e-6)
    test = trainer(tmp_path).test(loaded, datamodule=small_dm(tmp_path), verbose=False)[0]
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test/recall@10/overall"] == pytest.approx(test["test/recall@10/overall"])
    # cold + warm partition overall: recall is a mean, so the weighted warm/cold means give overall
    inst = dm.eval_instances(2)
    cold = ~np.isin(inst.target, dm.train_targets())
    w = cold.mean()
    assert test["test/recall@10/overall"] == pytest.approx(
        w * test["test/recall@10/cold"] + (1 - w) * test["test/recall@10/warm"], abs=1e-5)


def test_predict_writes_topk_with_ids_and_titles(tmp_path):
    import pandas as pd

    from callbacks.predictions import RecommendationWriter

    dm = small_dm(tmp_path)
    model = TigerModule(TINY, num_levels=2, codebook_size=16, suffix_size=16, rkmeans_iters=5, ks=(5,), num_beams=5)
    out = tmp_path / "recs.parquet"
    t = trainer(tmp_path, max_epochs=1, callbacks=[RecommendationWriter(str(out))])
    t.fit(model, datamodule=dm)
    t.predict(model, datamodule=dm)
    recs = pd.read_parquet(out)
    n_test = len(dm.eval_instances(2))
    assert len(recs) == 5 * n_test and recs["rank"].between(1, 5).all()
    ds = dm.load()
    titles = dict(zip(ds.table.item_ids, ds.catalog.fields["title"]))
    assert all(titles[i] == t for i, t in zip(recs["item_id"], recs["title"]))
    # ranks are de-duplicated per instance and scores are non-increasing along the ranking
    first = recs.iloc[:5]
    assert first["item_id"].is_unique and first["score"].is_monotonic_decreasing


def test_wandb_offline_logging_of_results_table_and_sid_artifact(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    dm = small_dm(tmp_path)
    model = TigerModule(TINY, num_levels=2, codebook_size=16, suffix_size=16, rkmeans_iters=5, ks=(5,), num_beams=5)
    logger = WandbLogger(project="genrec-test", save_dir=str(tmp_path / "wandb"), offline=True)
    t = L.Trainer(max_epochs=1, accelerator="cpu", logger=logger, enable_progress_bar=False, num_sanity_val_steps=0,
                  limit_val_batches=0, default_root_dir=str(tmp_path), enable_checkpointing=False)
    t.fit(model, datamodule=dm)
    res = t.test(model, datamodule=dm, verbose=False)[0]
    assert "test/recall@5/cold" in res
    from genrec.tokenizers.sid import SemanticIdTable

    saved = SemanticIdTable.load(Path(logger.experiment.dir) / "sid_table.parquet")  # the run's own folder
    assert saved.content_hash() == model.sid_table.content_hash()
    assert not (tmp_path / "wandb" / "sid_table.parquet").exists()  # never a file shared by runs
    logger.experiment.finish()
    assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_predict_under_two_ddp_processes_writes_every_instance_once(tmp_path):
    """Each DDP rank predicts its (padded) share; the writer gathers them on rank 0 and writes the single-process
    file: same rows, same order."""
    import pandas as pd

    from callbacks.predictions import RecommendationWriter

    L.seed_everything(0)
    dm = small_dm(tmp_path)
    model = TigerModule(TINY, num_levels=2, codebook_size=16, suffix_size=16, rkmeans_iters=5, ks=(5,), num_beams=5)
    trainer(tmp_path, max_epochs=1).fit(model, datamodule=dm)
    single = tmp_path / "single.parquet"
    trainer(tmp_path, callbacks=[RecommendationWriter(str(single))]).predict(model, datamodule=dm)
    ddp_out = tmp_path / "ddp.parquet"
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path), enable_checkpointing=False,
                    callbacks=[RecommendationWriter(str(ddp_out))])
    ddp.predict(model, datamodule=small_dm(tmp_path))
    a, b = pd.read_parquet(single), pd.read_parquet(ddp_out)
    n_test = len(dm.eval_instances(2))
    assert len(a) == 5 * n_test and n_test % 2 == 1  # an odd count: rank 1's share is padded with a repeat
    pd.testing.assert_frame_equal(a[["user_id", "rank", "item_id"]], b[["user_id", "rank", "item_id"]])
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fit_under_two_ddp_processes_takes_the_one_process_steps(tmp_path):
    """`batch_size` is the global batch: 2 DDP processes split each batch (unevenly: 45 rows) and scale their losses,
    so the trained weights and test metrics equal one process's (dropout 0: ranks draw their own masks)."""
    import dataclasses

    cfg = dataclasses.replace(TINY, dropout=0.0)
    models, results = {}, {}
    for devices in (1, 2):
        L.seed_everything(0)
        dm = small_dm(tmp_path)
        dm.batch_size = 45
        model = TigerModule(cfg, num_levels=2, codebook_size=16, suffix_size=16, rkmeans_iters=5, ks=(5,), num_beams=5)
        fit = L.Trainer(max_epochs=2, accelerator="cpu", devices=devices,
                        strategy="ddp_spawn" if devices > 1 else "auto", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp_path), deterministic=True)
        fit.fit(model, datamodule=dm)
        models[devices] = model
        results[devices] = trainer(tmp_path).test(model, datamodule=small_dm(tmp_path), verbose=False)[0]
    one, two = models[1].state_dict(), models[2].state_dict()
    diff = max(float((one[k].float() - two[k].float()).abs().max()) for k in one if one[k].is_floating_point())
    assert diff < 1e-5  # measured 1e-7; unscaled rank means (each rank weighted 1/2, not 23/45) give 1e-4
    assert results[1]["test/recall@5/overall"] > 0
    for key, value in results[1].items():
        assert results[2][key] == pytest.approx(value, abs=1e-6), key
