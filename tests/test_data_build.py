"""build_dataset / CLI: determinism across workers, resume, bad inputs, OWT archives, JSONL, parquet."""

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from convbert.cli import main as cli_main
from convbert.data import build_dataset, train_vocab
import convbert.data.build as build_mod
from convbert.data.build import PARTS
from convbert.data.dataset import PretrainingDataset
from convbert.data.shards import ShardWriter
from convbert.errors import ConvBertError

MODULES = ["json", "tarfile", "argparse", "textwrap", "string", "random"]


def _doc_text(name):
    import importlib
    import inspect

    mod = importlib.import_module(name)
    parts = [inspect.getdoc(mod) or ""]
    for attr in sorted(dir(mod)):
        obj = getattr(mod, attr)
        if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
            parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for m in MODULES:
        (d / f"{m}.txt").write_text(_doc_text(m), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def vocab(corpus, tmp_path_factory):
    return train_vocab([str(corpus)], 800, str(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


SMALL = dict(shard_tokens=1200, chunk_bytes=3000, progress=False)


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def test_vocab_starts_with_specials(vocab):
    lines = Path(vocab).read_text(encoding="utf-8").splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(lines) <= 800 and len(set(lines)) == len(lines)



def test_train_vocab_gives_the_same_file_in_every_process(corpus, vocab, tmp_path):
    """`tokenizers`' trainer alone numbers the ## forms in per-process hash order (a different file on nearly every
    run); train_vocab must not. Separate processes, since the hash seed is drawn per process."""
    code = "import sys; from convbert.data import train_vocab; train_vocab([sys.argv[1]], 800, sys.argv[2])"
    outputs = []
    for k in range(3):
        out = tmp_path / f"vocab{k}.txt"
        subprocess.run([sys.executable, "-c", code, str(corpus), str(out)], check=True, timeout=120)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2] == Path(vocab).read_bytes()
    lines = outputs[0].decode().splitlines()
    singles = [t for t in lines[5:] if len(t) == 1]
    continuations = [t for t in lines[5:] if t.startswith("##") and len(t) == 3]
    assert singles == sorted(singles) and continuations == sorted(continuations)
    assert lines[5:5 + len(singles) + len(continuations)] == singles + continuations  # then the learned pieces

@pytest.mark.parametrize("rule", ["electra", "convbert-release"])
def test_same_output_for_1_and_2_workers(corpus, vocab, tmp_path, rule):
    m1 = build_dataset([str(corpus)], vocab, str(tmp_path / "w1"), workers=1, seed=3, segment_rule=rule, **SMALL)
    m2 = build_dataset([str(corpus)], vocab, str(tmp_path / "w2"), workers=2, seed=3, segment_rule=rule, **SMALL)
    assert m1 == m2
    f1, f2 = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert f1 == f2
    assert len(m1["shards"]) >= 3  # several shards, several units per file (chunk_bytes)
    assert not (tmp_path / "w1" / PARTS).exists()
    c = m1["counts"]
    assert c["examples"] == sum(s["examples"] for s in m1["shards"]) > 100
    assert c["files"] == len(MODULES) < m1["committed_units"]  # large files were cut into several units
    assert m1["bytes_per_token"] <= 2.1
    assert m1["complete"] and all(i["complete"] for i in m1["inputs"])
    # another seed gives other examples
    m3 = build_dataset([str(corpus)], vocab, str(tmp_path / "s4"), workers=1, seed=4, segment_rule=rule, **SMALL)
    assert _files(tmp_path / "s4")["shard-00000.bin"] != f1["shard-00000.bin"]
    assert m3["counts"]["lines"] == c["lines"]


def test_more_workers_than_cpus_are_capped_with_a_note(corpus, vocab, tmp_path, monkeypatch, capsys):
    """A mistyped --workers 10000 used to start ten thousand processes; it now uses one per CPU and says so."""
    started = []
    real_pool = build_mod.cf.ProcessPoolExecutor
    monkeypatch.setattr(build_mod.cf, "ProcessPoolExecutor",
                        lambda workers, **kw: started.append(workers) or real_pool(workers, **kw))
    monkeypatch.setattr(build_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    m1 = build_dataset([str(corpus)], vocab, str(tmp_path / "w1"), workers=1, **SMALL)
    many = build_dataset([str(corpus)], vocab, str(tmp_path / "many"), workers=10000, **{**SMALL, "progress": True})
    assert started == [2]
    assert "--workers 10000 is more than the 2 CPU(s) available: using 2" in capsys.readouterr().err
    assert many == m1 and _files(tmp_path / "many") == _files(tmp_path / "w1")


def test_no_tokens_lost_without_truncation(corpus, vocab, tmp_path):
    """With a long max length nothing is truncated: the examples hold exactly the corpus's tokens."""
    from convbert.data.tokenize import WordPieceTokenizer

    build_dataset([str(corpus)], vocab, str(tmp_path / "d"), max_seq_length=4096, docs="files", progress=False)
    ds = PretrainingDataset(tmp_path / "d")
    got = np.concatenate([np.concatenate(ds.segments(i)) for i in range(len(ds))])
    tok = WordPieceTokenizer.from_vocab(vocab)
    want = np.concatenate([np.asarray(tok.encode(p.read_text()), dtype=np.int64)
                           for p in sorted(corpus.iterdir())])
    assert np.array_equal(np.sort(got), np.sort(want))
    # one path may be given as such (a str or a Path), not only as a list
    build_dataset(corpus, vocab, str(tmp_path / "one"), max_seq_length=4096, docs="files", progress=False)
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "d" / "manifest.json").read_bytes()


def test_resume_after_failure_is_identical(corpus, vocab, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    build_dataset([str(corpus)], vocab, str(ref), seed=1, **SMALL)
    out = tmp_path / "out"
    monkeypatch.setattr(build_mod, "SPILL_TOKENS", 64)  # every unit goes through a part file
    real_close = ShardWriter.close
    calls = {"n": 0}

    def failing_close(self):
        # parts and the first 2 shards succeed; the 3rd shard dies
        if self.path.name.startswith("shard-"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real_close(self)

    monkeypatch.setattr(ShardWriter, "close", failing_close)
    with pytest.raises(KeyboardInterrupt):
        build_dataset([str(corpus)], vocab, str(out), seed=1, **SMALL)
    monkeypatch.setattr(ShardWriter, "close", real_close)
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and len(m["shards"]) == 2 and m["committed_units"] > 0
    kept = sorted(p.name for p in (out / PARTS).glob("unit-*.json"))
    assert kept  # finished parts of the unfinished shard are kept for reuse
    # leftovers of a hard kill: a stray shard, a torn temporary file, a part without its JSON
    (out / "shard-00007.bin").write_bytes(b"garbage")
    (out / ".shard-00002.bin.abc.tmp").write_bytes(b"torn")
    (out / PARTS / "unit-00000999.bin").write_bytes(b"torn")
    build_dataset([str(corpus)], vocab, str(out), seed=1, workers=2, **SMALL)
    assert _files(out) == _files(ref)
    # re-running a complete build does nothing
    before = _files(out)
    build_dataset([str(corpus)], vocab, str(out), seed=1, **SMALL)
    assert _files(out) == before


def test_resume_after_sigkill_is_identical(corpus, vocab, tmp_path):
    ref = tmp_path / "ref"
    kwargs = dict(seed=2, shard_tokens=600, chunk_bytes=2000)
    build_dataset([str(corpus)], vocab, str(ref), progress=False, **kwargs)
    out = tmp_path / "out"
    code = (
        "import sys; from convbert.data import build_dataset; "
        f"build_dataset([{str(corpus)!r}], {vocab!r}, {str(out)!r}, progress=False, workers=2, **{kwargs!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    killed = False
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                m = json.loads((out / "manifest.json").read_text())
            except (OSError, ValueError):
                m = None
            if m and m["shards"] and not m["complete"]:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
    finally:
        proc.wait()
    if not killed:
        pytest.skip("the build finished before it could be killed")
    if sys.platform.startswith("linux"):  # the workers die with the builder instead of idling as orphans
        deadline = time.monotonic() + 10
        while _processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _processes_mentioning(str(out))
    build_dataset([str(corpus)], vocab, str(out), progress=False, **kwargs)
    assert _files(out) == _files(ref)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_other_settings_into_same_folder_is_an_error(corpus, vocab, tmp_path):
    out = tmp_path / "d"
    build_dataset([str(corpus)], vocab, str(out), **SMALL)
    with pytest.raises(ConvBertError, match="different settings.*seed"):
        build_dataset([str(corpus)], vocab, str(out), seed=9, **SMALL)
    with pytest.raises(ConvBertError, match="max_seq_length"):
        build_dataset([str(corpus)], vocab, str(out), max_seq_length=64, **SMALL)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ConvBertError, match="not empty"):
        build_dataset([str(corpus)], vocab, str(other), **SMALL)


def test_binary_invalid_utf8_and_empty_inputs(vocab, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "good.txt").write_text("the quick brown fox\njumps over the lazy dog\n\nsecond document here\n")
    (d / "bad_utf8.txt").write_bytes(b"caf\xe9 and \xff\xfe more text\nvalid line\n")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 4)
    (d / "empty.txt").write_bytes(b"")
    m = build_dataset([str(d)], vocab, str(tmp_path / "out"), progress=False)
    c = m["counts"]
    assert c["binary_skipped"] == 1 and c["binary_files"][0].endswith("image.png")
    assert c["invalid_utf8"] == 3 and c["files_with_invalid_utf8"] == 1
    assert c["examples"] >= 3
    # an empty corpus (only empty and binary files) is an error
    e = tmp_path / "emptyish"
    e.mkdir()
    (e / "a.txt").write_text("\n\n   \n")
    (e / "b.bin").write_bytes(b"\0\1\2\3" * 100)
    with pytest.raises(ConvBertError, match="empty corpus"):
        build_dataset([str(e)], vocab, str(tmp_path / "out2"), progress=False)
    with pytest.raises(ConvBertError, match="no such file"):
        build_dataset([str(tmp_path / "missing.txt")], vocab, str(tmp_path / "out3"), progress=False)
    with pytest.raises(ConvBertError, match="matches no files"):
        build_dataset([str(tmp_path / "*.nothing")], vocab, str(tmp_path / "out4"), progress=False)


def _tar_xz(members, path=None):
    """members: list of (name, bytes | None for a folder, or ('sym'|'hard', target))."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, tuple):
                info.type = tarfile.SYMTYPE if data[0] == "sym" else tarfile.LNKTYPE
                info.linkname = data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(raw)
    return raw


def _owt_docs(corpus, k):
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    paras = [q for t in texts for q in t.split("\n\n") if q.strip()]
    return [(f"{k:04d}-doc{i}.txt", "\n\n".join(paras[i::7]).encode()) for i in range(k, k + 3)]


def test_openwebtext_archive_and_folder(corpus, vocab, tmp_path):
    subs = [(f"openwebtext/urlsf_subset{k:02d}.xz", _tar_xz(_owt_docs(corpus, k))) for k in range(3)]
    outer = tmp_path / "openwebtext.tar.xz"
    _tar_xz([("openwebtext", None)] + subs, outer)
    m1 = build_dataset([str(outer)], vocab, str(tmp_path / "a"), docs="files", workers=2, progress=False)
    m1b = build_dataset([str(outer)], vocab, str(tmp_path / "a1"), docs="files", workers=1, progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "a1") and m1 == m1b
    folder = tmp_path / "owt"
    folder.mkdir()
    for name, data in subs:
        (folder / Path(name).name).write_bytes(data)
    m2 = build_dataset([str(folder)], vocab, str(tmp_path / "b"), docs="files", progress=False)
    assert m1["counts"]["files"] == m2["counts"]["files"] == 9
    assert m1["counts"]["lines"] == m2["counts"]["lines"]
    # an outer archive holding plain .txt documents works too
    flat = tmp_path / "flat.tar.gz"
    with tarfile.open(flat, "w:gz") as tar:
        for name, data in _owt_docs(corpus, 0):
            info = tarfile.TarInfo("docs/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    m3 = build_dataset([str(flat)], vocab, str(tmp_path / "c"), docs="files", progress=False)
    assert m3["counts"]["files"] == 3


@pytest.mark.parametrize(
    "member,match",
    [
        (("../evil.txt", b"x"), r"'\.\./evil\.txt'.*'\.\.'"),
        (("/etc/evil.txt", b"x"), "absolute path"),
        (("link.txt", ("sym", "/etc/passwd")), "is a link"),
        (("hard.txt", ("hard", "a.txt")), "is a link"),
    ],
)
@pytest.mark.parametrize("where", ["outer", "inner"])
def test_unsafe_archive_members_are_refused(vocab, tmp_path, member, match, where):
    good = ("a.txt", b"some text here\n")
    if where == "outer":
        path = tmp_path / "corpus.tar.xz"
        _tar_xz([good, member], path)
    else:
        path = tmp_path / "sub.xz"
        _tar_xz([good, member], path)
    with pytest.raises(ConvBertError, match=match) as err:
        build_dataset([str(path)], vocab, str(tmp_path / "out"), docs="files", progress=False)
    assert "not a readable tar archive" not in str(err.value)  # the member's own error, not re-wrapped


def test_jsonl_plain_and_gzip(corpus, vocab, tmp_path):
    docs = [p.read_text() for p in sorted(corpus.iterdir())]
    rows = "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(docs))
    (tmp_path / "a.jsonl").write_text(rows)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(rows)
    ma = build_dataset([str(tmp_path / "a.jsonl")], vocab, str(tmp_path / "a"), text_field="body", docs="files",
                       progress=False)
    mb = build_dataset([str(tmp_path / "b.jsonl.gz")], vocab, str(tmp_path / "b"), text_field="body", docs="files",
                       progress=False)
    assert ma["counts"]["files"] == mb["counts"]["files"] == len(docs)
    assert ma["counts"]["lines"] == mb["counts"]["lines"]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + rows.encode())  # as some editors save it
    mbom = build_dataset([str(tmp_path / "bom.jsonl")], vocab, str(tmp_path / "bom"), text_field="body",
                         docs="files", progress=False)
    assert mbom["counts"]["files"] == len(docs) and mbom["counts"]["lines"] == ma["counts"]["lines"]
    with pytest.raises(ConvBertError, match=r"a\.jsonl:1: no field 'text'.*--text-field"):
        build_dataset([str(tmp_path / "a.jsonl")], vocab, str(tmp_path / "c"), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": 5}\n')
    with pytest.raises(ConvBertError, match=r"bad\.jsonl:3: field 'text' is int, expected a string"):
        build_dataset([str(bad)], vocab, str(tmp_path / "d"), progress=False)
    bad.write_text('{"text": "fine"}\n{"text": "oops"\n')
    with pytest.raises(ConvBertError, match=r"bad\.jsonl:2: invalid JSON"):
        build_dataset([str(bad)], vocab, str(tmp_path / "e"), progress=False)


def _write_parquet(path, columns: dict, row_group_size: int):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def test_parquet_rows_are_documents(corpus, vocab, tmp_path):
    """A parquet column of documents (the HF hub's corpus format) reads like the same rows in JSONL: every row a
    document, cut into units of whole row groups, the same dataset for any worker count."""
    from convbert.data.corpus import UnitEnumerator, iter_lines

    docs = [p.read_text() for p in sorted(corpus.iterdir())] * 2
    _write_parquet(tmp_path / "c.parquet", {"id": list(range(len(docs))), "body": docs}, row_group_size=2)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in docs))
    units = list(UnitEnumerator([str(tmp_path / "c.parquet")], docs="files", chunk_bytes=3000))
    assert len(units) > 2 and units[0].start == 0 and units[-1].end == (len(docs) + 1) // 2
    assert all(a.end == b.start for a, b in zip(units, units[1:]))
    assert sum(u.weight for u in units) == (tmp_path / "c.parquet").stat().st_size  # the progress bar's total
    m1 = build_dataset([str(tmp_path / "c.parquet")], vocab, str(tmp_path / "w1"), text_field="body", docs="files",
                       workers=1, **SMALL)
    m2 = build_dataset([str(tmp_path / "c.parquet")], vocab, str(tmp_path / "w2"), text_field="body", docs="files",
                       workers=2, **SMALL)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2") and m1["counts"] == m2["counts"]
    mj = build_dataset([str(tmp_path / "c.jsonl")], vocab, str(tmp_path / "j"), text_field="body", docs="files",
                       **SMALL)
    assert m1["counts"]["files"] == len(docs) and m1["counts"]["lines"] == mj["counts"]["lines"]
    assert list(iter_lines([str(tmp_path / "c.parquet")], "body")) == list(iter_lines([str(tmp_path / "c.jsonl")],
                                                                                      "body"))


def test_parquet_errors_name_the_file_column_and_row(vocab, tmp_path, monkeypatch):
    f = tmp_path / "d.parquet"
    _write_parquet(f, {"id": [1, 2, 3, 4], "body": ["one", "two", None, "four"]}, row_group_size=2)
    for field, message in (
        ("text", r"d\.parquet: no column 'text' \(columns: id, body\); choose one with --text-field"),
        ("id", r"d\.parquet: column 'id' holds int64, expected strings"),
        ("body", r"d\.parquet: row 2 \(counting from 0\): column 'body' is null, expected a string"),
    ):
        with pytest.raises(ConvBertError, match=message):
            build_dataset([str(f)], vocab, str(tmp_path / f"o_{field}"), text_field=field, docs="files",
                          progress=False)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(ConvBertError, match=r"cut\.parquet: not a readable parquet file"):
        build_dataset([str(cut)], vocab, str(tmp_path / "o_cut"), docs="files", progress=False)
    assert not (tmp_path / "o_cut").exists()
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(ConvBertError, match=r"needs pyarrow: pip install 'convbert\[parquet\]'"):
        build_dataset([str(f)], vocab, str(tmp_path / "o_none"), docs="files", progress=False)


def test_a_file_given_twice_is_packed_once_and_the_build_says_so(corpus, vocab, tmp_path, capsys):
    once = build_dataset([str(corpus)], vocab, str(tmp_path / "once"), **SMALL)
    capsys.readouterr()
    twice = build_dataset([str(corpus / "json.txt"), str(corpus)], vocab, str(tmp_path / "twice"), **SMALL)
    err = capsys.readouterr().err  # said with progress=False (--no-progress) too: it is about what is read
    assert "build-data: note: 1 file(s) reached twice (through links or overlapping --input arguments) are read " \
           f"once, where first reached (e.g. {corpus / 'json.txt'} is not read again)" in err
    assert twice["counts"]["files"] == once["counts"]["files"] == len(MODULES)
    assert twice["counts"]["lines"] == once["counts"]["lines"]
    # A dataset built before files were read once recorded the overlapping input with one file more: it is
    # refused, and the message says that this, not a changed corpus, may be why.
    manifest_file = tmp_path / "twice" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["complete"] = False
    files, size = manifest["input_identity"][str(corpus)]
    manifest["input_identity"][str(corpus)] = [files + 1, size + (corpus / "json.txt").stat().st_size]
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ConvBertError, match=r"the inputs changed since this dataset was built \(.*\); or, if the "
                                            r"files did not change, it was built before a file reached twice was read "
                                            r"once: rebuild it; use a new folder"):
        build_dataset([str(corpus / "json.txt"), str(corpus)], vocab, str(tmp_path / "twice"), **SMALL)


def test_cli_build_stats_and_errors(corpus, vocab, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["build-data", "--input", str(corpus), "--vocab", vocab, "--output", str(out), "--workers", "1",
                   "--seed", "5", "--segment-rule", "convbert-release", "--docs", "files", "--no-progress"])
    assert rc == 0
    assert "examples" in capsys.readouterr().out
    assert cli_main(["data-stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "single segment" in text and "length histogram" in text
    assert cli_main(["data-stats", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["single_segment"] + s["two_segment"] == s["examples"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert s["bytes_on_disk"] == manifest["bytes_on_disk"]  # the shards only, as build-data reports them
    assert s["documents"] == s["sources"] == manifest["counts"]["files"] >= 1  # --docs files: one document a file
    assert build_dataset([str(corpus)], vocab, str(tmp_path / "bl"), docs="blank-lines", progress=False)
    assert cli_main(["data-stats", str(tmp_path / "bl"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["documents"] is None and s["sources"] >= 1  # blank-line documents are not counted: not the files
    rc = cli_main(["build-data", "--input", str(tmp_path / "nope"), "--vocab", vocab, "--output",
                   str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no such file" in err
    v = tmp_path / "v.txt"
    assert cli_main(["train-vocab", "--input", str(corpus), "--vocab-size", "300", "--output", str(v)]) == 0
    assert v.read_text().splitlines()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    capsys.readouterr()
    assert cli_main(["train-vocab", "--input", str(corpus), "--vocab-size", "6", "--output", str(v)]) == 0
    out, err = capsys.readouterr()
    kept = len(v.read_text().splitlines())
    assert kept > 6 and f"{kept:,} tokens" in out and "note: more than --vocab-size 6" in err


@pytest.mark.parametrize("name,match", [("corrupt.tar.xz", "not a readable tar archive"),
                                        ("corrupt.xz", "not a readable tar archive"),
                                        ("corrupt.jsonl.gz", "not readable"),
                                        ("corrupt.txt.gz", "not a readable gzip file")])
def test_corrupt_compressed_inputs(vocab, tmp_path, name, match):
    p = tmp_path / name
    p.write_bytes(b"this is not compressed data at all\n" * 10)
    with pytest.raises(ConvBertError, match=match):
        build_dataset([str(p)], vocab, str(tmp_path / "out"), progress=False)


def test_missing_special_token_in_vocab(corpus, tmp_path):
    v = tmp_path / "v.txt"
    v.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n")
    with pytest.raises(ConvBertError, match=r"v\.txt.*\[MASK\]"):
        build_dataset([str(corpus)], str(v), str(tmp_path / "out"), progress=False)


def test_output_inside_input_folder_is_not_read(vocab, tmp_path):
    d = tmp_path / "proj"
    d.mkdir()
    (d / "a.txt").write_text("the quick brown fox\njumps over the lazy dog\n")
    m1 = build_dataset([str(d)], vocab, str(d / "data"), progress=False)
    assert m1["counts"]["files"] == 1
    assert build_dataset([str(d)], vocab, str(d / "data"), progress=False) == m1  # still the same inputs
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConvBertError, match="not a folder"):
        build_dataset([str(d)], vocab, str(tmp_path / "afile"), progress=False)


def test_a_changed_corpus_is_not_resumed_into_the_old_dataset(corpus, vocab, tmp_path, capsys):
    import shutil

    mine = shutil.copytree(corpus, tmp_path / "corpus")
    out = tmp_path / "out"
    build_dataset([str(mine)], vocab, str(out), **SMALL)
    build_dataset([str(mine)], vocab, str(out), **SMALL)  # unchanged: finished, nothing to do
    with open(mine / "json.txt", "a", encoding="utf-8") as f:
        f.write("\n\nA new document about something else entirely.\n")
    with pytest.raises(ConvBertError, match="the inputs changed since this dataset was built"):
        build_dataset([str(mine)], vocab, str(out), **SMALL)


def test_touched_or_copied_inputs_are_the_same_inputs_and_the_manifest_has_no_timestamps(corpus, vocab, tmp_path):
    """Only the files and their sizes identify the inputs: a `touch`, a copy or a fresh checkout changes mtimes
    but not the corpus, so a finished build is still finished and an interrupted one resumes."""
    import shutil

    mine = shutil.copytree(corpus, tmp_path / "corpus")
    first = build_dataset([str(mine)], vocab, str(tmp_path / "a"), **SMALL)
    for f in mine.iterdir():
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**12))
    assert build_dataset([str(mine)], vocab, str(tmp_path / "a"), **SMALL) == first  # finished: nothing to do
    second = build_dataset([str(mine)], vocab, str(tmp_path / "b"), **SMALL)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert second == first
    # A manifest written before mtimes were dropped ([files, bytes, mtime]) still resumes.
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["input_identity"] = {p: v + [123] for p, v in manifest["input_identity"].items()}
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    assert build_dataset([str(mine)], vocab, str(tmp_path / "a"), **SMALL)["examples"] == first["examples"]


def test_earlier_datasets_inside_an_input_folder_are_not_read_as_text(corpus, vocab, tmp_path):
    """`--input .` over a folder that already holds datasets: their manifest.json and shards are not corpus."""
    import shutil

    mine = shutil.copytree(corpus, tmp_path / "corpus")
    alone = build_dataset([str(mine)], vocab, str(tmp_path / "alone"), **SMALL)
    build_dataset([str(mine)], vocab, str(mine / "earlier"), **SMALL)
    again = build_dataset([str(mine)], vocab, str(tmp_path / "again"), **SMALL)
    assert again["counts"] == alone["counts"] and _files(tmp_path / "again") == _files(tmp_path / "alone")
    # A dataset given as the input itself (a --data/--input mix-up) is refused, not built from its manifest text.
    from convbert.data import train_vocab

    with pytest.raises(ConvBertError, match=r"--input .*alone: is a dataset folder written by `convbert build-data`"):
        build_dataset([str(tmp_path / "alone")], vocab, str(tmp_path / "junk"), **SMALL)
    with pytest.raises(ConvBertError, match=r"is a dataset folder written by `convbert build-data`"):
        train_vocab([str(tmp_path / "alone")], 100, str(tmp_path / "v.txt"))
    assert not (tmp_path / "junk").exists() and not (tmp_path / "v.txt").exists()
    big = shutil.copytree(tmp_path / "alone", tmp_path / "big")  # a large build's manifest runs to megabytes
    manifest = json.loads((big / "manifest.json").read_text())
    manifest["counts"]["binary_files"] = [f"file-{i:07d}.bin" for i in range(200_000)]
    (big / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert (big / "manifest.json").stat().st_size > 4 << 20
    with pytest.raises(ConvBertError, match=r"is a dataset folder written by `convbert build-data`"):
        build_dataset([str(big)], vocab, str(tmp_path / "junk"), **SMALL)


def test_an_output_inside_the_input_folder_does_not_count_as_a_change(corpus, vocab, tmp_path):
    import shutil

    mine = shutil.copytree(corpus, tmp_path / "corpus")
    out = mine / "built"
    first = build_dataset([str(mine)], vocab, str(out), **SMALL)
    assert build_dataset([str(mine)], vocab, str(out), **SMALL)["examples"] == first["examples"]


@pytest.mark.parametrize("where", ["outer", "inner"])
def test_an_archive_cut_short_at_a_member_header_is_refused_not_half_read(corpus, vocab, tmp_path, where):
    """Stream-mode tarfile ends quietly at a header cut short (an interrupted download) after the first member; the
    end-of-archive block must be seen, or the build stops with the archive named."""
    import lzma

    docs = _owt_docs(corpus, 0)
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        for name, data in docs:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = plain.getvalue()
    second = 512 + -(-len(docs[0][1]) // 512) * 512  # where the second member's header starts
    cut = lzma.compress(raw[: second + 100], format=lzma.FORMAT_XZ)  # 100 bytes into that header
    if where == "outer":
        path = tmp_path / "corpus.tar.xz"
        path.write_bytes(cut)
    else:  # an OpenWebText sub-archive inside a complete outer archive
        path = tmp_path / "openwebtext.tar.xz"
        _tar_xz([("openwebtext/urlsf_subset00.xz", cut)], path)
    with pytest.raises(ConvBertError, match=rf"ends early after member '{docs[0][0]}' \(no end-of-archive block\): "
                                            "truncated or damaged"):
        build_dataset([str(path)], vocab, str(tmp_path / "out"), docs="files", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    # the complete archive builds
    path.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ)) if where == "outer" else \
        _tar_xz([("openwebtext/urlsf_subset00.xz", lzma.compress(raw, format=lzma.FORMAT_XZ))], path)
    assert build_dataset([str(path)], vocab, str(tmp_path / "ok"), docs="files", progress=False)["counts"]["files"] == 3


def test_a_lone_surrogate_in_jsonl_text_is_dropped_like_invalid_utf8(vocab, tmp_path):
    """JSON's "\\ud800" escape decodes to half a surrogate pair: it becomes U+FFFD (which the tokenizer drops) and is
    counted, as an invalid UTF-8 byte is, not a '?' token (it had been encoded with errors="replace")."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "the\ud800 json module"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "the json module"}) + "\n")
    ma = build_dataset([str(tmp_path / "a.jsonl")], vocab, str(tmp_path / "a"), docs="files", progress=False)
    build_dataset([str(tmp_path / "b.jsonl")], vocab, str(tmp_path / "b"), docs="files", progress=False)
    a, b = PretrainingDataset(tmp_path / "a"), PretrainingDataset(tmp_path / "b")
    assert [x.tolist() for x in a.segments(0)] == [x.tolist() for x in b.segments(0)]
    assert ma["counts"]["invalid_utf8"] == 1


_PARENT = os.getpid()
_REAL_PROCESS_UNIT = None


def _dies_at_unit_3(unit):
    """A worker killed at its fourth unit (in-process with one worker: the pool's own error, as a death gives)."""
    from concurrent.futures.process import BrokenProcessPool

    if unit.seq == 3:
        if os.getpid() != _PARENT:
            os._exit(9)
        raise BrokenProcessPool("a child process terminated abruptly")
    return _REAL_PROCESS_UNIT(unit)


def test_a_worker_death_in_a_fresh_build_keeps_the_shards_for_the_re_run(corpus, vocab, tmp_path, monkeypatch):
    """The error says finished shards are kept: the folder this call created must not be removed as it is for bad
    input, and the re-run must give the uninterrupted build."""
    global _REAL_PROCESS_UNIT
    import convbert.data.build as build_module
    from convbert.data.build import InterruptedBuild

    build_dataset([str(corpus)], vocab, str(tmp_path / "whole"), workers=2, **SMALL)
    _REAL_PROCESS_UNIT = build_module.process_unit
    monkeypatch.setattr(build_module, "process_unit", _dies_at_unit_3)
    out = tmp_path / "cut"
    with pytest.raises(InterruptedBuild, match="a worker process died unexpectedly.*finished shards are kept"):
        build_dataset([str(corpus)], vocab, str(out), workers=2, **SMALL)
    assert (out / "manifest.json").is_file()
    kept = json.loads((out / "manifest.json").read_text())
    assert not kept["complete"] and kept["committed_units"] <= 3
    monkeypatch.setattr(build_module, "process_unit", _REAL_PROCESS_UNIT)
    build_dataset([str(corpus)], vocab, str(out), workers=2, **SMALL)
    assert _files(out) == _files(tmp_path / "whole")


def test_a_full_disk_keeps_the_folder_and_names_it(corpus, vocab, tmp_path, monkeypatch):
    import errno

    import convbert.data.build as build_module

    real_close = build_module._Committer.close_shard
    calls = []

    def close_then_fill_the_disk(self, final=False):
        calls.append(final)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_close(self, final)

    monkeypatch.setattr(build_module._Committer, "close_shard", close_then_fill_the_disk)
    out = tmp_path / "full"
    with pytest.raises(ConvBertError, match=rf"{out}: no space left on the device .* re-run the same command"):
        build_dataset([str(corpus)], vocab, str(out), **SMALL)
    assert (out / "manifest.json").is_file()
    monkeypatch.setattr(build_module._Committer, "close_shard", real_close)
    build_dataset([str(corpus)], vocab, str(out), **SMALL)
    build_dataset([str(corpus)], vocab, str(tmp_path / "whole"), **SMALL)
    assert _files(out) == _files(tmp_path / "whole")


def test_a_file_read_in_several_parts_counts_as_one_file(corpus, vocab, tmp_path):
    one = sorted(corpus.iterdir())[0]
    manifest = build_dataset([str(one)], vocab, str(tmp_path / "d"), **SMALL)  # chunk_bytes 3000: many units
    assert one.stat().st_size > 3 * SMALL["chunk_bytes"] and manifest["committed_units"] > 3
    assert manifest["counts"]["files"] == 1


def test_dictionary_encoded_and_view_string_columns_read_like_plain_strings(corpus, vocab, tmp_path):
    """pandas categoricals are saved dictionary-encoded; newer writers use string_view. Same text, same data (each
    file named alike: the packing's random lengths are seeded from the file's name)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = [p.read_text() for p in sorted(corpus.iterdir())][:3]
    columns = {"plain": pa.array(docs), "dict": pa.array(docs).dictionary_encode()}
    if hasattr(pa, "string_view"):
        columns["view"] = pa.array(docs, type=pa.string_view())
    shards = {}
    for kind, column in columns.items():
        (tmp_path / kind).mkdir()
        pq.write_table(pa.table({"text": column}), tmp_path / kind / "c.parquet")
        build_dataset([str(tmp_path / kind / "c.parquet")], vocab, str(tmp_path / f"out-{kind}"), docs="files",
                      progress=False)
        shards[kind] = _files(tmp_path / f"out-{kind}")["shard-00000.bin"]
    assert len(set(shards.values())) == 1, list(shards)


def test_a_jsonl_file_whose_first_line_is_only_a_byte_order_mark(vocab, tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf\n" + json.dumps({"text": "the json module"}).encode() + b"\n")
    assert build_dataset([str(tmp_path / "a.jsonl")], vocab, str(tmp_path / "d"), docs="files",
                         progress=False)["counts"]["files"] == 1


def test_train_vocab_on_text_the_normaliser_removes_is_an_empty_corpus(tmp_path):
    """Zero-width, byte-order-mark and control characters only: no vocabulary of five special tokens is written."""
    corpus = tmp_path / "zw.txt"
    corpus.write_text("\u200b\u200b\n\ufeff\u200d\n\x07\x08\n" * 50, encoding="utf-8")
    with pytest.raises(ConvBertError, match="empty corpus: .*zw.txt holds no text the tokenizer keeps"):
        train_vocab([str(corpus)], 100, str(tmp_path / "vocab.txt"))
    assert not (tmp_path / "vocab.txt").exists()


def test_short_examples_from_blank_line_paragraphs_get_a_note_with_the_fix(vocab, tmp_path, capsys):
    """Paragraphs separated by blank lines in one long document: --docs blank-lines (the default) makes each a
    document of a few tokens, so most of every padded example is padding; build-data and data-stats say so and
    name --docs files, which packs full examples and gets no note."""
    words = Path(vocab).read_text(encoding="utf-8").split()[5:80]
    paragraphs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(120)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "book.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    common = ["--input", str(tmp_path / "in"), "--vocab", str(vocab), "--max-seq-length", "64", "--no-progress"]
    assert cli_main(["build-data", *common, "--output", str(tmp_path / "blank")]) == 0
    err = capsys.readouterr().err
    assert "note: examples average" in err and "of 64 tokens" in err and "--docs files" in err
    assert cli_main(["data-stats", str(tmp_path / "blank")]) == 0
    assert "--docs files" in capsys.readouterr().out
    assert cli_main(["build-data", *common, "--docs", "files", "--output", str(tmp_path / "files")]) == 0
    assert "note: examples average" not in capsys.readouterr().err
    assert cli_main(["data-stats", str(tmp_path / "files")]) == 0
    assert "note: examples average" not in capsys.readouterr().out


def test_a_vocab_file_inside_an_input_folder_is_not_corpus_text(corpus, vocab, tmp_path):
    """train-vocab's --output and build-data's --vocab inside an --input folder are passed over: a second
    train-vocab run trained on the first one's vocab (another file from the same corpus), and build-data packed
    the vocab's tokens as text."""
    import shutil

    folder = tmp_path / "corpus"
    shutil.copytree(corpus, folder)
    output = folder / "vocab.txt"
    first = Path(train_vocab([str(folder)], 300, str(output))).read_bytes()
    assert Path(train_vocab([str(folder)], 300, str(output))).read_bytes() == first
    assert first == Path(train_vocab([str(corpus)], 300, str(tmp_path / "elsewhere.txt"))).read_bytes()
    inside = build_dataset([str(folder)], str(output), str(tmp_path / "inside"), **SMALL)
    apart = build_dataset([str(corpus)], str(output), str(tmp_path / "apart"), **SMALL)
    assert inside["examples"] == apart["examples"] and inside["tokens"] == apart["tokens"]


def test_train_vocab_leaves_out_words_the_tokenizer_cannot_use(corpus, tmp_path):
    """A word over 200 characters is one [UNK] to the tokenizer; the trainer's merges are quadratic in word length
    (a 300,000-character run took 30 s), so such words are blanked first: the vocabulary is the one without them."""
    plain = tmp_path / "plain"
    plain.mkdir()
    text = (corpus / "json.txt").read_text()
    (plain / "a.txt").write_text(text)
    long_words = tmp_path / "long"
    long_words.mkdir()
    (long_words / "a.txt").write_text(text + "\nhex dump " + "0f" * 100_000 + " end\n" + "a" * 201 + "\n")
    (plain / "a.txt").write_text(text + "\nhex dump " + " end\n")
    got = Path(train_vocab([str(long_words)], 200, str(tmp_path / "v1.txt"))).read_text()
    want = Path(train_vocab([str(plain)], 200, str(tmp_path / "v2.txt"))).read_text()
    assert got == want


def test_data_stats_default_bins_fit_short_datasets(corpus, vocab, tmp_path, capsys):
    out = tmp_path / "d5"
    build_dataset([str(corpus / "json.txt")], vocab, str(out), max_seq_length=7, progress=False)
    assert cli_main(["data-stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert len(stats["length_histogram"]) == 7


def test_a_document_read_whole_is_tokenised_in_bounded_batches(corpus, vocab, tmp_path, monkeypatch):
    """A JSONL record (like a parquet row group or an archive member) reaches the packer as one block; its lines
    were tokenised all at once (~57 bytes of memory per byte of text: 2.9 GB for a 50 MB record). Now the batch
    limit holds inside a block too, and the shards are the same bytes."""
    from convbert.data.tokenize import WordPieceTokenizer

    text = "\n".join(p.read_text() for p in sorted(corpus.iterdir()))
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    whole = build_dataset([str(tmp_path / "one.jsonl")], vocab, str(tmp_path / "whole"), docs="files",
                          progress=False)
    batches = []
    encode_batch = WordPieceTokenizer.encode_batch

    def recording(self, texts, max_tokens=None):
        batches.append(sum(map(len, texts)))
        return encode_batch(self, texts, max_tokens)

    monkeypatch.setattr(WordPieceTokenizer, "encode_batch", recording)
    monkeypatch.setattr(build_mod, "BATCH_CHARS", 2000)
    small = build_dataset([str(tmp_path / "one.jsonl")], vocab, str(tmp_path / "small"), docs="files",
                          progress=False)
    longest_line = max(map(len, text.splitlines()))
    assert len(batches) > 10 and max(batches) < 2000 + longest_line
    assert small["counts"] == whole["counts"]
    shards = sorted(p.name for p in (tmp_path / "whole").glob("shard-*"))
    assert shards and all((tmp_path / "small" / n).read_bytes() == (tmp_path / "whole" / n).read_bytes()
                          for n in shards)


def test_train_vocab_cuts_a_very_long_line_between_words_with_the_same_result(corpus, tmp_path, monkeypatch):
    """The trainer held ~100 bytes per character of one line (a one-line 50 MB file took 5 GB); the line now
    reaches it in pieces cut where a word ends anyway, which gives the same word counts and so the same vocab."""
    import convbert.data.tokenize as tokenize
    import convbert.data.vocab as vocab_mod

    text = " ".join(p.read_text() for p in sorted(corpus.iterdir())).replace("\n", " ")
    (tmp_path / "one_line.txt").write_text(text + "\n")
    whole = train_vocab([str(tmp_path / "one_line.txt")], 400, str(tmp_path / "whole.txt"))
    cuts = []
    pieces = tokenize.space_bounded_pieces

    def recording(line, size):
        for piece in pieces(line, size):
            cuts.append(len(piece))
            yield piece

    monkeypatch.setattr(tokenize, "LONG_TEXT", 997)
    monkeypatch.setattr(tokenize, "space_bounded_pieces", recording)
    cut = train_vocab([str(tmp_path / "one_line.txt")], 400, str(tmp_path / "cut.txt"))
    assert len(cuts) > 20 and max(cuts) <= 997 + 1  # (a piece may start with the space it was cut at)
    assert Path(cut).read_bytes() == Path(whole).read_bytes()
    assert vocab_mod.wordpiece is tokenize


def test_the_packer_sees_no_more_of_a_line_than_can_change_the_examples(corpus, vocab, tmp_path, monkeypatch):
    """A one-line file of millions of tokens was tokenised whole and held as a list of ids (13-20 bytes of memory
    per byte of text). Past `line_token_cap` tokens nothing the packer decides can change, so the rest is not
    tokenised: the shards are the same bytes. (Small limits here, so that a short file exercises the cut.)"""
    import convbert.data.packing as packing
    import convbert.data.tokenize as tokenize
    from convbert.data.tokenize import WordPieceTokenizer

    words = " ".join(p.read_text() for p in sorted(corpus.iterdir())).split()
    lines = [" ".join(words[i : i + 40]) for i in range(0, 400, 40)]
    lines.insert(3, " ".join(words[400:4400]))  # one line of ~4,000 words among short ones
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n\n" + "\n".join(lines[:5]) + "\n")
    monkeypatch.setattr(tokenize, "LONG_TEXT", 997)
    monkeypatch.setattr(packing, "SINGLE_SEGMENT_TARGET", 150)  # the cap follows it: 151 tokens at length 32
    longest = []
    encode_batch = WordPieceTokenizer.encode_batch

    def recording(self, texts, max_tokens=None):
        out = encode_batch(self, texts, max_tokens)
        longest.append(max(map(len, out), default=0))
        return out

    monkeypatch.setattr(WordPieceTokenizer, "encode_batch", recording)
    capped = build_dataset([str(tmp_path / "in.txt")], vocab, str(tmp_path / "capped"), max_seq_length=32,
                           progress=False)
    assert max(longest) == 151
    longest.clear()
    monkeypatch.setattr(build_mod, "line_token_cap", lambda max_seq_length: None)
    whole = build_dataset([str(tmp_path / "in.txt")], vocab, str(tmp_path / "whole"), max_seq_length=32,
                          progress=False)
    assert max(longest) > 3000
    assert capped["counts"] == whole["counts"]
    shards = sorted(p.name for p in (tmp_path / "whole").glob("shard-*"))
    assert shards and all((tmp_path / "capped" / n).read_bytes() == (tmp_path / "whole" / n).read_bytes()
                          for n in shards)
