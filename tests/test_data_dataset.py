"""PretrainingDataset / PretrainingLoader: layout, exact cursor resume, rank sharding, epoch shuffles."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from convbert.data import build_dataset
from convbert.data.dataset import EpochPermutation, PretrainingDataset, PretrainingLoader
from convbert.data.shards import ShardReader, ShardWriter
from convbert.errors import ConvBertError

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + WORDS) + "\n")
    rng = np.random.default_rng(0)
    lines = []
    for d in range(120):
        for _ in range(int(rng.integers(1, 12))):
            lines.append(" ".join(rng.choice(WORDS, size=int(rng.integers(1, 20)))) + " .")
        lines.append("")
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    out = root / "data"
    build_dataset([str(root / "corpus.txt")], str(vocab), str(out), max_seq_length=32, seed=0, progress=False,
                  shard_tokens=1500, chunk_bytes=2000)
    return out


def test_example_layout(built):
    ds = PretrainingDataset(built)
    assert len(ds) > 50 and ds.max_seq_length == 32 and len(ds.shards) > 1
    seen_two = False
    for i in range(len(ds)):
        a, b = ds.segments(i)
        e = ds.example(i)
        assert all(v.dtype == np.int64 and v.shape == (32,) for v in e.values())
        want = [2] + list(a) + [3] + ((list(b) + [3]) if len(b) else [])
        n = len(want)
        assert e["input_ids"][:n].tolist() == want and (e["input_ids"][n:] == 0).all()
        assert e["input_mask"].tolist() == [1] * n + [0] * (32 - n)
        assert e["segment_ids"].tolist() == [0] * (len(a) + 2) + [1] * (n - len(a) - 2) + [0] * (32 - n)
        seen_two |= len(b) > 0
    assert seen_two
    batch = ds.batch([3, 0, 3])
    assert np.array_equal(batch["input_ids"][0], ds.example(3)["input_ids"])
    assert np.array_equal(batch["segment_ids"][1], ds.example(0)["segment_ids"])
    with pytest.raises(ConvBertError, match="shorter"):
        PretrainingDataset(built, max_seq_length=16)
    assert PretrainingDataset(built, max_seq_length=40).example(0)["input_ids"].shape == (40,)


def test_shard_roundtrip(tmp_path):
    p = tmp_path / "s.bin"
    w = ShardWriter(p, 2)
    exs = [([1, 2, 3], [4]), ([], [5, 6]), ([7] * 200, [])] + [([i], [i, i]) for i in range(150)]
    for a, b in exs:
        w.add(a, b)
    w.close()
    r = ShardReader(p)
    assert r.n_examples == len(exs)
    for j, (a, b) in enumerate(exs):
        ga, gb = r.segments(j)
        assert ga.tolist() == a and gb.tolist() == b
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(ConvBertError, match="truncated"):
        ShardReader(p)


def test_permutation_is_a_seeded_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        p = EpochPermutation(n, seed=5, epoch=2)(np.arange(n))
        assert sorted(p.tolist()) == list(range(n))
    a = EpochPermutation(1000, 1, 0)(np.arange(1000))
    assert np.array_equal(a, EpochPermutation(1000, 1, 0)(np.arange(1000)))
    assert not np.array_equal(a, EpochPermutation(1000, 1, 1)(np.arange(1000)))
    assert not np.array_equal(a, EpochPermutation(1000, 2, 0)(np.arange(1000)))


def test_loader_batches_and_epochs(built):
    ds = PretrainingDataset(built)
    loader = PretrainingLoader(ds, batch_size=8, seed=1)
    b = next(loader)
    assert set(b) == {"input_ids", "input_mask", "segment_ids"}
    assert all(t.dtype == torch.int64 and t.shape == (8, 32) for t in b.values())
    loader = PretrainingLoader(ds, batch_size=8, seed=1)
    steps = len(loader)
    assert steps == len(ds) // 8
    epoch0 = np.concatenate([loader.next_indices() for _ in range(steps)])
    assert len(set(epoch0.tolist())) == steps * 8  # no repeats within an epoch
    epoch1 = np.concatenate([loader.next_indices() for _ in range(steps)])
    assert loader.epoch == 1 and not np.array_equal(epoch0, epoch1)
    # drop_last=False wraps the last batch around
    full = PretrainingLoader(ds, batch_size=8, seed=1, drop_last=False)
    idx = np.concatenate([full.next_indices() for _ in range(len(full))])
    assert set(idx.tolist()) == set(range(len(ds)))
    with pytest.raises(ConvBertError, match=r"fewer than one batch of the loader \(\d+ per rank x 2 rank\(s\)"):
        PretrainingLoader(ds, batch_size=len(ds), seed=0, world_size=2)


def test_loader_resume_is_exact(built):
    ds = PretrainingDataset(built)
    a = PretrainingLoader(ds, batch_size=16, seed=7)
    for _ in range(len(a) + 2):  # cross an epoch boundary before saving
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON (checkpoints)
    want = [next(a) for _ in range(len(a) + 1)]
    b = PretrainingLoader(ds, batch_size=16, seed=999)
    b.load_state_dict(state)
    got = [next(b) for _ in range(len(want))]
    for x, y in zip(want, got):
        for k in x:
            assert torch.equal(x[k], y[k])
    bad = dict(state, num_examples=state["num_examples"] + 1)
    with pytest.raises(ConvBertError, match="examples"):
        b.load_state_dict(bad)


def test_rank_sharding_splits_the_global_batch(built):
    ds = PretrainingDataset(built)
    world = 3
    ranks = [PretrainingLoader(ds, batch_size=4, seed=3, rank=r, world_size=world) for r in range(world)]
    single = PretrainingLoader(ds, batch_size=4 * world, seed=3)
    assert len(ranks[0]) == len(single)
    for _ in range(len(single) + 2):
        parts = [r.next_indices() for r in ranks]
        flat = np.concatenate(parts)
        assert len(set(flat.tolist())) == len(flat)  # disjoint slices
        assert np.array_equal(flat, single.next_indices())  # together: the global batch
    # a resumed rank continues its own stream
    st = ranks[1].state_dict()
    nxt = ranks[1].next_indices()
    again = PretrainingLoader(ds, batch_size=4, seed=0, rank=1, world_size=world)
    again.load_state_dict(st)
    assert np.array_equal(again.next_indices(), nxt)


def test_incomplete_dataset_is_refused(built, tmp_path):
    m = json.loads((Path(built) / "manifest.json").read_text())
    d = tmp_path / "inc"
    d.mkdir()
    m["complete"] = False
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConvBertError, match="not complete"):
        PretrainingDataset(d)
    with pytest.raises(ConvBertError, match="not found"):
        PretrainingDataset(tmp_path / "nothing")


def test_large_vocab_uses_uint32(tmp_path):
    from convbert.data.tokenize import WordPieceTokenizer

    vocab = tmp_path / "big_vocab.txt"
    filler = [f"filler{i}" for i in range(70000)]
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + filler + WORDS) + "\n")
    text = "\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(i % 9 + 1)) for i in range(200)) + "\n"
    (tmp_path / "c.txt").write_text(text)
    m = build_dataset([str(tmp_path / "c.txt")], str(vocab), str(tmp_path / "d"), max_seq_length=64,
                      progress=False)
    assert m["token_dtype"] == "uint32"
    ds = PretrainingDataset(tmp_path / "d")
    tok = WordPieceTokenizer.from_vocab(vocab)
    ids = ds.example(0)["input_ids"]
    assert ids.max() > 65535 and set(tok.decode(ids[ds.example(0)["input_mask"] == 1][1:-1])) <= set(WORDS + ["[SEP]"])


def test_a_damaged_length_table_is_found_before_training_not_when_the_example_is_drawn(built, tmp_path):
    """One length entry changed but still within max_seq_length: every later example of the shard would be read
    from the wrong offset. The lengths no longer add up to the shard's token count, which spot_check sees."""
    import shutil

    data = shutil.copytree(built, tmp_path / "data")
    shard = sorted(data.glob("shard-*.bin"))[0]
    reader = ShardReader(shard)
    offset, first = reader.lengths_offset, [int(x) for x in reader.lengths[0]]
    del reader
    raw = bytearray(shard.read_bytes())
    raw[offset:offset + 2] = (max(first[0] - 1, 0)).to_bytes(2, "little")  # segment A one token shorter
    shard.write_bytes(bytes(raw))
    ds = PretrainingDataset(data)
    with pytest.raises(ConvBertError, match=rf"{shard.name}: shard is corrupt \(its length table adds up to"):
        ds.spot_check()


def test_a_damaged_offset_table_entry_is_found_by_spot_check_and_data_stats(built, tmp_path):
    import shutil

    from convbert.data.stats import data_stats

    data = shutil.copytree(built, tmp_path / "data")
    shard = sorted(data.glob("shard-*.bin"))[0]
    reader = ShardReader(shard)
    assert len(reader.blocks) >= 2, "the fixture's shard should have several blocks"
    offset = reader.blocks_offset + 8  # the second block's token offset
    value = int(reader.blocks[1])
    del reader
    raw = bytearray(shard.read_bytes())
    raw[offset:offset + 8] = (value + 3).to_bytes(8, "little", signed=True)
    shard.write_bytes(bytes(raw))
    with pytest.raises(ConvBertError, match=rf"{shard.name}: shard is corrupt \(its offset table disagrees"):
        PretrainingDataset(data).spot_check()
    with pytest.raises(ConvBertError, match=r"offset table disagrees"):
        data_stats(data)


def test_a_changed_token_id_inside_the_vocab_is_found_by_its_shard_hash(built, tmp_path):
    """A token id swapped for another valid id passes every structural check; the manifest's per-shard sha256
    finds it before training, in data-stats and when build-data is run again. A manifest from before the hash
    was recorded still opens."""
    import hashlib
    import shutil

    from convbert.data.stats import data_stats

    data = shutil.copytree(built, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in manifest["shards"]:
        assert entry["sha256"] == hashlib.sha256((data / entry["file"]).read_bytes()).hexdigest()
    shard = data / manifest["shards"][-1]["file"]
    reader = ShardReader(shard)
    at = 64 + reader.token_bytes * (reader.n_tokens // 2)  # a token in the middle of the shard
    old = int.from_bytes(shard.read_bytes()[at:at + reader.token_bytes], "little")
    del reader
    raw = bytearray(shard.read_bytes())
    raw[at:at + 2] = (7 if old != 7 else 8).to_bytes(2, "little")  # another word of the vocab
    shard.write_bytes(bytes(raw))
    with pytest.raises(ConvBertError, match=rf"{shard.name}: shard is corrupt \(its sha256 is [0-9a-f]+…, the "
                                            r"manifest records [0-9a-f]+…\)"):
        PretrainingDataset(data).spot_check()
    with pytest.raises(ConvBertError, match=r"its sha256 is"):
        data_stats(data)
    vocab = Path(manifest["vocab"]["path"])
    with pytest.raises(ConvBertError, match=rf"shard {shard.name} is missing or damaged"):
        build_dataset([str(vocab.parent / "corpus.txt")], str(vocab), str(data), max_seq_length=32, seed=0,
                      progress=False, shard_tokens=1500, chunk_bytes=2000)
    for entry in manifest["shards"]:
        del entry["sha256"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    PretrainingDataset(data).spot_check()  # no hash recorded: nothing to compare
