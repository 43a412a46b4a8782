"""Numerical parity with transformers.ConvBertModel (random weights, every hidden state, padding included)."""

import pytest
import torch

from convbert.model import ConvBertConfig, ConvBertModel

TOL = 1e-5


def _inputs(vocab_size: int, batch: int = 3, length: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 30:] = 0  # padded rows: the conv branch still reads them (faithful mode)
    mask[2, 7:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    return ids, mask, types


def _hf_twin(transformers, ours: ConvBertModel):
    c = ours.config
    hf_config = transformers.ConvBertConfig(**{k: v for k, v in c.to_hf_dict().items()
                                               if k not in ("model_type", "architectures", "convbert_extra")})
    hf = transformers.ConvBertModel(hf_config).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all("position_ids" in k or "token_type_ids" in k for k in missing), missing
    return hf


def _compare(transformers, config: ConvBertConfig, length: int = 48):
    torch.manual_seed(0)
    ours = ConvBertModel(config).eval()
    hf = _hf_twin(transformers, ours)
    ids, mask, types = _inputs(config.vocab_size, length=length)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    assert len(a.hidden_states) == config.num_hidden_layers + 1 == len(b.hidden_states)
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        diff = (x - y).abs().max().item()
        assert diff <= TOL, f"hidden state {i}: max |diff| {diff:.2e}"
    assert torch.equal(a.last_hidden_state, a.hidden_states[-1])


@pytest.mark.parametrize("size", ["small", "medium-small", "base"])
def test_parity_presets(transformers_module, size):
    _compare(transformers_module, ConvBertConfig.from_preset(size))


@pytest.mark.parametrize("overrides", [
    dict(conv_kernel_size=7, num_hidden_layers=3),
    dict(hidden_size=512, num_attention_heads=8, intermediate_size=2048, num_groups=2, num_hidden_layers=3),
    dict(hidden_size=128, num_attention_heads=2, intermediate_size=512, embedding_size=128, num_hidden_layers=3,
         conv_kernel_size=5, num_groups=4),
    dict(num_hidden_layers=3, embedding_size=96, vocab_size=1000),
])
def test_parity_off_preset(transformers_module, overrides):
    _compare(transformers_module, ConvBertConfig.from_preset("small", **overrides))


def test_export_then_hf_load_gives_same_outputs(transformers_module, tmp_path):
    torch.manual_seed(1)
    ours = ConvBertModel(ConvBertConfig.from_preset("medium-small", num_hidden_layers=2)).eval()
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers_module.ConvBertModel.from_pretrained(tmp_path).eval()
    ids, mask, types = _inputs(30522)
    with torch.no_grad():
        a = ours(ids, mask, types).last_hidden_state
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert (a - b).abs().max().item() <= TOL


def test_hf_saved_checkpoint_loads_here(transformers_module, tmp_path):
    """A folder written by transformers itself (ConvBertForMaskedLM: `convbert.` prefix, head keys) loads."""
    hf_config = transformers_module.ConvBertConfig(
        hidden_size=128, num_attention_heads=4, intermediate_size=256, num_hidden_layers=2, embedding_size=64,
        num_groups=2, vocab_size=500, pad_token_id=0)
    torch.manual_seed(2)
    hf = transformers_module.ConvBertForMaskedLM(hf_config).eval()
    hf.save_pretrained(tmp_path)
    ours = ConvBertModel.from_pretrained(tmp_path)
    ids, mask, types = _inputs(500)
    with torch.no_grad():
        a = ours(ids, mask, types).last_hidden_state
        b = hf.convbert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("preset,overrides", [
    ("medium-small", dict(num_hidden_layers=2)),  # grouped FFN (G = 2)
    ("small", dict(num_hidden_layers=2)),  # plain FFN, single-head-size conv branch
])
def test_gradient_parity_in_training_mode(transformers_module, preset, overrides):
    """Every parameter's gradient equals HF's: checks the hand-written CPU backward passes (dropout off)."""
    config = ConvBertConfig.from_preset(preset, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                        **overrides)
    torch.manual_seed(0)
    ours = ConvBertModel(config).train()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so the output-based LayerNorm backward is exercised
        for name, p in ours.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf = _hf_twin(transformers_module, ours).train()
    ids, mask, types = _inputs(config.vocab_size)
    target = torch.randn(ids.shape + (config.hidden_size,), generator=torch.Generator().manual_seed(1))
    ours_out = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    hf_out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    (ours_out * target).sum().backward()
    (hf_out * target).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref, grad = hf_params[name].grad, p.grad
        if name == "embeddings.word_embeddings.weight":  # HF freezes the [PAD] row (padding_idx=0); TF and we don't
            assert ref[0].abs().max() == 0 and grad[0].abs().max() > 0
            ref, grad = ref[1:], grad[1:]
        scale = ref.abs().max().item() + 1e-12
        diff = (grad - ref).abs().max().item()
        assert diff <= 1e-4 * scale + 1e-6, f"{name}: max |grad diff| {diff:.2e} (scale {scale:.2e})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_cast_to_another_dtype_runs_under_cpu_bf16_autocast_as_transformers_does(transformers_module, dtype):
    """Our own bf16 path (fp32 residual stream and norms) is for fp32 models; a model cast with .double() or
    .bfloat16() is left to autocast, like transformers' (it used to fail with a mixed-dtype LayerNorm)."""
    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("small", num_hidden_layers=2)
    ours = ConvBertModel(config).eval()
    hf = _hf_twin(transformers_module, ours).to(dtype)
    ours = ours.to(dtype)
    ids, mask, types = _inputs(config.vocab_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert a.dtype == b.dtype == dtype
    scale = b.float().abs().max().item()
    tolerance = 1e-6 if dtype == torch.float64 else 0.03  # fp64 is untouched by autocast; bf16 rounds (0.008 seen)
    assert (a.float() - b.float()).abs().max().item() <= tolerance * scale


@pytest.mark.parametrize("heads, head_ratio, hidden", [
    (4, 2, 128), (8, 2, 128), (2, 3, 64),  # widths agree: transformers loads them
    (4, 1, 128), (8, 4, 128), (3, 2, 96), (1, 2, 64),  # they do not: convbert loads them, transformers cannot
])
def test_transformers_limits_says_exactly_when_transformers_can_load_a_folder(transformers_module, tmp_path,
                                                                               heads, head_ratio, hidden):
    """`convbert export` and `import-tf` print this note; it must match what transformers really does."""
    from convbert.interop.hf import transformers_limits

    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("small", hidden_size=hidden, num_attention_heads=heads, head_ratio=head_ratio,
                                        intermediate_size=2 * hidden, embedding_size=hidden, num_hidden_layers=1)
    ours = ConvBertModel(config).eval()
    ours.save_pretrained(tmp_path)
    assert ConvBertModel.from_pretrained(tmp_path).config == config
    notes = transformers_limits("discriminator", config)
    try:
        theirs = transformers_module.ConvBertModel.from_pretrained(tmp_path).eval()
    except Exception as error:  # transformers: size mismatches (or a head count that does not divide H)
        assert notes and "transformers cannot" in notes[0], (notes, error)
        return
    assert notes == []
    ids, mask, types = _inputs(config.vocab_size)
    with torch.no_grad():
        a = ours(ids, mask, types).last_hidden_state
        b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert (a - b).abs().max().item() <= TOL


def test_transformers_limits_names_mask_conv_padding_which_transformers_ignores(transformers_module, tmp_path):
    """transformers loads a mask_conv_padding folder without complaint (the setting rides in convbert_extra) and
    computes the original's padded convolution: the note must say so, and the outputs really differ."""
    from convbert.interop.hf import transformers_limits

    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("tiny", vocab_size=100, mask_conv_padding=True)
    ours = ConvBertModel(config).eval()
    ours.save_pretrained(tmp_path)
    notes = transformers_limits("discriminator", config)
    assert len(notes) == 1 and "mask_conv_padding=True" in notes[0] and "outputs differ" in notes[0]
    assert transformers_limits("discriminator", ConvBertConfig.from_preset("tiny", vocab_size=100)) == []
    theirs = transformers_module.ConvBertModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    with torch.no_grad():
        a = ours(ids, mask).last_hidden_state
        b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a[0, :8] - b[0, :8]).abs().max().item() > 1e-4  # the padded sequence's real tokens
    assert (a[1] - b[1]).abs().max().item() <= TOL  # no padding, no difference


@pytest.mark.parametrize("overrides", [{}, {"attention_type": "plain"}, {"embedding_size": 64}])
def test_attentions_and_inputs_embeds_match_transformers(transformers_module, overrides):
    """`output_attentions` gives every layer's self-attention probabilities as transformers does (padding masked),
    and `inputs_embeds` stands in for the word lookup in both; the explicit attention leaves outputs unchanged."""
    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("small", num_hidden_layers=3, **overrides)
    ours = ConvBertModel(config).eval()
    # (transformers' ConvBERT has no plain attention: that case is compared with our own fast path only)
    hf = None if overrides.get("attention_type") == "plain" else _hf_twin(transformers_module, ours)
    ids, mask, types = _inputs(config.vocab_size)
    with torch.no_grad():
        fast = ours(ids, attention_mask=mask, token_type_ids=types)
        a = ours(ids, attention_mask=mask, token_type_ids=types, output_attentions=True)
        embeds = ours.embeddings.word_embeddings(ids)
        e = ours(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types, output_attentions=True)
    assert (a.last_hidden_state - fast.last_hidden_state).abs().max() <= TOL
    assert torch.equal(e.last_hidden_state, a.last_hidden_state)
    assert len(a.attentions) == config.num_hidden_layers and a[2] is a.attentions
    for p in a.attentions:
        assert p.shape == (3, config.reduced_heads, 48, 48)
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
        assert p[1, :, :, 30:].max() < 1e-6 and p[2, :, :, 7:].max() < 1e-6  # padded keys get no weight
    if hf is None:
        return
    with torch.no_grad():
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True)
        h = hf(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types)
    assert len(b.attentions) == len(a.attentions)
    for i, (x, y) in enumerate(zip(a.attentions, b.attentions)):
        assert (x - y).abs().max() <= TOL, f"layer {i}"
    assert (e.last_hidden_state - h.last_hidden_state).abs().max() <= TOL


def test_inputs_embeds_carry_gradients_and_bad_calls_are_named():
    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("small", num_hidden_layers=2)
    model = ConvBertModel(config).eval()
    ids, mask, types = _inputs(config.vocab_size, length=16)
    embeds = model.embeddings.word_embeddings(ids).detach().requires_grad_()
    model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    from convbert.errors import ConvBertError

    with pytest.raises(ConvBertError, match="both input_ids and inputs_embeds"):
        model(ids, inputs_embeds=embeds)
    with pytest.raises(ConvBertError, match="neither input_ids nor inputs_embeds"):
        model()
    with pytest.raises(ConvBertError, match=rf"inputs_embeds is \(3, 16, 7\).*\[batch, length, {config.embedding_size}\]"):
        model(inputs_embeds=torch.zeros(3, 16, 7))
    with pytest.raises(ConvBertError, match=r"attention_mask has shape \(3, 15\).*inputs_embeds' \[batch, length\] \(3, 16\)"):
        model(inputs_embeds=embeds, attention_mask=mask[:, :15])
    with pytest.raises(ConvBertError, match=r"inputs_embeds is torch.float64 but the model is torch.float32"):
        model(inputs_embeds=embeds.double())
    with torch.autocast("cpu", torch.bfloat16):  # under autocast a cast input is autocast's to handle
        assert model(inputs_embeds=embeds.detach().bfloat16()).last_hidden_state.shape == (3, 16, config.hidden_size)


def test_classifier_takes_inputs_embeds():
    from convbert.model import ConvBertForSequenceClassification

    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("small", num_hidden_layers=2)
    model = ConvBertForSequenceClassification(config, num_labels=3).eval()
    ids, mask, types = _inputs(config.vocab_size, length=16)
    with torch.no_grad():
        want = model(ids, mask, types)
        got = model(attention_mask=mask, token_type_ids=types,
                    inputs_embeds=model.convbert.embeddings.word_embeddings(ids))
    assert torch.equal(got, want)


@pytest.mark.parametrize("groups", [1, 2])
def test_double_backward_needs_plain_ops_and_then_matches_transformers(transformers_module, groups):
    """The hand-written CPU backwards are first-order: `create_graph=True` through them is refused with the way
    out, and inside `kernels.plain_ops()` a gradient penalty's gradient equals transformers' (fp64)."""
    from convbert.errors import ConvBertError
    from convbert.model import kernels

    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("tiny", vocab_size=100, num_groups=groups)
    ours = ConvBertModel(config).eval().double()
    hf = _hf_twin(transformers_module, ours).double()
    ids, mask, _ = _inputs(config.vocab_size, length=12)

    def penalty_gradient(model, call):
        embeds = ours.embeddings.word_embeddings(ids).detach().requires_grad_()
        out = call(model, embeds)
        (g,) = torch.autograd.grad(out.pow(3).sum(), embeds, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), embeds)[0]

    def ours_call(model, embeds):
        return model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    with pytest.raises(ConvBertError, match=r"double backward .*kernels\.plain_ops\(\)"):
        penalty_gradient(ours, ours_call)
    with kernels.plain_ops():
        got = penalty_gradient(ours, ours_call)
    assert not kernels._plain_ops  # restored on leaving the block
    want = penalty_gradient(hf, lambda m, e: m(inputs_embeds=e, attention_mask=mask).last_hidden_state)
    assert (got - want).abs().max().item() <= 1e-9 * want.abs().max().item()


def test_the_layer_norm_kernel_refuses_a_second_derivative_it_would_get_wrong():
    from convbert.errors import ConvBertError
    from convbert.model import kernels

    norm = torch.nn.LayerNorm(8).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: kernels.layer_norm(t, norm), (x,))
    with pytest.raises(ConvBertError, match="double backward"):
        torch.autograd.gradgradcheck(lambda t: kernels.layer_norm(t, norm), (x,))
    with kernels.plain_ops():
        assert torch.autograd.gradgradcheck(lambda t: kernels.layer_norm(t, norm), (x,))
