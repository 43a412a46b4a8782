"""`convbert import-tf`: original TensorFlow checkpoints → our model, without TensorFlow.

The anchor is `tests/tf_fixture/`: a checkpoint written by TensorFlow itself (`make_tf_fixture.py`) under the original
variable names, with what TensorFlow's own ops computed from its layer-0 weights. The edge cases use `write_bundle`
below, a minimal writer of the same format, checked first against the TensorFlow-written file.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from convbert import ConvBertConfig, ConvBertModel
from convbert.errors import ConvBertError
from convbert.interop.tf import import_tf_checkpoint, infer_config, matching_preset
from convbert.interop.tf_bundle import TABLE_MAGIC, TFCheckpoint, masked_crc32c

FIXTURE = Path(__file__).parent / "tf_fixture"
PREFIX = FIXTURE / "model.ckpt-1234"
REPO = Path(__file__).resolve().parent.parent


# --- a minimal writer of TensorFlow's bundle format (uncompressed, one data shard) ----------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _entry_proto(dtype: int, shape: tuple[int, ...], offset: int, data: bytes, shard: int = 0) -> bytes:
    dims = b"".join(_field(2, 2, _varint(len(d)) + d) for d in (_field(1, 0, _varint(s)) for s in shape))
    return (_field(1, 0, _varint(dtype)) + _field(2, 2, _varint(len(dims)) + dims)
            + (_field(3, 0, _varint(shard)) if shard else b"") + _field(4, 0, _varint(offset))
            + _field(5, 0, _varint(len(data))) + _field(6, 5, struct.pack("<I", masked_crc32c(data))))


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int = 1) -> bytes:
    """Entries with keys prefix-compressed against the previous one, a full key every `restart_interval` entries."""
    body, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        else:
            restarts.append(len(body))
        body += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(body) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))


def write_bundle(prefix: Path, tensors: dict[str, np.ndarray], per_block: int = 10**9, restart_interval: int = 1,
                 shards: int = 1):
    """`per_block` entries per data block (the index block points at each), keys compressed as `_block` says, the
    tensors dealt round-robin over `shards` data files (as a sharded `tf.train.Saver` spreads them over devices)."""
    codes = {np.dtype("float32"): 1, np.dtype("int64"): 9, np.dtype("float16"): 19}
    data = [bytearray() for _ in range(shards)]
    entries = [(b"", _field(1, 0, _varint(shards)))]  # the header: shard count (little-endian by default)
    for i, name in enumerate(sorted(tensors)):
        array = np.array(tensors[name], order="C")  # (ascontiguousarray would make a scalar 1-d)
        raw, shard = array.tobytes(), i % shards
        entries.append((name.encode(), _entry_proto(codes[array.dtype], array.shape, len(data[shard]), raw, shard)))
        data[shard] += raw
    for shard, content in enumerate(data):
        prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{shards:05d}").write_bytes(bytes(content))
    index = bytearray()

    def put_block(block: bytes) -> bytes:
        handle = _varint(len(index)) + _varint(len(block))
        index.extend(block + b"\x00" + struct.pack("<I", masked_crc32c(block + b"\x00")))
        return handle

    pointers = []
    for start in range(0, len(entries), per_block):
        chunk = entries[start:start + per_block]
        pointers.append((chunk[-1][0] + b"\xff", put_block(_block(chunk, restart_interval))))
    meta_handle = put_block(_block([]))
    index_handle = put_block(_block(pointers))
    footer = meta_handle + index_handle
    index.extend(footer + b"\x00" * (40 - len(footer)) + struct.pack("<Q", TABLE_MAGIC))
    prefix.with_name(prefix.name + ".index").write_bytes(bytes(index))


def fixture_tensors() -> dict[str, np.ndarray]:
    with TFCheckpoint(PREFIX) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names() if n != "probe/bfloat16"}


def copy_fixture(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in FIXTURE.glob("model.ckpt-1234.*"):
        shutil.copy(f, folder / f.name)
    return folder / PREFIX.name


# --- the reader ----------------------------------------------------------------------------------------------

def test_reader_reads_the_tensorflow_written_fixture():
    with TFCheckpoint(FIXTURE) as ckpt:  # a folder with one checkpoint resolves to its prefix
        assert ckpt.prefix == PREFIX
        names = ckpt.names()
        weights = [n for n in names if not n.endswith(("/adam_m", "/adam_v"))]
        assert len(weights) == 112 and "global_step" in weights and "probe/bfloat16" in weights
        assert len(names) == 112 + 2 * 110  # every weight has its two Adam slots
        assert int(ckpt.read("global_step")) == 1234 and ckpt.read("global_step").dtype == np.int64
        # bfloat16 widened to float32; 3.0e5 is not representable in bf16 and TF rounded it to 299008
        assert ckpt.read("probe/bfloat16").tolist() == [1.5, -2.25, 299008.0]
        q = ckpt.read("electra/encoder/layer_1/attention/self/query/kernel")
        assert q.shape == (24, 12) and q.dtype == np.float32 and np.isfinite(q).all() and q.std() > 0.1
        assert ckpt.entry("electra/encoder/layer_0/intermediate/g_dense/kernel").shape == (2, 12, 24)


def test_writer_used_below_matches_what_tensorflow_wrote(tmp_path):
    tensors = fixture_tensors()
    write_bundle(tmp_path / "copy", tensors)
    with TFCheckpoint(tmp_path / "copy") as ckpt:
        assert ckpt.names() == sorted(tensors)
        assert all(np.array_equal(ckpt.read(n), tensors[n]) for n in tensors)
    # Many small blocks with prefix-compressed keys (TF restarts every 16 keys) read the same.
    write_bundle(tmp_path / "blocks", tensors, per_block=7, restart_interval=16)
    with TFCheckpoint(tmp_path / "blocks") as ckpt:
        assert ckpt.names() == sorted(tensors)
        assert all(np.array_equal(ckpt.read(n), tensors[n]) for n in tensors)
    # Three data shards (a sharded Saver): each entry names its file.
    write_bundle(tmp_path / "sharded", tensors, shards=3)
    assert len(list(tmp_path.glob("sharded.data-*-of-00003"))) == 3
    with TFCheckpoint(tmp_path / "sharded") as ckpt:
        assert ckpt.num_shards == 3 and {ckpt.entry(n).shard for n in tensors} == {0, 1, 2}
        assert all(np.array_equal(ckpt.read(n), tensors[n]) for n in tensors)
    # The data file is the same bytes TF wrote (same order, no padding), less the bf16 probe's 6 bytes.
    ours = (tmp_path / "copy.data-00000-of-00001").read_bytes()
    theirs = PREFIX.with_name(PREFIX.name + ".data-00000-of-00001").read_bytes()
    assert len(ours) == len(theirs) - 6


@pytest.mark.parametrize("damage, message", [
    ("flip_data", "checksum mismatch"),
    ("truncate_data", "truncated download"),
    ("remove_data", "missing"),
    ("truncate_index", "bad footer"),
    ("flip_index", "checksum"),
])
def test_damaged_checkpoints_are_named_not_read(tmp_path, damage, message):
    prefix = copy_fixture(tmp_path)
    data = prefix.with_name(prefix.name + ".data-00000-of-00001")
    index = prefix.with_name(prefix.name + ".index")
    if damage == "flip_data":
        raw = bytearray(data.read_bytes())
        with TFCheckpoint(prefix) as ckpt:
            raw[ckpt.entry("electra/encoder/layer_0/attention/self/query/kernel").offset + 17] ^= 0x10
        data.write_bytes(bytes(raw))
    elif damage == "truncate_data":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "remove_data":
        data.unlink()
    elif damage == "truncate_index":
        index.write_bytes(index.read_bytes()[:-10])
    else:
        raw = bytearray(index.read_bytes())
        raw[200] ^= 0x01
        index.write_bytes(bytes(raw))
    with pytest.raises(ConvBertError, match=message) as info:
        import_tf_checkpoint(prefix, tmp_path / "out")
    assert str(prefix.parent) in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written


# --- the conversion ------------------------------------------------------------------------------------------

def test_config_is_read_off_the_shapes():
    with TFCheckpoint(PREFIX) as ckpt:
        disc, gen = infer_config(ckpt), infer_config(ckpt, "generator")
    assert (disc.vocab_size, disc.embedding_size, disc.hidden_size, disc.num_hidden_layers) == (40, 16, 24, 2)
    assert (disc.num_attention_heads, disc.head_ratio, disc.conv_kernel_size) == (4, 2, 5)
    assert (disc.intermediate_size, disc.num_groups, disc.max_position_embeddings) == (48, 2, 32)
    assert disc.branch_width == 12 and disc.reduced_heads == 2
    assert "preset" not in disc.extra and matching_preset(disc) is None  # off the presets on purpose
    assert matching_preset(ConvBertConfig.from_preset("medium-small", vocab_size=21128)) == "medium-small"
    assert matching_preset(ConvBertConfig.from_preset("base", conv_kernel_size=7)) is None
    # The generator (1 head < head_ratio: one head in each branch, spec §1.6) shares electra/embeddings.
    assert (gen.hidden_size, gen.num_attention_heads, gen.branch_width, gen.embedding_size) == (12, 1, 12, 16)


def test_converted_layers_compute_what_tensorflow_computed(tmp_path):
    """The layout changes, checked by what the layers do: TF's separable_conv1d and the original grouped dense."""
    import_tf_checkpoint(PREFIX, tmp_path / "model")
    model = ConvBertModel.from_pretrained(tmp_path / "model")
    ref = {k: torch.from_numpy(v) for k, v in load_numpy(str(FIXTURE / "reference.safetensors")).items()}
    layer = model.encoder.layer[0]
    with torch.no_grad():
        conv = layer.attention.self.key_conv_attn_layer(ref["input"])
        grouped = layer.intermediate.dense(ref["input"])
    torch.testing.assert_close(conv, ref["separable_conv"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, ref["grouped_dense"], atol=1e-5, rtol=1e-5)


def test_import_writes_hf_layout_folders_that_load_and_run(tmp_path):
    ckpt = tmp_path / "models" / "convbert_tiny"  # the original code's DATA_DIR/models/NAME/ and DATA_DIR/vocab.txt
    ckpt.mkdir(parents=True)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]) + "\n")
    for f in FIXTURE.glob("model.ckpt-1234.*"):
        shutil.copy(f, ckpt / f.name)
    out = tmp_path / "model"
    result = subprocess.run([sys.executable, "-m", "convbert", "import-tf", "--checkpoint", str(ckpt),
                             "--output", str(out), "--generator"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "step 1234" in result.stdout and "4 heads, kernel 5, 2 FFN group(s)" in result.stdout
    assert f"vocab {vocab}" in result.stdout
    record = json.loads((out / "import.json").read_text())
    assert record["step"] == 1234 and record["vocab"] == str(vocab)
    assert (out / "vocab.txt").read_text() == vocab.read_text() == (out / "generator" / "vocab.txt").read_text()

    tf = fixture_tensors()
    state = load_file(str(out / "model.safetensors"))
    assert torch.equal(state["encoder.layer.1.attention.self.query.weight"],
                       torch.from_numpy(tf["electra/encoder/layer_1/attention/self/query/kernel"].T.copy()))
    assert torch.equal(state["embeddings.LayerNorm.weight"], torch.from_numpy(tf["electra/embeddings/LayerNorm/gamma"]))
    # The replaced-token head, beside the HF files, for `pretrain --init-from`.
    head = load_file(str(out / "discriminator_head.safetensors"))
    assert torch.equal(head["dense_prediction.weight"],
                       torch.from_numpy(tf["discriminator_predictions/dense_1/kernel"].T.copy()))
    assert head["dense.weight"].shape == (24, 24) and head["dense_prediction.bias"].shape == (1,)
    gen = load_file(str(out / "generator" / "model.safetensors"))
    # The generator shares the discriminator's embeddings; its head keeps the original's output bias.
    assert torch.equal(gen["convbert.embeddings.word_embeddings.weight"], state["embeddings.word_embeddings.weight"])
    assert torch.equal(gen["generator_lm_head.bias"], torch.from_numpy(tf["generator_predictions/output_bias"]))
    assert torch.equal(gen["generator_predictions.dense.weight"],
                       torch.from_numpy(tf["generator_predictions/dense/kernel"].T.copy()))

    model = ConvBertModel.from_pretrained(out)
    generator = ConvBertModel.from_pretrained(out / "generator")
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
        assert hidden.shape == (2, 9, 24) and torch.isfinite(hidden).all()
        assert generator(ids).last_hidden_state.shape == (2, 9, 12)


def test_the_vocab_two_folders_up_is_found_from_a_relative_checkpoint_path(tmp_path, monkeypatch):
    """`--checkpoint convbert_tiny/model.ckpt-1234` typed inside DATA_DIR/models/: the search climbs above the working
    folder as it does from an absolute path (it stopped at `.`: the import had no vocab)."""
    from convbert.interop.tf import find_vocab

    ckpt = tmp_path / "models" / "convbert_tiny"
    ckpt.mkdir(parents=True)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n")
    monkeypatch.chdir(tmp_path / "models")
    for prefix in ("convbert_tiny/model.ckpt-1234", "./convbert_tiny/model.ckpt-1234"):
        assert find_vocab(Path(prefix)) == vocab
    monkeypatch.chdir(ckpt)
    assert find_vocab(Path("model.ckpt-1234")) == vocab
    # Entered through a linked folder, the shell's $PWD keeps the link's parents (getcwd() has the target's).
    elsewhere = tmp_path / "scratch" / "a" / "b" / "c" / "run"
    elsewhere.mkdir(parents=True)
    (ckpt / "linked").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.chdir(ckpt / "linked")
    monkeypatch.setenv("PWD", str(ckpt / "linked"))
    assert find_vocab(Path("../../model.ckpt-1234")) == vocab  # ckpt/linked/../.. is models/, then tmp_path
    monkeypatch.setenv("PWD", "/somewhere/else")  # a stale $PWD is not trusted
    assert find_vocab(Path("../../model.ckpt-1234")) is None  # from the link's target: scratch/a/b and above
    vocab.unlink()
    monkeypatch.chdir(ckpt)
    assert find_vocab(Path("model.ckpt-1234")) is None


def test_import_tf_of_the_working_folder_itself(tmp_path, monkeypatch, capsys):
    """`--checkpoint .` inside the checkpoint's folder: it raised a ValueError traceback (Path('.') has no name)."""
    from convbert.cli import main

    (tmp_path / "models").mkdir()
    prefix = copy_fixture(tmp_path / "models")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                  [f"w{i}" for i in range(35)]) + "\n")
    monkeypatch.chdir(prefix.parent)
    monkeypatch.setenv("PWD", str(prefix.parent))
    for checkpoint in (".", "./"):
        out = tmp_path / f"out{len(checkpoint)}"
        assert main(["import-tf", "--checkpoint", checkpoint, "--output", str(out)]) == 0, capsys.readouterr().err
        assert (out / "vocab.txt").is_file() and (out / "model.safetensors").is_file()


def test_transformers_reads_the_converted_discriminator_and_agrees(tmp_path):
    transformers = pytest.importorskip("transformers")
    import_tf_checkpoint(PREFIX, tmp_path / "model")
    ours = ConvBertModel.from_pretrained(tmp_path / "model")
    theirs = transformers.ConvBertModel.from_pretrained(str(tmp_path / "model")).eval()
    ids = torch.randint(0, 40, (3, 11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).last_hidden_state,
                                   theirs(ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_unknown_missing_or_bad_variables_are_refused(tmp_path):
    tensors = fixture_tensors()
    cases = {
        "unknown": ({**tensors, "electra/encoder/layer_0/attention/self/rel_pos/kernel": np.zeros(3, np.float32)},
                    "rel_pos/kernel are not part of the ConvBERT layout"),
        "missing": ({k: v for k, v in tensors.items() if k != "electra/encoder/layer_1/output/LayerNorm/beta"},
                    "layer_1/output/LayerNorm/beta not found"),
        "nan": ({**tensors, "electra/embeddings_project/bias": np.full(24, np.nan, np.float32)},
                "embeddings_project/bias holds NaN"),
        "not_convbert": ({"bert/embeddings/word_embeddings": np.zeros((4, 2), np.float32)},
                         "electra/embeddings/word_embeddings not found"),
    }
    for name, (variables, message) in cases.items():
        write_bundle(tmp_path / name, variables)
        with pytest.raises(ConvBertError, match=message):
            import_tf_checkpoint(tmp_path / name, tmp_path / f"out-{name}")
    # No generator in the file: --generator says so.
    write_bundle(tmp_path / "disc", {k: v for k, v in tensors.items() if not k.startswith("generator")})
    with pytest.raises(ConvBertError, match="has no generator"):
        import_tf_checkpoint(tmp_path / "disc", tmp_path / "out-disc", generator=True)
    # fp16 weights are read and widened.
    half = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in tensors.items()}
    write_bundle(tmp_path / "half", half)
    import_tf_checkpoint(tmp_path / "half", tmp_path / "out-half")
    state = load_file(str(tmp_path / "out-half" / "model.safetensors"))
    assert state["embeddings_project.bias"].dtype == torch.float32
    assert torch.equal(state["embeddings_project.bias"],
                       torch.from_numpy(half["electra/embeddings_project/bias"].astype(np.float32)))


def test_outputs_that_would_lose_files_are_refused(tmp_path):
    prefix = copy_fixture(tmp_path)
    with pytest.raises(ConvBertError, match="checkpoint's own folder"):
        import_tf_checkpoint(prefix, prefix.parent)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "paper.txt").write_text("mine")
    with pytest.raises(ConvBertError, match="holds other files"):
        import_tf_checkpoint(prefix, tmp_path / "notes")
    big = tmp_path / "big_vocab.txt"
    big.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(36)]) + "\n")
    with pytest.raises(ConvBertError, match="41 entries, but the checkpoint has 40"):
        import_tf_checkpoint(prefix, tmp_path / "out", vocab=big)
    import_tf_checkpoint(prefix, tmp_path / "out", generator=True)
    import_tf_checkpoint(prefix, tmp_path / "out")  # an earlier import is replaced whole: no stale generator/
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "discriminator_head.safetensors", "import.json", "model.safetensors"]
    assert json.loads((tmp_path / "out" / "import.json").read_text())["step"] == 1234


def test_several_checkpoints_in_a_folder_must_be_named(tmp_path):
    prefix = copy_fixture(tmp_path)
    for f in prefix.parent.glob("model.ckpt-1234.*"):
        shutil.copy(f, f.with_name(f.name.replace("1234", "2000")))
    with pytest.raises(ConvBertError, match="holds 2 checkpoints"):
        TFCheckpoint(prefix.parent)
    # TensorFlow's own `checkpoint` file names the latest; its absolute path from another machine is not needed.
    (prefix.parent / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/run/model.ckpt-2000"\n')
    assert TFCheckpoint(prefix.parent).prefix.name == "model.ckpt-2000"


def test_fixture_is_what_its_script_writes(tmp_path):
    """Where TensorFlow is installed: the committed fixture is exactly what `make_tf_fixture.py` writes."""
    pytest.importorskip("tensorflow")
    subprocess.run([sys.executable, str(FIXTURE / "make_tf_fixture.py"), str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("model.ckpt-1234.data-00000-of-00001", "model.ckpt-1234.index", "reference.safetensors"):
        assert (tmp_path / name).read_bytes() == (FIXTURE / name).read_bytes(), name


def test_transformers_own_tensorflow_loader_gives_the_same_weights(tmp_path):
    """Where TensorFlow and transformers 4.x are installed: HF's `load_tf_weights_in_convbert` (the code that made
    the hub's YituTech/conv-bert-* weights from the original checkpoints) reads the fixture into the same tensors."""
    pytest.importorskip("tensorflow")
    modeling = pytest.importorskip("transformers.models.convbert.modeling_convbert")
    if not hasattr(modeling, "load_tf_weights_in_convbert"):
        pytest.skip("this transformers has no TensorFlow loader (removed in v5)")
    import transformers

    import_tf_checkpoint(PREFIX, tmp_path / "model")
    values = json.loads((tmp_path / "model" / "config.json").read_text())
    config = transformers.ConvBertConfig(**{k: v for k, v in values.items()
                                            if k not in ("architectures", "convbert_extra", "model_type")})
    model = transformers.ConvBertModel(config)
    modeling.load_tf_weights_in_convbert(model, config, str(PREFIX))
    theirs = {k: v for k, v in model.state_dict().items() if "position_ids" not in k}
    ours = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _electra_tf_names(state: dict[str, torch.Tensor], scope: str, embeddings: bool) -> dict[str, np.ndarray]:
    """An HF ElectraModel's weights under the original ELECTRA code's TF names and layouts (BERT's)."""
    out = {}
    for key, value in state.items():
        if "position_ids" in key or "token_type_ids" in key:
            continue
        v = value.detach().numpy()
        name = key.replace("encoder.layer.", "encoder/layer_").replace(".", "/")
        name = name.replace("LayerNorm/weight", "LayerNorm/gamma").replace("LayerNorm/bias", "LayerNorm/beta")
        if name.endswith("/weight") and "embeddings/" not in name:
            name, v = name[: -len("weight")] + "kernel", v.T
        elif name.startswith("embeddings/") and name.endswith("/weight"):
            name = name[: -len("/weight")]
        if name.startswith("embeddings/"):
            if embeddings:
                out[f"electra/{name}"] = np.ascontiguousarray(v)
            continue
        out[f"{scope}/{name}"] = np.ascontiguousarray(v)
    return out


def test_electra_checkpoints_become_the_plain_attention_model_and_match_transformers_electra(tmp_path):
    """ELECTRA's TF checkpoints have no conv branch: they import as our plain-attention model (the paper's baseline),
    which must compute what transformers' ElectraModel computes from the same weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=50, embedding_size=16, num_hidden_layers=2, max_position_embeddings=40,
                  hidden_act="gelu", layer_norm_eps=1e-12)
    disc = transformers.ElectraModel(transformers.ElectraConfig(
        hidden_size=128, num_attention_heads=2, intermediate_size=256, **common)).eval()
    gen = transformers.ElectraModel(transformers.ElectraConfig(
        hidden_size=64, num_attention_heads=1, intermediate_size=128, **common)).eval()
    gen.embeddings.load_state_dict(disc.embeddings.state_dict())  # ELECTRA's generator shares the embeddings
    tensors = {**_electra_tf_names(disc.state_dict(), "electra", True),
               **_electra_tf_names(gen.state_dict(), "generator", False),
               "global_step": np.array(7, np.int64)}
    head = {"generator_predictions/dense/kernel": np.zeros((64, 16), np.float32),
            "generator_predictions/dense/bias": np.zeros(16, np.float32),
            "generator_predictions/LayerNorm/gamma": np.ones(16, np.float32),
            "generator_predictions/LayerNorm/beta": np.zeros(16, np.float32),
            "generator_predictions/output_bias": np.zeros(50, np.float32)}
    (tmp_path / "electra").mkdir()
    write_bundle(tmp_path / "electra" / "model.ckpt-7", {**tensors, **head})
    result = subprocess.run([sys.executable, "-m", "convbert", "import-tf", "--checkpoint", str(tmp_path / "electra"),
                             "--output", str(tmp_path / "out"), "--generator"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "2 heads, plain attention (ELECTRA)" in result.stdout  # hidden 128 / ELECTRA's head size 64
    ids = torch.randint(0, 50, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    for ours_dir, theirs, cls in ((tmp_path / "out", disc, transformers.ElectraModel),
                                  (tmp_path / "out" / "generator", gen, transformers.ElectraForMaskedLM)):
        ours = ConvBertModel.from_pretrained(ours_dir)
        assert ours.config.attention_type == "plain"
        # written in ELECTRA's HF layout: transformers' own ELECTRA classes load the folders as they are
        loaded = cls.from_pretrained(ours_dir).eval()
        loaded = getattr(loaded, "electra", loaded)
        with torch.no_grad():
            expected = theirs(ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(ours(ids, attention_mask=mask).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loaded(ids, attention_mask=mask).last_hidden_state, expected, atol=1e-5,
                                       rtol=1e-5)
    # The head count is not in the shapes: --num-heads overrides the default, and is refused for ConvBERT.
    import_tf_checkpoint(tmp_path / "electra", tmp_path / "out4", num_heads=4)
    assert ConvBertModel.from_pretrained(tmp_path / "out4").config.num_attention_heads == 4
    with pytest.raises(ConvBertError, match="--num-heads 3: .* has 4 heads"):
        import_tf_checkpoint(PREFIX, tmp_path / "x", num_heads=3)


def test_an_electra_width_off_the_64_wide_heads_needs_num_heads(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.ElectraModel(transformers.ElectraConfig(
        vocab_size=30, embedding_size=8, hidden_size=48, num_attention_heads=3, intermediate_size=96,
        num_hidden_layers=1, max_position_embeddings=16))
    write_bundle(tmp_path / "e", _electra_tf_names(model.state_dict(), "electra", True))
    with pytest.raises(ConvBertError, match="hidden size 48 is not a multiple of ELECTRA's head size 64; give the "
                                            "head count with --num-heads"):
        import_tf_checkpoint(tmp_path / "e", tmp_path / "out")
    import_tf_checkpoint(tmp_path / "e", tmp_path / "out", num_heads=3)
    assert ConvBertModel.from_pretrained(tmp_path / "out").config.num_attention_heads == 3


def test_an_imported_model_fine_tunes_and_predicts(tmp_path, finetune_and_predict):
    """The imported folder is a `--model` like any other: finetune, then predict."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "ran"]) + "\n")
    import_tf_checkpoint(PREFIX, tmp_path / "model", vocab=vocab)
    finetune_and_predict(tmp_path / "model")


def test_pre_training_continues_from_an_imported_checkpoint(tmp_path):
    """The released-weights path end to end: import-tf, build the data with the model's vocab, then
    `pretrain --init-from`; with lr 0 the first checkpoint holds the TensorFlow weights, heads included."""
    from convbert.data import build_dataset
    from convbert.pretrain.config import resolve_config
    from convbert.pretrain.trainer import run_pretraining

    words = [f"w{i}" for i in range(35)]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    import_tf_checkpoint(PREFIX, tmp_path / "model", vocab=vocab)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(" ".join(words[(d * 7 + i * 3 + j) % 35] for j in range(6 + i % 5))
                                            for i in range(6)) for d in range(40)) + "\n")
    build_dataset([str(corpus)], str(vocab), str(tmp_path / "data"), max_seq_length=32, progress=False)
    flags = dict(data=str(tmp_path / "data"), output=str(tmp_path / "run"), init_from=str(tmp_path / "model"),
                 steps=1, batch_size=4, lr=0.0, eval_batches=1, save_every=1, threads=1)
    result = run_pretraining(resolve_config("tiny", None, flags, None), progress=False)
    assert result["finished"]
    (latest,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    weights = load_file(str(latest / "model.safetensors"))
    tf = fixture_tensors()
    assert torch.equal(weights["discriminator.encoder.layer.1.attention.self.conv_kernel_layer.weight"],
                       torch.from_numpy(tf["electra/encoder/layer_1/attention/self/conv_attn_kernel/kernel"].T.copy()))
    assert torch.equal(weights["discriminator_head.dense_prediction.bias"],
                       torch.from_numpy(tf["discriminator_predictions/dense_1/bias"]))
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())["model_config"]
    assert (recorded["hidden_size"], recorded["conv_kernel_size"], recorded["num_groups"]) == (24, 5, 2)


def _fine_tuned(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The fixture as the original fine-tuning saves it: the encoder plus task_specific/<task>/dense heads (with
    their Adam slots), no generator."""
    rng = np.random.default_rng(0)
    tensors = {k: v for k, v in fixture_tensors().items() if not k.startswith("generator")}
    for task, labels in (("mnli", 3), ("sts", 1)):
        tensors[f"task_specific/{task}/dense/kernel"] = rng.standard_normal((24, labels)).astype(np.float32)
        tensors[f"task_specific/{task}/dense/bias"] = rng.standard_normal(labels).astype(np.float32)
        tensors[f"task_specific/{task}/dense/kernel/adam_m"] = np.zeros((24, labels), np.float32)
    write_bundle(tmp_path / "finetuned", tensors)
    return tmp_path / "finetuned", tensors


def test_a_fine_tuned_checkpoints_task_head_becomes_the_folders_classifier(tmp_path):
    from convbert.model import ConvBertForSequenceClassification

    prefix, tf = _fine_tuned(tmp_path)
    out = tmp_path / "mnli-model"
    result = subprocess.run([sys.executable, "-m", "convbert", "import-tf", "--checkpoint", str(prefix),
                             "--output", str(out), "--task", "mnli"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "mnli classifier" in result.stdout
    assert "head(s) sts under task_specific/ were left out" in result.stdout
    record = json.loads((out / "import.json").read_text())
    assert record["task"] == {"name": "mnli", "num_labels": 3}
    model = ConvBertForSequenceClassification.from_pretrained(out)
    assert model.num_labels == 3 and not model.training
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        logits = model(ids)
        cls = model.convbert(ids).last_hidden_state[:, 0].numpy()
    # TF's dense on the [CLS] vector: x @ kernel + bias
    want = cls @ tf["task_specific/mnli/dense/kernel"] + tf["task_specific/mnli/dense/bias"]
    np.testing.assert_allclose(logits.numpy(), want, rtol=1e-5, atol=1e-5)

    # Without --task the heads are named in a note and nothing of an earlier classifier survives.
    info = import_tf_checkpoint(prefix, out)
    assert any("head(s) mnli, sts under task_specific/ were left out" in n for n in info["notes"])
    assert info["task"] is None
    assert not (out / "classifier.safetensors").exists() and not (out / "head.json").exists()


def test_a_missing_or_misshapen_task_head_is_refused(tmp_path):
    prefix, tf = _fine_tuned(tmp_path)
    with pytest.raises(ConvBertError, match=r"--task qqp: .* has no task_specific/qqp/ head \(task heads found: "
                                            r"mnli, sts\)"):
        import_tf_checkpoint(prefix, tmp_path / "a", task="qqp")
    with pytest.raises(ConvBertError, match=r"task heads found: none"):
        import_tf_checkpoint(PREFIX, tmp_path / "b", task="mnli")
    wide = {**tf, "task_specific/mnli/dense/kernel": np.zeros((12, 3), np.float32)}
    write_bundle(tmp_path / "wide", wide)
    with pytest.raises(ConvBertError, match=r"task_specific/mnli/dense/kernel is \[12, 3\], expected \[24, labels\]"):
        import_tf_checkpoint(tmp_path / "wide", tmp_path / "c", task="mnli")
    extra = {**tf, "task_specific/mnli/dense_1/kernel": np.zeros((3, 3), np.float32)}
    write_bundle(tmp_path / "extra", extra)
    with pytest.raises(ConvBertError, match=r"task_specific/mnli/dense_1/kernel are not part of the ConvBERT layout"):
        import_tf_checkpoint(tmp_path / "extra", tmp_path / "d", task="mnli")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_a_glue_task_head_predicts_the_glue_test_file_as_it_is(tmp_path):
    """`import-tf --task mnli` also writes finetune_task.json with MNLI's labels and its test file's columns, so
    `convbert predict` reads test_matched.tsv directly and its probabilities are the head's softmax; `--task sts` is
    a regression; a head not named like a GLUE task gets a note and no task file."""
    from convbert.finetune.trainer import load_tokenizer
    from convbert.model import ConvBertForSequenceClassification

    prefix, tf = _fine_tuned(tmp_path)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "ran"]) + "\n")
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2")
    pairs = [("the cat sat", "the dog ran"), ("the dog", "the cat ran ran"), ("cat", "dog sat")]
    test = tmp_path / "test_matched.tsv"
    test.write_text("\n".join([header] + [f"{i}\t1\t1\tfiction\t-\t-\t-\t-\t{a}\t{b}" for i, (a, b) in
                                          enumerate(pairs)]) + "\n")
    cli = [sys.executable, "-m", "convbert"]
    for task in ("mnli", "sts"):
        out = tmp_path / task
        done = subprocess.run(cli + ["import-tf", "--checkpoint", str(prefix), "--output", str(out), "--task", task,
                                     "--vocab", str(vocab)], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert f"predict settings {out / 'finetune_task.json'}" in done.stdout
        pred = tmp_path / f"{task}.jsonl"
        done = subprocess.run(cli + ["predict", "--model", str(out), "--input", str(test), "--output", str(pred)],
                              capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in pred.read_text().splitlines()]
        model = ConvBertForSequenceClassification.from_pretrained(out)
        tok = load_tokenizer(out)
        logits = []
        width = json.loads((out / "finetune_task.json").read_text())["max_seq_length"]
        assert width == model.config.max_position_embeddings  # 128 for GLUE, cut to the fixture's 32 positions
        for a, b in pairs:  # [CLS] a [SEP] b [SEP], segments 0 then 1, padded to max_seq_length as in fine-tuning
            ia, ib = tok.encode(a), tok.encode(b)
            ids, types = [2] + ia + [3] + ib + [3], [0] * (len(ia) + 2) + [1] * (len(ib) + 1)
            mask = [1] * len(ids) + [0] * (width - len(ids))
            ids, types = ids + [0] * (width - len(ids)), types + [0] * (width - len(types))
            with torch.no_grad():
                logits.append(model(torch.tensor([ids]), attention_mask=torch.tensor([mask]),
                                    token_type_ids=torch.tensor([types]))[0].numpy())
        if task == "mnli":
            assert [set(r["probabilities"]) for r in rows] == [{"contradiction", "entailment", "neutral"}] * 3
            for r, z in zip(rows, logits):
                want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                got = [r["probabilities"][k] for k in ("contradiction", "entailment", "neutral")]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
                assert r["label"] == ("contradiction", "entailment", "neutral")[int(np.argmax(z))]
        else:
            # trained on score / 5 (ELECTRA's STS-B): scaled back and clipped to 0..5, as the submission does
            want = np.clip([5.0 * float(z.reshape(-1)[0]) for z in logits], 0.0, 5.0)
            np.testing.assert_allclose([r["score"] for r in rows], want, rtol=1e-4, atol=1e-5)
            # a folder imported before the scale was recorded: the same scores (its glue_task says sts)
            record = json.loads((out / "finetune_task.json").read_text())
            del record["score_scale"], record["score_range"]
            (out / "finetune_task.json").write_text(json.dumps(record))
            done = subprocess.run(cli + ["predict", "--model", str(out), "--input", str(test), "--output",
                                         str(tmp_path / "old.jsonl")], capture_output=True, text=True, cwd=REPO)
            assert done.returncode == 0, done.stderr
            old = [json.loads(line)["score"] for line in (tmp_path / "old.jsonl").read_text().splitlines()]
            np.testing.assert_allclose(old, want, rtol=1e-4, atol=1e-5)

    renamed = {k.replace("task_specific/mnli/", "task_specific/my_nli/"): v for k, v in tf.items()}
    write_bundle(tmp_path / "renamed", renamed)
    info = import_tf_checkpoint(tmp_path / "renamed", tmp_path / "own", vocab=vocab, task="my_nli")
    assert any("my_nli is not a GLUE task name" in n for n in info["notes"])
    assert (tmp_path / "own" / "classifier.safetensors").exists()
    assert not (tmp_path / "own" / "finetune_task.json").exists()
