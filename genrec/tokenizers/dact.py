"""DACT: drift-aware continual fine-tuning of the RQ-VAE tokenizer (spec dact.md §1.3–1.7, decision 7).

One continual period fine-tunes the previous period's tokenizer (kept frozen as the "old" model) on the
current catalogue x with the current CF embeddings c:

* CDIM scores every item's drift confidence g_i from its old latent z̄_i = E_old(x_i), its current latent
  sg(z_i) and c_i (key/value pattern memory, §1.3).
* Per mini-batch the top ⌊ρ|B|⌋ items by g are "drifting"; the mask is hard in the forward pass and
  carries ∂m/∂g = 1 backward (straight-through, §1.4).
* Two branches through the same quantiser/decoder (§1.5): drift z^D = m·z + (1−m)·z̄ and stationary
  z^S = (1−m)·z + m·z̄; L_drift = L_tok(z^D), L_stat = L_tok(z^S) + μ·‖z^S − z̄‖²/(|B|·d).
* Global stability (§1.6): KL(P_old ‖ P_new) of level-1 soft assignments with temperature τ_g, averaged
  over items and the K codes (the reference's element-wise mean).
* Total (§1.7): L = L_drift + λ·L_stat + γ·L_global + η·mean(g²).

Ablations (paper Fig. 3): ``use_cdim=False`` selects a uniformly random ⌊ρ|B|⌋ subset (no CDIM, no
L_conf); ``differentiated_update=False`` drops the two branches and trains the plain tokenizer loss on
all items (+ γ·L_global unless disabled); ``global_kl=False`` drops L_global; ``reassignment=False``
makes the code reassignment re-infer every code (``reassign_mode``).

The pure functions below work on plain tensors; ``DACTModel`` wires them to a frozen old RQ-VAE and a
trainable current one. Training has one loop: ``lightning_modules.dact.DACTModule`` (reference recipe:
AdamW, linear warm-up then decay, gradient-norm clip) under a Lightning Trainer.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genrec.errors import ConfigError
from genrec.tokenizers.rqvae import RQVAE


@dataclass
class DACTConfig:
    """DACT fine-tuning knobs; defaults follow the reference scripts (spec dact.md §1.9)."""

    drift_ratio: float = 0.3
    """ρ: share of each mini-batch selected as drifting, k = max(1, ⌊ρ·|B|⌋) (``--topk``; paper sweeps 0.1–0.9)."""
    stat_weight: float = 0.1
    """λ: weight of the stationary objective L_stat (``loss_old``; paper sweeps {0.001, 0.1, 0.5, 1})."""
    anchor_weight: float = 1.0
    """μ: weight of the anchoring term inside L_stat (``stable_weight``; paper sweeps {0.5, 1, 2, 5})."""
    kl_weight: float = 5.0
    """γ: weight of the global level-1 assignment KL (``kl_weight``; paper sweeps {0.5, 1, 5, 10})."""
    kl_temperature: float = 1.0
    """τ_g: temperature of the level-1 soft assignment softmax(−‖y − e_k‖²/τ_g) (``kl_temp``)."""
    conf_weight: float = 0.001
    """η: weight of the confidence regulariser mean(g²) (hard-coded 0.001 in the reference)."""
    num_slots: int = 32
    """CDIM memory slots (key/value pairs; paper 32)."""
    hidden_dim: int = 64
    """CDIM value-slot width d_h (paper 64)."""
    head_hidden_dim: int = 32
    """Width of the CDIM confidence head's hidden layer (LN(d_h) → d_h→32 → GELU → 32→1)."""
    attention_temperature: float = 0.1
    """τ_c: CDIM attention temperature over cosine similarities (``--tau``; paper sweeps 0.05–2)."""
    use_cdim: bool = True
    """Ablation "w/o CDIM": False selects a uniformly random drifting subset of the same size."""
    differentiated_update: bool = True
    """Ablation "w/o Diff": False trains the plain tokenizer loss on all items (no branches, no CDIM)."""
    global_kl: bool = True
    """Ablation "w/o Global": False drops the global KL term."""
    reassignment: bool = True
    """Ablation "w/o Re-assign": False re-infers every code after fine-tuning (see ``reassign_mode``)."""
    loss_scope: Literal["batch", "group"] = "batch"
    """"batch" (reference): each branch loss over the whole batch, anchor normalised by |B|·d.
    "group" (paper-literal): L_drift over the drifting rows only, L_stat and the anchor over the
    stationary rows only (CF contrast within each group)."""
    lr: float = 1e-4
    """AdamW learning rate (``finetune_book_dact.sh``)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    epochs: int = 5000
    """Training epochs (the reference counts epochs, not steps; decision 7): the Trainer's ``max_epochs``."""
    warmup_epochs: int = 50
    """Linear learning-rate warm-up length in epochs, then linear decay to 0 at the last step."""
    batch_size: int = 1024
    """Mini-batch size (the top-ρ selection is per mini-batch)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    seed: int = 2024
    """Seed of the random selection in the w/o-CDIM ablation (``DACTModule`` seeds its generator with it); ``genrec continual`` sets it
    to its own seed + period."""

    def __post_init__(self) -> None:
        if not 0.0 < self.drift_ratio <= 1.0:
            raise ConfigError(f"DACTConfig.drift_ratio must be in (0, 1], got {self.drift_ratio}")
        for name in ("kl_temperature", "attention_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"DACTConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_slots", "hidden_dim", "head_hidden_dim", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"DACTConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        for name in (
            "stat_weight",
            "anchor_weight",
            "kl_weight",
            "conf_weight",
            "grad_clip",
            "lr",
            "weight_decay",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"DACTConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.epochs < 0 or self.warmup_epochs < 0:
            raise ConfigError("DACTConfig.epochs and DACTConfig.warmup_epochs must be ≥ 0")
        if self.loss_scope not in ("batch", "group"):
            raise ConfigError(f"DACTConfig.loss_scope must be 'batch' or 'group', got {self.loss_scope!r}")


def reassign_mode(config: DACTConfig) -> str:
    """Reassignment policy for ``genrec.tokenizers.reassign``: relaxed-to-strict unless ablated."""
    return "dact" if config.reassignment else "finetune"


# --------------------------------------------------------------------------------------------- CDIM


class CDIM(nn.Module):
    """Collaborative Drift Identification Module (spec §1.3, paper Eq. 12–16).

    Query f = [n(z̄)⊙n(c) ; n(sg z)⊙n(c) ; n(z̄) − n(sg z)], q = n(f) ∈ R^{3d} (no learned projection,
    as in the reference); attention a = softmax(⟨q, n(K_s)⟩ / τ_c) over ``num_slots`` keys;
    h = Σ_s a_s V_s ∈ R^{d_h}; g = σ(W2 GELU(W1 LN(h))).
    """

    def __init__(
        self,
        latent_dim: int = 32,
        num_slots: int = 32,
        hidden_dim: int = 64,
        temperature: float = 0.1,
        head_hidden_dim: int = 32,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"CDIM temperature must be > 0, got {temperature}")
        self.latent_dim = latent_dim
        self.temperature = temperature
        self.keys = nn.Parameter(torch.empty(num_slots, 3 * latent_dim))
        self.values = nn.Parameter(torch.empty(num_slots, hidden_dim))
        nn.init.orthogonal_(self.keys)
        nn.init.xavier_normal_(self.values)
        self.head = nn.Sequential(
            nn.LayerNorm(hidden_dim),
            nn.Linear(hidden_dim, head_hidden_dim),
            nn.GELU(),
            nn.Linear(head_hidden_dim, 1),
        )

    def query(self, old_latent: torch.Tensor, cur_latent: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        """(B, 3d) normalised query; the current latent is detached (the paper's stop-gradient)."""
        for name, t in (("old_latent", old_latent), ("cur_latent", cur_latent), ("cf", cf)):
            if t.ndim != 2 or t.shape[1] != self.latent_dim:
                raise ValueError(f"CDIM: {name} must have shape (B, {self.latent_dim}), got {tuple(t.shape)}")
        u = F.normalize(old_latent, dim=-1)
        v = F.normalize(cur_latent.detach(), dim=-1)
        w = F.normalize(cf, dim=-1)
        return F.normalize(torch.cat([u * w, v * w, u - v], dim=-1), dim=-1)

    def attention(self, query: torch.Tensor) -> torch.Tensor:
        """(B, slots) softmax over cosine similarities to the keys, divided by τ_c."""
        return torch.softmax(query @ F.normalize(self.keys, dim=-1).t() / self.temperature, dim=-1)

    def forward(self, old_latent: torch.Tensor, cur_latent: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        """(B,) drift confidence g ∈ (0, 1)."""
        attn = self.attention(self.query(old_latent, cur_latent, cf))
        return torch.sigmoid(self.head(attn @ self.values)).squeeze(-1)


def confidence_regularizer(confidence: torch.Tensor) -> torch.Tensor:
    """L_conf = mean_i g_i² (Eq. 16): keeps confidences from saturating at 1."""
    return confidence.pow(2).mean()


# --------------------------------------------------------------------------------------------- selection


def num_drifting(batch_size: int, ratio: float) -> int:
    """k = max(1, ⌊ρ·|B|⌋) (reference ``int(topk * B)``; rounded to 9 decimals first so that e.g.
    0.29·100 gives 29 rather than floating-point 28)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    return max(1, min(batch_size, math.floor(round(ratio * batch_size, 9))))


def straight_through_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Hard 0/1 mask of the k largest ``scores`` in the forward pass, ∂mask/∂scores = I backward."""
    hard = torch.zeros_like(scores)
    hard[scores.detach().topk(k).indices] = 1.0
    return hard + scores - scores.detach()


def random_mask(
    batch_size: int, k: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Hard mask of k uniformly random rows ("w/o CDIM" ablation); no gradient."""
    mask = torch.zeros(batch_size)
    mask[torch.randperm(batch_size, generator=generator)[:k]] = 1.0
    return mask.to(device) if device is not None else mask


def mix_latents(
    cur_latent: torch.Tensor, old_latent: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drift and stationary branches (spec §1.4): z^D = m·z + (1−m)·z̄, z^S = (1−m)·z + m·z̄."""
    m = mask.unsqueeze(-1)
    return m * cur_latent + (1 - m) * old_latent, (1 - m) * cur_latent + m * old_latent


def anchor_loss(stat_latent: torch.Tensor, old_latent: torch.Tensor) -> torch.Tensor:
    """L_anchor = Σ_i ‖z^S_i − z̄_i‖² / (rows · d) (Eq. 19; reference normaliser over all rows given)."""
    return F.mse_loss(stat_latent, old_latent)


def global_kl_loss(old_log_probs: torch.Tensor, new_log_probs: torch.Tensor) -> torch.Tensor:
    """L_global = (1/(B·K)) Σ_i Σ_k P_old,ik (log P_old,ik − log P_new,ik) (Eq. 21–22).

    KL(old ‖ new) averaged element-wise (over items and the K codes, the reference's reduction), so the
    per-item KL is scaled by 1/K.
    """
    # batchmean divides by B; the extra 1/K reproduces the reference's element-wise mean.
    return (
        F.kl_div(new_log_probs, old_log_probs, reduction="batchmean", log_target=True)
        / old_log_probs.shape[-1]
    )


# --------------------------------------------------------------------------------------------- model


def _with_loss(logs: dict[str, torch.Tensor], loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached log terms plus the loss itself (last, with its graph) for the optimiser."""
    logs = {k: v.detach() for k, v in logs.items()}
    logs["loss"] = loss
    return logs


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class DACTModel(nn.Module):
    """Frozen previous-period RQ-VAE (``old``), trainable current RQ-VAE (``current``) and CDIM.

    ``forward(x, cf)`` returns the DACT loss and its terms for one mini-batch. The old latents and the
    teacher level-1 distributions are computed on the fly by the frozen old model (eval mode, no
    dropout), which equals the reference's one-off precomputation. ``parameters()`` of the old model
    have ``requires_grad=False``; pass ``trainable_parameters()`` to the optimiser.
    """

    def __init__(
        self,
        previous: RQVAE,
        config: DACTConfig | None = None,
        current: RQVAE | None = None,
        cdim: CDIM | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or DACTConfig()
        self.old = freeze(copy.deepcopy(previous))
        self.current = current if current is not None else copy.deepcopy(previous)
        for p in self.current.parameters():
            p.requires_grad_(True)
        d = self.current.config.latent_dim
        if self.old.config.latent_dim != d:
            raise ValueError(
                f"previous latent_dim {self.old.config.latent_dim} ≠ current latent_dim {d}: DACT fine-tunes "
                f"the same architecture"
            )
        needs_cdim = config.use_cdim and config.differentiated_update
        if needs_cdim and cdim is None:
            cdim = CDIM(
                d, config.num_slots, config.hidden_dim, config.attention_temperature, config.head_hidden_dim
            )
        # None when the ablation does not use it, so its parameters never reach the optimiser.
        self.cdim = cdim if needs_cdim else None
        self.generator: torch.Generator | None = None  # random selection ("w/o CDIM"); set by the trainer

    def train(self, mode: bool = True):
        super().train(mode)
        self.old.eval()  # the teacher must stay deterministic
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def old_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.old.encode(x)

    @torch.no_grad()
    def teacher_log_probs(self, old_latent: torch.Tensor) -> torch.Tensor:
        """(B, K) level-1 log P_old from the old latent and the old level-1 codebook."""
        return self.old.level_log_probs(old_latent, 0, self.config.kl_temperature)

    def confidence(
        self, old_latent: torch.Tensor, cur_latent: torch.Tensor, cf: torch.Tensor
    ) -> torch.Tensor:
        """(B,) CDIM drift confidence (CF mapped to the latent width by the current model, detached)."""
        if self.cdim is None:
            raise RuntimeError(
                "DACTModel.confidence: CDIM is disabled (use_cdim=False or differentiated_update=False)"
            )
        return self.cdim(old_latent, cur_latent, self.current.project_cf(cf).detach())

    def _branch_loss(self, x, cf, z, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if rows is not None:
            x, cf, z = x[rows], cf[rows], z[rows]
        return self.current.compute_loss(x, cf, z=z)

    def _global_kl(self, z: torch.Tensor, z_old: torch.Tensor) -> torch.Tensor:
        new_lp = self.current.level_log_probs(z, 0, self.config.kl_temperature)
        return global_kl_loss(self.teacher_log_probs(z_old), new_lp)

    def _plain_forward(self, x, cf, z, z_old, l_global) -> dict[str, torch.Tensor]:
        """The plain tokenizer loss on every item, plus the global KL (ablation "w/o Diff")."""
        plain = self.current.compute_loss(x, cf, z=z)
        loss = plain["total"] + self.config.kl_weight * l_global
        logs: dict[str, torch.Tensor] = {}
        logs.update(plain_loss=plain["total"], recon=plain["recon"], quant=plain["quant"], cf=plain["cf"])
        logs.update(global_kl=l_global, latent_shift=(z - z_old).norm(dim=-1).mean())
        return _with_loss(logs, loss)

    def _select_drifting(self, z_old, z, cf, batch_size: int, zero):
        """Mask of the k = ⌊ρ·B⌋ drifting rows: CDIM top-k (straight-through, so the mask carries CDIM's
        gradient) or uniformly random ("w/o CDIM"). Returns (confidence or None, mask, confidence regulariser)."""
        k = num_drifting(batch_size, self.config.drift_ratio)
        if self.cdim is None:
            return None, random_mask(batch_size, k, self.generator, device=z.device), zero
        g = self.confidence(z_old, z, cf)
        return g, straight_through_topk_mask(g, k), confidence_regularizer(g)

    def _branch_losses(self, x, cf, z_drift, z_stat, z_old, hard, zero):
        """Drift and stationary tokenizer losses and the anchor, over the batch or over each group."""
        if self.config.loss_scope == "batch":
            drift = self._branch_loss(x, cf, z_drift, None)
            stat = self._branch_loss(x, cf, z_stat, None)
            return drift, stat, anchor_loss(z_stat, z_old)
        # paper-literal: each objective on its own group; mask values (=1) keep the STE gradient
        drift = self._branch_loss(x, cf, z_drift, hard)
        if (~hard).any():
            stat = self._branch_loss(x, cf, z_stat, ~hard)
            return drift, stat, anchor_loss(z_stat[~hard], z_old[~hard])
        return drift, {"total": zero, "recon": zero, "quant": zero, "cf": zero}, zero

    @staticmethod
    def _selection_logs(z, z_old, hard, g, zero) -> dict[str, torch.Tensor]:
        shift = (z - z_old).norm(dim=-1)
        logs = {
            "drift_ratio": hard.float().mean(),
            "latent_shift": shift.mean(),
            "latent_shift_drifting": shift[hard].mean(),
            "latent_shift_stationary": shift[~hard].mean() if (~hard).any() else zero,
        }
        if g is not None:
            logs.update(
                confidence_mean=g.mean(),
                confidence_std=g.std(correction=0),
                confidence_selected=g[hard].mean(),
                confidence_threshold=g[hard].min(),
            )
        return logs

    # ------------------------------------------------------------------ loss
    def forward(self, x: torch.Tensor, cf: torch.Tensor) -> dict[str, torch.Tensor]:
        """DACT loss on one batch. Returns ``loss`` plus detached terms and selection statistics."""
        if cf is None:
            raise ValueError("DACT needs the current period's CF embeddings (cf) for every batch")
        c = self.config
        z = self.current.encode(x)
        z_old = self.old_latent(x)
        zero = z.new_zeros(())
        l_global = self._global_kl(z, z_old) if c.global_kl and c.kl_weight > 0 else zero
        if not c.differentiated_update:
            return self._plain_forward(x, cf, z, z_old, l_global)

        g, mask, l_conf = self._select_drifting(z_old, z, cf, x.shape[0], zero)
        z_drift, z_stat = mix_latents(z, z_old, mask)
        hard = mask.detach() > 0.5
        drift, stat, l_anchor = self._branch_losses(x, cf, z_drift, z_stat, z_old, hard, zero)
        l_drift = drift["total"]
        l_stat = stat["total"] + c.anchor_weight * l_anchor
        loss = l_drift + c.stat_weight * l_stat + c.kl_weight * l_global + c.conf_weight * l_conf
        logs: dict[str, torch.Tensor] = {}
        logs.update(
            drift_loss=l_drift, stat_loss=l_stat, anchor=l_anchor, global_kl=l_global, conf_reg=l_conf
        )
        logs.update(drift_recon=drift["recon"], drift_quant=drift["quant"], drift_cf=drift["cf"])
        logs.update(stat_recon=stat["recon"], stat_quant=stat["quant"], stat_cf=stat["cf"])
        logs.update(self._selection_logs(z, z_old, hard, g, zero))
        return _with_loss(logs, loss)

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def code_change(self, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
        """Per-level share of items whose argmin code differs between the old and the current model."""
        old = self.old.get_codes(x, batch_size)
        new = self.current.get_codes(x, batch_size)
        changed = old != new
        out = {f"code_change_level{l + 1}": float(changed[:, l].mean()) for l in range(changed.shape[1])}
        out["code_change_any"] = float(changed.any(axis=1).mean())
        return out


def build_dact_model(
    previous_state_dict: dict,
    rqvae_config,
    config: DACTConfig | None = None,
    cdim_state_dict: dict | None = None,
) -> DACTModel:
    """DACTModel from the previous period's ``RQVAE`` state dict (+ its ``RQVAEConfig``).

    ``cdim_state_dict`` warm-starts CDIM from the previous DACT period (paper §3.1.1); at the first
    continual period leave it None (random CDIM).
    """
    previous = RQVAE(rqvae_config)
    previous.load_state_dict(previous_state_dict)
    model = DACTModel(previous, config)
    if cdim_state_dict is not None:
        if model.cdim is None:
            raise ValueError(
                "cdim_state_dict given but CDIM is disabled by the config (use_cdim/differentiated_update)"
            )
        model.cdim.load_state_dict(cdim_state_dict)
    return model


def config_dict(config: DACTConfig) -> dict:
    """Plain dict of the config (for loggers / checkpoints)."""
    return asdict(config)


__all__ = [
    "CDIM",
    "DACTConfig",
    "DACTModel",
    "anchor_loss",
    "build_dact_model",
    "confidence_regularizer",
    "config_dict",
    "global_kl_loss",
    "mix_latents",
    "num_drifting",
    "random_mask",
    "reassign_mode",
    "straight_through_topk_mask",
]
