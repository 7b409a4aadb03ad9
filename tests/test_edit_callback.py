"""GenRecEdit in the Lightning layer: callback, removal, checkpoints, SID-table checks, continual hook."""

from __future__ import annotations

import dataclasses

import lightning as L
import numpy as np
import pytest
import torch

from callbacks.genrecedit import GenRecEditCallback, load_edits, module_history_encoder
from datamodules.sequences import SequenceDataModule
from genrec.data.config import DataConfig
from genrec.data.pipeline import item_embeddings
from genrec.data.splits import TRAIN
from genrec.data.synthetic import SyntheticConfig
from genrec.decoding.reference import reference_score_sids
from genrec.editing import EditConfig, GenRecEditor, PositionEdits, SidTableMismatchError
from genrec.editing.keys import ffn_out_proj
from genrec.models.tiger import TigerConfig
from genrec.tokenizers.sid import SemanticIdTable
from lightning_modules.tiger import TigerModule, _restrict

TINY = TigerConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, d_kv=8, d_ff=32)
# Small λ: the tiny model has few preserved keys; fixed layer 0 (one decoder layer) skips the probe's cost.
FAST = EditConfig(cov_lambda=10.0, histories_per_item=3, num_neighbours=3, probe_max_per_class=50,
                  layer_mode="fixed", fixed_layers=[0, 0, 0])




def data_config(root) -> DataConfig:
    return DataConfig(synthetic=SyntheticConfig(num_users=120, num_items=70), period_fractions=[0.6, 0.2, 0.2],
                      cache_dir=str(root / "cache"))


def make_dm(root) -> SequenceDataModule:
    return SequenceDataModule(data_config(root), prepared_dir=str(root / "prep"), train_periods=[0], eval_period=1,
                              batch_size=64, eval_batch_size=64)


def trainer(root, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
                     enable_checkpointing=False, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_cb")
    L.seed_everything(0)
    dm = make_dm(root)
    module = TigerModule(TINY, num_levels=2, codebook_size=16, suffix_size=16, rkmeans_iters=5, ks=(5, 10),
                         num_beams=10, warmup_steps=5, lr=3e-3)
    trainer(root, max_epochs=1, limit_val_batches=0).fit(module, datamodule=dm)
    ckpt = root / "base.ckpt"
    module.trainer.save_checkpoint(ckpt)
    return root, ckpt


def fresh(trained):
    root, ckpt = trained
    module = TigerModule.load_from_checkpoint(ckpt, weights_only=True)
    dm = make_dm(root)
    module.set_sid_table(module.sid_table, dm.catalogue(), dm.num_items)
    return module.eval(), dm, root


def test_callback_edits_cold_items_and_checkpoint_round_trip(trained):
    module, dm, root = fresh(trained)
    cb = GenRecEditCallback(dataclasses.replace(FAST, layer_mode="probe"))
    t = trainer(root, callbacks=[cb])
    t.test(module, datamodule=dm, verbose=False)
    edits = module.edit
    assert isinstance(edits, PositionEdits) and edits is cb.edits
    # cold = period-1 new items the model never had as a training target
    ds = dm.load()
    expected_cold = np.setdiff1d(ds.new_items(1), dm.train_targets())
    np.testing.assert_array_equal(np.sort(edits.cold_items), expected_cold)
    for key in ("edit/seconds/values", "edit/seconds/covariance", "edit/seconds/probe", "edit/success_rate/pos0",
                "edit/success_rate/pos2"):
        assert key in cb.metrics
    assert all(0.0 <= cb.metrics[f"edit/success_rate/pos{p}"] <= 1.0 for p in range(3))
    # efficacy: ΔW raises the teacher-forced top-1 rate of the requests' target tokens
    eff = {tag: sum(cb.metrics[f"edit/top1/requests/{tag}/pos{p}"] for p in range(3)) for tag in ("unedited", "edited")}
    assert eff["edited"] > eff["unedited"]
    assert "edit/top1/train/edited/pos0" in cb.metrics and "edit/seconds/diagnostics" in cb.metrics

    # The cold items' SIDs score higher under the edit on the histories they were edited for.
    emb = item_embeddings(ds, show_progress=False)
    train = dm.split(TRAIN, dm.seen_periods)
    warm = np.unique(train.target)
    cfg = dataclasses.replace(FAST, max_history_items=module.cfg.max_history_items)
    know = GenRecEditor(cfg).build_knowledge(expected_cold, emb[expected_cold], warm, emb[warm], train.history,
                                             train.target)
    ids, mask = module_history_encoder(module)(know.histories)
    tokens = torch.from_numpy(module.sid_table.tokens_of(know.items))
    base = reference_score_sids(module.t5, ids, mask, tokens, None)
    edited = reference_score_sids(module.t5, ids, mask, tokens, edits)
    assert (edited.sum(1) > base.sum(1)).float().mean() > 0.9

    # Checkpoint round trip: saved with the edit, restored by load_edits and by a Trainer's ckpt_path.
    ckpt = root / "edited.ckpt"
    t.save_checkpoint(ckpt)
    loaded = TigerModule.load_from_checkpoint(ckpt, weights_only=True)
    restored = GenRecEditCallback(edit_on_test=False).restore(loaded, ckpt)
    assert loaded.edit is restored and restored.layers == edits.layers
    for p in edits.positions:
        assert torch.equal(restored.delta_weight(p), edits.delta_weight(p))
    cb2 = GenRecEditCallback(edit_on_test=False)
    module2 = TigerModule(TINY, num_levels=2, codebook_size=16, suffix_size=16, ks=(5, 10), num_beams=10)
    res = trainer(root, callbacks=[cb2]).test(module2, datamodule=make_dm(root), ckpt_path=ckpt, verbose=False)[0]
    assert isinstance(module2.edit, PositionEdits)
    assert torch.equal(module2.edit.delta_weight(0), edits.delta_weight(0))
    # same edited model, same test metrics as the editing run
    again = trainer(root).test(module, datamodule=make_dm(root), verbose=False)[0]
    assert res["test/recall@10/cold"] == pytest.approx(again["test/recall@10/cold"])

    # A model whose SID table differs refuses the stored edits.
    table = loaded.sid_table
    codes = table.codes.copy()
    codes[[0, 1]] = codes[[1, 0]]
    other = SemanticIdTable(table.items, codes, table.suffix, table.codebook_size, table.suffix_size)
    loaded.set_sid_table(other)
    with pytest.raises(SidTableMismatchError):
        load_edits(loaded, ckpt)
    with pytest.raises(SidTableMismatchError):
        GenRecEditCallback().activate(loaded, edits)


@pytest.mark.parametrize("one_one", [True, False])
def test_remove_restores_unedited_model_bit_identically(trained, one_one):
    module, dm, _ = fresh(trained)
    hist = torch.from_numpy(dm.eval_instances(2).history.astype(np.int64))
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        before = module.recommend(hist)
    cb = GenRecEditCallback(dataclasses.replace(FAST, one_one=one_one))
    edits = cb.apply(module, dm)
    assert edits.one_one is one_one
    with torch.no_grad():
        during = module.recommend(hist)
    if one_one:
        assert module.edit is edits and torch.equal(ffn_out_proj(module.t5, 0).weight, weights[
            "t5.decoder.block.0.layer.2.DenseReluDense.wo.weight"])
    else:  # merged into the weights ("w/o one-one"), no per-step edit object
        assert module.edit is None
    assert not torch.equal(during[1], before[1])
    cb.remove(module)
    assert module.edit is None
    with torch.no_grad():
        after = module.recommend(hist)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    for k, v in module.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_merge_option_folds_edits_into_weights(trained):
    module, dm, _ = fresh(trained)
    w0 = ffn_out_proj(module.t5, 0).weight.detach().clone()
    cb = GenRecEditCallback(FAST, merge=True)
    edits = cb.apply(module, dm)
    cb.finish(module)
    assert module.edit is None
    expected = (w0.double() + edits.summed_per_layer()[0].double()).float()
    assert torch.equal(ffn_out_proj(module.t5, 0).weight.detach(), expected)


def test_cold_items_without_sids_need_a_coder(trained):
    module, dm, _ = fresh(trained)
    ds = dm.load()
    old = ds.catalogue_until(0)
    module.set_sid_table(_restrict(module.sid_table, old), old, ds.num_items)
    with pytest.raises(ValueError, match="pass `coder`"):
        GenRecEditCallback(FAST).apply(module, dm)
    before = module.sid_table

    def coder(x):  # any deterministic embeddings → codes map stands in for the tokenizer
        return (x[:, :2].abs() * 1000).long() % 16

    cb = GenRecEditCallback(FAST, coder=coder)
    edits = cb.apply(module, dm)
    table = module.sid_table
    assert np.isin(edits.cold_items, table.items).all()
    # old items keep their SIDs exactly; every full SID stays unique
    rows = table.rows_of(before.items)
    np.testing.assert_array_equal(table.codes[rows], before.codes)
    np.testing.assert_array_equal(table.suffix[rows], before.suffix)
    assert len(np.unique(table.tokens(), axis=0)) == table.num_items
    assert edits.sid_table_hash == table.content_hash()


def test_continual_edit_hook_reports_next_period(trained):
    from runners.continual import ContinualConfig, ContinualRunner, edit_hook

    module, dm, root = fresh(trained)
    ds = dm.load()
    runner = ContinualRunner(data_config(root), ContinualConfig(run_dir=str(root / "cont"), method="reformer",
                                                                accelerator="cpu", logger="none"))
    runner.dataset, runner.embeddings = ds, item_embeddings(ds, show_progress=False)
    runner.rqvae = lambda x: (x[:, :2].abs() * 1000).long() % 16
    old = ds.catalogue_until(0)
    module.set_sid_table(_restrict(module.sid_table, old), old, ds.num_items)
    table_before = module.sid_table
    out = edit_hook(FAST)(runner, 0, module)
    for key in ("edit/period1/edited/test/recall@10/cold", "edit/period1/unedited/test/recall@10/cold",
                "edit/period1/edit/success_rate/pos0", "edit/period1/edit/seconds/values"):
        assert key in out, key
    # the module is left as it was for period 0's own evaluation
    assert module.edit is None and module.sid_table is table_before
    assert edit_hook(FAST)(runner, 2, module) == {}  # no period after the last one


class _RecordingEditCallback(GenRecEditCallback):
    """Saves each rank's edit set after testing (ddp_spawn ranks live in other processes)."""

    def __init__(self, config: EditConfig, out_dir: str) -> None:
        super().__init__(config)
        self.out_dir = out_dir

    def on_test_end(self, trainer, pl_module) -> None:
        state = {k: v for k, v in self.edits.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save({"state": state, "rank0": trainer.is_global_zero, "has_report": self.report is not None},
                   f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_processes_share_rank0_edits_and_match_single_process(trained, tmp_path):
    """Under DDP (2 CPU processes, gloo) rank 0 builds the edits and every rank tests with the same ΔW; the
    edited test metrics equal a single-process run's (each instance counted once)."""
    module, dm, root = fresh(trained)
    single_cb = GenRecEditCallback(FAST)
    single = trainer(root, callbacks=[single_cb]).test(module, datamodule=dm, verbose=False)[0]
    single_cb.remove(module)

    module, dm, root = fresh(trained)
    cb = _RecordingEditCallback(FAST, str(tmp_path))
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(root), enable_checkpointing=False,
                    callbacks=[cb])
    res = ddp.test(module, datamodule=dm, verbose=False)[0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["rank0"] for r in ranks] == [True, False] and all(r["has_report"] for r in ranks)
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys() and ranks[0]["state"]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    for key in ("test/recall@10/cold", "test/recall@10/overall", "test/ndcg@10/warm", "test/count/overall"):
        if key in single:
            assert res[key] == pytest.approx(single[key]), key
    assert res["test/count/overall"] == single["test/count/overall"]


def test_edit_command_reports_val_and_test_before_and_after(trained, tmp_path):
    # `genrec edit` end to end on a checkpoint: validation metrics (for choosing λ / the policy) and test metrics,
    # before and after, the edit time, and the saved edit set that reloads onto the checkpoint.
    import json

    from runners.edit import parser, run

    root, ckpt = trained
    cfg = parser().parse_args(["--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "out"), "--cold_period", "1",
                               "--prepared_dir", str(root / "prep"), "--accelerator", "cpu"])
    metrics = run(cfg, data_config(root), dataclasses.replace(FAST, diagnostic_rows=0))
    for tag in ("unedited", "edited"):
        for split in ("val", "test"):
            assert 0.0 <= metrics[f"{tag}/{split}/recall@10/overall"] <= 1.0
    assert metrics["seconds/edit"] > 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == pytest.approx(metrics)
    module = TigerModule.load_from_checkpoint(ckpt, weights_only=True)
    edits = PositionEdits.load(tmp_path / "out" / "edits.pt", module.sid_table.content_hash())
    assert edits.positions and edits.cov_lambda == FAST.cov_lambda


def test_auto_lambda_chooses_on_validation_and_reports_every_candidate(trained):
    module, dm, _ = fresh(trained)
    cfg = dataclasses.replace(FAST, cov_lambda="auto", auto_lambda_ratios=[0.5, 2.0], diagnostic_rows=0)
    cb = GenRecEditCallback(cfg)
    edits = cb.apply(module, dm)
    sel = cb.report.selection
    m = cb.report.knowledge["num_histories"]
    assert [row["lambda"] for row in sel["table"]] == [0.5 * m, 2.0 * m]
    assert cb.report.times["select"] > 0 and cb.report.edit_seconds < cb.metrics["edit/seconds/total"]
    for row in sel["table"]:
        assert f"edit/auto/lambda{row['lambda']:g}/val/recall@10/cold" in cb.metrics
    if edits is None:
        assert module.edit is None and cb.metrics["edit/applied"] == 0.0 and sel["cov_lambda"] is None
    else:
        chosen = next(r for r in sel["table"] if r["lambda"] == sel["cov_lambda"])
        assert chosen["feasible"] and chosen["cold_gain"] > 0 and edits.cov_lambda == sel["cov_lambda"]
        assert module.edit is edits and cb.metrics["edit/applied"] == 1.0
    cb.remove(module)


def test_auto_lambda_applies_no_edit_when_every_candidate_hurts_warm(trained, monkeypatch):
    module, dm, _ = fresh(trained)
    cfg = dataclasses.replace(FAST, cov_lambda="auto", auto_lambda_ratios=[1.0, 4.0], diagnostic_rows=0)
    cb = GenRecEditCallback(cfg)

    def fake_eval(loader, prefix="val"):  # any active edit halves warm NDCG (but helps cold)
        edited = module.edit is not None
        return {"val/recall@10/cold": 0.5 if edited else 0.0, "val/ndcg@10/cold": 0.3 if edited else 0.0,
                "val/ndcg@10/warm": 0.05 if edited else 0.1}

    monkeypatch.setattr(module, "evaluate_loader", fake_eval)
    with pytest.warns(UserWarning, match="no edit applied"):
        assert cb.apply(module, dm) is None
    assert module.edit is None and cb.edits is None and cb.metrics["edit/applied"] == 0.0
    assert "dropped warm" in cb.report.selection["reason"]


def test_auto_lambda_applies_exactly_the_best_candidate_within_the_warm_limit(trained, monkeypatch):
    """Smaller λ edits harder: more cold gain, more warm loss. The callback must apply the λ with the largest cold
    validation gain among those within 5% warm NDCG, and the edit module must carry that λ."""
    module, dm, _ = fresh(trained)
    cfg = dataclasses.replace(FAST, cov_lambda="auto", auto_lambda_ratios=[0.25, 1.0, 4.0], diagnostic_rows=0)
    cb = GenRecEditCallback(cfg)
    seen = []

    def fake_eval(loader, prefix="val"):
        if module.edit is None:
            return {"val/recall@10/cold": 0.0, "val/ndcg@10/cold": 0.0, "val/ndcg@10/warm": 0.100}
        ratio = module.edit.cov_lambda / m_requests[0]
        seen.append(ratio)
        cold, warm = {0.25: (0.30, 0.090), 1.0: (0.20, 0.096), 4.0: (0.10, 0.099)}[round(ratio, 2)]
        return {"val/recall@10/cold": cold, "val/ndcg@10/cold": cold / 2, "val/ndcg@10/warm": warm}

    m_requests = []
    monkeypatch.setattr(module, "evaluate_loader", fake_eval)
    from genrec.editing.select import candidate_lambdas as real_candidates

    def recording(m, ratios):
        m_requests.append(m)
        return real_candidates(m, ratios)

    monkeypatch.setattr("callbacks.genrecedit.candidate_lambdas", recording)
    edits = cb.apply(module, dm)
    assert sorted(round(r, 2) for r in seen) == [0.25, 1.0, 4.0]  # every candidate evaluated once
    assert edits is not None and module.edit is edits
    assert edits.cov_lambda == pytest.approx(1.0 * m_requests[0])  # 0.25 breaks the warm limit (−10%)
    assert cb.report.selection["cov_lambda"] == pytest.approx(edits.cov_lambda) and cb.metrics["edit/applied"] == 1.0
    cb.remove(module)


def test_one_seed_reaches_the_pseudo_histories(trained):
    _, dm, _ = fresh(trained)
    ds = dm.load()
    train = dm.split(TRAIN, [0])
    warm = np.unique(train.target)
    cold = np.setdiff1d(ds.new_items(1), warm)
    emb = item_embeddings(ds, show_progress=False)

    def knowledge(seed):
        cfg = dataclasses.replace(FAST, seed=seed, histories_per_item=2)
        return GenRecEditor(cfg).build_knowledge(cold, emb[cold], warm, emb[warm], train.history, train.target)

    a, b, c = knowledge(1), knowledge(1), knowledge(2)
    np.testing.assert_array_equal(a.histories, b.histories)
    assert not (a.histories.shape == c.histories.shape and np.array_equal(a.histories, c.histories))


def test_auto_lambda_checks_warm_on_earlier_periods_validation_rows_too(trained):
    """The warm constraint of ``cov_lambda auto`` sees the cold period's validation plus a seeded draw of the
    earlier seen periods' validation rows (ids shifted past the first split's, so none is de-duplicated away)."""
    from genrec.data.splits import VALID

    module, dm, _ = fresh(trained)
    cfg = dataclasses.replace(FAST, cov_lambda="auto", locality_rows=7)
    cb = GenRecEditCallback(cfg)
    n_val = len(dm.val_dataloader().dataset)
    earlier = dm.split(VALID, [0])
    assert len(earlier) > 7
    batches = list(cb.selection_batches(dm, cfg))
    ids = torch.cat([b["index"] for b in batches])
    targets = torch.cat([b["target"] for b in batches])
    assert len(ids) == n_val + 7 and len(torch.unique(ids)) == len(ids) and (ids[n_val:] >= n_val).all()
    assert set(targets[n_val:].tolist()) <= set(earlier.target.tolist())
    assert torch.equal(ids, torch.cat([b["index"] for b in cb.selection_batches(dm, cfg)]))  # seeded: same rows
    other = torch.cat([b["target"] for b in cb.selection_batches(dm, dataclasses.replace(cfg, seed=cfg.seed + 1))])
    assert not torch.equal(other[n_val:], targets[n_val:])
    counted = module.evaluate_loader(cb.selection_batches(dm, cfg))
    assert counted["val/count/overall"] == n_val + 7
    assert len(list(cb.selection_batches(dm, dataclasses.replace(cfg, locality_rows=0)))) == len(dm.val_dataloader())
