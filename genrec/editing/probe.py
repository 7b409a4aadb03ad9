"""Layer location by linear probing (paper §4.2, specs/genrecedit.md §3; not in the reference code).

For SID position p and decoder layer l, positives are the keys k_p^l of edit requests and negatives the keys of
training examples teacher-forced with their own target prefix. A logistic regression Cls(k) = σ(⟨θ,k⟩ + b) is
trained on a stratified, seeded 8:2 split; its validation accuracy scores (l, p). The edit layer of p is the most
accurate layer (ties → lower layer). The paper gives no solver or regularisation; declared choices here:
balanced classes (the larger class is subsampled, seeded), features standardised on the training split,
full-batch L-BFGS with a small L2 penalty (keeps separable problems bounded).
"""

from __future__ import annotations

import numpy as np
import torch

LAYER_MODES = ("probe", "fixed", "random", "worst")


def _split(n: int, train_frac: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=g)
    n_train = round(train_frac * n)
    return perm[:n_train], perm[n_train:]


def probe_accuracy(
    positives: torch.Tensor,
    negatives: torch.Tensor,
    seed: int = 0,
    train_frac: float = 0.8,
    l2: float = 1e-4,
    max_iter: int = 200,
) -> float:
    """Validation accuracy of a logistic-regression probe separating ``positives`` from ``negatives``.

    Rows are keys (n, d_ff). Classes are balanced by subsampling, each split 8:2 (stratified, seeded).
    """
    g = torch.Generator().manual_seed(seed)
    n = min(len(positives), len(negatives))
    if n < 2:
        raise ValueError(f"the probe needs at least 2 samples per class, got {len(positives)} and {len(negatives)}")
    pos = positives[torch.randperm(len(positives), generator=g)[:n]].double().cpu()
    neg = negatives[torch.randperm(len(negatives), generator=g)[:n]].double().cpu()
    (pt, pv), (nt, nv) = _split(n, train_frac, g), _split(n, train_frac, g)
    if len(pv) == 0 or len(nv) == 0:
        raise ValueError(f"validation split is empty with {n} samples per class and train_frac={train_frac}")
    x_train = torch.cat([pos[pt], neg[nt]])
    y_train = torch.cat([torch.ones(len(pt)), torch.zeros(len(nt))]).double()
    x_val = torch.cat([pos[pv], neg[nv]])
    y_val = torch.cat([torch.ones(len(pv)), torch.zeros(len(nv))]).double()
    mean = x_train.mean(0)
    std = x_train.std(0).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    x_val = (x_val - mean) / std

    theta = torch.zeros(x_train.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x_train @ theta + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train) + l2 * theta.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (x_val @ theta + bias) > 0
    return float((pred.double() == y_val).double().mean())


def probe_accuracy_matrix(
    request_keys: dict[tuple[int, int], torch.Tensor],
    train_keys: dict[tuple[int, int], torch.Tensor],
    num_layers: int,
    positions: list[int],
    seed: int = 0,
    train_frac: float = 0.8,
) -> np.ndarray:
    """(num_layers, len(positions)) validation accuracies; keys are dicts keyed by (layer, position)."""
    acc = np.zeros((num_layers, len(positions)))
    for j, p in enumerate(positions):
        for layer in range(num_layers):
            acc[layer, j] = probe_accuracy(
                request_keys[(layer, p)], train_keys[(layer, p)], seed=seed + 1000 * p + layer, train_frac=train_frac
            )
    return acc


def choose_layers(
    mode: str,
    positions: list[int],
    num_layers: int,
    accuracy: np.ndarray | None = None,
    fixed_layers: list[int] | None = None,
    seed: int = 0,
) -> dict[int, int]:
    """Edit layer per position.

    ``probe``: argmax of the probe accuracy (ties → lower layer); ``worst``: argmin (ablation "w/o classifier
    (worst)"); ``random``: uniform per position, seeded ("w/o classifier (random)"); ``fixed``: ``fixed_layers[p]`` for
    position p (the released pos2layer = [0, 1, 2, 3]).
    """
    if mode not in LAYER_MODES:
        raise ValueError(f"layer_mode must be one of {LAYER_MODES}, got {mode!r}")
    if mode in ("probe", "worst"):
        if accuracy is None or accuracy.shape != (num_layers, len(positions)):
            raise ValueError(f"layer_mode={mode!r} needs a ({num_layers}, {len(positions)}) probe accuracy matrix")
        pick = np.argmax(accuracy, axis=0) if mode == "probe" else np.argmin(accuracy, axis=0)
        return {p: int(pick[j]) for j, p in enumerate(positions)}
    if mode == "random":
        rng = np.random.default_rng(seed)
        return {p: int(rng.integers(num_layers)) for p in positions}
    if fixed_layers is None or len(fixed_layers) <= max(positions):
        raise ValueError(f"layer_mode='fixed' needs fixed_layers[p] (pos2layer) for every position in {positions}")
    layers = {p: int(fixed_layers[p]) for p in positions}
    bad = [layer for layer in layers.values() if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"fixed_layers {bad} out of range for a decoder with {num_layers} layers")
    return layers
