"""One full replaced-token-detection training step: ours vs the same step built from transformers' ConvBERT modules.

For each size, both implementations run the identical step on identical inputs and threads:
masking (ours, host side) → generator encoder → MLM head at the 19 slots (tied to the shared word table) → fp32
Gumbel-max sample → scatter → discriminator encoder → discriminator head → 1·MLM + 50·RTD → backward → global-norm
clip → AdamWeightDecay step. The transformers side uses `transformers.ConvBertModel` for both encoders (the generator
shares the discriminator's `ConvBertEmbeddings` module, as in the original), `ConvBertGeneratorPredictions` and a
two-layer discriminator head; the sampling, losses and optimiser are the same code as ours.

Reported per size and implementation: parameters, median seconds per step, tokens/s (batch × length / median),
model FLOP/s (`convbert.model.flops.pretraining_counts`: 3 × the forward FLOPs of both networks and heads), and peak
memory of the step (CPU: peak RSS during the steps minus RSS before them, each run in a fresh subprocess;
CUDA: `torch.cuda.max_memory_allocated`). Note: transformers cannot represent a one-head generator (spec §1.6; the
small and tiny generators), so there its generator is slightly smaller than ours.

`--compile MODE` compiles our step's pieces (as `convbert pretrain --compile` does: the encoders, heads, losses, the
sampler's arithmetic and the optimiser's update; `--compiled-pieces encoders` compiles the encoders only; the
transformers side stays eager). The implementation `ours-graphed` is ours with the whole step captured as CUDA
graphs (as `convbert pretrain --cuda-graphs` does: `convbert.pretrain.cuda_graph.GraphedTrainStep`; CUDA only;
composes with `--compile`).
`--project-steps N` (default 1M, the recipe's length) prints the projected time of N steps at the measured
median.

Usage: python benchmarks/pretrain_step.py --sizes tiny small medium-small --batch 32 --length 128 --steps 6
       [--threads 2] [--device cpu|cuda] [--precision fp32|bf16] [--compile none|default|reduce-overhead]
       [--impls ours ours-graphed transformers] [--compiled-depthwise shift|conv1d] [--inductor KEY=VALUE ...]
       [--compiled-pieces all|encoders]
       [--output benchmarks/results/pretrain_step.json]
Profile one configuration's GPU kernels: add --child --size SIZE --impl IMPL --profile N (prints the N kernels with
the most GPU time over 3 more steps, e.g. benchmarks/results/gpu/profile_compiled.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from _bench import machine_info, vm_hwm_bytes, write_report


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HFReplacedTokenDetection(nn.Module):
    """The pre-training step assembled from transformers' ConvBERT modules."""

    def __init__(self, config, fraction: float):
        super().__init__()
        import transformers
        from transformers.models.convbert.modeling_convbert import ConvBertGeneratorPredictions

        def hf_config(c):
            values = {k: v for k, v in c.to_hf_dict().items()
                      if k not in ("model_type", "architectures", "convbert_extra")}
            return transformers.ConvBertConfig(**values)

        dcfg, gcfg = hf_config(config), hf_config(config.generator_config(fraction))
        self.discriminator = transformers.ConvBertModel(dcfg)
        self.generator = transformers.ConvBertModel(gcfg)
        self.generator.embeddings = self.discriminator.embeddings  # shared tables + embedding LayerNorm
        self.generator_predictions = ConvBertGeneratorPredictions(gcfg)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        h = config.hidden_size
        self.disc_dense = nn.Linear(h, h)
        self.disc_out = nn.Linear(h, 1)

    def forward(self, batch, sample_generator=None):
        from convbert.pretrain.masking import scatter_update
        from convbert.pretrain.model import gather_positions, gumbel_sample

        gh = self.generator(input_ids=batch.input_ids, attention_mask=batch.input_mask,
                            token_type_ids=batch.segment_ids).last_hidden_state
        g = self.generator_predictions(gather_positions(gh, batch.positions)).float()
        logits = F.linear(g, self.discriminator.embeddings.word_embeddings.weight, self.output_bias)
        w = batch.weights
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.target_ids.reshape(-1), reduction="none")
        gen_loss = (ce * w.reshape(-1)).sum() / (w.sum() + 1e-6)
        sampled = gumbel_sample(logits, 1.0, sample_generator)
        fake, updated = scatter_update(batch.original_ids, sampled, batch.positions)
        labels = (updated.bool() & (fake != batch.original_ids)).float()
        dh = self.discriminator(input_ids=fake, attention_mask=batch.input_mask,
                                token_type_ids=batch.segment_ids).last_hidden_state
        d = self.disc_out(F.gelu(self.disc_dense(dh))).squeeze(-1).float()
        m = batch.input_mask.float()
        disc_loss = (F.binary_cross_entropy_with_logits(d, labels, reduction="none") * m).sum() / (m.sum() + 1e-6)

        class Out:
            pass

        out = Out()
        out.loss = gen_loss + 50.0 * disc_loss
        return out


def inductor_options(pairs: list[str]) -> dict:
    """`--inductor combo_kernels=True` → {"combo_kernels": True}: values are Python literals, else strings."""
    import ast

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--inductor {pair!r}: expected KEY=VALUE, e.g. combo_kernels=True")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    from convbert.model.config import PRESET_GENERATOR_FRACTION, ConvBertConfig
    from convbert.optim import AdamWeightDecay, param_groups
    from convbert.precision import allow_tf32_under_autocast, autocast
    from convbert.pretrain.masking import mask_batch
    from convbert.pretrain.model import ElectraPretrainingModel

    device = torch.device(args.device)
    allow_tf32_under_autocast(args.precision, device)  # as the trainer does (both implementations)
    torch.manual_seed(0)
    config = ConvBertConfig.from_preset(args.size, vocab_size=args.vocab, max_position_embeddings=max(512, args.length))
    fraction = PRESET_GENERATOR_FRACTION[args.size]
    if args.impl.startswith("ours"):
        model = ElectraPretrainingModel(config, fraction)
    else:
        model = HFReplacedTokenDetection(config, fraction)
    model.to(device).train()
    opt = AdamWeightDecay(param_groups(model, 0.01), lr=1e-4)
    if args.impl.startswith("ours") and args.compile != "none":  # as `convbert pretrain --compile`
        from convbert.model import kernels

        kernels.compiled_depthwise_as_conv1d = args.compiled_depthwise == "conv1d"
        # torch.compile takes a mode or Inductor options, not both (options imply the default mode)
        how = {"options": inductor_options(args.inductor)} if args.inductor else {"mode": args.compile}
        model.compile_pieces(encoders_only=args.compiled_pieces == "encoders", **how)
        if args.compiled_pieces == "all":
            opt.compile_update()
    params = sum(p.numel() for p in model.parameters())
    from convbert.model.flops import pretraining_counts

    flops_per_token = pretraining_counts(config, fraction)["pretrain_train_flops_per_token"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, args.vocab, (args.batch, args.length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    seg = torch.zeros_like(ids)
    mask_gen = torch.Generator().manual_seed(2)
    sample_gen = torch.Generator(device=device).manual_seed(3)

    def next_batch():
        batch = mask_batch(ids, mask, seg, cls_id=2, sep_id=3, mask_id=4, generator=mask_gen)
        return batch.pin_memory() if device.type == "cuda" else batch

    if args.impl == "ours-graphed":
        from convbert.pretrain.cuda_graph import GraphedTrainStep

        graphed = GraphedTrainStep(model, opt, precision=args.precision, max_grad_norm=1.0, sample_generator=sample_gen)
        prefetched = [next_batch()]

        def step():  # as `convbert pretrain --cuda-graphs`: replay, mask the next batch meanwhile, read, replay, read
            stats = graphed.compute(prefetched[0])
            prefetched[0] = next_batch()
            loss = float(stats.cpu()[0])
            float(graphed.update(1e-4))
            return loss
    else:
        def step():
            batch = next_batch().to(device, non_blocking=True)
            with autocast(args.precision, device):
                out = model(batch, sample_generator=sample_gen)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(out.loss.detach())

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_bytes()
    if device.type != "cuda":  # reset the peak (VmHWM) to the current RSS: only the steps count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = vm_hwm_bytes() - rss0
    replay_times = []  # the two graphs back to back, no host work between steps: what the GPU itself takes
    if args.impl == "ours-graphed":
        for _ in range(args.steps):
            t0 = time.perf_counter()
            for graph in graphed.graphs.values():
                graph.replay()
            if device.type == "cuda":
                torch.cuda.synchronize()
            replay_times.append(time.perf_counter() - t0)
    if args.profile and device.type == "cuda":  # which kernels the GPU time goes to (eager or graph replay alike)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.profile,
                                          max_name_column_width=120)
        print(table, file=sys.stderr, flush=True)
    return {"size": args.size, "impl": args.impl, "params": params, "times": times, "loss": loss,
            "replay_times": replay_times,
            "peak_bytes": int(peak), "flops_per_token": flops_per_token}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium-small"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternate ours/transformers this many times per size")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", default="none",
                    choices=["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="torch.compile our step's pieces with this mode")
    ap.add_argument("--compiled-depthwise", default="shift", choices=["shift", "conv1d"],
                    help="with --compile on CUDA: the depthwise conv as Inductor's fused shift-and-add (the library's "
                         "choice) or as the grouped conv1d (kernels.compiled_depthwise_as_conv1d), to compare")
    ap.add_argument("--compiled-pieces", default="all", choices=["all", "encoders"],
                    help="with --compile: what of ours is compiled: all (as `convbert pretrain --compile`: encoders, "
                         "heads, losses, sampler, optimiser update) or the encoders only, to compare")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="with --compile default: an Inductor config option for our encoders (repeatable), e.g. "
                         "combo_kernels=True; torch.compile takes these instead of a mode")
    ap.add_argument("--impls", nargs="+", default=["ours", "transformers"],
                    choices=["ours", "ours-graphed", "transformers"], help="ours-graphed: CUDA graphs, CUDA only")
    ap.add_argument("--project-steps", type=int, default=1_000_000)
    ap.add_argument("--output", default="benchmarks/results/pretrain_step.json")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="CUDA: print the N kernels with the most GPU time over 3 more steps (child runs only)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inductor and args.compile != "default":
        ap.error("--inductor needs --compile default (torch.compile takes a mode or options, not both)")
    inductor_options(args.inductor)  # a malformed pair fails here, before any child runs
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("pretrain_step.py --device cuda: no CUDA device here (--device cpu times the CPU step)")
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    impls = list(args.impls)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: measuring ours only", file=sys.stderr)
        impls = [i for i in impls if i != "transformers"]
    from convbert.pretrain.config import COMPILE_MODES_WITH_CUDA_GRAPHS

    if "ours-graphed" in impls and args.device != "cuda":
        print("ours-graphed needs a CUDA device: left out", file=sys.stderr)
        impls = [i for i in impls if i != "ours-graphed"]
    if "ours-graphed" in impls and args.compile in COMPILE_MODES_WITH_CUDA_GRAPHS:
        print(f"ours-graphed: --compile {args.compile} captures CUDA graphs of its own (as `convbert pretrain` "
              "refuses to combine them): left out", file=sys.stderr)
        impls = [i for i in impls if i != "ours-graphed"]
    measured = {}  # size -> impl -> the children's raw numbers
    for size in args.sizes:
        per = measured.setdefault(size, {impl: {"times": [], "peaks": [], "replay_times": []} for impl in impls})
        for _ in range(args.rounds):
            for impl in impls:
                cmd = [sys.executable, __file__, "--child", "--size", size, "--impl", impl, "--batch", str(args.batch),
                       "--length", str(args.length), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--threads", str(args.threads), "--vocab", str(args.vocab), "--device", args.device,
                       "--precision", args.precision, "--compile", args.compile,
                       "--compiled-depthwise", args.compiled_depthwise, "--compiled-pieces", args.compiled_pieces]
                cmd += [f"--inductor={pair}" for pair in args.inductor]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(f"{size}/{impl} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    break
                r = json.loads(line[len("RESULT "):])
                per[impl]["times"] += r["times"]
                per[impl]["replay_times"] += r["replay_times"]
                per[impl]["peaks"].append(r["peak_bytes"])
                per[impl]["params"] = r["params"]
                per[impl]["flops_per_token"] = r["flops_per_token"]
                # Progress, and the report so far: a run stopped by a time limit keeps what it measured.
                print(f"{size}/{impl}: median {statistics.median(r['times']) * 1000:.1f} ms/step", flush=True)
                write_report(args.output, report(args, measured), quiet=True)
    final = report(args, measured)
    print(final["table"])
    write_report(args.output, final)


def report(args, measured: dict) -> dict:
    """The table and JSON report of what has been measured so far."""
    results = []
    for size, per in measured.items():
        for impl, m in per.items():
            if not m["times"]:
                continue
            med = statistics.median(m["times"])
            results.append({
                "size": size, "impl": impl, "params": m["params"], "median_step_s": med,
                "tokens_per_s": args.batch * args.length / med, "peak_mb": max(m["peaks"]) / 2**20,
                "model_tflops": m["flops_per_token"] * args.batch * args.length / med / 1e12,
                "steps_timed": len(m["times"]),
                "median_replay_s": statistics.median(m["replay_times"]) if m["replay_times"] else None,
                "projected_hours": args.project_steps * med / 3600,
            })
    where = args.device
    if args.device == "cuda":
        where += f" ({torch.cuda.get_device_name(0)})"
    compiled = args.compile if args.compile == "none" else (f"{args.compile} ({args.compiled_pieces}), depthwise "
                                                            f"conv: {args.compiled_depthwise}")
    tuned = args.inductor + [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("TORCHINDUCTOR_")]
    if args.compile != "none" and tuned:
        compiled += f", Inductor: {' '.join(tuned)}"
    header = (f"replaced-token-detection step, batch {args.batch} x {args.length}, {args.precision}, "
              f"{args.threads} thread(s), {where}, ours compiled: {compiled}")
    lines = [header, "", f"| size | implementation | params | ms/step (median) | tokens/s | model TFLOP/s | "
             f"peak memory MB | {args.project_steps:,} steps |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['size']} | {r['impl']} | {r['params']:,} | {r['median_step_s'] * 1000:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.2f} | {r['peak_mb']:.0f} | "
                     f"{r['projected_hours']:.1f} h |")
    lines.append("")
    for r in results:
        if r["median_replay_s"] is not None:
            lines.append(f"{r['size']}: {r['impl']}: the two graphs alone take {r['median_replay_s'] * 1000:.1f} ms; "
                         f"host work between steps (masking, copies, reads) "
                         f"{(r['median_step_s'] - r['median_replay_s']) * 1000:.1f} ms")
    for size in measured:
        by = {r["impl"]: r for r in results if r["size"] == size}
        for impl, ref in (("ours", "transformers"), ("ours-graphed", "transformers"), ("ours-graphed", "ours")):
            if impl in by and ref in by:
                lines.append(f"{size}: {impl} is {by[ref]['median_step_s'] / by[impl]['median_step_s']:.2f}x "
                             f"the speed of {'the transformers-built step' if ref == 'transformers' else 'ours eager'}")
    text = "\n".join(lines)
    return {"settings": {k: getattr(args, k) for k in ("sizes", "batch", "length", "steps", "warmup", "rounds",
                                                        "threads", "vocab", "device", "precision", "compile",
                                                        "compiled_depthwise", "compiled_pieces", "inductor", "impls",
                                                        "project_steps")},
            "machine": machine_info(args.threads),
            "results": results, "table": text}


if __name__ == "__main__":
    main()
