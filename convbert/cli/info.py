"""`convbert info`: the presets, their parameter counts and training FLOPs."""

from __future__ import annotations

import argparse
import json

# = list(convbert.model.config.PRESETS), in the order `pretrain --size` lists them (a test keeps them equal;
# importing the model package loads torch, and building the parser for --help should not)
PRESET_NAMES = ("tiny", "small", "medium-small", "base")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print the model presets: sizes, parameters, training FLOPs per token",
                       description="Print a table per preset: layers, hidden, heads (self-attention / conv), groups, "
                                   "parameters (discriminator, generator, total in pre-training) and training FLOPs "
                                   "per token at length 128.")
    p.add_argument("--size", choices=PRESET_NAMES, action="append",
                   help="only this preset (repeatable); default: small, medium-small, base")
    p.add_argument("--attention", choices=("mixed", "plain"), default="mixed",
                   help="mixed: ConvBERT (default); plain: the ELECTRA-style baseline of the same size, as "
                        "`convbert pretrain --attention plain` trains it")
    p.add_argument("--kernels", action="store_true",
                   help="instead of the presets, print what this machine's fp32 CPU work runs with: the CPU (model, "
                        "vendor, family/model, PyTorch's vector capability), the matrix-multiply library "
                        "(CONVBERT_CPU_GEMM overrides), oneDNN's GELU epilogue, the inference residual fold, the "
                        "convolution kernels and the thread count; quote it beside any timing")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.kernels:
        return _print_kernels(args.json)
    from convbert.model.flops import preset_table

    sizes = list(dict.fromkeys(args.size or ["small", "medium-small", "base"]))  # each size once
    rows = preset_table(sizes, attention=args.attention)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        plain = row["attention"] == "plain"
        print(f"{row['size']} with plain attention (the ELECTRA-style baseline)" if plain else f"ConvBERT-{row['size']}")
        lines = [
            ("layers", row["layers"]),
            ("hidden / embedding", f"{row['hidden']} / {row['embedding']}"),
            ("heads (configured)", f"{row['heads']} (head size {row['head_size']})"),
            ("heads: self-attention / conv", f"{row['sa_heads']} / {row['conv_heads']}"),
            ("conv kernel / FFN groups", f"{'none' if plain else row['kernel']} / {row['groups']}"),
            ("generator hidden / heads", f"{row['generator_hidden']} / {row['generator_heads']}"),
            ("params: discriminator", f"{row['discriminator_params']:,}"),
            ("params: generator (+MLM head, no shared emb.)", f"{row['generator_params']:,}"),
            ("params: total in pre-training", f"{row['pretraining_params']:,}"),
            ("train FLOPs/token: fine-tuning", f"{row['finetune_train_flops_per_token']:.3e}"),
            ("train FLOPs/token: pre-training (gen+disc)", f"{row['pretrain_train_flops_per_token']:.3e}"),
        ]
        for label, value in lines:
            print(f"  {label:<48} {value}")
        print()
    return 0


def _print_kernels(as_json: bool) -> int:
    from convbert.model.kernels import cpu_kernel_choices

    choices = cpu_kernel_choices()
    if as_json:
        print(json.dumps(choices, indent=2))
        return 0
    print("fp32 CPU kernels of this process (docs/performance.md says why each is chosen)")
    for key, value in choices.items():
        print(f"  {key:<28} {value}")
    return 0
