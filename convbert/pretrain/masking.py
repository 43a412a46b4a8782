"""Dynamic masking for replaced-token detection (spec §3.2) and ELECTRA's scatter semantics.

Masking runs on the host (CPU tensors) with a dedicated `torch.Generator`, so it is identical on every device and its
state can be checkpointed for an exact resume. The defaults are the original recipe:

* `N_pred = int((mask_prob + 0.005) * T)` slots per example (19 for T = 128);
* the number of tokens to predict is `max(1, min(N_pred, round_half_even(mask_prob * sum(input_mask))))`, counting
  [CLS] and [SEP];
* positions are drawn **with replacement**, uniformly over the candidates (`input_mask == 1`, not [CLS]/[SEP]/[MASK]);
  unused slots point at position 0 with weight 0;
* each slot becomes [MASK] with probability 0.85, otherwise the token is left unchanged (no random tokens);
* the scatter ignores updates aimed at position 0 and integer floor-averages duplicated positions.

`with_replacement=False` draws distinct positions instead (a deliberate divergence, behind `--masking`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from convbert.errors import ConvBertError


@dataclass
class MaskedBatch:
    """The masked inputs and the prediction targets of one batch (all `[B, ...]`, same device)."""

    input_ids: torch.Tensor  # [B, T] ids with [MASK] at the replaced slots
    original_ids: torch.Tensor  # [B, T] the unmasked ids
    input_mask: torch.Tensor  # [B, T]
    segment_ids: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, N] int64 (0 for unused slots)
    target_ids: torch.Tensor  # [B, N] int64 original ids at `positions` (0 for unused slots)
    weights: torch.Tensor  # [B, N] float32, 1 for used slots

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MaskedBatch":
        return MaskedBatch(**{k: v.to(device, non_blocking=non_blocking) for k, v in self.__dict__.items()})

    def pin_memory(self) -> "MaskedBatch":
        return MaskedBatch(**{k: v.pin_memory() for k, v in self.__dict__.items()})


def num_predictions(max_seq_length: int, mask_prob: float = 0.15) -> int:
    """`max_predictions_per_seq` of the original: int((mask_prob + 0.005) * T), 19 for T = 128."""
    n = int((mask_prob + 0.005) * max_seq_length)
    if n < 1:
        raise ConvBertError(
            f"mask_prob {mask_prob} with max_seq_length {max_seq_length} gives no prediction slots; expected "
            "(mask_prob + 0.005) * max_seq_length >= 1"
        )
    return n


def scatter_update(
    sequence: torch.Tensor, updates: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ELECTRA's `scatter_update` for an integer `[B, T]` sequence.

    Returns `(updated_sequence, updated_mask)`. Updates aimed at position 0 are dropped; a position hit by several
    slots receives `floor(sum(updates) / count)`. `updated_mask` (int64 0/1) marks the positions that were written.
    """
    if sequence.dim() != 2 or updates.shape != positions.shape or updates.shape[0] != sequence.shape[0]:
        raise ConvBertError(
            f"scatter_update expects sequence [B,T] and updates/positions [B,N]; got {tuple(sequence.shape)}, "
            f"{tuple(updates.shape)}, {tuple(positions.shape)}"
        )
    positions = positions.long()
    summed = torch.zeros_like(sequence).scatter_add_(1, positions, updates.to(sequence.dtype))
    counts = torch.zeros_like(sequence).scatter_add_(1, positions, torch.ones_like(positions, dtype=sequence.dtype))
    counts[:, 0] = 0  # updates aimed at position 0 are ignored
    averaged = torch.div(summed, counts.clamp(min=1), rounding_mode="floor")
    updated_mask = (counts > 0).to(torch.int64)
    updated = torch.where(updated_mask.bool(), averaged, sequence)
    return updated, updated_mask


def candidates_mask(
    input_ids: torch.Tensor, input_mask: torch.Tensor, special_ids: tuple[int, ...]
) -> torch.Tensor:
    """Positions that may be masked: real tokens that are not [CLS]/[SEP]/[MASK] ([UNK] is a candidate)."""
    cand = input_mask.bool().clone()
    for tok in special_ids:
        cand &= input_ids != tok
    return cand


def mask_batch(
    input_ids: torch.Tensor,
    input_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    *,
    cls_id: int,
    sep_id: int,
    mask_id: int,
    generator: torch.Generator | None = None,
    mask_prob: float = 0.15,
    max_predictions: int | None = None,
    with_replacement: bool = True,
    mask_token_prob: float = 0.85,
) -> MaskedBatch:
    """Draw a fresh mask for a batch (spec §3.2). Tensors should live on the generator's device (CPU by default)."""
    if input_ids.dim() != 2 or input_ids.shape != input_mask.shape:
        raise ConvBertError(
            f"mask_batch expects input_ids and input_mask of the same shape [B,T]; got {tuple(input_ids.shape)} "
            f"and {tuple(input_mask.shape)}"
        )
    input_ids = input_ids.long()
    B, T = input_ids.shape
    n = max_predictions if max_predictions is not None else num_predictions(T, mask_prob)
    device = input_ids.device

    cand = candidates_mask(input_ids, input_mask, (cls_id, sep_id, mask_id))
    has_cand = cand.any(dim=1)
    num_tokens = input_mask.sum(dim=1).to(torch.float32)
    count = torch.round(num_tokens * mask_prob).to(torch.int64).clamp(min=1, max=n)  # torch.round: half to even
    slots = torch.arange(n, device=device).unsqueeze(0)

    if with_replacement:
        # Uniform categorical over the candidates, n draws with replacement. Rows without candidates draw from
        # position 0 (their weights are zeroed below).
        probs = cand.to(torch.float32)
        probs[~has_cand, 0] = 1.0
        positions = torch.multinomial(probs, n, replacement=True, generator=generator)
        used = slots < count.unsqueeze(1)
    else:
        keys = torch.rand((B, T), generator=generator, device=device)
        keys = torch.where(cand, keys, torch.full_like(keys, 2.0))
        order = torch.argsort(keys, dim=1, stable=True)
        if n > T:
            order = torch.cat([order, order.new_zeros((B, n - T))], dim=1)
        positions = order[:, :n]
        n_cand = cand.sum(dim=1)
        used = (slots < count.unsqueeze(1)) & (slots < n_cand.unsqueeze(1))
    used &= has_cand.unsqueeze(1)
    weights = used.to(torch.float32)
    positions = positions * used.to(torch.int64)

    replace = torch.rand((B, n), generator=generator, device=device) < mask_token_prob
    mask_positions = positions * replace.to(torch.int64)
    masked_ids, _ = scatter_update(input_ids, torch.full_like(positions, mask_id), mask_positions)
    target_ids = torch.gather(input_ids, 1, positions) * used.to(torch.int64)
    return MaskedBatch(
        input_ids=masked_ids,
        original_ids=input_ids,
        input_mask=input_mask.long(),
        segment_ids=segment_ids.long(),
        positions=positions,
        target_ids=target_ids,
        weights=weights,
    )
