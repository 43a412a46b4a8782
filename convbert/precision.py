"""The `--precision` choices shared by pre-training and fine-tuning, and the autocast each one means."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def fp16_note(device: torch.device) -> str | None:
    """What to know about fp16 on `device`: on the CPU it runs (autocast and a gradient scaler, as on a GPU), which
    checks an fp16 set-up without a GPU, but few CPUs have fp16 arithmetic: expect it to be slower than fp32."""
    if device.type != "cpu":
        return None
    return ("note: --precision fp16 on the CPU runs through autocast with a gradient scaler, as on a GPU, but most "
            "CPUs have no fp16 arithmetic and run it many times slower than fp32 (a medium-small step ~19x on an "
            "AVX2 CPU); bf16 is the CPU's mixed precision")


def autocast(precision: str, device: torch.device, cache: bool = True):
    """The forward's autocast context for `precision`: none for fp32, bf16 or fp16 autocast on `device` otherwise.

    Callers keep losses in fp32 outside it; fp16 also needs a gradient scaler (on the CPU too: `fp16_note`).
    `cache=False` for CUDA graph capture: autocast's cache of cast weights must not outlive the captured region.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def allow_tf32_under_autocast(precision: str, device: torch.device) -> bool:
    """Let CUDA's fp32 matrix products use TF32 tensor cores when the step runs under bf16/fp16 autocast.

    Under autocast the only fp32 products left are the pre-training MLM head's (its logits against the word table,
    kept fp32 for the sampler and the loss, and their gradients). TF32's 10-bit mantissas are still finer than the
    bf16 of every other product in the step, and on an H200 the fp32 versions took ~1.3 ms of a ~30 ms
    medium-small step. fp32 runs keep exact fp32 products (this changes nothing for them, or on the CPU).
    Returns whether it switched TF32 on; the setting is process-wide, as PyTorch's flag is.
    """
    if precision == "fp32" or device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    return True
