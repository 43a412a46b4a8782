"""The pre-training model: ELECTRA replaced-token detection with a ConvBERT generator and discriminator (spec §3).

* `objective="electra"` (default): a small generator (`config.generator_config(fraction)`) that shares the
  discriminator's `ConvBertEmbeddings` module (word/position/type tables and the embedding LayerNorm; each network keeps
  its own `embeddings_project`), an MLM head tied to the shared word table evaluated only at the masked slots,
  Gumbel-max sampling in fp32 without gradient, and a discriminator head. Loss = gen_weight·MLM + disc_weight·RTD.
* `objective="mlm"`: BERT-style masked LM on one full-size network (the paper's BERT comparison); the same masking.
* `config.attention_type == "plain"` gives the ELECTRA baseline (full self-attention, no conv heads).

Losses are computed in fp32 whatever the autocast precision, as weighted means over the (local) batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convbert.errors import ConvBertError
from convbert.model import kernels
from convbert.pretrain.masking import MaskedBatch, scatter_update

OBJECTIVES = ("electra", "mlm")


@dataclass
class PretrainingOutput:
    loss: torch.Tensor  # scalar, fp32
    gen_loss: torch.Tensor
    disc_loss: torch.Tensor  # zeros for the mlm objective
    mlm_logits: torch.Tensor  # [B, N, V] fp32 (detached copies are cheap to take for metrics)
    sampled_ids: torch.Tensor | None  # [B, N]
    disc_logits: torch.Tensor | None  # [B, T] fp32
    disc_labels: torch.Tensor | None  # [B, T] int64


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`hidden [B,T,H]`, `positions [B,N]` → `[B,N,H]`."""
    index = positions.long().unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def gumbel_sample(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None,
                  argmax_of_noise=None) -> torch.Tensor:
    """Exact categorical sample via Gumbel-max, in fp32 and without gradient (spec §3.4).

    `argmax_of_noise(logits, uniform_noise, temperature)` does the arithmetic (default `gumbel_argmax_in_place`;
    the trainer's `--compile` passes a compiled `gumbel_argmax`). The uniform noise is drawn here, eagerly, from
    `generator`, so the samples are the same either way."""
    with torch.no_grad():
        logits = logits.detach().float()
        noise = uniform_noise(logits, generator)
        return (argmax_of_noise or gumbel_argmax_in_place)(logits, noise, temperature)


def uniform_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """U[0, 1) fp32 noise of `like`'s shape and device for the Gumbel-max sample, fixed by `generator` (torch's
    default when None).

    On the CPU it comes from `kernels.host_bit_generator` (numpy's SFC64 seeded from `generator`): for
    medium-small's [32, 19, 30522] about half the time of torch's serial mt19937 (53-71 against 104-170 ms on an
    Intel Xeon), which made sampling 5 % of a CPU pre-training step. On GPUs (and their code path, which tests run
    on the CPU) and under a dispatch mode, torch.rand.
    """
    bit_generator = None if kernels._gpu_path(like) else kernels.host_bit_generator(like.device, generator)
    if bit_generator is None:
        return torch.rand(like.shape, dtype=torch.float32, device=like.device, generator=generator)
    noise = np.empty(math.prod(like.shape), dtype=np.float32)
    np.random.Generator(bit_generator).random(out=noise, dtype=np.float32)
    return torch.from_numpy(noise).view(like.shape)


def gumbel_argmax_in_place(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """argmax(logits / T - log(-log(u + 1e-9) + 1e-9)), overwriting the uniform `noise`: one [B, S, V] buffer
    instead of eight (each a fresh, page-faulting allocation at this size); the values are bit-identical to
    `gumbel_argmax`'s out-of-place expression."""
    noise.add_(1e-9).log_().neg_().add_(1e-9).log_().neg_()
    noise.add_(logits if temperature == 1.0 else logits / temperature)
    return torch.argmax(noise, dim=-1)


def gumbel_argmax(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """The same as `gumbel_argmax_in_place`, out of place, for `torch.compile` to fuse into one pass (eager, it
    is 7 passes over a ~300 MB buffer at medium-small's batch 128)."""
    gumbel = -torch.log(-torch.log(noise + 1e-9) + 1e-9)
    return torch.argmax(gumbel + (logits if temperature == 1.0 else logits / temperature), dim=-1)


def mlm_loss(logits: torch.Tensor, target_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy over the masked slots (fp32)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_ids.reshape(-1), reduction="none")
    weights = weights.float().reshape(-1)
    return (ce * weights).sum() / (weights.sum() + 1e-6)


def rtd_loss(disc_logits: torch.Tensor, labels: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of replaced-token detection over the real tokens (fp32)."""
    mask = input_mask.float()
    bce = F.binary_cross_entropy_with_logits(disc_logits, labels.float(), reduction="none")
    return (bce * mask).sum() / (mask.sum() + 1e-6)


def word_embedding_weight(embeddings: nn.Module) -> torch.Tensor:
    for name in ("word_embeddings",):
        module = getattr(embeddings, name, None)
        if module is not None:
            return module.weight
    raise ConvBertError("ConvBertEmbeddings has no `word_embeddings` table; cannot tie the generator output")


class ElectraPretrainingModel(nn.Module):
    """Generator + discriminator (or one MLM network) with their pre-training heads."""

    def __init__(
        self,
        config,
        generator_fraction: float = 0.25,
        objective: str = "electra",
        gen_weight: float = 1.0,
        disc_weight: float = 50.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        from convbert.model.heads import DiscriminatorHead, GeneratorHead
        from convbert.model.modeling import ConvBertModel

        if objective not in OBJECTIVES:
            raise ConvBertError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
        self.config = config
        self.objective = objective
        self.generator_fraction = float(generator_fraction)
        self.gen_weight = float(gen_weight)
        self.disc_weight = float(disc_weight)
        self.temperature = float(temperature)
        embedding_size = config.embedding_size if getattr(config, "embedding_size", None) else config.hidden_size
        self.discriminator = ConvBertModel(config)
        if objective == "electra":
            self.generator_config = config.generator_config(self.generator_fraction)
            self.generator = ConvBertModel(self.generator_config, embeddings=self.discriminator.embeddings)
            self.generator_head = GeneratorHead(self.generator_config, embedding_size)
            self.discriminator_head = DiscriminatorHead(config)
        else:
            self.generator_config = None
            self.generator = None
            self.generator_head = GeneratorHead(config, embedding_size)
            self.discriminator_head = None
        # The step's small pieces outside the encoders; `compile_pieces` swaps in compiled versions.
        self._mlm_loss, self._rtd_loss, self._argmax_of_noise = mlm_loss, rtd_loss, gumbel_argmax_in_place

    def compile_pieces(self, encoders_only: bool = False, **compile_kwargs) -> None:
        """`torch.compile` the step's pieces in place (`compile_kwargs` go to `torch.compile`: mode, options):
        the encoders, and unless `encoders_only` the heads, the losses and the sampler's arithmetic (its random draw
        stays eager, from the sampling generator). Parameter names, hence checkpoints, are unchanged.

        Not the whole forward as one graph: the sampler's `torch.Generator` and the host-side checks would break it.
        """
        for module in (self.discriminator, self.generator):
            if module is not None:
                module.compile(**compile_kwargs)
        if encoders_only:
            return
        for module in (self.generator_head, self.discriminator_head):
            if module is not None:
                module.compile(**compile_kwargs)
        self._mlm_loss = torch.compile(mlm_loss, **compile_kwargs)
        self._rtd_loss = torch.compile(rtd_loss, **compile_kwargs)
        self._argmax_of_noise = torch.compile(gumbel_argmax, **compile_kwargs)

    # -- helpers ---------------------------------------------------------------------------------------------------
    @property
    def mlm_network(self) -> nn.Module:
        return self.generator if self.generator is not None else self.discriminator

    def shared_parameter_aliases(self) -> dict[str, str]:
        """Names in `state_dict()` that alias another entry (the generator's view of the shared embeddings)."""
        seen: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            key = id(tensor)
            if key in seen:
                aliases[name] = seen[key]
            else:
                seen[key] = name
        return aliases

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, batch: MaskedBatch, sample_generator: torch.Generator | None = None) -> PretrainingOutput:
        attn = batch.input_mask
        seg = batch.segment_ids
        gen_hidden = self.mlm_network(batch.input_ids, attention_mask=attn, token_type_ids=seg).last_hidden_state
        gathered = gather_positions(gen_hidden, batch.positions)
        # The MLM head runs in fp32 even under autocast: its logits feed the sampler and the loss.
        with torch.autocast(device_type=gathered.device.type, enabled=False):
            logits = self.generator_head(
                gathered.float(), word_embedding_weight(self.discriminator.embeddings).float()
            ).float()
        gen_loss = self._mlm_loss(logits, batch.target_ids, batch.weights)

        if self.objective == "mlm":
            zero = gen_loss.new_zeros(())
            return PretrainingOutput(
                loss=self.gen_weight * gen_loss, gen_loss=gen_loss, disc_loss=zero, mlm_logits=logits,
                sampled_ids=None, disc_logits=None, disc_labels=None,
            )

        sampled = gumbel_sample(logits, self.temperature, sample_generator, self._argmax_of_noise)
        fake_ids, updated = scatter_update(batch.original_ids, sampled, batch.positions)
        labels = (updated.bool() & (fake_ids != batch.original_ids)).to(torch.int64)
        disc_hidden = self.discriminator(fake_ids, attention_mask=attn, token_type_ids=seg).last_hidden_state
        disc_logits = self.discriminator_head(disc_hidden).float()
        disc_loss = self._rtd_loss(disc_logits, labels, attn)
        loss = self.gen_weight * gen_loss + self.disc_weight * disc_loss
        return PretrainingOutput(
            loss=loss, gen_loss=gen_loss, disc_loss=disc_loss, mlm_logits=logits, sampled_ids=sampled,
            disc_logits=disc_logits, disc_labels=labels,
        )
