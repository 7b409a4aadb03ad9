"""The cold-start arena in TigerModule: an optional dense scorer (joint or post hoc), the decoding modes and the
diversity metrics. Kept apart so TigerModule reads as the plain TIGER it is by default."""

from __future__ import annotations

import numpy as np
import torch

from genrec.decoding.modes import DecodeContext, DecodingConfig
from genrec.metrics.diversity import DiversityMetrics, item_popularity
from genrec.metrics.ranking import SUBSETS
from genrec.models.dense import DenseScorer, DenseScorerConfig, encoder_states


class ArenaMixin:
    """Needs ``self.t5``, ``self.item_tokens``, ``self.hparams`` (``dense``, ``dense_loss_weight``, ``dense_train``,
    ``text_dim``, ``decoding``) and ``self.ks``."""

    def init_arena(self) -> None:
        hp = self.hparams
        self.decoding = DecodingConfig(**hp.decoding) if hp.decoding else DecodingConfig()
        self.dense: DenseScorer | None = None
        if hp.dense is not None and hp.text_dim:
            self.dense = DenseScorer(DenseScorerConfig(**hp.dense), self.cfg.d_model, torch.zeros(1, hp.text_dim))
        if self.decoding.mode == "hybrid" and hp.dense is None:
            from genrec.errors import ConfigError

            raise ConfigError("model.decoding.mode hybrid needs model.dense (the dense scorer that re-ranks)")
        self.register_buffer("text_embeddings", torch.zeros(0, 0), persistent=False)
        self.register_buffer("inject_items", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("catalogue_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        self._item_vectors: torch.Tensor | None = None
        self.val_diversity = self.test_diversity = None

    @property
    def needs_text(self) -> bool:
        return self.hparams.dense is not None or self.decoding.needs_text

    # ------------------------------------------------------------------ data the arena needs
    def set_text_embeddings(self, emb) -> None:
        """Item text embeddings (row = item); builds the dense scorer on first use and records its input width."""
        emb = torch.as_tensor(np.asarray(emb), dtype=torch.float32, device=self.device)
        self.text_embeddings = emb
        if self.hparams.dense is not None:
            if self.dense is None:
                self.hparams["text_dim"] = int(emb.shape[1])  # so a checkpoint rebuilds the same heads
                self.dense = DenseScorer(DenseScorerConfig(**self.hparams.dense), self.cfg.d_model, emb).to(self.device)
            else:
                self.dense.set_text_embeddings(emb)
        self._item_vectors = None

    def setup_arena(self, dm) -> None:
        """Text embeddings, the cold items to inject (catalogue items never a training target) and the diversity
        metrics, from a ``SequenceDataModule``."""
        if not self.needs_text or dm is None or not hasattr(dm, "load"):
            return
        from genrec.data.pipeline import item_embeddings

        ds = dm.load()
        self.set_text_embeddings(item_embeddings(ds, show_progress=False))
        catalogue = dm.catalogue()
        cold = np.setdiff1d(catalogue, dm.train_targets())
        self.inject_items = torch.as_tensor(cold, dtype=torch.long, device=self.device)
        mask = torch.zeros(ds.num_items, dtype=torch.bool, device=self.device)
        mask[torch.as_tensor(catalogue, device=self.device)] = True
        self.catalogue_mask = mask
        if self.decoding.diversity_metrics:
            first = self.item_tokens[:, 0].clone() if self.item_tokens.numel() else torch.zeros(ds.num_items)
            first = torch.where(first > 0, first, torch.full_like(first, -1))
            targets = torch.as_tensor(dm.train_instances().target, dtype=torch.long)
            pop = item_popularity(targets, ds.num_items)
            subsets = getattr(dm, "subset_names", SUBSETS)
            self.val_diversity, self.test_diversity = (
                DiversityMetrics(self.ks, subsets, self.text_embeddings.cpu(), first.cpu(), pop,
                                 catalogue_size=len(catalogue)).to(self.device) for _ in range(2))

    # ------------------------------------------------------------------ training
    def dense_or_joint_loss(self, input_ids, mask, labels, target) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(total loss, dense loss): TIGER's CE (+ w · dense loss when joint), or the dense loss alone post hoc."""
        hp = self.hparams
        if self.dense is None:
            return self.t5(input_ids=input_ids, attention_mask=mask, labels=labels).loss, None
        post_hoc = hp.dense_train == "post_hoc"
        states = encoder_states(self.t5, input_ids, mask)
        dense = self.dense.loss(self.dense.user_vectors(states.detach() if post_hoc else states, mask), target)
        if post_hoc:
            return dense, dense
        ce = self.t5(encoder_outputs=(states,), attention_mask=mask, labels=labels).loss
        return ce + hp.dense_loss_weight * dense, dense

    def arena_parameters(self):
        """What the optimiser trains: the dense scorer alone post hoc (TIGER stays frozen), else everything."""
        if self.dense is not None and self.hparams.dense_train == "post_hoc":
            return self.dense.parameters()
        return self.parameters()

    # ------------------------------------------------------------------ decoding
    def decode_context(self, input_ids, mask) -> DecodeContext | None:
        if self.decoding.mode == "beam" or self.decoding.mode == "diverse":
            return None
        ctx = DecodeContext(text_embeddings=self.text_embeddings, inject=self.inject_items,
                            catalogue_mask=self.catalogue_mask)
        if self.dense is not None:
            if self._item_vectors is None:  # the towers are frozen during evaluation: project the catalogue once
                self._item_vectors = self.dense.item_vectors()
            ctx.item_vectors = self._item_vectors
            ctx.user_vectors = self.dense.user_vectors(encoder_states(self.t5, input_ids, mask), mask)
            ctx.dense_scale = 1.0 / self.dense.temperature
        return ctx

    def reset_item_vectors(self) -> None:
        self._item_vectors = None
