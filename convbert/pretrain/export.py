"""`convbert export`: a pre-training checkpoint → HF-layout model folders.

* `<output>/`: the discriminator as `ConvBertModel` (config.json + model.safetensors) and the `vocab.txt` the data was
  built with — ready for `convbert finetune` or `transformers.ConvBertModel.from_pretrained`.
* `<output>/generator/` (with `--generator`): the generator in `ConvBertForMaskedLM` layout (`convbert.*` encoder with
  the shared embeddings, `generator_predictions.*`, `generator_lm_head.*` tied to the word table) and `vocab.txt`.
* `<output>/discriminator_head.safetensors`: the replaced-token head, for `convbert pretrain --init-from`.
* The `--attention plain` baseline with an ungrouped FFN is an ELECTRA, written as transformers' ELECTRA classes
  hold it: the discriminator as `ElectraForPreTraining` (head included in model.safetensors), the generator as
  `ElectraForMaskedLM`.
* `<output>/export.json`: where it came from (checkpoint, step, objective).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from convbert.errors import ConvBertError
from convbert.interop.hf import (DISCRIMINATOR_HEAD_KEYS, GENERATOR_DIR, GENERATOR_HEAD_KEYS, MODEL_FOLDER_FILES,
                                 check_vocab_fits, copy_vocab, save_discriminator_pretrained,
                                 save_generator_pretrained, transformers_limits, write_tokenizer_config)
from convbert.pretrain import checkpoint as ckpt_io
from convbert.pretrain.data import casing
from convbert.utils import refuse_foreign_folder, sha256_file, staged_folder, write_json_atomic

RUN_VOCAB = "vocab.txt"
EXPORT_RECORD = "export.json"
EXPORT_FILES = (*MODEL_FOLDER_FILES, "tokenizer_config.json", EXPORT_RECORD)  # the folder is rewritten whole


def _sub_state(tensors: dict[str, torch.Tensor], aliases: dict[str, str], prefix: str) -> dict[str, torch.Tensor]:
    full = dict(tensors)
    for alias, target in aliases.items():
        full[alias] = tensors[target]
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def find_vocab(checkpoint_dir: Path, run_config: dict) -> Path:
    """The vocab the run was trained with: the run folder's copy, else the data's file recorded in the run; when
    the run recorded the vocab's sha256 (runs since stop 23; the data manifest's record when the run could not find
    the file), a file with another hash is never taken; without one, a file of another size is not."""
    candidates = [checkpoint_dir.parent.parent / RUN_VOCAB] if checkpoint_dir.parent.name == "checkpoints" else []
    if run_config.get("vocab_file"):
        candidates.append(Path(run_config["vocab_file"]))
    expected = run_config.get("vocab_sha256")
    size = run_config.get("vocab_size")
    rejected = []
    for c in candidates:
        if not c.is_file():
            continue
        if expected is not None and sha256_file(c) != expected:
            rejected.append(f"{c} has another sha256")
        elif expected is None and isinstance(size, int) and (lines := _token_count(c)) != size:
            rejected.append(f"{c} has {lines:,} tokens, the model {size:,}")
        else:
            return c
    what = f"sha256 {expected[:12]}…; " if expected else ""
    why = f" ({'; '.join(rejected)})" if rejected else ""
    raise ConvBertError(
        f"{checkpoint_dir}: cannot find the vocab the run was trained with ({what}looked for "
        + ", ".join(str(c) for c in candidates) + f"){why}; restore the run's vocab.txt or the data's vocab file (a "
        "checkpoint moved out of its run only finds the latter; a vocab edited since would not match the weights)"
    )


def _token_count(path: Path) -> int:
    """Tokens in a vocab file: one per line (as `read_vocab` reads it)."""
    from convbert.pretrain.data import read_vocab

    return len(read_vocab(path))


def _architecture(config) -> str | None:
    """The preset whose architecture the exported model has (None for a custom one)."""
    from convbert.interop.tf import matching_preset

    return matching_preset(config)


def _run_folder(ck: Path) -> Path:
    return ck.parent.parent if ck.parent.name == "checkpoints" else ck


def _check_output_folder(out: Path, ck: Path, overwrite: bool = False) -> str | None:
    """Refuse an output inside the run being exported (it would overwrite the checkpoint's own files), a folder
    that already holds something other than an earlier export, and (without `overwrite`) an earlier export of
    another run. Returns a note when an earlier export of this run is replaced."""
    run_dir = _run_folder(ck)
    target = out.resolve()
    for inside in (ck.resolve(), run_dir.resolve()):
        if target == inside or inside in target.parents:
            raise ConvBertError(f"--output {out}: is inside the run folder {run_dir}; export to a folder of its own")
    refuse_foreign_folder(out, (EXPORT_RECORD,), "an earlier export", replaces=EXPORT_FILES)
    record = out / EXPORT_RECORD
    if not record.is_file():
        return None
    try:
        earlier = json.loads(record.read_text(encoding="utf-8"))
        was = Path(earlier["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        earlier, was = {}, None
    if was is not None and (os.path.abspath(_run_folder(was)) == os.path.abspath(run_dir)
                            or _run_folder(was).resolve() == run_dir.resolve()):
        return f"replaced the earlier export of this run (step {earlier.get('step')}) in {out}"
    if not overwrite:
        source = f"of {was}" if was is not None else "whose export.json cannot be read"
        raise ConvBertError(f"--output {out}: holds an earlier export {source}, another run; choose a new --output "
                            "or pass --overwrite to replace it")
    return f"replaced the earlier export of {was if was is not None else 'another run'} in {out} (--overwrite)"


def _tokenizer_casing(run: dict, vocab: Path) -> tuple[dict, str | None]:
    """How the run's data was tokenized: recorded in the run (since stop 24), else the data manifest's settings
    when the data is still where the run read it, else guessed from the vocab (a lower-cased one has no capitals)
    with a note saying so."""
    if isinstance(run.get("tokenizer"), dict):
        return {k: bool(run["tokenizer"].get(k, True)) for k in ("lower_case", "strip_accents")}, None
    data = run.get("pretrain", {}).get("data")
    try:
        recorded = json.loads((Path(data) / "manifest.json").read_text(encoding="utf-8")) if data else None
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict):
        return casing(recorded), None
    tokens = vocab.read_text(encoding="utf-8").split("\n")
    cased = any(c.isupper() for t in tokens if not (t.startswith("[") and t.endswith("]")) for c in t)
    guess = {"lower_case": not cased, "strip_accents": not cased}
    return guess, (f"the run did not record its casing and its data ({data}) is not where it was: "
                   f"{'capitals in' if cased else 'no capitals in'} the vocab, so tokenizer_config.json says "
                   f"do_lower_case {str(not cased).lower()}; correct it if the data was built otherwise")


def export_checkpoint(checkpoint: str | Path, output: str | Path, generator: bool = False,
                      overwrite: bool = False) -> dict:
    """Write a run's (or one checkpoint's) discriminator, and with `generator` the generator, as HF-layout
    folders with `vocab.txt`; returns what was written and any notes. An earlier export of the same run in
    `output` is replaced; one of another run only with `overwrite`."""
    from convbert.model.config import ConvBertConfig
    from convbert.model.modeling import ConvBertModel

    ck = ckpt_io.resolve_checkpoint(checkpoint)
    data = ckpt_io.load_checkpoint(ck, for_export=True)
    state = data["state"]
    run = state.get("run_config") or {}
    if "model_config" not in run:
        raise ConvBertError(f"{ck}: checkpoint has no model configuration (not written by `convbert pretrain`?)")
    objective = run.get("pretrain", {}).get("objective", "electra")
    if generator and objective != "electra":
        raise ConvBertError(f"--generator: the run used objective {objective!r}, which has no separate generator")
    aliases = state.get("model_aliases", {})
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConvBertError(f"--output {out}: exists and is not a folder")
    replaced = _check_output_folder(out, ck, overwrite)
    vocab = find_vocab(ck, run)
    rows = run["model_config"].get("vocab_size")
    if isinstance(rows, int):
        check_vocab_fits(vocab, rows, f"the checkpoint {ck}", "the vocab was changed after pre-training?")

    for alias, target in aliases.items():
        if target not in data["model"]:
            raise ConvBertError(f"{ck}: checkpoint is inconsistent: {alias} aliases the missing {target}")

    def load(model, prefix: str) -> None:
        state = _sub_state(data["model"], aliases, prefix)
        ckpt_io.check_state(model.state_dict(), state, str(ck),
                            what=f"the {prefix.rstrip('.')} weights do not match its configuration",
                            unknown_label="unknown key(s)")
        model.load_state_dict(state, strict=True)

    def mlm_head_state(what: str) -> dict:
        """The checkpoint's MLM head (`generator_head.*`: the generator's, or the mlm objective's encoder's)."""
        head = _sub_state(data["model"], aliases, "generator_head.")
        missing = [k for k in GENERATOR_HEAD_KEYS if k not in head]
        if missing:
            raise ConvBertError(f"{ck}: the {what} head weights are missing ({', '.join(missing)})")
        return head

    # Build and check everything before writing anything.
    config = ConvBertConfig.from_dict(run["model_config"], source=f"{ck} model_config")
    disc = ConvBertModel(config)
    load(disc, "discriminator.")
    gen = gconfig = None
    if generator:
        gconfig = ConvBertConfig.from_dict(run["generator_config"], source=f"{ck} generator_config")
        gen = ConvBertModel(gconfig)
        load(gen, "generator.")
        head = mlm_head_state("generator")
    disc_head = _sub_state(data["model"], aliases, "discriminator_head.")
    disc_head = disc_head if all(k in disc_head for k in DISCRIMINATOR_HEAD_KEYS) else None
    # --objective mlm: one encoder with the MLM head on top (BERT's objective), exported as a masked LM
    mlm_head = mlm_head_state("MLM") if objective == "mlm" else None
    written = {"encoder with its MLM head" if mlm_head is not None else "discriminator": str(out)}
    if generator:
        written["generator"] = str(out / GENERATOR_DIR)
    tokenizer, guessed = _tokenizer_casing(run, vocab)
    notes: list[str] = [guessed] if guessed else []
    for which, cfg in (("discriminator", config), ("generator", gconfig)):
        if cfg is not None:
            notes += transformers_limits(which, cfg)
    info = {
        # absolute, links kept (checkpoints/ may link to a scratch disk): a later export compares runs by it
        "checkpoint": os.path.abspath(ck),
        "step": state.get("step"),
        "total_steps": state.get("total_steps"),
        "objective": objective,
        "attention": run.get("pretrain", {}).get("attention"),
        "size": run.get("pretrain", {}).get("size"),  # the recipe's size (with --init-from, not the architecture)
        "architecture": _architecture(config),
        "tokenizer": tokenizer,
        "written": written,
        "notes": notes,
    }
    # Written aside and renamed into place: an earlier export's generator/ does not outlive a re-export without it.
    with staged_folder(out) as staging:
        if mlm_head is not None:
            save_generator_pretrained(disc, mlm_head, staging)  # ConvBertForMaskedLM; its encoder loads as a model
        else:
            save_discriminator_pretrained(disc, disc_head, staging)  # the head: for `pretrain --init-from`
        copy_vocab(vocab, staging)
        write_tokenizer_config(staging, **tokenizer, model_max_length=config.max_position_embeddings)
        if generator:
            save_generator_pretrained(gen, head, staging / GENERATOR_DIR)
            copy_vocab(vocab, staging / GENERATOR_DIR)
            write_tokenizer_config(staging / GENERATOR_DIR, **tokenizer,
                                   model_max_length=gconfig.max_position_embeddings)
        write_json_atomic(staging / EXPORT_RECORD, info)
    return {**info, "replaced": replaced}  # (not in export.json: what this invocation did to the folder)
