"""Our ConvBERT vs transformers' ConvBERT on a CUDA GPU: same config, weights, inputs; interleaved A B A B.

Per size and precision (bf16 autocast, and fp32 with TF32 off for matmuls and cuDNN), at batch x length
(default 128 x 128, the pre-training batch):
  * training step (forward + backward + AdamW step, lr 0 so the weights stay equal) and inference: median
    milliseconds over CUDA-event-timed steps after warm-up, tokens/s, model FLOP/s and their fraction of the
    matmul throughput measured on the same GPU in the same run (an 8192^3 product of random data, per dtype);
  * the step's peak memory above the resident weights and optimiser state (`torch.cuda.max_memory_allocated`);
  * max |ours - HF| of the fp32 outputs in eval mode (TF32 off): the faithful-mode agreement on this GPU.
With --compile, our model is also timed under `torch.compile` (mode from --compile-mode).

Usage:  python benchmarks/gpu_speed.py --sizes small medium-small base --output benchmarks/results/gpu_speed.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import write_report  # noqa: E402
from model_speed import build_pair  # noqa: E402

from convbert.model.flops import encoder_forward_flops_per_token  # noqa: E402
from convbert.precision import autocast  # noqa: E402


def gpu_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"gpu": props.name, "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "cpu_count": os.cpu_count()}


def timed(fn, repeats: int, warmup: int) -> list[float]:
    """Seconds per call, from CUDA events around each call (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1000 for s, e in pairs]


def matmul_flops(dtype: torch.dtype, n: int = 8192) -> float:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, n, device="cuda", generator=g).to(dtype)
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, repeats=10, warmup=3))


def make_steps(model, hf: bool, ids, mask, types, precision: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, foreach=True)

    def forward():
        with autocast(precision, torch.device("cuda")):
            if hf:
                return model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            return model(ids, mask, types).last_hidden_state

    def train():
        forward().float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer():
        with torch.inference_mode():
            forward()

    return train, infer


def step_peak_bytes(step) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_size(size: str, args, ceilings: dict) -> list[dict]:
    ours, hf = build_pair(size)
    ours.cuda(), hf.cuda()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30522, (args.batch, args.length), generator=g).cuda()
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)

    # fp32 means fp32: TF32 off for the products and for cuDNN's convolutions (our depthwise conv runs there on CUDA)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ours.eval(), hf.eval()
    with torch.no_grad():
        diff = (ours(ids, mask, types).last_hidden_state
                - hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state).abs().max().item()
    ours.train(), hf.train()

    impls = [("ours", ours, False), ("transformers", hf, True)]
    if args.compile:
        impls.append(("ours_compiled", torch.compile(ours, mode=args.compile_mode), False))
    tokens = args.batch * args.length
    fwd_flops = encoder_forward_flops_per_token(ours.config, args.length) * tokens
    rows = []
    for precision in args.precisions:
        steps = {name: make_steps(model, is_hf, ids, mask, types, precision) for name, model, is_hf in impls}
        compile_s = {}
        for name, (train, infer) in steps.items():  # warm-up (and compilation) outside the timed loop
            t = time.perf_counter()
            for _ in range(args.warmup):
                train()
                infer()
            torch.cuda.synchronize()
            compile_s[name] = time.perf_counter() - t
        times = {(name, kind): [] for name in steps for kind in ("train", "infer")}
        for _ in range(args.rounds):  # interleaved: A B A B
            for name, (train, infer) in steps.items():
                times[(name, "train")] += timed(train, args.steps, warmup=1)
                times[(name, "infer")] += timed(infer, args.steps, warmup=1)
        peaks = {name: step_peak_bytes(train) for name, (train, _) in steps.items()}
        ceiling = ceilings["bf16" if precision == "bf16" else "fp32"]
        for name in steps:
            train_s = statistics.median(times[(name, "train")])
            infer_s = statistics.median(times[(name, "infer")])
            rows.append({
                "size": size, "precision": precision, "impl": name, "train_ms": train_s * 1000,
                "infer_ms": infer_s * 1000, "train_tokens_per_s": tokens / train_s,
                "infer_tokens_per_s": tokens / infer_s, "train_tflops": 3 * fwd_flops / train_s / 1e12,
                "infer_tflops": fwd_flops / infer_s / 1e12, "train_mfu": 3 * fwd_flops / train_s / ceiling,
                "infer_mfu": fwd_flops / infer_s / ceiling, "step_peak_mib": peaks[name] / 2**20,
                "warmup_s": compile_s[name], "fp32_max_abs_diff_vs_transformers": diff,
                "train_ms_all": [t * 1000 for t in times[(name, "train")]],
            })
        del steps
    del ours, hf, impls
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["small", "medium-small", "base"])
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round and implementation")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    ap.add_argument("--output", default="benchmarks/results/gpu_speed.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_speed.py needs a CUDA device (benchmarks/model_speed.py is the CPU benchmark)")
    torch.backends.cuda.matmul.allow_tf32 = False
    ceilings = {"bf16": matmul_flops(torch.bfloat16), "fp32": matmul_flops(torch.float32)}
    torch.backends.cuda.matmul.allow_tf32 = True
    ceilings["tf32"] = matmul_flops(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = [r for size in args.sizes for r in bench_size(size, args, ceilings)]
    info = gpu_info()
    lines = [f"{info['gpu']} ({info['multiprocessors']} SMs), torch {info['torch']}, CUDA {info['cuda']}, "
             f"triton {info['triton']}; batch {args.batch} x {args.length}; matmul 8192^3: "
             f"bf16 {ceilings['bf16'] / 1e12:.0f}, fp32 {ceilings['fp32'] / 1e12:.0f}, "
             f"tf32 {ceilings['tf32'] / 1e12:.0f} TFLOP/s (fp32 rows: TF32 off)", "",
             "| size | precision | implementation | train ms | train tokens/s | train TFLOP/s | MFU | infer ms | "
             "infer tokens/s | step peak MiB | fp32 max diff |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['precision']} | {r['impl']} | {r['train_ms']:.1f} | "
                     f"{r['train_tokens_per_s']:,.0f} | {r['train_tflops']:.1f} | {r['train_mfu']:.1%} | "
                     f"{r['infer_ms']:.1f} | {r['infer_tokens_per_s']:,.0f} | {r['step_peak_mib']:,.0f} | "
                     f"{r['fp32_max_abs_diff_vs_transformers']:.1e} |")
    lines.append("")
    for size in args.sizes:
        for precision in args.precisions:
            pair = {r["impl"]: r for r in rows if r["size"] == size and r["precision"] == precision}
            hf = pair["transformers"]
            for name in ("ours", "ours_compiled"):
                if name in pair:
                    lines.append(f"{size} {precision} {name}: train {hf['train_ms'] / pair[name]['train_ms']:.2f}x, "
                                 f"infer {hf['infer_ms'] / pair[name]['infer_ms']:.2f}x, memory "
                                 f"{pair[name]['step_peak_mib'] / hf['step_peak_mib']:.2f}x of transformers")
    text = "\n".join(lines)
    print(text)
    write_report(args.output, {"machine": info, "settings": vars(args), "matmul_flops_per_s": ceilings,
                               "results": rows, "table": text})


if __name__ == "__main__":
    main()
