"""`convbert export`: a pre-training checkpoint → HF-layout model folders.

* `<output>/`: the discriminator as `ConvBertModel` (config.json + model.safetensors) and the `vocab.txt` the data was
  built with — ready for `convbert finetune` or `transformers.ConvBertModel.from_pretrained`.
* `<output>/generator/` (with `--generator`): the generator in `ConvBertForMaskedLM` layout (`convbert.*` encoder with
  the shared embeddings, `generator_predictions.*`, `generator_lm_head.*` tied to the word table) and `vocab.txt`.
* `<output>/export.json`: where it came from (checkpoint, step, objective).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from convbert.errors import ConvBertError
from convbert.pretrain import checkpoint as ckpt_io
from convbert.utils import atomic_path, refuse_foreign_folder, write_json_atomic

if TYPE_CHECKING:
    from convbert.model.config import ConvBertConfig

RUN_VOCAB = "vocab.txt"


def _sub_state(tensors: dict[str, torch.Tensor], aliases: dict[str, str], prefix: str) -> dict[str, torch.Tensor]:
    full = dict(tensors)
    for alias, target in aliases.items():
        full[alias] = tensors[target]
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def find_vocab(checkpoint_dir: Path, run_config: dict) -> Path:
    run_dir = checkpoint_dir.parent.parent
    candidates = [run_dir / RUN_VOCAB]
    if run_config.get("vocab_file"):
        candidates.append(Path(run_config["vocab_file"]))
    for c in candidates:
        if c.is_file():
            return c
    raise ConvBertError(
        f"{checkpoint_dir}: cannot find the vocab the run was trained with (looked for "
        + ", ".join(str(c) for c in candidates) + ")"
    )


def _transformers_limits(which: str, config: ConvBertConfig) -> list[str]:
    """Why `transformers` cannot load an exported model that convbert loads, if it cannot."""
    if config.attention_type == "plain":
        return [f"the {which} uses plain self-attention (the --attention plain baseline): transformers' ConvBERT has "
                f"no such layer, so load it with convbert (ConvBertModel.from_pretrained), not transformers"]
    if config.num_attention_heads < config.head_ratio:
        # Spec §1.6: with fewer heads than head_ratio the concatenation is 2H wide, which HF's port cannot represent.
        return [f"the {which} has {config.num_attention_heads} attention head(s) < head_ratio {config.head_ratio}: "
                f"convbert loads it, transformers cannot (spec §1.6)"]
    return []


def _check_output_folder(out: Path, ck: Path) -> None:
    """Refuse an output inside the run being exported (it would overwrite the checkpoint's own files) or a folder
    that already holds something other than an earlier export."""
    run_dir = ck.parent.parent if ck.parent.name == "checkpoints" else ck
    target = out.resolve()
    for inside in (ck.resolve(), run_dir.resolve()):
        if target == inside or inside in target.parents:
            raise ConvBertError(f"--output {out}: is inside the run folder {run_dir}; export to a folder of its own")
    refuse_foreign_folder(out, ("export.json",), "an earlier export")


def _check_vocab_fits(vocab: Path, model_config: dict, ck: Path) -> None:
    from convbert.data.tokenize import WordPieceTokenizer

    entries = WordPieceTokenizer.from_vocab(vocab).vocab_size
    rows = model_config.get("vocab_size")
    if isinstance(rows, int) and entries > rows:
        raise ConvBertError(f"{vocab}: {entries} entries, but the checkpoint {ck} has {rows} word embeddings "
                            "(the vocab was changed after pre-training?)")


def export_checkpoint(checkpoint: str | Path, output: str | Path, generator: bool = False) -> dict:
    from convbert.interop.hf import copy_vocab
    from convbert.model.config import ConvBertConfig
    from convbert.model.modeling import ConvBertModel

    ck = ckpt_io.resolve_checkpoint(checkpoint)
    data = ckpt_io.load_checkpoint(ck)
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
    _check_output_folder(out, ck)
    vocab = find_vocab(ck, run)
    _check_vocab_fits(vocab, run["model_config"], ck)

    for alias, target in aliases.items():
        if target not in data["model"]:
            raise ConvBertError(f"{ck}: checkpoint is inconsistent: {alias} aliases the missing {target}")

    def load(model, prefix: str) -> None:
        state = _sub_state(data["model"], aliases, prefix)
        ckpt_io.check_state(model.state_dict(), state, str(ck),
                            what=f"the {prefix.rstrip('.')} weights do not match its configuration",
                            unknown_label="unknown key(s)")
        model.load_state_dict(state, strict=True)

    # Build and check everything before writing anything.
    config = ConvBertConfig.from_dict(run["model_config"], source=f"{ck} model_config")
    disc = ConvBertModel(config)
    load(disc, "discriminator.")
    gen = gconfig = None
    if generator:
        gconfig = ConvBertConfig.from_dict(run["generator_config"], source=f"{ck} generator_config")
        gen = ConvBertModel(gconfig)
        load(gen, "generator.")
        head = _sub_state(data["model"], aliases, "generator_head.")
        need = ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias", "output_bias")
        if any(k not in head for k in need):
            raise ConvBertError(f"{ck}: the generator head weights are missing ({', '.join(k for k in need if k not in head)})")
    disc.save_pretrained(out)
    copy_vocab(vocab, out)
    written = {"discriminator": str(out)}
    notes: list[str] = []

    if generator:
        gdir = out / "generator"
        gen.save_pretrained(gdir)
        tensors = {f"convbert.{k}": v.contiguous() for k, v in gen.state_dict().items()}
        tensors["generator_predictions.dense.weight"] = head["dense.weight"]
        tensors["generator_predictions.dense.bias"] = head["dense.bias"]
        tensors["generator_predictions.LayerNorm.weight"] = head["LayerNorm.weight"]
        tensors["generator_predictions.LayerNorm.bias"] = head["LayerNorm.bias"]
        tensors["generator_lm_head.weight"] = gen.embeddings.word_embeddings.weight.detach().clone()
        tensors["generator_lm_head.bias"] = head["output_bias"]
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(gdir / "model.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        hf = gconfig.to_hf_dict()
        hf["architectures"] = ["ConvBertForMaskedLM"]
        hf["tie_word_embeddings"] = True
        write_json_atomic(gdir / "config.json", hf)
        copy_vocab(vocab, gdir)
        written["generator"] = str(gdir)
    for which, cfg in (("discriminator", config), ("generator", gconfig)):
        if cfg is not None:
            notes += _transformers_limits(which, cfg)

    info = {
        "checkpoint": str(ck),
        "step": state.get("step"),
        "total_steps": state.get("total_steps"),
        "objective": objective,
        "attention": run.get("pretrain", {}).get("attention"),
        "size": run.get("pretrain", {}).get("size"),
        "written": written,
        "notes": notes,
    }
    write_json_atomic(out / "export.json", info)
    return info
