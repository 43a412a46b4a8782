"""`convbert import-tf`: an original TensorFlow ConvBERT checkpoint → an HF-layout model folder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-tf",
        help="convert an original TensorFlow ConvBERT checkpoint to an HF-layout folder (no TensorFlow needed)",
        description=(
            "Read a checkpoint saved by the original TensorFlow ConvBERT (or ELECTRA) code and write the "
            "discriminator as an HF-layout ConvBertModel folder (config.json read off the saved shapes, "
            "model.safetensors, vocab.txt, and the replaced-token head as discriminator_head.safetensors; an ELECTRA "
            "checkpoint as transformers' ElectraForPreTraining, head included), usable as "
            "--model by glue/finetune and as --init-from by pretrain. TensorFlow is not needed: the checkpoint "
            "files are read directly and every tensor's checksum is verified."
        ),
    )
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint prefix (e.g. convbert_base/model.ckpt-1000000), its .index file, or a folder "
                        "holding one checkpoint")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--vocab", help="the model's vocab.txt (default: a vocab.txt beside the checkpoint or up to two "
                                   "folders above it, as the original code lays out DATA_DIR/models/NAME/)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of an ELECTRA (plain-attention) checkpoint, whose head count is not in its "
                        "shapes (default: hidden / 64, as every ELECTRA size); ConvBERT's is read off the shapes")
    p.add_argument("--generator", action="store_true",
                   help="also write the generator (ConvBertForMaskedLM layout; ElectraForMaskedLM for ELECTRA) to "
                        "<output>/generator/")
    p.add_argument("--task", default=None,
                   help="a fine-tuned checkpoint: also write its task_specific/TASK/ head (e.g. mnli) as the folder's "
                        "classifier (classifier.safetensors + head.json), loadable with "
                        "ConvBertForSequenceClassification.from_pretrained; the note lists the heads found. A GLUE "
                        "task name (cola, sst, mrpc, sts, qqp, mnli, qnli, rte, wnli) also writes finetune_task.json, "
                        "so `convbert predict` reads that task's GLUE test file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from convbert.interop.tf import import_tf_checkpoint
    from convbert.model.config import ConvBertConfig

    info = import_tf_checkpoint(args.checkpoint, args.output, vocab=args.vocab, generator=args.generator,
                                num_heads=args.num_heads, task=args.task)
    c = ConvBertConfig.from_hf_dict(info["config"])  # the config.json written, in either HF layout
    step = f"step {info['step']}" if info["step"] is not None else "no global_step"
    size = f" (the {info['preset']} size)" if info["preset"] else ""
    kind = "plain attention (ELECTRA)" if c.attention_type == "plain" else f"kernel {c.conv_kernel_size}"
    print(f"import-tf: {info['checkpoint']} ({step}){size}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} heads, {kind}, {c.num_groups} FFN group(s), "
          f"vocab {c.vocab_size} -> " + ", ".join(f"{k} {v}" for k, v in info["written"].items()))
    if info["vocab"]:
        print(f"import-tf: vocab {info['vocab']}")
    for note in info["notes"]:
        print(f"import-tf: note: {note}")
    return 0
