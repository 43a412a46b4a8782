"""The ELECTRA pre-training model: sharing, losses, labels, sampling (spec §3.3–3.6)."""

import math

import pytest
import torch
import torch.nn.functional as F

from convbert.model.config import ConvBertConfig
from convbert.pretrain.masking import mask_batch
from convbert.pretrain.model import (
    ElectraPretrainingModel, gather_positions, gumbel_argmax, gumbel_argmax_in_place, gumbel_sample, uniform_noise,
)

CLS, SEP, MASK = 2, 3, 4


def tiny(**kw):
    return ConvBertConfig.from_preset("tiny", vocab_size=200, **kw)


def batch(B=4, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 20:] = 0
    ids[1, 20:] = 0
    return mask_batch(ids, mask, torch.zeros_like(ids), cls_id=CLS, sep_id=SEP, mask_id=MASK,
                      generator=torch.Generator().manual_seed(seed + 1))


def test_generator_shares_embeddings_not_projection():
    torch.manual_seed(0)
    m = ElectraPretrainingModel(tiny(), 0.25)
    d, g = m.discriminator, m.generator
    assert g.embeddings is d.embeddings
    assert g.config.hidden_size == 16 and d.config.hidden_size == 64
    assert g.embeddings_project is not None and g.embeddings_project is not d.embeddings_project
    aliases = m.shared_parameter_aliases()
    assert set(aliases) == {f"generator.embeddings.{n}" for n, _ in d.embeddings.state_dict().items()}
    # trainable parameters are counted once
    names = [n for n, _ in m.named_parameters()]
    assert not any(n.startswith("generator.embeddings.") for n in names)


def test_losses_labels_and_gradients():
    torch.manual_seed(0)
    m = ElectraPretrainingModel(tiny(), 0.25)
    mb = batch()
    out = m(mb, sample_generator=torch.Generator().manual_seed(3))
    # generator loss: weighted mean over the batch's slots
    ce = F.cross_entropy(out.mlm_logits.reshape(-1, 200), mb.target_ids.reshape(-1), reduction="none")
    w = mb.weights.reshape(-1)
    assert torch.allclose(out.gen_loss, (ce * w).sum() / (w.sum() + 1e-6))
    # labels: 1 exactly where the scatter changed the original token
    fake = mb.original_ids.clone()
    for b in range(mb.positions.shape[0]):
        for p in set(mb.positions[b].tolist()) - {0}:
            idx = (mb.positions[b] == p).nonzero().flatten()
            fake[b, p] = out.sampled_ids[b, idx].sum() // len(idx)
    assert torch.equal(out.disc_labels, (fake != mb.original_ids).long())
    bce = F.binary_cross_entropy_with_logits(out.disc_logits, out.disc_labels.float(), reduction="none")
    mk = mb.input_mask.float()
    assert torch.allclose(out.disc_loss, (bce * mk).sum() / (mk.sum() + 1e-6))
    assert torch.allclose(out.loss, out.gen_loss + 50.0 * out.disc_loss)
    assert out.mlm_logits.dtype == torch.float32 and out.disc_logits.dtype == torch.float32
    out.loss.backward()
    # the shared word table receives gradient; the generator gets none through the sampler
    assert m.discriminator.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    gen_only = ElectraPretrainingModel(tiny(), 0.25)
    gen_only.load_state_dict(m.state_dict())
    o2 = gen_only(mb, sample_generator=torch.Generator().manual_seed(3))
    o2.disc_loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in gen_only.generator.encoder.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in gen_only.generator_head.parameters())


def test_gumbel_sample_matches_softmax():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]]).expand(40000, 4)
    s = gumbel_sample(logits, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(s, minlength=4).float() / s.numel()
    assert torch.allclose(freq, F.softmax(logits[0], -1), atol=0.01)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gumbel_sample_is_the_gumbel_max_expression(temperature):
    logits = torch.randn(4, 19, 300)
    ours = gumbel_sample(logits, temperature, torch.Generator().manual_seed(3))
    u = uniform_noise(logits, torch.Generator().manual_seed(3))
    assert torch.equal(ours, torch.argmax(logits / temperature - torch.log(-torch.log(u + 1e-9) + 1e-9), dim=-1))


def test_uniform_noise_is_fixed_by_the_generator_and_uniform():
    """The Gumbel noise (numpy's SFC64 on the CPU, seeded from the torch generator): the same generator state gives
    the same noise, a different one different noise, torch's default generator follows `torch.manual_seed`, and the
    values are fp32 in [0, 1) with a uniform mean and spread."""
    like = torch.empty(64, 19, 301)
    shape = like.shape
    a = uniform_noise(like, torch.Generator().manual_seed(7))
    b = uniform_noise(like, torch.Generator().manual_seed(7))
    c = uniform_noise(like, torch.Generator().manual_seed(8))
    assert a.shape == shape and a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= float(a.min()) and float(a.max()) < 1.0
    assert abs(float(a.mean()) - 0.5) < 0.005 and abs(float(a.var()) - 1 / 12) < 0.002
    torch.manual_seed(11)
    d = uniform_noise(like)
    torch.manual_seed(11)
    assert torch.equal(d, uniform_noise(like))


def test_gather_positions():
    h = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    pos = torch.tensor([[0, 4], [2, 2]])
    g = gather_positions(h, pos)
    assert torch.equal(g[0, 1], h[0, 4]) and torch.equal(g[1, 0], h[1, 2])


def test_mlm_objective_and_plain_attention():
    torch.manual_seed(0)
    m = ElectraPretrainingModel(tiny(), objective="mlm")
    assert m.generator is None and m.discriminator_head is None
    out = m(batch())
    assert out.disc_logits is None and torch.allclose(out.loss, out.gen_loss)
    assert math.isfinite(out.loss.item())
    p = ElectraPretrainingModel(tiny(attention_type="plain"), 0.25)
    assert math.isfinite(p(batch()).loss.item())


def test_bf16_autocast_keeps_sampling_and_losses_fp32():
    torch.manual_seed(0)
    m = ElectraPretrainingModel(tiny(), 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(batch())
    assert out.loss.dtype == torch.float32 and out.mlm_logits.dtype == torch.float32
    assert math.isfinite(out.loss.item())


@pytest.mark.parametrize(("precision", "device", "switched"), [
    ("fp32", "cuda", False), ("bf16", "cpu", False), ("bf16", "cuda", True), ("fp16", "cuda", True),
])
def test_tf32_is_switched_on_only_for_cuda_autocast(precision, device, switched):
    """The fp32 MLM head may use TF32 when the rest of the step is bf16/fp16 on CUDA; fp32 runs stay exact."""
    from convbert.precision import allow_tf32_under_autocast

    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        assert allow_tf32_under_autocast(precision, torch.device(device)) is switched
        assert torch.backends.cuda.matmul.allow_tf32 is switched
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gumbel_argmax_out_of_place_is_bit_identical_to_in_place(temperature):
    """The compiled sampler's expression draws the same samples as the eager in-place one, to the last bit."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 9, 300, generator=g) * 3
    noise = torch.rand(logits.shape, generator=g)
    gumbel = -torch.log(-torch.log(noise + 1e-9) + 1e-9)
    in_place = noise.clone()
    assert torch.equal(gumbel_argmax(logits, noise, temperature), gumbel_argmax_in_place(logits, in_place, temperature))
    assert torch.equal(in_place, gumbel + logits / temperature)  # the buffer holds the perturbed logits


def _step(model, mb):
    out = model(mb, sample_generator=torch.Generator().manual_seed(3))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def test_compile_pieces_compiles_heads_losses_and_sampler():
    """`compile_pieces` (what `convbert pretrain --compile` calls) hands every piece of the step to torch.compile:
    a recording backend sees the encoders, both heads, both losses and the sampler's arithmetic."""
    torch.manual_seed(0)
    model = ElectraPretrainingModel(tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 0.25)
    mb = batch()
    eager, _ = _step(model, mb)
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append({str(node.target) for node in graph_module.graph.nodes})
        return graph_module.forward

    torch._dynamo.reset()
    model.compile_pieces(backend=record)
    out, _ = _step(model, mb)
    ops = set().union(*graphs)
    for name in ("cross_entropy", "binary_cross_entropy_with_logits", "argmax", "log", "gelu", "layer_norm",
                 "scaled_dot_product_attention"):
        assert any(name in op for op in ops), (name, sorted(ops))
    assert torch.equal(out.sampled_ids, eager.sampled_ids) and torch.allclose(out.loss, eager.loss)
    encoders_only = ElectraPretrainingModel(tiny(), 0.25)
    graphs.clear()
    torch._dynamo.reset()
    encoders_only.compile_pieces(encoders_only=True, backend=record)
    _step(encoders_only, mb)
    assert not any("cross_entropy" in op or "argmax" in op for op in set().union(*graphs))


def test_compiled_pieces_match_eager():
    """Inductor's step (CPU here) gives the eager samples, losses and gradients."""
    torch.manual_seed(0)
    model = ElectraPretrainingModel(tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 0.25)
    mb = batch()
    eager, eager_grads = _step(model, mb)
    torch._dynamo.reset()
    model.compile_pieces()
    out, grads = _step(model, mb)
    assert torch.equal(out.sampled_ids, eager.sampled_ids)
    assert torch.equal(out.disc_labels, eager.disc_labels)
    for name in ("loss", "gen_loss", "disc_loss"):
        assert torch.allclose(getattr(out, name), getattr(eager, name), rtol=1e-5, atol=1e-6), name
    assert sorted(grads) == sorted(eager_grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], rtol=1e-4, atol=1e-6), name


def test_compiled_pieces_evaluate_as_eager_after_training_steps():
    """The trainer's held-out evaluation after compiled training steps: eval mode, no gradients, another batch size,
    so every piece is traced again (a second graph each, not a graph break). Dynamo and AOTAutograd only
    (`aot_eager`): Inductor's C++ for these forward-only graphs would add ~50 s of compiling here, and the Inductor
    step is checked above."""
    torch.manual_seed(0)
    model = ElectraPretrainingModel(tiny(), 0.25)
    mb, held_out = batch(), batch(B=6, seed=7)

    def evaluate():
        model.eval()
        with torch.no_grad():
            out = model(held_out, sample_generator=torch.Generator().manual_seed(5))
        model.train()
        return out

    eager = evaluate()
    torch._dynamo.reset()
    model.compile_pieces(backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    _step(model, mb)
    compiled = evaluate()
    assert torch.equal(compiled.sampled_ids, eager.sampled_ids)
    for name in ("loss", "gen_loss", "disc_loss"):
        assert torch.allclose(getattr(compiled, name), getattr(eager, name), rtol=1e-5, atol=1e-6), name
    assert torch.allclose(compiled.disc_logits, eager.disc_logits, rtol=1e-5, atol=1e-5)
