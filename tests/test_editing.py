"""GenRecEdit core (genrec/editing): maths, One-One semantics, caching, knowledge, orchestration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.decoding.reference import reference_score_sids
from genrec.editing import (
    EditConfig,
    GenRecEditor,
    PositionEdits,
    SidHistoryEncoder,
    SidTableMismatchError,
    ValueConfig,
    choose_layers,
    closed_form_update,
    nearest_neighbours,
    optimise_values,
    preserved_covariances,
    probe_accuracy,
    pseudo_knowledge,
    solve_update,
    true_history_knowledge,
)
from genrec.editing.covariance import model_fingerprint
from genrec.editing.keys import capture_wo, collect_keys, decoder_inputs, encode, ffn_out_proj
from genrec.editing.knowledge import NOTEBOOK_EXTRA
from genrec.editing.probe import _fit_logistic, probe_accuracies, probe_accuracy_matrix
from genrec.errors import ConfigError
from genrec.models.tiger import TigerConfig, build_tiger
from genrec.tokenizers.sid import SemanticIdTable

N_WARM, N_COLD = 50, 10




@pytest.fixture(scope="module")
def sid_table() -> SemanticIdTable:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 10, size=(N_WARM + N_COLD, 3))
    return SemanticIdTable.from_codes(np.arange(N_WARM + N_COLD), codes, codebook_size=10, suffix_size=10)


def tiny_model(sid_table: SemanticIdTable, seed: int = 0, ffn: str = "gated-silu"):
    torch.manual_seed(seed)
    cfg = TigerConfig(
        num_encoder_layers=2, num_decoder_layers=2, d_model=32, num_heads=2, d_kv=16, d_ff=64, dropout=0.1,
        max_history_items=5, feed_forward_proj=ffn,
    )
    return build_tiger(cfg, sid_table.vocab_size)  # vocab 41, gated-silu; left in train mode on purpose


@pytest.fixture(scope="module")
def train_data():
    rng = np.random.default_rng(1)
    n, width = 200, 5
    history = np.full((n, width), -1, dtype=np.int64)
    lengths = rng.integers(1, width + 1, size=n)
    for i, length in enumerate(lengths):
        history[i, width - length :] = rng.integers(0, N_WARM, size=length)
    target = rng.integers(0, N_WARM, size=n)
    return history, target


def _inputs(sid_table, history, items):
    ids, mask = SidHistoryEncoder(sid_table, max_items=5)(history)
    return ids, mask, torch.from_numpy(sid_table.tokens_of(items))


# ------------------------------------------------------------------------------------------ closed form
def test_closed_form_equals_least_squares():
    g = torch.Generator().manual_seed(0)
    m, f, d, n0, lam = 20, 12, 5, 50, 3.0
    k1 = torch.randn(m, f, generator=g, dtype=torch.float64)
    r = torch.randn(m, d, generator=g, dtype=torch.float64)
    k0 = torch.randn(n0, f, generator=g, dtype=torch.float64)
    c0 = k0.T @ k0 / n0
    dw = solve_update(r.T @ k1, k1.T @ k1, c0, lam)
    # min ‖ΔW K1 − R‖² + λ tr(ΔW C0 ΔWᵀ)  ⇔  stacked least squares [K1ᵀ; √(λ/N) K0ᵀ] ΔWᵀ ≈ [Rᵀ; 0].
    a = torch.cat([k1, (lam / n0) ** 0.5 * k0])
    b = torch.cat([r, torch.zeros(n0, d, dtype=torch.float64)])
    lstsq = torch.linalg.lstsq(a, b).solution.T
    explicit = torch.linalg.solve(lam * c0 + k1.T @ k1, k1.T @ r).T
    assert dw.shape == (d, f) and dw.dtype == torch.float64
    torch.testing.assert_close(dw, lstsq, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(dw, explicit, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(closed_form_update(k1, r, c0, lam), dw)


def test_closed_form_not_positive_definite_raises():
    k1 = torch.randn(3, 8, dtype=torch.float64)  # rank 3 < 8 and λ = 0
    with pytest.raises(ValueError, match="not positive definite"):
        solve_update(torch.zeros(4, 8, dtype=torch.float64), k1.T @ k1, torch.zeros(8, 8), 0.0)


def test_relu_keys_are_captured_at_wo_input(sid_table, train_data):
    model = tiny_model(sid_table, ffn="relu")
    history, target = train_data
    ids, mask, tokens = _inputs(sid_table, history[:8], target[:8])
    keys, z0 = capture_wo(model, ids, mask, decoder_inputs(tokens, 4), [(1, 3)], with_values=True)[(1, 3)]
    assert keys.shape == (8, 64) and (keys >= 0).all()  # relu output feeds wo
    torch.testing.assert_close(z0, keys @ ffn_out_proj(model, 1).weight.T)


def test_small_lambda_edit_hits_targets(sid_table, train_data):
    model = tiny_model(sid_table)
    history, target = train_data
    ids, mask, tokens = _inputs(sid_table, history[:16], target[:16])
    layer, p = 1, 2
    dec = decoder_inputs(tokens, 4)
    keys, z0 = capture_wo(model, ids, mask, dec, [(layer, p)], with_values=True)[(layer, p)]
    g = torch.Generator().manual_seed(3)
    residual = torch.randn(16, 32, generator=g)
    covs, _ = preserved_covariances(
        model, SidHistoryEncoder(sid_table, 5), history, sid_table.tokens_of(target), [(layer, p)], batch_size=64
    )
    dw = solve_update(residual.double().T @ keys.double(), keys.double().T @ keys.double(), covs[(layer, p)], 1e-7)
    edits = PositionEdits({p: (layer, dw)}, 1e-7, np.array([1]), sid_table.content_hash())
    # The edited wo output at (layer, p) must be z0 + R for every request key.
    outputs = {}

    def grab(module, inputs, output):
        outputs["z"] = (output[:, -1] + edits.delta(p, inputs[0][:, -1])).detach()

    handle = ffn_out_proj(model, layer).register_forward_hook(grab)
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, : p + 1])
    finally:
        handle.remove()
    torch.testing.assert_close(outputs["z"], z0 + residual, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------ One-One
def _random_edits(sid_table, positions_layers, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    deltas = {p: (layer, scale * torch.randn(32, 64, generator=g)) for p, layer in positions_layers.items()}
    return PositionEdits(deltas, 1.0, np.array([N_WARM]), sid_table.content_hash())


def test_one_one_changes_only_own_position(sid_table, train_data):
    model = tiny_model(sid_table)
    history, target = train_data
    ids, mask, tokens = _inputs(sid_table, history[:8], target[:8])
    base = reference_score_sids(model, ids, mask, tokens, None)
    empty = reference_score_sids(model, ids, mask, tokens, _random_edits(sid_table, {}))
    torch.testing.assert_close(empty, base, rtol=0, atol=1e-5)
    for p in range(4):
        edited = reference_score_sids(model, ids, mask, tokens, _random_edits(sid_table, {p: 1}))
        others = [q for q in range(4) if q != p]
        assert torch.equal(edited[:, others], empty[:, others])  # exact: identical computations
        assert (edited[:, p] - empty[:, p]).abs().min() > 1e-4


def test_one_one_prefix_states_unedited(sid_table, train_data):
    model = tiny_model(sid_table)
    history, target = train_data
    ids, mask, tokens = _inputs(sid_table, history[:8], target[:8])
    states = []
    handle = model.decoder.register_forward_hook(lambda m, i, o: states.append(o.last_hidden_state.clone()))
    try:
        reference_score_sids(model, ids, mask, tokens, _random_edits(sid_table, {}))
        plain = list(states)
        states.clear()
        reference_score_sids(model, ids, mask, tokens, _random_edits(sid_table, {p: 0 for p in range(4)}))
    finally:
        handle.remove()
    for p in range(4):
        assert torch.equal(states[p][:, :p], plain[p][:, :p])  # prefix steps: unedited model
        assert not torch.allclose(states[p][:, p], plain[p][:, p])


def test_position_zero_equals_merged_weights_but_later_positions_do_not(sid_table, train_data):
    model = tiny_model(sid_table)
    history, target = train_data
    ids, mask, tokens = _inputs(sid_table, history[:8], target[:8])
    for p in range(4):
        # Layer 0: the edited prefix states reach step p through layer 1's self-attention (an edit in the
        # last layer could not influence later steps at all).
        edits = _random_edits(sid_table, {p: 0}, scale=1.0, seed=p)
        one_one = reference_score_sids(model, ids, mask, tokens, edits)
        with edits.merged(model):
            merged = reference_score_sids(model, ids, mask, tokens, None)
        if p == 0:  # one time step: one-one and merged coincide
            torch.testing.assert_close(one_one[:, 0], merged[:, 0], rtol=1e-5, atol=1e-5)
        else:  # merged also edits the recomputed prefix (and other positions)
            assert not torch.allclose(one_one[:, p], merged[:, p], atol=1e-4)


def test_removal_is_bit_identical_and_weights_untouched(sid_table, train_data):
    model = tiny_model(sid_table)
    model.eval()
    history, target = train_data
    ids, mask, tokens = _inputs(sid_table, history[:8], target[:8])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dec = decoder_inputs(tokens, 4)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    edits = _random_edits(sid_table, {0: 0, 1: 1, 2: 1, 3: 0})
    reference_score_sids(model, ids, mask, tokens, edits)
    with edits.merged(model):
        pass
    del edits
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(before, after)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_merged_sums_per_layer_and_restores(sid_table):
    model = tiny_model(sid_table)
    edits = _random_edits(sid_table, {0: 1, 2: 1, 3: 0})
    w0, w1 = ffn_out_proj(model, 0).weight.clone(), ffn_out_proj(model, 1).weight.clone()
    with edits.merged(model):
        torch.testing.assert_close(ffn_out_proj(model, 1).weight, w1 + edits.delta_weight(0) + edits.delta_weight(2))
        torch.testing.assert_close(ffn_out_proj(model, 0).weight, w0 + edits.delta_weight(3))
    assert torch.equal(ffn_out_proj(model, 0).weight, w0) and torch.equal(ffn_out_proj(model, 1).weight, w1)


def test_state_dict_round_trip_and_sid_hash_check(sid_table, tmp_path):
    edits = _random_edits(sid_table, {0: 1, 1: 0})
    edits.probe_accuracy = np.array([[0.5, 0.7], [0.9, 0.6]])
    path = tmp_path / "edits.pt"
    edits.save(path)
    loaded = PositionEdits.load(path, sid_table.content_hash())
    assert loaded.layers == {0: 1, 1: 0} and loaded.cov_lambda == 1.0 and loaded.one_one
    assert torch.equal(loaded.delta_weight(1), edits.delta_weight(1))
    np.testing.assert_array_equal(loaded.cold_items, [N_WARM])
    np.testing.assert_array_equal(loaded.probe_accuracy, edits.probe_accuracy)
    other = SemanticIdTable.from_codes(np.arange(3), np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2]]), 10, 10)
    with pytest.raises(SidTableMismatchError, match="SID table"):
        PositionEdits.load(path, other.content_hash())


def test_not_one_one_edit_refuses_protocol_use(sid_table):
    model = tiny_model(sid_table)
    edits = PositionEdits({0: (1, torch.ones(32, 64))}, 1.0, np.array([1]), "h", one_one=False)
    with pytest.raises(RuntimeError, match="not one-one"):
        edits.layer_for_position(0)
    w = ffn_out_proj(model, 1).weight.clone()
    with edits.activate(model) as active:
        assert active is None
        torch.testing.assert_close(ffn_out_proj(model, 1).weight, w + 1)
    assert torch.equal(ffn_out_proj(model, 1).weight, w)


# ------------------------------------------------------------------------------------------ covariance
def test_covariance_is_mean_outer_product_and_cache_key_tracks_weights(sid_table, train_data, tmp_path):
    model = tiny_model(sid_table)
    history, target = train_data
    enc = SidHistoryEncoder(sid_table, 5)
    tokens = sid_table.tokens_of(target)
    sites = [(0, 1), (1, 3)]
    covs, info = preserved_covariances(model, enc, history, tokens, sites, batch_size=64, cache_dir=tmp_path)
    assert info["computed"] == [[0, 1], [1, 3]] and info["cache_hits"] == []
    keys = collect_keys(model, enc, history, tokens, sites, batch_size=200)
    for s in sites:
        k = keys[s].double()
        assert covs[s].dtype == torch.float64
        torch.testing.assert_close(covs[s], k.T @ k / len(k), rtol=1e-5, atol=1e-7)
    again, info2 = preserved_covariances(model, enc, history, tokens, sites, batch_size=64, cache_dir=tmp_path)
    assert info2["cache_hits"] == [[0, 1], [1, 3]] and info2["computed"] == []
    assert all(torch.equal(again[s], covs[s]) for s in sites)
    # Changing any weight changes the checkpoint hash, so the stale cache is not used.
    old_hash = model_fingerprint(model)
    with torch.no_grad():
        model.decoder.block[0].layer[-1].DenseReluDense.wi_0.weight[0, 0] += 1.0
    assert model_fingerprint(model) != old_hash
    new, info3 = preserved_covariances(model, enc, history, tokens, sites, batch_size=64, cache_dir=tmp_path)
    assert info3["computed"] == [[0, 1], [1, 3]] and info3["checkpoint_hash"] != info["checkpoint_hash"]
    assert not torch.equal(new[(0, 1)], covs[(0, 1)])
    # Sample count is part of the key as well.
    _, info4 = preserved_covariances(
        model, enc, history, tokens, sites, max_samples=100, batch_size=64, cache_dir=tmp_path
    )
    assert info4["computed"] == [[0, 1], [1, 3]] and info4["num_samples"] == 100
    assert len(list(tmp_path.glob("cov_*.pt"))) == 6


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("profile", ["clean", "released"])
def test_delta_optimisation_makes_model_emit_chosen_token(sid_table, train_data, profile):
    model = tiny_model(sid_table)
    history, target = train_data
    ids, mask, tokens = _inputs(sid_table, history[:12], target[:12])
    p, layer = 2, 1
    dec = decoder_inputs(tokens, p + 1)
    with torch.no_grad():
        model.eval()
        enc = encode(model, ids, mask)
        base_pred = model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec).logits[:, p].argmax(-1)
    chosen = (base_pred + 7) % 40 + 1  # a token the unedited model does not predict
    res = optimise_values(model, enc, mask, dec, chosen, [p], layer, p, ValueConfig(profile=profile))
    assert res.success.all()
    assert set(res.success_step.tolist()) <= {10, *range(20, 30)}
    assert model.training is False  # eval mode restored to the caller's (eval) mode
    assert all(prm.grad is None for prm in model.parameters())
    if profile == "clean":  # the stored δ is the one that produced the successful forward
        def add(module, inputs, output):
            out = output.clone()
            out[:, p] += res.delta
            return out

        handle = ffn_out_proj(model, layer).register_forward_hook(add)
        try:
            with torch.no_grad():
                logits = model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec).logits
        finally:
            handle.remove()
        assert torch.equal(logits[:, p].argmax(-1), chosen)


@pytest.mark.parametrize("p,layer", [(0, 0), (2, 0), (3, 1)])
def test_cached_delta_optimisation_equals_full_recompute(sid_table, train_data, p, layer):
    # The KV-cached path (prefix and blocks <= layer once, blocks above per Adam step) must follow the same
    # trajectory as the reference path that re-runs the whole teacher-forced decoder with a hook.
    model = tiny_model(sid_table, seed=3)
    history, target = train_data
    ids, mask, tokens = _inputs(sid_table, history[:16], target[:16])
    dec = decoder_inputs(tokens, p + 1)
    model.eval()
    with torch.no_grad():
        enc = encode(model, ids, mask)
    chosen = (tokens[:, p] + 5) % 40 + 1
    cfg = ValueConfig(profile="clean")
    fast = optimise_values(model, enc, mask, dec, chosen, [p], layer, p, cfg, use_cache=True)
    ref = optimise_values(model, enc, mask, dec, chosen, [p], layer, p, cfg, use_cache=False)
    torch.testing.assert_close(fast.z0, ref.z0, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.success_step, ref.success_step)
    assert fast.success.any()
    torch.testing.assert_close(fast.delta, ref.delta, rtol=1e-3, atol=1e-3)


def test_delta_never_checked_fails():
    with pytest.raises(ValueError, match="profile"):
        ValueConfig(profile="other")


# ------------------------------------------------------------------------------------------ probe
def test_probe_picks_planted_layer():
    g = torch.Generator().manual_seed(0)
    n, f = 300, 16
    neg = {(layer, 0): torch.randn(n, f, generator=g) for layer in range(3)}
    pos = {(layer, 0): torch.randn(n, f, generator=g) for layer in range(3)}
    pos[(1, 0)][:, 3] += 4.0  # linearly separable only at layer 1
    acc = np.array([[probe_accuracy(pos[(layer, 0)], neg[(layer, 0)], seed=layer)] for layer in range(3)])
    assert acc[1, 0] > 0.95 and acc[0, 0] < 0.7 and acc[2, 0] < 0.7
    assert choose_layers("probe", [0], 3, acc) == {0: 1}
    assert choose_layers("worst", [0], 3, acc)[0] != 1
    assert choose_layers("fixed", [0, 1], 3, fixed_layers=[2, 0]) == {0: 2, 1: 0}
    r = choose_layers("random", [0, 1, 2, 3], 3, seed=5)
    assert r == choose_layers("random", [0, 1, 2, 3], 3, seed=5) and set(r.values()) <= {0, 1, 2}
    tie = np.array([[0.8], [0.8], [0.1]])
    assert choose_layers("probe", [0], 3, tie) == {0: 0}  # ties → lower layer


def test_joint_probe_fit_equals_separate_fits():
    # One L-BFGS run over all sites must reach each site's own optimum (same rows, same split per site).
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(5, 200, 12, generator=g)
    neg = torch.randn(5, 180, 12, generator=g)
    for i in range(5):
        pos[i, :, i] += 0.4 * i  # increasingly separable sites
    joint = probe_accuracies(pos, neg, seed=3)
    separate = torch.tensor([probe_accuracy(pos[i], neg[i], seed=3) for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(joint, separate)
    assert joint[4] > joint[0]
    # The Newton fit is the optimum of mean BCE + l2·‖θ‖² (zero gradient, bias unpenalised).
    x = torch.cat([pos[:, :150], neg[:, :150]], dim=1).double()
    y = torch.cat([torch.ones(150), torch.zeros(150)]).double()
    w = _fit_logistic(x, y, l2=1e-3, max_iter=100).requires_grad_(True)
    z = torch.einsum("pnd,pd->pn", x, w[:, :-1]) + w[:, -1:]
    obj = torch.nn.functional.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none").mean(1)
    (obj + 1e-3 * w[:, :-1].square().sum(1)).sum().backward()
    assert w.grad.abs().max() < 1e-8
    matrix = probe_accuracy_matrix({(layer, 0): pos[layer] for layer in range(5)},
                                   {(layer, 0): neg[layer] for layer in range(5)}, 5, [0], seed=3)
    np.testing.assert_allclose(matrix[:, 0], joint.numpy())


# ------------------------------------------------------------------------------------------ knowledge
def test_neighbours_never_return_the_cold_item_itself():
    emb = np.eye(4, dtype=np.float32)
    pool_items = np.array([10, 11, 12, 13])
    query = emb[[1]] + 0.1 * emb[[2]]  # closest to item 11, then 12
    idx, sims = nearest_neighbours(query, emb, 2, np.array([11]), pool_items)
    assert pool_items[idx[0, 0]] == 12 and sims[0, 0] > 0.09 and abs(sims[0, 1]) < 1e-6
    assert 11 not in pool_items[idx[idx >= 0]]
    idx, _ = nearest_neighbours(query, emb, 6, np.array([11]), pool_items)
    assert idx[0, 3:].tolist() == [-1, -1, -1]  # only 3 candidates remain


def test_pseudo_histories_are_prefixes_deduplicated_and_seeded():
    p = -1
    train_history = np.array(
        [
            [p, 1, 2],  # → 5 (neighbour)
            [p, 1, 2],  # duplicate history → 5
            [p, 3, 4],  # → 5
            [p, p, p],  # empty history → 5 (skipped)
            [p, 7, 8],  # → 6 (neighbour)
            [p, 1, 2],  # → 6: same history as for 5; kept once for the cold item
            [9, 9, 9],  # → 4 (not a neighbour)
        ]
    )
    train_target = np.array([5, 5, 5, 5, 6, 6, 4])
    know = pseudo_knowledge(np.array([100]), np.array([[5, 6, -1]]), train_history, train_target, 10, seed=0)
    got = {tuple(h) for h in know.histories}
    assert got == {(p, 1, 2), (p, 3, 4), (p, 7, 8)} and len(know) == 3
    assert (know.items == 100).all() and know.source == "pseudo" and not know.leaks_eval
    assert know.stats["num_candidates"] == 5 and know.stats["num_unique_candidates"] == 3
    a = pseudo_knowledge(np.array([100]), np.array([[5, 6, -1]]), train_history, train_target, 2, seed=7)
    b = pseudo_knowledge(np.array([100]), np.array([[5, 6, -1]]), train_history, train_target, 2, seed=7)
    assert len(a) == 2 and np.array_equal(a.histories, b.histories)
    assert {tuple(h) for h in a.histories} <= got
    # The draw is a seeded hash per (cold item, history): independent of how cold items are chunked.
    rng = np.random.default_rng(3)
    hist = np.where(rng.random((300, 4)) < 0.3, -1, rng.integers(0, 40, (300, 4)))
    tgt = rng.integers(0, 40, 300)
    cold = np.arange(100, 120)
    nb = rng.integers(0, 40, (20, 5))
    whole = pseudo_knowledge(cold, nb, hist, tgt, 3, seed=1)
    chunked = pseudo_knowledge(cold, nb, hist, tgt, 3, seed=1, chunk_size=3)
    assert np.array_equal(whole.items, chunked.items) and np.array_equal(whole.histories, chunked.histories)
    assert np.bincount(whole.items - 100, minlength=20).max() <= 3
    for item, row in zip(whole.items, whole.source_rows):  # each history precedes a neighbour occurrence
        assert tgt[row] in nb[item - 100] and (hist[row] >= 0).any()
    assert not np.array_equal(whole.source_rows, pseudo_knowledge(cold, nb, hist, tgt, 3, seed=2).source_rows)
    with pytest.raises(ValueError, match="own neighbour"):
        pseudo_knowledge(np.array([5]), np.array([[5, 6]]), train_history, train_target)


def test_notebook_policy_keeps_longest_prefixes_and_perturbs_them():
    p = -1
    train_history = np.array(
        [
            [p, p, p, p, p, p, 3],  # → 5, length 1
            [p, p, p, 1, 2, 3, 4],  # → 5, length 4
            [p, p, p, p, p, p, p],  # → 5, empty: allowed by the notebook policy
            [p, 1, 2, 3, 4, 6, 7],  # → 6, length 6
        ]
    )
    train_target = np.array([5, 5, 5, 6])
    know = pseudo_knowledge(np.array([100]), np.array([[5, 6]]), train_history, train_target, 3, seed=0,
                            policy="notebook")
    assert know.histories.shape == (3, 7 + NOTEBOOK_EXTRA) and know.stats["policy"] == "notebook"
    assert list(know.source_rows) == [3, 1, 0]  # longest prefixes first; the empty one is not needed
    for h, row in zip(know.histories, know.source_rows):
        seq = [x for x in h if x >= 0]
        n = (train_history[row] >= 0).sum()
        assert len(seq) == n + 2 - min(2, (n + 2) // 4) + 1  # +2 neighbours, −deleted, +1 cold item
        assert 100 in seq[: len(seq) // 2 + 1]  # the cold item sits in the first half
        assert (h[: len(h) - len(seq)] == -1).all()  # left-padded
        assert set(seq) <= set(train_history[row][train_history[row] >= 0]) | {100, train_target[row]}
    again = pseudo_knowledge(np.array([100]), np.array([[5, 6]]), train_history, train_target, 3, seed=0,
                             policy="notebook")
    assert np.array_equal(know.histories, again.histories)
    empty = pseudo_knowledge(np.array([100]), np.array([[5, -1]]), train_history[2:3], train_target[2:3], 3,
                             policy="notebook")
    assert sorted(x for x in empty.histories[0] if x >= 0) == [5, 5, 100]
    with pytest.raises(ValueError, match="policy"):
        pseudo_knowledge(np.array([100]), np.array([[5, 6]]), train_history, train_target, policy="other")


def test_position_requests_and_upper_bound(sid_table):
    eval_history = np.array([[-1, 1, 2], [-1, -1, 3], [-1, -1, -1], [4, 5, 6]])
    eval_target = np.array([55, 2, 55, 56])
    know = true_history_knowledge(np.array([55, 56, 57]), eval_history, eval_target)
    assert know.leaks_eval and know.source == "upper_bound"
    assert know.items.tolist() == [55, 56] and know.stats["items_without_history"] == 1
    prefix, tgt = know.position_requests(sid_table, 2)
    tokens = sid_table.tokens_of(np.array([55, 56]))
    assert prefix.tolist() == [[0, *tokens[0, :2]], [0, *tokens[1, :2]]]
    assert tgt.tolist() == tokens[:, 2].tolist()


# ------------------------------------------------------------------------------------------ editor
def _editor_inputs(sid_table, train_data):
    history, target = train_data
    rng = np.random.default_rng(4)
    warm_emb = rng.standard_normal((N_WARM, 16)).astype(np.float32)
    cold_items = np.arange(N_WARM, N_WARM + N_COLD)
    cold_emb = warm_emb[rng.integers(0, N_WARM, N_COLD)] + 0.1 * rng.standard_normal((N_COLD, 16)).astype(np.float32)
    return cold_items, cold_emb, warm_emb, history, target


def test_editor_end_to_end_raises_cold_item_scores(sid_table, train_data):
    model = tiny_model(sid_table)
    cold_items, cold_emb, warm_emb, history, target = _editor_inputs(sid_table, train_data)
    cfg = EditConfig(cov_lambda=1.0, histories_per_item=3, num_neighbours=3, max_history_items=5, probe_max_per_class=60)
    edits, report = GenRecEditor(cfg).edit(
        model, sid_table, cold_items, cold_emb, warm_emb, history, target, warm_items=np.arange(N_WARM)
    )
    assert model.training  # caller's mode restored
    assert set(report.layers) == {0, 1, 2, 3} and edits.layers == report.layers
    assert np.array(report.probe_accuracy).shape == (2, 4)
    assert report.layers == {p: int(np.argmax(np.array(report.probe_accuracy)[:, p])) for p in range(4)}
    assert all(0.0 <= r <= 1.0 for r in report.success_rate.values()) and min(report.success_rate.values()) > 0.5
    assert set(report.times) == {"knowledge", "keys", "probe", "values", "covariance", "solve", "diagnostics", "select"}
    assert report.times["select"] == 0.0  # a fixed λ: no selection on validation
    assert report.edit_seconds == pytest.approx(sum(report.times[k] for k in ("keys", "probe", "values", "solve")))
    assert set(report.diagnostics) == {"requests/unedited", "requests/edited", "train/unedited", "train/edited"}
    assert report.knowledge["num_histories"] == sum(report.num_requests.values()) / 4
    np.testing.assert_array_equal(edits.cold_items, cold_items)
    # The edit raises the cold SIDs' likelihood on the pseudo histories it was built from.
    know = GenRecEditor(cfg).build_knowledge(cold_items, cold_emb, np.arange(N_WARM), warm_emb, history, target)
    ids, mask, tokens = _inputs(sid_table, know.histories, know.items)
    base = reference_score_sids(model, ids, mask, tokens, None)
    edited = reference_score_sids(model, ids, mask, tokens, edits)
    assert (edited.sum(1) > base.sum(1)).float().mean() > 0.9


@pytest.mark.parametrize(
    "overrides",
    [
        {"position_wise": False, "layer_mode": "probe"},
        {"one_one": False, "layer_mode": "fixed", "fixed_layers": [1, 1, 0, 0]},
        {"layer_mode": "random", "value_beta": 0.0, "value_profile": "clean"},
    ],
)
def test_editor_ablations(sid_table, train_data, overrides):
    model = tiny_model(sid_table)
    cold_items, cold_emb, warm_emb, history, target = _editor_inputs(sid_table, train_data)
    cfg = EditConfig(
        cov_lambda=1.0, histories_per_item=2, num_neighbours=2, max_history_items=5, probe_max_per_class=40,
        **overrides,
    )
    edits, report = GenRecEditor(cfg).edit(
        model, sid_table, cold_items, cold_emb, warm_emb, history, target, warm_items=np.arange(N_WARM)
    )
    if not cfg.position_wise:
        assert list(report.layers) == [0] and not edits.one_one and report.probe_positions == [0]
    elif not cfg.one_one:
        assert report.layers == {0: 1, 1: 1, 2: 0, 3: 0} and not edits.one_one
    else:
        assert edits.one_one and report.probe_accuracy is None
    w = {layer: ffn_out_proj(model, layer).weight.clone() for layer in (0, 1)}
    with edits.activate(model):
        pass
    assert all(torch.equal(ffn_out_proj(model, layer).weight, w[layer]) for layer in (0, 1))


def test_object_wise_edit_at_top_layer_warns(sid_table, train_data):
    # A δ after the top block's FFN at step 0 never reaches later steps (they read step 0 through K/V computed
    # before that FFN): the user is told instead of silently getting no successful request.
    model = tiny_model(sid_table)
    cold_items, cold_emb, warm_emb, history, target = _editor_inputs(sid_table, train_data)
    cfg = EditConfig(cov_lambda=1.0, histories_per_item=2, num_neighbours=2, max_history_items=5,
                     position_wise=False, layer_mode="fixed", fixed_layers=[1], diagnostic_rows=0)
    with pytest.warns(UserWarning, match="top decoder layer 1"):
        _, report = GenRecEditor(cfg).edit(model, sid_table, cold_items, cold_emb, warm_emb, history, target,
                                           warm_items=np.arange(N_WARM))
    assert report.layers == {0: 1} and report.probe_positions == [0]
    # The reason, checked directly: a large δ on the top block's wo output at step 0 leaves later steps' logits
    # unchanged, while the same δ one block lower moves them.
    ids, mask, tokens = _inputs(sid_table, history[:8], target[:8])
    dec = decoder_inputs(tokens, tokens.shape[1])
    model.eval()
    with torch.no_grad():
        enc = encode(model, ids, mask)
        base = model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec).logits

    def shifted(layer):
        def add(module, inputs, output):
            out = output.clone()
            out[:, 0] += 50.0
            return out

        handle = ffn_out_proj(model, layer).register_forward_hook(add)
        try:
            with torch.no_grad():
                return model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec).logits
        finally:
            handle.remove()

    top, lower = shifted(1), shifted(0)
    assert not torch.allclose(top[:, 0], base[:, 0])
    torch.testing.assert_close(top[:, 1:], base[:, 1:])
    assert not torch.allclose(lower[:, 1:], base[:, 1:])


def test_editor_upper_bound_is_flagged(sid_table, train_data):
    model = tiny_model(sid_table)
    cold_items, cold_emb, warm_emb, history, target = _editor_inputs(sid_table, train_data)
    eval_history = history[:20]
    eval_target = np.repeat(cold_items, 2)
    cfg = EditConfig(knowledge="upper_bound", layer_mode="fixed", fixed_layers=[0, 1, 0, 1], cov_lambda=1.0,
                     max_history_items=5)
    edits, report = GenRecEditor(cfg).edit(
        model, sid_table, cold_items, cold_emb, warm_emb, history, target, warm_items=np.arange(N_WARM),
        eval_history=eval_history, eval_target=eval_target,
    )
    assert report.leaks_eval and edits.meta["leaks_eval"] and report.num_requests[0] == 20
    with pytest.raises(ValueError, match="eval_history"):
        GenRecEditor(cfg).edit(model, sid_table, cold_items, cold_emb, warm_emb, history, target,
                               warm_items=np.arange(N_WARM))


# ------------------------------------------------------------------------------------------ diagnostics
def test_top1_hits_match_teacher_forced_argmax_with_and_without_edit(sid_table, train_data):
    """The cached-decoder diagnostic equals argmax over each position's token range of reference_score_sids's
    reference (full recompute, One-One hook) — unedited and edited."""
    from genrec.editing.diagnostics import top1_hits, top1_rates

    model = tiny_model(sid_table, seed=2)
    history, target = train_data
    ids, mask, tokens = _inputs(sid_table, history[:40], target[:40])
    edits = _random_edits(sid_table, {0: 1, 1: 0, 3: 1}, scale=5.0)
    offsets, sizes = sid_table.level_offsets(), sid_table.level_sizes()
    for edit in (None, edits):
        got = top1_hits(model, ids, mask, tokens, sid_table, edit)
        want = torch.zeros_like(got)
        for p in range(tokens.shape[1]):
            # rank the target among its position's tokens by scoring every candidate token at step p
            lo, width = int(offsets[p]), int(sizes[p])
            cands = tokens[:, None, :].repeat(1, width, 1)
            cands[:, :, p] = torch.arange(lo, lo + width)
            scores = torch.stack([reference_score_sids(model, ids, mask, cands[:, c], edit)[:, p] for c in range(width)], 1)
            want[:, p] = scores.argmax(1) + lo == tokens[:, p]
        assert torch.equal(got, want)
    assert not torch.equal(top1_hits(model, ids, mask, tokens, sid_table, None),
                           top1_hits(model, ids, mask, tokens, sid_table, edits))
    rates = top1_rates(model, SidHistoryEncoder(sid_table, 5), history[:40], target[:40], sid_table, None, 16)
    np.testing.assert_allclose(rates, top1_hits(model, ids, mask, tokens, sid_table).double().mean(0).numpy())


# ----------------------------------------------------------------------------- cov_lambda auto
def _val(cold, warm, cold_ndcg=None):
    return {"val/recall@10/cold": cold, "val/ndcg@10/warm": warm,
            "val/ndcg@10/cold": cold if cold_ndcg is None else cold_ndcg}


def test_auto_lambda_takes_the_largest_cold_gain_within_the_warm_limit():
    from genrec.editing.select import candidate_lambdas, choose_lambda

    assert candidate_lambdas(1000, [0.5, 1, 2]) == [500.0, 1000.0, 2000.0]
    unedited = _val(0.0, 0.10)
    cands = {250.0: _val(0.20, 0.080),   # best cold gain, but warm −20%: refused
             500.0: _val(0.05, 0.096),   # −4%: allowed, gain 0.05
             1000.0: _val(0.05, 0.099, cold_ndcg=0.06),  # same gain, better cold NDCG: wins the tie
             2000.0: _val(0.01, 0.100)}
    choice = choose_lambda(unedited, cands, max_warm_drop=0.05)
    assert choice.cov_lambda == 1000.0 and "+0.0500" in choice.reason
    assert [r["feasible"] for r in choice.table] == [False, True, True, True]
    # an exact tie on both keys goes to the larger (more conservative) λ
    tie = choose_lambda(unedited, {500.0: _val(0.05, 0.099), 1000.0: _val(0.05, 0.099)})
    assert tie.cov_lambda == 1000.0


def test_auto_lambda_refuses_an_edit_that_breaks_warm_or_gains_nothing():
    from genrec.editing.select import choose_lambda

    unedited = _val(0.02, 0.10)
    broken = choose_lambda(unedited, {100.0: _val(0.30, 0.09), 200.0: _val(0.25, 0.0949)}, max_warm_drop=0.05)
    assert broken.cov_lambda is None and "dropped warm" in broken.reason
    useless = choose_lambda(unedited, {100.0: _val(0.02, 0.10), 200.0: _val(0.01, 0.11)})
    assert useless.cov_lambda is None and "raised cold" in useless.reason
    # the limit is inclusive: exactly 5% down is allowed
    edge = choose_lambda(unedited, {100.0: _val(0.03, 0.095)}, max_warm_drop=0.05)
    assert edge.cov_lambda == 100.0


def test_editor_needs_a_number_for_a_direct_edit():
    with pytest.raises(ConfigError, match="auto"):
        GenRecEditor(EditConfig()).edit(None, None, None, None, None, None, None, warm_items=None)
    with pytest.raises(ConfigError, match="cov_lambda"):
        EditConfig(cov_lambda=-1.0)


def test_similarity_weighted_histories_follow_the_weights_not_the_popularity():
    from genrec.editing.knowledge import pseudo_knowledge

    # neighbour 0 occurs after 90 distinct histories, neighbour 1 after 10; 300 cold items share both
    rng = np.random.default_rng(0)
    hist = np.full((100, 4), -1, dtype=np.int64)
    hist[:, -3:] = rng.integers(10, 1000, size=(100, 3))
    target = np.r_[np.zeros(90, dtype=np.int64), np.ones(10, dtype=np.int64)]
    cold = np.arange(2000, 2300)
    nbrs = np.tile([0, 1], (len(cold), 1))

    def share_of_rare(weights):
        k = pseudo_knowledge(cold, nbrs, hist, target, histories_per_item=4, seed=3, neighbour_weights=weights)
        return float((target[k.source_rows] == 1).mean()), k

    plain, _ = share_of_rare(None)
    equal, k = share_of_rare(np.ones((len(cold), 2)))
    assert plain == pytest.approx(0.1, abs=0.04)  # occurrences: the popular neighbour dominates
    assert equal == pytest.approx(0.5, abs=0.06)  # equal similarity weights: half from each
    assert (np.bincount(np.searchsorted(cold, k.items)) == 4).all()  # still 4 distinct histories per item
    zero, _ = share_of_rare(np.tile([1.0, 0.0], (len(cold), 1)))
    assert zero == 0.0  # a weight-0 neighbour supplies nothing
    with pytest.raises(ValueError, match="neighbour_weights"):
        pseudo_knowledge(cold, nbrs, hist, target, neighbour_weights=np.ones((3, 2)))


def test_similarity_weighting_is_an_edit_config_choice(sid_table, train_data):
    from genrec.editing import EditConfig

    assert EditConfig().neighbour_weighting == "occurrences"
    with pytest.raises(ConfigError, match="neighbour_weighting"):
        EditConfig(neighbour_weighting="popularity")
    with pytest.raises(ConfigError, match="neighbour_temperature"):
        EditConfig(neighbour_temperature=0)
    # through the editor: closest neighbours dominate at a low temperature, every neighbour counts at a high one
    cold_items, cold_emb, warm_emb, history, target = _editor_inputs(sid_table, train_data)
    shares = []
    for temp in (1e-4, 100.0):
        cfg = EditConfig(histories_per_item=3, num_neighbours=3, neighbour_weighting="similarity",
                         neighbour_temperature=temp)
        know = GenRecEditor(cfg).build_knowledge(cold_items, cold_emb, np.arange(N_WARM), warm_emb, history, target)
        first = know.neighbours[np.searchsorted(know.cold_items, know.items), 0]
        shares.append(float((target[know.source_rows] == first).mean()))
    assert shares[0] == 1.0 and shares[1] < 1.0
