"""Memory- and time-lean autograd functions for CPU training (same maths as the plain PyTorch ops).

Each saves the least it can for backward, recomputes what is cheap and avoids layout copies:
  * `dropout` / `dropout_add`: the keep-mask comes from 16-bit lanes of raw 64-bit generator output and is saved as
    one byte per element (uint8); residual + dropout is one `addcmul`. The keep probability is quantised to 1/65536 and the scale uses the
    realised keep probability, so the expectation is exact.
  * `attention`: per head, on the fused projection's strided [B, T, N, d] views (no head-first copies); saves only
    the probabilities and the byte mask (PyTorch's math path saves ~4 tensors of [B, N, T, T]).
  * `grouped_linear`: one `addmm` per group on column blocks, no permute copies.
  * `gelu_linear`: GELU then a (grouped) linear layer, keeping only the GELU *input* (the layer's largest
    activation, [B, T, 4H], is never stored).
  * `span_kernel_logits`: the dynamic-kernel generator, keeping one [B, T, A] tensor of its four.
  * `layer_norm`: saves its output (which the next layer keeps anyway) instead of its input.
  * `same_conv`: both convolutions, with implicit zero padding; it saves only tensors that other ops save anyway.
    A K-tap shift-and-add with an in-place accumulating backward in general; on fp32 CPU tensors the depthwise
    conv runs as oneDNN's depthwise conv2d (forward and backward) on a channels-last view, and the span conv as
    banded block products (one batched `matmul` over overlapping windows, no unfold).
  * `short_softmax`: softmax over the 9 kernel taps as whole-tensor ops.
  * `linear_dropout_add` / `feed_forward_dropout_add`: a sub-layer's last product and its residual connection; in
    inference with the products on BLAS the product accumulates onto residual + bias (one pass fewer).
  * `linear` and the grouped products: large fp32 products of activations with weights (forward and input
    gradient) run on oneDNN where its kernels were measured faster than MKL's (AMD: ~10 %; Intel: BLAS is the
    default there), and the inference FFN then applies its GELU as the GEMM's epilogue. Weight gradients stay on
    BLAS (`set_cpu_gemm` picks the library).
On CUDA, under `torch.compile`, or without grad, the standard ops are used (but for the attention, whose per-head
function is also the faster in CPU inference); under CPU bf16 autocast the encoder runs these functions in bf16
(`cpu_mixed_precision_dtype`). On CUDA (`_gpu_path`), where an eager step is bound by
the number of ops launched, the depthwise conv is one grouped `conv1d` and the attention gets a contiguous output
gradient; under `torch.compile` the convolutions are out-of-place ops, so the encoder traces as one graph.
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch
import torch.nn.functional as F

from convbert.errors import ConvBertError

_KEEP_BITS = 1 << 16


# ---- the GEMM behind the linear layers ----------------------------------------------------------------------------
def _find_onednn_linear():
    """oneDNN's fp32 linear (the op Inductor lowers CPU linears to), or None where this PyTorch build lacks it or
    it fails a small probe: strided operands as our callers pass them, with and without the GELU epilogue. (It is
    a private op; the probe keeps another PyTorch version from changing our results, and uses no random numbers.)"""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        x = (torch.arange(48.0).view(6, 8).sin())[:, 2:7]  # a column block
        weight = torch.arange(20.0).view(5, 4).cos().t()  # a transposed view: [4, 5]
        bias = torch.tensor([0.1, -0.2, 0.3, 0.0])
        reference = F.linear(x, weight, bias)
        if not torch.allclose(op(x, weight, bias, "none", [], ""), reference, atol=1e-5):
            return None
        if not torch.allclose(op(x, weight, bias, "gelu", [], "none"), F.gelu(reference), atol=1e-5):
            return None
        return op
    except (AttributeError, RuntimeError, TypeError):
        return None


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (empty where there is no /proc), read once."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first CPU's block
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...; "" where it cannot be read)."""
    return _cpuinfo().get("vendor_id", "")


_ONEDNN_LINEAR = _find_onednn_linear()
_ONEDNN_MIN_MACS = 1 << 22  # smaller products: the call overhead outweighs the faster kernel
_ONEDNN_MIN_WIDTH = 64  # narrower outputs (the 36 kernel logits): BLAS is the faster
CPU_GEMMS = ("onednn", "blas")


def default_cpu_gemm(vendor: str, has_onednn: bool) -> str:
    """BLAS (MKL) on Intel, oneDNN elsewhere where PyTorch has it. Measured with benchmarks/gemm_backends.py (whole
    medium-small step, 2 threads, interleaved): on an AMD Zen 4 oneDNN's kernels are the faster (training
    1.03-1.05x, inference 1.05-1.08x); on an Intel Xeon (Emerald Rapids) MKL's are, or tie (training 2.41 against
    2.53 s and 2.67 against 2.63 s, inference 0.68 against 0.71 s and 0.65 against 0.78 s); on an AVX2-only AMD Zen 3
    the whole steps were mixed (training 3.71 s on oneDNN against 4.07 s, inference 1.25 against 1.14 s)."""
    return "onednn" if has_onednn and vendor != "GenuineIntel" else "blas"


_cpu_gemm = default_cpu_gemm(cpu_vendor(), _ONEDNN_LINEAR is not None)


def set_cpu_gemm(name: str) -> None:
    """Which library runs the large fp32 CPU products of activations with weights: "onednn" or "blas" (MKL/OpenBLAS,
    what `F.linear` uses). The default is the faster on the CPU's vendor as measured: BLAS (MKL) on Intel, oneDNN
    elsewhere where this PyTorch has it. Same maths; they differ in rounding order only. The environment variable
    CONVBERT_CPU_GEMM sets it at import."""
    global _cpu_gemm
    if name not in CPU_GEMMS:
        raise ValueError(f"cpu gemm must be one of {CPU_GEMMS}, got {name!r}")
    if name == "onednn" and _ONEDNN_LINEAR is None:
        raise RuntimeError("this PyTorch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    _cpu_gemm = name


def cpu_gemm() -> str:
    """The library `set_cpu_gemm` chose: "onednn" or "blas"."""
    return _cpu_gemm


if os.environ.get("CONVBERT_CPU_GEMM"):
    set_cpu_gemm(os.environ["CONVBERT_CPU_GEMM"])


def default_onednn_gelu_epilogue(capability: str) -> bool:
    """Whether oneDNN applies the FFN's GELU as its product's epilogue (else an in-place GELU after it), by the CPU
    capability PyTorch dispatches to. On AVX-512 (the AMD Zen 4 of our benchmarks) the epilogue was part of
    oneDNN's measured inference gain. On an AVX2-only AMD Zen 3 it is the slower: medium-small's [4096, 192] x
    [192, 768] product with bias took 13.4 ms with the epilogue against 10.8 ms plus `gelu_` (interleaved, alone),
    and whole inference steps were 4-5 % faster without it (paired, 20 and 30 each)."""
    return capability.upper().startswith("AVX512")


def _cpu_capability() -> str:
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if get is not None else ""


# Set by the CPU at import; tests and benchmarks may flip it (same maths either way).
onednn_gelu_epilogue = default_onednn_gelu_epilogue(_cpu_capability())


def default_onednn_weight_gradients(vendor: str, family: str) -> bool:
    """Whether the weight gradients (X^T dY, a sum over the tokens) run on oneDNN too where `cpu_gemm()` is oneDNN,
    by the CPU's vendor and family. Measured shape by shape at M = 4096 (benchmarks/gemm_backends.py): on an AMD
    Zen 5 (family 26) oneDNN reached 232-276 GFLOP/s against MKL's 143-177 for four of medium-small's six weight
    gradients (one tied, the 36-wide one stays on BLAS anyway); on the Zen 4 and the Zen 3 (family 25) MKL was the
    faster at that transposed shape (149-187 against 106-146 GFLOP/s on the Zen 4, 127-148 against 83-93 on the
    Zen 3)."""
    return vendor == "AuthenticAMD" and family.strip().isdigit() and int(family) >= 26


# Set by the CPU at import; tests and benchmarks may flip it (same maths either way).
onednn_weight_gradients = default_onednn_weight_gradients(cpu_vendor(), _cpuinfo().get("cpu family", ""))


def cpu_kernel_choices() -> dict:
    """What this process runs fp32 CPU work with, and the CPU those choices were made for: the facts to quote
    beside a timing (`convbert info --kernels`; every benchmark report stores them)."""
    return {
        "cpu_model": _cpuinfo().get("model name", ""),
        "cpu_vendor": cpu_vendor(),
        "cpu_family_model": f"{_cpuinfo().get('cpu family', '')}/{_cpuinfo().get('model', '')}",  # 25/1: Zen 3
        "cpu_capability": _cpu_capability(),
        "onednn_linear_available": _ONEDNN_LINEAR is not None,
        "cpu_gemm": _cpu_gemm,
        "onednn_gelu_epilogue": onednn_gelu_epilogue,
        "onednn_weight_gradients": onednn_weight_gradients,
        "blocked_transposes": blocked_transposes,
        "fold_residual_in_inference": fold_residual_in_inference,
        "cpu_depthwise_conv2d": cpu_depthwise_conv2d,
        "cpu_span_conv_banded": cpu_span_conv_banded,
        "optimizer_update": _optimizer_update(),
        "threads": torch.get_num_threads(),
    }


def _optimizer_update() -> str:
    """`AdamWeightDecay`'s default update for fp32 CPU parameters: "fused" (PyTorch's fused kernel) or "loop"."""
    from convbert import optim  # (the optimiser does not depend on the model: no import cycle)

    return "fused" if optim._FUSED_ON_CPU else "loop"


_plain_ops = False


@contextlib.contextmanager
def plain_ops():
    """PyTorch's own ops instead of the hand-written CPU kernels inside this block: the same maths, slower, but
    differentiable twice (gradient penalties, Hessian-vector products: `torch.autograd.grad(..., create_graph=True)`),
    which the kernels' hand-written backwards are not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    global _plain_ops
    before, _plain_ops = _plain_ops, True
    try:
        with sdpa_kernel(SDPBackend.MATH):  # (the CPU's flash attention has no double backward either)
            yield
    finally:
        _plain_ops = before


def _first_order(backward):
    """Marks a hand-written backward, which gives first derivatives only. Under `create_graph=True` (grad mode on
    inside backward) it would return gradients without a graph, or a wrong second derivative: refused instead."""
    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise ConvBertError("double backward (create_graph=True) through convbert's hand-written CPU kernels: "
                                "run the forward inside `with convbert.model.kernels.plain_ops():` (PyTorch's own "
                                "ops, the same maths)")
        return backward(ctx, *grads)
    return checked


def _on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `_mm_nt(x, weight)` runs on oneDNN, which returns a tensor of its own (an `out=` costs a copy). Only
    with a dense weight (`_dense`: a strided one ran ~1000x slower there); every caller passes one today."""
    rows, (width, depth) = x.shape[0], weight.shape
    return (_cpu_gemm == "onednn" and x.dtype == torch.float32 and x.device.type == "cpu"
            and width >= _ONEDNN_MIN_WIDTH and rows * width * depth >= _ONEDNN_MIN_MACS and _dense(weight))


def _mm_nt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """x [M, K] @ weight.T (+ bias) for weight [N, K] with any strides, into `out` if given; `gelu` applies the
    exact (erf) GELU to the result: on oneDNN as the GEMM's epilogue where `onednn_gelu_epilogue` (no pass of its
    own over the output), else in place after it.

    With `set_cpu_gemm("onednn")` (the default on AMD), large fp32 CPU products go to oneDNN: on the AMD Zen 4 of
    our benchmarks its kernels reach ~195-212 GFLOP/s at the encoder's shapes where MKL's reach ~175-190
    (`benchmarks/gemm_backends.py`), and on a Zen 5 ~345-404 where MKL's reach ~160-180. Weight gradients (X^T dY)
    go through `_mm_weight_gradient`: BLAS, the faster at that transposed shape, except where
    `onednn_weight_gradients` (the Zen 5).
    """
    if _on_onednn(x, weight):
        fused = gelu and onednn_gelu_epilogue
        attr, algorithm = ("gelu", "none") if fused else ("none", "")  # "none": the erf GELU, not the tanh one
        y = _ONEDNN_LINEAR(x, weight, bias, attr, [], algorithm)
        y = y if out is None else out.copy_(y)
        return torch.ops.aten.gelu_(y) if gelu and not fused else y
    if out is None:
        y = F.linear(x, weight, bias)
    elif bias is None:
        y = torch.mm(x, weight.t(), out=out)
    else:
        y = torch.addmm(bias, x, weight.t(), out=out)
    return torch.ops.aten.gelu_(y) if gelu else y


def _dense(matrix: torch.Tensor) -> bool:
    """Whether a 2-D view is a whole matrix, row- or column-major. oneDNN's linear takes any strides for its input
    but not for its weight: a column block as the weight (leading dimension wider than the block) ran at
    0.2 GFLOP/s on a Zen 5, against ~250 for the same product with the operands' roles swapped."""
    return matrix.is_contiguous() or matrix.t().is_contiguous()


# oneDNN's linear copies a non-contiguous input into a contiguous one. For a weight gradient that input is a
# transposed view (X^T or dY^T, [R, M]), and PyTorch's transposing copy is slow: single-threaded, or strided element
# by element for a column block. Copied here instead in blocks of _TRANSPOSE_BLOCK tokens (each block's source rows
# stay in cache): on a Zen 5, [4096, 384] -> [384, 4096] 1.48 -> 0.99 ms, a [4096, 192] column block 0.57 -> 0.46 ms;
# a medium-small training step 0.4-2.3 % faster in three paired runs, within the VM's noise
# (`benchmarks/kernel_ab.py --flag blocked_transposes`). False: the op's own copy.
blocked_transposes = True
_TRANSPOSE_BLOCK = 512


def _onednn_input(view: torch.Tensor) -> torch.Tensor:
    """oneDNN's input for a weight gradient: a non-contiguous 2-D view copied to a contiguous matrix block by block
    along its columns (the M tokens of X^T) where `blocked_transposes`, else as it is (the op copies it)."""
    if view.is_contiguous() or not blocked_transposes:
        return view
    out = torch.empty(view.shape, dtype=view.dtype, device=view.device)
    for start in range(0, view.shape[1], _TRANSPOSE_BLOCK):
        out[:, start : start + _TRANSPOSE_BLOCK].copy_(view[:, start : start + _TRANSPOSE_BLOCK])
    return out


def _mm_weight_gradient(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a [N, M] @ b [M, K], the weight-gradient form (a is a transposed view, X^T or dY^T: the sum runs over the M
    tokens), into `out` if given: on oneDNN where `onednn_weight_gradients` and the product is large and neither
    side narrow, else on BLAS, the faster of the two for this form on most CPUs measured. On oneDNN a dense operand
    is the weight: b (a @ b), or a (the product transposed, (b^T a^T)^T); BLAS where neither is dense. The op copies
    its input (a transposed view here) into a contiguous matrix, so where both are dense the one with fewer rows is
    the input (copied by `_onednn_input`)."""
    rows, width = a.shape[0], b.shape[1]
    y = None
    if onednn_weight_gradients and a.dtype == b.dtype and min(rows, width) >= _ONEDNN_MIN_WIDTH:
        if _on_onednn(a, b.t()) and (rows <= width or not _dense(a)):  # b dense
            y = _ONEDNN_LINEAR(_onednn_input(a), b.t(), None, "none", [], "")
        elif _on_onednn(b.t(), a):  # a dense
            y = _ONEDNN_LINEAR(_onednn_input(b.t()), a, None, "none", [], "").t()
    if y is not None:
        return y.contiguous() if out is None else out.copy_(y)
    return a.mm(b) if out is None else torch.mm(a, b, out=out)


class _Linear(torch.autograd.Function):
    """F.linear with its forward and input-gradient products on `_mm_nt`, the weight gradient on
    `_mm_weight_gradient`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm_nt(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @_first_order
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = _mm_nt(g, weight.t()).view(x.shape) if need_x else None
        grad_w = _mm_weight_gradient(g.t(), x.reshape(-1, x.shape[-1])) if need_w else None
        grad_b = g.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, with the large fp32 CPU products on oneDNN in eager mode (see `_mm_nt`)."""
    if _cpu_gemm != "onednn" or x.dtype != torch.float32 or not _lean_path(x):
        return F.linear(x, weight, bias)
    if _needs_grad(x, weight, bias):
        return _Linear.apply(x, weight, bias)
    return _mm_nt(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def _random_words(count: int, device: torch.device) -> torch.Tensor:
    """`count` uniformly random int64 words, fixed by torch's seed: on the CPU from `host_bit_generator` (torch's
    serial mt19937 makes ~4 ns per word, numpy's SFC64 about half that), elsewhere from torch."""
    bit_generator = host_bit_generator(device)
    if bit_generator is not None:
        return torch.from_numpy(bit_generator.random_raw(count).view(np.int64))
    return torch.empty(count, dtype=torch.int64, device=device).random_(-(2**63), None)


def host_bit_generator(device: torch.device, generator: torch.Generator | None = None) -> np.random.SFC64 | None:
    """numpy's SFC64 seeded by one draw from `generator` (torch's default when None), for bulk random numbers on
    the CPU about twice as fast as torch's serial mt19937; None where torch must draw them itself (other devices,
    or a dispatch mode such as the CUDA-graph stand-in, which records ATen ops to replay them). Seeding from torch
    means `torch.manual_seed`, saved RNG states and checkpointing's RNG replay fix these numbers as they fix
    torch's own draws."""
    if device.type != "cpu" or torch._C._len_torch_dispatch_stack() != 0:  # (no dispatch mode; torch >= 2.0)
        return None
    return np.random.SFC64(int(torch.empty((), dtype=torch.int64).random_(generator=generator)))


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A 0/1 uint8 mask, 1 with probability (1 - p) up to 1/65536, and 1 / (realised keep probability).

    The bits come from full-range 64-bit draws (`_random_words`: raw generator output, no range reduction), each
    split into four 16-bit lanes: about 2.5x cheaper than `randint` on int32 and 7x cheaper than `bernoulli_`.
    The mask is uint8 rather than bool (same byte per element): on the CPU, comparing into a uint8 tensor and
    multiplying floats by uint8 are 4-7x faster than the same ops with bool, whose casts are not vectorised.
    """
    numel = 1
    for s in shape:
        numel *= s
    bits = _random_words((numel + 3) // 4, device).view(torch.int16)[:numel].view(shape)
    threshold = int(round(p * _KEEP_BITS))
    keep = torch.ge(bits, threshold - (1 << 15), out=torch.empty(shape, dtype=torch.uint8, device=device))
    if threshold >= _KEEP_BITS:  # p within 1/131072 of 1 rounds to "drop everything": the mask is all zeros
        return keep, 0.0
    return keep, _KEEP_BITS / (_KEEP_BITS - threshold)


def _masked(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x * keep * scale: the inverted-dropout product (a new tensor), used forward and backward."""
    return torch.mul(x, keep).mul_(scale)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float):
        keep, scale = _keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked(x, keep, scale)

    @staticmethod
    @_first_order
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return _masked(grad, keep, ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if _lean_path(x):  # (without gradients too: the same seed gives the same masks either way)
        return _Dropout.apply(x, p)
    return F.dropout(x, p, True)  # GPUs, torch.compile (it cannot trace the CPU mask's in-place random_)


class _DropoutAdd(torch.autograd.Function):
    """residual + dropout(x) in one pass (`addcmul` with the 0/1 mask); saves only the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, p: float):
        keep, scale = _keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale, ctx.dtypes = scale, (x.dtype, residual.dtype)  # x may be bf16 on an fp32 residual stream
        return torch.addcmul(residual, x, keep, value=scale)

    @staticmethod
    @_first_order
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        x_dtype, residual_dtype = ctx.dtypes
        return _masked(grad, keep, ctx.scale).to(x_dtype), grad.to(residual_dtype), None


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """residual + dropout(x), the residual connection of each sub-layer."""
    if training and p > 0.0 and _lean_path(x) and x.shape == residual.shape:
        return _DropoutAdd.apply(x, residual, p)
    return dropout(x, p, training) + residual


class _Attention(torch.autograd.Function):
    """softmax(q kᵀ · scale + mask) → dropout → · v for q, k, v as [B, T, N, d] views, one head at a time.

    Each head's q, k and v are [B, T, d] matrices inside the fused projection's output (row stride 4A), which
    BLAS reads in place, so no head-first copies are made; each head's [B, T, T] scores stay in cache through the
    softmax, dropout and backward. The mask is added by the score GEMM itself (`baddbmm`), and the softmax backward
    is PyTorch's fused kernel. Saves only the probabilities and a byte mask per head.
    """

    @staticmethod
    def forward(ctx, q, k, v, additive_mask, scale: float, p: float, for_backward: bool = True):
        batch, length, heads, size = q.shape
        keys = k.shape[1]
        keep, keep_scale = _keep_mask(torch.Size((heads, batch, length, keys)), p, q.device) if p > 0.0 else (None, 1.0)
        mask = None if additive_mask is None else additive_mask.reshape(batch, -1, keys)  # [B, 1|T, S]
        out = q.new_empty(heads, batch, length, size)
        probs = []
        for n in range(heads):
            qn, kn = q[:, :, n], k[:, :, n]
            if mask is None:
                scores = torch.bmm(qn, kn.transpose(1, 2)).mul_(scale)
            else:
                scores = torch.baddbmm(mask, qn, kn.transpose(1, 2), alpha=scale)
            pn = scores.softmax(dim=-1)
            del scores
            if for_backward:  # (in inference each head's block is dropped after use)
                probs.append(pn)
            torch.bmm(pn if keep is None else pn * keep[n], v[:, :, n], out=out[n])
        if keep is not None:
            out.mul_(keep_scale)
        ctx.save_for_backward(q, k, v, keep, *probs)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        return out.permute(1, 2, 0, 3)  # [B, T, N, d] view

    @staticmethod
    @_first_order
    def backward(ctx, grad_out):
        q, k, v, keep, *probs = ctx.saved_tensors
        grads = [torch.empty(q.shape[2], *q.shape[:2], q.shape[3], dtype=q.dtype) for _ in range(3)]  # [N, B, T, d]
        grad_q, grad_k, grad_v = grads
        for n, pn in enumerate(probs):
            g = grad_out[:, :, n]
            torch.bmm((pn if keep is None else pn * keep[n]).transpose(1, 2), g, out=grad_v[n])
            grad_probs = torch.bmm(g, v[:, :, n].transpose(1, 2))
            if keep is not None:
                grad_probs.mul_(keep[n])
            grad_scores = torch._softmax_backward_data(grad_probs, pn, -1, pn.dtype)
            del grad_probs
            torch.bmm(grad_scores, k[:, :, n], out=grad_q[n])
            torch.bmm(grad_scores.transpose(1, 2), q[:, :, n], out=grad_k[n])
        grad_v.mul_(ctx.keep_scale)
        grad_q.mul_(ctx.scale * ctx.keep_scale)
        grad_k.mul_(ctx.scale * ctx.keep_scale)
        return (grad_q.permute(1, 2, 0, 3), grad_k.permute(1, 2, 0, 3), grad_v.permute(1, 2, 0, 3),
                None, None, None, None)


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def attention(q, k, v, additive_mask, scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    """Attention over q, k, v given as [B, T, N, d] (token-major, as the projection produces them) -> [B, T, N, d]."""
    p = dropout_p if training else 0.0
    if _lean_path(q):
        # In inference too: one head at a time on BLAS beats the CPU's fused attention at these shapes (medium-small,
        # batch 32: 6.2 vs 7.9 ms a layer).
        for_backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return _Attention.apply(q, k, v, additive_mask, scale, p, for_backward)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=additive_mask, dropout_p=p, scale=scale).transpose(1, 2)
    if _gpu_path(q) and out.requires_grad:
        # The caller concatenates this output with the conv heads, so its gradient arrives as a strided slice of
        # the concatenation's. On an H200 (torch 2.11, bf16) the CUDA attention backward returned wrong q/k/v
        # gradients for such a slice (>100 % off, in the one layer where no dtype cast had made it contiguous);
        # a contiguous [B, T, N, d] gradient, the layout the other layers gave it, came out right.
        out = _ContiguousGradient.apply(out)
    return out


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _columns(t: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """The G column blocks of a [M, G*k] matrix, as views (BLAS takes the row stride as the leading dimension)."""
    width = t.shape[-1] // groups
    return [t[:, g * width : (g + 1) * width] for g in range(groups)]


def _block_products(lhs, rhs, out=None, bias: torch.Tensor | None = None, gelu: bool = False):
    """out[g] = lhs[g] @ rhs[g] (+ bias row g) for every group, each written in place (no permute copies), or
    returned as G new tensors when `out` is None. rhs[g] is a weight block (forward, input gradient): the products
    may run on oneDNN (`_mm_nt`)."""
    out = [None] * len(lhs) if out is None else out
    return [_mm_nt(a, b.t(), None if bias is None else bias[g], out=o, gelu=gelu)
            for g, (a, b, o) in enumerate(zip(lhs, rhs, out))]


def _weight_gradient_blocks(lhs, rhs, out):
    """out[g] = lhs[g] @ rhs[g], in place: the X^T dY products of weight gradients (`_mm_weight_gradient`)."""
    for a, b, o in zip(lhs, rhs, out):
        _mm_weight_gradient(a, b, out=o)
    return out


def _grouped_addmm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[M, G*in] -> [M, G*out]: one addmm per group on column blocks, the bias folded into the product."""
    groups = weight.shape[0]
    out = x.new_empty(x.shape[0], groups * weight.shape[2])
    _block_products(_columns(x, groups), weight, _columns(out, groups),
                    None if bias is None else bias.view(groups, -1))
    return out


def _grouped_backward(grad_blocks, x: torch.Tensor, weight: torch.Tensor, need_x: bool, need_w: bool):
    """Gradients of a grouped product w.r.t. its input [M, G*in] and weight [G, in/G, out/G], block by block,
    given the output gradient as G [M, out/G] blocks (column blocks of [M, G*out], or G separate tensors)."""
    groups = weight.shape[0]
    grad_x = grad_w = None
    if need_x:
        grad_x = x.new_empty(x.shape)
        _block_products(grad_blocks, weight.transpose(1, 2), _columns(grad_x, groups))
    if need_w:
        grad_w = _weight_gradient_blocks([c.t() for c in _columns(x, groups)], grad_blocks,
                                         torch.empty_like(weight))
    return grad_x, grad_w


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _grouped_addmm(x, weight, bias)

    @staticmethod
    @_first_order
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x, grad_w = _grouped_backward(_columns(grad, weight.shape[0]), x, weight, ctx.needs_input_grad[0],
                                           ctx.needs_input_grad[1])
        return grad_x, grad_w, grad.sum(0) if ctx.needs_input_grad[2] else None


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False


_LEAN_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _lean_path(x: torch.Tensor) -> bool:
    """The hand-written CPU functions apply to fp32/fp64/bf16 CPU tensors in eager mode, outside autocast.

    Under `torch.compile` the plain ops are traced instead: Inductor fuses them itself, and the Python loops and
    `out=` calls here would only break its graphs. (Under CPU autocast the encoder runs its layers in bf16 with
    autocast switched off, so they take this path too: see `cpu_mixed_precision_dtype`.)
    """
    return (x.device.type == "cpu" and x.dtype in _LEAN_DTYPES and not _autocast_on("cpu") and not _compiling()
            and not _plain_ops)


def cpu_mixed_precision_dtype(x: torch.Tensor) -> torch.dtype | None:
    """bf16 when CPU autocast asks for it in eager mode, else None.

    Then the encoder runs its layers with autocast off: each sub-layer (attention, FFN) gets its input cast to
    bf16 once and its weights cast as it uses them (differentiable casts, so the fp32 parameters get fp32
    gradients, as under autocast), and runs on the lean functions above; the residual stream and the LayerNorms
    stay fp32, as CUDA autocast keeps them. CPU autocast itself would cast around every op (one copy per
    operand), route attention, dropout and the FFN through the plain ops, and run the LayerNorms in bf16.
    fp16 is left to autocast: CPU fp16 GEMMs are slow.
    """
    if x.device.type != "cpu" or not _autocast_on("cpu") or _compiling():
        return None
    get_dtype = getattr(torch, "get_autocast_dtype", None)
    dtype = get_dtype("cpu") if get_dtype is not None else torch.get_autocast_cpu_dtype()
    return dtype if dtype == torch.bfloat16 else None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """nn.Linear's maths for groups == 1; otherwise G contiguous blocks with weight [G, in/G, out/G] (TF layout)."""
    if groups == 1:
        return linear(x, weight, bias)
    lead = x.shape[:-1]
    if _lean_path(x):
        x2d = x.reshape(-1, x.shape[-1])
        if _needs_grad(x, weight, bias):
            out = _GroupedLinear.apply(x2d, weight, bias)
        else:
            out = _grouped_addmm(x2d, weight, bias)
        return out.view(*lead, bias.shape[0])
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
    @_first_order
    def backward(ctx, grad_out):
        x, weight_param = ctx.saved_tensors
        groups = ctx.groups
        # Under autocast the forward ran in low precision: do the backward in the activations' dtype.
        dtype = x.dtype
        weight, grad_out = weight_param.to(dtype), grad_out.to(dtype)
        activated = F.gelu(x)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_bias = g2.sum(0)
        if groups == 1:
            grad_weight = _mm_weight_gradient(g2.t(), activated.reshape(-1, activated.shape[-1]))
            grad_act = _mm_nt(g2, weight.t()).view(*grad_out.shape[:-1], weight.shape[1])
        else:  # (grouped FFNs on the CPU path use _GroupedFeedForward instead)
            in_g, out_g = weight.shape[1], weight.shape[2]
            a = activated.reshape(-1, groups, in_g).transpose(0, 1)  # [G, M, in/G]
            g = grad_out.reshape(-1, groups, out_g).transpose(0, 1)  # [G, M, out/G]
            grad_weight = torch.bmm(a.transpose(1, 2), g)  # [G, in/G, out/G]
            grad_act = torch.bmm(g, weight.transpose(1, 2)).transpose(0, 1).reshape(x.shape)
        del activated
        if grad_act.is_contiguous():  # in place: the [B, T, 4H] gradient is the largest tensor of the backward
            grad_x = torch.ops.aten.gelu_backward.grad_input(grad_act, x, grad_input=grad_act)
        else:
            grad_x = torch.ops.aten.gelu_backward(grad_act, x)
        return grad_x, grad_weight.to(weight_param.dtype), grad_bias.to(weight_param.dtype), None


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """linear(gelu(x)) where `weight` is nn.Linear's [out, in] (groups == 1) or the grouped [G, in/G, out/G]."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad and not _plain_ops:
        return _GeluLinear.apply(x, weight, bias, groups)
    return grouped_linear(F.gelu(x), weight, bias, groups)


class _GroupedFeedForward(torch.autograd.Function):
    """linear2(gelu(linear1(h))) with both linears grouped (G > 1), the [B, T, 4H] activation kept group-major.

    The intermediate lives as G separate [M, 4H/G] tensors, so the two narrow-K products (h's groups → 4H/G, and
    the gradient back through linear2) write contiguous outputs instead of column blocks of a [M, 4H] tensor
    (~10 % faster each, and no copy out of oneDNN's result). Saves h (which the LayerNorm before it keeps anyway)
    and the GELU input; the GELU is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, h, weight1, bias1, weight2, bias2):
        out, h2, inner = _grouped_ffn_forward(h, weight1, bias1, weight2, bias2)
        ctx.save_for_backward(h2, weight1, weight2, *inner)
        ctx.input_shape = h.shape
        return out

    @staticmethod
    @_first_order
    def backward(ctx, grad):
        h2, weight1, weight2, *inner = ctx.saved_tensors
        groups = weight1.shape[0]
        g2 = grad.reshape(h2.shape[0], -1)
        grad_blocks = _columns(g2, groups)
        activated = [F.gelu(block) for block in inner]
        grad_weight2 = _weight_gradient_blocks([a.t() for a in activated], grad_blocks, torch.empty_like(weight2))
        # the GELU output is spent: on BLAS its buffers take the input gradient (recently touched memory, no
        # allocation); oneDNN returns a result of its own, which would only be copied into them
        hot = None if _on_onednn(grad_blocks[0], weight2[0]) else activated
        del activated  # on oneDNN its buffers are freed before the products allocate theirs
        grad_inner = _block_products(grad_blocks, weight2.transpose(1, 2), out=hot)
        for grad_block, block in zip(grad_inner, inner):
            torch.ops.aten.gelu_backward.grad_input(grad_block, block, grad_input=grad_block)
        grad_h, grad_weight1 = _grouped_backward(grad_inner, h2, weight1, True, True)
        grad_bias1 = torch.cat([grad_block.sum(0) for grad_block in grad_inner])
        return grad_h.view(ctx.input_shape), grad_weight1, grad_bias1, grad_weight2, g2.sum(0)


def _grouped_ffn_forward(h, weight1, bias1, weight2, bias2):
    """(output, h as [M, H], the GELU input as G [M, 4H/G] tensors, kept for backward)."""
    groups = weight1.shape[0]
    h2 = h.reshape(-1, h.shape[-1])
    inner = _block_products(_columns(h2, groups), weight1, bias=bias1.view(groups, -1))
    out = h2.new_empty(h2.shape[0], bias2.shape[0])
    _block_products([F.gelu(block) for block in inner], weight2, _columns(out, groups), bias2.view(groups, -1))
    return out.view(*h.shape[:-1], -1), h2, inner


def _ffn_inference(h, weight1, bias1, weight2, bias2, groups: int, residual: torch.Tensor | None = None):
    """linear2(gelu(linear1(h))) without grad, the GELU as the first product's epilogue (on oneDNN; in place after
    it on BLAS); with `residual`, the second product accumulates onto residual + bias2 (`fold_residual_in_inference`)."""
    h2 = h.reshape(-1, h.shape[-1])
    if groups > 1:
        activated = _block_products(_columns(h2, groups), weight1, bias=bias1.view(groups, -1), gelu=True)
        blocks2 = weight2  # [G, in/G, out/G]
    else:
        activated, blocks2 = [_mm_nt(h2, weight1, bias1, gelu=True)], weight2.t()[None]  # one [in, out] block
    if residual is not None:
        out = torch.add(residual.reshape(-1, residual.shape[-1]), bias2)
        for block, weight, out_block in zip(activated, blocks2, _columns(out, groups)):
            out_block.addmm_(block, weight)
        return out.view(residual.shape)
    if groups == 1:  # no `out=`: oneDNN's result is returned as it is, not copied
        return _mm_nt(activated[0], weight2, bias2).view(*h.shape[:-1], -1)
    out = h2.new_empty(h2.shape[0], bias2.shape[0])
    _block_products(activated, blocks2, _columns(out, groups), bias2.view(groups, -1))
    return out.view(*h.shape[:-1], -1)


def grouped_feed_forward(h: torch.Tensor, weight1, bias1, weight2, bias2, groups: int) -> torch.Tensor:
    """linear2(gelu(linear1(h))), the FFN of a layer: both linears grouped (weights [G, in/G, out/G]) when
    groups > 1, plain `nn.Linear` weights when groups == 1."""
    if _lean_path(h):
        if not _needs_grad(h, weight1, bias1, weight2, bias2):
            return _ffn_inference(h, weight1, bias1, weight2, bias2, groups)
        if groups > 1:
            return _GroupedFeedForward.apply(h, weight1, bias1, weight2, bias2)
    return gelu_linear(grouped_linear(h, weight1, bias1, groups), weight2, bias2, groups)


# In fp32 CPU inference on BLAS, a sub-layer's last product accumulates onto residual + bias (`torch.add`, then
# `addmm_`) instead of writing product + bias (BLAS's addmm first copies the bias into its output) and then adding the
# residual: one pass over the [M, H] output fewer per sub-layer. Medium-small inference on an Intel Xeon, paired
# interleaved steps (30 each): 3.7 % faster (median of the per-step ratios). False: product, then dropout_add.
fold_residual_in_inference = True


def _folds_residual(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool, *params) -> bool:
    return (fold_residual_in_inference and not (training and p > 0.0) and _cpu_gemm == "blas" and _lean_path(x)
            and x.dtype == residual.dtype and all(t.dtype == x.dtype for t in params)
            and not _needs_grad(x, residual, *params))


def linear_dropout_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float,
                       training: bool) -> torch.Tensor:
    """residual + dropout(linear(x)): a sub-layer's output projection and its residual connection."""
    if _folds_residual(x, residual, p, training, weight, bias):
        out = torch.add(residual.reshape(-1, residual.shape[-1]), bias)
        out.addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        return out.view(residual.shape)
    return dropout_add(linear(x, weight, bias), residual, p, training)


def feed_forward_dropout_add(h: torch.Tensor, weight1, bias1, weight2, bias2, groups: int, residual: torch.Tensor,
                             p: float, training: bool) -> torch.Tensor:
    """residual + dropout(grouped_feed_forward(h)): the FFN sub-layer and its residual connection."""
    if _folds_residual(h, residual, p, training, weight1, bias1, weight2, bias2):
        return _ffn_inference(h, weight1, bias1, weight2, bias2, groups, residual)
    return dropout_add(grouped_feed_forward(h, weight1, bias1, weight2, bias2, groups), residual, p, training)


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
    @_first_order
    def backward(ctx, grad: torch.Tensor):
        x, taps = ctx.saved_tensors
        return _same_conv_backward(grad, x, taps, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


def _same_conv_backward(grad: torch.Tensor, x: torch.Tensor, taps: torch.Tensor, need_x: bool, need_taps: bool):
    """Gradients of `_same_conv_forward` w.r.t. x and taps, accumulated tap by tap into one buffer each."""
    if _onednn_depthwise(x, taps) and grad.stride(-1) == 1:
        return _depthwise_conv2d_backward(grad, x, taps, need_x, need_taps)
    if _banded_span_conv(x, taps):
        return _span_conv_banded_backward(grad, x, taps, need_x, need_taps)
    length, kernel_size = x.shape[1], taps.shape[-1]
    per_position = taps.dim() == x.dim() + 1
    rows = taps if per_position else taps.t().contiguous()  # per-channel taps as contiguous [K, C] rows
    grad_x = torch.zeros_like(x) if need_x else None
    grad_taps = torch.zeros_like(rows) if need_taps else None
    products = torch.empty_like(grad) if grad_taps is not None else None  # one buffer, reused by every tap
    for k, offset, lo, hi in _same_conv_terms(length, kernel_size):
        tap = rows[:, lo:hi, ..., k] if per_position else rows[k]
        g = grad[:, lo:hi]
        if grad_x is not None:
            grad_x[:, lo + offset : hi + offset].addcmul_(g, tap)
        if grad_taps is not None:
            product = torch.mul(g, x[:, lo + offset : hi + offset], out=products[:, lo:hi])
            if per_position:
                grad_taps[:, lo:hi, ..., k] = product.sum_to_size(tap.shape)
            else:  # time first, then batch: one reduction over two outer dims is ~2x slower
                per_sequence = product.sum(dim=1)
                torch.sum(per_sequence, dim=tuple(range(per_sequence.dim() - 1)), out=grad_taps[k])
    if grad_taps is not None and not per_position:
        grad_taps = grad_taps.t()
    return grad_x, grad_taps


# The depthwise conv on the CPU as oneDNN's depthwise conv2d over a channels-last view ([B, T, C] is [B, C, 1, T]
# in channels-last memory: no copy either way). Forward: interleaved medium-small inference on an Intel Xeon, three
# runs, 0.801 -> 0.744, 0.826 -> 0.792, 0.809 -> 0.741 s; on an AMD Zen 4 neither gained nor lost. Backward
# (`_depthwise_conv2d_backward`), medium-small's [32, 128, 384] x [384, 9] alone on the Intel: 5.2 ms against
# 14.0 ms for the shift-and-add (input gradient 0.65 against 3.4 ms, filter gradient 4.4 against 6.5 ms).
# False: the shift-and-add everywhere.
cpu_depthwise_conv2d = True


def _onednn_depthwise(x: torch.Tensor, taps: torch.Tensor) -> bool:
    """Whether this `same_conv` is a per-channel fp32 CPU conv that oneDNN's depthwise conv2d can run."""
    return (cpu_depthwise_conv2d and taps.dim() == 2 and x.dim() == 3 and x.device.type == "cpu"
            and x.dtype == torch.float32 and taps.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and x.stride(-1) == 1)


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """[B, T, C] viewed as a channels-last [B, C, 1, T] image (no copy)."""
    return x.permute(0, 2, 1).unsqueeze(2)


def _from_image(y: torch.Tensor) -> torch.Tensor:
    """The inverse of `_as_image` for a channels-last result; contiguous() copies nothing then."""
    return y.squeeze(2).permute(0, 2, 1).contiguous()


def _depthwise_conv2d(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """[B, T, C] x [C, K] 'same' depthwise correlation through oneDNN; returns a contiguous [B, T, C]."""
    channels, kernel_size = taps.shape
    y = F.conv2d(_as_image(x), taps.view(channels, 1, 1, kernel_size), padding=(0, (kernel_size - 1) // 2),
                 groups=channels)
    return _from_image(y)


def _depthwise_conv2d_backward(grad: torch.Tensor, x: torch.Tensor, taps: torch.Tensor, need_x: bool,
                               need_taps: bool):
    """Gradients of `_depthwise_conv2d` w.r.t. x ([B, T, C]) and taps ([C, K]) through oneDNN's backward."""
    channels, kernel_size = taps.shape
    grad_x, grad_taps, _ = torch.ops.aten.convolution_backward(
        _as_image(grad), _as_image(x), taps.view(channels, 1, 1, kernel_size), None, [1, 1],
        [0, (kernel_size - 1) // 2], [1, 1], False, [0, 0], channels, [need_x, need_taps, False])
    return (_from_image(grad_x) if need_x else None,
            grad_taps.view(channels, kernel_size) if need_taps else None)


# The span conv on the CPU as small banded matrix products (`_span_conv_banded_*`). Medium-small's
# [32, 128, 4, 48] values with [32, 128, 4, 9] kernels alone on an Intel Xeon: forward 1.06 against 1.71 ms for the
# shift-and-add, kernel gradient 1.76 against 4.16 ms, value gradient 1.23 against 1.90 ms (16 rows a block; 32:
# 1.20 / 1.75 / 1.30; 64: 1.45 / 2.11 / 1.59; one band over all 128 rows: 1.90 / 2.02 / 2.12). False: the
# shift-and-add everywhere.
cpu_span_conv_banded = True
_BAND_ROWS = 16  # output rows per block: each block reads _BAND_ROWS + K - 1 input rows


def _banded_span_conv(x: torch.Tensor, taps: torch.Tensor) -> bool:
    """Whether this `same_conv` is a span conv ([B, T, N, d] values, [B, T, N, 1, K] kernels) on fp32/fp64 CPU
    tensors, which `_span_conv_banded_*` run."""
    return (cpu_span_conv_banded and x.dim() == 4 and taps.dim() == 5 and taps.shape[-2] == 1
            and taps.shape[-1] - 1 <= _BAND_ROWS  # the windows' overlaps must not overlap each other
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and taps.dtype == x.dtype)


def _row_windows(padded: torch.Tensor, blocks: int, rows: int, height: int, first_row: int = 0) -> torch.Tensor:
    """Views of a contiguous [B, N, L, d] as [B, N, blocks, height, d]: window j holds rows first_row + j*rows ..
    + height - 1 (windows overlap when height > rows)."""
    batch, heads, length, size = padded.shape
    return padded.as_strided((batch, heads, blocks, height, size), (heads * length * size, length * size,
                             rows * size, size, 1), padded.storage_offset() + first_row * size)


def _span_blocks(t: torch.Tensor, rows: int, halo: int) -> torch.Tensor:
    """[B, T, N, d] -> [B, N, n, rows + 2*halo, d]: the time axis zero-padded by `halo` each side (and up to n*rows)
    and cut into n blocks of `rows` rows, each with `halo` rows of its neighbours either side (overlapping views of
    one padded copy)."""
    batch, length, heads, size = t.shape
    blocks = -(-length // rows)
    padded = t.new_zeros(batch, heads, blocks * rows + 2 * halo, size)
    padded[:, :, halo : halo + length].copy_(t.permute(0, 2, 1, 3))
    return _row_windows(padded, blocks, rows, rows + 2 * halo)


def _band_diagonals(band: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The K diagonals of [B, N, n, rows, rows + K - 1] blocks as a [B, N, n, rows, K] view: (r, k) -> (r, r + k)."""
    batch, heads, blocks, rows, width = band.shape
    return band.as_strided((batch, heads, blocks, rows, kernel_size),
                           (heads * blocks * rows * width, blocks * rows * width, rows * width, width + 1, 1))


def _span_band(taps: torch.Tensor, rows: int) -> torch.Tensor:
    """[B, T, N, 1, K] per-position kernels -> [B, N, n, rows, rows + K - 1] blocks, zero off the band: block j's
    row r holds position t = j*rows + r's kernel at columns r .. r + K - 1 of the block's input window."""
    batch, length, heads, _, kernel_size = taps.shape
    blocks = -(-length // rows)
    band = taps.new_zeros(batch, heads, blocks, rows, rows + kernel_size - 1)
    per_head = F.pad(taps.squeeze(-2).permute(0, 2, 1, 3), (0, 0, 0, blocks * rows - length))  # [B, N, n*rows, K]
    _band_diagonals(band, kernel_size).copy_(per_head.view(batch, heads, blocks, rows, kernel_size))
    return band


def _span_conv_banded_forward(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The span conv as one batched product of banded [rows, rows + K - 1] kernel blocks with the values' windows
    (the unfold-free counterpart of HF's im2col: K - 1 extra input rows a block, not K copies of the input).
    Returns a [B, T, N, d] view of a [B, N, T', d] result."""
    batch, length, heads, size = x.shape
    halo = (taps.shape[-1] - 1) // 2
    out = torch.matmul(_span_band(taps, _BAND_ROWS), _span_blocks(x, _BAND_ROWS, halo))
    return out.view(batch, heads, -1, size)[:, :, :length].permute(0, 2, 1, 3)


def _span_conv_banded_backward(grad: torch.Tensor, x: torch.Tensor, taps: torch.Tensor, need_x: bool,
                               need_taps: bool):
    """Gradients of `_span_conv_banded_forward`: the kernels' from the band of grad-block x window^T products, the
    values' from band^T x grad-block products, whose overlapping windows are added back into place."""
    batch, length, heads, size = x.shape
    kernel_size = taps.shape[-1]
    halo, rows = (kernel_size - 1) // 2, _BAND_ROWS
    if _autocast_on("cpu"):  # a backward called under autocast: keep the forward's dtype (fp32 under CPU bf16)
        with torch.autocast("cpu", enabled=False):
            return _span_conv_banded_backward(grad, x, taps, need_x, need_taps)
    grad_blocks = _span_blocks(grad.to(x.dtype), rows, 0)
    grad_x = grad_taps = None
    if need_taps:
        products = torch.matmul(grad_blocks, _span_blocks(x, rows, halo).transpose(-1, -2))
        grad_taps = _band_diagonals(products, kernel_size).reshape(batch, heads, -1, kernel_size)[:, :, :length]
        grad_taps = grad_taps.permute(0, 2, 1, 3).unsqueeze(-2)
    if need_x:
        windows = torch.matmul(_span_band(taps, rows).transpose(-1, -2), grad_blocks)  # [B, N, n, rows + 2h, d]
        blocks = windows.shape[2]
        padded = x.new_zeros(batch, heads, blocks * rows + 2 * halo, size)
        # each window's first `rows` rows tile the padded axis; its last 2*halo rows overlap the next window's
        _row_windows(padded, blocks, rows, rows).copy_(windows[:, :, :, :rows])
        _row_windows(padded, blocks, rows, 2 * halo, first_row=rows).add_(windows[:, :, :, rows:])
        grad_x = padded[:, :, halo : halo + length].permute(0, 2, 1, 3)
    return grad_x, grad_taps


def _same_conv_forward(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    length, kernel_size = x.shape[1], taps.shape[-1]
    per_position = taps.dim() == x.dim() + 1
    if _onednn_depthwise(x, taps):
        return _depthwise_conv2d(x, taps)
    if _banded_span_conv(x, taps):
        return _span_conv_banded_forward(x, taps)
    # Per-channel taps are read as contiguous [K, C] rows: a stride-K tap vector makes every multiply-add take
    # PyTorch's slow strided path (about 5x slower for the depthwise conv).
    rows = taps if per_position else taps.t().contiguous()
    center = (kernel_size - 1) // 2
    out = x * (rows[..., center] if per_position else rows[center])
    for k, offset, lo, hi in _same_conv_terms(length, kernel_size):
        if k == center:
            continue
        tap = rows[:, lo:hi, ..., k] if per_position else rows[k]
        out[:, lo:hi].addcmul_(x[:, lo + offset : hi + offset], tap)
    return out


def _depthwise_conv1d(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """`same_conv` with per-channel taps ([B, T, C] x [C, K]) as one grouped `F.conv1d`.

    Used on GPUs in eager mode, where the step is bound by the number of ops launched: the shift-and-add is ~18
    ops forward and ~50 backward per call (a third of all the ops of a pre-training step), this is a few. Under
    torch.compile the shift-and-add is used instead (see `compiled_depthwise_as_conv1d`)."""
    channels, kernel_size = taps.shape
    out = F.conv1d(x.transpose(1, 2), taps.unsqueeze(1), padding=(kernel_size - 1) // 2, groups=channels)
    return out.transpose(1, 2)


def _gpu_path(x: torch.Tensor) -> bool:
    """Whether the GPU's choices apply (the conv1d depthwise conv, the contiguous attention gradient); tests
    force them on the CPU."""
    return x.device.type == "cuda"


def _same_conv_plain(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """`same_conv` as plain out-of-place ops over a zero-padded copy, for `torch.compile` to fuse (Dynamo cannot
    trace the `out=` views of `_same_conv_backward`).

    A chain of adds, not `torch.stack(terms).sum(0)`: Inductor fuses the chain into one pointwise kernel, while the
    stack is materialised (K fp32 copies of the input, one kernel each) and then summed with a strided reduction;
    on an H200 that cost 3.8 ms of a 32 ms compiled medium-small RTD step."""
    kernel_size = taps.shape[-1]
    center = (kernel_size - 1) // 2
    length = x.shape[1]
    per_position = taps.dim() == x.dim() + 1
    padded = F.pad(x, (0, 0) * (x.dim() - 2) + (center, center))
    out = None
    for k in range(kernel_size):
        term = padded[:, k : k + length] * (taps[..., k] if per_position else taps[:, k])
        out = term if out is None else out + term
    return out


# Under torch.compile the depthwise conv is the plain shift-and-add, which Inductor fuses with its neighbours. The
# alternative, True, keeps the grouped conv1d there too: on an H200 its CUDA kernels took 4.3 ms of the 31 ms of GPU
# time of a compiled medium-small RTD step (benchmarks/results/gpu/profile_compiled_conv1d.txt). Benchmarks flip this to
# compare the two (benchmarks/pretrain_step.py --compiled-depthwise).
compiled_depthwise_as_conv1d = False


def same_conv(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """A 'same' zero-padded K-tap cross-correlation along dim 1 (odd K), taps per position or per channel."""
    depthwise = taps.dim() == 2 and x.dim() == 3
    if (_compiling() and not (depthwise and compiled_depthwise_as_conv1d and _gpu_path(x))) or _plain_ops:
        return _same_conv_plain(x, taps)
    if depthwise and _gpu_path(x):
        return _depthwise_conv1d(x, taps)
    if torch.is_grad_enabled() and (x.requires_grad or taps.requires_grad):
        return _SameConv.apply(x, taps)
    return _same_conv_forward(x, taps)


class _SpanKernelLogits(torch.autograd.Function):
    """linear(separable_conv(x) * query): the span-aware kernel generator's logits (spec §1.4 steps 2-3).

    Saves only the separable conv's output (`span_key`, [B, T, A]); the depthwise output ([B, T, H]) and the
    product with the query ([B, T, A]) are recomputed in backward (a 9-tap shift-and-add and one multiply),
    which saves 3 of the 4 activations autograd would keep for this chain.
    """

    @staticmethod
    def forward(ctx, x, depthwise_taps, pointwise_weight, pointwise_bias, query, kernel_weight, kernel_bias):
        depthwise = _same_conv_forward(x, depthwise_taps).view(-1, x.shape[-1])
        span_key = _mm_nt(depthwise, pointwise_weight, pointwise_bias).view(*x.shape[:-1], -1)
        del depthwise  # recomputed in backward
        ctx.save_for_backward(x, depthwise_taps, pointwise_weight, query, kernel_weight, span_key)
        logits = _mm_nt((span_key * query).view(-1, span_key.shape[-1]), kernel_weight, kernel_bias)
        return logits.view(*x.shape[:-1], -1)

    @staticmethod
    @_first_order
    def backward(ctx, grad):
        x, depthwise_taps, pointwise_weight, query, kernel_weight, span_key = ctx.saved_tensors
        width = span_key.shape[-1]
        g = grad.reshape(-1, grad.shape[-1])
        grad_kernel_weight = _mm_weight_gradient(g.t(), (span_key * query).view(-1, width))
        grad_kernel_bias = g.sum(0)
        grad_product = _mm_nt(g, kernel_weight.t()).view(span_key.shape)
        grad_query = grad_product * span_key
        grad_span = grad_product.mul_(query).view(-1, width)
        grad_pointwise_bias = grad_span.sum(0)
        depthwise = _same_conv_forward(x, depthwise_taps)
        grad_pointwise_weight = _mm_weight_gradient(grad_span.t(), depthwise.view(-1, depthwise.shape[-1]))
        del depthwise
        grad_depthwise = _mm_nt(grad_span, pointwise_weight.t()).view(x.shape)
        grad_x, grad_taps = _same_conv_backward(grad_depthwise, x, depthwise_taps,
                                                ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (grad_x, grad_taps, grad_pointwise_weight, grad_pointwise_bias, grad_query, grad_kernel_weight,
                grad_kernel_bias)


def span_kernel_logits(x, depthwise_taps, pointwise_weight, pointwise_bias, query, kernel_weight, kernel_bias):
    """kernel logits = linear(pointwise(depthwise(x)) * query), storing one [B, T, A] tensor for backward."""
    if _lean_path(x) and torch.is_grad_enabled():
        return _SpanKernelLogits.apply(x, depthwise_taps, pointwise_weight, pointwise_bias, query, kernel_weight,
                                       kernel_bias)
    span_key = linear(same_conv(x, depthwise_taps), pointwise_weight, pointwise_bias)
    return linear(span_key * query, kernel_weight, kernel_bias)


def _short_softmax_forward(x: torch.Tensor) -> torch.Tensor:
    e = (x - x.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


class _ShortSoftmax(torch.autograd.Function):
    """Softmax over a short last dimension (the K = 9 taps of each dynamic kernel).

    PyTorch's softmax kernel vectorises along the softmax dimension, which a length of 9 starves; five whole-tensor
    ops (max, subtract, exp, sum, divide) are ~5x faster here, and the backward likewise.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        y = _short_softmax_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @_first_order
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        gy = grad * y
        return gy.sub_(y * gy.sum(dim=-1, keepdim=True))


def short_softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax(x, dim=-1) for a short last dimension (CPU fast path; elsewhere PyTorch's softmax)."""
    if not (_lean_path(x) and x.shape[-1] <= 32):
        return x.softmax(dim=-1)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ShortSoftmax.apply(x)
    return _short_softmax_forward(x)


class _LayerNorm(torch.autograd.Function):
    """LayerNorm that saves its *output* (which the next layer saves anyway) instead of its input.

    Backward recovers x̂ = (y - b) / w from the output, then runs PyTorch's LayerNorm backward on x̂ with mean 0
    and rstd 1 and scales the input gradient by the true rstd, so the pre-norm residual sum (one [B, T, H] tensor
    per norm) is never stored. The same trick as apex's memory-efficient LayerNorm; only used when no element of
    the scale is 0 and no |b| exceeds `_LN_MAX_SHIFT_RATIO` |w|: x̂'s rounding error grows as eps · |b| / |w|,
    so a channel with a tiny scale and a large shift would get gradients off by ~1e-5 or worse.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        y, _, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(y, weight, bias, rstd)
        return y

    @staticmethod
    @_first_order
    def backward(ctx, grad):
        y, weight, bias, rstd = ctx.saved_tensors
        normalized = torch.addcdiv(-bias / weight, y, weight)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
            grad.contiguous(), normalized, [y.shape[-1]], torch.zeros_like(rstd), torch.ones_like(rstd),
            weight, bias, list(ctx.needs_input_grad[:3]))
        if grad_x is not None:
            grad_x.mul_(rstd)
        return grad_x, grad_weight, grad_bias, None


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """`norm(x)`, storing its output rather than its input for backward on the CPU training path."""
    weight, bias = norm.weight, norm.bias
    # bf16 keeps the plain LayerNorm: recovering x̂ from a bf16 output would lose too much precision.
    if (_lean_path(x) and x.dtype != torch.bfloat16 and torch.is_grad_enabled() and weight is not None
            and bias is not None and _output_recovers_input(weight, bias)):
        return _LayerNorm.apply(x, weight, bias, norm.eps)
    return norm(x)


# x̂ = (y - b) / w is recovered to ~eps · (|x̂| + |b| / |w|): with |b| <= 64 |w| that is within ~4e-6 of x̂.
_LN_MAX_SHIFT_RATIO = 64.0


def _output_recovers_input(weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether x̂ can be recovered precisely from a LayerNorm's output: every |w| > 0 and |b| <= ratio · |w|."""
    with torch.no_grad():
        return bool(((bias.abs() <= weight.abs() * _LN_MAX_SHIFT_RATIO) & (weight != 0)).all())
