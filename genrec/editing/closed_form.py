"""Closed-form update ΔW = R K1ᵀ (λ C̄0 + K1 K1ᵀ)⁻¹ (paper Eq. 13, specs/genrecedit.md §5.2).

ΔW minimises ‖ΔW K1 − R‖² + λ tr(ΔW C̄0 ΔWᵀ): the new keys K1 (d_ff × m) map to the residuals R (d_model × m)
while the preserved keys (second moment C̄0, mean-normalised as in the reference) move as little as possible.
Everything is float64 and solved with a Cholesky factorisation (the reference used an explicit inverse).
Only K1 K1ᵀ and R K1ᵀ are needed, so ``KeyResidualStats`` accumulates them batch by batch and any number of
requests fits in O(d_ff²) memory.
"""

from __future__ import annotations

import torch


class KeyResidualStats:
    """Running K1 K1ᵀ (d_ff × d_ff) and R K1ᵀ (d_model × d_ff) in float64."""

    def __init__(self, d_ff: int, d_model: int, device: torch.device | str = "cpu") -> None:
        self.kkt = torch.zeros(d_ff, d_ff, dtype=torch.float64, device=device)
        self.rkt = torch.zeros(d_model, d_ff, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, keys: torch.Tensor, residuals: torch.Tensor) -> None:
        """``keys`` (b, d_ff) and ``residuals`` (b, d_model), one row per successful request."""
        if keys.shape[0] != residuals.shape[0]:
            raise ValueError(f"keys ({keys.shape[0]}) and residuals ({residuals.shape[0]}) differ in rows")
        k = keys.to(self.kkt.device, torch.float64)
        r = residuals.to(self.kkt.device, torch.float64)
        self.kkt += k.T @ k
        self.rkt += r.T @ k
        self.count += keys.shape[0]


def solve_update(
    rkt: torch.Tensor, kkt: torch.Tensor, cov: torch.Tensor, cov_lambda: float
) -> torch.Tensor:
    """ΔW (d_model × d_ff, float64) from R K1ᵀ, K1 K1ᵀ and C̄0.

    Solves (λ C̄0 + K1 K1ᵀ) ΔWᵀ = K1 Rᵀ (the matrix is symmetric) by Cholesky. Raises when it is not positive
    definite (λ = 0 with fewer independent keys than d_ff, or a rank-deficient C̄0).
    """
    if cov_lambda < 0:
        raise ValueError(f"cov_lambda must be >= 0, got {cov_lambda}")
    kkt = kkt.to(torch.float64)
    a = float(cov_lambda) * cov.to(kkt.device, torch.float64) + kkt
    a = 0.5 * (a + a.T)  # exact symmetry for the factorisation
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise ValueError(
            f"λ·C̄0 + K1K1ᵀ is not positive definite (cov_lambda={cov_lambda}, d_ff={a.shape[0]}, leading minor "
            f"{int(info)} fails); raise cov_lambda or use more preservation samples"
        )
    return torch.cholesky_solve(rkt.to(kkt.device, torch.float64).T, chol).T


def closed_form_update(
    keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, cov_lambda: float
) -> torch.Tensor:
    """ΔW for keys K1ᵀ (m, d_ff) and residuals Rᵀ (m, d_model) given as rows (convenience wrapper)."""
    stats = KeyResidualStats(keys.shape[1], residuals.shape[1], device=keys.device)
    stats.add(keys, residuals)
    return solve_update(stats.rkt, stats.kkt, cov, cov_lambda)
