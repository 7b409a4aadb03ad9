"""Layer location by linear probing (paper §4.2, specs/genrecedit.md §3; not in the reference code).

For SID position p and decoder layer l, positives are the keys k_p^l of edit requests and negatives the keys of
training examples teacher-forced with their own target prefix. A logistic regression Cls(k) = σ(⟨θ,k⟩ + b) is
trained on a stratified, seeded 8:2 split; its validation accuracy scores (l, p). The edit layer of p is the most
accurate layer (ties → lower layer). The paper gives no solver or regularisation; declared choices here:
balanced classes (the larger class is subsampled, seeded), features standardised on the training split,
a small L2 penalty (keeps separable problems bounded), solved to its optimum by batched damped Newton; every
(layer, position) site is scored on the same rows and split.
"""

from __future__ import annotations

import numpy as np
import torch

LAYER_MODES = ("probe", "fixed", "random", "worst")


def _split(n: int, train_frac: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=g)
    n_train = round(train_frac * n)
    return perm[:n_train], perm[n_train:]


def probe_accuracies(
    positives: torch.Tensor,
    negatives: torch.Tensor,
    seed: int = 0,
    train_frac: float = 0.8,
    l2: float = 1e-4,
    max_iter: int = 100,
) -> torch.Tensor:
    """Validation accuracies (P,) of P independent logistic-regression probes, fitted jointly.

    ``positives`` (P, n_pos, d) and ``negatives`` (P, n_neg, d) hold the keys of P sites for the *same* rows,
    so every site is scored on the same balanced subsample and the same stratified 8:2 split (seeded): the
    layers of a position are compared on identical examples. The P (strictly convex) fits run batched.
    """
    if positives.ndim == 2:
        positives, negatives = positives[None], negatives[None]
    g = torch.Generator().manual_seed(seed)
    n = min(positives.shape[1], negatives.shape[1])
    if n < 2:
        raise ValueError(
            f"the probe needs at least 2 samples per class, got {positives.shape[1]} and {negatives.shape[1]}"
        )
    pos = positives[:, torch.randperm(positives.shape[1], generator=g)[:n]].double().cpu()
    neg = negatives[:, torch.randperm(negatives.shape[1], generator=g)[:n]].double().cpu()
    (pt, pv), (nt, nv) = _split(n, train_frac, g), _split(n, train_frac, g)
    if len(pv) == 0 or len(nv) == 0:
        raise ValueError(f"validation split is empty with {n} samples per class and train_frac={train_frac}")
    x_train = torch.cat([pos[:, pt], neg[:, nt]], dim=1)
    y_train = torch.cat([torch.ones(len(pt)), torch.zeros(len(nt))]).double()
    x_val = torch.cat([pos[:, pv], neg[:, nv]], dim=1)
    y_val = torch.cat([torch.ones(len(pv)), torch.zeros(len(nv))]).double()
    mean = x_train.mean(1, keepdim=True)
    std = x_train.std(1, keepdim=True).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    x_val = (x_val - mean) / std

    w = _fit_logistic(x_train, y_train, l2, max_iter)
    with torch.no_grad():
        pred = (torch.einsum("pnd,pd->pn", x_val, w[:, :-1]) + w[:, -1:]) > 0
    return (pred.double() == y_val).double().mean(1)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int, tol: float = 1e-9) -> torch.Tensor:
    """Weights (P, d+1) (bias last) minimising mean BCE + l2·‖θ‖² for each of P problems, by damped Newton.

    Newton's method is affine-invariant, so the badly scaled keys of some sites (L-BFGS needed ~500 iterations
    there) converge in ~10 steps; each step solves P (d+1)² systems (Cholesky). Backtracking (Armijo) per problem
    keeps every step a descent step.
    """
    p_, n, d = x.shape
    xb = torch.cat([x, torch.ones(p_, n, 1, dtype=x.dtype)], dim=-1)
    # The Hessian (P·n·d² flops, the cost at d_ff = 1024) is built in float32: it only preconditions the step,
    # while the gradient, the line search and the stopping test stay in float64, so the optimum is unchanged.
    xb32 = xb.float()
    reg = torch.full((d + 1,), 2 * l2, dtype=x.dtype)
    reg[-1] = 0.0  # bias unpenalised
    w = torch.zeros(p_, d + 1, dtype=x.dtype)

    def loss(w: torch.Tensor) -> torch.Tensor:
        z = torch.bmm(xb, w[..., None])[..., 0]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none")
        return bce.mean(1) + l2 * w[:, :-1].square().sum(1)

    f = loss(w)
    factor, last = None, float("inf")
    for _ in range(max_iter):
        prob = torch.sigmoid(torch.bmm(xb, w[..., None])[..., 0])
        grad = torch.bmm(xb.transpose(1, 2), (prob - y)[..., None])[..., 0] / n + reg * w
        gmax = float(grad.abs().max())
        if gmax < tol:
            break
        # Near the optimum the Hessian barely moves: its Cholesky factor is kept while each step still cuts the
        # gradient at least 4× (a chord step costs two matrix-vector products instead of a P·n·d² product).
        if factor is None or gmax > last / 4:
            weights = (prob * (1 - prob) / n).float()[..., None]
            hess = torch.bmm(xb32.transpose(1, 2), xb32 * weights).double() + torch.diag(reg + 1e-12)
            factor, info = torch.linalg.cholesky_ex(hess)
            if bool((info > 0).any()):  # not numerically positive definite: fall back to a general solve
                factor = None
                step = torch.linalg.solve(hess, grad)
        if factor is not None:
            step = torch.cholesky_solve(grad[..., None], factor)[..., 0]
        last = gmax
        t = torch.ones(p_, dtype=x.dtype)
        slope = (grad * step).sum(1)
        for _ in range(40):
            f_new = loss(w - t[:, None] * step)
            ok = f_new <= f - 1e-4 * t * slope
            if ok.all():
                break
            t = torch.where(ok, t, t / 2)
        w = w - t[:, None] * step
        f = loss(w)
    return w


def probe_accuracy(positives: torch.Tensor, negatives: torch.Tensor, seed: int = 0, train_frac: float = 0.8,
                   l2: float = 1e-4, max_iter: int = 100) -> float:
    """Validation accuracy of one probe: keys (n, d_ff) of positives vs negatives (see :func:`probe_accuracies`)."""
    return float(probe_accuracies(positives, negatives, seed, train_frac, l2, max_iter)[0])


def probe_accuracy_matrix(
    request_keys: dict[tuple[int, int], torch.Tensor],
    train_keys: dict[tuple[int, int], torch.Tensor],
    num_layers: int,
    positions: list[int],
    seed: int = 0,
    train_frac: float = 0.8,
) -> np.ndarray:
    """(num_layers, len(positions)) validation accuracies; keys are dicts keyed by (layer, position) whose rows
    are the same requests / training rows at every site."""
    sites = [(layer, p) for p in positions for layer in range(num_layers)]
    acc = probe_accuracies(
        torch.stack([request_keys[s] for s in sites]), torch.stack([train_keys[s] for s in sites]), seed, train_frac
    )
    return acc.reshape(len(positions), num_layers).T.numpy()


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
