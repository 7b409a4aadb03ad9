"""GenRecEdit orchestration: knowledge → layer location → values → C̄0 → closed-form ΔW (specs/genrecedit.md).

``GenRecEditor(EditConfig()).edit(model, sid_table, cold_items, cold_item_embeddings, warm_item_embeddings,
train_history, train_target, warm_items=...)`` takes plain arrays and a HF ``T5ForConditionalGeneration`` and
returns ``(PositionEdits, EditReport)``. The model's weights are never modified. Memory is bounded for any
number of cold items: requests are processed in batches and only K1K1ᵀ, RK1ᵀ (and C̄0) are kept per position;
the probe uses at most ``probe_max_per_class`` samples per class.

Ablations (paper Table 3) are config switches: ``position_wise=False`` (object-wise edit, §2.5 — an assumption
documented below), ``one_one=False`` (ΔW merged into the weights at every step, §6.3), ``layer_mode`` random /
worst / fixed, ``knowledge="upper_bound"`` (true histories, leaks by design), ``value_beta=0`` (paper Eq. 8).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from genrec.editing.closed_form import KeyResidualStats, solve_update
from genrec.editing.covariance import model_fingerprint, preserved_covariances
from genrec.editing.diagnostics import top1_rates
from genrec.editing.edits import PositionEdits
from genrec.editing.keys import (
    HistoryEncoder,
    capture_wo,
    collect_keys,
    decoder_inputs,
    encode,
    eval_mode,
    model_device,
    num_decoder_layers,
)
from genrec.editing.knowledge import (
    KNOWLEDGE_SOURCES,
    PSEUDO_POLICIES,
    EditKnowledge,
    SidHistoryEncoder,
    nearest_neighbours,
    pseudo_knowledge,
    true_history_knowledge,
)
from genrec.editing.probe import LAYER_MODES, choose_layers, probe_accuracy_matrix
from genrec.editing.values import VALUE_PROFILES, ValueConfig, optimise_values
from genrec.errors import ConfigError
from genrec.tokenizers.sid import SemanticIdTable

PHASES = ("knowledge", "keys", "probe", "values", "covariance", "solve", "diagnostics")
NEIGHBOUR_POOLS = ("train_targets", "given")


@dataclass
class EditConfig:
    """Every GenRecEdit knob, with the paper's (or, where the paper is silent, the reference's) default."""

    cov_lambda: float = 3000.0
    """λ of Eq. 13 (C̄0 is mean-normalised). Paper §5.0.4: 3000 for Video and Software, 1000 for Phone; the
    reference CLI default is 10000 and its README/script use 1000."""
    histories_per_item: int = 10
    """Pseudo histories per cold item (``number_knowledge``; paper Fig. 6 sweeps it; Scripts/edit.sh uses 10)."""
    num_neighbours: int = 10
    """k warm neighbours by text cosine (``topk`` of prepare_edit_data.py)."""
    pseudo_policy: Literal["script", "notebook"] = "script"
    """``script``: the released prepare_edit_data.py (history cut before a neighbour's occurrence, canonical);
    ``notebook``: the reference notebook's generator (longest prefixes, neighbour inserted twice, ≤ 2 items
    deleted, the cold item inserted in the first half) — request keys then differ from the training rows'."""
    neighbour_pool: Literal["train_targets", "given"] = "train_targets"
    """``train_targets``: the given warm items that occur as training targets (only they yield histories; the
    paper's I_warm); ``given``: every given warm item (closer to the released pool I_trainSeq)."""
    knowledge: Literal["pseudo", "upper_bound"] = "pseudo"
    """``pseudo`` (paper) or ``upper_bound`` (true histories of the cold items from eval arrays; leaks)."""
    upper_bound_max_per_item: int | None = None
    """Cap on true histories per cold item (None = one request per evaluation instance, as released)."""
    positions: list[int] | None = None
    """SID positions to edit (None = all L+1 tokens, the reference's pos2layer length)."""
    layer_mode: Literal["probe", "fixed", "random", "worst"] = "probe"
    """``probe`` (paper), ``fixed`` (``fixed_layers``), ``random`` / ``worst`` (Table 3 ablations)."""
    fixed_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """pos2layer for ``layer_mode='fixed'`` (released default [0, 1, 2, 3])."""
    probe_max_per_class: int = 2000
    """Samples per class for the probe (paper silent); negatives are training rows, positives requests. The
    keys of all (layer, position) sites are held at once: 2·this·layers·positions·d_ff floats (≈ 390 MB at
    2000, 6 layers, 4 positions, d_ff 1024)."""
    probe_train_frac: float = 0.8
    """Probe train/validation split (paper: 8:2)."""
    value_lr: float = 0.5
    value_steps: int = 30
    value_lr_min: float = 0.01
    value_beta: float = 0.2
    """β·‖δ‖/‖z⁰‖ (reference); 0.0 reproduces the paper's pure cross-entropy Eq. 8."""
    value_clamp: float = 8000.0
    value_profile: Literal["released", "clean"] = "released"
    """``released``: store δ after the successful step's update (reference); ``clean``: the δ that succeeded."""
    position_wise: bool = True
    """False = "w/o position-wise": one object-wise edit per history at layer l* and step 0, δ trained on the
    CE of all SID tokens, active at every step (spec §2.5; our definition, flagged as an assumption)."""
    one_one: bool = True
    """False = "w/o one-one": every ΔW_p merged into its layer's weights, active at every step (§6.3)."""
    cov_max_samples: int | None = 400_000
    """mom2_n_samples: training rows used for C̄0 (seeded subset above it)."""
    cov_cache_dir: str | None = None
    """Disk cache for C̄0 keyed by checkpoint hash, data hash, layer, position and N (None = no cache)."""
    max_history_items: int = 20
    """Most recent items kept by the default history encoder; must equal TigerConfig.max_history_items."""
    seed: int = 2024
    key_batch_size: int = 2048
    value_batch_size: int = 2048
    cov_batch_size: int = 1280
    neighbour_batch_size: int = 4096
    diagnostic_rows: int = 1000
    """Edit requests and training rows sampled for the efficacy/locality report (0 = skip; timed separately as
    ``diagnostics``, not part of the edit)."""

    def __post_init__(self) -> None:
        checks = [
            ("knowledge", self.knowledge, KNOWLEDGE_SOURCES),
            ("layer_mode", self.layer_mode, LAYER_MODES),
            ("value_profile", self.value_profile, VALUE_PROFILES),
            ("neighbour_pool", self.neighbour_pool, NEIGHBOUR_POOLS),
            ("pseudo_policy", self.pseudo_policy, PSEUDO_POLICIES),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"EditConfig.{name} must be one of {allowed}, got {value!r}")
        if self.cov_lambda < 0:
            raise ConfigError(f"EditConfig.cov_lambda must be >= 0, got {self.cov_lambda}")
        for name in ("histories_per_item", "num_neighbours", "probe_max_per_class", "key_batch_size",
                     "value_batch_size", "cov_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"EditConfig.{name} must be >= 1, got {getattr(self, name)}")

    def value_config(self) -> ValueConfig:
        return ValueConfig(
            lr=self.value_lr,
            steps=self.value_steps,
            lr_min=self.value_lr_min,
            beta=self.value_beta,
            clamp=self.value_clamp,
            profile=self.value_profile,
        )


@dataclass
class EditReport:
    times: dict[str, float]  # seconds per phase (PHASES)
    layers: dict[int, int]  # chosen layer per edited position
    num_requests: dict[int, int]
    num_success: dict[int, int]
    success_rate: dict[int, float]
    probe_accuracy: list[list[float]] | None  # (layers × positions), None unless probed
    probe_positions: list[int]
    knowledge: dict
    leaks_eval: bool
    covariance: dict
    config: dict
    # Teacher-forced top-1 rate of the target token per position (``genrec.editing.diagnostics``), before/after:
    # on sampled requests (efficacy of ΔW) and on sampled training rows (locality). Empty when skipped.
    diagnostics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def edit_seconds(self) -> float:
        """Time of the edit proper (decision 8): every phase except knowledge preparation, the reusable C̄0
        and the diagnostics."""
        return float(sum(v for k, v in self.times.items() if k not in ("knowledge", "covariance", "diagnostics")))


class _Timers:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times = {p: 0.0 for p in PHASES}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        # Asynchronous GPU work must land inside the phase that queued it.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[phase] += time.perf_counter() - start


def _subsample(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


class GenRecEditor:
    """Builds a GenRecEdit edit set for cold items from plain arrays (see module docstring)."""

    def __init__(self, config: EditConfig | None = None) -> None:
        self.config = config or EditConfig()

    # ----------------------------------------------------------------- knowledge
    def build_knowledge(
        self,
        cold_items: np.ndarray,
        cold_item_embeddings: np.ndarray,
        warm_items: np.ndarray,
        warm_item_embeddings: np.ndarray,
        train_history: np.ndarray,
        train_target: np.ndarray,
        eval_history: np.ndarray | None = None,
        eval_target: np.ndarray | None = None,
    ) -> EditKnowledge:
        cfg = self.config
        cold_items = np.asarray(cold_items, dtype=np.int64)
        if cfg.knowledge == "upper_bound":
            if eval_history is None or eval_target is None:
                raise ValueError("knowledge='upper_bound' needs eval_history and eval_target (the true histories)")
            return true_history_knowledge(cold_items, eval_history, eval_target, cfg.upper_bound_max_per_item, cfg.seed)
        warm_items = np.asarray(warm_items, dtype=np.int64)
        warm_emb = np.asarray(warm_item_embeddings)
        if len(warm_items) != len(warm_emb):
            raise ValueError(f"warm_items ({len(warm_items)}) and warm_item_embeddings ({len(warm_emb)}) differ")
        if len(cold_items) != len(cold_item_embeddings):
            raise ValueError(
                f"cold_items ({len(cold_items)}) and cold_item_embeddings ({len(cold_item_embeddings)}) differ"
            )
        if cfg.neighbour_pool == "train_targets":
            keep = np.isin(warm_items, np.asarray(train_target))
            warm_items, warm_emb = warm_items[keep], warm_emb[keep]
        index, sims = nearest_neighbours(
            cold_item_embeddings, warm_emb, cfg.num_neighbours, cold_items, warm_items, cfg.neighbour_batch_size
        )
        neighbours = np.where(index >= 0, warm_items[np.clip(index, 0, None)] if len(warm_items) else -1, -1)
        knowledge = pseudo_knowledge(
            cold_items, neighbours, train_history, train_target, cfg.histories_per_item, cfg.seed,
            policy=cfg.pseudo_policy,
        )
        knowledge.stats["neighbour_pool_size"] = len(warm_items)
        valid = np.isfinite(sims)
        knowledge.stats["mean_neighbour_cosine"] = float(sims[valid].mean()) if valid.any() else float("nan")
        return knowledge

    # ----------------------------------------------------------------- main entry
    def edit(
        self,
        model: nn.Module,
        sid_table: SemanticIdTable,
        cold_items: np.ndarray,
        cold_item_embeddings: np.ndarray,
        warm_item_embeddings: np.ndarray,
        train_history: np.ndarray,
        train_target: np.ndarray,
        *,
        warm_items: np.ndarray,
        eval_history: np.ndarray | None = None,
        eval_target: np.ndarray | None = None,
        history_encoder: HistoryEncoder | None = None,
        knowledge: EditKnowledge | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> tuple[PositionEdits, EditReport]:
        """Edit set injecting ``cold_items`` (which must already have SIDs in ``sid_table``).

        ``warm_items`` align with ``warm_item_embeddings``; ``train_history`` (n, N, left-padded -1) /
        ``train_target`` (n,) are the training instances (neighbour occurrences, C̄0, probe negatives).
        ``history_encoder(history) -> (input_ids, attention_mask)`` must match the recommender's encoder input
        (default ``SidHistoryEncoder``). A prebuilt ``knowledge`` skips the knowledge phase.
        """
        cfg = self.config
        say = progress or (lambda msg: None)
        device = model_device(model)
        timers = _Timers(device)
        encoder = history_encoder or SidHistoryEncoder(sid_table, cfg.max_history_items)
        train_history = np.asarray(train_history, dtype=np.int64)
        train_target = np.asarray(train_target, dtype=np.int64)
        n_layers = num_decoder_layers(model)

        with timers("knowledge"):
            if knowledge is None:
                knowledge = self.build_knowledge(
                    cold_items, cold_item_embeddings, warm_items, warm_item_embeddings,
                    train_history, train_target, eval_history, eval_target,
                )
            request_tokens = knowledge.sid_tokens(sid_table)
            train_tokens = sid_table.tokens_of(train_target)
        say(f"knowledge: {len(knowledge)} histories for {len(knowledge.cold_items)} cold items")
        if len(knowledge) == 0:
            raise ValueError("no edit requests: no cold item has a pseudo history (check neighbours/train data)")

        positions = list(range(sid_table.sid_length)) if cfg.positions is None else sorted(cfg.positions)
        if not cfg.position_wise:
            positions_probe = [0]
        else:
            positions_probe = positions

        # ------------------------------------------------------------- layer location
        accuracy = None
        # Encoder outputs of every request, kept from the probe pass when it saw all of them (then the value
        # loop does not encode again); bounded by probe_max_per_class rows.
        encoded: list | None = None
        if cfg.layer_mode in ("probe", "worst"):
            req_rows = _subsample(len(knowledge), cfg.probe_max_per_class, cfg.seed)
            # The probe balances classes, so more negatives than positives would never be used.
            train_rows = _subsample(len(train_target), len(req_rows), cfg.seed + 1)
            sites = [(layer, p) for p in positions_probe for layer in range(n_layers)]
            encoded = [] if len(req_rows) == len(knowledge) else None
            # One pass for all sites: the encoder (the bulk of the cost) runs once per sampled row.
            with timers("keys"):
                pos_keys = collect_keys(
                    model, encoder, knowledge.histories[req_rows], request_tokens[req_rows], sites,
                    cfg.key_batch_size, encoded=encoded,
                )
                neg_keys = collect_keys(
                    model, encoder, train_history[train_rows], train_tokens[train_rows], sites, cfg.key_batch_size
                )
            with timers("probe"):
                accuracy = probe_accuracy_matrix(
                    pos_keys, neg_keys, n_layers, positions_probe, cfg.seed, cfg.probe_train_frac
                )
            del pos_keys, neg_keys
        layers = choose_layers(cfg.layer_mode, positions_probe, n_layers, accuracy, cfg.fixed_layers, cfg.seed)
        say(f"layers: {layers}")
        if not cfg.position_wise and len(positions) > 1 and layers[0] == n_layers - 1:
            # Later steps read step 0 only through self-attention K/V, which the top block computes from its
            # input, before the FFN: a δ there cannot move positions > 0.
            warnings.warn(
                f"object-wise edit at the top decoder layer {layers[0]}: its δ cannot move SID positions > 0, so "
                "only requests the model already gets right there can succeed; choose a lower layer "
                "(layer_mode='fixed', fixed_layers=[l])",
                stacklevel=2,
            )

        # ------------------------------------------------------------- keys + values, streamed
        vcfg = self.config.value_config()
        d_model, d_ff = model.config.d_model, model.config.d_ff
        stats = {p: KeyResidualStats(d_ff, d_model, device) for p in layers}
        n_req = {p: 0 for p in layers}
        n_ok = {p: 0 for p in layers}
        sid_len = request_tokens.shape[1]
        if encoded is None:
            encoded = [(slice(s, s + cfg.value_batch_size), None, None)
                       for s in range(0, len(knowledge), cfg.value_batch_size)]
        with eval_mode(model), torch.inference_mode(False):
            for rows, attention_mask, enc_hidden in encoded:
                with timers("keys"), torch.no_grad():
                    if enc_hidden is None:  # not kept from the probe pass
                        input_ids, attention_mask = (t.to(device) for t in encoder(knowledge.histories[rows]))
                        enc_hidden = encode(model, input_ids, attention_mask)
                    tokens = torch.as_tensor(request_tokens[rows], dtype=torch.long, device=device)
                    full_dec = decoder_inputs(tokens, sid_len)
                    # Object-wise edits key on step 0 (subject = the whole history).
                    key_sites = [(layers[p], p if cfg.position_wise else 0) for p in layers]
                    found = capture_wo(model, None, attention_mask, full_dec, key_sites, enc_hidden=enc_hidden)
                for p, layer in layers.items():
                    if cfg.position_wise:
                        dec, targets, loss_steps, edit_step = full_dec[:, : p + 1], tokens[:, p], [p], p
                    else:
                        dec, targets, loss_steps, edit_step = full_dec, tokens[:, positions], positions, 0
                    with timers("values"):
                        result = optimise_values(
                            model, enc_hidden, attention_mask, dec, targets, loss_steps, layer, edit_step, vcfg
                        )
                    with timers("solve"):
                        ok = result.success
                        keys = found[(layer, edit_step)][0]
                        stats[p].add(keys[ok], result.delta[ok])
                    n_req[p] += len(ok)
                    n_ok[p] += int(ok.sum())
                say(f"values: {min(rows.stop, len(knowledge))}/{len(knowledge)} histories")

        # ------------------------------------------------------------- C̄0 and the solve
        cov_sites = [(layer, p if cfg.position_wise else 0) for p, layer in layers.items() if n_ok[p] > 0]
        covs: dict = {}
        cov_info: dict = {"num_samples": 0, "cache_hits": [], "computed": []}
        if cov_sites:
            with timers("covariance"):
                covs, cov_info = preserved_covariances(
                    model, encoder, train_history, train_tokens, cov_sites, cfg.cov_max_samples, cfg.seed,
                    cfg.cov_batch_size, cfg.cov_cache_dir,
                    checkpoint_hash=model_fingerprint(model) if cfg.cov_cache_dir is not None else None,
                )
        deltas = {}
        with timers("solve"):
            for p, layer in layers.items():
                if n_ok[p] == 0:
                    continue
                site = (layer, p if cfg.position_wise else 0)
                dw = solve_update(stats[p].rkt, stats[p].kkt, covs[site], cfg.cov_lambda)
                deltas[p] = (layer, dw.float().cpu())
        del stats

        one_one = cfg.one_one and cfg.position_wise
        edits = PositionEdits(
            deltas,
            cov_lambda=cfg.cov_lambda,
            cold_items=knowledge.cold_items,
            sid_table_hash=sid_table.content_hash(),
            probe_accuracy=accuracy,
            one_one=one_one,
            meta={
                "knowledge": knowledge.source,
                "leaks_eval": knowledge.leaks_eval,
                "position_wise": cfg.position_wise,
                "layer_mode": cfg.layer_mode,
                "value_profile": cfg.value_profile,
                "value_beta": cfg.value_beta,
                "histories_per_item": cfg.histories_per_item,
                "seed": cfg.seed,
            },
        )
        diagnostics: dict = {}
        if cfg.diagnostic_rows > 0 and edits.one_one and edits.positions:
            with timers("diagnostics"):
                req = _subsample(len(knowledge), cfg.diagnostic_rows, cfg.seed + 7)
                tr = _subsample(len(train_target), cfg.diagnostic_rows, cfg.seed + 8)
                for name, hist, items in (("requests", knowledge.histories[req], knowledge.items[req]),
                                          ("train", train_history[tr], train_target[tr])):
                    for tag, e in (("unedited", None), ("edited", edits)):
                        rates = top1_rates(model, encoder, hist, items, sid_table, e, cfg.key_batch_size)
                        diagnostics[f"{name}/{tag}"] = {int(p): float(r) for p, r in enumerate(rates)}
        report = EditReport(
            times=dict(timers.times),
            layers={int(p): int(layer) for p, layer in layers.items()},
            num_requests=n_req,
            num_success=n_ok,
            success_rate={p: (n_ok[p] / n_req[p] if n_req[p] else 0.0) for p in layers},
            probe_accuracy=None if accuracy is None else accuracy.tolist(),
            probe_positions=list(positions_probe),
            knowledge=dict(knowledge.stats),
            leaks_eval=knowledge.leaks_eval,
            covariance=cov_info,
            config=asdict(cfg),
            diagnostics=diagnostics,
        )
        return edits, report
