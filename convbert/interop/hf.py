"""Reading and writing the HF checkpoint layout (config.json + model.safetensors / pytorch_model.bin).

Our module tree uses HF's parameter names and shapes, so `HF_TO_OURS` (the one translation table) only has to deal
with the few keys other writers add or drop. ConvBERT folders use transformers' ConvBERT classes; plain-attention
models with an ungrouped FFN are ELECTRA encoders, with the same names under `electra.` in transformers' ELECTRA
classes, and are read and written in that layout. Pickled weights are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from convbert.errors import ConvBertError
from convbert.model.config import ARCHITECTURE_FIELDS, ConvBertConfig
from convbert.utils import atomic_path, folder_kind_hint, read_json_object, write_json_atomic
from convbert.weights import load_weights, save_weights

if TYPE_CHECKING:
    from convbert.model.modeling import ConvBertModel

# HF key -> our key. Names are identical by construction; only these keys need handling:
HF_TO_OURS: dict[str, str | None] = {
    "embeddings.position_ids": None,  # a buffer saved by transformers 4.x; ignored
    "embeddings.token_type_ids": None,  # a buffer some versions save; ignored
}
PREFIXES = {"convbert": "convbert.", "electra": "electra."}  # the encoder's prefix in HF's head models
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_config(path: Path) -> ConvBertConfig:
    """The ConvBertConfig of an HF-layout folder's `config.json` (ConvBERT or ELECTRA)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = folder_kind_hint(path)
        raise ConvBertError(f"{config_file}: not found{hint or ' (an HF-layout model folder needs config.json)'}")
    return ConvBertConfig.from_hf_dict(read_json_object(config_file), source=str(config_file))


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The raw tensors of the first weight file found in `path`."""
    for name in WEIGHT_FILES:
        weight_file = path / name
        if weight_file.is_file():
            break
    else:
        raise ConvBertError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
    try:
        if weight_file.suffix == ".safetensors":
            return load_weights(weight_file), weight_file
        with warnings.catch_warnings():  # torch's pickle warnings would break the one-line error
            warnings.simplefilter("ignore")
            state = torch.load(weight_file, map_location="cpu", weights_only=True)
    except ConvBertError:  # the tensors differ from the checksum stored in the file
        raise
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConvBertError(f"{weight_file}: cannot read weights (truncated or corrupt file?): {message}") from None
    except Exception as err:  # e.g. pickle.UnpicklingError for a file that is not weights-only
        if not _looks_like_torch_save(weight_file):  # neither torch.save's zip nor a pickle: damaged bytes
            raise ConvBertError(f"{weight_file}: cannot read weights (truncated or corrupt file?): not a zip "
                                f"archive or pickle written by torch.save ({type(err).__name__})") from None
        first = (str(err).splitlines() or [""])[0].split(". ")[0]
        raise ConvBertError(
            f"{weight_file}: refused to load: not plain tensors (torch.load(weights_only=True) rejected it: "
            f"{type(err).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvBertError(f"{weight_file}: expected a flat dict of tensors")
    return state, weight_file


def _looks_like_torch_save(path: Path) -> bool:
    """torch.save writes a zip archive (legacy files: a pickle, which starts with the PROTO opcode 0x80)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(1)
    return head == b"\x80" or zipfile.is_zipfile(path)


def encoder_prefix(state: dict[str, torch.Tensor]) -> str:
    """The prefix of the encoder's keys: `convbert.` or `electra.` in HF's head models, "" in bare encoders."""
    return next((p for p in PREFIXES.values() if any(key.startswith(p) for key in state)), "")


def translate_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> ours: strip the `convbert.`/`electra.` prefix of head models, drop head keys and ignored
    buffers."""
    prefix = encoder_prefix(state)
    out = {}
    for key, tensor in state.items():
        if prefix:
            if not key.startswith(prefix):
                continue  # a head of ConvBertFor* / ElectraFor*: not part of the encoder
            key = key[len(prefix):]
        target = HF_TO_OURS.get(key, key)
        if target is not None:
            out[target] = tensor
    return out


def check_and_load(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, naming every unknown key, missing key and shape mismatch."""
    expected = model.state_dict()
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    problems = []
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}")
    if missing:
        problems.append(f"missing key(s) {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    for key in sorted(set(state) & set(expected)):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(f"key {key} has shape {list(state[key].shape)} in the file but the model expects "
                            f"{list(expected[key].shape)}")
        if expected[key].is_floating_point() and not state[key].is_floating_point():
            problems.append(f"key {key} holds {str(state[key].dtype).replace('torch.', '')} values: expected "
                            "floating-point weights")
    if problems:
        raise ConvBertError(f"{source}: " + "; ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def load_pretrained(cls, path: str | os.PathLike, **config_overrides) -> "ConvBertModel":
    path = Path(path)
    if not path.is_dir():
        raise ConvBertError(f"{path}: not a model folder (expected a directory with config.json and weights)")
    config = read_config(path)
    if config_overrides:  # converted and checked like constructor arguments ("no" is False, not a true string)
        saved, config = config, config.replace(source=f"{path} overrides", **config_overrides)
        changed = [f"{name}={getattr(config, name)!r} (the saved model has {getattr(saved, name)!r})"
                   for name in ARCHITECTURE_FIELDS
                   if name in config_overrides and getattr(config, name) != getattr(saved, name)]
        if changed:  # plain attention's head count, for one, changes no tensor shape: the weights would load
            raise ConvBertError(f"{path}: override(s) {', '.join(changed)}: the architecture is the saved model's; "
                                "only settings such as dropout, mask_conv_padding or gradient_checkpointing can be "
                                "overridden")
    state, weight_file = read_state_dict(path)
    model = cls(config)
    check_and_load(model, translate_keys(state), str(weight_file))
    model.eval()
    return model


def _write_model_folder(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """`model.safetensors` (CPU, contiguous) and `config.json` into the folder `path`, each written atomically."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConvBertError(f"{path}: exists and is not a folder; save_pretrained writes a folder")
    path.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, path / "model.safetensors", metadata={"format": "pt"})
    write_json_atomic(path / "config.json", config)


def save_pretrained(model: "ConvBertModel", path: str | os.PathLike) -> None:
    _write_model_folder(path, model.state_dict(), model.config.to_hf_dict())


def transformers_limits(which: str, config: ConvBertConfig) -> list[str]:
    """Why `transformers` cannot load an exported model that convbert loads, if it cannot."""
    if config.attention_type == "plain" and config.hf_model_type != "electra":
        return [f"the {which} uses plain self-attention with a grouped FFN ({config.num_groups} groups): neither "
                f"transformers' ConvBERT nor its ELECTRA has that layer, so load it with convbert "
                f"(ConvBertModel.from_pretrained), not transformers"]
    if config.attention_type == "mixed":
        # transformers' port sizes each of its Nr heads as (H / Nr) / 2 and the concatenation as H; the original
        # (and convbert) as d = H / N and 2 Nr d (spec §1.6, §1.8 point 8). They agree only when those coincide,
        # e.g. for every paper size, but not with head_ratio 1, or with fewer heads than head_ratio, say.
        hidden, heads, width = config.hidden_size, config.reduced_heads, config.branch_width
        hf_head = hidden // heads // 2
        if hidden % heads or heads * hf_head != width or 2 * width != hidden:
            return [f"the {which}'s mixed attention is 2 x {width} wide ({heads} head(s) of H/N = {config.head_size} "
                    f"per branch, with {config.num_attention_heads} heads and head_ratio {config.head_ratio}), but "
                    f"transformers' port builds head(s) of (H/{heads})/2 = {hf_head} and a {hidden}-wide "
                    f"concatenation: convbert loads it, transformers cannot (spec §1.6)"]
        if config.mask_conv_padding:
            return [f"the {which} was trained with mask_conv_padding=True (padding zeroed before the convolutions): "
                    f"transformers loads it but ignores that setting, so its outputs differ wherever a sequence "
                    f"is padded; load it with convbert (ConvBertModel.from_pretrained) for the same outputs"]
    return []


GENERATOR_DIR = "generator"
GENERATOR_HEAD_KEYS = ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias", "output_bias")
DISCRIMINATOR_HEAD_FILE = "discriminator_head.safetensors"
DISCRIMINATOR_HEAD_KEYS = ("dense.weight", "dense.bias", "dense_prediction.weight", "dense_prediction.bias")
# What `convbert export` and `convbert import-tf` put in a model folder (besides their own record).
MODEL_FOLDER_FILES = ("config.json", "model.safetensors", "vocab.txt", GENERATOR_DIR, DISCRIMINATOR_HEAD_FILE)


def save_generator_pretrained(generator: "ConvBertModel", head: dict[str, torch.Tensor],
                              path: str | os.PathLike) -> None:
    """The generator (or an `--objective mlm` run's encoder) in `ConvBertForMaskedLM` layout (`ElectraForMaskedLM`
    for plain attention, the same names under `electra.*`): the encoder under `convbert.*` (with the shared
    embeddings), the MLM head (`head`: our `GENERATOR_HEAD_KEYS`) as `generator_predictions.*`, and
    `generator_lm_head` tied to the word table, its bias the original `output_bias`."""
    layout = generator.config.hf_model_type
    tensors = {f"{PREFIXES[layout]}{k}": v for k, v in generator.state_dict().items()}
    for key in GENERATOR_HEAD_KEYS[:4]:
        tensors[f"generator_predictions.{key}"] = head[key]
    tensors["generator_lm_head.weight"] = generator.embeddings.word_embeddings.weight.detach().clone()
    tensors["generator_lm_head.bias"] = head["output_bias"]
    architecture = "ElectraForMaskedLM" if layout == "electra" else "ConvBertForMaskedLM"
    _write_model_folder(path, tensors, {**generator.config.to_hf_dict(), "architectures": [architecture],
                                        "tie_word_embeddings": True})


def read_generator_pretrained(path: Path) -> tuple[ConvBertConfig, dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                      Path]:
    """What `save_generator_pretrained` wrote, or transformers' `ElectraForMaskedLM` (the hub's
    google/electra-*-generator): (config, the `convbert.*`/`electra.*` encoder tensors without the prefix, the MLM
    head under our `GENERATOR_HEAD_KEYS` (with `generator_lm_head.weight` as `lm_head.weight`), weight file)."""
    config = read_config(path)
    state, weight_file = read_state_dict(path)
    encoder = translate_keys(state) if encoder_prefix(state) else {}
    return config, encoder, read_mlm_head(state, weight_file, "generator"), weight_file


def has_mlm_head(state: dict[str, torch.Tensor]) -> bool:
    """Whether a weight file holds a `ConvBertForMaskedLM` / `ElectraForMaskedLM` MLM head."""
    return any(k.startswith("generator_predictions.") for k in state)


def read_mlm_head(state: dict[str, torch.Tensor], weight_file, what: str = "MLM model") -> dict[str, torch.Tensor]:
    """The MLM head of a `ConvBertForMaskedLM` / `ElectraForMaskedLM` weight file under our `GENERATOR_HEAD_KEYS`,
    with `generator_lm_head.weight` (tied to the word embeddings) as `lm_head.weight` where present."""
    head = {k[len("generator_predictions."):]: v for k, v in state.items() if k.startswith("generator_predictions.")}
    for ours, theirs in (("output_bias", "generator_lm_head.bias"), ("lm_head.weight", "generator_lm_head.weight")):
        if theirs in state:
            head[ours] = state[theirs]
    missing = ["generator_lm_head.bias" if k == "output_bias" else f"generator_predictions.{k}"
               for k in GENERATOR_HEAD_KEYS if k not in head]
    if missing:
        raise ConvBertError(f"{weight_file}: not a ConvBertForMaskedLM / ElectraForMaskedLM {what} (missing "
                            f"{', '.join(missing)})")
    return head


def save_discriminator_pretrained(model: "ConvBertModel", head: dict[str, torch.Tensor] | None,
                                  path: str | os.PathLike) -> None:
    """The discriminator of a pre-training run, with its replaced-token head (`DISCRIMINATOR_HEAD_KEYS`) if known.
    ConvBERT: `save_pretrained`'s folder plus `discriminator_head.safetensors` (transformers has no ConvBERT class for
    the head). ELECTRA layout: one `ElectraForPreTraining` file (`electra.*` + `discriminator_predictions.*`), as the
    hub's google/electra-*-discriminator folders hold it."""
    if head is None or model.config.hf_model_type != "electra":
        model.save_pretrained(path)
        if head is not None:
            save_discriminator_head(head, path)
        return
    tensors = {f"{PREFIXES['electra']}{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"discriminator_predictions.{k}": head[k].float() for k in DISCRIMINATOR_HEAD_KEYS})
    _write_model_folder(path, tensors, {**model.config.to_hf_dict(), "architectures": ["ElectraForPreTraining"]})


def save_discriminator_head(head: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """The replaced-token head beside an HF-layout discriminator (transformers has no ConvBERT class for it, and
    ignores the file): `convbert pretrain --init-from` continues from it."""
    save_weights({k: head[k].float() for k in DISCRIMINATOR_HEAD_KEYS}, Path(path) / DISCRIMINATOR_HEAD_FILE,
                 metadata={"format": "pt"})


def read_discriminator_head(path: str | os.PathLike,
                            state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
    """What `save_discriminator_head` wrote into the folder `path`; else the head of an `ElectraForPreTraining`
    weight file (the hub's google/electra-*-discriminator: `discriminator_predictions.*` in `state`, the folder's
    weights); None if neither has it."""
    head_file = Path(path) / DISCRIMINATOR_HEAD_FILE
    if head_file.is_file():
        source, marker = head_file, ""
        try:
            head = load_weights(head_file)
        except (SafetensorError, OSError) as err:
            raise ConvBertError(f"{head_file}: cannot read ({err})") from None
    else:
        source, marker = Path(path), "discriminator_predictions."
        head = {k[len(marker):]: v for k, v in (state or {}).items() if k.startswith(marker)}
        if not head:
            return None
    if sorted(head) != sorted(DISCRIMINATOR_HEAD_KEYS):
        raise ConvBertError(f"{source}: holds {', '.join(marker + k for k in sorted(head))}; expected the "
                            f"replaced-token head {', '.join(marker + k for k in DISCRIMINATOR_HEAD_KEYS)}")
    return head


def check_vocab_fits(vocab_file: str | os.PathLike, rows: int, source: str, hint: str) -> None:
    """A vocab with more entries than the model has word embeddings is not the model's vocab."""
    from convbert.data.tokenize import WordPieceTokenizer

    entries = WordPieceTokenizer.from_vocab(vocab_file).vocab_size
    if entries > rows:
        raise ConvBertError(f"{vocab_file}: {entries} entries, but {source} has {rows} word embeddings ({hint})")


def copy_vocab(vocab_file: str | os.PathLike, model_dir: str | os.PathLike) -> None:
    """Copy `vocab_file` into `model_dir` as `vocab.txt`, atomically."""
    with atomic_path(Path(model_dir) / "vocab.txt") as tmp:
        shutil.copyfile(vocab_file, tmp)


TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json")


def write_tokenizer_config(model_dir: str | os.PathLike, lower_case: bool, strip_accents: bool,
                           model_max_length: int | None = None) -> None:
    """The casing the vocab is used with, where transformers' tokenizers and `convbert glue`/`finetune` read it,
    and the model's position count (transformers' tokenizers truncate to it)."""
    settings = {"do_lower_case": bool(lower_case), "strip_accents": bool(strip_accents) and bool(lower_case)}
    if model_max_length is not None:
        settings["model_max_length"] = int(model_max_length)
    write_json_atomic(Path(model_dir) / "tokenizer_config.json", settings)


def copy_tokenizer_files(source_dir: str | os.PathLike, model_dir: str | os.PathLike) -> None:
    """The tokenizer files a model folder is read with (`vocab.txt`, and the casing in `tokenizer_config.json`),
    whichever `source_dir` has, so the new folder works as `--model` on its own."""
    for name in TOKENIZER_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            with atomic_path(Path(model_dir) / name) as tmp:
                shutil.copyfile(src, tmp)
