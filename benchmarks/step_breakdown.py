"""Where the encoder's training step and inference spend their time, ours against transformers', by kind of op.

Same config, weights, inputs and threads as `model_speed.py` (batch 32 x 128 by default, fixed allocator settings).
Each model's step is timed (interleaved, median) and then profiled once; the profiler's self CPU time is split into
  * matrix products: every GEMM (`mm`, `addmm`, `bmm`, `baddbmm`, oneDNN's linear), whichever library runs it;
  * convolutions: ATen convolution ops (transformers' ConvBERT runs its separable conv through `conv1d`);
  * the rest, with its largest ops listed.
The bound it prints answers "how fast could our step be if everything but its matrix products were free?": our
wall time scaled by the products' share of the profile, and HF's step over that. Products run at the rate the
libraries reach on these shapes, so no implementation of the same maths on this machine beats that bound.

The profiler's self times inflate short ops (an elementwise pass over a [4096, 768] tensor: ~2.3 ms profiled, ~1 ms
on the wall clock), so the products are also timed on the wall clock: each product op timed alone inside a step
(a dispatch mode around every ATen op, in a second run of each interleaved step), the rest being the step's
median wall time minus the products' median. From those, for training: the MFU of the step (model FLOPs over the
wall time and the n x n matmul rate measured between its steps, as `model_speed.py`) and the MFU if everything but
the products were free.

Usage:  python benchmarks/step_breakdown.py --size medium-small --output benchmarks/results/step_breakdown.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from _bench import ALLOCATOR_ENV, machine_info, use_fixed_allocator, write_report

if __name__ == "__main__":
    use_fixed_allocator()

import torch  # noqa: E402

from model_speed import (OPTIMIZER, OPTIMIZERS, build_pair, infer, inputs, make_optimizer,  # noqa: E402
                         matmul_flops, train_step)

from convbert.model.flops import encoder_forward_flops_per_token  # noqa: E402

PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
            "mkldnn::_linear_pointwise"}
CONVOLUTIONS = {"aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::convolution_backward",
                "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::thnn_conv2d"}


def kind_of(op: str) -> str:
    if op in PRODUCTS:
        return "matrix products"
    if op in CONVOLUTIONS:
        return "convolutions"
    return "rest"


def profile_split(step) -> dict:
    """Self CPU seconds by kind of op over one call of `step`, and the rest's largest ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_kind: dict[str, float] = defaultdict(float)
    rest: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        kind = kind_of(event.key)
        by_kind[kind] += seconds
        if kind == "rest":
            rest[event.key] += seconds
    total = sum(by_kind.values())
    top = sorted(rest.items(), key=lambda kv: -kv[1])[:12]
    return {"profiled_seconds": total, "seconds_by_kind": dict(by_kind),
            "share_by_kind": {k: v / total for k, v in by_kind.items()}, "largest_other_ops": dict(top)}


def product_wall_seconds(step) -> float:
    """Wall-clock seconds of one call of `step` spent inside matrix-product ops, each timed on its own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    # (under inference mode composite ops reach the mode undecomposed: `linear` and `matmul` are products too)
    names = {op.replace("::", ".") for op in PRODUCTS} | {"aten.linear", "aten.matmul", "aten.einsum"}
    total = 0.0

    class ProductTimer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal total
            if str(func.overloadpacket) not in names:
                return func(*args, **(kwargs or {}))
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            total += time.perf_counter() - start
            return out

    with ProductTimer():
        step()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium-small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (median), after 2 warm-ups")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=OPTIMIZER,
                        help="the training step's optimiser, the same for both models (as model_speed.py)")
    parser.add_argument("--output", default=None,
                        help="JSON report (default benchmarks/results/step_breakdown.json for medium-small, "
                             "step_breakdown_SIZE.json for another size)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, hf = build_pair(args.size)
    ids, mask, types = inputs(args.batch, args.length)
    optimizers = {"ours": make_optimizer(ours, args.optimizer), "hf": make_optimizer(hf, args.optimizer)}
    models = {"ours": ours, "hf": hf}

    def step(name: str, phase: str):
        model, is_hf = models[name], name == "hf"
        if phase == "train":
            model.train()
            return lambda: train_step(model, optimizers[name], ids, mask, types, is_hf)
        model.eval()
        return lambda: infer(model, ids, mask, types, is_hf)

    report = {"machine": machine_info(args.threads), "allocator": ALLOCATOR_ENV, "size": args.size,
              "batch": args.batch, "length": args.length, "optimizer": args.optimizer, "phases": {}}
    for phase in ("train", "inference"):
        wall, products, rooflines = {"ours": [], "hf": []}, {"ours": [], "hf": []}, []
        for i in range(2 + args.steps):  # interleaved: A B A B; each step once plain, once with its products timed
            for name in ("ours", "hf"):
                fn = step(name, phase)
                t = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t
                if i >= 2:
                    wall[name].append(seconds)
                    products[name].append(product_wall_seconds(fn))
            if i >= 2 and phase == "train":
                rooflines.append(matmul_flops(repeats=5))  # between steps, as model_speed.py: the VM drifts
        result = {}
        flops = 3 * encoder_forward_flops_per_token(ours.config, args.length) * args.batch * args.length
        roofline = statistics.median(rooflines) if rooflines else None
        for name in ("ours", "hf"):
            split = profile_split(step(name, phase))
            seconds, product_seconds = statistics.median(wall[name]), statistics.median(products[name])
            result[name] = {"wall_seconds": seconds, **split, "products_wall_seconds": product_seconds,
                            "products_wall_share": product_seconds / seconds,
                            "rest_wall_seconds": seconds - product_seconds}
            if roofline is not None:  # training
                result[name].update(matmul_flops_per_s=roofline, matmul_flops_per_s_between_steps=rooflines,
                                    mfu=flops / seconds / roofline,
                                    mfu_if_only_products_cost=flops / product_seconds / roofline)
        products_only = result["ours"]["wall_seconds"] * result["ours"]["share_by_kind"].get("matrix products", 0.0)
        result["speedup"] = result["hf"]["wall_seconds"] / result["ours"]["wall_seconds"]
        result["ours_products_only_seconds"] = products_only
        result["speedup_bound_if_only_products_cost"] = result["hf"]["wall_seconds"] / products_only
        report["phases"][phase] = result

    print(f"{args.size}, batch {args.batch} x {args.length}, {args.threads} threads, torch {torch.__version__}, "
          f"optimizer {args.optimizer}")
    print(f"{'phase':10s} {'model':5s} {'wall s':>7s} {'products':>9s} {'convs':>6s} {'rest':>6s}  largest other ops")
    for phase, result in report["phases"].items():
        for name in ("ours", "hf"):
            r = result[name]
            share = r["share_by_kind"]
            others = ", ".join(f"{op.split('::')[-1]} {s * 1e3:.0f}ms" for op, s in list(r["largest_other_ops"].items())[:5])
            print(f"{phase:10s} {name:5s} {r['wall_seconds']:7.3f} {share.get('matrix products', 0):9.0%} "
                  f"{share.get('convolutions', 0):6.0%} {share.get('rest', 0):6.0%}  {others}")
        print(f"{phase:10s} speed-up {result['speedup']:.2f}x; if only our matrix products cost time: "
              f"{result['ours_products_only_seconds']:.3f} s, {result['speedup_bound_if_only_products_cost']:.2f}x")
        for name in ("ours", "hf"):
            r = result[name]
            mfu = (f"; MFU {r['mfu']:.0%}, {r['mfu_if_only_products_cost']:.0%} if only the products cost "
                   f"(matmul {r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)" if "mfu" in r else "")
            print(f"{phase:10s} {name:5s} wall clock: products {r['products_wall_seconds']:.3f} s "
                  f"({r['products_wall_share']:.0%}), the rest {r['rest_wall_seconds']:.3f} s{mfu}")
    if args.output is None:
        suffix = "" if args.size == "medium-small" else f"_{args.size}"
        args.output = f"benchmarks/results/step_breakdown{suffix}.json"
    write_report(args.output, report)


if __name__ == "__main__":
    main()
