"""Corpus readers: unit cutting of large files, line reading, binary sniffing."""

import os

import pytest

from convbert.data.corpus import UnitEnumerator, UnitStats, classify, is_binary, read_unit
from convbert.errors import ConvBertError


def _doc(i):
    return "".join(f"document {i} line {j} with some words\r\n" for j in range(i % 5 + 1))


@pytest.mark.parametrize("docs", ["blank-lines", "files"])
def test_large_text_files_are_cut_at_safe_boundaries(tmp_path, docs):
    text = "\r\n".join(_doc(i) for i in range(300))  # CRLF, blank lines between documents
    p = tmp_path / "big.txt"
    p.write_bytes(text.encode())
    units = list(UnitEnumerator([str(p)], docs=docs, chunk_bytes=1000))
    assert len(units) > 5
    assert [u.seq for u in units] == list(range(len(units)))
    assert units[0].start == 0 and units[-1].end == len(text)
    for u, nxt in zip(units, units[1:]):
        assert u.end == nxt.start
        head = text[: u.end]
        assert head.endswith("\n")  # always at a line start
        if docs == "blank-lines":
            assert head.endswith("\r\n\r\n")  # right after a blank line: no document is split
    # reading the units back gives every line exactly once
    lines = []
    for u in units:
        for block in read_unit(u, "text", UnitStats()):
            lines += [ln for ln in block if ln is not None]
    assert lines == text.split("\n")[:-1]  # the text ends with a newline


def test_unit_keys_depend_on_input_position_and_name(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x\n")
    (tmp_path / "d" / "b.txt").write_text("y\n")
    (tmp_path / "a.txt").write_text("z\n")
    keys = [u.key for u in UnitEnumerator([str(tmp_path / "d"), str(tmp_path / "a.txt")], docs="files",
                                          chunk_bytes=100)]
    assert keys == ["0:a.txt", "0:b.txt", "1:a.txt"]


def test_a_file_reached_through_two_inputs_is_read_once_under_the_first(tmp_path, monkeypatch):
    """`--input corpus/ 'corpus/*.txt' extra.txt`: packing a text twice would also put it on both sides of the
    held-out split. An input that adds nothing new is refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (tmp_path / "corpus" / name).write_text(name + "\n")
    (tmp_path / "extra.txt").write_text("extra\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "corpus" / "a.txt")
    enum = UnitEnumerator(["corpus/*.txt", "corpus", "extra.txt"], docs="files", chunk_bytes=100)
    assert [[rel for _, rel in files] for files in enum.files] == [["corpus/a.txt", "corpus/b.txt"], ["sub/c.txt"],
                                                                   ["extra.txt"]]
    assert sorted(enum.repeated) == ["corpus/a.txt", "corpus/b.txt"]
    assert enum.total_files == 4
    os.link(tmp_path / "extra.txt", tmp_path / "hard.txt")  # another name for the same inode
    for twice in (["corpus", "corpus/a.txt"], ["corpus", "link.txt"], ["extra.txt", "extra.txt"],
                  ["extra.txt", "hard.txt"]):
        with pytest.raises(ConvBertError, match=rf"--input {twice[1]}: every file it names is already read through an "
                                                rf"earlier --input \({twice[0]}\); give each file once"):
            UnitEnumerator(twice, docs="files", chunk_bytes=100)
    # The name decides how a file is read: one file under a .jsonl and a .txt name is refused, not read either way.
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "a.jsonl").write_text('{"text": "a record"}\n')
    (tmp_path / "records" / "alias.txt").symlink_to(tmp_path / "records" / "a.jsonl")
    with pytest.raises(ConvBertError, match=r"--input records: records/alias\.txt is the same file as records/a\.jsonl, "
                                            r"but their names say to read it as text and as jsonl"):
        UnitEnumerator(["records"], docs="files", chunk_bytes=100)


def test_classify_and_binary_sniffing():
    assert classify("x.jsonl") == "jsonl" and classify("x.JSONL.GZ") == "gzip-jsonl"
    assert classify("owt.tar.xz") == "archive" and classify("urlsf_subset00-1_data.xz") == "tar"
    assert classify("t.txt.gz") == "gzip-text" and classify("notes") == "text"
    assert classify("train-00000-of-00042.parquet") == "parquet"
    assert is_binary(b"abc\0def") and is_binary(bytes(range(1, 32)) * 10)
    assert not is_binary("plain text\twith tabs\r\n".encode()) and not is_binary(b"")
    assert not is_binary("ünïcödé ‘quotes’".encode())


def test_hidden_files_are_skipped_and_empty_folder_is_an_error(tmp_path):
    (tmp_path / ".hidden.txt").write_text("secret\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("secret\n")
    with pytest.raises(ConvBertError, match="no files"):
        UnitEnumerator([str(tmp_path)], docs="files", chunk_bytes=100)


def test_linked_folders_are_read_once_and_a_glob_reads_the_folders_it_matches(tmp_path, monkeypatch):
    """A folder input follows linked folders (each real folder once: a link back up does not loop), and a glob
    that matches a folder reads it (both had been dropped without a word)."""
    from convbert.data.corpus import expand_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "tree" / "a.txt").write_text("alpha\n")
    (tmp_path / "tree" / "sub" / "b.txt").write_text("beta\n")
    (tmp_path / "elsewhere" / "c.txt").write_text("gamma\n")
    (tmp_path / "tree" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "tree" / "sub" / "up").symlink_to(tmp_path / "tree", target_is_directory=True)  # a loop
    [folder] = expand_inputs(["tree"])
    assert [name for _, name in folder] == ["a.txt", "linked/c.txt", "sub/b.txt"]
    for pattern in ("tree/*", "tree/**"):
        [matched] = expand_inputs([pattern])
        assert [name for _, name in matched] == ["tree/a.txt", "tree/linked/c.txt", "tree/sub/b.txt"], pattern
