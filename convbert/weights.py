"""Weight files that carry a checksum of their own tensors.

safetensors checks its header against the file's length, so a truncated file fails to load, but a flipped byte
inside a tensor loads silently as a wrong weight. Every weight file convbert writes into a model folder
(`model.safetensors`, `classifier.safetensors`, `discriminator_head.safetensors`) stores the sha256 of its tensors
in the header's metadata under `CHECKSUM_KEY`, and reading one verifies it. The digest covers each tensor's name,
dtype, shape and little-endian bytes (the file's byte order) in name order, so it does not depend on how the file
lays the tensors out or on the reading machine. Files written by other tools (the hub's, transformers'
`save_pretrained`) have no such entry and load as before; a tool that rewrites a convbert file's tensors but copies
its metadata over keeps a checksum that no longer fits, which the error message names as the other possible cause.
(Pre-training checkpoints are covered by the sha256 of each whole file in `trainer_state.json` instead.)
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from convbert.errors import ConvBertError
from convbert.utils import atomic_path

CHECKSUM_KEY = "convbert_tensors_sha256"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, little-endian bytes) of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().resolve_conj().resolve_neg().contiguous()
        digest.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode("utf-8"))
        if t.numel():
            raw = t.view(-1).view(torch.uint8)
            if sys.byteorder == "big" and t.element_size() > 1:  # safetensors stores little-endian
                raw = raw.view(-1, t.element_size()).flip(-1).contiguous().view(-1)
            digest.update(raw.numpy())
    return digest.hexdigest()


def save_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """`tensors` (moved to the CPU, made contiguous) as a safetensors file with their checksum, written atomically."""
    tensors = {k: v.detach().cpu().resolve_conj().resolve_neg().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), CHECKSUM_KEY: tensors_sha256(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against the checksum stored in it, if any.

    A file that cannot be read raises safetensors' (or the OS's) own error, for the caller to word; tensors that
    differ from the stored checksum raise `ConvBertError`."""
    with safe_open(str(path), framework="pt") as f:
        stored = (f.metadata() or {}).get(CHECKSUM_KEY)
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if stored is not None and (found := tensors_sha256(tensors)) != stored:
        raise ConvBertError(f"{Path(path)}: the tensors differ from the checksum stored in the file (sha256 "
                            f"{found[:12]}…, stored {stored[:12]}…): the file is damaged (export, copy or download "
                            f"it again), or a tool other than convbert changed its tensors and kept convbert's "
                            f"metadata (save it again without '{CHECKSUM_KEY}')")
    return tensors
