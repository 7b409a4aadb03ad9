"""SASRec and popularity baselines: causality, padding, shapes, losses, exact popularity ranking, a tiny fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genrec.models.popularity import PopularityRecommender
from genrec.models.sasrec import SASRec, SASRecConfig


def _model(**kw) -> SASRec:
    torch.manual_seed(0)
    cfg = {"num_items": 30, "hidden": 16, "num_layers": 2, "num_heads": 2, "max_len": 8, "dropout": 0.2}
    cfg.update(kw)
    return SASRec(SASRecConfig(**cfg))


def _histories(b: int = 5, length: int = 8, num_items: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, num_items, (b, length), generator=g)
    lengths = torch.tensor([length, 1, 3, 5, 7][:b])
    pad = torch.arange(length)[None] < (length - lengths)[:, None]
    return h.masked_fill(pad, -1)


# ---------------------------------------------------------------------------------------------- SASRec


@torch.no_grad()
@pytest.mark.parametrize("grad", [False, True])
def test_causal_later_positions_never_change_earlier_outputs(grad):
    model = _model().eval()
    h = _histories()
    with torch.set_grad_enabled(grad):  # the encoder layer takes a different (fast) path without autograd
        base = model(h)
        for t in range(h.shape[1]):
            changed = h.clone()
            changed[:, t] = (changed[:, t].clamp(min=0) + 7) % 30  # also turns padding into a real item
            out = model(changed)
            assert torch.equal(out[:, :t], base[:, :t]), f"position {t} leaked into earlier outputs"
            assert not torch.equal(out[:, t:], base[:, t:])


@torch.no_grad()
def test_left_padding_does_not_change_last_position_scores():
    model = _model(max_len=12).eval()
    h = _histories(length=8)
    wider = torch.cat([torch.full((h.shape[0], 4), -1), h], dim=1)
    assert torch.allclose(model.scores(wider), model.scores(h), atol=1e-5, rtol=0)
    # a history of 3 items scores the same at width 3 (no padding) and width 8 (5 padding slots)
    assert torch.allclose(model.scores(h[2:3, -3:]), model.scores(h[2:3]), atol=1e-5, rtol=0)
    # padding content is never read: its embedding row is zero and attention masks it
    assert torch.count_nonzero(model.item_emb.weight[0]) == 0


def test_shapes_and_truncation():
    model = _model().eval()
    h = _histories()
    assert model(h).shape == (5, 8, 16)
    assert model.scores(h).shape == (5, 30)
    assert model.item_embeddings().shape == (30, 16)
    emb4 = model.item_embeddings(4)
    assert emb4.shape == (30, 4)
    # the principal-direction projection keeps the centred table's Gram structure as well as 4 axes can
    full = model.item_embeddings()
    centred = full - full.mean(0)
    s = torch.linalg.svdvals(centred)
    assert torch.allclose(emb4.norm() ** 2, (s[:4] ** 2).sum(), rtol=1e-4)
    # longer inputs keep their last max_len items
    long = torch.cat([torch.randint(0, 30, (5, 3)), h], dim=1)
    assert torch.equal(model.scores(long), model.scores(h))
    with pytest.raises(ValueError, match="outside"):
        model.scores(torch.full((1, 3), 30))
    with pytest.raises(ValueError, match="num_items"):
        SASRec(SASRecConfig())


def test_sequence_targets_shift_history_and_ignore_padding():
    h = torch.tensor([[-1, -1, 4, 5], [1, 2, 3, 4]])
    targets, keep = SASRec.sequence_targets(h, torch.tensor([9, 8]))
    assert targets.tolist() == [[-1, 4, 5, 9], [2, 3, 4, 8]]
    assert keep.tolist() == [[False, False, True, True], [True, True, True, True]]


def test_ce_loss_equals_reference_cross_entropy():
    model = _model(dropout=0.0).eval()
    h, y = _histories(), torch.tensor([1, 2, 3, 4, 5])
    out = model(h)
    targets, keep = model.sequence_targets(h, y)
    logits = out @ model.item_emb.weight[1:].T
    ref = torch.stack([-torch.log_softmax(logits[b, t], -1)[targets[b, t]] for b, t in keep.nonzero().tolist()])
    assert torch.allclose(model.loss(h, y), ref.mean(), atol=1e-6)
    last = _model(dropout=0.0, train_positions="last").eval()
    last.load_state_dict(model.state_dict())
    assert torch.allclose(last.loss(h, y), torch.nn.functional.cross_entropy(logits[:, -1], y), atol=1e-6)
    # a restricted catalogue drops the excluded items from the softmax
    mask = torch.zeros(30, dtype=torch.bool)
    mask[:10] = True
    ref_masked = torch.nn.functional.cross_entropy(logits[:, -1].masked_fill(~mask, float("-inf")), y)
    assert torch.allclose(last.loss(h, y, item_mask=mask), ref_masked, atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_both_losses_give_finite_gradients(loss):
    model = _model(loss=loss, num_negatives=3).train()
    value = model.loss(_histories(), torch.tensor([1, 2, 3, 4, 5]))
    value.backward()
    assert torch.isfinite(value)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.item_emb.weight.grad[0].abs().sum() == 0  # the padding row never learns
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_negatives_avoid_the_positive_and_stay_in_the_pool():
    model = _model()
    torch.manual_seed(1)
    pos = torch.randint(0, 30, (2000,))
    neg = model.sample_negatives(pos, 4)
    assert neg.shape == (2000, 4) and not (neg == pos[:, None]).any()
    assert set(neg.unique().tolist()) == set(range(30))
    mask = torch.zeros(30, dtype=torch.bool)
    mask[[3, 5, 7]] = True
    neg = model.sample_negatives(torch.full((500,), 5), 2, mask)
    assert set(neg.unique().tolist()) == {3, 7}


# ---------------------------------------------------------------------------------------------- popularity


def test_popularity_ranking_exact():
    # counts: item 4 ×3, item 1 ×2, items 0 and 2 ×2 (tie → smaller index first), item 3 ×1, item 5 never
    targets = np.array([4, 1, 4, 2, 1, 0, 4, 0, 2, 3])
    rec = PopularityRecommender(7, targets, catalogue=np.array([0, 1, 2, 4, 5, 6]))  # item 3 not in catalogue
    assert rec.counts.tolist() == [2, 2, 2, 1, 3, 0, 0]
    assert rec.ranking.tolist() == [4, 0, 1, 2, 5, 6]
    assert rec.top_k(3, 2).tolist() == [[4, 0, 1], [4, 0, 1]]
    assert rec.top_k(10, 1).tolist() == [[4, 0, 1, 2, 5, 6]]
    assert torch.isinf(rec.scores()[3])


class _TinyData:
    """Duck-typed datamodule for ``evaluate_popularity``: 4 train targets, 3 test instances."""

    num_items = 6

    def setup(self, stage=None):
        pass

    def train_instances(self):
        class _I:
            target = np.array([2, 2, 5, 2, 5, 1])

        return _I()

    def catalogue(self):
        return np.array([0, 1, 2, 3, 5])

    def test_dataloader(self):
        # targets 5 (rank 2), 1 (rank 3), 3 (rank 4, outside top-3 but inside top-5), 4 (outside the catalogue)
        subsets = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 1], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
        return [{"history": torch.zeros(4, 2, dtype=torch.long), "target": torch.tensor([5, 1, 3, 4]),
                 "subsets": subsets, "index": torch.arange(4)}]


def test_popularity_metrics_exact():
    from lightning_modules.popularity import evaluate_popularity

    out = evaluate_popularity(_TinyData(), ks=(1, 3, 5))  # ranking: 2, 5, 1, 0, 3
    assert out["popularity/test/recall@1/overall"] == 0.0
    assert out["popularity/test/recall@3/overall"] == pytest.approx(2 / 4)
    assert out["popularity/test/recall@5/overall"] == pytest.approx(3 / 4)
    assert out["popularity/test/recall@3/warm"] == pytest.approx(1.0)
    assert out["popularity/test/recall@3/cold"] == 0.0
    assert out["popularity/test/recall@5/cold"] == pytest.approx(1 / 2)
    ndcg3 = (1 / np.log2(3) + 1 / np.log2(4)) / 4
    assert out["popularity/test/ndcg@3/overall"] == pytest.approx(ndcg3)
    assert out["popularity/test/ndcg@5/new"] == pytest.approx((1 / np.log2(4)) / 2)
    assert out["popularity/test/count/overall"] == 4
    assert not any("_p" in k or "invalid" in k for k in out)


def test_item_tokens_are_distinct_past_the_16_bit_limit():
    from lightning_modules.sasrec import item_tokens

    items = torch.tensor([-1, 0, 65533, 65534, 65535, 200_000])
    tok = item_tokens(items, 2)
    assert tok[0].tolist() == [0, 0]
    assert len({tuple(t) for t in tok[1:].tolist()}) == 5 and (tok[1:] > 0).all() and (tok < 1 << 16).all()
    assert item_tokens(items[:3], 1)[:, 0].tolist() == [0, 1, 65534]


# ---------------------------------------------------------------------------------------------- Lightning


@pytest.fixture(scope="module")
def synthetic_dm(tmp_path_factory):
    from datamodules.sequences import SequenceDataModule
    from genrec.data.config import DataConfig
    from genrec.data.synthetic import SyntheticConfig

    data = DataConfig(synthetic=SyntheticConfig(num_users=200, num_items=150))
    return SequenceDataModule(data, prepared_dir=str(tmp_path_factory.mktemp("syn") / "prep"),
                              train_periods=[0, 1], eval_period=1, batch_size=64)


def test_tiny_fit_and_test_logs_metrics(synthetic_dm, tmp_path):
    import lightning as L

    from lightning_modules.sasrec import SASRecModule

    loss = "bce"  # the non-default loss: its name must reach the logged key and the hparams
    L.seed_everything(0)
    module = SASRecModule({"hidden": 16, "loss": loss}, ks=(5, 10))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=synthetic_dm)
    assert module.hparams.loss == loss and module.hparams.model["num_items"] == synthetic_dm.num_items
    assert f"train/loss_{loss}" in trainer.callback_metrics
    assert "val/recall@10/cold" in trainer.callback_metrics
    (res,) = trainer.test(module, datamodule=synthetic_dm, verbose=False)
    for subset in ("overall", "warm", "cold", "new"):
        for key in ("recall@5", "recall@10", "ndcg@10"):
            assert f"test/{key}/{subset}" in res
    assert 0.0 <= res["test/recall@10/overall"] <= 1.0
    assert res["test/recall@5/overall"] <= res["test/recall@10/overall"]
    written = json.loads((tmp_path / "metrics.json").read_text())  # every test stage writes metrics.json
    assert written["test/recall@10/overall"] == pytest.approx(res["test/recall@10/overall"])
    # recommendations never leave the evaluation catalogue
    batch = next(iter(synthetic_dm.test_dataloader()))
    items, _ = module.recommend(batch["history"])
    known = set(synthetic_dm.catalogue().tolist())
    assert set(items.flatten().tolist()) <= known
    # CF export: (num_items, dim) .npy, the model's own table or its principal projection
    path = module.export_cf_embeddings(tmp_path / "cf.npy")
    table = np.load(path)
    assert table.shape == (synthetic_dm.num_items, 16)
    assert np.allclose(table, module.model.item_emb.weight[1:].detach().numpy())
    assert np.load(module.export_cf_embeddings(tmp_path / "cf8.npy", dim=8)).shape == (synthetic_dm.num_items, 8)
