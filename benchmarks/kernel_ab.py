"""One CPU kernel choice on and off, in whole steps of our model: paired, interleaved, in one process.

Each `convbert.model.kernels` switch (`blocked_transposes`, `onednn_weight_gradients`, `onednn_gelu_epilogue`,
`cpu_depthwise_conv2d`, ...) changes how, not what, the model computes. This times a medium-small training step
(forward + backward + optimiser, lr 0: `model_speed.py`'s step) and inference with the switch on and off,
alternating which goes first, and reports the medians and the per-pair ratios (on / off): on a shared VM whose speed
drifts within a run, the paired ratio is the figure to quote. The outputs of the two settings are compared too.

`--flag fused_optimizer` times `AdamWeightDecay`'s fused CPU update (on) against its per-parameter loop (off) the
same way, in training steps only (inference has no optimiser).

Usage:  python benchmarks/kernel_ab.py --flag blocked_transposes --steps 20 --output benchmarks/results/ab.json
"""

from __future__ import annotations

import argparse
import statistics
import time

from _bench import ALLOCATOR_ENV, machine_info, use_fixed_allocator, write_report

if __name__ == "__main__":
    use_fixed_allocator()

import torch  # noqa: E402

from convbert.model import ConvBertConfig, ConvBertModel, kernels  # noqa: E402
from model_speed import OPTIMIZER, OPTIMIZERS, infer, inputs, make_optimizer, train_step  # noqa: E402


def quartiles(values: list[float]) -> dict:
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return {"q1": q1, "median": q2, "q3": q3}


OPTIMIZER_FLAG = "fused_optimizer"  # not a kernels switch: AdamWeightDecay's fused update (on) or its loop (off)


def paired(switch, run, steps: int) -> dict:
    """`run()` timed `steps` times after `switch(True)` and `switch(False)`, alternating the order pair by pair."""
    seconds = {True: [], False: []}
    for i in range(steps + 1):  # the first pair warms both settings up
        for setting in ((True, False) if i % 2 else (False, True)):
            switch(setting)
            t = time.perf_counter()
            run()
            if i:
                seconds[setting].append(time.perf_counter() - t)
    ratios = [on / off for on, off in zip(seconds[True], seconds[False])]
    return {"median_seconds_on": statistics.median(seconds[True]),
            "median_seconds_off": statistics.median(seconds[False]),
            "ratio_on_over_off": quartiles(ratios), "seconds_on": seconds[True], "seconds_off": seconds[False]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flag", required=True, help="a boolean in convbert.model.kernels, e.g. blocked_transposes, "
                                                      f"or {OPTIMIZER_FLAG}")
    parser.add_argument("--size", default="medium-small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed pairs of each (after one warm-up pair)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=OPTIMIZER, help="as model_speed.py's")
    parser.add_argument("--output", default=None, help="JSON report (default benchmarks/results/kernel_ab_FLAG.json)")
    args = parser.parse_args()
    on_optimizer = args.flag == OPTIMIZER_FLAG
    if on_optimizer and args.optimizer != "adamweightdecay":
        parser.error(f"--flag {OPTIMIZER_FLAG} switches AdamWeightDecay's update: it needs --optimizer adamweightdecay")
    if not on_optimizer and not isinstance(getattr(kernels, args.flag, None), bool):
        parser.error(f"--flag {args.flag}: not a boolean switch of convbert.model.kernels (nor {OPTIMIZER_FLAG})")
    torch.set_num_threads(args.threads)
    default = True if on_optimizer else getattr(kernels, args.flag)

    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset(args.size))
    ids, mask, types = inputs(args.batch, args.length)
    optimizer = make_optimizer(model, args.optimizer)  # lr 0: every step sees the same weights

    def switch(setting: bool) -> None:
        if on_optimizer:
            optimizer.fused = None if setting else False
        else:
            setattr(kernels, args.flag, setting)

    try:
        model.eval()
        outputs = {}
        for setting in (True, False):
            switch(setting)
            outputs[setting] = infer(model, ids, mask, types, hf=False)
        max_diff = (outputs[True] - outputs[False]).abs().max().item()
        inference = None if on_optimizer else paired(switch, lambda: infer(model, ids, mask, types, hf=False),
                                                      args.steps)
        model.train()
        training = paired(switch, lambda: train_step(model, optimizer, ids, mask, types, hf=False), args.steps)
    finally:
        switch(default)

    name = args.flag if on_optimizer else f"kernels.{args.flag}"
    print(f"{args.size}, batch {args.batch} x {args.length}, threads {args.threads}, {name} "
          f"on vs off (default {default}), {args.steps} pairs; allocator {ALLOCATOR_ENV}")
    for name, r in (("training step", training), ("inference", inference)):
        if r is None:
            continue
        q = r["ratio_on_over_off"]
        print(f"{name:<14} on {r['median_seconds_on']:.3f}s  off {r['median_seconds_off']:.3f}s  "
              f"on/off per pair: median {q['median']:.3f} (quartiles {q['q1']:.3f}, {q['q3']:.3f})")
    if not on_optimizer:
        print(f"inference outputs on vs off: max |diff| {max_diff:.1e}")
    write_report(args.output or f"benchmarks/results/kernel_ab_{args.flag}.json", {
        "machine": machine_info(args.threads), "allocator_env": ALLOCATOR_ENV, "flag": args.flag,
        "default": default, "optimizer": args.optimizer, "size": args.size, "batch": args.batch,
        "length": args.length, "steps": args.steps,
        "training": training, "inference": inference, "inference_max_abs_diff": max_diff})


if __name__ == "__main__":
    main()
