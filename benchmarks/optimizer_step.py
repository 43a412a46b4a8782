"""One optimiser step over a real model's parameters: each update path of `AdamWeightDecay` and of `torch.optim.AdamW`.

The parameters and gradients are those of the pre-training model (generator + discriminator + heads, the shared
embeddings once) or of the bare encoder (`--model encoder`, what `model_speed.py` trains). Each optimiser gets its own
copy of them and its state is warmed up first; then the optimisers take turns (A B C … A B C …) and each is timed
over `--steps` steps (median). `AdamWeightDecay` is the original's update (no bias correction); its paths are
`fused` (PyTorch's fused AdamW kernel with the correction switched off, the CPU default), `loop` (one parameter at a
time, ~9 passes each) and `foreach` (multi-tensor kernels, the GPU default). `torch.optim.AdamW` (bias-corrected,
so not our update) is timed for scale: its default (a loop on the CPU), `foreach` and `fused`. After timing, the
parameters of the three `AdamWeightDecay` paths are compared (they saw the same gradients).

Usage:  python benchmarks/optimizer_step.py --size medium-small --steps 20 --output benchmarks/results/optimizer_step.json
"""

from __future__ import annotations

import argparse
import statistics
import time

from _bench import ALLOCATOR_ENV, machine_info, use_fixed_allocator, write_report

if __name__ == "__main__":
    use_fixed_allocator()

import torch  # noqa: E402

from convbert.model import ConvBertConfig, ConvBertModel  # noqa: E402
from convbert.optim import AdamWeightDecay, param_groups  # noqa: E402
from convbert.pretrain.model import ElectraPretrainingModel  # noqa: E402


def optimisers(model: torch.nn.Module) -> dict:
    """name → (optimiser over a fresh copy of the model's parameters, that copy's parameter list)."""
    def fresh():
        copy = {name: torch.nn.Parameter(p.detach().clone()) for name, p in model.named_parameters()}
        groups = [{**g, "params": [copy[n] for n in g["param_names"]]} for g in param_groups(model, 0.01)]
        return groups, list(copy.values())

    made = {}
    for name, kwargs in (("AdamWeightDecay fused", {"fused": True}), ("AdamWeightDecay loop", {"fused": False}),
                         ("AdamWeightDecay foreach", {"foreach": True})):
        groups, params = fresh()
        made[name] = (AdamWeightDecay(groups, lr=1e-4, **kwargs), params)
    for name, kwargs in (("torch AdamW default", {}), ("torch AdamW foreach", {"foreach": True}),
                         ("torch AdamW fused", {"fused": True})):
        groups, params = fresh()
        for g in groups:
            g.pop("lr_scale"), g.pop("param_names")
        made[name] = (torch.optim.AdamW(groups, lr=1e-4, eps=1e-6, **kwargs), params)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium-small")
    parser.add_argument("--model", default="pretraining", choices=["pretraining", "encoder"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each optimiser (after 3 untimed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/optimizer_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ConvBertConfig.from_preset(args.size)
    model = ElectraPretrainingModel(config) if args.model == "pretraining" else ConvBertModel(config)
    made = optimisers(model)
    count = sum(p.numel() for p in next(iter(made.values()))[1])
    grads = [[torch.randn_like(p) * 1e-3 for p in next(iter(made.values()))[1]] for _ in range(2)]

    seconds = {name: [] for name in made}
    for i in range(3 + args.steps):
        for name, (opt, params) in made.items():
            for p, g in zip(params, grads[i % 2]):
                p.grad = g  # the same gradients for every optimiser (read only by the update)
            t = time.perf_counter()
            opt.step()
            if i >= 3:
                seconds[name].append(time.perf_counter() - t)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    reference = made["AdamWeightDecay loop"][1]
    diffs = {name: max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                       for a, b in zip(made[name][1], reference))
             for name in ("AdamWeightDecay fused", "AdamWeightDecay foreach")}
    paths = {name: opt.update_path([p for p in params if p.grad is not None])
             for name, (opt, params) in made.items() if isinstance(opt, AdamWeightDecay)}

    base = medians["AdamWeightDecay loop"]
    print(f"{args.size} {args.model} model, {count / 1e6:.2f}M parameters, threads {args.threads}, "
          f"{args.steps} steps each (median), interleaved")
    print(f"{'optimiser':<26}{'ms / step':>10}{'vs loop':>9}{'GB/s*':>8}")
    for name, m in medians.items():
        print(f"{name:<26}{m * 1e3:>10.1f}{base / m:>8.2f}x{7 * 4 * count / m / 1e9:>8.1f}")
    print("* 7 fp32 tensors per parameter read or written once (p, g, m, v read; p, m, v written) per second")
    for name, d in diffs.items():
        print(f"{name} vs loop after {3 + args.steps} steps: max |diff| / max |p| per tensor = {d:.1e}")
    write_report(args.output, {
        "machine": machine_info(args.threads), "allocator_env": ALLOCATOR_ENV, "size": args.size,
        "model": args.model, "parameters": count, "steps": args.steps, "median_seconds": medians,
        "seconds": seconds, "speedup_over_loop": {n: base / m for n, m in medians.items()},
        "adamweightdecay_paths": paths, "max_relative_diff_vs_loop": diffs})


if __name__ == "__main__":
    main()
