"""The cold-start arena inside TigerModule: joint / post-hoc dense scorer, hybrid and MMR decoding, diversity keys."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules.sequences import SequenceDataModule
from genrec.data.config import DataConfig
from genrec.data.synthetic import SyntheticConfig
from genrec.decoding.modes import DecodingConfig
from genrec.errors import ConfigError
from genrec.models.dense import DenseScorerConfig
from genrec.models.tiger import TigerConfig
from lightning_modules.tiger import TigerModule

TINY = TigerConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, d_kv=8, d_ff=32)
DENSE = DenseScorerConfig(dim=16, hidden=32)


def dm_of(root) -> SequenceDataModule:
    data = DataConfig(synthetic=SyntheticConfig(num_users=120, num_items=70), period_fractions=[0.6, 0.2, 0.2],
                      cache_dir=str(root / "cache"))
    return SequenceDataModule(data, prepared_dir=str(root / "prep"), train_periods=[0], eval_period=1, batch_size=64)


def trainer(root, epochs=1):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                     default_root_dir=str(root))


def module(**kw):
    return TigerModule(TINY, num_levels=2, codebook_size=8, suffix_size=32, rkmeans_iters=3, ks=(5,), num_beams=8,
                       **kw)


def test_joint_dense_training_and_hybrid_weight_zero_is_the_beam(tmp_path):
    L.seed_everything(0)
    dm = dm_of(tmp_path)
    m = module(dense=DENSE, decoding=DecodingConfig(mode="hybrid", hybrid_weight=0.0, diversity_metrics=True))
    t = trainer(tmp_path)
    t.fit(m, datamodule=dm)
    assert "train/dense_loss" in t.callback_metrics and m.hparams.text_dim == m.text_embeddings.shape[1]
    hybrid0 = t.test(m, datamodule=dm, verbose=False)[0]
    for key in ("test/ild@5/overall", "test/distinct_l1@5/cold", "test/novelty@5/overall", "test/coverage@5/new"):
        assert key in hybrid0
    m.decoding = DecodingConfig(mode="beam")
    beam = t.test(m, datamodule=dm, verbose=False)[0]
    for key in ("test/recall@5/overall", "test/ndcg@5/cold", "test/recall@5/warm"):
        assert hybrid0[key] == pytest.approx(beam[key])  # weight 0: generative order, injected items after
    m.decoding = DecodingConfig(mode="hybrid", hybrid_weight=1.0)
    dense_only = t.test(m, datamodule=dm, verbose=False)[0]
    assert 0.0 <= dense_only["test/recall@5/cold"] <= 1.0
    m.decoding = DecodingConfig(mode="mmr", mmr_lambda=1.0)
    mmr1 = t.test(m, datamodule=dm, verbose=False)[0]
    assert mmr1["test/recall@5/overall"] == pytest.approx(beam["test/recall@5/overall"])  # λ = 1: the beam order


def test_post_hoc_dense_training_leaves_tiger_untouched(tmp_path):
    L.seed_everything(0)
    dm = dm_of(tmp_path)
    base = module()
    trainer(tmp_path).fit(base, datamodule=dm)
    m = module(dense=DENSE, dense_train="post_hoc", decoding=DecodingConfig(mode="hybrid"))
    m.load_state_dict(base.state_dict(), strict=False)
    m.set_sid_table(base.sid_table)
    m.setup_arena(dm)  # builds the dense scorer from the item text embeddings
    before = {k: v.clone() for k, v in m.t5.state_dict().items()}
    dense_before = {k: v.clone() for k, v in m.dense.state_dict().items()}
    trainer(tmp_path, epochs=2).fit(m, datamodule=dm)
    assert all(torch.equal(before[k], v) for k, v in m.t5.state_dict().items())
    assert any(not torch.equal(dense_before[k], v) for k, v in m.dense.state_dict().items())


def test_hybrid_needs_a_dense_scorer():
    with pytest.raises(ConfigError, match="needs model.dense"):
        module(decoding=DecodingConfig(mode="hybrid"))
