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
