"""Throughput: TIGER training samples/s, tokens/s and MFU at the CPU size and the paper size, and decoding
histories/s of our constrained beam search vs HF ``generate`` (batch 256 × 20 beams), side by side in one run.

    .venv/bin/python bench/throughput.py --out throughput.json [--peak_tflops 989] [--precision bf16]

Model FLOPs per training sample are counted from the config (``tiger_train_flops``: every matmul of the encoder,
decoder, cross-attention and LM head, forward ×3 for forward + backward), so MFU = achieved FLOPs/s ÷ the device's
peak. ``--peak_tflops`` defaults to the dense bf16 peak of known GPUs (H100/H200 SXM 989, A100 312, L4 121) and is
unknown (MFU null) on a CPU unless given.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, report

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40": 181.0}
SIZES = {
    "cpu_size": {"num_encoder_layers": 2, "num_decoder_layers": 2, "d_model": 64, "num_heads": 4, "d_kv": 16,
                 "d_ff": 256},
    "paper_size": {"num_encoder_layers": 4, "num_decoder_layers": 4, "d_model": 128, "num_heads": 6, "d_kv": 64,
                   "d_ff": 1024},
}


def tiger_forward_flops(cfg, enc_tokens: int, dec_tokens: int, vocab: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one sample: ``enc_tokens`` encoder and ``dec_tokens`` decoder tokens."""
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    ffn = (3 if cfg.feed_forward_proj == "gated-silu" else 2) * d * cfg.d_ff
    enc_layer = enc_tokens * (4 * d * inner + ffn) + 2 * enc_tokens * enc_tokens * inner
    dec_self = dec_tokens * 4 * d * inner + 2 * dec_tokens * dec_tokens * inner
    dec_cross = dec_tokens * 2 * d * inner + enc_tokens * 2 * d * inner + 2 * dec_tokens * enc_tokens * inner
    dec_layer = dec_self + dec_cross + dec_tokens * ffn
    head = dec_tokens * d * vocab
    macs = cfg.num_encoder_layers * enc_layer + cfg.num_decoder_layers * dec_layer + head
    return 2.0 * macs


def tiger_train_flops(cfg, enc_tokens: int, dec_tokens: int, vocab: int) -> float:
    return 3.0 * tiger_forward_flops(cfg, enc_tokens, dec_tokens, vocab)


def device_peak_tflops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(cfg, vocab: int, batch: int, steps: int, warmup: int, device, precision: str,
                     history_items: int = 20, sid_length: int = 4, compile_model: bool = False) -> dict:
    """Samples/s and tokens/s of AdamW training steps on full-length random SID histories."""
    import torch

    from genrec.models.tiger import build_tiger

    torch.manual_seed(0)
    model = build_tiger(cfg, vocab).to(device).train()
    step_model = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    enc_tokens = history_items * sid_length
    ids = torch.randint(1, vocab, (batch, enc_tokens), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(1, vocab, (batch, sid_length), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = step_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    flops = tiger_train_flops(cfg, enc_tokens, sid_length, vocab)
    return {"samples_per_second": batch / seconds, "tokens_per_second": batch * (enc_tokens + sid_length) / seconds,
            "flops_per_sample": flops, "achieved_tflops": flops * batch / seconds / 1e12, "seconds_per_step": seconds}


def decoding_comparison(cfg, batch: int, beams: int, device, repeats: int, num_items: int = 3000,
                        history_items: int = 20, seed: int = 0) -> dict:
    """Our constrained beam search vs HF ``generate`` + ``prefix_allowed_tokens_fn`` on one batch: histories/s of
    both, the speed-up, and whether the top-K lists are identical."""
    import numpy as np
    import torch

    from genrec.decoding import SidTrie, constrained_beam_search
    from genrec.decoding.reference import reference_beam_search
    from genrec.models.tiger import build_tiger, encode_histories
    from genrec.tokenizers.sid import SemanticIdTable

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(num_items, 3))
    table = SemanticIdTable.from_codes(np.arange(num_items), codes, 256, 256)
    torch.manual_seed(seed)
    model = build_tiger(cfg, table.vocab_size).to(device).eval()
    hist = rng.integers(0, num_items, size=(batch, history_items))
    ids, mask = (t.to(device) for t in encode_histories(hist, table, max_items=history_items))
    trie = SidTrie.from_table(table, device=device)

    def best(fn):
        times, out = [], None
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return min(times), out

    ours_s, (ours, _) = best(lambda: constrained_beam_search(model, ids, mask, trie, num_beams=beams, top_k=beams))
    hf_s, (ref, _) = best(lambda: reference_beam_search(model, ids, mask, table, num_beams=beams, top_k=beams))
    return {"ours/histories_per_second": batch / ours_s, "hf/histories_per_second": batch / hf_s,
            "speedup": hf_s / ours_s, "topk_identical": float(torch.equal(ours.cpu(), torch.as_tensor(ref).cpu()))}


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 5 CPU, 50 GPU)")
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default bf16 on CUDA, else fp32")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the training steps")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--skip_decoding", action="store_true")
    args = p.parse_args(argv)
    import torch

    from genrec.models.tiger import TigerConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    steps = args.steps or (50 if device.type == "cuda" else 5)
    peak = args.peak_tflops or device_peak_tflops(device)
    vocab = 1 + 3 * 256 + 256
    res: dict = {"config/device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                 "config/precision": precision, "config/batch": args.batch, "config/peak_tflops": peak}
    for size in args.sizes:
        cfg = replace(TigerConfig(), **SIZES[size])
        t0 = time.perf_counter()
        out = train_throughput(cfg, vocab, args.batch, steps, warmup=2, device=device, precision=precision,
                               compile_model=args.compile)
        res[f"seconds/train_{size}"] = time.perf_counter() - t0
        res.update({f"throughput/train/{size}/{k}": v for k, v in out.items()})
        res[f"mfu/{size}"] = out["achieved_tflops"] / peak if peak else float("nan")
    if not args.skip_decoding:
        t0 = time.perf_counter()
        dec = decoding_comparison(replace(TigerConfig(), **SIZES["paper_size"]), args.batch, args.beams, device,
                                  repeats=3 if device.type == "cuda" else 1, seed=args.seed)
        res["seconds/decoding"] = time.perf_counter() - t0
        res.update({f"throughput/decode/{k}": v for k, v in dec.items() if "histories" in k})
        res["decoding/speedup"], res["decoding/topk_identical"] = dec["speedup"], dec["topk_identical"]
    report(res, args.out, "throughput: TIGER training and constrained decoding")
    return res


if __name__ == "__main__":
    main()
