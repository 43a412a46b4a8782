"""Where the time of one replaced-token-detection training step goes (our implementation).

Phases, timed with a wall clock around each (median over steps after warm-up):
  mask (host-side dynamic masking) → generator encoder → MLM head + loss at the 19 slots → Gumbel sample + scatter →
  discriminator encoder + head + loss → backward (both networks) → global-norm clip + AdamWeightDecay step.

Usage: python benchmarks/rtd_breakdown.py --size medium-small --batch 32 --length 128 --steps 4
       [--output benchmarks/results/rtd_breakdown.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _bench import ALLOCATOR_ENV, machine_info, use_fixed_allocator, write_report

if __name__ == "__main__":
    use_fixed_allocator()  # the same fixed glibc settings as model_speed.py

import torch  # noqa: E402
import torch.nn.functional as F

from convbert.model import PRESET_GENERATOR_FRACTION, ConvBertConfig
from convbert.model.flops import pretraining_counts
from convbert.optim import AdamWeightDecay, param_groups
from convbert.pretrain.masking import mask_batch, scatter_update
from convbert.pretrain.model import ElectraPretrainingModel, gather_positions, gumbel_sample, word_embedding_weight

PHASES = ["mask", "generator", "mlm_head_loss", "sample_scatter", "discriminator", "backward", "clip_optimizer"]


def one_step(model, optimizer, ids, input_mask, segments, gen) -> dict[str, float]:
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = now - t
        t = now

    batch = mask_batch(ids, input_mask, segments, cls_id=2, sep_id=3, mask_id=4, generator=gen)
    lap("mask")
    hidden = model.generator(batch.input_ids, attention_mask=batch.input_mask,
                             token_type_ids=batch.segment_ids).last_hidden_state
    lap("generator")
    logits = model.generator_head(gather_positions(hidden, batch.positions),
                                  word_embedding_weight(model.discriminator.embeddings))
    weights = batch.weights
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.target_ids.reshape(-1), reduction="none")
    gen_loss = (ce * weights.reshape(-1)).sum() / (weights.sum() + 1e-6)
    lap("mlm_head_loss")
    sampled = gumbel_sample(logits, 1.0, gen)
    fake, updated = scatter_update(batch.original_ids, sampled, batch.positions)
    labels = (updated.bool() & (fake != batch.original_ids)).float()
    lap("sample_scatter")
    disc = model.discriminator(fake, attention_mask=batch.input_mask, token_type_ids=batch.segment_ids)
    disc_logits = model.discriminator_head(disc.last_hidden_state)
    mask = batch.input_mask.float()
    bce = F.binary_cross_entropy_with_logits(disc_logits, labels, reduction="none")
    loss = gen_loss + 50.0 * (bce * mask).sum() / (mask.sum() + 1e-6)
    lap("discriminator")
    loss.backward()
    lap("backward")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("clip_optimizer")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium-small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/rtd_breakdown.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = ConvBertConfig.from_preset(args.size)
    fraction = PRESET_GENERATOR_FRACTION[args.size]
    model = ElectraPretrainingModel(config, generator_fraction=fraction).train()
    optimizer = AdamWeightDecay(param_groups(model, 0.01), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (args.batch, args.length), generator=gen)
    ids[:, 0] = 2
    ids[:, -1] = 3
    input_mask, segments = torch.ones_like(ids), torch.zeros_like(ids)

    runs = [one_step(model, optimizer, ids, input_mask, segments, gen) for _ in range(args.warmup + args.steps)]
    runs = runs[args.warmup:]
    median = {p: statistics.median(r[p] for r in runs) for p in PHASES}
    total = statistics.median(sum(r.values()) for r in runs)
    tokens = args.batch * args.length
    flops = pretraining_counts(config, fraction)["pretrain_train_flops_per_token"] * tokens

    print(f"ConvBERT-{args.size} RTD step, batch {args.batch} x {args.length}, threads {torch.get_num_threads()}")
    print(f"{'phase':<16}{'seconds':>9}{'share':>8}")
    for p in PHASES:
        print(f"{p:<16}{median[p]:>9.3f}{median[p] / total:>8.0%}")
    print(f"{'total':<16}{total:>9.3f}   {tokens / total:,.0f} tokens/s, {flops / total / 1e9:.1f} model GFLOP/s")
    write_report(args.output, {"size": args.size, "batch": args.batch, "length": args.length,
                               "threads": torch.get_num_threads(), "median_seconds": median, "total_seconds": total,
                               "tokens_per_s": tokens / total, "model_flops_per_s": flops / total,
                               "allocator_env": ALLOCATOR_ENV, "machine": machine_info(torch.get_num_threads()),
                               "all": runs})


if __name__ == "__main__":
    main()
