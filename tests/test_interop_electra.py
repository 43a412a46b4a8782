"""transformers' ELECTRA layout: the hub's google/electra-* folders load as our plain-attention model (the paper's
baseline), plain-attention models are written so that transformers' ELECTRA classes load them, and pre-training
continues from a discriminator/generator pair of hub folders. The oracle is transformers itself (random weights,
nothing downloaded)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from convbert import ConvBertConfig, ConvBertModel
from convbert.errors import ConvBertError
from convbert.interop import hf

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle: pip install -e '.[test]'")

SMALL = dict(vocab_size=120, embedding_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=40)


def electra_config(**changes) -> "transformers.ElectraConfig":
    return transformers.ElectraConfig(**{**SMALL, **changes})


def inputs(vocab_size: int = 120):
    ids = torch.randint(5, vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def assert_same_hidden_states(ours: ConvBertModel, theirs, ids, mask):
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        want = theirs(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_hub_electra_discriminator_folder_loads_with_its_head(tmp_path):
    """ElectraForPreTraining as transformers saves it (safetensors), and as older hub folders hold it
    (pytorch_model.bin with the position_ids buffer): every hidden state equal, padding included."""
    torch.manual_seed(0)
    theirs = transformers.ElectraForPreTraining(electra_config()).eval()
    theirs.save_pretrained(tmp_path / "st")
    old = tmp_path / "bin"
    old.mkdir()
    state = {**theirs.state_dict(), "electra.embeddings.position_ids": torch.arange(40)[None]}
    torch.save(state, old / "pytorch_model.bin")
    shutil.copy(tmp_path / "st" / "config.json", old / "config.json")
    ids, mask = inputs()
    for folder in (tmp_path / "st", old):
        ours = ConvBertModel.from_pretrained(folder)
        assert ours.config.attention_type == "plain" and ours.config.num_groups == 1
        assert ours.config.hf_model_type == "electra"
        assert_same_hidden_states(ours, theirs.electra, ids, mask)
        tensors, _ = hf.read_state_dict(folder)
        head = hf.read_discriminator_head(folder, tensors)
        for key in hf.DISCRIMINATOR_HEAD_KEYS:
            assert torch.equal(head[key], theirs.state_dict()[f"discriminator_predictions.{key}"])


def test_a_hub_electra_folder_fine_tunes_and_predicts(tmp_path, finetune_and_predict):
    """e.g. google/electra-small-discriminator (config.json, weights, vocab.txt) as `--model`: the way to check the
    fine-tuning recipe against the published ELECTRA numbers before trusting one's own pre-training."""
    torch.manual_seed(0)
    transformers.ElectraForPreTraining(electra_config(vocab_size=10)).save_pretrained(tmp_path / "electra")
    (tmp_path / "electra" / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "ran"]) + "\n")
    finetune_and_predict(tmp_path / "electra")


def test_fields_an_electra_config_leaves_out_take_transformers_defaults(tmp_path):
    """A config.json without `num_attention_heads` (or `embedding_size`) builds what transformers' ElectraConfig
    builds: ELECTRA's 4 heads and 128-wide embeddings, not ConvBERT-base's 12 heads. Plain attention has the same
    tensors for any head count, so another default loaded silently and computed something else."""
    torch.manual_seed(0)
    hf_model = transformers.ElectraModel(electra_config(hidden_size=96, embedding_size=128)).eval()
    hf_model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    values = json.loads(config_file.read_text())
    del values["num_attention_heads"], values["embedding_size"]
    config_file.write_text(json.dumps(values))
    theirs = transformers.ElectraModel.from_pretrained(tmp_path).eval()
    ours = ConvBertModel.from_pretrained(tmp_path).eval()
    assert ours.config.num_attention_heads == theirs.config.num_attention_heads == 4
    assert ours.config.embedding_size == theirs.config.embedding_size == 128
    assert_same_hidden_states(ours, theirs, *inputs())


def test_plain_models_are_written_in_electra_layout(tmp_path):
    """A plain-attention model with an ungrouped FFN is saved as ELECTRA: transformers' ElectraModel loads it with no
    missing or unexpected key and computes the same; the config survives the round trip. With a grouped FFN it
    stays in the ConvBERT layout, which no transformers class can load, and `transformers_limits` says so."""
    torch.manual_seed(0)
    config = ConvBertConfig(**{**SMALL, "num_attention_heads": 8}, attention_type="plain", conv_kernel_size=7,
                            hidden_dropout_prob=0.0, extra={"preset": "custom"})
    ours = ConvBertModel(config).eval()
    ours.save_pretrained(tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert written["model_type"] == "electra" and written["architectures"] == ["ElectraModel"]
    theirs, info = transformers.ElectraModel.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert theirs.config.num_attention_heads == 8
    assert_same_hidden_states(ours, theirs.eval(), *inputs())
    assert ConvBertModel.from_pretrained(tmp_path / "m").config == config
    assert hf.transformers_limits("discriminator", config) == []

    grouped = config.replace(num_groups=2)
    ConvBertModel(grouped).save_pretrained(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["model_type"] == "convbert"
    assert ConvBertModel.from_pretrained(tmp_path / "g").config == grouped
    (note,) = hf.transformers_limits("discriminator", grouped)
    assert note.startswith("the discriminator uses plain self-attention with a grouped FFN (2 groups)")


def test_electra_configs_convbert_cannot_represent_are_refused(tmp_path):
    base = electra_config().to_dict()
    for changes, message in (
        ({"position_embedding_type": "relative_key"}, "'position_embedding_type' is 'relative_key': only 'absolute'"),
        ({"convbert_extra": {"attention_type": "mixed"}}, "an ELECTRA folder holds plain attention"),
        ({"model_type": "bert"}, "'model_type' is 'bert': expected 'convbert', 'conv_bert' or 'electra'"),
    ):
        with pytest.raises(ConvBertError, match=message):
            ConvBertConfig.from_hf_dict({**base, **changes}, source="x/config.json")


def hub_pair(vocab_size: int, hidden: int, generator_hidden: int):
    """An ELECTRA discriminator and generator as the hub has them (separate ElectraForPreTraining and
    ElectraForMaskedLM folders), sharing one embedding table as ELECTRA's pre-training does."""
    common = dict(vocab_size=vocab_size, max_position_embeddings=64, num_hidden_layers=2, embedding_size=16)
    disc = transformers.ElectraForPreTraining(electra_config(hidden_size=hidden, num_attention_heads=hidden // 16,
                                                             intermediate_size=4 * hidden, **common)).eval()
    gen = transformers.ElectraForMaskedLM(electra_config(
        hidden_size=generator_hidden, num_attention_heads=generator_hidden // 16,
        intermediate_size=4 * generator_hidden, **common)).eval()
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    gen.generator_lm_head.weight = gen.electra.embeddings.word_embeddings.weight  # tied, as transformers ties it
    return disc, gen


def test_pre_training_continues_from_hub_electra_folders_and_exports_what_transformers_loads(tmp_path):
    """The released ELECTRA weights as a starting point (peers' need #10): MODEL = a google/electra-*-discriminator
    folder, MODEL/generator = the matching generator folder. With lr 0 the run's first checkpoint holds exactly
    their weights (both encoders, both heads), and its export loads in transformers' ElectraForPreTraining and
    ElectraForMaskedLM with the hub models' outputs."""
    from convbert.data import build_dataset
    from convbert.pretrain.config import resolve_config
    from convbert.pretrain.export import export_checkpoint
    from convbert.pretrain.trainer import run_pretraining

    words = [f"w{i}" for i in range(60)]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(" ".join(words[(d * 7 + i * 3 + j) % 60] for j in range(6 + i % 5))
                                            for i in range(6)) for d in range(40)) + "\n")
    build_dataset([str(corpus)], str(vocab), str(tmp_path / "data"), max_seq_length=32, progress=False)

    torch.manual_seed(0)
    disc, gen = hub_pair(vocab_size=65, hidden=64, generator_hidden=32)
    model = tmp_path / "electra"
    disc.save_pretrained(model)
    gen.save_pretrained(model / "generator")
    shutil.copy(vocab, model / "vocab.txt")

    flags = dict(data=str(tmp_path / "data"), output=str(tmp_path / "run"), init_from=str(model), attention="plain",
                 steps=1, batch_size=4, lr=0.0, eval_batches=1, save_every=1, threads=1)
    assert run_pretraining(resolve_config("small", None, flags, None), progress=False)["finished"]
    (latest,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    weights = load_file(str(latest / "model.safetensors"))
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert recorded["model_config"]["hidden_size"] == 64 and recorded["generator_config"]["hidden_size"] == 32
    expected = {**{f"discriminator.{k[len('electra.'):]}": v for k, v in disc.state_dict().items()
                   if k.startswith("electra.")},
                **{f"discriminator_head.{k[len('discriminator_predictions.'):]}": v for k, v in disc.state_dict().items()
                   if k.startswith("discriminator_predictions.")},
                **{f"generator.{k[len('electra.'):]}": v for k, v in gen.state_dict().items()
                   if k.startswith("electra.") and not k.startswith("electra.embeddings.")},
                **{f"generator_head.{k[len('generator_predictions.'):]}": v for k, v in gen.state_dict().items()
                   if k.startswith("generator_predictions.")},
                "generator_head.output_bias": gen.state_dict()["generator_lm_head.bias"]}
    assert len(expected) == len(weights), sorted(set(weights) ^ set(expected))
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key

    export_checkpoint(tmp_path / "run", tmp_path / "export", generator=True)
    ids, mask = inputs(65)
    loaded_disc = transformers.ElectraForPreTraining.from_pretrained(tmp_path / "export").eval()
    loaded_gen = transformers.ElectraForMaskedLM.from_pretrained(tmp_path / "export" / "generator").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_disc(ids, attention_mask=mask).logits, disc(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded_gen(ids, attention_mask=mask).logits, gen(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)
    # and the export is itself a starting point, as the hub folders were
    flags.update(output=str(tmp_path / "again"), init_from=str(tmp_path / "export"))
    assert run_pretraining(resolve_config("small", None, flags, None), progress=False)["finished"]
    (again,) = (tmp_path / "again" / "checkpoints").glob("step-*")
    assert all(torch.equal(v, weights[k]) for k, v in load_file(str(again / "model.safetensors")).items())
