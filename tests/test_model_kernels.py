"""The lean CPU training kernels compute exactly what the plain PyTorch ops compute (values and gradients)."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from convbert.model import ConvBertConfig, ConvBertModel, kernels


def test_attention_gradcheck_without_dropout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 5, dtype=torch.double, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 7, dtype=torch.double)
    mask[1, ..., 5:] = -10000.0
    fn = lambda q, k, v: kernels._Attention.apply(q, k, v, mask, 0.3, 0.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    heads_first = lambda t: t.transpose(1, 2)  # noqa: E731
    reference = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), attn_mask=mask,
                                               scale=0.3).transpose(1, 2)
    assert torch.allclose(fn(q, k, v), reference, atol=1e-12)
    assert torch.allclose(kernels.attention(q, k, v, mask, 0.3, 0.1, training=False), reference, atol=1e-12)


def test_attention_reads_strided_projection_views():
    torch.manual_seed(0)
    fused = torch.randn(2, 7, 4 * 15, dtype=torch.double, requires_grad=True)
    q, k, v = (fused[..., i * 15 : (i + 1) * 15].view(2, 7, 3, 5) for i in range(3))
    assert not q.is_contiguous()
    grad = torch.randn(2, 7, 3, 5, dtype=torch.double)
    out = kernels.attention(q, k, v, None, 0.4, 0.0, training=True)
    ours = torch.autograd.grad(out, fused, grad)[0]
    heads_first = lambda t: t.transpose(1, 2)  # noqa: E731
    reference = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), scale=0.4)
    assert torch.allclose(out, reference.transpose(1, 2), atol=1e-12)
    theirs = torch.autograd.grad(reference.transpose(1, 2), fused, grad)[0]
    assert torch.allclose(ours, theirs, atol=1e-10)


def test_attention_with_dropout_matches_explicit_computation():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 5, dtype=torch.double, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    out = kernels._Attention.apply(q, k, v, None, 0.3, 0.5)
    torch.manual_seed(5)
    keep, scale = kernels._keep_mask(torch.Size([3, 2, 7, 7]), 0.5, torch.device("cpu"))  # [N, B, T, S]
    heads_first = lambda t: t.transpose(1, 2)  # noqa: E731
    probs = ((heads_first(q) @ heads_first(k).transpose(-1, -2)) * 0.3).softmax(-1)
    reference = (probs * keep.transpose(0, 1) * scale @ heads_first(v)).transpose(1, 2)
    assert torch.allclose(out, reference, atol=1e-12)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(reference, (q, k, v), grad)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gelu_linear_gradcheck(groups):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.double, requires_grad=True)
    shape = (12, 8) if groups == 1 else (groups, 8 // groups, 12 // groups)
    w = torch.randn(shape, dtype=torch.double, requires_grad=True)
    b = torch.randn(12, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: kernels._GeluLinear.apply(x, w, b, groups), (x, w, b))


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_linear_blocks_match_definition_and_gradcheck(groups):
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6 * groups, dtype=torch.double, requires_grad=True)
    w = torch.randn(groups, 6, 4, dtype=torch.double, requires_grad=True)
    b = torch.randn(4 * groups, dtype=torch.double, requires_grad=True)
    # The definition: group g maps input columns [6g, 6g+6) to output columns [4g, 4g+4).
    reference = torch.cat([x[..., 6 * g : 6 * g + 6] @ w[g] for g in range(groups)], dim=-1) + b
    assert torch.allclose(kernels.grouped_linear(x, w, b, groups), reference, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(kernels.grouped_linear(x, w, b, groups), reference, atol=1e-12)
    x2d = x.detach().reshape(-1, 6 * groups).requires_grad_()
    assert torch.autograd.gradcheck(kernels._GroupedLinear.apply, (x2d, w, b))
    # Under autocast the batched-matmul formulation runs instead; it computes the same function.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels._autocast_on("cpu")
        low = kernels.grouped_linear(x.float(), w.float(), b.float(), groups)
    assert low.shape == reference.shape and (low.float() - reference).abs().max() < 0.1


def test_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = kernels.dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    assert abs(y.mean().item() - 1.0) < 0.005  # inverted dropout keeps the expectation
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert kernels.dropout(x, 0.1, training=False) is x


def test_keep_mask_is_a_byte_mask_with_the_realised_scale():
    torch.manual_seed(0)
    keep, scale = kernels._keep_mask(torch.Size([512, 1024]), 0.1, torch.device("cpu"))
    # uint8, not bool: float x uint8 products are vectorised on the CPU, float x bool ones are not
    assert keep.dtype == torch.uint8 and keep.shape == (512, 1024)
    assert set(keep.unique().tolist()) == {0, 1}
    assert abs(keep.float().mean().item() - 0.9) < 0.002
    threshold = round(0.1 * 65536)
    assert scale == 65536 / (65536 - threshold)  # 1 / the keep probability actually used, not 1 / 0.9


def test_dropout_next_to_one_drops_everything_without_dividing_by_zero():
    """A rate the config accepts (< 1) but within 1/131072 of 1 rounds to a keep probability of 0."""
    torch.manual_seed(0)
    x = torch.ones(64, 64, requires_grad=True)
    y = kernels.dropout(x, 0.999995, training=True)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=100, hidden_dropout_prob=0.999995,
                                                     attention_probs_dropout_prob=0.999995)).train()
    out = model(torch.randint(0, 100, (2, 8))).last_hidden_state
    assert torch.isfinite(out).all()


def test_keep_mask_bits_come_from_an_aten_op_under_a_dispatch_mode():
    # Outside a dispatch mode the bits come from numpy (seeded from torch's generator); the CUDA-graph stand-in
    # (RecordedOps) replays ATen ops, so there they must be drawn by one, or every replay would reuse one mask.
    from torch.utils._python_dispatch import TorchDispatchMode

    class RandomOps(TorchDispatchMode):
        drawn: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.random_ and out.numel() > 1:
                self.drawn.append(out.numel())
            return out

    with RandomOps() as mode:
        kernels._keep_mask(torch.Size([8, 64]), 0.1, torch.device("cpu"))
    assert mode.drawn == [8 * 64 // 4]  # four 16-bit lanes per 64-bit word
    torch.manual_seed(5)
    a = kernels._random_words(1000, torch.device("cpu"))
    torch.manual_seed(5)
    assert torch.equal(a, kernels._random_words(1000, torch.device("cpu")))
    assert not torch.equal(a, kernels._random_words(1000, torch.device("cpu")))


def test_dropout_is_seeded():
    x = torch.ones(64, 64, requires_grad=True)
    torch.manual_seed(3)
    a = kernels.dropout(x, 0.1, True)
    torch.manual_seed(3)
    b = kernels.dropout(x, 0.1, True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_seeded_training_forward_is_the_same_with_and_without_gradients(groups):
    """Dropout draws its masks from one source whether gradients are recorded or not (seeded Monte-Carlo dropout
    under no_grad gave other masks than the training forward, up to 1.3 apart)."""
    from convbert.model import ConvBertConfig, ConvBertModel

    model = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=100, num_groups=groups)).train()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    recorded = model(ids).last_hidden_state
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.manual_seed(5)
            assert torch.equal(model(ids).last_hidden_state, recorded.detach())
    torch.manual_seed(6)
    with torch.no_grad():
        assert not torch.equal(model(ids).last_hidden_state, recorded.detach())  # another seed, other masks


def test_bf16_autocast_training_step_runs_and_is_close_to_fp32():
    from convbert.model import ConvBertConfig, ConvBertModel

    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=100, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0)).train()
    ids = torch.randint(0, 100, (2, 16))
    reference = model(ids, torch.ones_like(ids)).last_hidden_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, torch.ones_like(ids)).last_hidden_state
    assert (out.float() - reference).abs().max() < 0.1
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def _graph_names(tensor: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("groups,padded", [(1, False), (2, True)])
def test_cpu_bf16_autocast_runs_the_lean_functions_more_precisely_than_plain_autocast(groups, padded, monkeypatch):
    """Under CPU bf16 autocast the layers run in bf16 on the lean functions (weights cast per use) around an fp32
    residual stream; their error against an fp64 reference is below plain autocast's, and the fp32 parameters
    get fp32 gradients."""
    import copy

    from convbert.model import ConvBertConfig, ConvBertModel

    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=100, num_groups=groups)).eval()
    ids = torch.randint(0, 100, (3, 24))
    mask = torch.ones_like(ids)
    if padded:
        mask[1:, 17:] = 0
    probe = torch.randn(3, 24, model.config.hidden_size, dtype=torch.float64)

    def run(m, autocast: bool):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(ids, mask).last_hidden_state
        (out.double() * probe).sum().backward()
        grads = torch.cat([p.grad.double().flatten() for p in m.parameters()])
        return out, grads

    reference, reference_grads = run(copy.deepcopy(model).double(), autocast=False)
    lean, lean_grads = run(model, autocast=True)
    assert lean.dtype == torch.float32  # the residual stream and the LayerNorms stay fp32
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    monkeypatch.setattr(kernels, "cpu_mixed_precision_dtype", lambda x: None)  # plain ops under autocast
    plain, plain_grads = run(model, autocast=True)

    def error(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert error(lean, reference) < 0.01 and error(lean_grads, reference_grads) < 0.01
    # The fp32 residual stream and LayerNorms make it more precise than plain CPU autocast (bf16 throughout).
    assert error(lean, reference) < 0.8 * error(plain, reference)
    assert error(lean_grads, reference_grads) < 0.8 * error(plain_grads, reference_grads)

    # In training the lean functions are in the graph (dropout-add, attention), and the step is finite.
    monkeypatch.undo()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mask).last_hidden_state
    names = _graph_names(out)
    assert {"_DropoutAddBackward", "_AttentionBackward", "_SpanKernelLogitsBackward"} <= names, names
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _padded_reference(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The definition: zero-pad the time axis by (K-1)/2 each side, then sum the K shifted slices."""
    K, T = taps.shape[-1], x.shape[1]
    pad = (K - 1) // 2
    padded = F.pad(x, (0, 0) * (x.dim() - 2) + (pad, pad))
    out = 0
    for k in range(K):
        out = out + padded[:, k : k + T] * taps[..., k]
    return out


@pytest.mark.parametrize("x_shape,taps_shape", [
    ((2, 7, 6), (6, 5)),  # depthwise: one K-tap filter per channel, shared over batch and time
    ((2, 7, 3, 4), (2, 7, 3, 1, 5)),  # span conv: one K-tap kernel per (batch, time, head), shared over d
    ((1, 3, 2), (2, 9)),  # kernel longer than the sequence
])
def test_same_conv_matches_definition_and_gradcheck(x_shape, taps_shape):
    torch.manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.double, requires_grad=True)
    taps = torch.randn(taps_shape, dtype=torch.double, requires_grad=True)
    assert torch.allclose(kernels.same_conv(x, taps), _padded_reference(x, taps), atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(kernels.same_conv(x, taps), _padded_reference(x, taps), atol=1e-12)
    assert torch.autograd.gradcheck(kernels._SameConv.apply, (x, taps))


def test_span_kernel_logits_matches_module_chain_and_gradcheck():
    torch.manual_seed(0)
    B, T, H, A, N, K = 2, 6, 8, 4, 2, 3
    double = dict(dtype=torch.double, requires_grad=True)
    x, query = torch.randn(B, T, H, **double), torch.randn(B, T, A, **double)
    taps, pw, pb = torch.randn(H, K, **double), torch.randn(A, H, **double), torch.randn(A, **double)
    kw, kb = torch.randn(N * K, A, **double), torch.randn(N * K, **double)
    args = (x, taps, pw, pb, query, kw, kb)
    depthwise = F.conv1d(x.transpose(1, 2), taps.unsqueeze(1), padding=(K - 1) // 2, groups=H).transpose(1, 2)
    reference = F.linear(F.linear(depthwise, pw, pb) * query, kw, kb)
    assert torch.allclose(kernels.span_kernel_logits(*args), reference, atol=1e-12)
    assert torch.autograd.gradcheck(kernels._SpanKernelLogits.apply, args)


def test_layer_norm_saving_output_matches_layer_norm_and_gradcheck():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(6, eps=1e-12).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(3, 4, 6, dtype=torch.double, requires_grad=True)
    grad = torch.randn(3, 4, 6, dtype=torch.double)
    ours = torch.autograd.grad(kernels.layer_norm(x, norm), (x, norm.weight, norm.bias), grad)
    theirs = torch.autograd.grad(norm(x), (x, norm.weight, norm.bias), grad)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-10)
    fn = lambda x, w, b: kernels._LayerNorm.apply(x, w, b, 1e-12)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, norm.weight, norm.bias))
    # A zero in the scale makes the output non-invertible: the plain LayerNorm runs instead.
    with torch.no_grad():
        norm.weight[2] = 0.0
    out = kernels.layer_norm(x, norm)
    assert out.grad_fn is not None and "NativeLayerNorm" in type(out.grad_fn).__name__


def test_layer_norm_with_a_tiny_scale_and_a_large_shift_keeps_fp32_gradients_accurate():
    """x̂ = (y - b) / w amplifies y's rounding by |b| / |w|: such a norm must run the plain LayerNorm."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(8, 16, 64, requires_grad=True)
    grad = torch.randn(8, 16, 64)
    assert "_LayerNorm" in type(kernels.layer_norm(x, norm).grad_fn).__name__  # ordinary norms: output saved
    with torch.no_grad():
        norm.weight[:8] = 1e-3
        norm.bias[:8] = 2.0
    reference = copy.deepcopy(norm).double()
    x64 = x.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference(x64), (x64, reference.weight), grad.double())
    out = kernels.layer_norm(x, norm)
    assert "NativeLayerNorm" in type(out.grad_fn).__name__
    for got, want in zip(torch.autograd.grad(out, (x, norm.weight), grad), expected):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-6


def test_dropout_add_equals_residual_plus_dropout():
    x = torch.randn(4, 8, 16, requires_grad=True)
    r = torch.randn(4, 8, 16, requires_grad=True)
    torch.manual_seed(7)
    fused = kernels.dropout_add(x, r, 0.25, training=True)
    torch.manual_seed(7)
    separate = kernels.dropout(x, 0.25, training=True) + r
    assert torch.allclose(fused, separate, atol=1e-6)
    grad = torch.randn_like(fused)
    for a, b in zip(torch.autograd.grad(fused, (x, r), grad), torch.autograd.grad(separate, (x, r), grad)):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(kernels.dropout_add(x, r, 0.25, training=False), x + r)


def test_short_softmax_matches_softmax_and_gradcheck():
    torch.manual_seed(0)
    x = (5 * torch.randn(3, 4, 2, 9, dtype=torch.double)).requires_grad_()
    assert torch.allclose(kernels.short_softmax(x), x.softmax(-1), atol=1e-14)
    with torch.no_grad():
        assert torch.allclose(kernels.short_softmax(x), x.softmax(-1), atol=1e-14)
    assert torch.autograd.gradcheck(kernels._ShortSoftmax.apply, (x,))
    big = torch.tensor([[1000.0, 0.0, -1000.0]])  # the max is subtracted first: no overflow
    assert torch.allclose(kernels.short_softmax(big), big.softmax(-1))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(mask_conv_padding=True),
    dict(attention_type="plain"),
    dict(num_groups=1),
])
def test_lean_cpu_path_gradients_equal_the_plain_ops(monkeypatch, overrides):
    """The whole model with the hand-written CPU functions vs the same model on plain PyTorch ops."""
    from convbert.model import ConvBertConfig, ConvBertModel

    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("tiny", vocab_size=100, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, **overrides)
    model = ConvBertModel(config).train()
    ids = torch.randint(0, 100, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    target = torch.randn(3, 20, config.hidden_size)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(ids, mask).last_hidden_state
        (out * target).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lean_out, lean = grads()
    monkeypatch.setattr(kernels, "_lean_path", lambda x: False)
    plain_out, plain = grads()
    assert torch.allclose(lean_out, plain_out, atol=1e-5)
    for name in plain:
        scale = plain[name].abs().max().item()
        assert (lean[name] - plain[name]).abs().max().item() <= 1e-4 * scale + 1e-6, name


def test_grouped_feed_forward_gradcheck_and_definition():
    torch.manual_seed(0)
    double = dict(dtype=torch.double, requires_grad=True)
    h = torch.randn(2, 3, 8, **double)
    w1, b1 = torch.randn(2, 4, 6, **double), torch.randn(12, **double)
    w2, b2 = torch.randn(2, 6, 4, **double), torch.randn(8, **double)
    reference = kernels.grouped_linear(F.gelu(kernels.grouped_linear(h, w1, b1, 2)), w2, b2, 2)
    assert torch.allclose(kernels.grouped_feed_forward(h, w1, b1, w2, b2, 2), reference, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(kernels.grouped_feed_forward(h, w1, b1, w2, b2, 2), reference, atol=1e-12)
    assert torch.autograd.gradcheck(kernels._GroupedFeedForward.apply, (h, w1, b1, w2, b2))


def test_cpu_bf16_with_gradient_checkpointing_gives_the_same_gradients():
    from convbert.model import ConvBertConfig, ConvBertModel

    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=100, num_groups=2)).train()
    ids = torch.randint(0, 100, (2, 16))

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.config.gradient_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(5)  # the same dropout masks (checkpointing replays the RNG in its recomputation)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, torch.ones_like(ids)).last_hidden_state
        out.float().pow(3).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, recomputed = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))
    assert any(g.abs().sum() > 0 for g in plain)


def test_the_default_gemm_library_follows_the_cpu_vendor():
    """MKL (BLAS) measured faster on Intel, oneDNN on AMD (benchmarks/gemm_backends.py); BLAS without oneDNN."""
    assert kernels.default_cpu_gemm("GenuineIntel", True) == "blas"
    assert kernels.default_cpu_gemm("AuthenticAMD", True) == "onednn"
    assert kernels.default_cpu_gemm("AuthenticAMD", False) == "blas" == kernels.default_cpu_gemm("", False)
    if not os.environ.get("CONVBERT_CPU_GEMM"):
        assert kernels.cpu_gemm() == kernels.default_cpu_gemm(kernels.cpu_vendor(),
                                                               kernels._ONEDNN_LINEAR is not None)


def test_set_cpu_gemm_names_the_choices():
    with pytest.raises(ValueError, match="onednn.*blas.*'cublas'"):
        kernels.set_cpu_gemm("cublas")
    before = kernels.cpu_gemm()
    try:
        kernels.set_cpu_gemm("blas")
        assert kernels.cpu_gemm() == "blas"
    finally:
        kernels.set_cpu_gemm(before)


@pytest.fixture
def onednn_everywhere(monkeypatch):
    """Every fp32 CPU product on oneDNN however small (the default threshold would keep test shapes on BLAS);
    yields the epilogue of each oneDNN call, so a test can tell that path really ran."""
    if kernels._ONEDNN_LINEAR is None:
        pytest.skip("this PyTorch build has no oneDNN linear")
    real, epilogues = kernels._ONEDNN_LINEAR, []

    def counted(x, weight, bias, attr, scalars, algorithm):
        epilogues.append(attr)
        return real(x, weight, bias, attr, scalars, algorithm)

    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", counted)
    monkeypatch.setattr(kernels, "_ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(kernels, "_ONEDNN_MIN_WIDTH", 0)
    monkeypatch.setattr(kernels, "_cpu_gemm", "onednn")
    monkeypatch.setattr(kernels, "onednn_gelu_epilogue", True)  # the AVX-512 default, whatever this CPU is
    monkeypatch.setattr(kernels, "onednn_weight_gradients", True)  # the Zen 5 default, whatever this CPU is
    return epilogues


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("into_columns", [False, True])
def test_mm_nt_on_onednn_and_blas_matches_the_definition(onednn_everywhere, monkeypatch, gelu, into_columns):
    torch.manual_seed(0)
    x = torch.randn(40, 24)[:, 4:20]  # a strided column block, as the grouped FFN passes
    weight, bias = torch.randn(12, 16).t().contiguous().t(), torch.randn(12)  # a transposed view, as backward passes
    reference = F.linear(x.double(), weight.double(), bias.double())
    reference = F.gelu(reference) if gelu else reference
    for gemm in ("onednn", "blas"):
        monkeypatch.setattr(kernels, "_cpu_gemm", gemm)
        target = torch.full((40, 30), 7.0)
        out = target[:, 6:18] if into_columns else None
        result = kernels._mm_nt(x, weight, bias, out=out, gelu=gelu)
        assert torch.allclose(result.double(), reference, atol=1e-5), gemm
        if into_columns:
            assert torch.equal(target[:, 6:18], result) and (target[:, :6] == 7).all() and (target[:, 18:] == 7).all()
    assert onednn_everywhere.count("gelu" if gelu else "none") == 1


def test_mm_nt_gives_onednn_only_dense_weights(onednn_everywhere):
    """A column block as oneDNN's weight ran ~1000x slower than a dense one (7 s for a medium-small product on a
    Zen 5): such a product runs on BLAS, with the same result."""
    torch.manual_seed(0)
    x = torch.randn(40, 16)
    for weight, on_onednn in ((torch.randn(12, 24)[:, 4:20], False), (torch.randn(16, 12).t(), True),
                              (torch.randn(12, 16), True)):
        onednn_everywhere.clear()
        result = kernels._mm_nt(x, weight)
        assert torch.allclose(result.double(), x.double() @ weight.double().t(), atol=1e-5)
        assert len(onednn_everywhere) == int(on_onednn)


def test_onednn_gelu_without_the_epilogue_is_an_in_place_gelu_after_the_product(onednn_everywhere, monkeypatch):
    """Where the epilogue is the slower (AVX2 CPUs), oneDNN runs the plain product and the GELU follows in place:
    the same result, written into `out` when one is given."""
    assert kernels.default_onednn_gelu_epilogue("AVX512") and kernels.default_onednn_gelu_epilogue("avx512_bf16")
    assert not kernels.default_onednn_gelu_epilogue("AVX2") and not kernels.default_onednn_gelu_epilogue("")
    torch.manual_seed(0)
    x, weight, bias = torch.randn(40, 24)[:, 4:20], torch.randn(12, 16), torch.randn(12)
    reference = F.gelu(F.linear(x.double(), weight.double(), bias.double()))
    monkeypatch.setattr(kernels, "onednn_gelu_epilogue", False)
    target = torch.zeros(40, 30)
    for out in (None, target[:, 6:18]):
        result = kernels._mm_nt(x, weight, bias, out=out, gelu=True)
        assert torch.allclose(result.double(), reference, atol=1e-5)
    assert torch.equal(target[:, 6:18], result)
    assert onednn_everywhere == ["none", "none"]  # both ran on oneDNN, neither with the epilogue


def test_weight_gradients_on_onednn_only_on_amd_zen_5_and_later():
    """MKL measured the faster for X^T dY on the Zen 3, Zen 4 and the Intel; oneDNN on the Zen 5 (family 26)."""
    assert kernels.default_onednn_weight_gradients("AuthenticAMD", "26")
    assert kernels.default_onednn_weight_gradients("AuthenticAMD", "27")
    assert not kernels.default_onednn_weight_gradients("AuthenticAMD", "25")  # Zen 3, Zen 4
    assert not kernels.default_onednn_weight_gradients("GenuineIntel", "6")
    assert not kernels.default_onednn_weight_gradients("AuthenticAMD", "")
    assert not kernels.default_onednn_weight_gradients("", "unknown")
    assert kernels.cpu_kernel_choices()["onednn_weight_gradients"] == kernels.onednn_weight_gradients


@pytest.mark.parametrize("groups", [1, 2])
def test_weight_gradients_on_onednn_give_the_blas_gradients(onednn_everywhere, monkeypatch, groups):
    """A training step with the weight gradients on oneDNN and on BLAS (everything else on oneDNN both times): the
    same gradients, and the oneDNN run really made one more call per weight gradient."""
    from convbert.model import ConvBertConfig, ConvBertModel

    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("tiny", vocab_size=100, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, num_groups=groups)
    model = ConvBertModel(config).train()
    ids = torch.randint(0, 100, (3, 20))
    target = torch.randn(3, 20, config.hidden_size)

    def run(on_onednn: bool):
        monkeypatch.setattr(kernels, "onednn_weight_gradients", on_onednn)
        onednn_everywhere.clear()
        model.zero_grad(set_to_none=True)
        (model(ids).last_hidden_state * target).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(onednn_everywhere)

    onednn_grads, onednn_calls = run(True)
    blas_grads, blas_calls = run(False)
    # per layer: the fused projection, the attention output, the span-kernel generator's two (pointwise conv, kernel
    # logits: at these test sizes nothing counts as narrow) and the FFN's two products, each per group
    assert onednn_calls - blas_calls == config.num_hidden_layers * (4 + 2 * groups)
    for name, grad in blas_grads.items():
        assert (onednn_grads[name] - grad).abs().max().item() <= 1e-4 * grad.abs().max().item() + 1e-6, name


@pytest.mark.parametrize("layout, onednn_calls", [("x block, g whole", 1), ("x whole, g block", 1),
                                                   ("both blocks", 0), ("both whole", 1)])
def test_mm_weight_gradient_matches_the_definition_on_both_libraries(onednn_everywhere, monkeypatch, layout,
                                                                      onednn_calls):
    """Operands as the grouped products pass them (column blocks), into a given block or not. oneDNN gets a dense
    operand as its weight (a column block there ran ~1000x slower), so with two column blocks the product stays on
    BLAS."""
    torch.manual_seed(0)
    x_block, g_block = layout.startswith("x block") or layout == "both blocks", layout.endswith("g block") or \
        layout == "both blocks"
    x = torch.randn(50, 24)[:, 4:20] if x_block else torch.randn(50, 16)  # [M, 16]
    g = torch.randn(50, 30)[:, 6:18] if g_block else torch.randn(50, 12)  # [M, 12]
    reference = x.double().t() @ g.double()
    for flag in (True, False):
        monkeypatch.setattr(kernels, "onednn_weight_gradients", flag)
        onednn_everywhere.clear()
        target = torch.full((3, 16, 12), 7.0)
        result = kernels._mm_weight_gradient(x.t(), g, out=target[1])
        assert torch.allclose(result.double(), reference, atol=1e-5) and torch.equal(target[1], result)
        assert (target[0] == 7).all() and (target[2] == 7).all()
        fresh = kernels._mm_weight_gradient(x.t(), g)
        assert fresh.is_contiguous() and torch.allclose(fresh.double(), reference, atol=1e-5)
        assert len(onednn_everywhere) == 2 * onednn_calls * flag


@pytest.mark.parametrize("source", ["matrix", "column block", "contiguous"])
def test_onednn_input_is_the_view_copied_in_blocks(monkeypatch, source):
    """The blocked copy of a weight gradient's transposed operand: the view's values exactly, in a contiguous
    tensor, including a last block shorter than the others; the view itself when already contiguous or when
    `blocked_transposes` is off (oneDNN then copies it)."""
    monkeypatch.setattr(kernels, "_TRANSPOSE_BLOCK", 7)  # 50 tokens: blocks of 7, the last one of 1
    torch.manual_seed(0)
    view = {"matrix": torch.randn(50, 12).t(), "column block": torch.randn(50, 30)[:, 6:18].t(),
            "contiguous": torch.randn(12, 50)}[source]
    copy = kernels._onednn_input(view)
    assert copy.is_contiguous() and torch.equal(copy, view)
    assert (copy is view) == (source == "contiguous")
    monkeypatch.setattr(kernels, "blocked_transposes", False)
    assert kernels._onednn_input(view) is view
    assert kernels.cpu_kernel_choices()["blocked_transposes"] is False


def test_weight_gradients_give_onednn_contiguous_inputs(onednn_everywhere, monkeypatch):
    """With `blocked_transposes`, oneDNN's input is already contiguous (its own transposing copy is the slower);
    the product is the same either way."""
    real, inputs = kernels._ONEDNN_LINEAR, []

    def recording(x, *args):
        inputs.append(x.is_contiguous())
        return real(x, *args)

    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", recording)
    torch.manual_seed(0)
    x, g = torch.randn(50, 24)[:, 4:20], torch.randn(50, 12)
    results = {}
    for blocked in (True, False):
        monkeypatch.setattr(kernels, "blocked_transposes", blocked)
        inputs.clear()
        results[blocked] = kernels._mm_weight_gradient(x.t(), g)
        assert inputs == [blocked]
    assert torch.equal(results[True], results[False])
    assert torch.allclose(results[True].double(), x.double().t() @ g.double(), atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_onednn_products_give_the_blas_model(onednn_everywhere, monkeypatch, groups):
    """The whole model, trained one step and run for inference, with its products on oneDNN and on BLAS."""
    from convbert.model import ConvBertConfig, ConvBertModel

    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("tiny", vocab_size=100, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, num_groups=groups)
    model = ConvBertModel(config)
    ids = torch.randint(0, 100, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    target = torch.randn(3, 20, config.hidden_size)

    def run(gemm: str):
        monkeypatch.setattr(kernels, "_cpu_gemm", gemm)
        model.train().zero_grad(set_to_none=True)
        out = model(ids, mask).last_hidden_state
        (out * target).sum().backward()
        with torch.no_grad():
            inference = model.eval()(ids, mask).last_hidden_state
        return out.detach(), inference, {n: p.grad.clone() for n, p in model.named_parameters()}

    onednn_out, onednn_inference, onednn_grads = run("onednn")
    assert {"none", "gelu"} <= set(onednn_everywhere)  # training products, and the inference FFN's fused GELU
    blas_out, blas_inference, blas_grads = run("blas")
    assert torch.allclose(onednn_out, blas_out, atol=1e-5)
    assert torch.allclose(onednn_inference, blas_inference, atol=1e-5)
    assert torch.allclose(onednn_inference, onednn_out, atol=1e-5)  # the fused-GELU path computes the same FFN
    for name, grad in blas_grads.items():
        assert (onednn_grads[name] - grad).abs().max().item() <= 1e-4 * grad.abs().max().item() + 1e-6, name


def test_grouped_ffn_backward_on_onednn_copies_no_product_into_the_gelu_buffers(onednn_everywhere, monkeypatch):
    """On BLAS the input gradient is written into the spent GELU buffers; oneDNN returns a result of its own, so
    there it is taken as it is: no [M, 4H/G] copy in the backward, and the same gradients as on BLAS."""
    from torch.profiler import profile

    torch.manual_seed(0)
    h = torch.randn(4, 8, 16, requires_grad=True)
    w1, b1 = torch.randn(2, 8, 24, requires_grad=True), torch.randn(48, requires_grad=True)
    w2, b2 = torch.randn(2, 24, 8, requires_grad=True), torch.randn(16, requires_grad=True)
    grad = torch.randn(4, 8, 16)

    def grads(gemm: str):
        monkeypatch.setattr(kernels, "_cpu_gemm", gemm)
        out = kernels._GroupedFeedForward.apply(h, w1, b1, w2, b2)
        with profile(record_shapes=True) as prof:
            result = torch.autograd.grad(out, (h, w1, b1, w2, b2), grad)
        inner_copies = [e for e in prof.events() if e.name == "aten::copy_" and e.input_shapes[:1] == [[32, 24]]]
        return result, len(inner_copies)

    onednn_grads, onednn_copies = grads("onednn")
    blas_grads, _ = grads("blas")
    assert onednn_copies == 0
    for a, b in zip(onednn_grads, blas_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ungrouped_feed_forward_without_grad_matches_the_definition():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 8, dtype=torch.double)
    w1, b1 = torch.randn(12, 8, dtype=torch.double), torch.randn(12, dtype=torch.double)
    w2, b2 = torch.randn(8, 12, dtype=torch.double), torch.randn(8, dtype=torch.double)
    reference = F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
    with torch.no_grad():
        assert torch.allclose(kernels.grouped_feed_forward(h, w1, b1, w2, b2, 1), reference, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_feed_forward_trains_its_second_linear_when_the_rest_is_frozen(onednn_everywhere, groups):
    """Only the output linear trainable (a partly frozen fine-tune): it still gets its exact gradient."""
    torch.manual_seed(0)
    h = torch.randn(2, 3, 8)
    if groups == 1:
        w1, w2 = torch.randn(12, 8), torch.randn(8, 12).requires_grad_()
    else:
        w1, w2 = torch.randn(2, 4, 6), torch.randn(2, 6, 4).requires_grad_()
    b1, b2 = torch.randn(12), torch.randn(8).requires_grad_()
    grad = torch.randn(2, 3, 8)
    ours = torch.autograd.grad(kernels.grouped_feed_forward(h, w1, b1, w2, b2, groups), (w2, b2), grad)
    activated = F.gelu(kernels.grouped_linear(h.double(), w1.double(), b1.double(), groups))
    w2d, b2d = w2.detach().double().requires_grad_(), b2.detach().double().requires_grad_()
    reference = torch.autograd.grad(kernels.grouped_linear(activated, w2d, b2d, groups), (w2d, b2d), grad.double())
    for a, b in zip(ours, reference):
        assert torch.allclose(a.double(), b, atol=1e-4)


def test_without_onednn_the_products_fall_back_to_blas(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert kernels._find_onednn_linear() is None
    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", None)
    with pytest.raises(RuntimeError, match="no oneDNN linear"):
        kernels.set_cpu_gemm("onednn")


def test_contiguous_gradient_identity():
    """The identity used after CUDA attention: same values forward, a contiguous gradient backward."""
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    y = kernels._ContiguousGradient.apply(x)
    assert torch.equal(y, x)
    seen = {}
    x.register_hook(lambda g: seen.update(contiguous=g.is_contiguous()))
    upstream = torch.randn(2, 5, 6, 4)
    torch.cat([y, torch.zeros(2, 5, 3, 4)], dim=2).backward(upstream)  # y's gradient: a strided slice
    assert seen["contiguous"] and torch.equal(x.grad, upstream[:, :, :3])


@pytest.mark.parametrize("length,kernel_size", [(128, 9), (17, 9), (3, 9), (16, 3), (40, 17), (21, 7)])
def test_the_banded_span_conv_matches_the_shift_and_add(monkeypatch, length, kernel_size):
    """`cpu_span_conv_banded`: the span conv as banded block products gives the shift-and-add's output and both
    gradients, for lengths that are not a multiple of the block (zero rows at the end), kernels longer than the
    sequence, and the widest kernel whose block overlaps stay apart (K - 1 = 16 rows)."""
    torch.manual_seed(0)
    x = torch.randn(2, length, 3, 5, dtype=torch.float64)
    taps = torch.randn(2, length, 3, 1, kernel_size, dtype=torch.float64)
    grad = torch.randn(2, length, 3, 5, dtype=torch.float64)
    assert kernels._banded_span_conv(x, taps)
    banded = kernels._same_conv_forward(x, taps), *kernels._same_conv_backward(grad, x, taps, True, True)
    monkeypatch.setattr(kernels, "cpu_span_conv_banded", False)
    assert not kernels._banded_span_conv(x, taps)
    shift_and_add = kernels._same_conv_forward(x, taps), *kernels._same_conv_backward(grad, x, taps, True, True)
    for a, b in zip(banded, shift_and_add):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    monkeypatch.setattr(kernels, "cpu_span_conv_banded", True)
    assert kernels._same_conv_backward(grad, x, taps, False, True)[0] is None
    assert kernels._same_conv_backward(grad, x, taps, True, False)[1] is None
    x32, taps32 = x.float(), taps.float()
    torch.testing.assert_close(kernels._same_conv_forward(x32, taps32), shift_and_add[0].float(), atol=1e-5, rtol=1e-5)
    # wider kernels (their block overlaps would overlap each other) and other layouts keep the shift-and-add
    assert not kernels._banded_span_conv(torch.randn(2, 40, 3, 5), torch.randn(2, 40, 3, 1, 19))
    assert not kernels._banded_span_conv(torch.randn(2, 40, 3, 5), torch.randn(2, 40, 3, 5, 9))
    assert not kernels._banded_span_conv(torch.randn(2, 40, 3, 5).bfloat16(), torch.randn(2, 40, 3, 1, 9).bfloat16())


def test_depthwise_conv1d_matches_the_shift_and_add():
    """The GPU's depthwise conv (one grouped conv1d) against the shift-and-add, forward and both gradients."""
    torch.manual_seed(0)
    for length, channels, k in [(17, 6, 9), (5, 3, 7), (3, 4, 9)]:  # incl. a kernel longer than the sequence
        x = torch.randn(2, length, channels, dtype=torch.float64, requires_grad=True)
        taps = torch.randn(channels, k, dtype=torch.float64, requires_grad=True)
        ours = kernels._depthwise_conv1d(x, taps)
        ref = kernels._SameConv.apply(x, taps)
        assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-12)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(ours, (x, taps), g), torch.autograd.grad(ref, (x, taps), g)):
            assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_inference_folds_the_residual_into_the_last_product(monkeypatch, groups):
    """`fold_residual_in_inference`: on BLAS, without grad, a sub-layer's last product accumulates onto residual +
    bias; the result equals product + bias + residual (and the FFN's), and the fold is used only there."""
    monkeypatch.setattr(kernels, "_cpu_gemm", "blas")
    torch.manual_seed(0)
    x, residual = torch.randn(3, 7, 8), torch.randn(3, 7, 6)
    weight, bias = torch.randn(6, 8), torch.randn(6)
    h = torch.randn(3, 7, 8)
    if groups == 1:
        w1, b1, w2, b2 = torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    else:
        w1, b1, w2, b2 = torch.randn(2, 4, 8), torch.randn(16), torch.randn(2, 8, 4), torch.randn(8)
    with torch.no_grad():
        assert kernels._folds_residual(x, residual, 0.1, False, weight, bias)
        folded = kernels.linear_dropout_add(x, weight, bias, residual, 0.1, False)
        torch.testing.assert_close(folded, residual + F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
        folded_ffn = kernels.feed_forward_dropout_add(h, w1, b1, w2, b2, groups, h, 0.1, False)
        monkeypatch.setattr(kernels, "fold_residual_in_inference", False)
        plain_ffn = kernels.grouped_feed_forward(h, w1, b1, w2, b2, groups) + h
        torch.testing.assert_close(folded_ffn, plain_ffn, atol=1e-5, rtol=1e-5)
        assert not kernels._folds_residual(x, residual, 0.1, False, weight, bias)
        monkeypatch.setattr(kernels, "fold_residual_in_inference", True)
        assert not kernels._folds_residual(x, residual, 0.1, True, weight, bias)  # dropout active
        assert not kernels._folds_residual(x, residual.double(), 0.1, False, weight, bias)  # mixed dtypes
    assert not kernels._folds_residual(x, residual, 0.1, False, weight.requires_grad_(), bias)  # training
    monkeypatch.setattr(kernels, "_cpu_gemm", "onednn")
    assert not kernels._folds_residual(x.detach(), residual, 0.0, False, weight.detach(), bias)


def test_the_model_in_inference_with_and_without_the_residual_fold(monkeypatch):
    from convbert import ConvBertConfig, ConvBertModel

    monkeypatch.setattr(kernels, "_cpu_gemm", "blas")
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", num_groups=2)).eval()
    ids = torch.randint(5, 500, (2, 12))
    folds, decide = [], kernels._folds_residual
    monkeypatch.setattr(kernels, "_folds_residual", lambda *a: folds.append(decide(*a)) or folds[-1])
    outputs = []
    for flag in (True, False):
        monkeypatch.setattr(kernels, "fold_residual_in_inference", flag)
        with torch.inference_mode():
            outputs.append(model(ids).last_hidden_state)
    layers = model.config.num_hidden_layers
    assert folds == [True] * (2 * layers) + [False] * (2 * layers)  # both sub-layers of every layer, then none
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_model_with_the_gpu_depthwise_conv_matches(monkeypatch):
    """The model on the GPU's ops, with and without the conv1d depthwise branch (on the CPU): same outputs and
    gradients."""
    from convbert.model import ConvBertConfig, ConvBertModel

    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=100, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0)).double()
    ids = torch.randint(0, 100, (2, 24))
    direction = torch.randn(2, 24, model.config.hidden_size, dtype=torch.float64)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids).last_hidden_state
        (out * direction).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    monkeypatch.setattr(kernels, "_lean_path", lambda x: False)  # the ops a GPU runs
    out, grads = run()
    calls = []
    monkeypatch.setattr(kernels, "_gpu_path", lambda x: calls.append(1) or True)
    out_conv1d, grads_conv1d = run()
    assert len(calls) == 2 * model.config.num_hidden_layers  # each layer's depthwise conv and attention
    assert torch.allclose(out, out_conv1d, atol=1e-10)
    for name in grads:
        assert torch.allclose(grads[name], grads_conv1d[name], atol=1e-9), name


def test_the_cpu_depthwise_conv_through_onednn_matches_the_shift_and_add(monkeypatch):
    """`cpu_depthwise_conv2d`: the depthwise conv's forward and backward as oneDNN's conv2d on a channels-last view
    give the shift-and-add's results (rounding order only) as a contiguous [B, T, C] and a [C, K], and the model's outputs and gradients
    stay within 1e-5 of the shift-and-add model's; per-position (span) taps never take it."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    torch.manual_seed(0)
    x, taps = torch.randn(3, 17, 24), torch.randn(24, 7)
    via_onednn = kernels._same_conv_forward(x, taps)
    monkeypatch.setattr(kernels, "cpu_depthwise_conv2d", False)
    shift_and_add = kernels._same_conv_forward(x, taps)
    assert via_onednn.is_contiguous() and via_onednn.shape == x.shape
    torch.testing.assert_close(via_onednn, shift_and_add, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(x)
    shift_and_add_grads = kernels._same_conv_backward(grad, x, taps, True, True)
    monkeypatch.setattr(kernels, "cpu_depthwise_conv2d", True)
    via_onednn_grads = kernels._same_conv_backward(grad, x, taps, True, True)
    assert via_onednn_grads[0].is_contiguous() and via_onednn_grads[1].shape == taps.shape
    for a, b in zip(via_onednn_grads, shift_and_add_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    grad_x_only, no_taps = kernels._same_conv_backward(grad, x, taps, True, False)
    assert no_taps is None and torch.equal(grad_x_only, via_onednn_grads[0])
    no_x, grad_taps_only = kernels._same_conv_backward(grad, x, taps, False, True)
    assert no_x is None and torch.equal(grad_taps_only, via_onednn_grads[1])
    called = []
    monkeypatch.setattr(kernels, "_depthwise_conv2d", lambda *a: called.append(1) or shift_and_add)
    kernels._same_conv_forward(torch.randn(2, 9, 3, 4), torch.randn(2, 9, 3, 1, 5))  # span taps
    assert called == []

    from convbert import ConvBertConfig, ConvBertModel

    monkeypatch.undo()
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0)).train()
    ids = torch.randint(5, 500, (2, 12))
    results = []
    for flag in (True, False):
        monkeypatch.setattr(kernels, "cpu_depthwise_conv2d", flag)
        model.zero_grad()
        out = model(ids).last_hidden_state
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
