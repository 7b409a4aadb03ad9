"""The device check's CPU smoke run exercises every code path it times on a GPU (CI runs it)."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_smoke_writes_every_key(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.chdir(tmp_path)
    import device_check

    out = tmp_path / "check.json"
    device_check.main(["--smoke", "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("seconds/fit", "seconds/decoding", "seconds/total", "throughput/train/samples_per_second",
                "throughput/train/tokens_per_second", "mfu", "decoding/speedup", "decoding/topk_identical",
                "edit/seconds"):
        assert key in res, key
    assert res["decoding/topk_identical"] == 1.0 and res["decoding/speedup"] > 0
    assert res["edit/seconds"] > 0 and res["config/smoke"] is True


def test_flops_count_matches_a_hand_count():
    sys.path.insert(0, str(REPO / "bench"))
    from throughput import tiger_forward_flops

    from genrec.models.tiger import TigerConfig

    cfg = TigerConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=2, num_heads=1, d_kv=2, d_ff=4,
                      feed_forward_proj="relu")
    # enc: 3 tokens × (4·2·2 + 2·2·4) + 2·3·3·2 = 3·32 + 36 = 132; dec self: 1·16 + 2·1·1·2 = 20;
    # cross: 1·8 + 3·8 + 2·1·3·2 = 44; dec ffn 16; head 1·2·10 = 20 → 232 MACs = 464 FLOPs
    assert tiger_forward_flops(cfg, enc_tokens=3, dec_tokens=1, vocab=10) == 464.0


def test_diversity_bench_chooses_mmr_lambda_on_validation_not_test(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from diversity import METRICS, best_curve

    res = {}

    def row(name, split, recall, ild):
        for m in METRICS:
            res[f"{name}/{split}/{m}@10/overall"] = {"recall": recall, "ild": ild}.get(m, 0.5)

    row("beam", "val", 0.10, 0.20)
    row("beam", "test", 0.10, 0.20)
    # λ 0.5: most diverse on validation within 5% recall; on test λ 0.3 would look better but must not be chosen
    row("mmr_lambda0.8", "val", 0.099, 0.25)
    row("mmr_lambda0.8", "test", 0.080, 0.25)
    row("mmr_lambda0.5", "val", 0.096, 0.30)
    row("mmr_lambda0.5", "test", 0.090, 0.28)
    row("mmr_lambda0.3", "val", 0.080, 0.40)  # breaks the 5% recall limit on validation
    row("mmr_lambda0.3", "test", 0.100, 0.40)
    best_curve(res, [0.8, 0.5, 0.3])
    assert res["best_mmr/lambda"] == 0.5
    assert res["best_mmr/test/recall@10/overall"] == 0.090
    assert res["best_mmr/test/ild_gain"] == pytest.approx(0.28 / 0.20 - 1)
    assert res["best_mmr/test/recall_ratio"] == pytest.approx(0.9)


def test_continual_bench_scores_both_methods_on_the_rows_whose_sid_the_method_changed(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import numpy as np
    from continual import changed_rows_comparison, instance_hits

    from runners.continual import save_per_instance

    def run(name, recall, changed=None, ids=(3, 0, 2, 1)):
        d = tmp_path / name / "period_1"
        d.mkdir(parents=True)
        table = {"instance_id": np.array(ids), "recall@10": np.array(recall, float)}
        if changed is not None:
            table["mask/sid_changed"] = np.array(changed)
        save_per_instance(d / "per_instance.npz", table)
        return d.parent

    # rows in instance-id order: dact hits 1,0,0,1 on ids 0..3, its changed SIDs are ids 0 and 1
    dact = run("dact", [1, 1, 0, 0], changed=[False, True, False, True])
    frozen = run("frozen", [1, 1, 0, 0], ids=(0, 1, 2, 3))  # frozen hits 1,1,0,0; no SID changes of its own
    runs = {"dact": {0: (dact, {})}, "frozen": {0: (frozen, {})}}
    hits = {m: {"hr@10": np.stack([instance_hits(d, [1], "recall@10")])} for m, d in (("dact", dact), ("frozen", frozen))}
    res = changed_rows_comparison("dact", "frozen", runs, hits, [1])
    key = "dact_vs_frozen/hr@10/sid_changed_rows"
    assert res[f"{key}/count"] == 2 and res[f"{key}/dact"] == 0.5 and res[f"{key}/frozen"] == 1.0
    assert res[f"{key}/diff"] == -0.5
    assert changed_rows_comparison("frozen", "dact", runs, hits, [1]) == {}  # frozen records no changed rows


def test_memgen_seed_cache_reuses_a_seed_and_refuses_other_settings(tmp_path, monkeypatch):
    import argparse

    import numpy as np

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import memgen

    calls = []

    def fake_run(a):
        calls.append(a.seed)
        return {"x": float(a.seed)}, {"labels": [{"label": "memorization"}], "per_case_ndcg": {"tiger": np.arange(3.0)}}

    monkeypatch.setattr(memgen, "run_one", fake_run)
    args = argparse.Namespace(data=str(tmp_path), seed=0, seeds=[0, 1], out=None, seed_cache=str(tmp_path / "c"),
                              epochs=3)
    first = memgen.cached_run(args, 1)
    again = memgen.cached_run(args, 1)
    assert calls == [1] and again[0] == first[0] == {"x": 1.0} and again[1]["labels"] == first[1]["labels"]
    np.testing.assert_array_equal(again[1]["per_case_ndcg"]["tiger"], np.arange(3.0))
    with pytest.raises(SystemExit, match="epochs"):
        memgen.cached_run(argparse.Namespace(**{**vars(args), "epochs": 4}), 1)
