"""`genrec analyze` end to end on tiny TIGER and SASRec checkpoints of the synthetic catalogue."""

import json

import lightning as L
import pytest


@pytest.fixture(scope="module")
def sasrec_ckpt(tiny_ckpt):
    from datamodules.sequences import SequenceDataModule
    from genrec.data.config import DataConfig
    from genrec.data.synthetic import SyntheticConfig
    from lightning_modules.sasrec import SASRecModule

    root, _, _ = tiny_ckpt
    data = DataConfig(synthetic=SyntheticConfig(num_users=120, num_items=70), period_fractions=[0.6, 0.2, 0.2],
                      cache_dir=str(root / "cache"))
    L.seed_everything(0)
    dm = SequenceDataModule(data, train_periods=[0], eval_period=1, batch_size=64)
    module = SASRecModule({"hidden": 16}, ks=(5, 10))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(module, datamodule=dm)
    path = root / "sasrec.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_analyze_writes_labels_tokens_and_ensemble(tiny_ckpt, sasrec_ckpt, tmp_path, monkeypatch):
    from genrec.analysis import LABELS
    from genrec.cli import main

    _, tiger, data_args = tiny_ckpt
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "analysis"
    args = [a for a in data_args if a not in ("--accelerator", "cpu")]
    assert main(["analyze", "--tiger_ckpt", str(tiger), "--sasrec_ckpt", str(sasrec_ckpt), "--output_dir", str(out),
                 *args]) == 0
    flat = json.loads((out / "analysis.json").read_text())
    # every test case has a history (a user's first interaction is never a target), so each carries exactly one
    # of memorization / generalization / uncategorized
    assert flat["memgen/count/cases"] > 0
    assert sum(flat[f"memgen/ratio/{n}"] for n in ("memorization", "generalization", "uncategorized")) == \
        pytest.approx(1.0, abs=1e-9)
    for model in ("tiger", "sasrec", "ensemble_fixed", "ensemble_adaptive"):
        for subset in ("overall", "memorization", "generalization"):
            assert f"{model}/test/ndcg@10/{subset}" in flat
    assert 0.0 <= flat["ensemble_fixed/alpha"] <= 1.0 and flat["ensemble_adaptive/k"] in (1, 5, 9, 13, 17, 21, 25)
    labels = (out / "labels.csv").read_text().splitlines()
    assert len(labels) == 1 + len(LABELS)
    assert "1-gram" in (out / "tokens.csv").read_text().splitlines()[0]
    # a second run into the same folder needs --overwrite
    assert main(["analyze", "--tiger_ckpt", str(tiger), "--sasrec_ckpt", str(sasrec_ckpt), "--output_dir", str(out),
                 *args]) == 1


def test_memgen_labels_are_evaluation_subsets_of_every_model(tiny_ckpt, sasrec_ckpt, tmp_path):
    import numpy as np

    from datamodules.sequences import SequenceDataModule
    from genrec.analysis import LABELS, ItemRelations, label_instances
    from genrec.data.config import DataConfig
    from genrec.data.splits import TEST, TRAIN
    from genrec.data.synthetic import SyntheticConfig
    from lightning_modules.popularity import evaluate_popularity
    from lightning_modules.sasrec import SASRecModule
    from lightning_modules.tiger import TigerModule

    root, tiger_path, _ = tiny_ckpt
    data = DataConfig(synthetic=SyntheticConfig(num_users=120, num_items=70), period_fractions=[0.6, 0.2, 0.2],
                      cache_dir=str(root / "cache"))
    dm = SequenceDataModule(data, train_periods=[0], eval_period=1, memgen_subsets=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    tiger = TigerModule.load_from_checkpoint(tiger_path, weights_only=True)
    res = trainer.test(tiger, datamodule=dm, verbose=False)[0]
    sas = trainer.test(SASRecModule.load_from_checkpoint(sasrec_ckpt, weights_only=True), datamodule=dm,
                       verbose=False)[0]
    pop = evaluate_popularity(dm, ks=(5, 10))
    # the subset counts are exactly the labeller's on the same cases
    test = dm.eval_instances(TEST)
    train = dm.split(TRAIN, [0])
    labels = label_instances(ItemRelations.from_instances(train.history, train.target, dm.num_items),
                             test.history, test.target)
    for j, name in enumerate(LABELS):
        assert res[f"test/count/{name}"] == labels[:, j].sum()
        assert pop[f"popularity/test/count/{name}"] == labels[:, j].sum()
    for key in ("test/ndcg@5/memorization", "test/ndcg@5/generalization", "test/recall@5/uncategorized"):
        assert key in res and key in sas
    assert np.isclose(res["test/count/memorization"] + res["test/count/generalization"]
                      + res["test/count/uncategorized"], res["test/count/overall"])
