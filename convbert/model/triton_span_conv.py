"""A fused span-based dynamic convolution for GPUs (Triton), forward and backward.

out[b, t, n, :] = sum_k kernel[b, t, n, k] * value[b, t + k - (K-1)/2, n, :]   (zero outside 0..T-1)

One program handles one (b, t) row and one head: it reads K rows of the head's values once and never builds the
K-fold unfolded tensor. The backward is two gather kernels (no atomics): the value gradient gathers the K rows that
read a position, the kernel gradient is a dot product per tap.

Used automatically on CUDA when `triton` is importable (`use_triton_span_conv()`; `CONVBERT_DISABLE_TRITON=1` turns
it off); tests run these kernels on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`) and skip when
triton is not installed.
"""

from __future__ import annotations

import os

import torch

try:  # optional: GPU installs of PyTorch bring triton; CPU installs usually do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def triton_available() -> bool:
    return triton is not None


def use_triton_span_conv(t: torch.Tensor) -> bool:
    if triton is None:
        return False
    if os.environ.get("CONVBERT_DISABLE_TRITON") == "1":
        return False
    return t.device.type == "cuda"


if triton is not None:

    @triton.jit
    def _span_conv_fwd(value, kernel, out, T, HEADS: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        row = tl.program_id(0)  # b * T + t
        head = tl.program_id(1)
        t = row % T
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            src = cols * 0 + (t + k - (K - 1) // 2)  # as a vector, so the mask is a vector
            valid = (src >= 0) & (src < T)
            w = tl.load(kernel + (row * HEADS + head) * K + k).to(tl.float32)
            v = tl.load(value + ((row + k - (K - 1) // 2) * HEADS + head) * D + cols, mask=cmask & valid,
                        other=0.0).to(tl.float32)
            acc += w * v
        tl.store(out + (row * HEADS + head) * D + cols, acc.to(out.dtype.element_ty), mask=cmask)

    @triton.jit
    def _span_conv_bwd(value, kernel, grad_out, grad_value, grad_kernel, T, HEADS: tl.constexpr,
                       D: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        t = row % T
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        half = (K - 1) // 2
        g_row = tl.load(grad_out + (row * HEADS + head) * D + cols, mask=cmask, other=0.0).to(tl.float32)
        gv = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            # kernel gradient at (row, k): <grad_out[row], value[row + k - half]>
            src = cols * 0 + (t + k - half)
            valid = (src >= 0) & (src < T)
            v = tl.load(value + ((row + k - half) * HEADS + head) * D + cols, mask=cmask & valid,
                        other=0.0).to(tl.float32)
            tl.store(grad_kernel + (row * HEADS + head) * K + k, tl.sum(g_row * v, axis=0))
            # value gradient at row: output position o = t - k + half read this row through tap k
            o = t - k + half
            in_range = (o >= 0) & (o < T)
            orow = row - k + half
            safe_row = tl.where(in_range, orow, row)  # scalar loads take no mask: read a safe row, then zero it
            w = tl.load(kernel + (safe_row * HEADS + head) * K + k).to(tl.float32) * in_range.to(tl.float32)
            ovalid = (cols * 0 + o >= 0) & (cols * 0 + o < T)
            g = tl.load(grad_out + (orow * HEADS + head) * D + cols, mask=cmask & ovalid, other=0.0).to(tl.float32)
            gv += w * g
        tl.store(grad_value + (row * HEADS + head) * D + cols, gv.to(grad_value.dtype.element_ty), mask=cmask)


def _launch_shape(value: torch.Tensor):
    batch, length, heads, size = value.shape
    return (batch * length, heads), dict(T=length, HEADS=heads, D=size, BLOCK_D=triton.next_power_of_2(size))


class SpanConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        value, kernel = value.contiguous(), kernel.contiguous()
        out = torch.empty_like(value)
        grid, meta = _launch_shape(value)
        _span_conv_fwd[grid](value, kernel, out, K=kernel.shape[-1], **meta)
        ctx.save_for_backward(value, kernel)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        value, kernel = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_value = torch.empty_like(value)
        grad_kernel = torch.empty(kernel.shape, dtype=torch.float32, device=kernel.device)
        grid, meta = _launch_shape(value)
        _span_conv_bwd[grid](value, kernel, grad_out, grad_value, grad_kernel, K=kernel.shape[-1], **meta)
        return grad_value, grad_kernel.to(kernel.dtype)


def span_conv(value: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """value [B, T, N, d], kernel [B, T, N, K] (softmaxed taps) -> [B, T, N, d]."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    return SpanConvFunction.apply(value, kernel)
