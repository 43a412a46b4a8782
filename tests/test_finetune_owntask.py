"""`convbert finetune` on own CSV/TSV/JSONL data and `convbert predict` with the result."""

from __future__ import annotations

import csv
import json
import stat
from pathlib import Path

import pytest
import torch

from convbert.cli import main
from convbert.utils import _umask
from test_finetune_data import make_tiny_model

QUICK = ["--epochs", "1", "--batch-size", "4", "--max-seq-length", "24", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("own") / "model")


def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


PAIRS = [
    {"q": 'he said "hello, cat"', "a": "the cat sat", "y": "yes"},
    {"q": "a dog", "a": "on the mat", "y": "no"},
    {"q": "the sun shines", "a": "it rains today", "y": "no"},
    {"q": "who wrote book", "a": "she did", "y": "yes"},
    {"q": "what is python", "a": "a man plays guitar", "y": "maybe"},
]


def test_csv_pair_classification_then_predict(model, tmp_path, capsys):
    train = _csv(tmp_path / "train.csv", PAIRS)
    dev = _csv(tmp_path / "dev.csv", PAIRS[:3])
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", str(model), "--train", str(train), "--dev", str(dev), "--text-columns", "q,a",
               "--label-column", "y", "--output", str(out), *QUICK])
    assert rc == 0
    assert "dev: accuracy" in capsys.readouterr().out
    task = json.loads((out / "finetune_task.json").read_text())
    assert task["labels"] == ["maybe", "no", "yes"] and task["text_columns"] == ["q", "a"]
    assert (out / "vocab.txt").is_file() and (out / "head.json").is_file()
    inp = _csv(tmp_path / "new.csv", [{"q": r["q"], "a": r["a"]} for r in PAIRS])
    rc = main(["predict", "--model", str(out), "--input", str(inp), "--output", str(tmp_path / "pred.csv")])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "pred.csv", encoding="utf-8")))
    assert len(rows) == 5 and list(rows[0]) == ["index", "label", "prob_maybe", "prob_no", "prob_yes"]
    for r in rows:
        assert r["label"] in {"maybe", "no", "yes"}
        assert sum(float(r[k]) for k in ("prob_maybe", "prob_no", "prob_yes")) == pytest.approx(1.0, abs=1e-4)
    rc = main(["predict", "--model", str(out), "--input", str(inp), "--output", str(tmp_path / "pred.jsonl")])
    lines = [json.loads(l) for l in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert rc == 0 and len(lines) == 5 and set(lines[0]["probabilities"]) == {"maybe", "no", "yes"}
    # --text-columns names this file's columns; their number must be the model's (a pair model on one text, or
    # three names, used to pass silently or to blame the model's task file)
    renamed = _csv(tmp_path / "renamed.csv", [{"question": r["q"], "answer": r["a"]} for r in PAIRS])
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--input", str(renamed), "--output", str(tmp_path / "r.csv"),
                 "--text-columns", "question,answer"]) == 0
    assert [r["label"] for r in csv.DictReader(open(tmp_path / "r.csv", encoding="utf-8"))] == \
        [r["label"] for r in rows]
    for columns in ("question", "question,answer,label"):
        assert main(["predict", "--model", str(out), "--input", str(renamed), "--output", str(tmp_path / "x.csv"),
                     "--text-columns", columns]) == 2
        err = capsys.readouterr().err
        assert f"--text-columns {columns}: the model was fine-tuned on 2 text column(s) (q, a)" in err
        assert "finetune_task.json" not in err and not (tmp_path / "x.csv").exists()


def test_jsonl_regression_and_tsv_single_text(model, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": r["q"], "score": i * 0.5}) for i, r in enumerate(PAIRS)) + "\n")
    out = tmp_path / "reg"
    assert main(["finetune", "--model", str(model), "--train", str(train), "--dev", str(train), "--text-columns",
                 "text", "--label-column", "score", "--regression", "--output", str(out), *QUICK]) == 0
    assert json.loads((out / "finetune_task.json").read_text())["settings"]["regression_scale"] == 1.0  # as used
    tsv = tmp_path / "in.tsv"
    tsv.write_text("id\ttext\n1\tthe \"cat\n2\ta dog\n")
    assert main(["predict", "--model", str(out), "--input", str(tsv), "--output", str(tmp_path / "p.tsv")]) == 0
    lines = (tmp_path / "p.tsv").read_text().splitlines()
    assert lines[0] == "index\tscore" and len(lines) == 3
    float(lines[1].split("\t")[1])


def test_errors_name_file_line_and_field(model, tmp_path, capsys):
    train = _csv(tmp_path / "train.csv", PAIRS)
    rc = main(["finetune", "--model", str(model), "--train", str(train), "--text-columns", "question",
               "--label-column", "y", "--output", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert rc == 2 and "train.csv: no text column 'question' (columns: q, a, y)" in err
    rc = main(["finetune", "--model", str(model), "--train", str(train), "--text-columns", "q",
               "--label-column", "y", "--regression", "--output", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert rc == 2 and "train.csv:2: field 'y': 'yes' is not a number" in err
    dev = _csv(tmp_path / "dev.csv", [{"q": "a", "a": "b", "y": "unseen"}])
    rc = main(["finetune", "--model", str(model), "--train", str(train), "--dev", str(dev), "--text-columns", "q,a",
               "--label-column", "y", "--output", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert rc == 2 and "dev.csv:2: field 'y': label 'unseen' does not occur in the training file" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a", "y": "1"}\n{"q": "b", "y": \n')
    rc = main(["finetune", "--model", str(model), "--train", str(bad), "--text-columns", "q",
               "--label-column", "y", "--output", str(tmp_path / "o"), *QUICK])
    assert rc == 2 and "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    for line, message in (('{"y": "1"}', "field 'q' is missing"),
                          ('{"q": null, "y": "1"}', "field 'q' is null: expected a text (a string or number)")):
        bad.write_text('{"q": "a", "y": "0"}\n' + line + "\n")
        rc = main(["finetune", "--model", str(model), "--train", str(bad), "--text-columns", "q",
                   "--label-column", "y", "--output", str(tmp_path / "o"), *QUICK])
        assert rc == 2 and f"bad.jsonl:2: {message}" in capsys.readouterr().err
    rc = main(["predict", "--model", str(model), "--input", str(train), "--output", str(tmp_path / "p.csv")])
    assert rc == 2 and "finetune_task.json: not found" in capsys.readouterr().err


# -- the output folder: replaced whole, checked when read ---------------------------------------------------------


def _finetune(model, train, out, *extra):
    return main(["finetune", "--model", str(model), "--train", str(train), "--text-columns", "q,a",
                 "--label-column", "y", "--output", str(out), *QUICK, *extra])


def test_an_interrupted_finetune_leaves_the_previous_output_whole(model, tmp_path, monkeypatch):
    import convbert.finetune.owntask as owntask

    two = _csv(tmp_path / "two.csv", [dict(r, y="yes" if r["y"] == "yes" else "no") for r in PAIRS])
    three = _csv(tmp_path / "three.csv", PAIRS)
    out = tmp_path / "ft"
    assert _finetune(model, two, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(owntask, "write_json_atomic", interrupted)  # dies after the weights, before the task file
    assert _finetune(model, three, out, "--overwrite") == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    assert _finetune(model, three, out, "--overwrite") == 0
    assert json.loads((out / "finetune_task.json").read_text())["labels"] == ["maybe", "no", "yes"]


def test_finetune_refuses_a_folder_of_other_files_and_the_model_folder(model, tmp_path, capsys):
    train = _csv(tmp_path / "train.csv", PAIRS)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert _finetune(model, train, mine) == 2
    assert "holds other files" in capsys.readouterr().err
    assert _finetune(model, train, model) == 2
    assert "is the --model folder" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # An earlier output is rewritten whole, so one holding anything else (predictions saved inside it) is refused.
    out = tmp_path / "ft"
    assert _finetune(model, train, out) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()  # not the private mode of its staging folder
    (out / "pred.csv").write_text("index,label\n")
    assert _finetune(model, train, out) == 2
    assert "also holds pred.csv" in capsys.readouterr().err and (out / "pred.csv").is_file()


@pytest.mark.parametrize("edit, expect", [
    (lambda t: t.__setitem__("labels", None), "field 'labels'"),
    (lambda t: t.__setitem__("labels", ["a", "b", "c", "d"]), "lists 4 output(s) but the model's head has 3"),
    (lambda t: t.__setitem__("text_columns", []), "field 'text_columns'"),
    (lambda t: t.__setitem__("max_seq_length", 4096), "longer than the model's"),
    (lambda t: t.__setitem__("regression", "yes"), "field 'regression'"),
])
def test_an_edited_task_file_is_named(model, tmp_path, capsys, edit, expect):
    out = tmp_path / "ft"
    assert _finetune(model, _csv(tmp_path / "train.csv", PAIRS), out) == 0
    task = json.loads((out / "finetune_task.json").read_text())
    edit(task)
    (out / "finetune_task.json").write_text(json.dumps(task))
    inp = _csv(tmp_path / "new.csv", [{"q": r["q"], "a": r["a"]} for r in PAIRS])
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--input", str(inp), "--output", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finetune_task.json" in err and expect in err, err


def test_own_task_files_with_ambiguous_columns_or_labels_are_refused(model, tmp_path, capsys):
    dup = tmp_path / "dup.csv"
    dup.write_text("q,y,y\nthe cat,yes,no\na dog,no,yes\n")
    assert main(["finetune", "--model", str(model), "--train", str(dup), "--text-columns", "q", "--label-column",
                 "y", "--output", str(tmp_path / "o1"), *QUICK]) == 2
    assert f"{dup}:1: column name(s) 'y' appear more than once" in capsys.readouterr().err
    lst = tmp_path / "list.jsonl"
    lst.write_text('{"q": "the cat", "y": "a"}\n{"q": "a dog", "y": [1]}\n')
    assert main(["finetune", "--model", str(model), "--train", str(lst), "--text-columns", "q", "--label-column",
                 "y", "--output", str(tmp_path / "o2"), *QUICK]) == 2
    assert f"{lst}:2: field 'y': [1] is a JSON list" in capsys.readouterr().err
    bad = make_tiny_model(tmp_path / "m")
    (bad / "tokenizer_config.json").write_text("[1]")
    ok = _csv(tmp_path / "ok.csv", PAIRS)
    assert main(["finetune", "--model", str(bad), "--train", str(ok), "--text-columns", "q", "--label-column",
                 "y", "--output", str(tmp_path / "o3"), *QUICK]) == 2
    assert "tokenizer_config.json: expected a JSON object" in capsys.readouterr().err


def test_empty_labels_and_json_structures_as_text_are_refused(model, tmp_path, capsys):
    train = _csv(tmp_path / "train.csv", PAIRS + [{"q": "a bird", "a": "flies", "y": "  "}])
    rc = _finetune(model, train, tmp_path / "o")
    assert rc == 2 and "train.csv:7: field 'y' is empty: expected a label" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a", "y": "0"}\n{"q": ["a", "list"], "y": "1"}\n')
    rc = main(["finetune", "--model", str(model), "--train", str(bad), "--text-columns", "q",
               "--label-column", "y", "--output", str(tmp_path / "o"), *QUICK])
    assert rc == 2 and "bad.jsonl:2: field 'q' is a JSON list: expected a text" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lone_surrogates_in_jsonl_text_are_replaced_not_a_crash(model, tmp_path):
    """JSON may escape half a surrogate pair ("\\ud800"); the tokenizer cannot take it. It becomes U+FFFD (which the
    tokenizer drops), as invalid UTF-8 does, in training and in prediction."""
    rows = [{"q": f"the cat {i} \ud800sat", "y": "yes" if i % 2 else "no"} for i in range(8)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps escapes it as \ud800
    assert "\\ud800" in train.read_text()
    out = tmp_path / "o"
    assert main(["finetune", "--model", str(model), "--train", str(train), "--text-columns", "q",
                 "--label-column", "y", "--output", str(out), *QUICK]) == 0
    assert main(["predict", "--model", str(out), "--input", str(train), "--output", str(tmp_path / "p.jsonl")]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(rows)
    assert json.loads((out / "finetune_task.json").read_text())["seed"] == 1  # the run is (model, data, settings, seed)


def test_symmetric_needs_a_pair_and_the_output_extension_hint_is_one_that_works(model, tmp_path, capsys):
    train = _csv(tmp_path / "train.csv", PAIRS)
    rc = main(["finetune", "--model", str(model), "--train", str(train), "--text-columns", "q",
               "--label-column", "y", "--symmetric", "--output", str(tmp_path / "o"), *QUICK])
    assert rc == 2 and "--symmetric: swaps the two sentences of a pair, but --text-columns names one" in \
        capsys.readouterr().err
    assert _finetune(model, train, tmp_path / "o") == 0
    rc = main(["predict", "--model", str(tmp_path / "o"), "--input", str(train), "--output", str(tmp_path / "p.txt"),
               "--format", "csv"])
    assert rc == 2 and "p.txt: cannot tell the format from the extension (name the output .csv, .tsv or .jsonl; " \
        "--format is the input's)" in capsys.readouterr().err


def test_labels_that_are_one_number_spelt_two_ways_are_refused_not_two_classes(model, tmp_path, capsys):
    """In a CSV `1` and `1.0` are different strings: as labels they would silently be separate classes."""
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("q,y\nthe cat,0\na dog,1\nthe mat,1.0\na bird,0\n")
    rc = main(["finetune", "--model", str(model), "--train", str(mixed), "--text-columns", "q", "--label-column",
               "y", "--output", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert rc == 2 and f"{mixed}:4: field 'y': label '1.0' is the same number as label '1' (line 3)" in err
    assert not (tmp_path / "o").exists()
    train = tmp_path / "train.csv"
    train.write_text("q,y\nthe cat,0\na dog,1\nthe mat,1\na bird,0\n")
    dev = tmp_path / "dev.csv"
    dev.write_text("q,y\nthe cat,0.0\n")
    rc = main(["finetune", "--model", str(model), "--train", str(train), "--dev", str(dev), "--text-columns", "q",
               "--label-column", "y", "--output", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert rc == 2 and "label '0.0' does not occur in the training file (labels: 0, 1); it is the same number as " \
                       "the training label '0'" in err
    big = tmp_path / "big.csv"  # ids past 2**53 are different numbers, though equal as floats
    big.write_text("q,y\nthe cat,9007199254740992\na dog,9007199254740993\n")
    rc = main(["finetune", "--model", str(model), "--train", str(big), "--text-columns", "q", "--label-column", "y",
               "--output", str(tmp_path / "o2"), *QUICK])
    assert rc == 0, capsys.readouterr().err


def test_two_tasks_left_at_the_default_output_keep_both_models(model, tmp_path, capsys, monkeypatch):
    """Without --output the model goes to ./finetuned; a second task whose default would replace another task's
    model goes to ./finetuned-2 (named on stdout) and exits 0; the same fine-tuning again replaces its own folder;
    a folder holding other files, or a dangling link, is skipped too; --overwrite replaces ./finetuned."""
    monkeypatch.chdir(tmp_path)
    first = _csv(tmp_path / "first.csv", PAIRS)
    other = _csv(tmp_path / "other.csv", [dict(r, y="yes" if r["y"] == "yes" else "no") for r in PAIRS])

    def run(train, *extra):
        return main(["finetune", "--model", str(model), "--train", str(train), "--text-columns", "q,a",
                     "--label-column", "y", *QUICK, *extra])

    assert run(first) == 0 and (tmp_path / "finetuned" / "finetune_task.json").is_file()
    first_model = {p.name: p.read_bytes() for p in (tmp_path / "finetuned").iterdir()}
    capsys.readouterr()
    assert run(other) == 0
    assert "finetuned is taken (another task's fine-tuned model, other files, or not a folder); writing to " \
           "finetuned-2" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "finetuned").iterdir()} == first_model
    task2 = json.loads((tmp_path / "finetuned-2" / "finetune_task.json").read_text())
    assert task2["train_file"] == str(other.resolve())
    assert run(other) == 0 and "writing to finetuned-2" in capsys.readouterr().out  # its own folder, replaced
    assert not (tmp_path / "finetuned-3").exists()
    assert run(first) == 0 and "writing to" not in capsys.readouterr().out
    (tmp_path / "finetuned-3").mkdir()
    (tmp_path / "finetuned-3" / "notes.txt").write_text("mine")
    (tmp_path / "third.csv").write_text((tmp_path / "first.csv").read_text().replace("yes", "YES"))
    assert run(tmp_path / "third.csv") == 0 and "writing to finetuned-4" in capsys.readouterr().out
    assert (tmp_path / "finetuned-3" / "notes.txt").read_text() == "mine"
    (tmp_path / "finetuned-5").symlink_to(tmp_path / "gone")  # dangling: skipped, not written through
    (tmp_path / "fourth.csv").write_text((tmp_path / "first.csv").read_text().replace("no", "NO"))
    assert run(tmp_path / "fourth.csv") == 0 and "writing to finetuned-6" in capsys.readouterr().out
    # a run that fails on its input does not announce where it would have written
    (tmp_path / "bad.csv").write_text("q,a,y\nx,y,yes\n")  # a single label
    assert run(tmp_path / "bad.csv") == 2
    assert "writing to" not in capsys.readouterr().out
    assert run(other, "--overwrite") == 0 and "writing to" not in capsys.readouterr().out  # ./finetuned replaced
    assert json.loads((tmp_path / "finetuned" / "finetune_task.json").read_text())["train_file"] == str(other.resolve())


def test_an_earlier_output_of_another_model_or_training_file_is_not_replaced_silently(model, tmp_path, capsys):
    """Two tasks left at one --output (the default ./finetuned, say): the second is refused unless --overwrite;
    re-running the same fine-tuning replaces its own output. The Python API takes str paths too."""
    from convbert.finetune.owntask import finetune_own_task, predict_file
    from convbert.finetune.trainer import FinetuneConfig

    first = _csv(tmp_path / "first.csv", PAIRS)
    other = _csv(tmp_path / "other.csv", [dict(r, y="yes" if r["y"] == "yes" else "no") for r in PAIRS])
    out = tmp_path / "ft"
    assert _finetune(model, first, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _finetune(model, other, out) == 2
    assert (f"--output {out}: holds an earlier fine-tuned model of --train {first.resolve()}; choose a new --output "
            "or pass --overwrite") in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    second_model = make_tiny_model(tmp_path / "m2", seed=1)
    assert _finetune(second_model, first, out) == 2
    assert f"holds an earlier fine-tuned model of --model {model}" in capsys.readouterr().err
    assert _finetune(model, first, out, "--seed", "2") == 0  # the same fine-tuning again: replaced
    assert _finetune(model, other, out, "--overwrite") == 0
    assert json.loads((out / "finetune_task.json").read_text())["labels"] == ["no", "yes"]
    cfg = FinetuneConfig(epochs=1, batch_size=8, max_seq_length=32)
    result = finetune_own_task(str(model), str(first), None, ["q", "a"], "y", False, str(tmp_path / "api"), cfg,
                               progress=False)
    # a pair task is doubled with its texts swapped only when it says it is symmetric, as `--symmetric` does
    # (the Python default doubled every pair task: wrong for question/answer or NLI-like pairs)
    assert result["train_examples"] == len(PAIRS)
    assert json.loads((tmp_path / "api" / "finetune_task.json").read_text())["settings"]["double_unordered"] is False
    doubled = finetune_own_task(model, first, None, ["q", "a"], "y", False, tmp_path / "sym", cfg, progress=False,
                                symmetric=True)
    assert doubled["train_examples"] == 2 * len(PAIRS)
    (tmp_path / "new.csv").write_text("q,a\nthe cat,sat\n")
    assert predict_file(str(tmp_path / "api"), str(tmp_path / "new.csv"), str(tmp_path / "p.csv")) == 1


def test_default_columns_and_kept_input_columns_in_predictions(model, tmp_path, capsys):
    """A file whose header is text,label needs no column flags; --keep-columns copies input columns (an id, the
    text) into each prediction row, in CSV and JSONL; an unknown or clashing column is refused."""
    rows = ["text,label"] + [f"the {a} sat,{a}" for a in ("cat", "dog")] * 4
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    assert main(["finetune", "--model", str(model), "--train", str(tmp_path / "train.csv"), "--output",
                 str(tmp_path / "ft"), *QUICK]) == 0
    task = json.loads((tmp_path / "ft" / "finetune_task.json").read_text())
    assert task["text_columns"] == ["text"] and task["label_column"] == "label"
    (tmp_path / "new.csv").write_text('id,text\nA7,the cat sat\nB9,"the dog, sat"\n')
    assert main(["predict", "--model", str(tmp_path / "ft"), "--input", str(tmp_path / "new.csv"), "--output",
                 str(tmp_path / "p.csv"), "--keep-columns", "id,text"]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == ["index", "id", "text", "label", "prob_cat", "prob_dog"]
    assert [r[:3] for r in got[1:]] == [["0", "A7", "the cat sat"], ["1", "B9", "the dog, sat"]]
    assert main(["predict", "--model", str(tmp_path / "ft"), "--input", str(tmp_path / "new.csv"), "--output",
                 str(tmp_path / "p.jsonl"), "--keep-columns", "id"]) == 0
    first = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert first["id"] == "A7" and first["index"] == 0 and set(first["probabilities"]) == {"cat", "dog"}
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "ft"), "--input", str(tmp_path / "new.csv"), "--output",
                 str(tmp_path / "q.csv"), "--keep-columns", "idx"]) == 2
    assert "has no column 'idx' (columns: id, text)" in capsys.readouterr().err
    (tmp_path / "clash.csv").write_text("label,text\nx,the cat\n")
    assert main(["predict", "--model", str(tmp_path / "ft"), "--input", str(tmp_path / "clash.csv"), "--output",
                 str(tmp_path / "q.csv"), "--keep-columns", "label"]) == 2
    assert "label would clash with the prediction's own columns" in capsys.readouterr().err
    assert not (tmp_path / "q.csv").exists()


def test_kept_columns_keep_their_json_values_and_tsv_output_is_unquoted(model, tmp_path, capsys):
    rows = ["text,label"] + [f"the {a} sat,{a}" for a in ("cat", "dog")] * 4
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    assert main(["finetune", "--model", str(model), "--train", str(tmp_path / "train.csv"), "--output",
                 str(tmp_path / "ft"), *QUICK]) == 0
    src = tmp_path / "new.jsonl"
    src.write_text('{"id": 7, "text": "he said \\"hi\\" to the cat"}\n{"id": null, "text": "the dog"}\n'
                   '{"text": "the cat sat", "id": 8.5}\n')
    predict = ["predict", "--model", str(tmp_path / "ft"), "--input", str(src), "--keep-columns", "id,text"]
    assert main(predict + ["--output", str(tmp_path / "p.jsonl")]) == 0
    got = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["id"] for r in got] == [7, None, 8.5] and got[0]["text"] == 'he said "hi" to the cat'
    assert main(predict + ["--output", str(tmp_path / "p.tsv")]) == 0
    from convbert.finetune.owntask import read_table

    cols, back = read_table(tmp_path / "p.tsv")
    assert cols[:4] == ["index", "id", "text", "label"]
    assert [(r["id"], r["text"]) for _, r in back] == [("7", 'he said "hi" to the cat'), ("", "the dog"),
                                                       ("8.5", "the cat sat")]
    for bad in ('{"id": 1, "text": "a\\tb"}', '{"id": "a\\rb", "text": "the cat"}'):
        src.write_text(bad + "\n")
        capsys.readouterr()
        assert main(predict + ["--output", str(tmp_path / "q.tsv")]) == 2
        assert "TSV cannot hold unquoted; write .csv or .jsonl" in capsys.readouterr().err
        assert not (tmp_path / "q.tsv").exists()
    src.write_text('{"id": "a\\ud800b", "text": "the cat"}\n{"id": 1e400, "text": "the dog"}\n')
    assert main(predict + ["--output", str(tmp_path / "s.tsv")]) == 0  # a lone surrogate: U+FFFD, as in the text
    assert [r["id"] for _, r in read_table(tmp_path / "s.tsv")[1]] == ["a\ufffdb", "inf"]
    assert main(predict + ["--output", str(tmp_path / "s.jsonl")]) == 0
    assert [json.loads(line)["id"] for line in (tmp_path / "s.jsonl").read_text().splitlines()] == ["a\ufffdb", "inf"]
    src.write_text('{"id": 1, "text": "the cat"}\n{"text": "the dog"}\n')
    capsys.readouterr()
    assert main(predict + ["--output", str(tmp_path / "m.jsonl")]) == 2
    assert "new.jsonl:2: field 'id' is missing (--keep-columns)" in capsys.readouterr().err


def test_regression_scores_keep_float32_precision_in_csv_and_tsv(model, tmp_path):
    """CSV/TSV scores were written with 6 significant digits (1234567.25 came out as 1.23457e+06)."""
    import torch

    from convbert.model.heads import ConvBertForSequenceClassification
    from convbert.weights import load_weights, save_weights

    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": r["q"], "score": i * 0.5}) for i, r in enumerate(PAIRS)) + "\n")
    out = tmp_path / "reg"
    assert main(["finetune", "--model", str(model), "--train", str(train), "--text-columns", "text",
                 "--label-column", "score", "--regression", "--output", str(out), *QUICK]) == 0
    head_file = out / "classifier.safetensors"
    head = load_weights(head_file)
    head["out_proj.weight"] = torch.zeros_like(head["out_proj.weight"])
    head["out_proj.bias"] = torch.tensor([1234567.25])
    save_weights(head, head_file, metadata={"format": "pt"})
    assert ConvBertForSequenceClassification.from_pretrained(out).classifier.out_proj.bias.item() == 1234567.25
    for suffix, sep in ((".csv", ","), (".tsv", "\t")):
        predictions = tmp_path / f"p{suffix}"
        assert main(["predict", "--model", str(out), "--input", str(train), "--output", str(predictions)]) == 0
        assert float(predictions.read_text().splitlines()[1].split(sep)[-1]) == 1234567.25


def test_spreadsheet_quirks_in_own_task_files(model, tmp_path, capsys):
    """Blank lines before the header, trailing unnamed columns, an unclosed quote, bad bytes, UTF-16 and a JSON
    array: read, or refused with the line that causes it."""
    from convbert.errors import ConvBertError
    from convbert.finetune.owntask import read_table

    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\r\n\r\ntext,label,,\r\ngood,pos,,\r\n\"multi\nline\",neg,,\r\n")
    cols, rows = read_table(excel)
    assert cols == ["text", "label"]
    assert rows == [(4, {"text": "good", "label": "pos"}), (5, {"text": "multi\nline", "label": "neg"})]
    twice = tmp_path / "twice.csv"
    twice.write_text("text,label,text\na,b,c\n")
    with pytest.raises(ConvBertError, match=r"twice.csv:1: column name\(s\) 'text' appear more than once"):
        read_table(twice)
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text('text,label\ngood,pos\n"unterminated, pos\nbad,neg\nfine,pos\n')
    with pytest.raises(ConvBertError, match=r"unclosed.csv:3-5: expected 2 fields like the header, found 1; a "
                                            r"quote opened on its first line is never closed"):
        read_table(unclosed)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text,label\ngood,pos\ncaf\xe9,neg\n")
    with pytest.raises(ConvBertError, match=r"latin.csv:3: not valid UTF-8 \(byte 23 of the file\)"):
        read_table(latin)
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("text,label\ngood,pos\n".encode("utf-16"))
    with pytest.raises(ConvBertError, match=r"utf16.csv: a UTF-16 file .* save it as UTF-8"):
        read_table(utf16)
    array = tmp_path / "array.jsonl"
    array.write_text('[{"text": "a", "label": "x"},\n {"text": "b", "label": "y"}]\n')
    with pytest.raises(ConvBertError, match=r"array.jsonl:1: a JSON array; expected JSON Lines"):
        read_table(array)


def test_the_label_set_is_the_training_files_also_with_max_train_examples(model, tmp_path):
    """--max-train-examples 2 on a file whose third row has a third label: the dev file's third label is known."""
    rows = [{"text": "good one", "label": "pos"}, {"text": "fine one", "label": "neu"},
            {"text": "bad one", "label": "neg"}, {"text": "great", "label": "pos"}]
    train = _csv(tmp_path / "train.csv", rows)
    out = tmp_path / "o"
    assert main(["finetune", "--model", str(model), "--train", str(train), "--dev", str(train),
                 "--max-train-examples", "2", "--output", str(out), *QUICK]) == 0
    assert json.loads((out / "finetune_task.json").read_text())["labels"] == ["neg", "neu", "pos"]


def test_keep_columns_given_twice_is_refused(model, tmp_path, capsys):
    train = _csv(tmp_path / "train.csv", [{"id": str(i), "text": r["q"], "label": r["y"]} for i, r in enumerate(PAIRS)])
    out = tmp_path / "o"
    assert main(["finetune", "--model", str(model), "--train", str(train), "--output", str(out), *QUICK]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--input", str(train), "--output", str(tmp_path / "p.csv"),
                 "--keep-columns", "id,id"]) == 2
    assert "--keep-columns id,id: 'id' given twice" in capsys.readouterr().err


def test_dynamic_padding_predictions_do_not_depend_on_the_batch(model, tmp_path):
    """Rows are padded only with rows of their own length: a row scores the same alone, beside a longer row and at
    any batch size (before, padding to the batch's longest changed the conv branch's output)."""
    import numpy as np
    import torch

    from convbert.finetune.features import featurize
    from convbert.finetune.trainer import load_tokenizer, predict_logits
    from convbert.model import ConvBertModel
    from convbert.model.heads import ConvBertForSequenceClassification

    torch.manual_seed(0)
    encoder = ConvBertModel.from_pretrained(model)
    clf = ConvBertForSequenceClassification(encoder.config, num_labels=2, encoder=encoder).eval()
    texts = ["good", "a much longer sentence about the cat on the mat", "bad", "the dog", "it rains again today",
             "good"]
    feats = featurize(texts, None, ["0"] * len(texts), load_tokenizer(model), 32, ["0", "1"])
    one = predict_logits(clf, feats, 1, pad_to_max=False)
    for batch_size in (2, 4, 32):
        np.testing.assert_allclose(predict_logits(clf, feats, batch_size, pad_to_max=False), one, atol=1e-5)
    np.testing.assert_allclose(one[0], one[5], atol=1e-6)  # the same text, the same score
    fixed = predict_logits(clf, feats, 4, pad_to_max=True)
    assert np.abs(fixed - one).max() > 1e-4  # the conv branch does see padding: fixed padding scores differently


def test_an_output_that_cannot_be_written_is_refused_before_the_work(model, tmp_path, capsys, monkeypatch):
    """finetune, predict and train-vocab found a file where a folder must be (or no write permission) only when
    writing their result, after training or predicting."""
    import convbert.finetune.owntask as owntask

    train = _csv(tmp_path / "train.csv", PAIRS)
    (tmp_path / "afile").write_text("x")
    trained = []
    monkeypatch.setattr(owntask, "train", lambda *a, **k: trained.append(1))  # must not be reached
    assert _finetune(model, train, tmp_path / "afile" / "sub") == 2
    assert f"--output {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder" \
        in capsys.readouterr().err
    assert main(["predict", "--model", str(model), "--input", str(train), "--output",
                 str(tmp_path / "afile" / "p.csv")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["train-vocab", "--input", str(train), "--vocab-size", "50", "--output",
                 str(tmp_path / "afile" / "deeper" / "v.txt")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not trained


def test_check_output_location_probes_write_permission(tmp_path, monkeypatch):
    import tempfile

    from convbert.errors import ConvBertError
    from convbert.utils import check_output_location

    check_output_location(tmp_path / "new" / "deeper" / "out.csv")  # creates nothing
    assert list(tmp_path.iterdir()) == []

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(ConvBertError, match=rf"--output {tmp_path / 'x.csv'}: cannot write in {tmp_path} "
                                            r"\(Permission denied\)"):
        check_output_location(tmp_path / "x.csv")


def test_predict_takes_threads_device_and_precision_like_finetune(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # (this process's thread count stays as it is)
    train = _csv(tmp_path / "train.csv", PAIRS)
    assert _finetune(model, train, tmp_path / "ft") == 0
    base = ["predict", "--model", str(tmp_path / "ft"), "--input", str(train)]
    assert main([*base, "--output", str(tmp_path / "fp32.csv"), "--no-progress"]) == 0
    assert main([*base, "--output", str(tmp_path / "bf16.csv"), "--threads", "1", "--device", "cpu",
                 "--precision", "bf16", "--no-progress"]) == 0

    def probabilities(path):
        with open(path, newline="") as f:
            return [[float(v) for k, v in row.items() if k.startswith("prob_")] for row in csv.DictReader(f)]

    fp32, bf16 = probabilities(tmp_path / "fp32.csv"), probabilities(tmp_path / "bf16.csv")
    assert len(fp32) == len(PAIRS) and all(abs(a - b) < 0.05 for r, s in zip(fp32, bf16) for a, b in zip(r, s))
    capsys.readouterr()
    assert main([*base, "--output", str(tmp_path / "bar.csv"), "--threads", "1"]) == 0  # a progress bar by default
    assert "predicting" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--output", str(tmp_path / "gpu.csv"), "--device", "cuda"]) == 2
        assert "CUDA is not available here" in capsys.readouterr().err
        assert not (tmp_path / "gpu.csv").exists()
