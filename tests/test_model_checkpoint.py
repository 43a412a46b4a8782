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
