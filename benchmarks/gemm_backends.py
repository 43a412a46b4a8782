"""oneDNN vs BLAS (MKL) for the encoder's fp32 products on this CPU, and what the choice does to a whole step.

Two parts, both interleaved A B A B with medians:
  1. every GEMM shape of a medium-small layer at batch 32 x 128 (M = 4096 tokens), in the three forms training
     uses: forward (x W^T), input gradient (dY W) and weight gradient (dY^T x); GFLOP/s of each library;
  2. our medium-small training step and inference with `convbert.model.kernels.set_cpu_gemm("blas")` and
     `("onednn")`: the same model, weights and inputs.

The library's default follows part 1: forward and input-gradient products on oneDNN, weight gradients on BLAS
except where oneDNN's were measured faster (AMD Zen 5 and later: `kernels.onednn_weight_gradients`).

Usage:  python benchmarks/gemm_backends.py --output benchmarks/results/gemm_backends.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _bench import ALLOCATOR_ENV, machine_info, median_seconds, use_fixed_allocator, write_report

if __name__ == "__main__" and not os.environ.get("_CONVBERT_BENCH_CHILD"):
    use_fixed_allocator()

import torch  # noqa: E402

from convbert.model import kernels  # noqa: E402

# (name, M, K, N) of medium-small (H 384, A 192, 4 heads x 9 taps, FFN 1536 in 2 groups) at 4096 tokens.
SHAPES = [
    ("fused projection 384->768", 4096, 384, 768),
    ("attention output 384->384", 4096, 384, 384),
    ("pointwise conv 384->192", 4096, 384, 192),
    ("FFN group in 192->768", 4096, 192, 768),
    ("FFN group out 768->192", 4096, 768, 192),
    ("kernel logits 192->36", 4096, 192, 36),
]


def gemm_table(repeats: int) -> list[dict]:
    onednn = kernels._ONEDNN_LINEAR
    rows = []
    for name, m, k, n in SHAPES:
        x, dy, weight = torch.randn(m, k), torch.randn(m, n), torch.randn(n, k)
        forms = {
            "forward": (lambda: torch.mm(x, weight.t()), lambda: onednn(x, weight, None, "none", [], "")),
            "input_grad": (lambda: torch.mm(dy, weight), lambda: onednn(dy, weight.t(), None, "none", [], "")),
            "weight_grad": (lambda: torch.mm(dy.t(), x), lambda: onednn(dy.t(), x.t(), None, "none", [], "")),
        }
        flops = 2 * m * k * n
        row = {"shape": name, "m": m, "k": k, "n": n}
        for form, (blas_fn, onednn_fn) in forms.items():
            blas_t, onednn_t = [], []
            for _ in range(3):  # interleaved rounds
                blas_t.append(median_seconds(blas_fn, repeats))
                onednn_t.append(median_seconds(onednn_fn, repeats))
            row[form] = {"blas_gflops": flops / statistics.median(blas_t) / 1e9,
                         "onednn_gflops": flops / statistics.median(onednn_t) / 1e9}
        rows.append(row)
    return rows


def step_comparison(size: str, steps: int) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import model_speed

    ours, _ = model_speed.build_pair(size)
    ids, mask, types = model_speed.inputs(32, 128)
    optimizer = model_speed.make_optimizer(ours)
    times = {f"{gemm}_{kind}": [] for gemm in ("blas", "onednn") for kind in ("train", "infer")}
    before = kernels.cpu_gemm()
    try:
        for i in range(steps + 1):  # the first round is warm-up
            for gemm in ("blas", "onednn"):
                kernels.set_cpu_gemm(gemm)
                ours.train()
                t = time.perf_counter()
                model_speed.train_step(ours, optimizer, ids, mask, types, hf=False)
                train = time.perf_counter() - t
                ours.eval()
                t = time.perf_counter()
                model_speed.infer(ours, ids, mask, types, hf=False)
                infer = time.perf_counter() - t
                if i:
                    times[f"{gemm}_train"].append(train)
                    times[f"{gemm}_infer"].append(infer)
    finally:
        kernels.set_cpu_gemm(before)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"size": size, "median_seconds": med, "all_seconds": times,
            "train_speedup": med["blas_train"] / med["onednn_train"],
            "infer_speedup": med["blas_infer"] / med["onednn_infer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per GEMM measurement")
    parser.add_argument("--size", default="medium-small", help="model size of the whole-step comparison (batch 32 x 128; the GEMM table always "
                                                          "uses medium-small's shapes)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per library")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="benchmarks/results/gemm_backends.json")
    args = parser.parse_args()
    if kernels._ONEDNN_LINEAR is None:
        sys.exit("this PyTorch build has no oneDNN linear: nothing to compare")
    torch.set_num_threads(args.threads)

    rows = gemm_table(args.repeats)
    print(f"threads={args.threads} allocator={ALLOCATOR_ENV}")
    print(f"{'GEMM (M=4096)':<28}{'forward BLAS/oneDNN':>22}{'input grad':>18}{'weight grad':>18}   GFLOP/s")
    for r in rows:
        cells = "".join(f"{r[f]['blas_gflops']:>10.0f} /{r[f]['onednn_gflops']:>5.0f}"
                        for f in ("forward", "input_grad", "weight_grad"))
        print(f"{r['shape']:<28}{cells}")
    step = step_comparison(args.size, args.steps)
    m = step["median_seconds"]
    print(f"{args.size} step, BLAS vs oneDNN products: train {m['blas_train']:.3f}s vs {m['onednn_train']:.3f}s "
          f"({step['train_speedup']:.3f}x), inference {m['blas_infer']:.3f}s vs {m['onednn_infer']:.3f}s "
          f"({step['infer_speedup']:.3f}x)")
    write_report(args.output, {"machine": machine_info(args.threads), "allocator_env": ALLOCATOR_ENV, "gemms": rows,
                               "step": step})


if __name__ == "__main__":
    main()
