"""`convbert pretrain --init-from MODEL`: start pre-training from published or exported weights, not from scratch.

Continuing pre-training on a new corpus (a domain, a language variety) from the released ConvBERT weights is a common
research need. `MODEL` is an HF-layout folder as `convbert export` and `convbert import-tf` write it (or a
transformers ELECTRA pair, e.g. the hub's google/electra-small-discriminator with its generator as `generator/`):

* the discriminator (`config.json` + weights) and its `vocab.txt`, which must be the vocabulary the data was built
  with (compared byte for byte: the same ids must mean the same word pieces);
* optionally `generator/` (`ConvBertForMaskedLM` / `ElectraForMaskedLM` layout: encoder, MLM head, the output
  bias) — without it the generator starts from scratch, as most HF hub folders hold discriminators only;
* optionally the replaced-token head (`discriminator_head.safetensors`, or `discriminator_predictions.*` in
  `ElectraForPreTraining` weights) — without it the head starts from scratch.

The architecture is the folder's (`--size` still picks the recipe: learning rate, batch, steps); the optimiser,
schedule and data order start fresh. A resumed run reads its checkpoints, not the folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from convbert.errors import ConvBertError
from convbert.interop import hf
from convbert.model.config import ARCHITECTURE_FIELDS, ConvBertConfig
from convbert.utils import sha256_file

# Settings that change what the weights mean: they come from the folder, not from --set model.* (dropout and
# gradient checkpointing may still be set).
@dataclass
class InitWeights:
    config: ConvBertConfig
    discriminator: dict[str, torch.Tensor]
    generator_config: ConvBertConfig | None = None
    generator: dict[str, torch.Tensor] | None = None  # encoder without the shared embeddings
    generator_head: dict[str, torch.Tensor] | None = None  # hf.GENERATOR_HEAD_KEYS
    discriminator_head: dict[str, torch.Tensor] | None = None
    mlm_head: dict[str, torch.Tensor] | None = None  # a masked-LM folder's head (an `--objective mlm` export)

    @property
    def generator_fraction(self) -> float | None:
        if self.generator_config is None:
            return None
        return self.generator_config.hidden_size / self.config.hidden_size


def read_init_weights(path: str | os.PathLike, data_vocab: Path | None) -> InitWeights:
    """Everything `--init-from` loads, read and checked before the run starts."""
    path = Path(path)
    where = f"--init-from {path}"
    if not path.is_dir():
        raise ConvBertError(f"{where}: not a model folder (expected config.json, weights and vocab.txt, as "
                            "`convbert export` or `convbert import-tf` write them)")
    vocab = path / "vocab.txt"
    if not vocab.is_file():
        raise ConvBertError(f"{where}: no vocab.txt; the model's vocabulary must be known to check it is the data's")
    if data_vocab is not None and sha256_file(vocab) != sha256_file(data_vocab):
        raise ConvBertError(f"{where}: its vocab.txt differs from the data's ({data_vocab}); build the data with "
                            f"`convbert build-data --vocab {vocab}` so that ids mean the same word pieces")
    config = hf.read_config(path)
    state, weight_file = hf.read_state_dict(path)
    init = InitWeights(config=config, discriminator=hf.translate_keys(state))

    gdir = path / hf.GENERATOR_DIR
    if (gdir / "config.json").is_file():
        init.generator_config, encoder, head, gfile = hf.read_generator_pretrained(gdir)
        # Pre-training shares one embedding table and ties the MLM projection to it: the folder's must be that one.
        shared = [(k, v) for k, v in encoder.items() if k.startswith("embeddings.")]
        tied = head.pop("lm_head.weight", None)
        if tied is not None:
            shared.append(("embeddings.word_embeddings.weight", tied))
        for key, value in shared:
            if not _matches_discriminator(init, key, value):
                raise ConvBertError(f"{gfile}: the generator's {key} (or its tied MLM projection) differs from the "
                                    "discriminator's; pre-training shares one embedding table (untied generator "
                                    "embeddings are not supported)")
        init.generator = {k: v for k, v in encoder.items() if not k.startswith("embeddings.")}
        init.generator_head = head
    init.discriminator_head = hf.read_discriminator_head(path, state)
    if hf.has_mlm_head(state):
        head = hf.read_mlm_head(state, weight_file)
        tied = head.pop("lm_head.weight", None)
        if tied is not None and not _matches_discriminator(init, "embeddings.word_embeddings.weight", tied):
            raise ConvBertError(f"{weight_file}: the MLM projection differs from the word embeddings; pre-training "
                                "ties them (untied MLM heads are not supported)")
        init.mlm_head = head
    return init


def _matches_discriminator(init: InitWeights, key: str, value: torch.Tensor) -> bool:
    """Whether the folder's discriminator holds exactly `value` under `key` (a shared or tied table)."""
    theirs = init.discriminator.get(key)
    return theirs is not None and theirs.shape == value.shape and torch.equal(theirs, value)


def model_config(init: InitWeights, overrides: dict, attention: str, max_seq_length: int,
                 data_vocab_size: int) -> ConvBertConfig:
    """The folder's architecture with the run's non-architecture overrides (dropout, checkpointing)."""
    fixed = sorted(k for k in overrides if k in ARCHITECTURE_FIELDS and overrides[k] != getattr(init.config, k))
    if fixed:
        raise ConvBertError(f"--init-from: model.{fixed[0]} = {overrides[fixed[0]]!r} differs from the model's "
                            f"{getattr(init.config, fixed[0])!r}; the architecture comes from the folder")
    if attention != init.config.attention_type:
        raise ConvBertError(f"--init-from: the model has {init.config.attention_type} attention; pass --attention "
                            f"{init.config.attention_type}")
    if init.config.vocab_size < data_vocab_size:
        raise ConvBertError(f"--init-from: the model has {init.config.vocab_size} word embeddings, fewer than the "
                            f"data's {data_vocab_size} vocabulary entries")
    if init.config.max_position_embeddings < max_seq_length:
        raise ConvBertError(f"--init-from: the model has {init.config.max_position_embeddings} positions; the data's "
                            f"sequences are {max_seq_length} long")
    extra = {**init.config.extra, "init_from": True}
    return init.config.replace(source="--init-from", extra=extra,
                               **{k: v for k, v in overrides.items() if k not in ARCHITECTURE_FIELDS})


def check_generator(init: InitWeights, derived: ConvBertConfig) -> None:
    """The generator the run builds (from the fraction) must be the folder's."""
    if init.generator_config is None:
        return
    fields = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "num_groups",
              "conv_kernel_size", "head_ratio", "attention_type")
    differ = [f for f in fields if getattr(derived, f) != getattr(init.generator_config, f)]
    if differ:
        f = differ[0]
        raise ConvBertError(f"--init-from: the folder's generator has {f} {getattr(init.generator_config, f)}, but "
                            f"the run's generator rule gives {getattr(derived, f)}; not a generator this recipe can "
                            "continue")


def load_into(model: torch.nn.Module, init: InitWeights, source: str) -> list[str]:
    """Copy the weights into the freshly built `ElectraPretrainingModel`; returns what starts from scratch."""
    from convbert.pretrain.checkpoint import check_state

    def put(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, skip_prefix: str | None = None):
        expected = {k: v for k, v in module.state_dict().items() if not (skip_prefix and k.startswith(skip_prefix))}
        check_state(expected, state, source, what=f"the {what} does not fit the model")
        with torch.no_grad():
            for key, value in state.items():
                expected[key].copy_(value.to(expected[key].dtype))

    put(model.discriminator, init.discriminator, "discriminator")
    fresh = []
    if model.generator is not None:
        if init.generator is not None:
            put(model.generator, init.generator, "generator", skip_prefix="embeddings.")
            put(model.generator_head, init.generator_head, "generator head")
        else:
            fresh.append("the generator and its MLM head (the folder has no generator/)")
    elif init.mlm_head is not None:
        put(model.generator_head, init.mlm_head, "MLM head")
    else:
        fresh.append("the MLM head (--objective mlm; the folder has none)")
    if model.discriminator_head is not None:
        if init.discriminator_head is not None:
            put(model.discriminator_head, init.discriminator_head, "discriminator head")
        else:
            fresh.append(f"the replaced-token head (the folder has no {hf.DISCRIMINATOR_HEAD_FILE}, and its "
                         "weights no discriminator_predictions.*)")
    return fresh
