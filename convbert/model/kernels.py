"""Memory- and time-lean autograd functions for CPU training (same maths as the plain PyTorch ops).

Each saves the least it can for backward and recomputes what is cheap:
  * `dropout`: the keep-mask is drawn from 16 random bits per element (half the cost of `bernoulli_`) and saved as
    bool (1 byte, not 4). The keep probability is quantised to 1/65536 and the scale uses the realised keep
    probability, so the expectation is exact.
  * `attention`: scores, softmax, dropout and the weighted sum in one function that saves only the probabilities
    and the bool mask (PyTorch's math path saves ~4 tensors of [B, N, T, T]).
  * `same_conv`: the K-tap shift-and-add behind both convolutions, with implicit zero padding (no padded copy) and
    a backward that accumulates into one gradient buffer in place (autograd's version zero-fills and adds a
    full-size buffer per tap); it saves only tensors that other ops save anyway;
  * `gelu_linear`: GELU followed by a (grouped) linear layer that keeps only the GELU *input* and recomputes the
    GELU in backward (the largest activation of the layer is never stored).
On CUDA, or without grad, the standard ops are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_KEEP_BITS = 1 << 16


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool mask, True with probability (1 - p) up to 1/65536, and 1 / (realised keep probability)."""
    numel = 1
    for s in shape:
        numel *= s
    words = torch.randint(-(2**31), 2**31 - 1, ((numel + 1) // 2,), dtype=torch.int32, device=device)
    bits = words.view(torch.int16)[:numel].view(shape)
    threshold = int(round(p * _KEEP_BITS))
    keep = bits >= threshold - (1 << 15)
    return keep, _KEEP_BITS / (_KEEP_BITS - threshold)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float):
        keep, scale = _keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return F.dropout(x, p, True)
    return _Dropout.apply(x, p)


class _Attention(torch.autograd.Function):
    """softmax(q kᵀ · scale + mask) → dropout → · v, for q, k, v in [B, N, T, d]."""

    @staticmethod
    def forward(ctx, q, k, v, additive_mask, scale: float, p: float):
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if additive_mask is not None:
            scores.add_(additive_mask)
        probs = scores.softmax(dim=-1)
        if p > 0.0:
            keep, keep_scale = _keep_mask(probs.shape, p, probs.device)
            dropped = probs * keep * keep_scale
        else:
            keep, keep_scale, dropped = None, 1.0, probs
        out = torch.matmul(dropped, v)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, keep = ctx.saved_tensors
        dropped = probs if keep is None else probs * keep * ctx.keep_scale
        grad_v = torch.matmul(dropped.transpose(-1, -2), grad_out)
        del dropped
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2))
        if keep is not None:
            grad_probs.mul_(keep).mul_(ctx.keep_scale)
        # softmax backward: p * (g - sum(g * p))
        grad_scores = grad_probs.mul_(probs)
        grad_scores.sub_(probs * grad_scores.sum(dim=-1, keepdim=True)).mul_(ctx.scale)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None, None


def attention(q, k, v, additive_mask, scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    p = dropout_p if training else 0.0
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        return _Attention.apply(q, k, v, additive_mask, scale, p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=p, scale=scale)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """nn.Linear's maths for groups == 1; otherwise G contiguous blocks with weight [G, in/G, out/G] (TF layout)."""
    if groups == 1:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    chunks = x.reshape(-1, groups, weight.shape[1]).transpose(0, 1)  # [G, M, in/G]
    out = torch.bmm(chunks, weight).transpose(0, 1)  # [M, G, out/G]
    return out.reshape(*lead, bias.shape[0]) + bias


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int):
        ctx.save_for_backward(x, weight)
        ctx.groups = groups
        return grouped_linear(F.gelu(x), weight.to(x.dtype), bias.to(x.dtype), groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_param = ctx.saved_tensors
        groups = ctx.groups
        # Under autocast the forward ran in low precision: do the backward in the activations' dtype.
        dtype = x.dtype
        weight, grad_out = weight_param.to(dtype), grad_out.to(dtype)
        activated = F.gelu(x)
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if groups == 1:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_weight = g2.t().mm(activated.reshape(-1, activated.shape[-1]))
            grad_act = grad_out.matmul(weight)
        else:
            in_g, out_g = weight.shape[1], weight.shape[2]
            a = activated.reshape(-1, groups, in_g).transpose(0, 1)  # [G, M, in/G]
            g = grad_out.reshape(-1, groups, out_g).transpose(0, 1)  # [G, M, out/G]
            grad_weight = torch.bmm(a.transpose(1, 2), g)  # [G, in/G, out/G]
            grad_act = torch.bmm(g, weight.transpose(1, 2)).transpose(0, 1).reshape(x.shape)
        del activated
        grad_x = torch.ops.aten.gelu_backward(grad_act, x)
        return grad_x, grad_weight.to(weight_param.dtype), grad_bias.to(weight_param.dtype), None


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """linear(gelu(x)) where `weight` is nn.Linear's [out, in] (groups == 1) or the grouped [G, in/G, out/G]."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad:
        return _GeluLinear.apply(x, weight, bias, groups)
    return grouped_linear(F.gelu(x), weight, bias, groups)


def _same_conv_terms(length: int, kernel_size: int):
    """(tap k, offset o, output rows lo:hi) for a 'same' K-tap correlation with implicit zero padding."""
    center = (kernel_size - 1) // 2
    for k in range(kernel_size):
        offset = k - center
        lo, hi = max(0, -offset), min(length, length - offset)
        if lo < hi:
            yield k, offset, lo, hi


class _SameConv(torch.autograd.Function):
    """out[:, t] = sum_k x[:, t + k - (K-1)/2] * taps[..., k], zero outside 0..T-1, without building a padded copy.

    `taps` is either per-position, [B, T, ..., K] (the span convolution's dynamic kernels), or broadcast over batch
    and time (the depthwise filters, [C, K]). Only `x` and `taps` are saved, and `x` is usually saved by another
    op already (the projections read the same tensor), so the convolution stores nothing of its own.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, taps: torch.Tensor):
        ctx.save_for_backward(x, taps)
        return _same_conv_forward(x, taps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, taps = ctx.saved_tensors
        length, kernel_size = x.shape[1], taps.shape[-1]
        per_position = taps.dim() == x.dim() + 1
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_taps = torch.zeros_like(taps) if ctx.needs_input_grad[1] else None
        for k, offset, lo, hi in _same_conv_terms(length, kernel_size):
            tap = taps[:, lo:hi, ..., k] if per_position else taps[..., k]
            g = grad[:, lo:hi]
            if grad_x is not None:
                grad_x[:, lo + offset : hi + offset].addcmul_(g, tap)
            if grad_taps is not None:
                product = g * x[:, lo + offset : hi + offset]
                if per_position:
                    grad_taps[:, lo:hi, ..., k] = product.sum_to_size(tap.shape)
                else:
                    grad_taps[..., k] = product.sum_to_size(tap.shape)
        return grad_x, grad_taps


def _same_conv_forward(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    length, kernel_size = x.shape[1], taps.shape[-1]
    per_position = taps.dim() == x.dim() + 1
    center = (kernel_size - 1) // 2
    out = x * taps[..., center]
    for k, offset, lo, hi in _same_conv_terms(length, kernel_size):
        if k == center:
            continue
        tap = taps[:, lo:hi, ..., k] if per_position else taps[..., k]
        out[:, lo:hi].addcmul_(x[:, lo + offset : hi + offset], tap)
    return out


def same_conv(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """A 'same' zero-padded K-tap cross-correlation along dim 1 (odd K), taps per position or per channel."""
    if torch.is_grad_enabled() and (x.requires_grad or taps.requires_grad):
        return _SameConv.apply(x, taps)
    return _same_conv_forward(x, taps)
