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
