"""The ConvBERT encoder: embeddings (E-wide), optional E->H projection, a stack of mixed-attention layers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from convbert.errors import ConvBertError
from convbert.model import kernels
from convbert.model.config import ConvBertConfig
from convbert.model.layers import ConvBertLayer, GroupedLinear, MixedAttention, SeparableConv1D

# The additive constant for masked keys in the original (-10000, not -inf; spec §1.8 point 11).
MASK_VALUE = -10000.0


@dataclass
class ConvBertOutput:
    """`hidden_states`: the (projected) embeddings and every layer's output, with `output_hidden_states`;
    `attentions`: every layer's self-attention probabilities [B, SA heads, T, T], with `output_attentions`."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, index: int):
        return (self.last_hidden_state, self.hidden_states, self.attentions)[index]


class ConvBertEmbeddings(nn.Module):
    """word + token type + position (all E-wide), LayerNorm, dropout (spec §1.2). Shared by generator and discriminator."""

    def __init__(self, config: ConvBertConfig):
        super().__init__()
        width = config.embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, width)  # no padding_idx: [PAD] is a trained row
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor | None, token_type_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Word + position + segment embeddings, LayerNorm, dropout: [B, T] ids -> [B, T, E]. `inputs_embeds`
        [B, T, E] stands in for the word-embedding lookup (positions and segments are still added)."""
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        length = words.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ConvBertError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}")
        x = words + self.position_embeddings.weight[:length]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return kernels.dropout(self.LayerNorm(x), self.dropout.p, self.training)


class ConvBertEncoder(nn.Module):
    def __init__(self, config: ConvBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(ConvBertLayer(config) for _ in range(config.num_hidden_layers))


def _check_embeds(inputs_embeds, width: int) -> None:
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
            or not inputs_embeds.is_floating_point() or inputs_embeds.shape[-1] != width:
        what = (f"{tuple(inputs_embeds.shape)} {inputs_embeds.dtype}" if isinstance(inputs_embeds, torch.Tensor)
                else type(inputs_embeds).__name__)
        raise ConvBertError(f"inputs_embeds is {what}: expected floating-point word embeddings of shape "
                            f"[batch, length, {width}] (config.embedding_size)")
    if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
        raise ConvBertError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}: expected at least one token "
                            "per row and one row")


def _check_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds=None, width: int = 0) -> None:
    """Shapes and dtypes only (no device sync): a wrong call is named here, not deep inside a kernel."""
    if input_ids is not None and inputs_embeds is not None:
        raise ConvBertError("both input_ids and inputs_embeds were given: pass one of them")
    if inputs_embeds is not None:
        _check_embeds(inputs_embeds, width)
        _check_like(inputs_embeds.shape[:2], attention_mask, token_type_ids)
        return
    if input_ids is None:
        raise ConvBertError("neither input_ids nor inputs_embeds was given: pass one of them")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.dtype == torch.bool:
        what = (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor)
                else type(input_ids).__name__)
        raise ConvBertError(f"input_ids is {what}: expected integer token ids of shape [batch, length]")
    if input_ids.numel() == 0:
        raise ConvBertError(f"input_ids has shape {tuple(input_ids.shape)}: expected at least one token per row "
                            "and one row")
    _check_like(input_ids.shape, attention_mask, token_type_ids, "input_ids")


def _check_like(shape, attention_mask, token_type_ids, source: str = "inputs_embeds' [batch, length]") -> None:
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConvBertError(f"{name} has shape {got}: expected the shape of {source} {tuple(shape)}")
    if token_type_ids is not None and (token_type_ids.is_floating_point() or token_type_ids.dtype == torch.bool):
        raise ConvBertError(f"token_type_ids is {token_type_ids.dtype}: expected integer segment ids")


def _embedding_index(ids: torch.Tensor | None) -> torch.Tensor | None:
    """Any integer ids as the int64/int32 an embedding lookup takes (uint8 or int16 ids are widened)."""
    return ids if ids is None or ids.dtype in (torch.int64, torch.int32) else ids.long()


def _out_of_range(input_ids, token_type_ids, config: ConvBertConfig) -> str | None:
    """Which ids an embedding lookup could not find, named after the argument and the config field."""
    for name, t, size, field in (("input_ids", input_ids, config.vocab_size, "vocab_size"),
                                 ("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")):
        if t is not None and (int(t.min()) < 0 or int(t.max()) >= size):
            return (f"{name} holds values from {int(t.min())} to {int(t.max())}: expected 0..{size - 1} "
                    f"(config.{field} is {size})")
    return None


def _trunc_normal_(weight: torch.Tensor, std: float) -> None:
    # TF1's truncated_normal redraws beyond two standard deviations; a and b are absolute bounds.
    if std == 0:  # (initializer_range 0: all zeros, as TF gives; torch's sampler would divide by zero)
        nn.init.zeros_(weight)
        return
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def init_weights(module: nn.Module, config: ConvBertConfig) -> None:
    """Initialisation of the original (spec §1.7). `embeddings_project` is Glorot, set by its owner."""
    std = config.initializer_range
    for sub in module.modules():
        if isinstance(sub, SeparableConv1D):
            _trunc_normal_(sub.depthwise.weight, 1.0 / sub.kernel_size)
            _trunc_normal_(sub.pointwise.weight, std)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, (nn.Linear, GroupedLinear)):
            _trunc_normal_(sub.weight, std)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            _trunc_normal_(sub.weight, std)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class ConvBertModel(nn.Module):
    """The ConvBERT encoder (the discriminator that is fine-tuned, or a generator body).

    `embeddings` lets a generator share the discriminator's tables and embedding LayerNorm (spec §3.6); the
    projection to this model's width is always its own.
    """

    def __init__(self, config: ConvBertConfig, embeddings: ConvBertEmbeddings | None = None):
        super().__init__()
        if not isinstance(config, ConvBertConfig):
            raise ConvBertError(f"config is a {type(config).__name__}: expected a ConvBertConfig (from_preset, "
                                "from_dict or from_json_file build one)")
        config.validate()
        self.config = config
        shared = embeddings is not None
        self.embeddings = embeddings if shared else ConvBertEmbeddings(config)
        width = self.embeddings.word_embeddings.embedding_dim
        if width != config.embedding_size:
            raise ConvBertError(f"shared embeddings are {width} wide but config.embedding_size is "
                                f"{config.embedding_size}")
        for table, kind, field_name in (("word_embeddings", "word", "vocab_size"),
                                        ("position_embeddings", "position", "max_position_embeddings"),
                                        ("token_type_embeddings", "token-type", "type_vocab_size")):
            rows = getattr(self.embeddings, table).num_embeddings
            if rows != getattr(config, field_name):
                raise ConvBertError(f"shared embeddings have {rows} {kind} rows but config.{field_name} is "
                                    f"{getattr(config, field_name)}")
        self.embeddings_project = nn.Linear(width, config.hidden_size) if width != config.hidden_size else None
        self.encoder = ConvBertEncoder(config)

        init_weights(self.encoder, config)
        if not shared:
            init_weights(self.embeddings, config)
        if self.embeddings_project is not None:
            nn.init.xavier_uniform_(self.embeddings_project.weight)  # no initialiser in the original: TF's Glorot
            nn.init.zeros_(self.embeddings_project.bias)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> ConvBertOutput:
        """Encode token ids [B, T]; `attention_mask` 1 = token, 0 = padding (masked in the self-attention branch
        only, as the original, unless `mask_conv_padding`). `output_hidden_states` adds the (projected) embeddings
        and every layer's output; `output_attentions` every layer's self-attention probabilities (the conv heads
        have none; this takes a slower explicit attention). `inputs_embeds` [B, T, E] replaces the word-embedding
        lookup of `input_ids` (for gradients with respect to the input, or soft tokens)."""
        _check_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds, self.config.embedding_size)
        table = self.embeddings.word_embeddings.weight
        if (inputs_embeds is not None and inputs_embeds.dtype != table.dtype
                and not kernels._autocast_on(inputs_embeds.device.type)):
            raise ConvBertError(f"inputs_embeds is {inputs_embeds.dtype} but the model is {table.dtype}: cast one to "
                                "the other (or run under torch.autocast)")
        input_ids, token_type_ids = _embedding_index(input_ids), _embedding_index(token_type_ids)
        try:
            x = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        except IndexError as err:  # (values are only inspected on failure: no device sync on the normal path)
            raise ConvBertError(_out_of_range(input_ids, token_type_ids, self.config) or str(err)) from None
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)
        compute_dtype = kernels.cpu_mixed_precision_dtype(x)
        outputs = (output_hidden_states, output_attentions)
        if compute_dtype is not None and self.encoder.layer[0].output.LayerNorm.weight.dtype == torch.float32:
            # CPU bf16 autocast of an fp32 model: fp32 residual stream, bf16 layers (see ConvBertLayer); a model
            # cast to another dtype (.double(), .bfloat16()) is left to autocast itself, as transformers' is
            with torch.autocast("cpu", enabled=False):
                return self._encode(x.float(), attention_mask, *outputs, compute_dtype)
        return self._encode(x, attention_mask, *outputs, None)

    def _encode(self, x: torch.Tensor, attention_mask: torch.Tensor | None, output_hidden_states: bool,
                output_attentions: bool, compute_dtype: torch.dtype | None) -> ConvBertOutput:
        additive_mask = token_mask = None
        if attention_mask is not None:
            mask = attention_mask.to(compute_dtype or x.dtype)
            # Only key positions are masked, and only in the self-attention branch (spec §1.2 point 5).
            additive_mask = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]
            if self.config.mask_conv_padding:
                token_mask = mask[:, :, None]

        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.encoder.layer:
            args = (x, additive_mask, token_mask, compute_dtype, output_attentions)
            if recompute:  # the RNG state is replayed, so dropout masks are the same in the recomputation
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
            if attentions is not None:
                x, probabilities = x
                attentions.append(probabilities)
            if hidden_states is not None:
                hidden_states.append(x)
        return ConvBertOutput(x, tuple(hidden_states) if hidden_states is not None else None,
                              tuple(attentions) if attentions is not None else None)

    # ---- checkpoints (HF layout) -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **config_overrides) -> "ConvBertModel":
        """Load an HF-layout folder: config.json + model.safetensors (or pytorch_model.bin, weights only)."""
        from convbert.interop.hf import load_pretrained

        return load_pretrained(cls, path, **config_overrides)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that `transformers.ConvBertModel.from_pretrained` loads."""
        from convbert.interop.hf import save_pretrained

        save_pretrained(self, path)

    def num_parameters(self) -> int:
        """The number of parameters (each tensor counted once)."""
        return sum(p.numel() for p in self.parameters())


__all__ = ["ConvBertEmbeddings", "ConvBertModel", "ConvBertOutput", "MixedAttention", "init_weights"]
