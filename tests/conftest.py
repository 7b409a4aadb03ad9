import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

# pytest-xdist runs one worker per core: one intra-op thread each avoids oversubscription (10x slower otherwise)
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def real_data(name: str = "office_products_2018_d3") -> Path:
    path = SHARED_DATA / name
    if not (path / "interactions.csv").exists():
        pytest.skip(f"real data folder {path} not present (it ships beside the project checkout, not with it)")
    return path


@pytest.fixture
def office_root() -> Path:
    return real_data("office_products_2018_d3")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A 1-epoch tiny TIGER checkpoint on the synthetic catalogue: (root, ckpt path, the `genrec edit` data args
    that reproduce its data)."""
    import lightning as L

    from datamodules.sequences import SequenceDataModule
    from genrec.data.config import DataConfig
    from genrec.data.synthetic import SyntheticConfig
    from genrec.models.tiger import TigerConfig
    from lightning_modules.tiger import TigerModule

    root = tmp_path_factory.mktemp("tiny_ckpt")
    data = DataConfig(synthetic=SyntheticConfig(num_users=120, num_items=70), period_fractions=[0.6, 0.2, 0.2],
                      cache_dir=str(root / "cache"))
    L.seed_everything(0)
    dm = SequenceDataModule(data, train_periods=[0], eval_period=1, batch_size=64)
    module = TigerModule(TigerConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, d_kv=8,
                                     d_ff=32), num_levels=2, codebook_size=8, suffix_size=32, rkmeans_iters=3,
                         ks=(5,), num_beams=5)
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
              limit_val_batches=0, default_root_dir=str(root)).fit(module, datamodule=dm)
    path = root / "tiger.ckpt"
    module.trainer.save_checkpoint(path)
    args = ["--data.synthetic.num_users", "120", "--data.synthetic.num_items", "70", "--data.period_fractions",
            "[0.6, 0.2, 0.2]", "--data.cache_dir", str(root / "cache"), "--accelerator", "cpu"]
    return root, path, args
