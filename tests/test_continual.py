import json
import shutil

import numpy as np
import pytest

from genrec.data.config import DataConfig
from genrec.data.synthetic import SyntheticConfig
from genrec.errors import ConfigError
from genrec.models.sasrec import SASRecConfig
from genrec.models.tiger import TigerConfig
from genrec.tokenizers.dact import DACTConfig
from genrec.tokenizers.rqvae import RQVAEConfig
from runners.continual import METHODS, ContinualConfig, ContinualRunner, StageConfig


def tiny(run_dir, method="dact", last_period=2) -> tuple[DataConfig, ContinualConfig]:
    data = DataConfig(synthetic=SyntheticConfig(num_users=120, num_items=70), period_fractions=[0.6, 0.2, 0.2],
                      cache_dir=str(run_dir.parent / "cache"))
    cfg = ContinualConfig(
        run_dir=str(run_dir), method=method, last_period=last_period, logger="csv", accelerator="cpu",
        rqvae=RQVAEConfig(hidden_dims=(32,), latent_dim=8, num_levels=2, codebook_size=8, kmeans_iters=5),
        rqvae_stage=StageConfig(epochs=2, lr=1e-3, batch_size=64), rqvae_warmup_epochs=1,
        finetune_tokenizer_stage=StageConfig(epochs=1, lr=1e-4, batch_size=64),
        dact=DACTConfig(epochs=1, batch_size=64, warmup_epochs=0),
        sasrec=SASRecConfig(hidden=8, num_layers=1), sasrec_stage=StageConfig(epochs=1, batch_size=64),
        sasrec_finetune_stage=StageConfig(epochs=1, batch_size=64),
        tiger=TigerConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, d_kv=8, d_ff=32),
        tiger_stage=StageConfig(epochs=1, lr=3e-3, batch_size=64),
        tiger_finetune_stage=StageConfig(epochs=1, lr=1e-3, batch_size=64), tiger_warmup_steps=2,
        num_beams=8, ks=[5, 8], suffix_size=32,
    )
    return data, cfg


@pytest.mark.slow
def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    data, cfg = tiny(tmp_path / "full")
    full = ContinualRunner(data, cfg).run()
    assert sorted(full) == [0, 1, 2]
    for t in range(3):
        folder = tmp_path / "full" / f"period_{t}"
        for name in ("sid_table.parquet", "state.pt", "metrics.json", "sid_diff.json", "DONE"):
            assert (folder / name).exists()
    assert "test/recall@5/cold" in full[2] and "code_change/level1" in full[1]
    from runners.continual import load_per_instance

    table = load_per_instance(tmp_path / "full" / "period_1")  # SID status per test row, for cross-method tests
    status = np.stack([table[f"mask/sid_{s}"] for s in ("kept", "changed", "new")])
    assert (status.sum(0) == 1).all() and status.sum(1)[1] == full[1]["test/count/sid_changed"]
    # a run that "crashed" after period 1: remove period 2's folder, then re-run the same command
    shutil.copytree(tmp_path / "full", tmp_path / "crashed")
    shutil.rmtree(tmp_path / "crashed" / "period_2")
    data2, cfg2 = tiny(tmp_path / "crashed")
    resumed = ContinualRunner(data2, cfg2).run()
    for key, value in full[2].items():
        if not key.startswith("seconds/"):
            assert resumed[2][key] == pytest.approx(value, abs=1e-6), key
    summary = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    assert [row["period"] for row in summary] == [0, 1, 2]


@pytest.mark.parametrize("method", ["frozen", "reformer"])
def test_frozen_and_reformer_keep_old_codes(tmp_path, method):
    data, cfg = tiny(tmp_path / method, method=method, last_period=1)
    cfg.use_cf = False
    res = ContinualRunner(data, cfg).run()
    assert res[1]["code_change/overall"] == 0.0
    assert METHODS[method][0] == method


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="continual.method must be one of"):
        ContinualConfig(method="nope").resolved()


def test_resume_refuses_changed_settings_or_data_and_names_them(tmp_path):
    from genrec.errors import RunMismatchError

    data, cfg = tiny(tmp_path / "run", method="frozen", last_period=0)
    cfg.use_cf = False
    ContinualRunner(data, cfg).run()
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    changes = [("method", lambda d, c: setattr(c, "method", "ft_grm"), "method: 'frozen' → 'ft_grm'"),
               ("max_history", lambda d, c: setattr(d, "max_history", 5), "max_history: 20 → 5"),
               ("fractions", lambda d, c: setattr(d, "period_fractions", [0.5, 0.25, 0.25]), "period_fractions"),
               ("data seed", lambda d, c: setattr(d.synthetic, "seed", 3), "synthetic.seed: 0 → 3")]
    for _, change, message in changes:
        d, c = tiny(tmp_path / "run", method="frozen", last_period=1)
        c.use_cf = False
        change(d, c)
        with pytest.raises(RunMismatchError, match=message):
            ContinualRunner(d, c).run()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # nothing added or removed
    # same settings, more periods: resumes and extends; logger and last_period may differ
    d, c = tiny(tmp_path / "run", method="frozen", last_period=1)
    c.use_cf, c.logger = False, "none"
    assert sorted(ContinualRunner(d, c).run()) == [0, 1]


def test_each_method_and_seed_gets_its_own_default_run_dir(tmp_path):
    d, a = tiny(tmp_path / "x", method="frozen")
    _, b = tiny(tmp_path / "x", method="ft_grm")
    a.run_dir = b.run_dir = None
    dirs = {str(ContinualRunner(d, a).run_dir), str(ContinualRunner(d, b).run_dir)}
    b.seed = 1
    dirs.add(str(ContinualRunner(d, b).run_dir))
    prefixes = sorted(p.rsplit("-", 1)[0] for p in dirs)
    assert prefixes == ["runs/synthetic/continual/frozen-seed0", "runs/synthetic/continual/ft_grm-seed0",
                        "runs/synthetic/continual/ft_grm-seed1"]
    b.dact = DACTConfig(epochs=2)  # a swept setting: another folder; the same settings: the same folder
    assert str(ContinualRunner(d, b).run_dir) not in dirs
    b.dact = a.dact
    assert str(ContinualRunner(d, b).run_dir) in dirs


def test_a_failed_run_leaves_no_half_written_period(tmp_path, monkeypatch):
    data, cfg = tiny(tmp_path / "run", method="frozen", last_period=1)
    cfg.use_cf = False
    calls = {"n": 0}
    real = ContinualRunner.evaluate

    def crash_in_period_1(self, t, module, dm):
        if t == 1:
            raise RuntimeError("killed during period 1")
        return real(self, t, module, dm)

    monkeypatch.setattr(ContinualRunner, "evaluate", crash_in_period_1)
    with pytest.raises(RuntimeError):
        ContinualRunner(data, cfg).run()
    assert (tmp_path / "run" / "period_0" / "DONE").exists() and not (tmp_path / "run" / "period_1").exists()

    def crash_always(self, t, module, dm):
        calls["n"] += 1
        raise RuntimeError("killed in period 0")

    monkeypatch.setattr(ContinualRunner, "evaluate", crash_always)
    data, cfg = tiny(tmp_path / "fresh", method="frozen", last_period=1)
    cfg.use_cf = False
    with pytest.raises(RuntimeError):
        ContinualRunner(data, cfg).run()
    assert calls["n"] == 1 and not (tmp_path / "fresh").exists()  # a run that never finished a period: no folder


def test_wandb_run_is_resumed_and_finished_cleanly(tmp_path):
    data, cfg = tiny(tmp_path / "run", method="frozen", last_period=0)
    cfg.use_cf, cfg.logger = False, "wandb"
    ContinualRunner(data, cfg).run()
    data, cfg = tiny(tmp_path / "run", method="frozen", last_period=1)
    cfg.use_cf, cfg.logger = False, "wandb"
    ContinualRunner(data, cfg).run()
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["wandb_id"]
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one W&B run, resumed
    for r in runs:
        assert (r / "files" / "config.yaml").exists() and (r / "files" / "wandb-summary.json").exists()
        assert "HandleAbandonedError" not in (r / "logs" / "debug.log").read_text()
    summary = json.loads((runs[-1] / "files" / "wandb-summary.json").read_text())
    assert "mean/test/recall@5/overall" in summary
    # one versioned artifact per period (SID table, metrics, code changes), each naming the one it derives from
    logged = [a for r in runs for a in json.loads((r / "files" / "artifacts.json").read_text())]
    assert [a["alias"] for a in logged] == ["period0", "period1"] and logged[1]["derived_from"].endswith(":period0")
    records = sum((r / f"run-{run_id}.wandb").read_bytes().count(b"continual-period") for r in runs)
    assert records == 2


def test_dact_stage_runs_for_dact_epochs(tmp_path, monkeypatch):
    data, cfg = tiny(tmp_path / "run", method="dact", last_period=1)
    cfg.dact = DACTConfig(epochs=3, batch_size=64, warmup_epochs=0)
    cfg.finetune_tokenizer_stage = StageConfig(epochs=1, lr=1e-4, batch_size=64)
    stages = []
    real = ContinualRunner.trainer

    def spy(self, epochs, t, stage, **kw):
        stages.append((t, stage, epochs))
        return real(self, epochs, t, stage, **kw)

    monkeypatch.setattr(ContinualRunner, "trainer", spy)
    ContinualRunner(data, cfg).run()
    assert (1, "dact", 3) in stages and all(s != "tokenizer" for _, s, _ in stages)


def test_init_from_shares_period_zero_and_checks_its_settings(tmp_path):
    from genrec.errors import RunMismatchError

    data, cfg = tiny(tmp_path / "first", method="frozen", last_period=0)
    cfg.use_cf = False
    first = ContinualRunner(data, cfg).run()
    d2, c2 = tiny(tmp_path / "second", method="ft_grm", last_period=1)
    c2.use_cf, c2.init_from, c2.seed = False, str(tmp_path / "first"), 5
    second = ContinualRunner(d2, c2).run()
    assert second[0] == pytest.approx(first[0], nan_ok=True)  # period 0 copied, not retrained
    assert (tmp_path / "second" / "period_1" / "per_instance.npz").exists()
    d3, c3 = tiny(tmp_path / "third", method="ft_grm", last_period=1)
    c3.use_cf, c3.init_from = False, str(tmp_path / "first")
    c3.tiger_stage = StageConfig(epochs=2, lr=3e-3, batch_size=64)  # another period-0 recipe
    with pytest.raises(RunMismatchError, match="tiger_stage.epochs: 1 → 2"):
        ContinualRunner(d3, c3).run()
    assert not (tmp_path / "third").exists()


@pytest.mark.slow
def test_bf16_mixed_trains_every_stage(tmp_path):
    """SASRec, RQ-VAE, DACT and TIGER all train and evaluate under bf16 autocast (CPU supports it)."""
    data, cfg = tiny(tmp_path / "run", method="dact", last_period=1)
    cfg.precision, cfg.logger = "bf16-mixed", "none"
    res = ContinualRunner(data, cfg).run()
    for t in (0, 1):
        assert 0.0 <= res[t]["test/recall@8/overall"] <= 1.0
    assert res[1]["code_change/overall"] >= 0.0 and np.isfinite(res[1]["recommender/loss_kept/after"])


def test_continual_analyze_adds_memgen_keys_and_tables(tmp_path):
    data, cfg = tiny(tmp_path / "run", method="frozen", last_period=1)
    cfg.analyze, cfg.logger = True, "none"
    res = ContinualRunner(data, cfg).run()
    for t in (0, 1):
        assert "memgen/ratio/memorization" in res[t] and "memgen/tiger/test/ndcg@10/generalization" in res[t]
        assert (tmp_path / "run" / f"period_{t}" / "analysis" / "labels.csv").exists()
    with pytest.raises(ConfigError, match="use_cf"):
        ContinualConfig(method="frozen", analyze=True, use_cf=False)


def test_replay_adds_the_earlier_rows_of_items_whose_sid_changed(tmp_path):
    from datamodules.sequences import SequenceDataModule
    from genrec.data.pipeline import PreparedDataset
    from genrec.data.splits import TRAIN
    from genrec.tokenizers.sid import SemanticIdTable

    data, cfg = tiny(tmp_path / "run", method="ft_both", last_period=1)  # fine-tuned tokenizer: codes move
    cfg.logger = "none"
    cfg.finetune_tokenizer_stage = StageConfig(epochs=3, lr=3e-2, batch_size=64)
    res = ContinualRunner(data, cfg).run()
    old = SemanticIdTable.load(tmp_path / "run" / "period_0" / "sid_table.parquet")
    new = SemanticIdTable.load(tmp_path / "run" / "period_1" / "sid_table.parquet")
    ds = PreparedDataset.load(tmp_path / "run" / "prepared")
    earlier = ds.instances.where(split=TRAIN, period=[0])
    both = earlier.target[np.isin(earlier.target, new.items)]
    changed = (old.full_codes()[old.rows_of(both)] != new.full_codes()[new.rows_of(both)]).any(1)
    assert res[1]["recommender/replay_rows"] == changed.sum() > 0
    # the datamodule trains on the period's rows plus the replayed ones, each once, in time order
    dm = SequenceDataModule(data, train_periods=[1], eval_period=1)
    dm.dataset = ds
    plain = len(dm.train_instances())
    dm.replay = earlier.select(np.isin(earlier.target, both[changed]))
    inst = dm.train_instances()
    assert len(inst) == plain + len(dm.replay) and np.all(np.diff(inst.index) > 0)


def test_report_draws_every_figure_of_a_small_run(tmp_path):
    import matplotlib.image as mpimg

    from genrec.cli import main

    data, cfg = tiny(tmp_path / "runs" / "dact", method="dact", last_period=2)
    cfg.logger = "none"
    ContinualRunner(data, cfg).run()
    d2, c2 = tiny(tmp_path / "runs" / "frozen", method="frozen", last_period=2)
    c2.logger, c2.init_from = "none", str(tmp_path / "runs" / "dact")
    ContinualRunner(d2, c2).run()
    assert main(["report", str(tmp_path / "runs")]) == 0
    page = (tmp_path / "runs" / "report.html").read_text()
    figs = sorted((tmp_path / "runs" / "report").glob("*.png"))
    assert len(figs) >= 6 and all(f"report/{f.name}" in page for f in figs)
    for f in figs:
        img = mpimg.imread(f)
        assert img.shape[0] > 100 and img.std() > 0.01, f.name  # drawn, not blank
    assert main(["report", str(tmp_path / "nowhere")]) == 1


@pytest.mark.slow
def test_cli_run_is_quiet_shows_progress_and_ends_with_its_folder(tmp_path):
    """`genrec continual` as a user runs it (subprocess, W&B offline): at most 2 lines that are not ours."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    config = {
        "data": {"source": "synthetic", "name": "synthetic", "protocol": "periods",
                 "synthetic": {"num_users": 120, "num_items": 70}, "period_fractions": [0.6, 0.2, 0.2],
                 "cache_dir": str(tmp_path / "cache")},
        "continual": {
            "method": "dact", "last_period": 1, "logger": "wandb", "accelerator": "cpu", "run_dir": str(tmp_path / "run"),
            "rqvae": {"hidden_dims": [32], "latent_dim": 8, "num_levels": 2, "codebook_size": 8, "kmeans_iters": 5},
            "rqvae_stage": {"epochs": 2, "batch_size": 64}, "rqvae_warmup_epochs": 1,
            "dact": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0},
            "sasrec": {"hidden": 8, "num_layers": 1}, "sasrec_stage": {"epochs": 1, "batch_size": 64},
            "sasrec_finetune_stage": {"epochs": 1, "batch_size": 64},
            "tiger": {"num_encoder_layers": 1, "num_decoder_layers": 1, "d_model": 16, "num_heads": 2, "d_kv": 8,
                      "d_ff": 32},
            "tiger_stage": {"epochs": 2, "batch_size": 64}, "tiger_finetune_stage": {"epochs": 1, "batch_size": 64},
            "tiger_warmup_steps": 2, "num_beams": 8, "ks": [5, 8], "suffix_size": 32,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("GENREC_VERBOSE", "WANDB_SILENT")}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "genrec", "continual", "--config", str(path)], env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).replace("\r", "\n").splitlines() if ln.strip()]
    table = lines.index("dact: per-period results")
    ours = ("[continual dact]", "[edit]", "Batches:")  # our status lines; the embedding progress bar
    foreign = [ln for i, ln in enumerate(lines) if not ln.startswith(ours) and not table <= i < table + 4]
    assert len(foreign) <= 2, foreign
    for stage in ("sasrec", "rqvae", "tiger", "dact"):
        assert any(ln.startswith("[continual dact] [period") and f" {stage}] epoch" in ln for ln in lines), stage
    assert proc.stdout.strip().splitlines()[-1] == f"[continual dact] outputs: {tmp_path / 'run'}"
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1


def _equal_metrics(a: dict, b: dict) -> list[str]:
    """Keys whose values differ beyond float rounding (timings excluded)."""
    import math

    def same(x, y):
        if isinstance(x, float) and isinstance(y, float):
            return (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-6 + 1e-5 * abs(x)
        return x == y

    return sorted(k for k in set(a) | set(b) if not k.startswith("seconds/") and "/seconds" not in k
                  and not (k in a and k in b and same(a[k], b[k])))


@pytest.mark.slow
def test_two_processes_give_the_one_process_run(tmp_path):
    """`genrec continual --continual.devices 2` (2 gloo processes, data-parallel SASRec/TIGER, sharded evaluation,
    replicated DACT and GenRecEdit): the same metrics.json (float rounding) and the same SID tables as 1 process.
    Odd batch sizes make the global batches split unevenly and pad a rank; dropout is 0 (ranks draw their own
    masks)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd
    import yaml

    config = {
        "data": {"source": "synthetic", "name": "synthetic", "protocol": "periods",
                 "synthetic": {"num_users": 120, "num_items": 70}, "period_fractions": [0.6, 0.2, 0.2],
                 "cache_dir": str(tmp_path / "cache")},
        "continual": {
            "method": "dact", "logger": "none", "accelerator": "cpu", "edit": True,
            "rqvae": {"hidden_dims": [32], "latent_dim": 8, "num_levels": 2, "codebook_size": 8, "kmeans_iters": 5},
            "rqvae_stage": {"epochs": 2, "batch_size": 64}, "rqvae_warmup_epochs": 1,
            "dact": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0},
            "sasrec": {"hidden": 8, "num_layers": 1, "dropout": 0.0}, "sasrec_stage": {"epochs": 2, "batch_size": 51},
            "sasrec_finetune_stage": {"epochs": 1, "batch_size": 51},
            "tiger": {"num_encoder_layers": 1, "num_decoder_layers": 1, "d_model": 16, "num_heads": 2, "d_kv": 8,
                      "d_ff": 32, "dropout": 0.0},
            "tiger_stage": {"epochs": 3, "batch_size": 63}, "tiger_finetune_stage": {"epochs": 2, "batch_size": 63},
            "select_every_n_epochs": 2, "tiger_warmup_steps": 2, "num_beams": 8, "ks": [5, 8], "suffix_size": 32,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {}
    for n in (1, 2):
        run = tmp_path / f"run{n}"
        proc = subprocess.run([sys.executable, "-m", "genrec", "continual", "--config", str(path),
                               "--continual.run_dir", str(run), "--continual.devices", str(n)],
                              env=env, check=False, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = run
        if n == 2:  # one report per run, not one per rank
            assert proc.stdout.count("[continual dact] period 2: test recall@10") == 1
            assert proc.stdout.count("dact: per-period results") == 1
    for t in range(3):
        one, two = (json.loads((runs[n] / f"period_{t}" / "metrics.json").read_text()) for n in (1, 2))
        assert _equal_metrics(one, two) == [], t
        assert "test/ndcg@8/overall" in one and one["test/count/overall"] > 0
        tables = [pd.read_parquet(runs[n] / f"period_{t}" / "sid_table.parquet") for n in (1, 2)]
        assert tables[0].equals(tables[1]), t
    assert one["code_change/overall"] >= 0 and any(k.startswith("edit/period") for k in
                                                   json.loads((runs[2] / "period_1" / "metrics.json").read_text()))
