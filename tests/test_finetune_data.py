"""GLUE fixtures in the exact distributed layouts, and the readers of both folder layouts (spec §5.4).

The writer functions here are also used by the other tests/test_finetune_*.py files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from convbert.errors import ConvBertError
from convbert.finetune.tasks import find_layout, parse_task_list, read_split

WORDS = (
    "the a cat dog sat on mat he said hello she did not buy this analysis let alone next one we propose "
    "good bad movie was great terrible what is how do i learn python why sky blue man plays guitar woman "
    "is cutting onion an it rains today sun shines quickly slowly who wrote book".split()
)

# ---------------------------------------------------------------- vocabulary and tiny model


def write_vocab(path: Path) -> Path:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    punct = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    toks = specials + punct + digits + letters + ["##" + c for c in letters + digits] + sorted(set(WORDS))
    path.write_text("\n".join(toks) + "\n", encoding="utf-8")
    return path


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random `tiny` ConvBertModel saved in HF layout plus its vocab.txt."""
    import torch

    from convbert.model.config import ConvBertConfig
    from convbert.model.modeling import ConvBertModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(folder / "vocab.txt")
    n = len(vocab.read_text().splitlines())
    torch.manual_seed(seed)
    ConvBertModel(ConvBertConfig.from_preset("tiny", vocab_size=n)).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- GLUE files


def _sent(i: int, k: int = 5) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(k + i % 4))


def _w(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# Test-file sizes written by write_glue, per submission file.
TEST_SIZES = {"CoLA": 5, "SST-2": 4, "MRPC": 3, "STS-B": 4, "QQP": 5, "MNLI-m": 4, "MNLI-mm": 3, "QNLI": 3,
              "RTE": 4, "WNLI": 3, "AX": 6}


def write_glue(root: Path, layout: str = "glue", n_train: int = 12, n_dev: int = 6) -> Path:
    """Small GLUE folders with the real column layouts: CoLA without header, quotes inside sentences, a malformed
    QQP row, MNLI's 12-column train / 16-column dev / 10-column test files and the AX diagnostic file."""
    D = {
        "glue": dict(cola="CoLA", sst="SST-2", mrpc="MRPC", sts="STS-B", qqp="QQP", mnli="MNLI", qnli="QNLI",
                     rte="RTE", wnli="WNLI", ax="diagnostic"),
        "convbert": dict(cola="cola", sst="sst", mrpc="mrpc", sts="sts", qqp="qqp", mnli="mnli", qnli="qnli",
                         rte="rte", wnli="wnli", ax="mnli"),
    }[layout]
    T = TEST_SIZES
    # CoLA: train/dev have NO header; 4 columns (source, label, original mark, sentence).
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            lab = i % 2
            s = _sent(i) if i != 1 else 'he said "hello to the cat .'
            rows.append(f"gj04\t{lab}\t{'' if lab else '*'}\t{s}")
        _w(root / D["cola"] / f"{split}.tsv", rows)
    _w(root / D["cola"] / "test.tsv", ["index\tsentence"] + [f"{i}\t{_sent(i + 3)}" for i in range(T["CoLA"])])
    # SST-2
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"] + [f"{_sent(i)} \"great\" movie \t{i % 2}" for i in range(n)]
        _w(root / D["sst"] / f"{split}.tsv", rows)
    _w(root / D["sst"] / "test.tsv", ["index\tsentence"] + [f"{i}\t{_sent(i)}" for i in range(T["SST-2"])])
    # MRPC: label first.
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        rows += [f"{i % 2}\t{1000 + i}\t{2000 + i}\t{_sent(i)}\t{_sent(i + 1)}" for i in range(n)]
        _w(root / D["mrpc"] / f"{split}.tsv", rows)
    _w(root / D["mrpc"] / "test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String"]
       + [f"{i}\t{3000 + i}\t{4000 + i}\t{_sent(i)}\t{_sent(i + 2)}" for i in range(T["MRPC"])])
    # STS-B: 10 columns ending in sentence1, sentence2, score; test 9 columns.
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [head + "\tscore"] + [
            f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{_sent(i)}\t{_sent(i + 1)}\t{(i * 0.7) % 5:.3f}"
            for i in range(n)
        ]
        _w(root / D["sts"] / f"{split}.tsv", rows)
    _w(root / D["sts"] / "test.tsv", [head] + [
        f"{i}\tmain-news\theadlines\t2015\t{i:04d}\tnone\tnone\t{_sent(i)}\t{_sent(i + 5)}" for i in range(T["STS-B"])
    ])
    # QQP: one malformed row (a question broken over two lines) in train and one in dev.
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
        for i in range(n):
            rows.append(f"{i}\t{2 * i}\t{2 * i + 1}\twhat is {_sent(i)} ?\thow do i {_sent(i + 1)} ?\t{i % 2}")
            if i == 2:
                rows.append(f"{n + 7}\t99\t100\twhy is the sky")  # malformed: 4 fields
                rows.append("blue ?\twhy blue ?\t0")  # the broken-off rest: 3 fields
        _w(root / D["qqp"] / f"{split}.tsv", rows)
    _w(root / D["qqp"] / "test.tsv", ["id\tquestion1\tquestion2"]
       + [f"{i}\twhat is {_sent(i)} ?\twho wrote {_sent(i + 3)} ?" for i in range(T["QQP"])])
    # MNLI: train 12 columns, dev 16 columns (label1..label5, gold_label), test 10 columns.
    base = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
            "sentence2_parse\tsentence1\tsentence2")
    labs = ["entailment", "neutral", "contradiction"]

    def mnli_row(i, n_labels):
        s1, s2 = _sent(i), _sent(i + 2)
        parse = f"( ( {s1} ) )\t( ( {s2} ) )\t(ROOT (S {s1}))\t(ROOT (S {s2}))"
        lab = labs[i % 3]
        return f"{i}\t{100 + i}\t{100 + i}e\tfiction\t{parse}\t{s1}\t{s2}\t" + "\t".join([lab] * n_labels)

    _w(root / D["mnli"] / "train.tsv", [base + "\tlabel1\tgold_label"] + [mnli_row(i, 2) for i in range(n_train)])
    dev_head = base + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
    _w(root / D["mnli"] / "dev_matched.tsv", [dev_head] + [mnli_row(i, 6) for i in range(n_dev)])
    _w(root / D["mnli"] / "dev_mismatched.tsv", [dev_head] + [mnli_row(i + 1, 6) for i in range(n_dev)])
    for name, fn in (("MNLI-m", "test_matched.tsv"), ("MNLI-mm", "test_mismatched.tsv")):
        _w(root / D["mnli"] / fn, [base] + ["\t".join(mnli_row(i, 0).split("\t")[:10]) for i in range(T[name])])
    # QNLI, RTE, WNLI: (index, s1, s2, label); test without label.
    for task, labels, name, h in (
        ("qnli", ("entailment", "not_entailment"), "QNLI", "index\tquestion\tsentence"),
        ("rte", ("entailment", "not_entailment"), "RTE", "index\tsentence1\tsentence2"),
        ("wnli", ("0", "1"), "WNLI", "index\tsentence1\tsentence2"),
    ):
        for split, n in (("train", n_train), ("dev", n_dev)):
            rows = [h + "\tlabel"]
            # WNLI train: label "1" is the majority (7 of 12) so the majority-class submission is checkable.
            for i in range(n):
                lab = labels[1] if (task == "wnli" and split == "train" and i < 7) else labels[i % 2]
                rows.append(f"{i}\t{_sent(i)}\t{_sent(i + 4)}\t{lab}")
            _w(root / D[task] / f"{split}.tsv", rows)
        _w(root / D[task] / "test.tsv", [h] + [f"{i}\t{_sent(i)}\t{_sent(i + 1)}" for i in range(T[name])])
    # AX: diagnostic/diagnostic.tsv (standard) or mnli/diagnostic.tsv (ConvBERT).
    _w(root / D["ax"] / "diagnostic.tsv", ["index\tsentence1\tsentence2"]
       + [f"{i}\tthe cat sat on \"the mat\t{_sent(i)}" for i in range(T["AX"])])
    return root


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("layout", ["glue", "convbert"])
def test_both_layouts_load(tmp_path, layout):
    root = write_glue(tmp_path / "g", layout)
    assert find_layout(root) == layout
    cola = read_split(root, "cola", "train")
    assert len(cola.examples) == 12 and cola.skipped == 0
    assert cola.examples[1].text_a == 'he said "hello to the cat .'  # unbalanced quote kept verbatim
    assert cola.examples[0].label == "0" and cola.examples[1].label == "1"
    sst = read_split(root, "sst", "dev")
    assert sst.examples[0].text_a.endswith('"great" movie ')
    mnli = read_split(root, "mnli", "dev_matched")
    assert len(mnli.examples) == 6 and mnli.examples[0].label == "entailment"
    assert mnli.examples[1].text_a == _sent(1) and mnli.examples[1].text_b == _sent(3)
    mm = read_split(root, "mnli", "MNLI-mm")
    assert [e.index for e in mm.examples] == ["0", "1", "2"] and mm.examples[0].label is None
    ax = read_split(root, "ax", "AX")
    assert len(ax.examples) == 6 and ax.examples[0].text_a == 'the cat sat on "the mat'
    sts = read_split(root, "sts", "train")
    assert sts.examples[3].label == pytest.approx(2.1) and sts.examples[3].text_b == _sent(4)
    sts_test = read_split(root, "sts", "test")
    assert sts_test.examples[0].text_b == _sent(5)
    mrpc = read_split(root, "mrpc", "train")
    assert mrpc.examples[1].label == "1" and mrpc.examples[1].text_a == _sent(1)
    qnli = read_split(root, "qnli", "test")
    assert len(qnli.examples) == 3


def test_malformed_qqp_rows_skipped_and_counted(tmp_path):
    root = write_glue(tmp_path / "g")
    qqp = read_split(root, "qqp", "train")
    assert len(qqp.examples) == 12
    assert qqp.skipped == 2 and qqp.skipped_lines == [5, 6]
    # eids count raw lines (as in the original): the row after the malformed pair has eid 5, not 3.
    assert [e.eid for e in qqp.examples[2:4]] == [2, 5]
    assert qqp.examples[0].text_a.startswith("what is") and qqp.examples[0].label == "0"


def test_unreadable_test_row_is_an_error(tmp_path):
    root = write_glue(tmp_path / "g")
    p = root / "QQP" / "test.tsv"
    lines = p.read_text().splitlines()
    lines.insert(3, "17\twhy is the sky")
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConvBertError, match=r"test\.tsv:4: unreadable test row"):
        read_split(root, "qqp", "test")


def test_a_test_index_given_twice_is_an_error_whatever_its_leading_zeros(tmp_path):
    root = write_glue(tmp_path / "g")
    p = root / "QNLI" / "test.tsv"
    lines = p.read_text().splitlines()  # header, then indexes 0, 1, 2
    p.write_text("\n".join(lines + ["01\twhy is the sky\tit is blue"]) + "\n")
    with pytest.raises(ConvBertError, match=r"test\.tsv:5: index 01 appears twice \(first on line 3\)"):
        read_split(root, "qnli", "test")


def test_unknown_label_in_dev_is_skipped(tmp_path):
    root = write_glue(tmp_path / "g")
    p = root / "RTE" / "dev.tsv"
    p.write_text(p.read_text() + "99\ta\tb\tmaybe\n")
    d = read_split(root, "rte", "dev")
    assert d.skipped == 1 and len(d.examples) == 6


def test_missing_task_names_the_folder(tmp_path):
    root = write_glue(tmp_path / "g")
    shutil.rmtree(root / "RTE")
    with pytest.raises(ConvBertError, match="no train.tsv for task rte"):
        read_split(root, "rte", "train")


def test_task_list_parsing():
    assert parse_task_list("all") == ["cola", "sst", "mrpc", "sts", "qqp", "mnli", "qnli", "rte", "wnli", "ax"]
    assert parse_task_list("STS-B,sst-2,cola") == ["cola", "sst", "sts"]
    assert parse_task_list("sst2,stsb,ax") == ["sst", "sts", "ax"]
    with pytest.raises(ConvBertError, match="unknown GLUE task"):
        parse_task_list("cola,squad")


@pytest.mark.parametrize("layout", ["glue", "convbert"])
def test_a_file_that_lost_its_header_is_refused_not_read_one_example_short(tmp_path, layout):
    """Without its header line a GLUE file's first example was taken for the header and dropped; in a test file
    that made a submission one prediction short while passing its own checks."""
    import re

    from convbert.finetune.tasks import TASKS, require_split_file

    root = write_glue(tmp_path / "g", layout)
    checked = 0
    for name, spec in TASKS.items():
        splits = ([("train", spec.train)] if spec.train else []) + list(spec.dev.items()) + list(spec.test.items())
        for split, sp in splits:
            if not sp.header:
                continue
            path = require_split_file(root, name, split)
            original = path.read_text()
            complete = len(read_split(root, name, split).examples)
            path.write_text(original.split("\n", 1)[1])
            with pytest.raises(ConvBertError, match=rf"{re.escape(path.name)}:1: expected a header line, found an example"):
                read_split(root, name, split)
            path.write_text(original)
            assert len(read_split(root, name, split).examples) == complete
            checked += 1
    assert checked >= 15


def test_a_blank_line_before_the_header_is_named_not_taken_for_the_header(tmp_path):
    """A blank first line was read as a header of 0 fields: every row then looked malformed (train files lost
    all their rows, test files blamed the real header on line 2)."""
    root = write_glue(tmp_path / "g", n_train=4, n_dev=2)
    for task, split, name in (("rte", "train", "train.tsv"), ("rte", "test", "test.tsv")):
        path = root / "RTE" / name
        original = path.read_text()
        path.write_text("\n" + original)
        with pytest.raises(ConvBertError, match=rf"{name}:1: blank line where the header should be"):
            read_split(root, task, split)
        path.write_text(original)
        assert read_split(root, task, split).examples


def test_a_lone_carriage_return_inside_a_row_is_a_malformed_row_not_two(tmp_path):
    """Lines end at \\n (CRLF too), as the original reads them: a lone \\r inside a train row made it two rows,
    one skipped and one a wrong example with its label, and every later line number shifted."""
    root = write_glue(tmp_path / "g", n_train=4, n_dev=2)
    train = root / "SST-2" / "train.tsv"
    lines = train.read_text().splitlines()
    lines.insert(2, "lone\rcr\t1")
    train.write_bytes(("\r\n".join(lines) + "\r\n").encode())  # CRLF endings elsewhere are fine
    data = read_split(root, "sst", "train")
    assert data.skipped == 1 and data.first_problem == "line 3: a carriage return (\\r) inside the line"
    assert [e.text_a for e in data.examples] == [line.split("\t")[0] for i, line in enumerate(lines[1:], 2) if i != 3]
    assert all("cr" != e.text_a for e in data.examples)
    test = root / "SST-2" / "test.tsv"
    lines = test.read_text().splitlines()
    lines[1] = lines[1] + "\rtail"
    test.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConvBertError, match=r"test.tsv:2: unreadable test row \(a carriage return"):
        read_split(root, "sst", "test")


def test_test_text_column_names_are_the_columns_the_test_readers_take(tmp_path):
    """TEST_TEXT_COLUMNS (what `import-tf --task` writes for `convbert predict`) names the same header cells that
    read_split takes the test texts from, task by task, in the GLUE layout's test files."""
    from convbert.finetune.tasks import TASKS, TEST_TEXT_COLUMNS, find_split_file

    root = write_glue(tmp_path / "g")
    for task, names in TEST_TEXT_COLUMNS.items():
        (stem, sp), = list(TASKS[task].test.items())[:1]
        path = find_split_file(root, task, stem)
        header = path.read_text(encoding="utf-8-sig").split("\n", 1)[0].split("\t")
        taken = [header[sp.text_a]] + ([] if sp.text_b is None else [header[sp.text_b]])
        assert tuple(taken) == names, task
