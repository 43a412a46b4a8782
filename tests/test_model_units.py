"""The model in isolation: sizes, presets, validation, and the §1.8 points that can be checked one by one."""

import json

import re

import pytest
import torch

from convbert.errors import ConvBertError
from convbert.model import (
    ConvBertConfig,
    ConvBertForSequenceClassification,
    ConvBertModel,
    DiscriminatorHead,
    GeneratorHead,
)
from convbert.model.flops import pretraining_counts
from convbert.model.layers import GroupedLinear, MixedAttention, SeparableConv1D


@pytest.mark.parametrize("size,expected", [("small", 13_143_768), ("medium-small", 17_475_888),
                                           ("base", 105_680_520)])
def test_parameter_counts(size, expected):
    assert ConvBertModel(ConvBertConfig.from_preset(size)).num_parameters() == expected


@pytest.mark.parametrize("size,fraction,gen,total", [("small", 0.25, 810_086, 14_019_903),
                                                     ("medium-small", 0.25, 915_078, 18_539_191)])
def test_pretraining_counts_match_spec(size, fraction, gen, total):
    counts = pretraining_counts(ConvBertConfig.from_preset(size), fraction)
    assert counts["generator_params"] == gen
    assert counts["pretraining_params"] == total


def test_presets_exact_values():
    ms = ConvBertConfig.from_preset("medium-small")
    assert (ms.hidden_size, ms.num_attention_heads, ms.intermediate_size, ms.embedding_size, ms.num_groups,
            ms.head_size, ms.reduced_heads, ms.branch_width) == (384, 8, 1536, 128, 2, 48, 4, 192)
    base = ConvBertConfig.from_preset("base")
    assert (base.embedding_size, base.head_size, base.reduced_heads, base.branch_width) == (768, 64, 6, 384)
    assert ConvBertModel(base).embeddings_project is None  # E == H: no projection


@pytest.mark.parametrize("size,fraction,hidden,heads,head_size,nr,concat", [
    ("small", 0.25, 64, 1, 64, 1, 128),  # single-head fallback: 2H-wide concatenation (§1.6)
    ("medium-small", 0.25, 96, 2, 48, 1, 96),
    ("base", 1 / 3, 256, 4, 64, 2, 256),
])
def test_generator_config(size, fraction, hidden, heads, head_size, nr, concat):
    disc = ConvBertConfig.from_preset(size)
    gen = disc.generator_config(fraction)
    assert (gen.hidden_size, gen.num_attention_heads, gen.head_size, gen.reduced_heads,
            gen.attention_output_width, gen.intermediate_size, gen.num_hidden_layers) == (
        hidden, heads, head_size, nr, concat, 4 * hidden, 12)
    assert gen.num_groups == disc.num_groups and gen.conv_kernel_size == disc.conv_kernel_size
    model = ConvBertModel(gen, embeddings=ConvBertModel(disc).embeddings)
    assert model.encoder.layer[0].attention.output.dense.weight.shape == (hidden, concat)
    assert model.embeddings_project.weight.shape == (hidden, disc.embedding_size)


def test_generator_fraction_too_small_names_the_fraction():
    with pytest.raises(ConvBertError, match=r"generator fraction 0.013: .*hidden 5.*choose a larger fraction"):
        ConvBertConfig.from_preset("medium-small").generator_config(0.013)


@pytest.mark.parametrize("overrides,field", [
    (dict(hidden_size=100, num_attention_heads=3), "hidden_size"),
    (dict(conv_kernel_size=8), "conv_kernel_size"),
    (dict(num_groups=3), "num_groups"),
    (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    (dict(attention_type="sparse"), "attention_type"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
])
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ConvBertError, match=field):
        ConvBertConfig.from_preset("small", **overrides)


def test_generator_head_count_is_truncated_as_in_the_original():
    # max(1, N * f) cast to int: 8 * 0.35 = 2.8 -> 2 heads (rounding would give 3)
    gen = ConvBertConfig.from_preset("medium-small").generator_config(0.35)
    assert (gen.hidden_size, gen.num_attention_heads) == (134, 2)


def test_config_numbers_written_as_text_are_converted_and_wrong_types_name_the_field():
    # YAML reads 1e-12 (no decimal point) as a string; --set values arrive as text
    cfg = ConvBertConfig.from_preset("small", layer_norm_eps="1e-12", initializer_range="2e-2", hidden_size="256",
                                     mask_conv_padding="true")
    assert (cfg.layer_norm_eps, cfg.initializer_range, cfg.hidden_size, cfg.mask_conv_padding) == (
        1e-12, 0.02, 256, True)
    assert type(cfg.layer_norm_eps) is float and type(cfg.hidden_size) is int
    for overrides, message in [
        (dict(layer_norm_eps="x"), "'layer_norm_eps' = 'x': expected a number"),
        (dict(hidden_size=256.5), "'hidden_size' = 256.5: expected an integer"),
        (dict(num_groups=True), "'num_groups' = True: expected an integer"),
        (dict(mask_conv_padding=1), "'mask_conv_padding' = 1: expected true or false"),
        (dict(initializer_range=-0.1), "'initializer_range' = -0.1: expected a standard deviation"),
    ]:
        with pytest.raises(ConvBertError, match=re.escape(message)):
            ConvBertConfig.from_preset("small", **overrides)


def test_errors_are_value_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        ConvBertConfig(hidden_size=100, num_attention_heads=3)


def test_config_notes_cannot_shadow_fields_and_number_fields_must_be_numbers(tmp_path):
    """A note in `extra` named like a field used to replace that field after save_pretrained/from_pretrained."""
    with pytest.raises(ConvBertError, match=r"'extra' = .*without the config field name\(s\) mask_conv_padding"):
        ConvBertConfig.from_preset("tiny", extra={"mask_conv_padding": True})
    config = ConvBertConfig.from_preset("tiny", mask_conv_padding=True, extra={"run": "ablation 3"})
    assert ConvBertConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config
    config.hidden_dropout_prob = "0.1"  # mutated after construction: validate() names it, no TypeError
    with pytest.raises(ConvBertError, match=r"'hidden_dropout_prob' = '0.1': expected a number"):
        config.validate()
    with pytest.raises(ConvBertError, match=r"'num_attention_heads' = 3: expected a divisor of hidden_size \(64\)"):
        ConvBertConfig.from_preset("tiny", num_attention_heads=3)


def test_wrong_types_in_the_python_api_are_named(tmp_path):
    with pytest.raises(ConvBertError, match="config is a dict: expected a ConvBertConfig"):
        ConvBertModel({"hidden_size": 64})
    with pytest.raises(ConvBertError, match="x.json: expected a JSON object of config fields, got list"):
        ConvBertConfig.from_hf_dict([], source="x.json")
    with pytest.raises(ConvBertError, match=r"generator fraction '0.25': expected a number in \(0, 1\]"):
        ConvBertConfig.from_preset("tiny").generator_config("0.25")
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(ConvBertError, match="afile: exists and is not a folder"):
        ConvBertModel(ConvBertConfig.from_preset("tiny")).save_pretrained(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "keep"


def test_initializer_range_zero_gives_zero_weights():
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", initializer_range=0.0))
    assert model.encoder.layer[0].attention.self.query.weight.abs().max().item() == 0.0
    assert model.embeddings.word_embeddings.weight.abs().max().item() == 0.0


def test_unknown_preset():
    with pytest.raises(ConvBertError, match="unknown size 'huge'"):
        ConvBertConfig.from_preset("huge")


def test_json_round_trip(tmp_path):
    config = ConvBertConfig.from_preset("medium-small", conv_kernel_size=7, mask_conv_padding=True)
    config.to_json_file(tmp_path / "c.json")
    assert ConvBertConfig.from_json_file(tmp_path / "c.json") == config
    hf = config.to_hf_dict()
    assert hf["model_type"] == "convbert" and hf["num_groups"] == 2
    assert ConvBertConfig.from_hf_dict(json.loads(json.dumps(hf))) == config
    with pytest.raises(ConvBertError, match="unknown config field"):
        ConvBertConfig.from_dict({**config.to_dict(), "hiddn_size": 3})


def test_hf_activation_names_map_only_to_the_same_maths():
    """transformers' "gelu_python" is the erf GELU; "gelu_new" is the tanh approximation and must be refused,
    not silently read as erf (outputs would differ from transformers' by ~1e-3 on trained weights)."""
    hf = ConvBertConfig.from_preset("small").to_hf_dict()
    assert ConvBertConfig.from_hf_dict({**hf, "hidden_act": "gelu_python"}).hidden_act == "gelu"
    for name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu"):
        with pytest.raises(ConvBertError, match=f"hidden_act' = '{name}': expected 'gelu'"):
            ConvBertConfig.from_hf_dict({**hf, "hidden_act": name})


def _tiny(**overrides):
    return ConvBertConfig.from_preset("tiny", vocab_size=200, **overrides)


def _padding_effect(mask_conv_padding: bool) -> float:
    """How much the real tokens' outputs change when the same sequence is followed by more padding."""
    torch.manual_seed(0)
    model = ConvBertModel(_tiny(mask_conv_padding=mask_conv_padding)).eval()
    ids = torch.randint(5, 200, (1, 12))
    short = model(ids, torch.ones_like(ids)).last_hidden_state
    padded_ids = torch.cat([ids, torch.zeros(1, 20, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 12, dtype=torch.long), torch.zeros(1, 20, dtype=torch.long)], dim=1)
    long = model(padded_ids, mask).last_hidden_state[:, :12]
    return (short - long).abs().max().item()


def test_padding_leaks_through_conv_in_faithful_mode_only():
    assert _padding_effect(mask_conv_padding=False) > 1e-3  # §1.8 point 5, as in the original
    assert _padding_effect(mask_conv_padding=True) < 1e-5  # the documented divergence removes it


def test_concatenation_order_sa_heads_first():
    torch.manual_seed(0)
    attn = MixedAttention(_tiny()).eval()
    x = torch.randn(2, 10, 64)
    out = attn(x, None, None)
    A = attn.width
    # Zeroing the conv-value projection zeroes the conv heads: they must be the last A channels.
    with torch.no_grad():
        attn.conv_out_layer.weight.zero_()
        attn.conv_out_layer.bias.zero_()
    out2 = attn(x, None, None)
    assert torch.equal(out[..., :A], out2[..., :A])
    assert out2[..., A:].abs().max() == 0 and out[..., A:].abs().max() > 0


def test_grouped_linear_no_shuffle_between_groups():
    layer = GroupedLinear(8, 12, groups=2)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(5, 8)
    y = layer(x)
    x2 = x.clone()
    x2[:, :4] += 1.0  # change only group 0's input
    y2 = layer(x2)
    assert not torch.allclose(y[:, :6], y2[:, :6])
    assert torch.equal(y[:, 6:], y2[:, 6:])  # group 1's output unaffected
    expected = torch.cat([x[:, :4] @ layer.weight[0], x[:, 4:] @ layer.weight[1]], dim=1) + layer.bias
    assert torch.allclose(y, expected, atol=1e-6)


def test_separable_conv_matches_conv1d():
    conv = SeparableConv1D(6, 4, 5)
    torch.nn.init.normal_(conv.depthwise.weight)
    torch.nn.init.normal_(conv.pointwise.weight)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 9, 6)
    reference = torch.nn.functional.conv1d(x.transpose(1, 2), conv.depthwise.weight, padding=2, groups=6)
    reference = torch.nn.functional.conv1d(reference, conv.pointwise.weight) + conv.bias
    assert torch.allclose(conv(x), reference.transpose(1, 2), atol=1e-5)


def test_even_kernel_rejected_and_odd_kernels_work():
    with pytest.raises(ConvBertError, match="odd"):
        _tiny(conv_kernel_size=4)
    for k in (1, 3, 7):
        model = ConvBertModel(_tiny(conv_kernel_size=k)).eval()
        assert model(torch.randint(0, 200, (1, 6))).last_hidden_state.shape == (1, 6, 64)


def test_initialisation_follows_the_original():
    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset("small", num_hidden_layers=1))
    layer = model.encoder.layer[0].attention.self
    dw = layer.key_conv_attn_layer.depthwise.weight
    assert dw.abs().max() <= 2 / 9 + 1e-6 and dw.std() > 0.05  # truncated normal, std 1/K
    q = layer.query.weight
    assert q.abs().max() <= 0.04 + 1e-6  # truncated at two std of 0.02
    assert layer.query.bias.abs().max() == 0
    emb = model.embeddings.word_embeddings.weight
    assert emb.abs().max() <= 0.04 + 1e-6 and emb[0].abs().max() > 0  # [PAD] row is an ordinary row
    proj = model.embeddings_project.weight  # Glorot uniform: bound sqrt(6 / (fan_in + fan_out))
    assert proj.abs().max() <= (6 / (128 + 256)) ** 0.5 and proj.abs().max() > 0.04


def test_hidden_states_and_heads_shapes():
    config = _tiny()
    model = ConvBertModel(config).eval()
    ids = torch.randint(0, 200, (2, 16))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.last_hidden_state.shape == (2, 16, 64)
    gen_config = config.generator_config(0.25)
    gen_head = GeneratorHead(gen_config, config.embedding_size)
    logits = gen_head(torch.randn(2, 5, gen_config.hidden_size), model.embeddings.word_embeddings.weight)
    assert logits.shape == (2, 5, 200)
    assert DiscriminatorHead(config)(out.last_hidden_state).shape == (2, 16)
    clf = ConvBertForSequenceClassification(config, 3).eval()
    assert clf(ids).shape == (2, 3)


def test_plain_attention_baseline_has_no_conv():
    model = ConvBertModel(_tiny(attention_type="plain"))
    names = [n for n, _ in model.named_parameters()]
    assert not any("conv" in n for n in names)
    assert model.encoder.layer[0].attention.output.dense.weight.shape == (64, 64)


def test_classifier_save_load_round_trip(tmp_path):
    model = ConvBertForSequenceClassification(_tiny(), 2).eval()
    model.save_pretrained(tmp_path)
    again = ConvBertForSequenceClassification.from_pretrained(tmp_path)
    ids = torch.randint(0, 200, (2, 8))
    assert torch.equal(model(ids), again(ids))


def test_gradient_checkpointing_gives_the_same_gradients():
    config = _tiny()
    torch.manual_seed(0)
    plain = ConvBertModel(config).train()
    checkpointed = ConvBertModel(_tiny(gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 200, (2, 12))
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(7)  # same dropout masks in both runs (and in the recomputation)
        model(ids, torch.ones_like(ids)).last_hidden_state.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


def test_gradient_checkpointing_with_attentions_gives_the_same_probabilities_and_gradients():
    torch.manual_seed(0)
    plain = ConvBertModel(_tiny()).train()
    checkpointed = ConvBertModel(_tiny(gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 200, (2, 12))
    runs = []
    for model in (plain, checkpointed):
        torch.manual_seed(7)
        out = model(ids, output_attentions=True)
        (out.last_hidden_state.pow(2).mean() + out.attentions[-1].pow(2).mean()).backward()
        runs.append((out.attentions, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (probs_a, grads_a), (probs_b, grads_b) = runs
    assert len(probs_a) == len(probs_b) == len(plain.encoder.layer)
    assert all(torch.equal(a, b) for a, b in zip(probs_a, probs_b))
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-6), name


# -- misuse is named, not crashed on -----------------------------------------------------------------------------


def _tiny_folder(tmp_path):
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=100))
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_from_pretrained_overrides_are_converted_like_constructor_arguments(tmp_path):
    _, folder = _tiny_folder(tmp_path)
    assert ConvBertModel.from_pretrained(folder, mask_conv_padding="no").config.mask_conv_padding is False
    assert ConvBertModel.from_pretrained(folder, hidden_dropout_prob="0.2").config.hidden_dropout_prob == 0.2
    with pytest.raises(ConvBertError, match="overrides: unknown config field"):
        ConvBertModel.from_pretrained(folder, nonsense=1)
    with pytest.raises(ConvBertError, match=r"'hidden_dropout_prob' = 'lots'"):
        ConvBertModel.from_pretrained(folder, hidden_dropout_prob="lots")


def test_config_files_and_presets_name_the_source(tmp_path):
    with pytest.raises(ConvBertError, match="unknown config field"):
        ConvBertConfig.from_preset("tiny", foo=1)
    with pytest.raises(ConvBertError, match="expected a JSON object"):
        ConvBertConfig.from_dict([1, 2])
    with pytest.raises(ConvBertError, match="is a folder"):
        ConvBertConfig.from_json_file(tmp_path)
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 3}))
    with pytest.raises(ConvBertError, match=re.escape(str(bad))):
        ConvBertConfig.from_json_file(bad)


@pytest.mark.parametrize("call, expect", [
    (lambda m, ids: m(ids[0]), "expected integer token ids of shape [batch, length]"),
    (lambda m, ids: m(ids.float()), "expected integer token ids"),
    (lambda m, ids: m(ids, attention_mask=torch.ones(2, 7)), "attention_mask has shape (2, 7)"),
    (lambda m, ids: m(ids, attention_mask=torch.ones(2, 8, 8)), "attention_mask has shape (2, 8, 8)"),
    (lambda m, ids: m(ids, token_type_ids=torch.zeros(2, 8)), "token_type_ids is torch.float32"),
    (lambda m, ids: m(torch.zeros(0, 8, dtype=torch.long)), "input_ids has shape (0, 8)"),
    (lambda m, ids: m(torch.zeros(2, 0, dtype=torch.long)), "input_ids has shape (2, 0)"),
    (lambda m, ids: m(torch.tensor([[0, 5], [100, 3]])), "input_ids holds values from 0 to 100: expected 0..99"),
    (lambda m, ids: m(ids - 100), "expected 0..99 (config.vocab_size is 100)"),
    (lambda m, ids: m(ids, token_type_ids=torch.full_like(ids, 2)),
     "token_type_ids holds values from 2 to 2: expected 0..1 (config.type_vocab_size is 2)"),
])
def test_wrong_model_inputs_are_named(call, expect):
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(ConvBertError, match=re.escape(expect)):
        call(model, ids)


def test_any_integer_dtype_of_ids_gives_the_same_output():
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 8))
    types = torch.randint(0, 2, (2, 8))
    with torch.no_grad():
        want = model(ids, token_type_ids=types).last_hidden_state
        for dtype in (torch.uint8, torch.int16, torch.int32):
            got = model(ids.to(dtype), token_type_ids=types.to(dtype)).last_hidden_state
            assert torch.equal(got, want), dtype


def test_shared_embeddings_must_match_the_vocab_and_heads_their_label_count(tmp_path):
    from convbert.model.heads import ConvBertForSequenceClassification

    d = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=100))
    with pytest.raises(ConvBertError, match="100 word rows but config.vocab_size is 50"):
        ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=50), embeddings=d.embeddings)
    with pytest.raises(ConvBertError, match="num_labels = 2.5"):
        ConvBertForSequenceClassification(d.config, 2.5)
    clf = ConvBertForSequenceClassification(d.config, 2, encoder=d)
    assert clf.convbert is d
    with pytest.raises(ConvBertError, match="encoder is a str: expected a ConvBertModel"):
        ConvBertForSequenceClassification(d.config, 2, encoder="x")
    with pytest.raises(ConvBertError, match=r"classifier_dropout = '0.1': expected a probability"):
        ConvBertForSequenceClassification(d.config, 2, classifier_dropout="0.1")
    with pytest.raises(ConvBertError, match="encoder is 64 wide but config.hidden_size is 128"):
        ConvBertForSequenceClassification(d.config.replace(hidden_size=128, intermediate_size=512), 2, encoder=d)
    clf.save_pretrained(tmp_path / "c")
    head = tmp_path / "c" / "head.json"
    head.write_text(json.dumps({"num_labels": 2, "dropout": 1.5}))
    with pytest.raises(ConvBertError, match=re.escape(f"{head}: classifier dropout = 1.5")):
        ConvBertForSequenceClassification.from_pretrained(tmp_path / "c")


def test_shared_embeddings_must_match_every_table_of_the_config():
    config = ConvBertConfig.from_preset("tiny", vocab_size=300)
    shared = ConvBertModel(config).embeddings
    with pytest.raises(ConvBertError, match=r"128 position rows but config.max_position_embeddings is 64"):
        ConvBertModel(config.replace(max_position_embeddings=64), embeddings=shared)
    with pytest.raises(ConvBertError, match=r"2 token-type rows but config.type_vocab_size is 3"):
        ConvBertModel(config.replace(type_vocab_size=3), embeddings=shared)


def test_config_fields_take_numpy_numbers():
    import numpy as np

    config = ConvBertConfig.from_preset("tiny", hidden_size=np.int64(64), layer_norm_eps=np.float32(1e-6))
    assert config.hidden_size == 64 and type(config.hidden_size) is int
    assert type(config.layer_norm_eps) is float
    with pytest.raises(ConvBertError, match="hidden_size"):
        ConvBertConfig.from_preset("tiny", hidden_size=64.5)


def test_config_notes_must_be_json(tmp_path):
    with pytest.raises(ConvBertError, match=r"'extra'.*JSON can hold"):
        ConvBertConfig.from_preset("tiny", extra={"tags": {"a", "b"}})
    bad = tmp_path / "config.json"
    bad.write_bytes('{"hidden_size": 64, "extra": {"note": "caf\u00e9"}}'.encode("latin-1"))
    with pytest.raises(ConvBertError, match=r"config.json: not UTF-8"):
        ConvBertConfig.from_json_file(bad)


def test_classifier_head_json_must_hold_an_integer_label_count(tmp_path):
    from convbert.model.heads import ClassificationHead

    with pytest.raises(ConvBertError, match="num_labels = 0"):
        ClassificationHead(64, 0)
    torch.manual_seed(0)
    ConvBertForSequenceClassification(ConvBertConfig.from_preset("tiny", vocab_size=300), 3).save_pretrained(tmp_path)
    assert ConvBertForSequenceClassification.from_pretrained(tmp_path).num_labels == 3
    head = json.loads((tmp_path / "head.json").read_text())
    for bad in (3.7, True, "three"):
        (tmp_path / "head.json").write_text(json.dumps({**head, "num_labels": bad}))
        with pytest.raises(ConvBertError, match=r"head.json: expected \{'num_labels': int"):
            ConvBertForSequenceClassification.from_pretrained(tmp_path)
