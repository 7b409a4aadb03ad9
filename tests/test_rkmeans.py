import numpy as np
import pytest
import torch

from genrec.tokenizers.rkmeans import ResidualKMeans, kmeans, nearest_centroid, squared_distances


def _blobs(centers, per=25, noise=0.01, seed=0):
    g = np.random.default_rng(seed)
    centers = np.asarray(centers, dtype=np.float32)
    x = np.concatenate([c + noise * g.standard_normal((per, centers.shape[1])) for c in centers])
    truth = np.repeat(np.arange(len(centers)), per)
    return torch.tensor(x, dtype=torch.float32), truth


def _same_partition(labels, truth):
    labels = np.asarray(labels)
    # each true cluster maps to exactly one label and vice versa
    pairs = set(zip(truth.tolist(), labels.tolist()))
    return len(pairs) == len(set(truth.tolist())) == len(set(labels.tolist()))


def test_squared_distances_match_cdist():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    assert torch.allclose(squared_distances(x, c), torch.cdist(x, c) ** 2, atol=1e-5)
    idx, d = nearest_centroid(x, c)
    assert torch.equal(idx, (torch.cdist(x, c)).argmin(1))
    assert torch.allclose(d, (torch.cdist(x, c) ** 2).min(1).values, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("batch_size", [None, 16])
def test_kmeans_recovers_separated_clusters_exactly(seed, batch_size):
    centers = [[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10], [10, 10, 10]]
    x, truth = _blobs(centers)
    res = kmeans(x, 5, iters=50, batch_size=batch_size, seed=seed)
    assert _same_partition(res.labels.numpy(), truth)
    # centroids are the blob means (exactly for Lloyd, as streaming means for mini-batch)
    for lab in range(5):
        members = x[res.labels == lab]
        assert torch.allclose(res.centroids[lab], members.mean(0), atol=1e-4)
    assert res.inertia == pytest.approx(float(((x - res.centroids[res.labels]) ** 2).sum()), rel=1e-5)


def test_random_init_starts_from_distinct_data_points():
    x, _ = _blobs([[0, 0], [5, 5], [9, 0]], per=10, noise=1.0)
    res = kmeans(x, 6, iters=0, init="random", seed=2)
    rows = {tuple(r.tolist()) for r in x}
    assert all(tuple(c.tolist()) in rows for c in res.centroids)
    assert len({tuple(c.tolist()) for c in res.centroids}) == 6


def test_kmeans_is_seeded_and_validates():
    x, _ = _blobs([[0, 0], [5, 5], [9, 0]], per=10, noise=1.0)
    a = kmeans(x, 3, seed=7)
    b = kmeans(x, 3, seed=7)
    assert torch.equal(a.centroids, b.centroids)
    with pytest.raises(ValueError, match="at least k=4"):
        kmeans(x[:3], 4)
    with pytest.raises(ValueError, match="init must be"):
        kmeans(x, 3, init="nope")


def test_kmeans_k_equals_n_has_zero_inertia():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    res = kmeans(x, 4, iters=10, seed=0)
    assert res.inertia == pytest.approx(0.0, abs=1e-8)
    assert sorted(res.labels.tolist()) == [0, 1, 2, 3]


def test_residual_kmeans_recovers_hierarchical_codes():
    # x = coarse[a] + fine[b]: level 1 must find a, level 2 must find b, reconstruction is exact.
    coarse = np.array([[100.0, 0, 0, 0], [0, 100.0, 0, 0], [0, 0, 100.0, 0]])
    fine = np.array([[0, 0, 0, 1.0], [0, 0, 0, -1.0]])
    a, b = np.meshgrid(np.arange(3), np.arange(2), indexing="ij")
    a, b = np.repeat(a.ravel(), 4), np.repeat(b.ravel(), 4)
    x = (coarse[a] + fine[b]).astype(np.float32)
    rk = ResidualKMeans(num_levels=2, codebook_size=3, iters=20, seed=1).fit(x)
    codes = rk.encode(x)
    assert codes.shape == (len(x), 2) and codes.dtype == np.int64
    assert _same_partition(codes[:, 0], a)
    # level-2 residuals are ±1 on the last axis: two of three codes separate them
    sign = (x[:, 3] > 0).astype(int)
    assert all(len(set(codes[sign == s, 1].tolist())) == 1 for s in (0, 1))
    assert codes[sign == 0, 1][0] != codes[sign == 1, 1][0]
    assert torch.allclose(rk.decode(codes), torch.tensor(x), atol=1e-4)
    assert rk.codebooks.shape == (2, 3, 4)


def test_residual_kmeans_encode_is_greedy_on_residuals():
    rk = ResidualKMeans(num_levels=2, codebook_size=2)
    rk._codebooks = torch.tensor([[[0.0, 0.0], [4.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    x = np.array([[5.0, 0.1], [0.2, 0.9], [3.9, 0.0]], dtype=np.float32)
    # level 1 → [1, 0, 1]; residuals [1, .1], [.2, .9], [-.1, 0]; level 2 distances to (1,0)/(0,1):
    # [.01 vs 1.81] → 0, [1.45 vs .05] → 1, [1.21 vs 1.01] → 1
    assert rk.encode(x).tolist() == [[1, 0], [0, 1], [1, 1]]


def test_residual_kmeans_minibatch_and_seed():
    x, truth = _blobs([[0, 0], [20, 0], [0, 20], [20, 20]], per=30)
    a = ResidualKMeans(num_levels=1, codebook_size=4, iters=30, batch_size=32, seed=5).fit(x)
    b = ResidualKMeans(num_levels=1, codebook_size=4, iters=30, batch_size=32, seed=5).fit(x)
    assert torch.equal(a.codebooks, b.codebooks)
    assert _same_partition(a.encode(x)[:, 0], truth)
    with pytest.raises(RuntimeError, match="not fitted"):
        _ = ResidualKMeans().codebooks


def test_pca_whitening_projection_is_used_consistently():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=gen) * torch.tensor([10.0, 5, 2, 1, 1, 1, 0.5, 0.5, 0.1, 0.1])
    rk = ResidualKMeans(num_levels=2, codebook_size=8, iters=20, seed=0, pca_dim=4, whiten=True).fit(x)
    z = rk.project(x)
    assert z.shape == (400, 4)
    assert torch.allclose(torch.cov(z.T), torch.eye(4), atol=1e-4)  # whitened: unit variance, decorrelated
    assert np.array_equal(rk.encode(x), ResidualKMeans(2, 8, iters=20, seed=0, pca_dim=4, whiten=True).fit_encode(x))
    with pytest.raises(ValueError, match="needs pca_dim"):
        ResidualKMeans(whiten=True)
