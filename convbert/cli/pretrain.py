"""`convbert pretrain`, `convbert export` and `convbert quickstart`."""

from __future__ import annotations

import argparse
import math

from convbert.cli import check_seed
from convbert.errors import ConvBertError

# = the per-size values of convbert.pretrain.config.SIZE_DEFAULTS that --help shows (a test keeps them equal; that
# module loads torch, and --help should not)
HELP_SIZE_DEFAULTS = {
    "steps": {"tiny": 2000, "small": 1_000_000, "medium-small": 1_000_000, "base": 1_000_000},
    "batch_size": {"tiny": 32, "small": 128, "medium-small": 128, "base": 256},
    "eval_batch_size": {"tiny": 32, "small": 128, "medium-small": 128, "base": 256},
    "lr": {"tiny": 1e-3, "small": 3e-4, "medium-small": 5e-4, "base": 2e-4},
    "warmup_steps": {"tiny": 100, "small": 10_000, "medium-small": 10_000, "base": 10_000},
}


def _by_size(key: str) -> str:
    """'default by size: tiny 32, small 128, …' for --help."""
    def fmt(v):
        return f"{v:,}" if isinstance(v, int) else f"{v:g}"
    return "default by size: " + ", ".join(f"{size} {fmt(v)}" for size, v in HELP_SIZE_DEFAULTS[key].items())


# = convbert.pretrain.config.COMPILE_MODES (not imported: that module loads torch, and --help should not)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train ConvBERT with ELECTRA replaced-token detection (CPU, GPU, torchrun DDP)",
        description=(
            "Pre-train a ConvBERT discriminator with the original ELECTRA recipe (spec §3). Settings resolve as: "
            "per-size defaults <- --config YAML <- flags <- --set key=value. Re-running the command (settings not given again are the run's own) continues "
            "from the latest checkpoint in --output. Multi-GPU / multi-node: launch with torchrun."
        ),
    )
    p.add_argument("--data", help="dataset folder written by `convbert build-data`")
    p.add_argument("--eval-data", help="held-out dataset folder (default: the first eval/, heldout/, held-out/, "
                   "valid/, validation/ or dev/ subfolder of --data; without one, the last 2 %% of --data, at least "
                   "one example and at most --eval-batches x eval_batch_size, is held out and not trained on)")
    p.add_argument("--vocab", help="the vocab.txt the data was built with (default: found via the data manifest)")
    p.add_argument("--size", choices=["tiny", "small", "medium-small", "base"],
                   help="model size; sets the recipe defaults of spec §3.8 (default medium-small)")
    p.add_argument("--output", help="run folder (checkpoints, logs, resolved configuration)")
    p.add_argument("--init-from", metavar="MODEL",
                   help="start from these weights instead of from scratch: a folder written by `convbert export` or "
                        "`convbert import-tf` (discriminator, vocab.txt; generator/ and the replaced-token head if "
                        "there), or transformers' ELECTRA folders (discriminator, generator/ = its generator; with "
                        "--attention plain), e.g. to continue pre-training the released weights on your corpus")
    p.add_argument("--steps", type=int, help=f"optimisation steps ({_by_size('steps')})")
    p.add_argument("--batch-size", type=int,
                   help=f"global batch size over all ranks and accumulation steps ({_by_size('batch_size')})")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation micro-steps per optimisation step")
    p.add_argument("--lr", type=float, help=f"peak learning rate ({_by_size('lr')})")
    p.add_argument("--warmup-steps", type=int,
                   help=f"linear warmup steps, multiplied into the linear decay ({_by_size('warmup_steps')}; a run "
                        "shorter than 10x that warms up over 1 %% of its steps, tiny over at most 10 %%)")
    p.add_argument("--seed", type=int, help="random seed (default 42)")
    p.add_argument("--save-every", type=int,
                   help="checkpoint every N steps (plus milestones and the last step; 0: only those; default 10,000, "
                        "tiny 500, at most --steps)")
    p.add_argument("--keep-checkpoints", type=int,
                   help="keep the last N regular checkpoints (milestones are kept; 0: keep all; default 3)")
    p.add_argument("--eval-every", type=int,
                   help="held-out evaluation every N steps (0: only at start and end; default 10,000, tiny 500)")
    p.add_argument("--eval-batches", type=int,
                   help="batches per held-out evaluation (0: no held-out evaluation; default 50)")
    p.add_argument("--eval-batch-size", type=int,
                   help=f"examples per held-out evaluation batch ({_by_size('eval_batch_size')})")
    p.add_argument("--config", help="YAML recipe file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting (repeatable), e.g. --set model.hidden_dropout_prob=0.0")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the latest checkpoint (also what re-running the command does); error if none")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (default fp32)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the encoders, heads, losses, the sampler's arithmetic and the optimiser's "
                        "update (for GPUs; on CPUs our eager kernels are faster)")
    p.add_argument("--compile-mode", choices=list(COMPILE_MODES),
                   help="torch.compile mode (implies --compile; reduce-overhead and max-autotune add "
                        "CUDA graphs per encoder)")
    p.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="capture the whole training step as CUDA graphs (one GPU, fp32 or bf16): "
                        "removes the kernel-launch overhead that bounds the eager step of these small models")
    p.add_argument("--masking", choices=["with-replacement", "without-replacement"],
                   help="masked positions drawn with replacement (original) or without")
    p.add_argument("--attention", choices=["mixed", "plain"],
                   help="mixed = ConvBERT; plain = ELECTRA baseline (full self-attention only)")
    p.add_argument("--objective", choices=["electra", "mlm"],
                   help="electra = replaced-token detection; mlm = BERT-style masked LM on one network")
    p.add_argument("--max-bad-steps", type=int, help="stop after N non-finite losses in a row (default 10)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (default: the GPU if there is one)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default or 0: torch's choice)")
    p.add_argument("--stop-at-step", type=int,
                   help="checkpoint and stop at this step (the schedule still spans --steps); re-run to continue")
    p.add_argument("--time-limit", type=float,
                   help="seconds of training in this invocation; then checkpoint, evaluate and stop (re-run continues)")
    p.add_argument("--log-every", type=int, help="write a JSONL/TensorBoard record every N steps (default 1)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a status line (step, loss, tokens/s, ETA) every minute instead, as when "
                        "stderr is not a terminal (a batch job's log)")
    p.set_defaults(func=run_pretrain)


FLAG_KEYS = (
    "data", "eval_data", "vocab", "output", "init_from", "steps", "batch_size", "grad_accum", "lr", "warmup_steps", "seed", "save_every",
    "keep_checkpoints", "eval_every", "eval_batches", "eval_batch_size", "precision", "compile", "compile_mode", "cuda_graphs", "masking",
    "attention", "objective", "max_bad_steps", "device", "stop_at_step", "time_limit", "log_every", "threads",
)


def pretrain_flags(args: argparse.Namespace) -> dict:
    """The settings given on the command line (None: not given)."""
    flags = {k: getattr(args, k, None) for k in FLAG_KEYS}
    if flags["compile_mode"] is not None:
        flags["compile"] = True
    return flags


def run_pretrain(args: argparse.Namespace) -> int:
    from convbert.pretrain.config import resolve_config
    from convbert.pretrain.trainer import run_pretraining

    flags = pretrain_flags(args)
    if args.resume and not flags["data"] and flags["output"]:
        from convbert.pretrain.config import recorded_settings

        if not recorded_settings(flags["output"])[0]:  # else "no training data" would hide the real cause
            raise ConvBertError(f"--resume: no run to continue at {flags['output']} (no run_config.json with a "
                                f"checkpoint under {flags['output']}/checkpoints); check the --output path")
    cfg = resolve_config(args.size, args.config, flags, args.set)
    result = run_pretraining(cfg, resume=True if args.resume else None,
                             progress="lines" if args.no_progress else True)
    ev = result.get("eval") or {}
    if result.get("finished") and ev:
        auc = ev.get("disc_auc")
        print(
            f"pretrain: finished {result['step']} steps; held-out "
            + (f"disc AUC {auc:.4f}, " if isinstance(auc, float) else "")
            + f"MLM accuracy {ev.get('masked_lm_accuracy', float('nan')):.4f}; run folder {cfg.output}"
        )
    if result.get("stopped_by"):  # stopped by SIGINT/SIGTERM after a checkpoint: the shell's code for that signal
        import signal

        name = result["stopped_by"]
        return 128 + int(getattr(signal, name, signal.SIGTERM)) if name.startswith("SIG") else 143
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a pre-training checkpoint's discriminator (and generator) in the HF layout",
        description=(
            "Export the discriminator of a pre-training checkpoint as an HF-layout ConvBertModel folder with its "
            "vocab.txt and replaced-token head (the --attention plain baseline: as transformers' "
            "ElectraForPreTraining). --checkpoint may be a checkpoint folder or a run folder (its latest checkpoint)."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder for its latest checkpoint")
    p.add_argument("--output", required=True,
                   help="folder to write (an earlier export of the same run there is replaced)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export of another run in --output (refused without it)")
    p.add_argument("--generator", action="store_true",
                   help="also write the generator (ConvBertForMaskedLM layout; ElectraForMaskedLM for plain "
                        "attention) to <output>/generator/")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from convbert.pretrain.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.output, generator=args.generator, overwrite=args.overwrite)
    print(f"export: step {info['step']} of {info['checkpoint']} -> " + ", ".join(
        f"{k} {v}" for k, v in info["written"].items()))
    if info.get("replaced"):
        print(f"export: {info['replaced']}")
    for note in info.get("notes", []):
        print(f"export: note: {note}")
    return 0


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="end-to-end demo on CPU in minutes: vocab, data, pre-training, evaluation (and fine-tuning)",
        description=(
            "Harvest a corpus from the Python standard library's documentation (no download), train a WordPiece "
            "vocab, build the data, pre-train a tiny ConvBERT for a few minutes, report held-out discriminator AUC "
            "against the untrained model, plot the curves and, where fine-tuning is available, fine-tune on a small "
            "task built from the same text."
        ),
    )
    p.add_argument("--output", default="convbert-quickstart",
                   help="folder for everything it writes (default ./convbert-quickstart)")
    p.add_argument("--minutes", type=float, default=6.0,
                   help="total time budget in minutes (default 6; pre-training gets what the other stages leave)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="model size (default tiny)")
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning stage")
    p.set_defaults(func=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    from convbert.pretrain.quickstart import quickstart

    if not (math.isfinite(args.minutes) and args.minutes > 0):  # (nan compares false both ways)
        raise ConvBertError(f"--minutes {args.minutes}: expected a positive number of minutes")
    check_seed(args.seed)  # (before the corpus, vocab and data are built)
    quickstart(args.output, minutes=args.minutes, seed=args.seed, size=args.size, finetune=not args.no_finetune)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `convbert` parser."""
    _add_pretrain(sub)
    _add_export(sub)
    _add_quickstart(sub)
