"""The original TensorFlow ConvBERT checkpoints → our model and the HF layout, without TensorFlow.

The original code (TF 1.15, built on ELECTRA) saves the discriminator under `electra/`, the generator's encoder under
`generator/` (sharing `electra/embeddings` unless the embeddings were untied), and the pre-training heads under
`generator_predictions/` and `discriminator_predictions/` (spec §1.9). The layouts differ from PyTorch's in four ways,
the same four HF's one-time conversion applied: dense kernels are `[in, out]` (transposed here), the depthwise kernel
is `[K, H, 1]` (→ `[H, 1, K]`), the pointwise kernel `[1, H, A]` (→ `[A, H, 1]`), the separable conv's bias `[A]`
(→ `[A, 1]`); grouped kernels `[G, in/G, out/G]` are ours already.

The configuration is read off the tensors' shapes (no config file ships with the original checkpoints): vocabulary,
embedding and hidden sizes, depth, FFN width and groups, kernel size, and the head count from the conv branch's
kernel generator (`conv_attn_kernel` emits `Nr·K` logits, `Nr` = heads / head_ratio).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from convbert.errors import ConvBertError
from convbert.interop.hf import (GENERATOR_DIR, MODEL_FOLDER_FILES, check_and_load, check_vocab_fits, copy_vocab,
                                 save_discriminator_pretrained, save_generator_pretrained, transformers_limits)
from convbert.interop.tf_bundle import TFCheckpoint
from convbert.model.config import PRESETS, ConvBertConfig
from convbert.model.heads import write_classifier_files
from convbert.utils import refuse_foreign_folder, shell_abspath, staged_folder, write_json_atomic

if TYPE_CHECKING:
    from convbert.model.modeling import ConvBertModel

DISCRIMINATOR_SCOPE = "electra"
GENERATOR_SCOPE = "generator"
# Optimiser slots and bookkeeping saved next to the weights: not part of the model.
IGNORED = re.compile(r"(/adam_[mv]|/Adam(_1)?|/Momentum|/ExponentialMovingAverage)$|^global_step$")
IMPORT_RECORD = "import.json"
TASK_SCOPE = "task_specific"
CLASSIFIER_FILES = ("classifier.safetensors", "head.json")  # ConvBertForSequenceClassification's own files
TASK_RECORD = "finetune_task.json"  # what `convbert predict` reads (convbert.finetune.owntask.TASK_FILE)
IMPORT_FILES = (*MODEL_FOLDER_FILES, *CLASSIFIER_FILES, TASK_RECORD, IMPORT_RECORD)  # the folder is rewritten whole
GLUE_MAX_SEQ_LENGTH = 128  # the original fine-tuning's max_seq_length for every GLUE task

Transform = Callable[[np.ndarray], np.ndarray]


def _dense(a: np.ndarray) -> np.ndarray:
    return a.T


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _depthwise(a: np.ndarray) -> np.ndarray:  # [K, H, 1] -> [H, 1, K]
    return a.transpose(1, 2, 0)


def _pointwise(a: np.ndarray) -> np.ndarray:  # [1, H, A] -> [A, H, 1]
    return a.transpose(2, 1, 0)


def _column(a: np.ndarray) -> np.ndarray:  # [A] -> [A, 1]
    return a[:, None]


def _ungroup(a: np.ndarray) -> np.ndarray:  # a one-group kernel [1, in, out] -> a Linear weight [out, in]
    return a[0].T


def _linear(tf_name: str, ours: str) -> list[tuple[str, str, Transform]]:
    return [(f"{tf_name}/kernel", f"{ours}.weight", _dense), (f"{tf_name}/bias", f"{ours}.bias", _same)]


def _layer_norm(tf_name: str, ours: str) -> list[tuple[str, str, Transform]]:
    return [(f"{tf_name}/gamma", f"{ours}.weight", _same), (f"{tf_name}/beta", f"{ours}.bias", _same)]


def _ffn_dense(ckpt: TFCheckpoint, tf_prefix: str, ours: str, groups: int) -> list[tuple[str, str, Transform]]:
    """`dense` (plain) or `g_dense` (grouped) — both names occur; a one-group `g_dense` becomes a plain Linear."""
    if f"{tf_prefix}/g_dense/kernel" in ckpt.entries:
        kernel = _same if groups > 1 else _ungroup
        return [(f"{tf_prefix}/g_dense/kernel", f"{ours}.weight", kernel), (f"{tf_prefix}/g_dense/bias", f"{ours}.bias", _same)]
    return _linear(f"{tf_prefix}/dense", ours)


def embedding_scope(ckpt: TFCheckpoint, scope: str) -> str:
    """The generator shares `electra/embeddings` unless it was trained with untied embeddings."""
    return scope if f"{scope}/embeddings/word_embeddings" in ckpt.entries else DISCRIMINATOR_SCOPE


def name_map(ckpt: TFCheckpoint, scope: str, config: ConvBertConfig) -> list[tuple[str, str, Transform]]:
    """(TF variable, our parameter, layout change) for every parameter of the encoder saved under `scope`."""
    emb = embedding_scope(ckpt, scope)
    rows = [
        (f"{emb}/embeddings/word_embeddings", "embeddings.word_embeddings.weight", _same),
        (f"{emb}/embeddings/position_embeddings", "embeddings.position_embeddings.weight", _same),
        (f"{emb}/embeddings/token_type_embeddings", "embeddings.token_type_embeddings.weight", _same),
        *_layer_norm(f"{emb}/embeddings/LayerNorm", "embeddings.LayerNorm"),
    ]
    if config.embedding_size != config.hidden_size:
        rows += _linear(f"{scope}/embeddings_project", "embeddings_project")
    for i in range(config.num_hidden_layers):
        tf, ours = f"{scope}/encoder/layer_{i}", f"encoder.layer.{i}"
        att = f"{tf}/attention/self"
        for name in ("query", "key", "value"):
            rows += _linear(f"{att}/{name}", f"{ours}.attention.self.{name}")
        if config.attention_type == "mixed":  # the span-based dynamic convolution branch
            rows += [
                (f"{att}/conv_attn_key/depthwise_kernel",
                 f"{ours}.attention.self.key_conv_attn_layer.depthwise.weight", _depthwise),
                (f"{att}/conv_attn_key/pointwise_kernel",
                 f"{ours}.attention.self.key_conv_attn_layer.pointwise.weight", _pointwise),
                (f"{att}/conv_attn_key/bias", f"{ours}.attention.self.key_conv_attn_layer.bias", _column),
                *_linear(f"{att}/conv_attn_kernel", f"{ours}.attention.self.conv_kernel_layer"),
                *_linear(f"{att}/conv_attn_point", f"{ours}.attention.self.conv_out_layer"),
            ]
        rows += [
            *_linear(f"{tf}/attention/output/dense", f"{ours}.attention.output.dense"),
            *_layer_norm(f"{tf}/attention/output/LayerNorm", f"{ours}.attention.output.LayerNorm"),
            *_ffn_dense(ckpt, f"{tf}/intermediate", f"{ours}.intermediate.dense", config.num_groups),
            *_ffn_dense(ckpt, f"{tf}/output", f"{ours}.output.dense", config.num_groups),
            *_layer_norm(f"{tf}/output/LayerNorm", f"{ours}.output.LayerNorm"),
        ]
    return rows


DISCRIMINATOR_HEAD = [
    ("discriminator_predictions/dense/kernel", "dense.weight", _dense),
    ("discriminator_predictions/dense/bias", "dense.bias", _same),
    ("discriminator_predictions/dense_1/kernel", "dense_prediction.weight", _dense),
    ("discriminator_predictions/dense_1/bias", "dense_prediction.bias", _same),
]
GENERATOR_HEAD = [
    ("generator_predictions/dense/kernel", "dense.weight", _dense),
    ("generator_predictions/dense/bias", "dense.bias", _same),
    ("generator_predictions/LayerNorm/gamma", "LayerNorm.weight", _same),
    ("generator_predictions/LayerNorm/beta", "LayerNorm.bias", _same),
    ("generator_predictions/output_bias", "output_bias", _same),
]


def _shape(ckpt: TFCheckpoint, name: str) -> tuple[int, ...]:
    if name not in ckpt.entries:
        raise ConvBertError(f"{ckpt.prefix}: variable {name} not found (not a ConvBERT checkpoint, or not its "
                            "pre-training layout?)")
    return ckpt.entries[name].shape


def infer_config(ckpt: TFCheckpoint, scope: str = DISCRIMINATOR_SCOPE, num_heads: int | None = None) -> ConvBertConfig:
    """The encoder's configuration under `scope`, read off the saved shapes. Without the conv branch it is ELECTRA's
    (BERT's) encoder, our `attention_type="plain"`, whose head count is not in the shapes: `num_heads`, or else
    ELECTRA's head size of 64 (hidden / 64 heads: 4 for small, 12 for base, 16 for large)."""
    where = f"{ckpt.prefix} ({scope}/)"
    emb = embedding_scope(ckpt, scope)
    vocab, embedding = _shape(ckpt, f"{emb}/embeddings/word_embeddings")
    project = f"{scope}/embeddings_project/kernel"
    layers = 0
    while f"{scope}/encoder/layer_{layers}/attention/self/query/kernel" in ckpt.entries:
        layers += 1
    if layers == 0:
        raise ConvBertError(f"{where}: no encoder layers found ({scope}/encoder/layer_0/attention/self/query/kernel "
                            "is missing; is this a ConvBERT checkpoint?)")
    ffn = f"{scope}/encoder/layer_0/intermediate"
    if f"{ffn}/g_dense/kernel" in ckpt.entries:
        groups, _, out_per_group = _shape(ckpt, f"{ffn}/g_dense/kernel")
        intermediate = groups * out_per_group
    else:
        groups, intermediate = 1, _shape(ckpt, f"{ffn}/dense/kernel")[1]
    sizes = dict(
        vocab_size=vocab, embedding_size=embedding, num_hidden_layers=layers, intermediate_size=intermediate,
        hidden_size=_shape(ckpt, project)[1] if project in ckpt.entries else embedding, num_groups=groups,
        max_position_embeddings=_shape(ckpt, f"{emb}/embeddings/position_embeddings")[0],
        type_vocab_size=_shape(ckpt, f"{emb}/embeddings/token_type_embeddings")[0],
    )
    hidden = sizes["hidden_size"]
    att = f"{scope}/encoder/layer_0/attention/self"
    branch = _shape(ckpt, f"{att}/query/kernel")[1]
    if f"{att}/conv_attn_key/depthwise_kernel" not in ckpt.entries:
        if branch != hidden:
            raise ConvBertError(f"{where}: no conv branch (conv_attn_key), yet the query is {branch} wide, not the "
                                f"hidden size {hidden}: neither ConvBERT nor ELECTRA")
        if num_heads is None and hidden % 64:
            raise ConvBertError(f"{where}: an ELECTRA/BERT-style encoder (no conv branch) whose hidden size {hidden} is "
                                "not a multiple of ELECTRA's head size 64; give the head count with --num-heads")
        fields = dict(sizes, num_attention_heads=num_heads or hidden // 64, attention_type="plain")
    else:
        kernel_size = _shape(ckpt, f"{att}/conv_attn_key/depthwise_kernel")[0]
        logits = _shape(ckpt, f"{att}/conv_attn_kernel/kernel")[1]
        if logits % kernel_size or branch % (logits // kernel_size or 1):
            raise ConvBertError(f"{where}: conv_attn_kernel emits {logits} values, not heads × kernel size "
                                f"{kernel_size} with a branch of width {branch}")
        reduced = logits // kernel_size
        head_size = branch // reduced
        if hidden % head_size:
            raise ConvBertError(f"{where}: head size {head_size} does not divide hidden size {hidden}")
        heads = hidden // head_size
        if num_heads is not None and num_heads != heads:
            raise ConvBertError(f"--num-heads {num_heads}: {where} has {heads} heads (read off its conv branch); "
                                "leave --num-heads out for ConvBERT checkpoints")
        # Any ratio with max(1, heads // ratio) == reduced describes the same model; the original's 2 where it fits.
        ratio = 2 if max(1, heads // 2) == reduced else max(1, heads // reduced)
        fields = dict(sizes, num_attention_heads=heads, head_ratio=ratio, conv_kernel_size=kernel_size)
    try:
        config = ConvBertConfig(**fields, extra={"converted_from": "tensorflow"})
    except ConvBertError as err:
        raise ConvBertError(f"{where}: the saved shapes do not make a valid model: {err}") from None
    preset = matching_preset(config)
    return config if preset is None else config.replace(source=where, extra={**config.extra, "preset": preset})


ARCHITECTURE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "embedding_size",
                       "num_groups", "conv_kernel_size", "head_ratio", "attention_type")


def matching_preset(config: ConvBertConfig) -> str | None:
    """The paper size whose architecture `config` has (any vocabulary), if one does."""
    for name in PRESETS:
        preset = ConvBertConfig.from_preset(name)
        if all(getattr(preset, f) == getattr(config, f) for f in ARCHITECTURE_FIELDS):
            return name
    return None


def _read(ckpt: TFCheckpoint, rows: list[tuple[str, str, Transform]], used: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for tf_name, ours, transform in rows:
        _shape(ckpt, tf_name)  # names a missing variable
        array = ckpt.read(tf_name)
        if not np.issubdtype(array.dtype, np.floating):
            raise ConvBertError(f"{ckpt.prefix}: variable {tf_name} is {ckpt.entries[tf_name].dtype_name}, expected "
                                "floating-point weights")
        if not np.isfinite(array).all():
            raise ConvBertError(f"{ckpt.prefix}: variable {tf_name} holds NaN or infinite values")
        out[ours] = torch.from_numpy(np.ascontiguousarray(transform(array))).float()
        used.add(tf_name)
    return out


def _read_head(ckpt: TFCheckpoint, rows: list[tuple[str, str, Transform]], used: set[str], which: str,
               shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A pre-training head (no module to check it against): its tensors, their shapes checked."""
    head = _read(ckpt, rows, used)
    for key, shape in shapes.items():
        if tuple(head[key].shape) != shape:
            raise ConvBertError(f"{ckpt.prefix}: {which} head {key} has shape {list(head[key].shape)}, expected "
                                f"{list(shape)}")
    return head


def load_tf_encoder(ckpt: TFCheckpoint, scope: str, used: set[str],
                    num_heads: int | None = None) -> ConvBertModel:
    """The `ConvBertModel` saved under `scope`, every parameter checked against its inferred configuration."""
    from convbert.model.modeling import ConvBertModel

    config = infer_config(ckpt, scope, num_heads)
    model = ConvBertModel(config)
    check_and_load(model, _read(ckpt, name_map(ckpt, scope, config), used), f"{ckpt.prefix} ({scope}/)")
    return model.eval()


def _unused_model_variables(ckpt: TFCheckpoint, scopes: tuple[str, ...], used: set[str]) -> list[str]:
    """Variables inside the converted scopes that no parameter took: a layout this converter does not know."""
    return [n for n in ckpt.names()
            if n not in used and not IGNORED.search(n) and any(n.startswith(s + "/") for s in scopes)]


def task_heads(ckpt: TFCheckpoint) -> list[str]:
    """Names of the fine-tuning heads in a checkpoint (`task_specific/<task>/dense/kernel`)."""
    found = (re.fullmatch(rf"{TASK_SCOPE}/(.+)/dense/kernel", n) for n in ckpt.names())
    return sorted(m.group(1) for m in found if m)


def read_task_head(ckpt: TFCheckpoint, task: str, hidden: int, used: set[str]) -> dict[str, torch.Tensor]:
    """The original fine-tuning head of `task` (dense H -> labels on the [CLS] vector) as ClassificationHead's
    `out_proj` tensors."""
    names = task_heads(ckpt)
    if task not in names:
        found = ", ".join(names) if names else "none"
        raise ConvBertError(f"--task {task}: {ckpt.prefix} has no {TASK_SCOPE}/{task}/ head (task heads found: "
                            f"{found})")
    head = _read(ckpt, [*_linear(f"{TASK_SCOPE}/{task}/dense", "out_proj")], used)
    labels, width = head["out_proj.weight"].shape
    if width != hidden:
        raise ConvBertError(f"{ckpt.prefix}: {TASK_SCOPE}/{task}/dense/kernel is [{width}, {labels}], expected "
                            f"[{hidden}, labels] for this encoder's hidden size {hidden}")
    return head


def glue_task_record(task: str, num_labels: int, checkpoint: Path, max_positions: int) -> dict | None:
    """`finetune_task.json` for a head named like a GLUE task (ELECTRA's names: cola, sst, mrpc, sts, qqp, mnli,
    qnli, rte, wnli), so that `convbert predict` reads that task's GLUE test file as it is; None for other names
    or a head whose width is not the task's label count."""
    from convbert.finetune.tasks import TASKS, TEST_TEXT_COLUMNS

    spec = TASKS.get(task)
    if spec is None or task == "ax" or spec.num_labels != num_labels:
        return None
    return {
        "text_columns": list(TEST_TEXT_COLUMNS[task]),
        "label_column": None,
        "regression": spec.is_regression,
        "labels": None if spec.labels is None else list(spec.labels),
        "max_seq_length": min(GLUE_MAX_SEQ_LENGTH, max_positions),
        "pad_to_max": True,
        "source_model": str(checkpoint),
        "seed": None,
        "settings": None,
        "result": None,
        "glue_task": task,
        # STS-B is trained on score / 5 (ELECTRA's RegressionTask): predict scales back and clips to 0..5, as the
        # GLUE submission does
        **({"score_scale": 5.0, "score_range": [0.0, 5.0]} if spec.is_regression else {}),
    }


def vocab_folders(prefix: Path) -> list[Path]:
    """Where `import-tf` looks for `vocab.txt`: beside the checkpoint and up to two folders above it (the original
    code keeps checkpoints in `DATA_DIR/models/NAME/` and the vocab in `DATA_DIR/`). A relative prefix is made
    absolute first, from the shell's working folder, so the search climbs as it would from the absolute path."""
    prefix = shell_abspath(prefix)
    return [prefix.parent, prefix.parent.parent, prefix.parent.parent.parent]


def find_vocab(prefix: Path) -> Path | None:
    return next((f / "vocab.txt" for f in vocab_folders(prefix) if (f / "vocab.txt").is_file()), None)


def import_tf_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, vocab: str | os.PathLike | None = None,
                         generator: bool = False, num_heads: int | None = None, task: str | None = None) -> dict:
    """Write the discriminator of a TF ConvBERT checkpoint as an HF-layout folder (and the generator, in
    `ConvBertForMaskedLM` layout, under `generator/`). Everything is read and checked before anything is written.
    An ELECTRA checkpoint (no conv branch) becomes our plain-attention model; `num_heads` is its discriminator's head
    count (default: hidden / 64), and its generator keeps the same head size. `task`: also write the fine-tuning
    head `task_specific/<task>/` as the folder's classifier (ConvBertForSequenceClassification.from_pretrained)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConvBertError(f"--output {out}: exists and is not a folder")
    with TFCheckpoint(checkpoint) as ckpt:
        if out.resolve() == ckpt.prefix.parent.resolve():
            raise ConvBertError(f"--output {out}: is the checkpoint's own folder; write the model to a folder of its own")
        refuse_foreign_folder(out, (IMPORT_RECORD,), "an earlier import-tf output", replaces=IMPORT_FILES)
        used: set[str] = set()
        disc = load_tf_encoder(ckpt, DISCRIMINATOR_SCOPE, used, num_heads)
        gen = head = None
        scopes: tuple[str, ...] = (DISCRIMINATOR_SCOPE,)
        if generator:
            if f"{GENERATOR_SCOPE}/encoder/layer_0/attention/self/query/kernel" not in ckpt.entries:
                raise ConvBertError(f"--generator: {ckpt.prefix} has no generator (no {GENERATOR_SCOPE}/encoder; "
                                    "a fine-tuned or discriminator-only checkpoint?)")
            gen_heads = None
            if disc.config.attention_type == "plain":  # ELECTRA's generator keeps the discriminator's head size
                width = _shape(ckpt, f"{GENERATOR_SCOPE}/encoder/layer_0/attention/self/query/kernel")[1]
                gen_heads = max(1, width // disc.config.head_size)
            gen = load_tf_encoder(ckpt, GENERATOR_SCOPE, used, gen_heads)
            head = _read_head(ckpt, GENERATOR_HEAD, used, "generator", {
                "dense.weight": (gen.config.embedding_size, gen.config.hidden_size),
                "output_bias": (gen.config.vocab_size,)})
            scopes += (GENERATOR_SCOPE, "generator_predictions")
        classifier = None
        if task is not None:
            classifier = read_task_head(ckpt, task, disc.config.hidden_size, used)
            scopes += (f"{TASK_SCOPE}/{task}",)
        heads_found = task_heads(ckpt)
        disc_head = None
        if all(name in ckpt.entries for name, _, _ in DISCRIMINATOR_HEAD):
            hidden = disc.config.hidden_size
            disc_head = _read_head(ckpt, DISCRIMINATOR_HEAD, used, "discriminator", {
                "dense.weight": (hidden, hidden), "dense_prediction.weight": (1, hidden)})
            scopes += ("discriminator_predictions",)
        unused = _unused_model_variables(ckpt, scopes, used)
        if unused:
            raise ConvBertError(f"{ckpt.prefix}: variable(s) {', '.join(unused[:4])}{' …' if len(unused) > 4 else ''} "
                                "are not part of the ConvBERT layout this converter knows; not converted")
        step = int(ckpt.read("global_step")) if "global_step" in ckpt.entries else None
        prefix = ckpt.prefix
        present = {s for s in ("generator", "generator_predictions", "discriminator_predictions", "task_specific")
                   if any(n.startswith(s + "/") for n in ckpt.entries)}

    vocab_file = Path(vocab) if vocab is not None else find_vocab(prefix)
    notes: list[str] = []
    if vocab_file is not None:
        if not vocab_file.is_file():
            raise ConvBertError(f"--vocab {vocab_file}: not found")
        check_vocab_fits(vocab_file, disc.config.vocab_size, "the checkpoint", "not this model's vocab?")
    else:
        notes.append(f"no vocab.txt in {', '.join(str(f) for f in vocab_folders(prefix))} (beside the checkpoint "
                     "and up to two folders above it) and no --vocab: the folder has no tokenizer, so `convbert "
                     "glue`/`finetune` cannot use it until you copy the model's vocab.txt into it")
    task_record = None
    if classifier is not None:
        task_record = glue_task_record(task, int(classifier["out_proj.weight"].shape[0]), prefix,
                                       disc.config.max_position_embeddings)
        if task_record is None:
            notes.append(f"{task} is not a GLUE task name with {int(classifier['out_proj.weight'].shape[0])} "
                         "output(s), so the folder has no finetune_task.json: load it with "
                         "ConvBertForSequenceClassification.from_pretrained (`convbert predict` needs the task's "
                         "columns and labels)")
    others = [t for t in heads_found if t != task]
    if others:
        notes.append(f"fine-tuning head(s) {', '.join(others)} under {TASK_SCOPE}/ were left out: `--task NAME` "
                     "writes one as this folder's classifier")
    if not generator and "generator" in present:
        notes.append("the checkpoint also holds a generator: add --generator to convert it")

    notes += transformers_limits("discriminator", disc.config)
    if gen is not None:
        notes += transformers_limits("generator", gen.config)

    written = {"discriminator": str(out)}
    if gen is not None:
        written["generator"] = str(out / GENERATOR_DIR)
    if classifier is not None:
        written[f"{task} classifier"] = str(out / CLASSIFIER_FILES[0])
        if task_record is not None:
            written["predict settings"] = str(out / TASK_RECORD)
    info = {
        "checkpoint": str(prefix),
        "step": step,
        "vocab": str(vocab_file) if vocab_file is not None else None,
        "config": disc.config.to_hf_dict(),
        "preset": disc.config.extra.get("preset"),
        "task": None if classifier is None else {"name": task,
                                                 "num_labels": int(classifier["out_proj.weight"].shape[0])},
        "written": written,
        "notes": notes,
    }
    with staged_folder(out) as staging:  # renamed into place whole: nothing stale from an earlier import survives
        save_discriminator_pretrained(disc, disc_head, staging)  # the head: for `pretrain --init-from`
        if classifier is not None:  # what ConvBertForSequenceClassification.save_pretrained adds to the encoder
            write_classifier_files(classifier, disc.config.hidden_dropout_prob, staging)
            if task_record is not None:  # `convbert predict --model OUTPUT` reads the GLUE test file's columns
                write_json_atomic(staging / TASK_RECORD, task_record)
        if vocab_file is not None:
            copy_vocab(vocab_file, staging)
        if gen is not None:
            save_generator_pretrained(gen, head, staging / GENERATOR_DIR)
            if vocab_file is not None:
                copy_vocab(vocab_file, staging / GENERATOR_DIR)
        write_json_atomic(staging / IMPORT_RECORD, info)
    return info
