"""Period-aware next-item datamodule: batches of item indices (model-agnostic; TIGER maps them to SID tokens)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from genrec.data.config import DataConfig
from genrec.data.pipeline import PreparedDataset, load_or_prepare
from genrec.data.splits import TEST, TRAIN, VALID, Instances
from genrec.errors import ConfigError, DataError

SUBSETS = ("overall", "warm", "cold", "new")


def subset_masks(inst: Instances, train_targets: np.ndarray) -> np.ndarray:
    """(n, 4) bool: overall, warm, cold (target never a training target of this model), new (new in its period)."""
    cold = ~np.isin(inst.target, train_targets)
    return np.stack([np.ones(len(inst), bool), ~cold, cold, inst.new_item.astype(bool)], axis=1)


class InstanceDataset(Dataset):
    def __init__(self, inst: Instances, masks: np.ndarray):
        self.history = torch.from_numpy(inst.history.astype(np.int64))
        self.target = torch.from_numpy(inst.target.astype(np.int64))
        self.user = torch.from_numpy(inst.user.astype(np.int64))
        self.index = torch.arange(len(inst))
        self.subsets = torch.from_numpy(masks)

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i):
        return {"history": self.history[i], "target": self.target[i], "user": self.user[i],
                "index": self.index[i], "subsets": self.subsets[i]}


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
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        num_workers: DataLoader workers.
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
        self.subset_names = SUBSETS

    # the dataset is needed at model construction time (catalogue size, SIDs), so it is loadable eagerly
    def load(self) -> PreparedDataset:
        if self.dataset is None:
            self.dataset = load_or_prepare(self.data, self.prepared_dir, self.overwrite_prepared)
            n_periods = self.dataset.num_periods
            bad = [p for p in self.train_periods + [self.eval_period] if not 0 <= p < n_periods]
            if bad:
                raise ConfigError(f"data periods {bad} do not exist: the dataset has periods 0..{n_periods - 1} "
                                  "(train_periods / eval_period / seen_periods)")
        return self.dataset

    def setup(self, stage: str | None = None) -> None:
        self.load()

    @property
    def num_items(self) -> int:
        return self.load().num_items

    def split(self, split: int, periods: list[int]) -> Instances:
        inst = self.load().instances
        return inst.select((inst.split == split) & np.isin(inst.period, periods))

    def train_instances(self) -> Instances:
        return self.split(TRAIN, self.train_periods)

    def train_targets(self) -> np.ndarray:
        """Items the model was trained to predict (the warm set)."""
        return np.unique(self.split(TRAIN, self.seen_periods).target)

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
        return InstanceDataset(inst, subset_masks(inst, self.train_targets()))

    def train_dataloader(self):
        inst = self.train_instances()
        if len(inst) == 0:
            raise DataError(f"no train instances in periods {self.train_periods}")
        ds = InstanceDataset(inst, subset_masks(inst, self.train_targets()))
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers, drop_last=False)

    def val_dataloader(self):
        return DataLoader(self._eval_dataset(VALID), batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self):
        return DataLoader(self._eval_dataset(TEST), batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def predict_dataloader(self):
        return self.test_dataloader()
