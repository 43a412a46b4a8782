"""HF-layout checkpoints: every accepted variant loads; every broken one is a clear error."""

import json

import pytest
import torch
from safetensors.torch import save_file

from convbert.errors import ConvBertError
from convbert.model import ConvBertConfig, ConvBertModel


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=300)).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _same(a: ConvBertModel, b: ConvBertModel) -> bool:
    ids = torch.randint(0, 300, (2, 10))
    return torch.equal(a(ids).last_hidden_state, b(ids).last_hidden_state)


def test_round_trip(saved):
    model, path = saved
    assert _same(model, ConvBertModel.from_pretrained(path))


def test_pytorch_bin_with_prefix_position_ids_and_old_model_type(saved):
    model, path = saved
    state = {f"convbert.{k}": v for k, v in model.state_dict().items()}
    state["convbert.embeddings.position_ids"] = torch.arange(128)[None]
    state["generator_lm_head.bias"] = torch.zeros(300)  # a head key: ignored for the encoder
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "conv_bert"
    (path / "config.json").write_text(json.dumps(config))
    assert _same(model, ConvBertModel.from_pretrained(path))


def test_wrong_model_type(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "bert"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvBertError, match="model_type.*'bert'"):
        ConvBertModel.from_pretrained(path)


def test_unknown_and_missing_keys_are_named(saved):
    model, path = saved
    state = dict(model.state_dict())
    state["encoder.layer.0.attention.self.mystery"] = torch.zeros(3)
    del state["encoder.layer.1.output.LayerNorm.bias"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ConvBertError) as err:
        ConvBertModel.from_pretrained(path)
    assert "encoder.layer.0.attention.self.mystery" in str(err.value)
    assert "encoder.layer.1.output.LayerNorm.bias" in str(err.value)


def test_shape_mismatch_names_key_and_both_shapes(saved):
    model, path = saved
    state = dict(model.state_dict())
    state["encoder.layer.0.attention.self.query.weight"] = torch.zeros(5, 64)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ConvBertError, match=r"query.weight has shape \[5, 64\].*expects \[32, 64\]"):
        ConvBertModel.from_pretrained(path)


def test_truncated_weights(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvBertError, match="model.safetensors"):
        ConvBertModel.from_pretrained(path)


def test_pickle_that_is_not_weights_is_refused(saved):
    _, path = saved
    (path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, path / "pytorch_model.bin")
    with pytest.raises(ConvBertError, match="pytorch_model.bin: refused to load: not plain tensors"):
        ConvBertModel.from_pretrained(path)
    # damaged bytes are called damaged, not unsafe
    (path / "pytorch_model.bin").write_bytes(bytes(range(7, 250)) * 3)
    with pytest.raises(ConvBertError, match="pytorch_model.bin: cannot read weights \\(truncated or corrupt file"):
        ConvBertModel.from_pretrained(path)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ConvBertError, match="not a model folder"):
        ConvBertModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(ConvBertError, match="config.json"):
        ConvBertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ConvBertConfig.from_preset("tiny").to_hf_dict()))
    with pytest.raises(ConvBertError, match="no weights found"):
        ConvBertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ConvBertError, match="line 1"):
        ConvBertModel.from_pretrained(tmp_path)


# -- the checksum convbert stores in its own weight files ------------------------------------------------------------


def _flip_byte_in_a_tensor(file, offset=-100):
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 0x40
    file.write_bytes(bytes(raw))


def test_saved_weights_carry_a_checksum_of_their_tensors_that_loading_verifies(saved):
    from safetensors import safe_open

    from convbert.weights import CHECKSUM_KEY, tensors_sha256

    model, path = saved
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored, keys = f.metadata()[CHECKSUM_KEY], list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert stored == tensors_sha256(tensors)
    assert stored == tensors_sha256(dict(reversed(list(tensors.items()))))  # the digest is in name order
    _flip_byte_in_a_tensor(path / "model.safetensors")
    with pytest.raises(ConvBertError, match=r"model\.safetensors: the tensors differ from the checksum stored in "
                                            r"the file .*damaged"):
        ConvBertModel.from_pretrained(path)


def test_the_checksum_covers_names_dtypes_and_shapes_not_only_bytes():
    from convbert.weights import tensors_sha256

    a = torch.arange(6, dtype=torch.float32)
    base = tensors_sha256({"w": a})
    assert tensors_sha256({"v": a}) != base
    assert tensors_sha256({"w": a.view(2, 3)}) != base
    assert tensors_sha256({"w": a.view(torch.int32)}) != base
    assert tensors_sha256({"w": a.clone()}) == base
    assert tensors_sha256({"w": a[::2]}) == tensors_sha256({"w": a[::2].contiguous()})  # a view hashes its values
    assert len(tensors_sha256({"b": torch.zeros(0), "c": torch.ones(2, dtype=torch.bfloat16)})) == 64


def test_weights_without_a_checksum_load_as_before(saved):
    """Files from other tools (the hub, transformers' save_pretrained) have no checksum: nothing to verify."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from convbert.weights import CHECKSUM_KEY

    model, path = saved
    save_file(load_file(str(path / "model.safetensors")), str(path / "model.safetensors"), metadata={"format": "pt"})
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert CHECKSUM_KEY not in (f.metadata() or {})
    assert _same(model, ConvBertModel.from_pretrained(path))


def test_a_flipped_byte_in_the_classifier_or_the_replaced_token_head_is_refused(tmp_path):
    from convbert.interop.hf import DISCRIMINATOR_HEAD_FILE, read_discriminator_head, save_discriminator_head
    from convbert.model.heads import ConvBertForSequenceClassification

    torch.manual_seed(0)
    config = ConvBertConfig.from_preset("tiny", vocab_size=300)
    clf = ConvBertForSequenceClassification(config, num_labels=3)
    clf.save_pretrained(tmp_path / "clf")
    ConvBertForSequenceClassification.from_pretrained(tmp_path / "clf")  # loads as written
    _flip_byte_in_a_tensor(tmp_path / "clf" / "classifier.safetensors", offset=-2)
    with pytest.raises(ConvBertError, match=r"classifier\.safetensors: the tensors differ from the checksum"):
        ConvBertForSequenceClassification.from_pretrained(tmp_path / "clf")

    head = {"dense.weight": torch.randn(32, 32), "dense.bias": torch.randn(32),
            "dense_prediction.weight": torch.randn(1, 32), "dense_prediction.bias": torch.randn(1)}
    save_discriminator_head(head, tmp_path)
    assert all(torch.equal(head[k], v) for k, v in read_discriminator_head(tmp_path).items())
    _flip_byte_in_a_tensor(tmp_path / DISCRIMINATOR_HEAD_FILE, offset=-2)
    with pytest.raises(ConvBertError, match=r"discriminator_head\.safetensors: the tensors differ from the checksum"):
        read_discriminator_head(tmp_path)


def test_transformers_reads_a_file_with_the_checksum(saved):
    transformers = pytest.importorskip("transformers")
    model, path = saved
    hf = transformers.ConvBertModel.from_pretrained(str(path)).eval()
    ids = torch.randint(0, 300, (2, 10))
    assert torch.allclose(hf(ids).last_hidden_state, model(ids).last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.uint8, torch.bool])
def test_weights_of_every_dtype_and_shape_round_trip_through_the_checksum(tmp_path, dtype):
    from convbert.weights import load_weights, save_weights

    torch.manual_seed(0)
    full = (torch.randn(4, 6) * 50).to(dtype)
    tensors = {"matrix": full, "column_view": full[:, 1], "empty": full[:0], "scalar": full[1, 2].clone(),
               "transposed": full.t()}
    save_weights(tensors, tmp_path / "w.safetensors")
    back = load_weights(tmp_path / "w.safetensors")
    assert sorted(back) == sorted(tensors)
    assert all(back[k].dtype == dtype and torch.equal(back[k], tensors[k]) for k in tensors)


def test_the_checksum_is_of_little_endian_bytes_whatever_the_machine(monkeypatch):
    """safetensors stores little-endian and swaps on big-endian hosts: the digest must not change with the host."""
    import sys

    from convbert.weights import tensors_sha256

    t = torch.randn(5, 3)
    here = tensors_sha256({"w": t, "b": torch.ones(3, dtype=torch.uint8)})
    assert sys.byteorder == "little"  # (the machines this runs on; the swap below stands in for a big-endian one)
    as_big_endian_memory = t.view(torch.uint8).view(-1, 4).flip(-1).contiguous().view(torch.float32).view(5, 3)
    monkeypatch.setattr(sys, "byteorder", "big")
    assert tensors_sha256({"w": as_big_endian_memory, "b": torch.ones(3, dtype=torch.uint8)}) == here
    assert tensors_sha256({"w": t, "b": torch.ones(3, dtype=torch.uint8)}) != here


def test_a_file_another_tool_rewrote_keeping_convbert_metadata_names_both_causes(saved):
    from safetensors import safe_open

    model, path = saved
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).half() for k in f.keys()}
    save_file(tensors, str(path / "model.safetensors"), metadata=meta)
    with pytest.raises(ConvBertError, match=r"damaged .*, or a tool other than convbert changed its tensors and kept "
                                            r"convbert's metadata \(save it again without 'convbert_tensors_sha256'\)"):
        ConvBertModel.from_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})  # as the message says
    assert ConvBertModel.from_pretrained(path).embeddings.word_embeddings.weight.dtype == torch.float32


def test_integer_weights_are_refused_naming_the_key(saved):
    model, path = saved
    state = dict(model.state_dict())
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"].to(torch.int8)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ConvBertError, match=r"embeddings.word_embeddings.weight holds int8 values"):
        ConvBertModel.from_pretrained(path)


def test_half_precision_weights_still_load_as_float32(saved):
    model, path = saved
    save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    loaded = ConvBertModel.from_pretrained(path)
    assert loaded.embeddings.word_embeddings.weight.dtype == torch.float32


def test_overrides_cannot_change_the_saved_architecture(tmp_path):
    """Plain attention's head count changes no tensor shape: an override would load and compute another model."""
    torch.manual_seed(0)
    plain = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=300, attention_type="plain", num_groups=1))
    plain.save_pretrained(tmp_path)
    with pytest.raises(ConvBertError, match=r"num_attention_heads=2 \(the saved model has 4\)"):
        ConvBertModel.from_pretrained(tmp_path, num_attention_heads=2)
    # settings that are not the architecture still apply; an override equal to the saved value is fine
    loaded = ConvBertModel.from_pretrained(tmp_path, hidden_dropout_prob=0.0, num_attention_heads=4)
    assert loaded.config.hidden_dropout_prob == 0.0


def test_an_electra_decoder_config_is_refused(tmp_path):
    torch.manual_seed(0)
    plain = ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=300, attention_type="plain", num_groups=1))
    plain.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "electra"
    config["is_decoder"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvBertError, match=r"'is_decoder' is true.*causal"):
        ConvBertModel.from_pretrained(tmp_path)


def test_convbert_extra_must_be_an_object(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    for bad in ("notes", 5, [["a", 1]]):
        config["convbert_extra"] = bad
        (path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConvBertError, match=r"'convbert_extra' is .*expected an object"):
            ConvBertModel.from_pretrained(path)


def test_a_convbert_config_without_embedding_size_reads_as_transformers_does(transformers_module):
    """transformers' ConvBertConfig defaults embedding_size to 768, whatever hidden_size is."""
    values = ConvBertConfig.from_preset("tiny").to_hf_dict()
    del values["embedding_size"]
    ours = ConvBertConfig.from_hf_dict(values)
    theirs = transformers_module.ConvBertConfig(**{k: v for k, v in values.items() if k != "convbert_extra"})
    assert ours.embedding_size == theirs.embedding_size == 768
