"""Epoch selection on validation (continual runner, edit-bench baselines): the chosen epoch is the best validation
score's, its weights are the ones loaded, and a fine-tune that never beats its start keeps the start."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules._selection import fit_selecting_on_val, monitor_key


class Scripted(L.LightningModule):
    """One weight that grows by 1 per epoch; validation reports a scripted score per epoch."""

    def __init__(self, scores, start_score=0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.scores, self.start_score = list(scores), start_score

    def training_step(self, batch, batch_idx):
        return -self.w  # SGD lr 1 on one batch: w += 1 each epoch

    def validation_step(self, batch, batch_idx):
        self.log("val/recall@10/overall", self.scores[self.current_epoch])

    def evaluate_loader(self, loader, prefix="val"):
        return {"val/recall@10/overall": self.start_score}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def run(module, tmp_path, epochs, from_scratch, every=1):
    data = DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)

    def make_trainer(**kw):
        return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path), **kw)

    return fit_selecting_on_val(make_trainer, module, tmp_path / "select", epochs=epochs, from_scratch=from_scratch,
                                monitor=monitor_key((5, 10)), val_loader=data, train_loader=data, every=every)


def test_from_scratch_keeps_the_best_validation_epoch(tmp_path):
    module = Scripted([0.1, 0.5, 0.3, 0.2])
    assert run(module, tmp_path, 4, from_scratch=True) == 2
    assert module.w.item() == pytest.approx(2.0)  # the weights after epoch 2, not the last epoch's 4
    assert not (tmp_path / "select").exists()


def test_a_fine_tune_that_never_beats_its_start_keeps_the_start(tmp_path):
    module = Scripted([0.1, 0.2, 0.3], start_score=0.4)
    assert run(module, tmp_path, 3, from_scratch=False) == 0
    assert module.w.item() == 0.0


def test_a_fine_tune_that_improves_keeps_its_best_epoch(tmp_path):
    module = Scripted([0.1, 0.6, 0.5], start_score=0.4)
    assert run(module, tmp_path, 3, from_scratch=False) == 2
    assert module.w.item() == pytest.approx(2.0)


def test_the_last_epoch_is_scored_even_between_validation_intervals(tmp_path):
    # validation after epochs 2 and 4 of 5 (scores[1], scores[3]); the last epoch is scored after fit (scores[5])
    module = Scripted([0.0, 0.3, 0.0, 0.4, 0.0, 0.9])
    assert run(module, tmp_path, 5, from_scratch=True, every=2) == 5
    assert module.w.item() == pytest.approx(5.0)
    module = Scripted([0.0, 0.3, 0.0, 0.4, 0.0, 0.1])  # a worse last epoch: the best validated one stays
    assert run(module, tmp_path, 5, from_scratch=True, every=2) == 4
    assert module.w.item() == pytest.approx(4.0)


def test_monitor_uses_k10_or_the_largest_cutoff():
    assert monitor_key((5, 10, 20)) == "val/recall@10/overall"
    assert monitor_key((5, 20)) == "val/recall@20/overall"
