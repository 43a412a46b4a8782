"""Our ConvBERT vs transformers' ConvBERT: same config, weights, inputs and threads, interleaved A B A B.

Measures, per size at batch x length (default 32 x 128):
  * training step (forward + backward + optimiser step) and inference (forward, no grad): median seconds. The
    optimiser is this project's `AdamWeightDecay` for both models (the original's update; on the CPU PyTorch's fused
    kernel), lr 0 so that the weights stay equal; `--optimizer torch-adamw` gives both `torch.optim.AdamW`'s default
    instead (a per-parameter loop on the CPU: ~40 ms more per medium-small step), as reports before 2026-12-08 did;
  * the max |difference| of the two models' outputs in eval mode (faithful mode), checked while timing;
  * peak training memory of each model, each in a fresh subprocess: peak RSS during two steps minus RSS before
    (glibc's default allocator, so it includes freed pages glibc keeps), and the peak of live tensors during a
    third step (the allocator-level figure, as `torch.cuda.max_memory_allocated` would report on a GPU);
  * achieved model FLOP/s against the fp32 matmul throughput measured on this machine in the same run (the
    faster of BLAS's and oneDNN's: our products run on oneDNN, HF's on BLAS).

With `--precision bf16` both models run under CPU bf16 autocast (not the same maths: the outputs are compared
with the fp32 model's instead), HF's fp32 step is timed in the same loop too, and MFU is against the bf16 matmul
throughput.

Usage:  python benchmarks/model_speed.py --sizes medium-small --steps 5 --output benchmarks/results/model_speed.json
The allocator settings below are fixed (and reported) because glibc's defaults make large activations page-fault
on every step (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _bench import (ALLOCATOR_ENV, machine_info, median_seconds, use_fixed_allocator, vm_hwm_bytes,
                    write_report)

DEFAULT_ALLOCATOR = "--default-allocator" in sys.argv
if __name__ == "__main__" and os.environ.get("_CONVBERT_BENCH_CHILD") is None and not DEFAULT_ALLOCATOR:
    use_fixed_allocator()

import torch  # noqa: E402

from convbert.model import ConvBertConfig, ConvBertModel, kernels  # noqa: E402
from convbert.model.flops import encoder_forward_flops_per_token  # noqa: E402
from convbert.optim import AdamWeightDecay, param_groups  # noqa: E402
from convbert.precision import autocast as precision_autocast  # noqa: E402


def build_pair(size: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    checkpointing = os.environ.get("CONVBERT_BENCH_CHECKPOINTING") == "1"  # set by --gradient-checkpointing
    ours = ConvBertModel(ConvBertConfig.from_preset(size, gradient_checkpointing=checkpointing))
    values = {k: v for k, v in ours.config.to_hf_dict().items()
              if k not in ("model_type", "architectures", "convbert_extra")}
    hf = transformers.ConvBertModel(transformers.ConvBertConfig(**values))
    hf.load_state_dict(ours.state_dict(), strict=False)
    return ours, hf


def inputs(batch: int, length: int, vocab: int = 30522):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return ids, torch.ones_like(ids), torch.zeros_like(ids)


PRECISION = os.environ.get("CONVBERT_BENCH_PRECISION", "fp32")  # set by --precision (children inherit it)
COMPILE = False  # set by --compile
OPTIMIZER = "adamweightdecay"  # set by --optimizer
OPTIMIZERS = ("adamweightdecay", "torch-adamw")


def make_optimizer(model: torch.nn.Module, kind: str | None = None) -> torch.optim.Optimizer:
    """The optimiser a timed training step uses, lr 0 so that compared models keep identical weights: ours (with
    the original's decay groups) or `torch.optim.AdamW` with its defaults. The same for both models."""
    kind = kind or OPTIMIZER
    if kind == "torch-adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.0)
    if kind != "adamweightdecay":
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    return AdamWeightDecay(param_groups(model, 0.01), lr=0.0)


def autocast(precision: str | None = None):
    return precision_autocast(precision or PRECISION, torch.device("cpu"))


def train_step(model, optimizer, ids, mask, types, hf: bool, precision: str | None = None):
    with autocast(precision):
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types) if hf else model(ids, mask, types)
    loss = out.last_hidden_state.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def infer(model, ids, mask, types, hf: bool, precision: str | None = None):
    with torch.inference_mode(), autocast(precision):
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types) if hf else model(ids, mask, types)
    return out.last_hidden_state.float()


def matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """The practical roofline: the faster of BLAS's (`a @ b`) and, in fp32, oneDNN's n x n product (our linears
    run on oneDNN; bf16 `a @ b` already does)."""
    dtype = torch.bfloat16 if PRECISION == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    products = [lambda: a @ b]
    if dtype == torch.float32 and kernels._ONEDNN_LINEAR is not None:
        products.append(lambda: kernels._ONEDNN_LINEAR(a, b.t(), None, "none", [], ""))
    return max(2 * n**3 / median_seconds(product, repeats, warmup=3) for product in products)


def peak_memory_child(impl: str, size: str, batch: int, length: int, steps: int) -> dict:
    """Run in a fresh process: RSS growth of `steps` training steps."""
    ours, hf = build_pair(size)
    model = hf if impl == "hf" else ours
    del ours, hf
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # no optimiser state: activations only
    ids, mask, types = inputs(batch, length)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    # ru_maxrss survives exec (it would report the parent's peak): use VmHWM, reset to the current RSS first.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(steps):
        train_step(model, optimizer, ids, mask, types, impl == "hf")
    peak = vm_hwm_bytes()
    return {"rss_before_bytes": before, "peak_rss_bytes": peak, "step_peak_bytes": peak - before,
            "live_tensor_peak_bytes": live_tensor_peak(lambda: train_step(model, optimizer, ids, mask, types,
                                                                          impl == "hf"))}


def live_tensor_peak(step) -> int:
    """Peak bytes of live tensors allocated during `step()`, from the profiler's allocator events.

    The CPU analogue of `torch.cuda.max_memory_allocated`: what the implementation needs, independent of how the C
    allocator (glibc) happens to fragment or retain freed pages, which the RSS figure also counts.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure_memory(impl: str, size: str, batch: int, length: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import model_speed as m; print(json.dumps(m.peak_memory_child({impl!r}, {size!r}, {batch}, {length}, 2)))")
    # Memory is measured under glibc's default allocator: the tuned settings keep freed heap pages resident, so
    # peak RSS would measure the allocator's high-water mark rather than the live tensors.
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    env["_CONVBERT_BENCH_CHILD"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_size(size: str, batch: int, length: int, steps: int, warmup: int, memory: bool) -> dict:
    ours, hf = build_pair(size)
    ids, mask, types = inputs(batch, length)
    ours.eval(), hf.eval()
    low = PRECISION != "fp32"
    # Timed side by side: ours and HF at --precision, and in bf16 also HF in fp32 (the port as it ships).
    ours_call = torch.compile(ours) if COMPILE else ours  # --compile: compiled in the warm-up steps
    runs = [("ours", ours_call, False, None), ("hf", hf, True, None)] + ([("hf_fp32", hf, True, "fp32")] if low else [])

    def output_diffs() -> dict:
        outputs = {name: infer(model, ids, mask, types, is_hf, precision) for name, model, is_hf, precision in runs}
        if not low:
            return {"max_abs_diff": (outputs["ours"] - outputs["hf"]).abs().max().item()}
        reference = outputs["hf_fp32"]

        def relative(name: str) -> float:
            return ((outputs[name] - reference).norm() / reference.norm()).item()

        return {"ours_rel_error_vs_fp32": relative("ours"), "hf_rel_error_vs_fp32": relative("hf"),
                "max_abs_diff": (outputs["ours"] - reference).abs().max().item()}

    diffs_before = output_diffs()
    times = {f"{name}_{kind}": [] for name, *_ in runs for kind in ("infer", "train")}
    for i in range(warmup + steps):  # interleaved: A B A B
        for name, model, is_hf, precision in runs:
            t = time.perf_counter()
            infer(model, ids, mask, types, is_hf, precision)
            if i >= warmup:
                times[f"{name}_infer"].append(time.perf_counter() - t)
    opt_ours, opt_hf = make_optimizer(ours), make_optimizer(hf)  # lr 0: weights stay equal
    ours.train(), hf.train()
    peaks = []  # the matmul roofline, measured between the timed steps: the shared VM's speed drifts over a run
    for i in range(warmup + steps):
        for name, model, is_hf, precision in runs:
            t = time.perf_counter()
            train_step(model, opt_hf if is_hf else opt_ours, ids, mask, types, is_hf, precision)
            if i >= warmup:
                times[f"{name}_train"].append(time.perf_counter() - t)
        if i >= warmup:
            peaks.append(matmul_flops(repeats=5))
    # The outputs must still agree after identical optimiser steps on identical weights.
    ours.eval(), hf.eval()
    diffs_after = output_diffs()

    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = batch * length
    flops_train = 3 * encoder_forward_flops_per_token(ours.config, length) * tokens
    result = {
        "size": size, "batch": batch, "length": length, "steps": steps, "precision": PRECISION,
        "median_seconds": med, "all_seconds": times,
        "train_speedup": med["hf_train"] / med["ours_train"],
        "infer_speedup": med["hf_infer"] / med["ours_infer"],
        "train_tokens_per_s": {"ours": tokens / med["ours_train"], "hf": tokens / med["hf_train"]},
        "infer_tokens_per_s": {"ours": tokens / med["ours_infer"], "hf": tokens / med["hf_infer"]},
        "train_model_flops_per_s": {"ours": flops_train / med["ours_train"], "hf": flops_train / med["hf_train"]},
        "matmul_flops_per_s_between_steps": peaks,
        "max_abs_diff_eval": diffs_before["max_abs_diff"], "max_abs_diff_after_training": diffs_after["max_abs_diff"],
        "output_diffs": {"before": diffs_before, "after": diffs_after},
    }
    if low:
        result["train_speedup_vs_hf_fp32"] = med["hf_fp32_train"] / med["ours_train"]
        result["infer_speedup_vs_hf_fp32"] = med["hf_fp32_infer"] / med["ours_infer"]
    if memory:
        mem = {impl: measure_memory(impl, size, batch, length) for impl in ("ours", "hf")}
        result["memory"] = mem
        result["memory_ratio"] = mem["ours"]["step_peak_bytes"] / mem["hf"]["step_peak_bytes"]
        result["live_memory_ratio"] = mem["ours"]["live_tensor_peak_bytes"] / mem["hf"]["live_tensor_peak_bytes"]
    return result


def main() -> None:
    global PRECISION, COMPILE, OPTIMIZER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium-small,base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="our model recomputes each layer in backward (ConvBertConfig.gradient_checkpointing)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="time under glibc's default malloc settings instead of the tuned ones")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: both models under CPU bf16 autocast, HF's fp32 step timed alongside")
    parser.add_argument("--compile", action="store_true",
                        help="time our model under torch.compile (Inductor); implies --no-memory")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=OPTIMIZER,
                        help="the training step's optimiser, the same for both models (default: ours, AdamWeightDecay)")
    parser.add_argument("--output", default="benchmarks/results/model_speed.json")
    args = parser.parse_args()
    COMPILE = args.compile
    OPTIMIZER = args.optimizer
    args.no_memory = args.no_memory or args.compile
    PRECISION = os.environ["CONVBERT_BENCH_PRECISION"] = args.precision
    torch.set_num_threads(args.threads)
    if args.gradient_checkpointing:
        os.environ["CONVBERT_BENCH_CHECKPOINTING"] = "1"

    peak = matmul_flops()
    rows = [bench_size(s, args.batch, args.length, args.steps, args.warmup, not args.no_memory)
            for s in args.sizes.split(",")]
    peak_after = matmul_flops()
    matmul = max(peak, peak_after)
    for r in rows:
        # MFU against the roofline measured between this size's timed steps (median), so a slower stretch of the
        # shared VM lowers numerator and denominator together; against the start/end peak as well.
        r["matmul_flops_per_s"] = statistics.median(r["matmul_flops_per_s_between_steps"])
        r["train_fraction_of_matmul_peak"] = {k: v / r["matmul_flops_per_s"]
                                              for k, v in r["train_model_flops_per_s"].items()}
        r["train_fraction_of_run_peak"] = {k: v / matmul for k, v in r["train_model_flops_per_s"].items()}

    between = ", ".join(f"{r['size']} {r['matmul_flops_per_s'] / 1e9:.1f}" for r in rows)
    header = (f"{'size':<13}{'train ours':>11}{'train HF':>10}{'speedup':>9}{'infer ours':>11}{'infer HF':>10}"
              f"{'speedup':>9}{'RSS ours/HF':>13}{'live ours/HF':>14}{'MFU ours':>10}{'MFU HF':>8}{'max|diff|':>11}")
    print(f"precision={args.precision} ours_compiled={args.compile} optimizer={args.optimizer} threads={args.threads} "
          f"batch={args.batch} length={args.length} "
          f"{'bf16' if args.precision == 'bf16' else 'fp32'} matmul peak={matmul / 1e9:.1f} GFLOP/s at start/end "
          f"(MFU uses the median measured between the timed steps: {between}) "
          f"allocator (timing)={'glibc defaults' if args.default_allocator else ALLOCATOR_ENV}; "
          f"our linears on {kernels.cpu_gemm()}; "
          "memory (fresh process each, glibc defaults): RSS growth over 2 steps, and the peak of live tensors")
    print(header)
    for r in rows:
        m = r["median_seconds"]
        mem = f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else "-"
        live = f"{r['live_memory_ratio']:.2f}" if "live_memory_ratio" in r else "-"
        print(f"{r['size']:<13}{m['ours_train']:>10.2f}s{m['hf_train']:>9.2f}s{r['train_speedup']:>8.2f}x"
              f"{m['ours_infer']:>10.2f}s{m['hf_infer']:>9.2f}s{r['infer_speedup']:>8.2f}x{mem:>13}{live:>14}"
              f"{r['train_fraction_of_matmul_peak']['ours']:>9.0%}{r['train_fraction_of_matmul_peak']['hf']:>8.0%}"
              f"{max(r['max_abs_diff_eval'], r['max_abs_diff_after_training']):>11.1e}")
    if args.precision != "fp32":
        print("against HF in fp32 (the same loop); output error relative to HF fp32 (after the timed steps):")
        for r in rows:
            m, d = r["median_seconds"], r["output_diffs"]["after"]
            print(f"{r['size']:<13}train {m['ours_train']:.2f}s vs {m['hf_fp32_train']:.2f}s "
                  f"({r['train_speedup_vs_hf_fp32']:.2f}x)  infer {m['ours_infer']:.2f}s vs {m['hf_fp32_infer']:.2f}s "
                  f"({r['infer_speedup_vs_hf_fp32']:.2f}x)  rel. error ours {d['ours_rel_error_vs_fp32']:.1e}, "
                  f"HF {d['hf_rel_error_vs_fp32']:.1e}")
    report = {
        "machine": machine_info(args.threads),
        "ours_gradient_checkpointing": args.gradient_checkpointing, "ours_compiled": args.compile,
        "precision": args.precision, "optimizer": args.optimizer,
        "allocator_env": {} if args.default_allocator else ALLOCATOR_ENV, "matmul_flops_per_s": matmul,
        "ours_cpu_gemm": kernels.cpu_gemm(),
        "results": rows,
    }
    write_report(args.output, report)


if __name__ == "__main__":
    main()
