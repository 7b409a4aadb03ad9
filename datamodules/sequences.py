"""Period-aware next-item datamodule: batches of item indices (model-agnostic; TIGER maps them to SID tokens)."""

from __future__ import annotations

import math
import os

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from genrec.data.config import DataConfig
from genrec.data.pipeline import PreparedDataset, load_or_prepare
from genrec.data.splits import TEST, TRAIN, VALID, Instances
from genrec.errors import ConfigError, DataError
from genrec.metrics.ranking import SUBSETS


def memgen_label_names() -> tuple[str, ...]:
    from genrec.analysis import LABELS

    return tuple(LABELS)


def subset_masks(inst: Instances, train_targets: np.ndarray) -> np.ndarray:
    """(n, len(SUBSETS)) bool in ``SUBSETS`` order: overall, warm, cold (target never a training target of this
    model), new (new in its period)."""
    out = np.ones((len(inst), len(SUBSETS)), dtype=bool)
    col = {name: i for i, name in enumerate(SUBSETS)}
    at = 0
    for part in inst.chunks():  # bounded temporaries over millions of instances
        rows = slice(at, at + len(part))
        warm = np.isin(part.target, train_targets)
        out[rows, col["warm"]], out[rows, col["cold"]], out[rows, col["new"]] = warm, ~warm, part.new_item
        at = rows.stop
    return out


class InstanceDataset(Dataset):
    """Instances as batches: ``__getitems__`` gathers a whole batch (histories included) in one vectorised step,
    so a split's histories are never materialised. ``index`` is the position in the split (unique: DDP
    de-duplication); any sampler works (Lightning's DistributedSampler under DDP)."""

    def __init__(self, inst: Instances, masks: np.ndarray):
        self.inst = Instances(inst.columns, inst.sequences, inst.index, inst.folder)  # without the fields read so far
        self.subsets = torch.from_numpy(np.ascontiguousarray(masks))

    def __len__(self) -> int:
        return len(self.inst)

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        weight = (idx >= 0).astype(np.float32)  # GlobalBatchSampler's padding rows come as -(row + 1)
        idx = np.where(idx >= 0, idx, -idx - 1)
        part = self.inst.batch(idx)
        return {"history": torch.from_numpy(part["history"]), "target": torch.from_numpy(part["target"]),
                "user": torch.from_numpy(part["user"]), "index": torch.from_numpy(idx),
                "subsets": self.subsets[torch.from_numpy(idx)], "weight": torch.from_numpy(weight)}

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class InstanceSampler(DistributedSampler):
    """torch's DistributedSampler (same order, same padding), without its Python list of every index: a tensor
    permutation, 4 bytes an instance. Being a DistributedSampler, Lightning keeps it instead of injecting one."""

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g, dtype=_index_dtype(n))  # the same permutation as int64
        else:
            order = torch.arange(n, dtype=_index_dtype(n))
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > n:
            order = torch.cat([order, order.repeat(math.ceil((self.total_size - n) / n))[: self.total_size - n]])
        return iter(order[self.rank : self.total_size : self.num_replicas].numpy())


class GlobalBatchSampler(DistributedSampler):
    """The training order of one process and of N processes alike: one permutation (seed + epoch, as
    DistributedSampler) cut into global batches of ``global_batch`` rows; rank r takes rows r, r+N, … of each global
    batch, so the N local batches of a step together are exactly the one-process batch. A global batch whose size
    is not a multiple of N is padded with rows encoded as -(row + 1) (weight 0 in ``InstanceDataset``), so every
    rank runs the same number of steps. Iterate it with ``batch_size=local_batch``. Being a DistributedSampler,
    Lightning keeps it instead of injecting one."""

    def __init__(self, dataset, global_batch: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.global_batch = global_batch
        self.local_batch = math.ceil(global_batch / num_replicas)

    def __len__(self) -> int:
        n, b = len(self.dataset), self.global_batch
        tail = n % b
        return (n // b) * self.local_batch + math.ceil(tail / self.num_replicas)

    def __iter__(self):
        n, b, w = len(self.dataset), self.global_batch, self.num_replicas
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g, dtype=_index_dtype(n)).numpy()
        else:
            order = np.arange(n, dtype=np.int64)
        full = (n // b) * b
        parts = [self._mine(order[:full].reshape(-1, b))] if full else []
        if n > full:
            parts.append(self._mine(order[full:][None]))
        return iter(np.concatenate(parts) if parts else np.zeros(0, np.int64))  # no Python list of every row

    def _mine(self, chunks: np.ndarray) -> np.ndarray:
        """(k, g) global batches → this rank's rows of each, padded to ceil(g / N), flattened."""
        k, g = chunks.shape
        m = math.ceil(g / self.num_replicas)
        pad = np.repeat(-(chunks[:, :1] + 1), m * self.num_replicas - g, axis=1)
        grid = np.concatenate([chunks, pad], axis=1).reshape(k, m, self.num_replicas)
        return grid[:, :, self.rank].reshape(-1)


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _positions(inst: Instances) -> np.ndarray:
    return np.arange(len(inst)) if inst.index is None else np.asarray(inst.index, dtype=np.int64)


def collate_batch(batch):
    """The DataLoader's collate: a batch from ``__getitems__`` is ready; a list of single items is stacked."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class SequenceDataModule(L.LightningDataModule):
    """Train on the train instances of ``train_periods``; validate/test on ``eval_period``'s valid/test instances.

    Args:
        data: Data source and protocol (see ``genrec prepare --help``).
        prepared_dir: Prepared dataset folder (a cache): loaded if it was prepared from the same data settings and
            unchanged source files, prepared and written there if absent; any other content is an error.
        overwrite_prepared: Re-prepare ``prepared_dir`` even if it holds a prepared folder of ours.
        train_periods: Periods whose train instances are trained on (default: [0]).
        eval_period: Period whose valid/test instances are evaluated (default: the last train period).
        seen_periods: Periods whose train targets the model has learned (warm/cold reference; default:
            ``train_periods``). A model fine-tuned period by period has seen 0..t although it trains on t.
        batch_size: Global training batch: under DDP the N processes split each batch (``GlobalBatchSampler``) and
            the losses average over the whole of it, so N processes take the one-process optimiser steps (to
            train with N times the batch, multiply it by N).
        eval_batch_size: Validation/test batch size.
        num_workers: DataLoader workers (batches are gathered in one vectorised step, so 0–4 is plenty; memory is
            shared with the workers through the memory-mapped prepared folder).
        memgen_subsets: Also evaluate on the MemGen labels (memorization, generalization, the logic-with-hop labels,
            uncategorized; ``genrec.analysis``) of each case against the relations of the ``seen_periods``' training
            instances: every model then logs ``test/ndcg@10/memorization`` … with counts.
    """

    def __init__(
        self,
        data: DataConfig | None = None,
        prepared_dir: str | None = None,
        overwrite_prepared: bool = False,
        train_periods: list[int] | None = None,
        eval_period: int | None = None,
        seen_periods: list[int] | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        memgen_subsets: bool = False,
    ):
        super().__init__()
        self.data = data or DataConfig()
        self.prepared_dir = prepared_dir
        self.overwrite_prepared = overwrite_prepared
        self.train_periods = list(train_periods) if train_periods is not None else [0]
        self.eval_period = eval_period if eval_period is not None else max(self.train_periods)
        self.seen_periods = list(seen_periods) if seen_periods is not None else self.train_periods
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.dataset: PreparedDataset | None = None
        self.memgen_subsets = memgen_subsets
        self.subset_names = SUBSETS + (memgen_label_names() if memgen_subsets else ())
        self._relations = None
        self.replay: Instances | None = None  # extra training rows (e.g. earlier rows of items whose SID changed)

    # the dataset is needed at model construction time (catalogue size, SIDs), so it is loadable eagerly
    def load(self) -> PreparedDataset:
        if self.dataset is None:
            self.dataset = load_or_prepare(self.data, self.prepared_dir, self.overwrite_prepared)
            n_periods = self.dataset.num_periods
            bad = [p for p in self.train_periods + [self.eval_period] + self.seen_periods if not 0 <= p < n_periods]
            if bad:
                raise ConfigError(f"data periods {bad} do not exist: the dataset has periods 0..{n_periods - 1} "
                                  "(train_periods / eval_period / seen_periods)")
        return self.dataset

    def prepare_data(self) -> None:
        # Lightning calls this on the first process of each node before setup: with a prepared folder, that process
        # prepares it and the other ranks (waiting on its lock) memory-map the result instead of preparing again.
        if self.prepared_dir:
            self.load()

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None and self.trainer is not None and self.prepared_dir:
            # prepare_data already (re)prepared the folder on the first process of the node: never again per rank
            self.overwrite_prepared = False
        self.load()

    @property
    def num_items(self) -> int:
        return self.load().num_items

    def split(self, split: int, periods: list[int]) -> Instances:
        """A selection of the (memory-mapped) instances: only the columns a consumer reads are gathered."""
        return self.load().instances.where(split=split, period=list(periods))

    def train_instances(self) -> Instances:
        """The train instances of ``train_periods``, plus ``replay`` rows when set (in time order, each once)."""
        inst = self.split(TRAIN, self.train_periods)
        if self.replay is None or len(self.replay) == 0:
            return inst
        rows = np.union1d(_positions(inst), _positions(self.replay))
        return Instances(inst.columns, inst.sequences, rows.astype(np.int64), inst.folder)

    def train_targets(self) -> np.ndarray:
        """Items the model was trained to predict (the warm set), sorted."""
        seen = np.zeros(self.num_items, dtype=bool)
        for part in self.split(TRAIN, self.seen_periods).chunks():
            seen[part.target] = True
        return np.flatnonzero(seen)

    def tokenizer_periods(self) -> list[int]:
        """Periods whose items a tokenizer fitted for this model may see (train ∪ seen; never the future)."""
        return sorted(set(self.train_periods) | set(self.seen_periods))

    def eval_instances(self, split: int) -> Instances:
        return self.split(split, [self.eval_period])

    def catalogue(self) -> np.ndarray:
        """Items known by the end of the evaluation period (the decoder's valid SIDs)."""
        return self.load().catalogue_until(self.eval_period)

    def _eval_dataset(self, split: int) -> InstanceDataset:
        inst = self.eval_instances(split)
        return InstanceDataset(inst, self.eval_masks(inst))

    def eval_masks(self, inst: Instances) -> np.ndarray:
        """(n, len(subset_names)) bool: overall / warm / cold / new, then the MemGen labels when enabled."""
        masks = subset_masks(inst, self.train_targets())
        if not self.memgen_subsets:
            return masks
        from genrec.analysis import ItemRelations, label_instances

        if self._relations is None:  # the relations of what this model was trained on
            train = self.split(TRAIN, self.seen_periods)
            self._relations = ItemRelations.from_chunks(train.iter_histories(), self.num_items)
        return np.concatenate([masks, label_instances(self._relations, inst.history, inst.target)], axis=1)

    def _loader_kwargs(self) -> dict:
        """Pinned host memory when a GPU trains (faster copies); workers stay alive between epochs."""
        return {"pin_memory": torch.cuda.is_available(), "persistent_workers": self.num_workers > 0}

    def train_dataloader(self):
        inst = self.train_instances()
        if len(inst) == 0:
            raise DataError(f"no train instances in periods {self.train_periods}")
        masks = subset_masks(inst, self.train_targets())  # training reads no subsets: label columns stay False
        masks = np.pad(masks, ((0, 0), (0, len(self.subset_names) - masks.shape[1])))
        ds = InstanceDataset(inst, masks)
        world, rank = _world()
        # the same global batches under any number of processes (seeded like Lightning's injected sampler); with
        # the losses' global mean (lightning_modules._ddp) N processes take the one-process optimiser steps
        sampler = GlobalBatchSampler(ds, self.batch_size, num_replicas=world, rank=rank,
                                     seed=int(os.getenv("PL_GLOBAL_SEED", "0")))
        return DataLoader(ds, batch_size=sampler.local_batch, sampler=sampler, num_workers=self.num_workers,
                          **self._loader_kwargs(), drop_last=False, collate_fn=collate_batch)

    def val_dataloader(self):
        return DataLoader(self._eval_dataset(VALID), batch_size=self.eval_batch_size, num_workers=self.num_workers, **self._loader_kwargs(),
                          collate_fn=collate_batch)

    def test_dataloader(self):
        return DataLoader(self._eval_dataset(TEST), batch_size=self.eval_batch_size, num_workers=self.num_workers, **self._loader_kwargs(),
                          collate_fn=collate_batch)

    def predict_dataloader(self):
        return self.test_dataloader()
