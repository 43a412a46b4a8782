"""How many ATen ops one replaced-token-detection training step dispatches on the GPU's code path, counted on the CPU.

On a GPU the eager step of these small models is bound by launching ops, not by arithmetic: on an H200 the
encoder training step took 49, 54 and 58 ms for small, medium-small and base (16x the FLOPs), and the full RTD
step 92-102 ms for all three (`benchmarks/gpu_speed.py`, `benchmarks/pretrain_step.py`). So the number of ops per
step is the figure to bring down, and it can be counted without a GPU: this script runs the step on the CPU with
the model forced onto the ops it uses on CUDA (the plain-PyTorch path, not the CPU kernels) and counts every ATen
op with a dispatch mode, split into forward, backward and optimiser. Where CUDA runs one fused kernel for what the
CPU decomposes, the kernel is counted, not the CPU's ops: the span convolution (Triton, 1 + 1 launches a layer, plus
their buffers), the attention (flash attention: 1 kernel forward, 3 backward, plus buffers) and dropout (one
`native_dropout`, as `kernels.dropout` runs on CUDA, not the CPU's byte-mask ops).

Rows: the GPU path before and after its two GPU-only choices (`kernels._gpu_path`): the depthwise conv as one
grouped conv1d instead of the shift-and-add, and a contiguous gradient for the attention (one copy per layer).

Usage: python benchmarks/gpu_op_count.py --sizes small medium-small base --output benchmarks/results/gpu_op_count.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import machine_info, write_report  # noqa: E402

from convbert.model import kernels  # noqa: E402

VIEWS = {"view", "_unsafe_view", "transpose", "t", "slice", "select", "alias", "expand", "detach", "permute",
         "unsqueeze", "squeeze", "as_strided", "split", "reshape", "view_as"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.in_span_conv = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_span_conv:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_step(size: str, conv1d: bool, batch: int, length: int) -> dict:
    from convbert.model.config import PRESET_GENERATOR_FRACTION, ConvBertConfig
    from convbert.optim import AdamWeightDecay, param_groups
    from convbert.pretrain.masking import mask_batch
    from convbert.pretrain.model import ElectraPretrainingModel

    counter = OpCounter()
    saved = (kernels._lean_path, kernels._gpu_path, kernels._same_conv_forward, kernels._same_conv_backward,
             kernels.dropout)
    span_launches = collections.Counter()

    def as_triton(name, fn):  # per-position taps (the span conv): CUDA runs one Triton kernel instead
        def run(*args):
            x, taps = (args[0], args[1]) if name == "forward" else (args[1], args[2])
            if taps.dim() != x.dim() + 1:  # per-channel taps: the depthwise conv, counted as it runs
                return fn(*args)
            counter.in_span_conv += 1
            try:
                return fn(*args)
            finally:
                counter.in_span_conv -= 1
                span_launches[name] += 1
        return run

    sdpa = F.scaled_dot_product_attention

    class FlashAttention(torch.autograd.Function):  # CUDA's fused attention: one kernel forward, three backward
        @staticmethod
        def forward(ctx, q, k, v, mask, p, scale):
            ctx.save_for_backward(q, k, v, mask)
            ctx.p, ctx.scale = p, scale
            counter.in_span_conv += 1
            try:
                return sdpa(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
            finally:
                counter.in_span_conv -= 1
                span_launches["attention"] += 1

        @staticmethod
        def backward(ctx, grad):
            q, k, v, mask = ctx.saved_tensors
            counter.in_span_conv += 1
            try:
                with torch.enable_grad():
                    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
                    out = sdpa(*inputs, attn_mask=mask, dropout_p=ctx.p, scale=ctx.scale)
                    grads = torch.autograd.grad(out, inputs, grad)
            finally:
                counter.in_span_conv -= 1
                span_launches["attention_backward"] += 1
            return (*grads, None, None, None)

    def fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=None):
        return FlashAttention.apply(q, k, v, attn_mask, dropout_p, scale)

    def cuda_dropout(x, p, training):  # `kernels.dropout` runs F.dropout here too; CUDA's is one native_dropout
        return torch.ops.aten.native_dropout(x, p, True)[0] if training and p > 0.0 else x

    kernels._lean_path = lambda x: False
    kernels._gpu_path = lambda x: conv1d
    kernels._same_conv_forward = as_triton("forward", kernels._same_conv_forward)
    kernels._same_conv_backward = as_triton("backward", kernels._same_conv_backward)
    kernels.dropout = cuda_dropout
    F.scaled_dot_product_attention = fused_attention
    try:
        torch.manual_seed(0)
        model = ElectraPretrainingModel(ConvBertConfig.from_preset(size), PRESET_GENERATOR_FRACTION[size]).train()
        optimizer = AdamWeightDecay(param_groups(model, 0.01), lr=1e-4, foreach=True)
        ids = torch.randint(5, 30522, (batch, length), generator=torch.Generator().manual_seed(0))
        ids[:, 0], ids[:, -1] = 2, 3
        masking = torch.Generator().manual_seed(1)
        phases = {}

        def step(count: bool):
            b = mask_batch(ids, torch.ones_like(ids), torch.zeros_like(ids), cls_id=2, sep_id=3, mask_id=4,
                           generator=masking)
            for phase, run in (("forward", lambda: model(b)), ("backward", None), ("optimiser", None)):
                counter.counts = collections.Counter()
                span_launches.clear()
                with (counter if count else contextlib.nullcontext()):
                    if phase == "forward":
                        out = run()
                    elif phase == "backward":
                        out.loss.backward()
                    else:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                # a Triton forward: an output buffer and the launch; a backward: a contiguous copy of the
                # gradient, two buffers and the launch; flash attention: output and log-sum-exp buffers and the
                # kernel forward, three kernels and three gradient buffers backward
                triton = (span_launches["forward"] * 2 + span_launches["backward"] * 4
                          + span_launches["attention"] * 3 + span_launches["attention_backward"] * 6)
                phases[phase] = {"ops": sum(counter.counts.values()) + triton,
                                 "non_view_ops": sum(v for k, v in counter.counts.items() if k not in VIEWS) + triton}

        step(count=False)  # the optimiser's state is created on the first step
        step(count=True)
        return {"size": size, "depthwise": "conv1d (now)" if conv1d else "shift-and-add (before)", "phases": phases,
                "ops": sum(p["ops"] for p in phases.values()),
                "non_view_ops": sum(p["non_view_ops"] for p in phases.values())}
    finally:
        (kernels._lean_path, kernels._gpu_path, kernels._same_conv_forward, kernels._same_conv_backward,
         kernels.dropout) = saved
        F.scaled_dot_product_attention = sdpa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["small", "medium-small", "base"])
    ap.add_argument("--batch", type=int, default=2, help="op counts do not depend on it")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--output", default="benchmarks/results/gpu_op_count.json")
    args = ap.parse_args()
    rows = [count_step(size, conv1d, args.batch, args.length) for size in args.sizes for conv1d in (False, True)]
    lines = ["ATen ops per replaced-token-detection step on the GPU code path (counted on the CPU)", "",
             "| size | depthwise conv | forward | backward | optimiser | total | of which not views |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["phases"]
        lines.append(f"| {r['size']} | {r['depthwise']} | {p['forward']['ops']:,} | {p['backward']['ops']:,} | "
                     f"{p['optimiser']['ops']:,} | {r['ops']:,} | {r['non_view_ops']:,} |")
    text = "\n".join(lines)
    print(text)
    write_report(args.output, {"settings": vars(args), "machine": machine_info(torch.get_num_threads()), "results": rows,
                               "table": text})


if __name__ == "__main__":
    main()
