import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.item_embeddings import ItemEmbeddingDataModule
from genrec.tokenizers.rkmeans import ResidualKMeans
from genrec.tokenizers.rqvae import (
    RQVAE,
    ResidualQuantizer,
    RQVAEConfig,
    VectorQuantizer,
    build_sid_table,
    cf_alignment,
    codebook_perplexity,
    codebook_usage,
    collision_rate,
    sinkhorn_codes,
)
from genrec.tokenizers.sid import SemanticIdTable, SuffixOverflowError
from lightning_modules.rqvae import RQVAEModule


def _tiny_config(**kw):
    base = {"input_dim": 12, "hidden_dims": (16, 8), "latent_dim": 4, "num_levels": 2, "codebook_size": 8, "kmeans_iters": 20}
    base.update(kw)
    return RQVAEConfig(**base)


def _set_codebook(vq, rows):
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor(rows, dtype=torch.float32))


# ------------------------------------------------------------------------------------------ one level


def test_vector_quantizer_picks_nearest_code_and_losses():
    vq = VectorQuantizer(3, 2)
    _set_codebook(vq, [[0, 0], [1, 0], [0, 1]])
    r = torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.2, 0.8]], requires_grad=True)
    out = vq(r)
    assert out.codes.tolist() == [1, 0, 2]
    e = torch.tensor([[1.0, 0], [0, 0], [0, 1.0]])
    assert torch.allclose(out.quantized, e)
    # mean over B×d of (r − e)²: (.01+.01 + .01+.04 + .04+.04) / 6
    expected = (0.01 + 0.01 + 0.01 + 0.04 + 0.04 + 0.04) / 6
    assert out.codebook_loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.commit_loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(out.distances, ((r[:, None] - e.new_tensor([[0, 0], [1, 0], [0, 1]])[None]) ** 2).sum(-1))


def test_straight_through_gradient_is_identity_and_losses_route_gradients():
    vq = VectorQuantizer(3, 2)
    _set_codebook(vq, [[0, 0], [1, 0], [0, 1]])
    r = torch.tensor([[0.9, 0.1], [0.1, 0.2]], requires_grad=True)
    w = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    (vq(r).quantized * w).sum().backward()
    assert torch.equal(r.grad, w)
    assert vq.codebook.weight.grad is None or torch.all(vq.codebook.weight.grad == 0)
    # codebook loss moves only the codebook, commitment only the input
    r.grad = None
    out = vq(r)
    out.codebook_loss.backward()
    assert r.grad is None or torch.all(r.grad == 0)
    g = vq.codebook.weight.grad
    # d/de_1 of mean((e−r)²) over 4 entries for row 0 (code 1): 2(e − r)/4
    assert torch.allclose(g[1], 2 * (torch.tensor([1.0, 0]) - r[0].detach()) / 4)
    vq.codebook.weight.grad = None
    vq(r).commit_loss.backward()
    assert torch.allclose(r.grad[1], 2 * (r[1].detach() - torch.tensor([0.0, 0])) / 4)
    assert vq.codebook.weight.grad is None or torch.all(vq.codebook.weight.grad == 0)


# ------------------------------------------------------------------------------------------ residual levels


def test_residual_quantizer_codes_residuals_and_jacobian():
    rq = ResidualQuantizer(num_levels=2, codebook_size=2, dim=2)
    _set_codebook(rq.levels[0], [[0, 0], [4, 0]])
    _set_codebook(rq.levels[1], [[1, 0], [0, 1]])
    z = torch.tensor([[5.0, 0.1], [0.2, 0.9]], requires_grad=True)
    out = rq(z)
    assert out.codes.tolist() == [[1, 0], [0, 1]]
    assert torch.allclose(out.residuals[1], torch.tensor([[1.0, 0.1], [0.2, 0.9]]))
    assert torch.allclose(out.quantized, torch.tensor([[5.0, 0.0], [0.0, 1.0]]))
    assert out.distances.shape == (2, 2, 2)
    assert torch.allclose(out.distances[0, 1], torch.tensor([0.01, 1.0 + 0.81]))
    # dẑ/dz = I (straight-through through the sum of levels)
    jac = torch.autograd.functional.jacobian(lambda v: rq(v).quantized, z.detach())
    assert torch.equal(jac, torch.einsum("ij,ab->iajb", torch.eye(2), torch.eye(2)))
    # deeper residuals carry no gradient to z (reference routing, spec §1.1)
    g = torch.autograd.grad(rq(z).residuals[1].sum(), z, allow_unused=True)[0]
    assert g is None or torch.all(g == 0)
    # per-level losses: level 1 residuals to (4,0)/(0,0), level 2 to (1,0)/(0,1)
    l1 = ((torch.tensor([[1.0, 0.1], [0.2, 0.9]])) ** 2).mean()
    l2 = ((torch.tensor([[0.0, 0.1], [0.2, -0.1]])) ** 2).mean()
    assert torch.allclose(out.codebook_losses, torch.stack([l1, l2]))
    assert torch.allclose(out.commit_losses, torch.stack([l1, l2]))
    assert torch.equal(rq.encode_codes(z), out.codes)
    assert torch.allclose(rq.decode_codes(out.codes), out.quantized)


def test_usage_counts_only_in_training():
    rq = ResidualQuantizer(num_levels=1, codebook_size=3, dim=1)
    _set_codebook(rq.levels[0], [[0.0], [1.0], [2.0]])
    rq.train()
    rq(torch.tensor([[0.1], [0.2], [1.9]]))
    assert rq.usage[0].tolist() == [2.0, 0.0, 1.0]
    rq.eval()
    rq(torch.tensor([[1.0]]))
    assert rq.usage[0].tolist() == [2.0, 0.0, 1.0]


def test_sinkhorn_balances_crowded_code():
    # every row is nearest code 0, but the transport plan with uniform marginals is the permutation below
    d = torch.tensor(
        [[0.0, 0.1, 0.9, 0.9], [0.0, 0.9, 0.1, 0.9], [0.0, 0.9, 0.9, 0.1], [0.0, 0.8, 0.8, 0.8]]
    )
    assert d.argmin(1).tolist() == [0, 0, 0, 0]
    assert sinkhorn_codes(d, epsilon=0.003, iters=50).tolist() == [1, 2, 3, 0]
    assert sinkhorn_codes(d, epsilon=0.0, iters=50).tolist() == [0, 0, 0, 0]


# ------------------------------------------------------------------------------------------ model + losses


def test_compute_loss_parts_and_total():
    torch.manual_seed(0)
    cfg = _tiny_config(cf_weight=0.5)
    model = RQVAE(cfg)
    x, cf = torch.randn(6, 12), torch.randn(6, 4)
    losses = model.compute_loss(x, cf)
    out = losses["output"]
    assert losses["recon"].item() == pytest.approx(F.mse_loss(model.decode(out.z_q), x).item(), rel=1e-6)
    quant = (out.quant.codebook_losses + 0.25 * out.quant.commit_losses).mean()
    assert losses["quant"].item() == pytest.approx(quant.item(), rel=1e-6)
    total = losses["recon"] + quant + 0.5 * losses["cf"]
    assert losses["total"].item() == pytest.approx(total.item(), rel=1e-6)
    assert model.compute_loss(x)["cf"].item() == 0.0
    # a given latent replaces the encoder output (DACT branches)
    z = torch.randn(6, 4)
    assert torch.equal(model.compute_loss(x, z=z)["output"].z, z)


def test_cf_loss_hand_values():
    model = RQVAE(_tiny_config(latent_dim=2, cf_weight=1.0))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # cosine logits = I → each row: −log(e / (e + 1))
    assert model.cf_loss(z, z.clone()).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    # swapped CF rows: −log(1 / (1 + e))
    assert model.cf_loss(z, z.flip(0)).item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    zz = torch.randn(32, 2, generator=g)
    assert model.cf_loss(zz, zz).item() < model.cf_loss(zz, zz[torch.randperm(32, generator=g)]).item()
    # scale does not matter for cosine, does for dot
    assert model.cf_loss(z, 5 * z).item() == pytest.approx(model.cf_loss(z, z).item(), rel=1e-6)
    dot = RQVAE(_tiny_config(latent_dim=2, cf_similarity="dot"))
    assert dot.cf_loss(z, 5 * z).item() == pytest.approx(math.log(1 + math.exp(-5)), rel=1e-5)


def test_cf_projection_and_alignment():
    x, cf = torch.randn(5, 12), torch.randn(5, 7)
    with pytest.raises(ValueError, match="cf_dim=7"):
        RQVAE(_tiny_config()).compute_loss(x, cf)
    model = RQVAE(_tiny_config(cf_dim=7))
    assert model.project_cf(cf).shape == (5, 4)
    assert torch.isfinite(model.compute_loss(x, cf)["cf"])
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert cf_alignment(a, torch.tensor([[3.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)


def test_config_validation():
    with pytest.raises(ValueError, match="cf_similarity"):
        RQVAEConfig(cf_similarity="l2")
    with pytest.raises(ValueError, match="codebook_size"):
        RQVAEConfig(codebook_size=0)


def test_kmeans_init_matches_residual_kmeans_on_latents():
    torch.manual_seed(1)
    model = RQVAE(_tiny_config(kmeans_seed=11))
    x = torch.randn(40, 12)
    model.init_codebooks_kmeans(x)
    with torch.no_grad():
        z = model.encode(x)
    rk = ResidualKMeans(2, 8, 20, seed=11).fit(z)
    assert torch.allclose(model.quantizer.codebooks, rk.codebooks)
    assert bool(model.codebooks_initialized)
    assert np.array_equal(model.get_codes(x), rk.encode(z))
    with pytest.raises(ValueError, match="at least codebook_size=8"):
        RQVAE(_tiny_config()).init_codebooks_kmeans(x[:5])


def test_get_codes_and_level_log_probs():
    torch.manual_seed(2)
    model = RQVAE(_tiny_config(dropout=0.5))
    x = torch.randn(9, 12)
    model.init_codebooks_kmeans(torch.randn(30, 12))
    model.train()
    codes = model.get_codes(x, batch_size=4)
    assert model.training  # mode restored
    assert codes.shape == (9, 2) and codes.dtype == np.int64
    model.eval()
    out = model(x)
    assert np.array_equal(out.codes.numpy(), codes)
    logp = model.level_log_probs(out.z, level=0, temperature=2.0)
    assert torch.allclose(logp, F.log_softmax(-out.quant.distances[:, 0] / 2.0, dim=-1), atol=1e-6)
    assert torch.allclose(model.level_log_probs(out.z, level=1), F.log_softmax(-out.quant.distances[:, 1], -1), atol=1e-5)
    assert torch.equal(logp.argmax(1), out.codes[:, 0])


def test_dead_code_reset_reseeds_unused_codes():
    torch.manual_seed(3)
    model = RQVAE(_tiny_config(num_levels=1, dead_code_threshold=1.0))
    x = torch.randn(20, 12)
    model.init_codebooks_kmeans(x)
    with torch.no_grad():
        model.quantizer.levels[0].codebook.weight[5] = 1e3  # unreachable code
    model.train()
    model(x)
    assert model.quantizer.usage[0, 5] == 0
    reset = model.reset_dead_codes(x, generator=torch.Generator().manual_seed(0))
    assert reset[0] >= 1
    with torch.no_grad():
        z = model.encode(x)
    new = model.quantizer.levels[0].codebook.weight[5]
    assert any(torch.allclose(new, zi) for zi in z)
    assert model.quantizer.usage.sum() == 0


# ------------------------------------------------------------------------------------------ diagnostics + SIDs


def test_usage_perplexity_collision():
    codes = np.array([[0, 1], [0, 1], [1, 2], [3, 2]])
    assert codebook_usage(codes, 4) == [0.75, 0.5]
    p = np.array([0.5, 0.25, 0.25])
    assert codebook_perplexity(codes, 4)[0] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert codebook_perplexity(np.array([[0], [1], [2], [3]]), 4) == [pytest.approx(4.0)]
    assert collision_rate(codes) == pytest.approx(0.25)
    table = SemanticIdTable.from_codes(np.arange(4), codes, codebook_size=4, suffix_size=4)
    assert collision_rate(codes) == pytest.approx(table.collision_rate())


def test_build_sid_table_assigns_suffixes_and_reports_overflow():
    codes = np.array([[1, 2, 3], [1, 2, 3], [0, 0, 0], [1, 2, 3]])
    table = build_sid_table(codes, np.array([10, 11, 12, 13]), codebook_size=4, suffix_size=4)
    assert table.suffix.tolist() == [0, 1, 0, 2]
    assert table.unique_sid_rate() == 1.0
    assert build_sid_table(codes, codebook_size=4).items.tolist() == [0, 1, 2, 3]
    with pytest.raises(SuffixOverflowError, match=r"\(1, 2, 3\)"):
        build_sid_table(codes, codebook_size=4, suffix_size=2)


# ------------------------------------------------------------------------------------------ lightning


def _clustered(n=160, dim=12, seed=0):
    g = np.random.default_rng(seed)
    centers = 3 * g.standard_normal((20, dim))
    x = centers[g.integers(0, 20, n)] + 0.3 * g.standard_normal((n, dim))
    return x.astype(np.float32), g.standard_normal((n, 6)).astype(np.float32)


def test_datamodule_batches(tmp_path):
    x, cf = _clustered(n=10)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "cf.npy", cf)
    dm = ItemEmbeddingDataModule(str(tmp_path / "x.npy"), str(tmp_path / "cf.npy"), batch_size=4)
    dm.setup("fit")
    assert (dm.num_items, dm.dim, dm.cf_dim) == (10, 12, 6)
    batches = list(dm.train_dataloader())
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    items = torch.cat([b[2] for b in batches])
    assert sorted(items.tolist()) == list(range(10))
    for xb, cfb, ib in batches:
        assert torch.equal(xb, torch.from_numpy(x)[ib]) and torch.equal(cfb, torch.from_numpy(cf)[ib])
    (xb, cfb, ib), = list(dm.predict_dataloader())
    assert ib.tolist() == list(range(10))
    no_cf = ItemEmbeddingDataModule.from_arrays(x, batch_size=4)
    assert next(iter(no_cf.train_dataloader()))[1] is None
    np.save(tmp_path / "bad.npy", cf[:5])
    with pytest.raises(ValueError, match="same rows"):
        ItemEmbeddingDataModule(str(tmp_path / "x.npy"), str(tmp_path / "bad.npy")).setup()
    with pytest.raises(FileNotFoundError, match="embeddings_path"):
        ItemEmbeddingDataModule(str(tmp_path / "missing.npy")).setup()


def test_rqvae_module_tiny_fit_yields_unique_sid_table():
    L.seed_everything(0)
    x, cf = _clustered()
    dm = ItemEmbeddingDataModule.from_arrays(x, cf, batch_size=64)
    module = RQVAEModule(_tiny_config(cf_dim=6), warmup_epochs=1)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, datamodule=dm)
    table = module.sid_table
    assert table.num_items == 160 and table.unique_sid_rate() == 1.0
    assert table.items.tolist() == list(range(160))
    assert np.array_equal(table.codes, module.model.get_codes(x))
    m = trainer.callback_metrics
    for key in ("loss_recon", "loss", "loss_cf", "codebook_usage/level1", "perplexity/level2", "collision_rate",
                "cf_alignment"):
        assert f"rqvae/train/{key}" in m, key
    assert 0 < float(m["rqvae/train/codebook_usage/level1"]) <= 1
    assert module.sid_table_path is None  # no checkpoint dir → kept in memory


def test_rqvae_module_saves_table_next_to_checkpoint(tmp_path):
    L.seed_everything(0)
    x, _ = _clustered()
    dm = ItemEmbeddingDataModule.from_arrays(x, batch_size=64)
    module = RQVAEModule(_tiny_config(), kmeans_init_on="first_batch", warmup_epochs=0)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, callbacks=[ckpt], enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "ckpt" / "sid_table.parquet"
    assert module.sid_table_path == path and path.exists()
    saved = SemanticIdTable.load(path)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert state["genrec_sid_table"]["content_hash"] == saved.content_hash()
    restored = RQVAEModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert np.array_equal(restored.model.get_codes(x), saved.codes)
    assert bool(restored.model.codebooks_initialized)
