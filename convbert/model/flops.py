"""Parameter and FLOP accounting for `convbert info` (dense multiply-adds counted as 2 FLOPs)."""

from __future__ import annotations

import torch

from convbert.model.config import PRESET_GENERATOR_FRACTION, ConvBertConfig

MASK_FRACTION = 0.15  # generator logits are computed only at the masked slots


def encoder_forward_flops_per_token(config: ConvBertConfig, seq_len: int = 128) -> float:
    """Forward FLOPs per token of one encoder (matmuls, convolutions and attention; elementwise ops excluded)."""
    H, A, I, K, G = (config.hidden_size, config.branch_width, config.intermediate_size, config.conv_kernel_size,
                     config.num_groups)
    Nr = config.reduced_heads
    per_layer = 2 * H * 3 * A + 2 * 2 * seq_len * A  # q, k, v projections; scores and weighted sum
    if config.attention_type == "mixed":
        per_layer += 2 * H * A  # conv values
        per_layer += 2 * K * H + 2 * H * A  # depthwise + pointwise
        per_layer += 2 * A * Nr * K + 2 * K * A  # kernel generation + span convolution
    per_layer += 2 * config.attention_output_width * H  # attention output dense
    per_layer += 2 * 2 * H * I / G  # the two FFN matrices (grouped: G times fewer)
    flops = config.num_hidden_layers * per_layer
    if config.embedding_size != H:
        flops += 2 * config.embedding_size * H
    return float(flops)


def pretraining_counts(config: ConvBertConfig, generator_fraction: float) -> dict[str, float]:
    """Parameters of discriminator / generator (+ heads) and training FLOPs per token (3x forward)."""
    from convbert.model.heads import DiscriminatorHead, GeneratorHead
    from convbert.model.modeling import ConvBertModel

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    gen_config = config.generator_config(generator_fraction)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        disc = ConvBertModel(config)
        gen = ConvBertModel(gen_config, embeddings=disc.embeddings)
        gen_head = GeneratorHead(gen_config, config.embedding_size)
        disc_head = DiscriminatorHead(config)
    disc_params = count(disc)
    gen_params = count(gen) - count(disc.embeddings) + count(gen_head)
    total = disc_params + count(disc_head) + gen_params

    E, V = config.embedding_size, config.vocab_size
    disc_fwd = encoder_forward_flops_per_token(config) + 2 * config.hidden_size * (config.hidden_size + 1)
    gen_fwd = encoder_forward_flops_per_token(gen_config) + MASK_FRACTION * (2 * gen_config.hidden_size * E + 2 * E * V)
    return {
        "discriminator_params": disc_params,
        "generator_params": gen_params,
        "pretraining_params": total,
        "finetune_train_flops_per_token": 3 * encoder_forward_flops_per_token(config),
        "pretrain_train_flops_per_token": 3 * (disc_fwd + gen_fwd),
        "generator": gen_config,
    }


def preset_table(names: list[str], attention: str = "mixed") -> list[dict]:
    """One row per preset; `attention="plain"` gives the ELECTRA-style baseline of the same size (what
    `convbert pretrain --attention plain` trains), for the paper's cost comparison."""
    rows = []
    for name in names:
        config = ConvBertConfig.from_preset(name, attention_type=attention)
        counts = pretraining_counts(config, PRESET_GENERATOR_FRACTION[name])
        gen = counts.pop("generator")
        rows.append({
            "size": name,
            "attention": attention,
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "embedding": config.embedding_size,
            "heads": config.num_attention_heads,
            "sa_heads": config.reduced_heads,
            "conv_heads": config.reduced_heads if config.attention_type == "mixed" else 0,
            "head_size": config.head_size,
            "groups": config.num_groups,
            "kernel": config.conv_kernel_size,
            "generator_hidden": gen.hidden_size,
            "generator_heads": gen.num_attention_heads,
            **counts,
        })
    return rows
