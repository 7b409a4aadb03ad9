"""Target values by δ optimisation (specs/genrecedit.md §4, decision 5).

For each request an independent δ_i ∈ R^{d_model} is added to the ``wo`` output of the edit layer at the edit
step only, so earlier steps keep their unedited states (the One-One semantics). Position-wise requests (loss on
the edit step alone) run the unedited prefix and the blocks up to the edit layer once, through the KV-cached
decoder, and each Adam step recomputes only the blocks above the edit layer for one token (spec §4.2: "an
unedited KV prefix plus a single-token step"). The object-wise ablation, whose loss spans later steps that attend
to the edited state, uses a forward hook over a full teacher-forced recompute (also available for any request
with ``use_cache=False``; the two are tested equal). Loss per request (reference ``genrecedit/editor.py``):

    −log max(softmax(logits)[o], 1e-12)  +  β · ‖δ_i‖ / (‖z_i⁰‖ + 1e-8)

summed over the still-active requests; β = 0.2 in the reference, β = 0 is the paper-literal Eq. 8. Adam
(lr 0.5, default betas), cosine decay to 0.01 over 30 steps, absolute clamp ‖δ_i‖ ≤ 8000 after each step.
Success checks at t ∈ {10, 20, …, 29}: request i succeeds when the full-vocabulary argmax of step t's forward
equals its target; it then leaves the active set. Requests that never succeed are dropped from the solve.
``profile="released"`` stores the δ *after* step t's update (reference behaviour); ``"clean"`` stores the δ that
produced the successful forward.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from genrec.decoding.beam_search import CachedT5Decoder
from genrec.editing.keys import capture_wo, decoder_logits, eval_mode, ffn_out_proj, wo_hooks

VALUE_PROFILES = ("released", "clean")


def _default_checks() -> tuple[int, ...]:
    return (10,) + tuple(range(20, 30))


@dataclass
class ValueConfig:
    """δ-optimisation knobs; defaults are the reference's (``genrecedit/hparams.py``, ``editor.py``)."""

    lr: float = 0.5  # v_lr
    steps: int = 30  # v_num_grad_steps (also the cosine T_max)
    lr_min: float = 0.01  # cosine η_min
    beta: float = 0.2  # v_weight_decay on ‖δ‖/‖z⁰‖; 0.0 = paper Eq. 8
    clamp: float = 8000.0  # z_vector_max, absolute bound on ‖δ‖
    check_steps: tuple[int, ...] = field(default_factory=_default_checks)
    profile: str = "released"  # "released" | "clean" (which δ is stored on success)

    def __post_init__(self) -> None:
        if self.profile not in VALUE_PROFILES:
            raise ValueError(f"value profile must be one of {VALUE_PROFILES}, got {self.profile!r}")
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"need steps >= 1 and lr > 0, got steps={self.steps}, lr={self.lr}")


@dataclass
class ValueResult:
    delta: torch.Tensor  # (b, d_model) stored δ (zeros for failed requests)
    success: torch.Tensor  # (b,) bool
    success_step: torch.Tensor  # (b,) int64, −1 when never successful
    z0: torch.Tensor  # (b, d_model) unedited wo output at the edit site


def _site_forward(model, enc_hidden, attention_mask, decoder_input_ids, layer: int, edit_step: int):
    """(δ ↦ (b, 1, V) logits of ``edit_step``, z⁰): unedited prefix and blocks ≤ layer computed once, cached."""
    with torch.no_grad():
        dec = CachedT5Decoder(model, None, attention_mask, max_steps=edit_step + 1, enc_hidden=enc_hidden)
        for t in range(edit_step):
            dec.step(decoder_input_ids[:, t])
        h, key = dec.step_to_layer(decoder_input_ids[:, edit_step], layer)
        z0 = ffn_out_proj(model, layer)(key).float()

    def forward(delta: torch.Tensor) -> torch.Tensor:
        return dec.logits_from_layer(h + delta.to(h.dtype), layer)[:, None]

    return forward, z0


def _hooked_forward(model, enc_hidden, attention_mask, decoder_input_ids, layer: int, edit_step: int, loss_steps):
    """Full teacher-forced recompute with δ hooked into (layer, edit_step); returns (forward, z⁰, hook-context)."""
    site = (layer, edit_step)
    z0 = capture_wo(model, None, attention_mask, decoder_input_ids, [site], with_values=True,
                    enc_hidden=enc_hidden)[site][1].float()
    current: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        out = output.clone()
        out[:, edit_step] = out[:, edit_step] + current["delta"].to(out.dtype)
        return out

    def forward(delta: torch.Tensor) -> torch.Tensor:
        current["delta"] = delta
        return decoder_logits(model, enc_hidden, attention_mask, decoder_input_ids)[:, loss_steps]

    return forward, z0, wo_hooks(model, {layer: hook})


def optimise_values(
    model: nn.Module,
    enc_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    targets: torch.Tensor,
    loss_steps: list[int],
    layer: int,
    edit_step: int,
    config: ValueConfig | None = None,
    use_cache: bool = True,
) -> ValueResult:
    """Optimise one δ per row so that ``argmax logits[:, loss_steps] == targets`` (b, len(loss_steps)).

    δ is added to the ``wo`` output of decoder ``layer`` at time ``edit_step`` only. Position-wise requests use
    ``loss_steps = [p]``, ``edit_step = p``; the object-wise ablation uses all SID steps with ``edit_step = 0``.
    The model's parameters and their ``.grad`` are left untouched.
    """
    cfg = config or ValueConfig()
    b = decoder_input_ids.shape[0]
    targets = targets.reshape(b, len(loss_steps)).long()
    device = enc_hidden.device
    d_model = model.config.d_model
    delta = torch.zeros(b, d_model, device=device, requires_grad=True)
    with eval_mode(model):
        if use_cache and list(loss_steps) == [edit_step]:
            forward, z0 = _site_forward(model, enc_hidden, attention_mask, decoder_input_ids, layer, edit_step)
            hooks = contextlib.nullcontext()
        else:
            forward, z0, hooks = _hooked_forward(
                model, enc_hidden, attention_mask, decoder_input_ids, layer, edit_step, list(loss_steps)
            )
        with hooks:
            stored, success_step = _adam(forward, delta, z0, targets, cfg)
    return ValueResult(delta=stored, success=success_step >= 0, success_step=success_step, z0=z0)


def _adam(forward, delta: torch.Tensor, z0: torch.Tensor, targets: torch.Tensor, cfg: ValueConfig):
    """The reference's Adam loop with success checks; returns (stored δ, success step or −1)."""
    b, d_model = delta.shape
    device = delta.device
    z0_norm = z0.norm(dim=1) + 1e-8
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)
    active = torch.ones(b, dtype=torch.bool, device=device)
    stored = torch.zeros(b, d_model, device=device)
    success_step = torch.full((b,), -1, dtype=torch.long, device=device)
    checks = set(cfg.check_steps)
    log_floor = math.log(1e-12)

    with torch.enable_grad():
        for t in range(cfg.steps):
            logits = forward(delta).float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
            ce = -logp.clamp_min(log_floor).sum(dim=1)
            reg = cfg.beta * delta.norm(dim=1) / z0_norm
            loss = ((ce + reg) * active).sum()
            newly = torch.zeros_like(active)
            if t in checks:
                newly = (logits.argmax(-1) == targets).all(dim=1) & active
            if not active.any():
                break
            grad = torch.autograd.grad(loss, delta)[0]
            before = delta.detach().clone()
            delta.grad = grad
            opt.step()
            sched.step()
            with torch.no_grad():
                norm = delta.norm(dim=1, keepdim=True)
                delta.mul_(torch.clamp(cfg.clamp / norm.clamp_min(1e-30), max=1.0))
                keep = before if cfg.profile == "clean" else delta.detach()
                stored[newly] = keep[newly]
                success_step[newly] = t
                active &= ~newly
            if not active.any():
                break
    return stored, success_step
