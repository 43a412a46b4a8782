"""Fine-tuning subcommands: `glue`, `finetune`, `predict`, `glue-download` (spec §5; docs/finetuning.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convbert.cli import check_seed
from convbert.errors import ConvBertError


def _add_recipe_args(p: argparse.ArgumentParser, epochs_help: str) -> None:
    g = p.add_argument_group("recipe (defaults: the original ConvBERT/ELECTRA fine-tuning recipe)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default by size: base 1e-4, small/medium-small 3e-4)")
    g.add_argument("--layer-decay", type=float, default=0.8,
                   help="layer-wise lr decay (default 0.8: top layer ×0.8², embeddings ×0.8^(L+2)); 1 = off")
    g.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay (default 0.01)")
    g.add_argument("--warmup-proportion", type=float, default=0.1, help="linear warmup fraction (default 0.1)")
    g.add_argument("--epochs", type=float, default=None, help=epochs_help)
    g.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    g.add_argument("--eval-batch-size", type=int, default=32, help="evaluation/prediction batch size (default 32)")
    g.add_argument("--max-seq-length", type=int, default=128, help="tokens per example (default 128)")
    g.add_argument("--max-train-examples", type=int, default=None,
                   help="use only the first N training examples (quick runs)")
    g.add_argument("--loss-reduction", choices=("sum", "mean"), default="sum",
                   help="per-example losses summed over the batch (original, default) or averaged")
    g.add_argument("--dynamic-padding", action="store_true",
                   help="pad each batch to its longest example instead of --max-seq-length (faster; not faithful: "
                        "the convolution branch sees padding)")
    g.add_argument("--no-double-unordered", action="store_true",
                   help="do not double MRPC/STS-B (or --symmetric own-task) training sets with swapped sentences")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default or 0: torch's choice)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32 (default), bf16 autocast (GPU, or a CPU with native bf16: ~1.7x faster there), or fp16 "
                        "autocast with loss scaling (a GPU's; runs on the CPU too, slowly); losses and reported "
                        "logits are fp32")


def _threads_and_device(args) -> str:
    """Apply --threads; the device --device names ("auto": cuda when available)."""
    if args.threads is not None and not 0 <= args.threads <= 4096:
        raise ConvBertError(f"--threads: expected 1..4096 (or 0: torch's choice), got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def _cfg(args, double_default=True):
    from convbert.finetune.trainer import FinetuneConfig

    device = _threads_and_device(args)
    cfg = FinetuneConfig(
        device=device,
        lr=args.lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        warmup_proportion=args.warmup_proportion,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        max_seq_length=args.max_seq_length,
        epochs=args.epochs,
        double_unordered=double_default and not args.no_double_unordered,
        loss_reduction=args.loss_reduction,
        pad_to_max=not args.dynamic_padding,
        max_train_examples=args.max_train_examples,
        precision=args.precision,
    )
    cfg.validate()
    if cfg.precision == "fp16":
        import torch

        from convbert.precision import fp16_note

        note = fp16_note(torch.device(device))
        if note:
            print(note, file=sys.stderr)
    return cfg


def _parse_seeds(text: str) -> list[int]:
    text = str(text).strip()
    try:
        listed = [int(s) for s in text.split(",") if s.strip()] if "," in text else None
        count = None if listed is not None else int(text)
    except ValueError:
        raise ConvBertError(f"--seeds must be a count N (seeds 1..N) or a comma list of seeds, got {text!r}")
    if count is not None and count < 1:
        raise ConvBertError(f"--seeds must be at least 1, got {count}")
    if (count if count is not None else len(listed)) > 1000:  # (before a list of a billion seeds is built)
        raise ConvBertError(f"--seeds {text if count is not None else f'lists {len(listed)} seeds'}: at most 1000 "
                            "runs per task")
    seeds = listed if listed is not None else list(range(1, count + 1))
    if len(set(seeds)) != len(seeds):
        raise ConvBertError(f"--seeds lists a seed twice: {text}")
    for seed in seeds:
        check_seed(seed, "--seeds")
    return seeds


def cmd_glue(args) -> int:
    from convbert.finetune.runner import GlueOptions, run_glue
    from convbert.finetune.tasks import parse_task_list

    if not args.predict:  # these shape the submission only
        given = [flag for flag, on in (("--fill-missing", args.fill_missing), ("--wnli model", args.wnli == "model"),
                                       ("--submission-seed", args.submission_seed != "best")) if on]
        if given:
            print(f"note: {', '.join(given)} only apply with --predict (no submission is built)", file=sys.stderr)
    opts = GlueOptions(
        model_dir=Path(args.model),
        glue_dir=Path(args.glue_dir),
        output=Path(args.output),
        tasks=parse_task_list(args.tasks),
        seeds=_parse_seeds(args.seeds),
        cfg=_cfg(args),
        predict=args.predict,
        fill_missing=args.fill_missing,
        wnli_majority=args.wnli != "model",
        submission_seed=args.submission_seed,
        save_models=args.save_models,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        reference=args.reference,
    )
    run_glue(opts)
    return 0


def cmd_finetune(args) -> int:
    from convbert.finetune.owntask import default_output, finetune_own_task

    cols = [c.strip() for c in args.text_columns.split(",") if c.strip()]
    if not 1 <= len(cols) <= 2:
        raise ConvBertError(f"--text-columns takes one or two column names (a or a,b), got {args.text_columns!r}")
    if args.symmetric and len(cols) != 2:
        raise ConvBertError(f"--symmetric: swaps the two sentences of a pair, but --text-columns names one "
                            f"({args.text_columns!r}); name two (a,b) or leave --symmetric out")
    output, note = ((Path(args.output), None) if args.output is not None
                    else default_output(args.model, args.train, overwrite=args.overwrite))
    finetune_own_task(
        model_dir=Path(args.model),
        train_file=Path(args.train),
        dev_file=Path(args.dev) if args.dev else None,
        text_columns=cols,
        label_column=args.label_column,
        regression=args.regression,
        output=output,
        cfg=_cfg(args, double_default=args.symmetric),
        seed=check_seed(args.seed, "--seed"),
        file_format=args.format,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        output_note=note,
        symmetric=args.symmetric,
    )
    return 0


def cmd_predict(args) -> int:
    from convbert.finetune.owntask import predict_file

    predict_file(
        model_dir=Path(args.model),
        input_file=Path(args.input),
        output_file=Path(args.output),
        batch_size=args.batch_size,
        file_format=args.format,
        text_columns=[c.strip() for c in args.text_columns.split(",")] if args.text_columns else None,
        keep_columns=[c.strip() for c in args.keep_columns.split(",")] if args.keep_columns else None,
        device=_threads_and_device(args),
        precision=args.precision,
        progress=not args.no_progress,
    )
    return 0


def cmd_glue_download(args) -> int:
    from convbert.finetune.glue_download import download_glue, layout_glue
    from convbert.finetune.tasks import parse_task_list

    if args.from_dir:
        layout_glue(Path(args.from_dir), Path(args.output), tasks=parse_task_list(args.tasks), layout=args.layout)
        return 0
    download_glue(
        Path(args.output),
        tasks=parse_task_list(args.tasks),
        layout=args.layout,
        base_url=args.base_url,
        mrpc_base_url=args.mrpc_base_url,
    )
    return 0


def cmd_glue_diagnostic(args) -> int:
    from convbert.finetune.diagnostic import (
        check_alignment,
        format_scores,
        read_ax_predictions,
        read_diagnostic_full,
        score_diagnostic,
    )
    from convbert.utils import write_json_atomic

    examples = read_diagnostic_full(args.diagnostic_full)
    if args.glue_dir:
        check_alignment(examples, args.glue_dir, args.diagnostic_full)
    predictions = read_ax_predictions(args.predictions, len(examples), args.diagnostic_full)
    scores = score_diagnostic(predictions, examples)
    print(format_scores(scores))
    if args.output:
        write_json_atomic(args.output, {"predictions": str(args.predictions),
                                        "diagnostic_full": str(args.diagnostic_full), **scores})
        print(f"wrote {args.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `convbert` parser."""
    from convbert.finetune.glue_download import GLUE_BASE_URL, MRPC_BASE_URL
    from convbert.finetune.references import CHOICES as REFERENCE_CHOICES

    p = sub.add_parser(
        "glue",
        help="fine-tune and evaluate on GLUE (several seeds), write a results table and optionally a submission",
        description="Fine-tune a ConvBERT encoder on GLUE tasks with the original recipe, over several seeds. Writes "
                    "OUTPUT/runs/<task>-seed<k>.json per run, OUTPUT/results.md (median, mean, std per task and "
                    "metric; paper and leaderboard averages) and, with --predict, OUTPUT/submission.zip. Re-running "
                    "skips finished runs.",
    )
    p.add_argument("--model", required=True, help="HF-layout ConvBERT folder with its vocab.txt")
    p.add_argument("--glue-dir", required=True,
                   help="GLUE data: the download_glue_data.py layout (CoLA, SST-2, ...) or ConvBERT's (cola, sst, ...)")
    p.add_argument("--tasks", default="all",
                   help="'all' or a comma list of cola, sst, mrpc, sts, qqp, mnli, qnli, rte, wnli, ax (default all)")
    p.add_argument("--seeds", default="1", help="number of seeds N (seeds 1..N), or a comma list (default 1)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--predict", action="store_true", help="also predict the test sets and build submission.zip")
    p.add_argument("--fill-missing", action="store_true",
                   help="with --predict: fill tasks that were not run with a constant (and say so)")
    p.add_argument("--wnli", choices=("majority", "model"), default="majority",
                   help="WNLI submission: the training majority class (default, as BERT/ELECTRA) or the model")
    p.add_argument("--submission-seed", default="best",
                   help="which seed's test predictions to submit: 'best' on dev (default) or a seed number")
    p.add_argument("--save-models", action="store_true", help="keep each run's fine-tuned model under runs/")
    p.add_argument("--overwrite", action="store_true", help="redo runs that are already finished in OUTPUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per run instead)")
    p.add_argument("--reference", choices=REFERENCE_CHOICES, default="auto",
                   help="a published GLUE dev row to read the results against, task by task, in results.md "
                        "(default auto: ELECTRA-Small-OWT for the small and medium-small widths, ConvBERT-base's "
                        "or ELECTRA-Base's released weights for base; none to leave it out)")
    _add_recipe_args(p, "epochs per task (default: 3; 10 for RTE and STS-B)")
    p.set_defaults(func=cmd_glue)

    p = sub.add_parser(
        "finetune",
        help="fine-tune on your own CSV/TSV/JSONL classification or regression task",
        description="Fine-tune on your own data (CSV, TSV or JSONL with a header/keys). Saves the model, its "
                    "vocab.txt and the task description to OUTPUT so that `convbert predict` can use it.",
    )
    p.add_argument("--model", required=True, help="HF-layout ConvBERT folder with its vocab.txt")
    p.add_argument("--train", required=True, help="training file (.csv, .tsv or .jsonl)")
    p.add_argument("--dev", default=None, help="dev file in the same format (evaluated after training)")
    p.add_argument("--text-columns", default="text", help="one or two text columns: a or a,b (default text)")
    p.add_argument("--label-column", default="label", help="the label column (default label)")
    p.add_argument("--regression", action="store_true", help="numeric labels, one output, squared error")
    p.add_argument("--symmetric", action="store_true",
                   help="sentence-pair task where order does not matter: double training with swapped sentences")
    p.add_argument("--output", default=None,
                   help="output model folder (an earlier output of the same --model and --train there is replaced; "
                        "default ./finetuned, or the first free ./finetuned-2, -3, … if that holds another task's "
                        "model)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier fine-tuned model of another --model or --train in --output (or in "
                        "./finetuned, without --output)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--format", choices=("csv", "tsv", "jsonl"), default=None, help="file format (default: extension)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_recipe_args(p, "epochs (default 3)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "predict",
        help="label a CSV/TSV/JSONL file with a model from `convbert finetune`",
        description="Predict with a fine-tuned model folder. Writes the input's row number, the predicted label and "
                    "one probability per label (regression: the score) as CSV, TSV or JSONL (by extension).",
    )
    p.add_argument("--model", required=True, help="a folder written by `convbert finetune`")
    p.add_argument("--input", required=True, help="input file with the model's text columns")
    p.add_argument("--output", required=True, help="output file (.csv, .tsv or .jsonl)")
    p.add_argument("--text-columns", default=None,
                   help="this file's text columns, if named otherwise than in training (as many as the model "
                        "was fine-tuned on)")
    p.add_argument("--keep-columns", default=None,
                   help="input columns to copy into the output beside each prediction (a comma list, e.g. id or "
                        "id,text), so it need not be joined back by row number")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--format", choices=("csv", "tsv", "jsonl"), default=None, help="input format (default: extension)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default or 0: torch's choice)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32 (default), or bf16 / fp16 autocast for the forward passes (the scores are fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "glue-download",
        help="download GLUE and lay it out for `convbert glue`",
        description=f"Download the GLUE archives ({GLUE_BASE_URL}<Task>.zip; MRPC from {MRPC_BASE_URL}) and unpack "
                    "them safely into OUTPUT in the standard layout (CoLA/, SST-2/, ..., diagnostic/) or ConvBERT's.",
    )
    p.add_argument("--output", required=True, help="folder to create the GLUE task folders in")
    p.add_argument("--tasks", default="all", help="'all' or a comma list (default all)")
    p.add_argument("--layout", choices=("glue", "convbert"), default="glue",
                   help="standard download_glue_data.py names (default) or ConvBERT's renamed ones")
    p.add_argument("--base-url", default=GLUE_BASE_URL, help=f"base URL of the GLUE zips (default {GLUE_BASE_URL})")
    p.add_argument("--from-dir", default=None,
                   help="no download: lay out files already fetched into this folder (the task zips, AX.tsv, "
                        "msr_paraphrase_train.txt, msr_paraphrase_test.txt, mrpc_dev_ids.tsv)")
    p.add_argument("--mrpc-base-url", default=MRPC_BASE_URL, help=f"base URL of the MRPC files (default {MRPC_BASE_URL})")
    p.set_defaults(func=cmd_glue_download)

    p = sub.add_parser(
        "glue-diagnostic",
        help="score AX (the GLUE diagnostic) locally: R3 overall and per linguistic category",
        description="Score the AX predictions of `convbert glue --predict` against the labelled diagnostic-full.tsv "
                    "(published apart from the GLUE folder, which has no AX labels): R3, the 3-class Matthews "
                    "correlation the GLUE server reports, overall, per coarse category (Lexical Semantics, "
                    "Predicate-Argument Structure, Logic, Knowledge) and per fine-grained phenomenon.",
    )
    p.add_argument("--predictions", required=True,
                   help="AX.tsv, or a folder holding it (a `convbert glue` output folder: its submission/AX.tsv)")
    p.add_argument("--diagnostic-full", required=True, help="the labelled diagnostic-full.tsv")
    p.add_argument("--glue-dir", default=None,
                   help="also check that the labelled rows are AX's sentence pairs in AX's order (this GLUE folder's "
                        "diagnostic.tsv)")
    p.add_argument("--output", default=None, help="write the scores as JSON here")
    p.set_defaults(func=cmd_glue_diagnostic)
