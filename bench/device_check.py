"""One-command device check: a short TIGER fit at paper size (bf16 on CUDA) on real data, the decoding comparison
and a GenRecEdit edit at d_ff 1024, in one JSON.

    .venv/bin/python bench/device_check.py --out device_check.json            # on a CUDA machine, < 8 minutes
    .venv/bin/python bench/device_check.py --smoke --out device_check.json    # CPU smoke variant, < 3 minutes

Keys: ``seconds/{fit,decoding,edit_total,total}``, ``throughput/train/{samples,tokens}_per_second``, ``mfu``,
``decoding/speedup``, ``decoding/topk_identical``, ``edit/seconds`` (the edit proper, decision 8),
``edit/time_ratio_to_fit_epoch`` and the fitted model's ``tiger/test/recall@10/overall``. ``--smoke`` uses the
synthetic catalogue, a tiny model and small batches, so CI can run every code path on a CPU.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, report
from throughput import SIZES, decoding_comparison, device_peak_tflops, tiger_train_flops

TINY = {"num_encoder_layers": 1, "num_decoder_layers": 2, "d_model": 32, "num_heads": 2, "d_kv": 16, "d_ff": 64}


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="CPU-sized smoke run on the synthetic catalogue (the default without a GPU)")
    p.add_argument("--epochs", type=int, default=None, help="TIGER epochs (default 3; smoke 1)")
    p.add_argument("--peak_tflops", type=float, default=None)
    args = p.parse_args(argv)

    import lightning as L
    import torch

    from callbacks.genrecedit import GenRecEditCallback
    from datamodules.sequences import SequenceDataModule
    from genrec.data.config import DataConfig
    from genrec.data.synthetic import SyntheticConfig
    from genrec.editing import EditConfig
    from genrec.models.tiger import TigerConfig
    from lightning_modules.tiger import TigerModule

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    smoke = not cuda  # without a GPU the check is the smoke run (every code path, CPU-sized)
    device = torch.device("cuda" if cuda else "cpu")
    res: dict = {"config/device": torch.cuda.get_device_name(0) if cuda else "cpu", "config/smoke": smoke}
    if smoke:
        data = DataConfig(synthetic=SyntheticConfig(num_users=200, num_items=120), period_fractions=[0.6, 0.2, 0.2])
        cfg = dataclasses.replace(TigerConfig(), **TINY)
        levels, batch, beams, epochs = (2, 16, 16), 64, 10, args.epochs or 1
    else:
        data = DataConfig(source="local", root=args.data, name=Path(args.data).name)
        cfg = dataclasses.replace(TigerConfig(), **SIZES["paper_size"])  # d_ff 1024: the paper's edit width
        levels, batch, beams, epochs = (3, 256, 256), 256, 20, args.epochs or 3
    precision = "bf16-mixed" if cuda else "32-true"
    L.seed_everything(args.seed, verbose=False)
    with tempfile.TemporaryDirectory() as work:
        dm = SequenceDataModule(data, prepared_dir=str(Path(work) / "prepared"), train_periods=[0], eval_period=1,
                                batch_size=batch, eval_batch_size=batch)
        num_levels, codebook, suffix = levels
        module = TigerModule(cfg, num_levels=num_levels, codebook_size=codebook, suffix_size=suffix, lr=2e-3,
                             warmup_steps=20, num_beams=beams, ks=(5, 10), rkmeans_iters=10)
        trainer = L.Trainer(max_epochs=epochs, accelerator="gpu" if cuda else "cpu", devices=1, precision=precision,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            default_root_dir=work)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        fit_seconds = time.perf_counter() - t0
        res["seconds/fit"] = fit_seconds
        n_train = len(dm.train_instances())
        enc_tokens = cfg.max_history_items * (num_levels + 1)
        flops = tiger_train_flops(cfg, enc_tokens, num_levels + 1, module.vocab_size)
        res["throughput/train/samples_per_second"] = n_train * epochs / fit_seconds
        res["throughput/train/tokens_per_second"] = n_train * epochs * (enc_tokens + num_levels + 1) / fit_seconds
        peak = args.peak_tflops or device_peak_tflops(device)
        res["mfu"] = flops * n_train * epochs / fit_seconds / 1e12 / peak if peak else float("nan")
        res.update({f"tiger/{k}": float(v) for k, v in trainer.test(module, datamodule=dm, verbose=False)[0].items()
                    if k in ("test/recall@10/overall", "test/ndcg@10/overall")})

        t0 = time.perf_counter()
        dec = decoding_comparison(cfg, batch=batch if cuda else 32, beams=beams if cuda else 10, device=device,
                                  repeats=3 if cuda else 1, num_items=3000 if cuda else 300, seed=args.seed)
        res["seconds/decoding"] = time.perf_counter() - t0
        res["throughput/decode/ours/histories_per_second"] = dec["ours/histories_per_second"]
        res["throughput/decode/hf/histories_per_second"] = dec["hf/histories_per_second"]
        res["decoding/speedup"], res["decoding/topk_identical"] = dec["speedup"], dec["topk_identical"]

        module = module.to(device)
        edit_cfg = EditConfig(cov_lambda=1000.0, histories_per_item=10 if cuda else 3, diagnostic_rows=0,
                              probe_max_per_class=2000 if cuda else 100, seed=args.seed)
        t0 = time.perf_counter()
        cb = GenRecEditCallback(edit_cfg, cold_period=1, verbose=False)
        cb.apply(module, dm)  # float32: δ optimisation and the float64 closed form are not autocast
        res["seconds/edit_total"] = time.perf_counter() - t0
        res["edit/seconds"] = cb.report.edit_seconds
        res["edit/time_ratio_to_fit_epoch"] = cb.report.edit_seconds / (fit_seconds / epochs)
        res["edit/success_rate/pos0"] = cb.report.success_rate.get(0, float("nan"))
    res["seconds/total"] = time.perf_counter() - t_start
    report(res, args.out, "device check" + (" (smoke)" if smoke else ""))
    return res


if __name__ == "__main__":
    main()
