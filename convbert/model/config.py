"""ConvBERT configuration: the fields of the original (HF names), the paper presets, and the generator rule."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from convbert.errors import ConvBertError

# Fields HF's ConvBertConfig knows; everything else is ours and is kept under "convbert_extra" in config.json.
HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "embedding_size", "head_ratio", "conv_kernel_size", "num_groups",
    "pad_token_id",
)
# The subset transformers' ElectraConfig knows: a plain-attention model without grouped FFN *is* an ELECTRA (or
# BERT-style) encoder with the same parameter names, and is read and written in that layout (model_type "electra").
ELECTRA_FIELDS = tuple(name for name in HF_FIELDS if name not in ("head_ratio", "conv_kernel_size", "num_groups"))
HF_MODEL_TYPES = ("convbert", "conv_bert", "electra")
# Fields that define the network: a model folder's own, never taken from an override (`from_pretrained`,
# `pretrain --init-from`): plain attention's head count, for one, changes no tensor shape, so weights would load.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "type_vocab_size", "embedding_size", "head_ratio",
                       "conv_kernel_size", "num_groups", "attention_type", "hidden_act", "layer_norm_eps")
HF_CONVBERT_DEFAULT_EMBEDDING_SIZE = 768  # transformers' ConvBertConfig, for a config.json without the field
# transformers' ElectraConfig defaults (ELECTRA-small's shape): what it builds for a field an ELECTRA config.json
# leaves out, so the same file gives the same model here (plain attention has the same tensor shapes for any head
# count, so a different default would load without error and compute something else).
ELECTRA_DEFAULTS = {"vocab_size": 30522, "hidden_size": 256, "num_hidden_layers": 12, "num_attention_heads": 4,
                    "intermediate_size": 1024, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
                    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "embedding_size": 128, "pad_token_id": 0}


WRONG_TYPE = object()
TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "dict": "a mapping"}


def as_field_type(value: Any, kind: str) -> Any:
    """`value` as a config field of type `kind` ("int", "float", "bool", "str", "dict"), or WRONG_TYPE.

    Numbers written as text are converted (YAML reads `1e-12`, with no decimal point, as a string; `--set` values
    arrive as text); integral floats become ints; bools are never numbers; bools may be written true/false,
    yes/no or 1/0 as text (a number is not a switch); numbers of any integral or real type (numpy's too) count as numbers;
    numbers are accepted as strings (names). Any other kind is returned unchanged."""
    if kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        return value if isinstance(value, bool) else WRONG_TYPE
    if kind in ("int", "float"):
        if isinstance(value, bool):
            return WRONG_TYPE
        if isinstance(value, str):
            try:
                value = float(value) if kind == "float" or any(c in value for c in ".eE") else int(value)
            except ValueError:
                return WRONG_TYPE
        if kind == "float":
            return float(value) if isinstance(value, numbers.Real) else WRONG_TYPE
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        return WRONG_TYPE
    if kind == "str":  # a YAML scalar such as `output: 2024` is a name
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value if isinstance(value, str) else WRONG_TYPE
    if kind == "dict":
        return value if isinstance(value, dict) else WRONG_TYPE
    return value


@dataclass
class ConvBertConfig:
    """Hyper-parameters of one ConvBERT encoder (spec §2.1). Defaults are the `base` discriminator."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    embedding_size: int = 768
    head_ratio: int = 2
    conv_kernel_size: int = 9
    num_groups: int = 1
    pad_token_id: int = 0
    # "mixed" = ConvBERT; "plain" = ELECTRA/BERT full self-attention with N heads and no conv branch (a baseline).
    attention_type: str = "mixed"
    # Divergence from the original (off by default): zero padded positions before both convolutions.
    mask_conv_padding: bool = False
    # Recompute each layer's activations in backward instead of storing them (medium-small on CPU: ~0.2x the
    # live memory, ~40 % more time).
    gradient_checkpointing: bool = False
    # Free-form notes (e.g. the preset name); not used by the model.
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._coerce_types()
        self.validate()

    def _coerce_types(self) -> None:
        """Bring each field to its declared type (`as_field_type`), or fail naming it, not crash later."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            converted = as_field_type(value, kind)
            if converted is WRONG_TYPE:
                raise ConvBertError(f"config field '{f.name}' = {value!r}: expected {TYPE_NAMES[kind]}")
            setattr(self, f.name, converted)

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        """d = H / N from the *configured* head count (spec §1.8 point 8)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def reduced_heads(self) -> int:
        """Nr: heads in each branch; the single-head fallback of §1.6 gives 1."""
        if self.attention_type == "plain":
            return self.num_attention_heads
        return max(1, self.num_attention_heads // self.head_ratio)

    @property
    def branch_width(self) -> int:
        """A = Nr * d: the width of the self-attention branch and of the conv branch."""
        return self.reduced_heads * self.head_size

    @property
    def attention_output_width(self) -> int:
        """Width of the concatenation that `attention.output.dense` reads (2A, or H for plain attention)."""
        return self.branch_width if self.attention_type == "plain" else 2 * self.branch_width

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; the first bad one is a ConvBertError naming it and what was expected."""
        def need(ok: bool, field_name: str, expected: str) -> None:
            if not ok:
                raise ConvBertError(f"config field '{field_name}' = {getattr(self, field_name)!r}: expected {expected}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "embedding_size", "head_ratio",
                     "conv_kernel_size", "num_groups"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "a positive integer")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             f"a divisor of hidden_size ({self.hidden_size})")
        need(self.conv_kernel_size % 2 == 1, "conv_kernel_size",
             "an odd number (the 'same' depthwise padding and the (K-1)/2 span padding agree only for odd K)")
        need(self.hidden_size % self.num_groups == 0, "num_groups", f"a divisor of hidden_size ({self.hidden_size})")
        need(self.intermediate_size % self.num_groups == 0, "num_groups",
             f"a divisor of intermediate_size ({self.intermediate_size})")
        need(self.hidden_act in ("gelu",), "hidden_act", "'gelu' (the exact erf form used by the original)")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool), name, "a number")
        need(isinstance(self.extra, dict), "extra", "a mapping (free-form notes)")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as err:
            need(False, "extra", f"notes that JSON can hold (config.json stores them): {err}")
        shadowed = sorted(set(self.extra) & {f.name for f in dataclasses.fields(self)})
        need(not shadowed, "extra", f"notes only, without the config field name(s) {', '.join(shadowed)} (set the "
             "field itself: a note of that name would replace it when the config is saved and read back)")
        need(0.0 <= self.hidden_dropout_prob < 1.0, "hidden_dropout_prob", "a probability in [0, 1)")
        need(0.0 <= self.attention_probs_dropout_prob < 1.0, "attention_probs_dropout_prob", "a probability in [0, 1)")
        need(self.attention_type in ("mixed", "plain"), "attention_type", "'mixed' or 'plain'")
        need(0 <= self.pad_token_id < self.vocab_size, "pad_token_id", f"an id in [0, {self.vocab_size})")
        need(0 < self.layer_norm_eps < math.inf, "layer_norm_eps", "a positive number (finite)")
        need(0 <= self.initializer_range < math.inf, "initializer_range", "a standard deviation >= 0 (finite)")

    # ---- presets -------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ConvBertConfig":
        """The paper sizes (spec §2.1), plus `tiny` for tests and demos (not a paper size)."""
        if name not in PRESETS:
            raise ConvBertError(f"unknown size '{name}': expected one of {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        extra = values.get("extra") or {}
        if not isinstance(extra, dict):
            raise ConvBertError(f"config field 'extra' = {extra!r}: expected a mapping")
        values["extra"] = {**extra, "preset": name}
        return cls.from_dict(values, source=f"preset {name!r} overrides")

    def generator_config(self, fraction: float) -> "ConvBertConfig":
        """The generator of spec §2.2: width and heads scaled by `fraction`, same depth, FFN 4x, same tables."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConvBertError(f"generator fraction {fraction!r}: expected a number in (0, 1]")
        hidden = int(round(self.hidden_size * fraction))
        # max(1, N * f), then cast to int as the original does (truncation; the epsilon absorbs float noise in
        # fractions such as 1/3, where 12 * f is 4 in exact arithmetic).
        heads = int(max(1.0, self.num_attention_heads * fraction) + 1e-9)
        if hidden % heads:
            raise ConvBertError(f"generator of hidden {hidden} cannot have {heads} heads (fraction {fraction})")
        try:
            return dataclasses.replace(
                self,
                hidden_size=hidden,
                num_attention_heads=heads,
                intermediate_size=4 * hidden,
                extra={**self.extra, "generator_fraction": fraction},
            )
        except ConvBertError as err:  # name the fraction, which is what the user chose, not the derived field
            raise ConvBertError(f"generator fraction {fraction}: the generator (hidden {hidden}, {heads} head(s)) "
                                f"is not a valid ConvBERT ({err}); choose a larger fraction") from None

    # ---- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON values (the inverse of `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "ConvBertConfig":
        """A config from `to_dict`'s output; unknown fields and wrong types are errors naming `source`."""
        if not isinstance(values, dict):
            raise ConvBertError(f"{source}: expected a JSON object of config fields, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(values) - known))
        if unknown:
            raise ConvBertError(f"{source}: unknown config field(s) {', '.join(unknown)}")
        try:
            return cls(**values)
        except ConvBertError as err:
            if source == "config":
                raise
            raise ConvBertError(f"{source}: {err}") from None

    def replace(self, source: str = "config", **changes: Any) -> "ConvBertConfig":
        """A copy with `changes` applied through the same conversion and checks as the constructor."""
        return type(self).from_dict({**self.to_dict(), **changes}, source=source)

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write `to_dict()` as JSON, atomically."""
        from convbert.utils import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ConvBertConfig":
        """Read a file written by `to_json_file` (errors name the file)."""
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except FileNotFoundError:
            raise ConvBertError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConvBertError(f"{path}: is a folder; expected a config JSON file") from None
        except json.JSONDecodeError as err:
            raise ConvBertError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
        except UnicodeDecodeError as err:
            raise ConvBertError(f"{path}: not UTF-8 text (byte {err.start}); a config file is UTF-8 JSON") from None
        return cls.from_dict(values, source=str(path))

    # ---- HF config.json ------------------------------------------------------------------------------------
    @property
    def hf_model_type(self) -> str:
        """The HF layout this model is saved in: "electra" for plain attention with an ungrouped FFN (what
        transformers' ElectraModel computes, same parameter names), "convbert" otherwise."""
        return "electra" if self.attention_type == "plain" and self.num_groups == 1 else "convbert"

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that `transformers.ConvBertModel.from_pretrained` (or, for the ELECTRA layout,
        `transformers.ElectraModel.from_pretrained`) reads unchanged; our own fields ride in `convbert_extra`."""
        ours = {"attention_type": self.attention_type, "mask_conv_padding": self.mask_conv_padding,
                "gradient_checkpointing": self.gradient_checkpointing}
        if self.hf_model_type == "electra":
            values = {name: getattr(self, name) for name in ELECTRA_FIELDS}
            values.update(model_type="electra", architectures=["ElectraModel"], position_embedding_type="absolute")
            ours.update(head_ratio=self.head_ratio, conv_kernel_size=self.conv_kernel_size)  # unused, kept
        else:
            values = {name: getattr(self, name) for name in HF_FIELDS}
            values.update(model_type="convbert", architectures=["ConvBertModel"], bos_token_id=0, eos_token_id=2)
        values["convbert_extra"] = {**self.extra, **ours}
        return values

    @classmethod
    def from_hf_dict(cls, values: dict[str, Any], source: str = "config.json") -> "ConvBertConfig":
        """A ConvBERT config.json (`model_type` "convbert" or the early "conv_bert"), or an ELECTRA one
        ("electra": e.g. the hub's google/electra-*-discriminator), which becomes plain attention."""
        if not isinstance(values, dict):
            raise ConvBertError(f"{source}: expected a JSON object of config fields, got {type(values).__name__}")
        model_type = values.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ConvBertError(f"{source}: field 'model_type' is {model_type!r}: expected "
                                f"{', '.join(map(repr, HF_MODEL_TYPES[:-1]))} or {HF_MODEL_TYPES[-1]!r}")
        electra = model_type == "electra"
        kwargs: dict[str, Any] = dict(ELECTRA_DEFAULTS) if electra else {}
        for name in ELECTRA_FIELDS if electra else HF_FIELDS:
            if name in values and values[name] is not None:
                kwargs[name] = values[name]
        if "linear_groups" in values and "num_groups" not in values and not electra:  # the original TF name
            kwargs["num_groups"] = values["linear_groups"]
        if values.get("embedding_size") is None and not electra:
            # transformers' ConvBertConfig default (its port reads such a file with 768-wide tables, and so the
            # weights saved with it); the original TF code would take hidden_size instead
            kwargs["embedding_size"] = HF_CONVBERT_DEFAULT_EMBEDDING_SIZE
        if values.get("hidden_act") == "gelu_python":  # transformers' name for the same erf GELU
            kwargs["hidden_act"] = "gelu"  # ("gelu_new" is the tanh approximation: refused by validation)
        if electra and values.get("position_embedding_type", "absolute") != "absolute":
            raise ConvBertError(f"{source}: field 'position_embedding_type' is "
                                f"{values['position_embedding_type']!r}: only 'absolute' (ELECTRA's) is supported")
        if electra and values.get("is_decoder"):  # transformers' ELECTRA then masks attention causally
            raise ConvBertError(f"{source}: field 'is_decoder' is true: transformers runs this ELECTRA with causal "
                                "(left-to-right) self-attention, e.g. ElectraForCausalLM; convbert's encoders are "
                                "bidirectional only")
        ours = values.get("convbert_extra") or {}
        if not isinstance(ours, dict):
            raise ConvBertError(f"{source}: field 'convbert_extra' is {type(ours).__name__}: expected an object "
                                "(convbert's own fields and notes)")
        ours = dict(ours)
        names = ("attention_type", "mask_conv_padding", "gradient_checkpointing")
        for name in names + (("head_ratio", "conv_kernel_size") if electra else ()):
            if name in ours:
                kwargs[name] = ours.pop(name)
        if electra:
            if kwargs.setdefault("attention_type", "plain") != "plain":
                raise ConvBertError(f"{source}: model_type 'electra' with convbert_extra.attention_type "
                                    f"{kwargs['attention_type']!r}: an ELECTRA folder holds plain attention")
        kwargs["extra"] = ours
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ConvBertError(f"{source}: {err}") from None
        except ConvBertError as err:
            raise ConvBertError(f"{source}: {err}") from None

PRESETS: dict[str, dict[str, Any]] = {
    # Spec §2.1. Heads: H//64, except medium-small which uses H//48 (d = 48).
    "small": dict(hidden_size=256, num_hidden_layers=12, num_attention_heads=4, intermediate_size=1024,
                  embedding_size=128, num_groups=1),
    "medium-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=8, intermediate_size=1536,
                         embedding_size=128, num_groups=2),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 embedding_size=768, num_groups=1),
    # Not a paper size: a 2-layer model with grouped FFN and a projection, for tests and the CPU quickstart.
    "tiny": dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, embedding_size=32, num_groups=2, max_position_embeddings=128),
}

# Generator width fraction per size (spec §2.2).
PRESET_GENERATOR_FRACTION: dict[str, float] = {"tiny": 0.25, "small": 0.25, "medium-small": 0.25, "base": 1 / 3}
