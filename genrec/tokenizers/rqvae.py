"""RQ-VAE item tokenizer with the LETTER-style collaborative regulariser (spec dact.md §1.1–1.2, §1.9).

    x (input_dim) --MLP encoder--> z (latent_dim) --L residual VQ levels--> ẑ = Σ_l e^l_{k_l} --MLP decoder--> x̂
    codes (k_1..k_L) per item; a collision suffix (SemanticIdTable) makes every SID unique.

Loss (period 0): L = MSE(x̂, x) + w_q · mean_l[ ‖sg(r_{l-1}) − e^l‖² + β‖r_{l-1} − sg(e^l)‖² ] + α · L_cf(ẑ, c)
with L_cf the in-batch InfoNCE between the quantised latent and the item's CF embedding.

The building blocks DACT needs are public: ``RQVAE.encoder``/``encode``, ``RQVAE.quantizer.levels[l].codebook``,
per-level squared distances in ``RQOutput.distances`` (soft assignment p(k|r) = softmax(−d/τ), see
``assignment_log_probs``) and the loss parts as separate methods (``reconstruction_loss``, ``cf_loss``,
``compute_loss(x, cf, z=...)`` on any latent).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genrec.errors import ConfigError
from genrec.tokenizers.rkmeans import ResidualKMeans, squared_distances
from genrec.tokenizers.sid import SemanticIdTable


@dataclass
class RQVAEConfig:
    """RQ-VAE hyper-parameters; defaults are the DACT/LETTER period-0 tokenizer (spec dact.md §1.9)."""

    input_dim: int = 768
    """Width of the item text embedding fed to the encoder (768 for sentence-t5-base)."""
    hidden_dims: tuple[int, ...] = (512, 256, 128, 64)
    """Encoder hidden widths (the decoder mirrors them)."""
    latent_dim: int = 32
    """Latent / codeword dimension e_dim."""
    num_levels: int = 3
    """Residual quantisation levels L."""
    codebook_size: int = 256
    """Codes per level K."""
    beta: float = 0.25
    """Commitment weight β in ‖sg(r) − e‖² + β‖r − sg(e)‖²."""
    quant_loss_weight: float = 1.0
    """Weight of the level-averaged quantisation loss in the total."""
    cf_weight: float = 0.02
    """LETTER collaborative-regulariser weight α (0 disables it)."""
    cf_temperature: float = 1.0
    """InfoNCE temperature; DACT's reference has none (= 1.0)."""
    cf_similarity: Literal["cosine", "dot"] = "cosine"
    """"cosine" (DACT's CF loss) or "dot" (LETTER's original raw dot products)."""
    cf_dim: int | None = None
    """Width of the CF item embedding; when set and ≠ latent_dim a linear projection maps CF → latent."""
    dropout: float = 0.0
    """Dropout before every Linear of encoder and decoder."""
    kmeans_init: bool = True
    """Initialise codebooks by residual k-means on encoder latents (``init_codebooks_kmeans``) before training."""
    kmeans_iters: int = 100
    """k-means iterations for the init (reference: sklearn max_iter 100)."""
    kmeans_batch_size: int | None = None
    """None = full-batch k-means for the init; an int = mini-batch k-means (very large catalogues)."""
    kmeans_seed: int | None = None
    """Seed of the k-means init; None draws one from torch's global RNG (so ``seed_everything`` fixes it)."""
    dead_code_reset: bool = False
    """Re-seed codes that were used fewer than ``dead_code_threshold`` times since the last reset with
    random current residuals (``RQVAE.reset_dead_codes``; not in the DACT reference)."""
    dead_code_threshold: float = 1.0
    """Usage count below which a code counts as dead for ``dead_code_reset``."""
    sinkhorn_last_level: bool = False
    """Balanced (Sinkhorn–Knopp) assignment at the last level, as LC-Rec/LETTER use to spread items and cut
    collisions. Assignments then depend on the batch they are computed in. Off in DACT (spec §1.1)."""
    sinkhorn_epsilon: float = 0.003
    """Entropic regularisation of the Sinkhorn assignment (reference sk_epsilons[-1])."""
    sinkhorn_iters: int = 50
    """Sinkhorn normalisation rounds."""

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        for name in ("input_dim", "latent_dim", "num_levels", "codebook_size", "kmeans_iters", "sinkhorn_iters"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"RQVAEConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.cf_similarity not in ("cosine", "dot"):
            raise ConfigError(f"RQVAEConfig.cf_similarity must be 'cosine' or 'dot', got {self.cf_similarity!r}")
        if self.cf_temperature <= 0:
            raise ConfigError(f"RQVAEConfig.cf_temperature must be > 0, got {self.cf_temperature}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"RQVAEConfig.dropout must be in [0, 1), got {self.dropout}")


# --------------------------------------------------------------------------------------------- quantisers


@dataclass
class VQOutput:
    quantized: torch.Tensor  # (B, d) straight-through output r + sg(e − r)
    codewords: torch.Tensor  # (B, d) selected e_k (carries codebook gradient)
    codes: torch.Tensor  # (B,) long
    distances: torch.Tensor  # (B, K) ‖r − e_k‖², differentiable w.r.t. r and the codebook
    codebook_loss: torch.Tensor  # scalar mean ‖sg(r) − e‖²
    commit_loss: torch.Tensor  # scalar mean ‖r − sg(e)‖² (unweighted by β)


@dataclass
class RQOutput:
    quantized: torch.Tensor  # (B, d) ẑ, straight-through: ∂ẑ/∂z = I
    codes: torch.Tensor  # (B, L) long
    residuals: list[torch.Tensor]  # input of each level: r_0 = z, r_1, ..., r_{L-1}
    distances: torch.Tensor  # (B, L, K) squared distances of each level's input to its codebook
    codebook_losses: torch.Tensor  # (L,)
    commit_losses: torch.Tensor  # (L,)


def sinkhorn_codes(distances: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Balanced assignment: argmax of the entropic transport plan with uniform row/column marginals.

    Distances are rescaled to [−1, 1] first (so ``epsilon`` is scale free, as in LC-Rec) and the
    iterations run in the log domain (exp(−d/ε) overflows float32 for ε ≈ 0.003).
    """
    d = distances.detach().double()
    if epsilon <= 0:
        return d.argmin(dim=1)
    mid = (d.max() + d.min()) / 2
    amp = (d.max() - mid) + 1e-5
    log_q = -((d - mid) / amp) / epsilon
    n, k = log_q.shape
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)
    return log_q.argmax(dim=1)


class VectorQuantizer(nn.Module):
    """One codebook level: nearest codeword, straight-through estimator, VQ-VAE codebook/commit losses."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.codebook = nn.Embedding(codebook_size, dim)
        # Reference init without k-means: uniform(−1/K, 1/K).
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def distances(self, r: torch.Tensor) -> torch.Tensor:
        """(B, K) squared distances ‖r − e_k‖²."""
        return squared_distances(r, self.codebook.weight)

    def forward(
        self, r: torch.Tensor, sinkhorn_epsilon: float | None = None, sinkhorn_iters: int = 50
    ) -> VQOutput:
        dist = self.distances(r)
        if sinkhorn_epsilon is None:
            codes = dist.detach().argmin(dim=1)
        else:
            codes = sinkhorn_codes(dist, sinkhorn_epsilon, sinkhorn_iters)
        e = self.codebook(codes)
        codebook_loss = F.mse_loss(e, r.detach())
        commit_loss = F.mse_loss(r, e.detach())
        quantized = r + (e - r).detach()
        return VQOutput(quantized, e, codes, dist, codebook_loss, commit_loss)


class ResidualQuantizer(nn.Module):
    """L vector quantisers applied to successive residuals.

    Replicates the reference's gradient routing (spec dact.md §1.1): the next residual is
    r_l = r_{l-1} − (straight-through output), so it carries no gradient to r_{l-1}; only level 1 sends
    commitment gradient to the encoder and ∂ẑ/∂z = I.
    """

    def __init__(self, num_levels: int, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.dim = dim
        self.levels = nn.ModuleList(VectorQuantizer(codebook_size, dim) for _ in range(num_levels))
        # Training-time assignment counts since the last dead-code reset (L, K).
        self.register_buffer("usage", torch.zeros(num_levels, codebook_size), persistent=False)

    @property
    def codebooks(self) -> torch.Tensor:
        """(L, K, d) view of all codebook weights (a new stacked tensor; gradients flow)."""
        return torch.stack([vq.codebook.weight for vq in self.levels])

    def forward(
        self,
        z: torch.Tensor,
        sinkhorn_last_level: bool = False,
        sinkhorn_epsilon: float = 0.003,
        sinkhorn_iters: int = 50,
    ) -> RQOutput:
        residual = z
        quantized = torch.zeros_like(z)
        codes, residuals, dists, cb, cm = [], [], [], [], []
        for level, vq in enumerate(self.levels):
            use_sk = sinkhorn_last_level and level == self.num_levels - 1
            out = vq(residual, sinkhorn_epsilon if use_sk else None, sinkhorn_iters)
            residuals.append(residual)
            codes.append(out.codes)
            dists.append(out.distances)
            cb.append(out.codebook_loss)
            cm.append(out.commit_loss)
            quantized = quantized + out.quantized
            residual = residual - out.quantized
        codes_t = torch.stack(codes, dim=1)
        if self.training:
            with torch.no_grad():
                for level in range(self.num_levels):
                    self.usage[level] += torch.bincount(codes_t[:, level], minlength=self.codebook_size).to(
                        self.usage.dtype
                    )
        return RQOutput(quantized, codes_t, residuals, torch.stack(dists, dim=1), torch.stack(cb), torch.stack(cm))

    @torch.no_grad()
    def encode_codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L) greedy argmin codes without building losses."""
        residual = z
        codes = []
        for vq in self.levels:
            idx = vq.distances(residual).argmin(dim=1)
            codes.append(idx)
            residual = residual - vq.codebook.weight[idx]
        return torch.stack(codes, dim=1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Σ_l e^l[codes[:, l]]."""
        return sum(vq.codebook(codes[:, level]) for level, vq in enumerate(self.levels))


# --------------------------------------------------------------------------------------------- model


def _mlp(dims: list[int], dropout: float) -> nn.Sequential:
    """Dropout → Linear per block, ReLU after every Linear except the last; Xavier-normal weights, zero bias."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        lin = nn.Linear(a, b)
        nn.init.xavier_normal_(lin.weight)
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class RQVAEOutput:
    x_hat: torch.Tensor  # (B, input_dim)
    z: torch.Tensor  # (B, latent_dim) encoder output (or the latent that was passed in)
    quant: RQOutput = field(repr=False)

    @property
    def codes(self) -> torch.Tensor:
        return self.quant.codes

    @property
    def z_q(self) -> torch.Tensor:
        return self.quant.quantized


class RQVAE(nn.Module):
    """MLP encoder/decoder around a residual quantiser, with the LETTER collaborative regulariser."""

    def __init__(self, config: RQVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or RQVAEConfig()
        dims = [config.input_dim, *config.hidden_dims, config.latent_dim]
        self.encoder = _mlp(dims, config.dropout)
        self.decoder = _mlp(dims[::-1], config.dropout)
        self.quantizer = ResidualQuantizer(config.num_levels, config.codebook_size, config.latent_dim)
        self.cf_proj: nn.Module = nn.Identity()
        if config.cf_dim is not None and config.cf_dim != config.latent_dim:
            self.cf_proj = nn.Linear(config.cf_dim, config.latent_dim)
        # Saved with the weights so a resumed run does not re-run the k-means init.
        self.register_buffer("codebooks_initialized", torch.tensor(False))

    # ------------------------------------------------------------------ forward pieces
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)

    def quantize(self, z: torch.Tensor, sinkhorn: bool | None = None) -> RQOutput:
        """Residual quantisation of latents ``z``; ``sinkhorn`` overrides ``config.sinkhorn_last_level``."""
        c = self.config
        use_sk = c.sinkhorn_last_level if sinkhorn is None else sinkhorn
        return self.quantizer(z, use_sk, c.sinkhorn_epsilon, c.sinkhorn_iters)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> RQVAEOutput:
        """Encode (unless a latent ``z`` is given, e.g. DACT's mixed branches), quantise, decode."""
        if z is None:
            z = self.encode(x)
        quant = self.quantize(z)
        return RQVAEOutput(self.decode(quant.quantized), z, quant)

    # ------------------------------------------------------------------ losses
    @staticmethod
    def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mean squared error over batch and input dims (Eq. 4)."""
        return F.mse_loss(x_hat, x)

    def project_cf(self, cf_emb: torch.Tensor) -> torch.Tensor:
        """Map CF embeddings to the latent width (identity when the widths already agree)."""
        if cf_emb.shape[-1] != self.config.latent_dim and isinstance(self.cf_proj, nn.Identity):
            raise ValueError(
                f"CF embeddings have width {cf_emb.shape[-1]} but latent_dim is {self.config.latent_dim}; "
                f"set RQVAEConfig.cf_dim={cf_emb.shape[-1]} to learn a projection"
            )
        return self.cf_proj(cf_emb)

    def cf_loss(self, z_q: torch.Tensor, cf_emb: torch.Tensor) -> torch.Tensor:
        """In-batch InfoNCE between quantised latents and CF embeddings (Eq. 7): positives on the diagonal."""
        c = self.config
        cf = self.project_cf(cf_emb)
        if c.cf_similarity == "cosine":
            logits = F.normalize(z_q, dim=-1) @ F.normalize(cf, dim=-1).t()
        else:
            logits = z_q @ cf.t()
        target = torch.arange(z_q.shape[0], device=z_q.device)
        return F.cross_entropy(logits / c.cf_temperature, target)

    def quantization_loss(self, quant: RQOutput) -> torch.Tensor:
        """mean over levels of codebook + β·commitment (Eq. 5)."""
        return (quant.codebook_losses + self.config.beta * quant.commit_losses).mean()

    def compute_loss(
        self,
        x: torch.Tensor,
        cf_emb: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        output: RQVAEOutput | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss parts and total (Eq. 8). ``z`` replaces the encoder output; ``output`` reuses a forward.

        Keys: ``recon``, ``codebook`` and ``commit`` (level means, commit unweighted), ``quant``
        (codebook + β·commit), ``cf`` (0 without CF embeddings or with ``cf_weight`` 0), ``total``;
        plus ``output`` (the RQVAEOutput, not a loss).
        """
        c = self.config
        out = output if output is not None else self(x, z)
        recon = self.reconstruction_loss(out.x_hat, x)
        quant = self.quantization_loss(out.quant)
        if cf_emb is not None and c.cf_weight != 0:
            cf = self.cf_loss(out.z_q, cf_emb)
        else:
            cf = recon.new_zeros(())
        total = recon + c.quant_loss_weight * quant + c.cf_weight * cf
        return {
            "recon": recon,
            "codebook": out.quant.codebook_losses.mean(),
            "commit": out.quant.commit_losses.mean(),
            "quant": quant,
            "cf": cf,
            "total": total,
            "output": out,
        }

    # ------------------------------------------------------------------ soft assignments (DACT)
    @staticmethod
    def assignment_log_probs(distances: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log p(k | r) = log_softmax(−‖r − e_k‖² / τ) over the last axis (paper Eq. 1)."""
        return F.log_softmax(-distances / temperature, dim=-1)

    def level_log_probs(self, z: torch.Tensor, level: int = 0, temperature: float = 1.0) -> torch.Tensor:
        """(B, K) assignment log-probabilities of latents ``z`` at ``level`` (residual of greedy levels before)."""
        residual = z
        for vq in self.quantizer.levels[:level]:
            idx = vq.distances(residual).detach().argmin(dim=1)
            residual = residual - vq.codebook(idx)
        return self.assignment_log_probs(self.quantizer.levels[level].distances(residual), temperature)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def get_codes(self, x, batch_size: int = 4096) -> np.ndarray:
        """(n, L) int64 codes of the rows of ``x`` in eval mode (argmin, or batch-wise Sinkhorn if configured)."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
            out = []
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size].to(device=device, dtype=torch.float32)
                z = self.encode(xb)
                if self.config.sinkhorn_last_level:
                    out.append(self.quantize(z).codes)
                else:
                    out.append(self.quantizer.encode_codes(z))
            if not out:
                return np.zeros((0, self.config.num_levels), dtype=np.int64)
            return torch.cat(out).cpu().numpy().astype(np.int64)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def init_codebooks_kmeans(self, x: torch.Tensor, batch_size: int = 65_536) -> list[float]:
        """Set every level's codebook to residual k-means centres of the encoder latents of ``x``.

        Returns the k-means inertia per level. Needs at least ``codebook_size`` rows.
        """
        c = self.config
        if x.shape[0] < c.codebook_size:
            raise ValueError(
                f"k-means codebook init needs at least codebook_size={c.codebook_size} vectors, got "
                f"{x.shape[0]}; initialise on the full embedding matrix or a larger batch"
            )
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            z = torch.cat(
                [self.encode(x[s : s + batch_size].to(device, torch.float32)) for s in range(0, x.shape[0], batch_size)]
            )
        finally:
            self.train(was_training)
        seed = c.kmeans_seed if c.kmeans_seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        rk = ResidualKMeans(
            c.num_levels, c.codebook_size, c.kmeans_iters, c.kmeans_batch_size, seed=seed
        ).fit(z)
        for level, vq in enumerate(self.quantizer.levels):
            vq.codebook.weight.copy_(rk.codebooks[level].to(vq.codebook.weight))
        self.codebooks_initialized.fill_(True)
        self.quantizer.usage.zero_()
        return rk.inertia

    @torch.no_grad()
    def reset_dead_codes(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[int]:
        """Re-seed codes used fewer than ``dead_code_threshold`` times since the last reset.

        Level by level, each dead code becomes a random residual (of that level) of the latents of ``x``,
        then the usage counters restart. Returns the number of codes reset per level.
        """
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            residual = self.encode(x.to(device, torch.float32))
        finally:
            self.train(was_training)
        counts = []
        for level, vq in enumerate(self.quantizer.levels):
            dead = (self.quantizer.usage[level] < self.config.dead_code_threshold).nonzero().squeeze(1)
            if len(dead):
                pick = torch.randint(residual.shape[0], (len(dead),), generator=generator).to(device)
                vq.codebook.weight[dead] = residual[pick]
            counts.append(len(dead))
            idx = vq.distances(residual).argmin(dim=1)
            residual = residual - vq.codebook.weight[idx]
        self.quantizer.usage.zero_()
        return counts


# --------------------------------------------------------------------------------------------- diagnostics


def codebook_usage(codes: np.ndarray, codebook_size: int) -> list[float]:
    """Share of the K codes used at each level."""
    codes = np.asarray(codes)
    return [len(np.unique(codes[:, level])) / codebook_size for level in range(codes.shape[1])]


def codebook_perplexity(codes: np.ndarray, codebook_size: int) -> list[float]:
    """exp(entropy) of the code distribution at each level (K = perfectly uniform, 1 = collapsed)."""
    codes = np.asarray(codes)
    out = []
    for level in range(codes.shape[1]):
        p = np.bincount(codes[:, level], minlength=codebook_size).astype(np.float64)
        p = p[p > 0] / max(p.sum(), 1.0)
        out.append(float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0)
    return out


def collision_rate(codes: np.ndarray) -> float:
    """Share of items whose L-level code is shared: 1 − #distinct prefixes / n (SemanticIdTable's definition)."""
    codes = np.asarray(codes)
    if len(codes) == 0:
        return 0.0
    return 1.0 - len(np.unique(codes, axis=0)) / len(codes)


def cf_alignment(z_q: torch.Tensor, cf_latent: torch.Tensor) -> float:
    """Mean cosine between quantised latents and (projected) CF embeddings of the same items."""
    return float(F.cosine_similarity(z_q, cf_latent, dim=-1).mean())


def build_sid_table(
    codes: np.ndarray, items: np.ndarray | None = None, codebook_size: int = 256, suffix_size: int = 256
) -> SemanticIdTable:
    """SID table with TIGER collision suffixes in item order; ``items`` defaults to 0..n-1.

    Raises ``SuffixOverflowError`` (naming the crowded prefix) when more than ``suffix_size`` items share
    a prefix.
    """
    codes = np.asarray(codes, dtype=np.int64)
    items = np.arange(len(codes), dtype=np.int64) if items is None else np.asarray(items, dtype=np.int64)
    if items.shape != (codes.shape[0],):
        raise ValueError(f"items must have shape ({codes.shape[0]},) to match codes, got {items.shape}")
    return SemanticIdTable.from_codes(items, codes, codebook_size, suffix_size)
