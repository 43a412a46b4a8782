"""The building blocks of a ConvBERT layer: separable conv, span-based dynamic conv, mixed attention, grouped FFN.

Parameter names and shapes follow the HF checkpoint layout exactly (spec §1.9, hf-convbert.md §3), so a state
dict loads without translation. The computation follows the original TF code (spec §1.4), written for speed:
both convolutions are `kernels.same_conv` on the [B, T, C] activations (no unfold, no k-fold buffer, no layout
transposes: a shift-and-add, oneDNN's depthwise conv on a channels-last view, or banded block products), the four
input projections are one matrix multiply, and the attention is one head at a time on BLAS on the CPU
(`scaled_dot_product_attention` elsewhere).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from convbert.model import kernels
from convbert.model.kernels import same_conv
from convbert.model.config import ConvBertConfig


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact erf GELU of the original (not the tanh approximation)."""
    return F.gelu(x)


def _triton_span_conv_enabled(t: torch.Tensor) -> bool:
    from convbert.model.triton_span_conv import use_triton_span_conv

    return use_triton_span_conv(t)


class SeparableConv1D(nn.Module):
    """Depthwise (K taps per channel, no bias) then pointwise (H -> A, no bias), then one bias of size A (§1.4 step 2).

    Stored as HF stores it: depthwise.weight [H, 1, K], pointwise.weight [A, H, 1], bias [A, 1].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.depthwise = nn.Conv1d(in_channels, in_channels, kernel_size, groups=in_channels, bias=False)
        self.pointwise = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, H] -> [B, T, A]
        # squeeze, not [:, 0]: a view both ways (indexing's backward writes a zero tensor and copies into it)
        depthwise = same_conv(x, self.depthwise.weight.squeeze(1))  # "same" zero padding on the time axis
        return kernels.linear(depthwise, self.pointwise.weight.squeeze(2), self.bias.squeeze(1))


class MixedAttention(nn.Module):
    """Self-attention heads and span-based dynamic convolution heads side by side (spec §1.4).

    Returns the concatenation [SA heads | conv heads], [B, T, 2A] (or [B, T, H] with plain attention).
    """

    def __init__(self, config: ConvBertConfig):
        super().__init__()
        hidden = config.hidden_size
        self.plain = config.attention_type == "plain"
        self.num_heads = config.reduced_heads
        self.head_size = config.head_size
        self.width = config.branch_width
        self.kernel_size = config.conv_kernel_size
        self.dropout_p = config.attention_probs_dropout_prob
        self.mask_conv_padding = config.mask_conv_padding

        self.query = nn.Linear(hidden, self.width)
        self.key = nn.Linear(hidden, self.width)
        self.value = nn.Linear(hidden, self.width)
        if not self.plain:
            self.key_conv_attn_layer = SeparableConv1D(hidden, self.width, self.kernel_size)
            self.conv_kernel_layer = nn.Linear(self.width, self.num_heads * self.kernel_size)
            self.conv_out_layer = nn.Linear(hidden, self.width)

    def _projections(self) -> list[nn.Linear]:
        layers = [self.query, self.key, self.value]
        return layers if self.plain else layers + [self.conv_out_layer]

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None, token_mask: torch.Tensor | None,
                output_attentions: bool = False):
        """[B, T, H] -> [B, T, 2A]; with `output_attentions`, also the self-attention probabilities [B, Nr, T, T]."""
        batch, length, _ = x.shape
        heads, size = self.num_heads, self.head_size
        layers = self._projections()
        # One GEMM for query, key, value (and conv values): all read the same x.
        weight = torch.cat([layer.weight for layer in layers]).to(x.dtype)  # casts: a no-op except in CPU bf16
        bias = torch.cat([layer.bias for layer in layers]).to(x.dtype)
        projected = kernels.linear(x, weight, bias).split(self.width, dim=-1)
        query, key, value = projected[:3]

        def per_head(t: torch.Tensor) -> torch.Tensor:  # [B, T, A] -> [B, T, Nr, d], a view: no copy
            return t.view(batch, length, heads, size)

        attend = explicit_attention if output_attentions else kernels.attention
        context = attend(
            per_head(query), per_head(key), per_head(value), additive_mask,
            scale=1.0 / math.sqrt(size), dropout_p=self.dropout_p, training=self.training,
        )  # [B, T, Nr, d]
        probabilities = None
        if output_attentions:
            context, probabilities = context
        if self.plain:
            mixed = context.reshape(batch, length, heads * size)
            return (mixed, probabilities) if output_attentions else mixed

        conv_input = x if token_mask is None else x * token_mask
        separable, kernel_layer = self.key_conv_attn_layer, self.conv_kernel_layer
        dtype = x.dtype
        kernel_logits = kernels.span_kernel_logits(  # linear(separable_conv(x) * query); query is unscaled
            conv_input, separable.depthwise.weight.squeeze(1).to(dtype), separable.pointwise.weight.squeeze(2).to(dtype),
            separable.bias.squeeze(1).to(dtype), query, kernel_layer.weight.to(dtype), kernel_layer.bias.to(dtype))
        conv_value = projected[3]
        if token_mask is not None:
            conv_value = conv_value * token_mask
        if dtype == torch.bfloat16 and x.device.type == "cpu":
            # The kernel softmax and the span conv in fp32: the CPU's bf16 broadcasting multiply-adds are ~8x
            # slower than fp32 ones (two casts cost less), and the 9 taps are summed without bf16 rounding.
            kernel_logits, conv_value = kernel_logits.float(), conv_value.float()
        kernel = kernels.short_softmax(kernel_logits.view(batch, length, heads, self.kernel_size))
        if conv_value.device.type == "cuda" and not kernels._compiling() and _triton_span_conv_enabled(conv_value):
            # eager CUDA: the fused kernel; under torch.compile the plain shift-and-add below, which Inductor
            # fuses itself (Dynamo cannot trace the kernel's autograd.Function under autocast: torch 2.11)
            from convbert.model.triton_span_conv import span_conv

            conv = span_conv(conv_value.view(batch, length, heads, size), kernel)
        else:  # zero padding after the projection: outside the sequence the values are 0, not the bias
            conv = same_conv(conv_value.view(batch, length, heads, size), kernel.unsqueeze(-2))  # [B, T, Nr, d]

        mixed = torch.cat([context, conv.to(dtype)], dim=2).reshape(batch, length, 2 * heads * size)
        return (mixed, probabilities) if output_attentions else mixed


def explicit_attention(q, k, v, additive_mask, scale: float, dropout_p: float, training: bool):
    """Attention as the original writes it, keeping the probabilities: [B, T, N, d] -> ([B, T, N, d], [B, N, T, T]).
    The probabilities returned are the ones the context used: after dropout when training, as transformers'."""
    scores = torch.einsum("bqnd,bknd->bnqk", q, k) * scale
    if additive_mask is not None:
        scores = scores + additive_mask
    probabilities = F.dropout(torch.softmax(scores, dim=-1), dropout_p, training)
    return torch.einsum("bnqk,bknd->bqnd", probabilities, v), probabilities


class GroupedLinear(nn.Module):
    """G independent contiguous blocks, no shuffle (spec §1.5). weight [G, in/G, out/G] (TF layout), bias [out]."""

    def __init__(self, in_features: int, out_features: int, groups: int):
        super().__init__()
        self.groups = groups
        self.in_per_group = in_features // groups
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(groups, in_features // groups, out_features // groups))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.grouped_linear(x, self.weight, self.bias, self.groups)


def feed_forward_linear(in_features: int, out_features: int, groups: int) -> nn.Module:
    return nn.Linear(in_features, out_features) if groups == 1 else GroupedLinear(in_features, out_features, groups)


class _Dense(nn.Module):
    """A holder so the HF names `intermediate.dense` / `output.dense` come out right."""

    def __init__(self, dense: nn.Module):
        super().__init__()
        self.dense = dense


class AttentionOutput(nn.Module):
    def __init__(self, config: ConvBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.attention_output_width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class Attention(nn.Module):
    def __init__(self, config: ConvBertConfig):
        super().__init__()
        self.self = MixedAttention(config)  # HF name: attention.self.*
        self.output = AttentionOutput(config)


class ConvBertLayer(nn.Module):
    """Post-LN block: LN(x + drop(W·attn(x))), then LN(h + drop(FFN(h))) (spec §1.3)."""

    def __init__(self, config: ConvBertConfig):
        super().__init__()
        self.groups = config.num_groups
        self.attention = Attention(config)
        self.intermediate = _Dense(
            feed_forward_linear(config.hidden_size, config.intermediate_size, config.num_groups))
        self.output = _Dense(feed_forward_linear(config.intermediate_size, config.hidden_size, config.num_groups))
        self.output.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None, token_mask: torch.Tensor | None,
                compute_dtype: torch.dtype | None = None, output_attentions: bool = False):
        """`compute_dtype` (bf16 under CPU autocast): the sub-layers and their weights are cast to it, while the
        residual stream and the LayerNorms stay in x's dtype (fp32), as CUDA autocast keeps them.
        `output_attentions`: returns (output, self-attention probabilities)."""
        attention, out = self.attention, self.attention.output
        dtype = compute_dtype or x.dtype  # the casts below are no-ops unless compute_dtype is given
        mixed = attention.self(x.to(dtype), additive_mask, token_mask, output_attentions)
        probabilities = None
        if output_attentions:
            mixed, probabilities = mixed
        h = kernels.layer_norm(kernels.linear_dropout_add(mixed, out.dense.weight.to(dtype), out.dense.bias.to(dtype),
                                                          x, out.dropout.p, self.training), out.LayerNorm)
        # GELU between the two (grouped) linears: its output is recomputed in backward, not stored
        inner, outer = self.intermediate.dense, self.output.dense
        f = kernels.feed_forward_dropout_add(h.to(dtype), inner.weight.to(dtype), inner.bias.to(dtype),
                                             outer.weight.to(dtype), outer.bias.to(dtype), self.groups, h,
                                             self.output.dropout.p, self.training)
        y = kernels.layer_norm(f, self.output.LayerNorm)
        return (y, probabilities) if output_attentions else y
