"""The `--precision` choices shared by pre-training and fine-tuning, and the autocast each one means."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
FP16_NEEDS_GPU = "--precision fp16 needs a GPU (use bf16 on CPU)"


def autocast(precision: str, device: torch.device, cache: bool = True):
    """The forward's autocast context for `precision`: none for fp32, bf16 or fp16 autocast on `device` otherwise.

    Callers keep losses in fp32 outside it; fp16 also needs a gradient scaler, and a GPU (`FP16_NEEDS_GPU`).
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
