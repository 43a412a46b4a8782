"""End to end: `convbert glue … --predict` with a random tiny model on GLUE-layout fixtures (both layouts)."""

from __future__ import annotations

import json
import math
import zipfile

import pytest

from convbert.cli import main
from convbert.errors import ConvBertError
from test_finetune_data import TEST_SIZES, make_tiny_model, write_glue

FILES = ["AX", "CoLA", "MNLI-m", "MNLI-mm", "MRPC", "QNLI", "QQP", "RTE", "SST-2", "STS-B", "WNLI"]
QUICK = ["--epochs", "1", "--batch-size", "8", "--max-seq-length", "32", "--no-progress"]
VALUES = {
    "CoLA": {"0", "1"}, "SST-2": {"0", "1"}, "MRPC": {"0", "1"}, "QQP": {"0", "1"}, "WNLI": {"0", "1"},
    "MNLI-m": {"entailment", "neutral", "contradiction"}, "MNLI-mm": {"entailment", "neutral", "contradiction"},
    "AX": {"entailment", "neutral", "contradiction"}, "QNLI": {"entailment", "not_entailment"},
    "RTE": {"entailment", "not_entailment"},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_e2e")
    model = make_tiny_model(root / "model")
    glue = write_glue(root / "glue", "glue")
    return root, model, glue


@pytest.fixture(scope="module")
def full_run(env):
    root, model, glue = env
    out = root / "out"
    rc = main(["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "all", "--seeds", "1",
               "--output", str(out), "--predict", *QUICK])
    assert rc == 0
    return out


def _rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    assert lines[0] == "index\tprediction"
    return [l.split("\t") for l in lines[1:]]


def test_submission_zip_has_the_11_files(env, full_run):
    out = full_run
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == sorted(f"{n}.tsv" for n in FILES)  # top level, no folder
        for name in FILES:
            rows = _rows(zf.read(f"{name}.tsv").decode("utf-8"))
            assert len(rows) == TEST_SIZES[name], name
            assert [r[0] for r in rows] == [str(i) for i in range(TEST_SIZES[name])], name
            vals = [r[1] for r in rows]
            if name == "STS-B":
                assert all(0.0 <= float(v) <= 5.0 for v in vals)
                assert all(len(v.split(".")[1]) == 3 for v in vals)
            else:
                assert set(vals) <= VALUES[name], (name, vals)
        # WNLI: the training majority class ("1" in the fixture), not a model prediction.
        assert {r[1] for r in _rows(zf.read("WNLI.tsv").decode())} == {"1"}
    assert (out / "submission" / "CoLA.tsv").is_file()


def test_the_same_predictions_give_the_same_zip_byte_for_byte(env, full_run, tmp_path):
    """The zip's entries carry a fixed date, so rebuilding a submission later does not change its hash."""
    import time

    from convbert.finetune.submission import build_submission

    _, _, glue = env
    sources = {name: full_run / "submission" / f"{name}.tsv" for name in FILES}
    first = build_submission(tmp_path / "a", sources, glue, wnli_majority=False, log=lambda _: None)
    time.sleep(2.1)  # zip dates have a 2-second resolution
    second = build_submission(tmp_path / "b", sources, glue, wnli_majority=False, log=lambda _: None)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as zf:
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert zf.read("CoLA.tsv") == (full_run / "submission" / "CoLA.tsv").read_bytes()


def test_results_table_runs_and_averages(full_run, capsys):
    out = full_run
    md = (out / "results.md").read_text()
    assert "| Task | Metric | Median | Mean | Std | Seeds |" in md
    assert "Paper average (8 tasks, WNLI excluded" in md and "leaderboard-style average (9 tasks incl. WNLI" in md
    assert "| MNLI | accuracy (mm) |" in md and "| STS-B | Spearman |" in md and "| QQP | F1 |" in md
    summary = json.loads((out / "results.json").read_text())
    assert summary["paper_average"]["of_medians"] is not None
    assert summary["leaderboard_average"]["of_medians"] is not None
    for t in ("cola", "sst", "mrpc", "sts", "qqp", "mnli", "qnli", "rte", "wnli"):
        rec = json.loads((out / "runs" / f"{t}-seed1.json").read_text())
        assert rec["train"]["steps"] >= 1 and rec["metrics"]
    qqp = json.loads((out / "runs" / "qqp-seed1.json").read_text())
    assert qqp["train"]["skipped_rows"] == 2 and qqp["dev"]["dev"]["skipped_rows"] == 2
    mrpc = json.loads((out / "runs" / "mrpc-seed1.json").read_text())
    assert mrpc["train"]["examples"] == 24  # doubled with the sentences swapped
    assert mrpc["settings"]["layer_decay"] == 0.8 and mrpc["settings"]["loss_reduction"] == "sum"
    mnli = json.loads((out / "runs" / "mnli-seed1.json").read_text())
    assert set(mnli["predictions"]) == {"MNLI-m", "MNLI-mm", "AX"}  # AX predicted by the MNLI model


def test_rerun_skips_finished_runs(env, full_run, capsys):
    root, model, glue = env
    out = full_run
    before = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    rc = main(["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "all", "--seeds", "1",
               "--output", str(out), "--predict", *QUICK])
    assert rc == 0
    assert "resuming: 9 finished run(s) kept, 0 to do" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == before


def test_interrupted_then_resumed_equals_uninterrupted(env, tmp_path):
    _, model, glue = env
    args = ["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "rte", *QUICK]
    assert main(args + ["--seeds", "2", "--output", str(tmp_path / "a")]) == 0
    assert main(args + ["--seeds", "1", "--output", str(tmp_path / "b")]) == 0  # "interrupted" after seed 1
    assert main(args + ["--seeds", "2", "--output", str(tmp_path / "b")]) == 0
    for s in (1, 2):
        a = json.loads((tmp_path / "a" / "runs" / f"rte-seed{s}.json").read_text())
        b = json.loads((tmp_path / "b" / "runs" / f"rte-seed{s}.json").read_text())
        assert a["metrics"] == b["metrics"] and a["train"]["loss_history"] == b["train"]["loss_history"]
    assert (tmp_path / "a" / "results.md").read_text() == (tmp_path / "b" / "results.md").read_text()


def test_task_not_run_is_an_error_unless_fill_missing(env, tmp_path, capsys):
    _, model, glue = env
    args = ["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "cola", "--seeds", "1",
            "--output", str(tmp_path / "o"), "--predict", *QUICK]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: --predict needs every GLUE task" in err and "--fill-missing" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "runs" / "cola-seed1.json").exists()  # refused before training
    assert main(args + ["--fill-missing"]) == 0
    err = capsys.readouterr().err
    assert "--fill-missing: SST-2.tsv filled with the constant '1'" in err
    with zipfile.ZipFile(tmp_path / "o" / "submission.zip") as zf:
        assert len(zf.namelist()) == 11
        assert len(_rows(zf.read("QQP.tsv").decode())) == TEST_SIZES["QQP"]
    assert "FILLED" in (tmp_path / "o" / "submission.md").read_text()


def test_convbert_layout_mnli_with_ax(env, tmp_path):
    _, model, _ = env
    glue = write_glue(tmp_path / "data", "convbert", n_train=6, n_dev=3)
    out = tmp_path / "o"
    rc = main(["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "ax", "--seeds", "1",
               "--output", str(out), "--predict", "--fill-missing", *QUICK])
    assert rc == 0
    assert (out / "runs" / "mnli-seed1.json").is_file()  # ax → the MNLI model
    ax = _rows((out / "submission" / "AX.tsv").read_text())
    assert len(ax) == TEST_SIZES["AX"] and {r[1] for r in ax} <= VALUES["AX"]


def test_bad_model_dir_is_a_one_line_error(env, tmp_path, capsys):
    _, _, glue = env
    rc = main(["glue", "--model", str(tmp_path / "nope"), "--glue-dir", str(glue), "--tasks", "cola",
               "--output", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convbert glue: error:") and "config.json" in err and "\n" not in err


@pytest.mark.parametrize("command", ["glue", "finetune"])
def test_a_negative_thread_count_is_a_one_line_error(env, tmp_path, capsys, command):
    model, _, glue = env
    args = (["--glue-dir", str(glue), "--tasks", "rte"] if command == "glue" else
            ["--train", str(glue / "RTE" / "train.tsv"), "--text-columns", "sentence1,sentence2", "--label-column",
             "label"])
    rc = main([command, "--model", str(model), *args, "--threads", "-1", "--output", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"convbert {command}: error: --threads: expected 1..4096") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_bf16_and_fp16_fine_tuning_run_on_the_cpu_and_are_recorded(env, tmp_path, capsys):
    """bf16 autocast, and fp16 autocast with its gradient scaler (slow on most CPUs, which the CLI says, but it
    runs, so an fp16 set-up can be checked without a GPU)."""
    _, model, glue = env
    args = ["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "stsb", "--seeds", "1", *QUICK]
    for precision in ("bf16", "fp16"):
        assert main(args + ["--output", str(tmp_path / precision), "--precision", precision, "--device", "cpu"]) == 0
        run = json.loads((tmp_path / precision / "runs" / "sts-seed1.json").read_text())
        assert run["settings"]["precision"] == precision
        assert all(math.isfinite(v) for v in run["train"]["loss_history"]) and run["train"]["loss_history"]
        assert all(math.isfinite(v) for v in run["metrics"].values() if isinstance(v, float))
        noted = "note: --precision fp16 on the CPU runs through autocast with a gradient scaler"
        assert (noted in capsys.readouterr().err) == (precision == "fp16")


def test_bf16_predictions_are_close_to_fp32(env):
    import numpy as np
    import torch

    from convbert.finetune.features import featurize
    from convbert.finetune.trainer import load_tokenizer, predict_logits
    from convbert.model.heads import ConvBertForSequenceClassification

    _, model_dir, _ = env
    torch.manual_seed(0)
    from convbert.model import ConvBertModel

    encoder = ConvBertModel.from_pretrained(model_dir)
    model = ConvBertForSequenceClassification(encoder.config, 3)
    model.convbert = encoder
    texts = ["the cat sat on the mat", "a dog ran in the park and barked", "numbers 1 2 3"] * 3
    feats = featurize(texts, None, [None] * len(texts), load_tokenizer(model_dir), 32, ["a", "b", "c"])
    fp32 = predict_logits(model, feats, 4)
    bf16 = predict_logits(model, feats, 4, precision="bf16")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape == (9, 3)
    assert np.abs(bf16 - fp32).max() < 0.05 * max(1.0, np.abs(fp32).max())
    assert not np.array_equal(bf16, fp32)  # it did run in bf16


# -- damaged or foreign files in an output folder being resumed ---------------------------------------------------


def _glue(model, glue, out, tasks="rte", *extra):
    return main(["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", tasks, "--seeds", "1",
                 "--output", str(out), *QUICK, *extra])


@pytest.mark.parametrize("damage", [b"[]", b'"x"', b"\xff\xfe{", b'{"task": "rte", "seed": 1, "fingerprint": "0"}'])
def test_a_damaged_run_record_is_redone(env, tmp_path, capsys, damage):
    _, model, glue = env
    assert _glue(model, glue, tmp_path / "o") == 0
    record = tmp_path / "o" / "runs" / "rte-seed1.json"
    good = json.loads(record.read_text())
    record.write_bytes(damage)
    assert _glue(model, glue, tmp_path / "o") == 0
    again = json.loads(record.read_text())
    assert again["metrics"] == good["metrics"] and again["train"]["loss_history"] == good["train"]["loss_history"]


def test_a_run_on_changed_data_is_not_reused(env, tmp_path, capsys):
    import shutil

    _, model, glue = env
    mine = shutil.copytree(glue, tmp_path / "glue")
    assert _glue(model, mine, tmp_path / "o") == 0
    train = mine / "RTE" / "train.tsv"
    train.write_text("\n".join(train.read_text().splitlines()[:4]) + "\n")
    capsys.readouterr()
    assert _glue(model, mine, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "rte-seed1.json: finished with other RTE data (the train file(s) changed)" in err
    # the refusal names what changed: settings as old -> new, another model
    assert _glue(model, glue, tmp_path / "o2") == 0
    capsys.readouterr()
    assert _glue(model, glue, tmp_path / "o2", "rte", "--lr", "0.001") == 2
    err = capsys.readouterr().err
    assert "rte-seed1.json: finished with lr: " in err and "-> 0.001" in err and "\n" not in err.strip()
    other = make_tiny_model(tmp_path / "other", seed=7)
    assert _glue(other, glue, tmp_path / "o2") == 2
    assert "finished with another model (its config, weights or vocab differ)" in capsys.readouterr().err


def test_runs_of_another_model_are_left_out_of_the_summary(env, tmp_path, capsys):
    _, model, glue = env
    other = make_tiny_model(tmp_path / "other", seed=7)
    assert _glue(model, glue, tmp_path / "o", "cola") == 0
    capsys.readouterr()
    assert _glue(other, glue, tmp_path / "o", "rte") == 0
    captured = capsys.readouterr()
    assert "left out of the summary, made with another model: cola-seed1.json" in captured.err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert set(results["tasks"]) == {"rte"}


def test_fill_missing_does_not_retrain_a_task_without_a_test_file(env, tmp_path, capsys):
    import shutil

    _, model, glue = env
    mine = shutil.copytree(glue, tmp_path / "glue")
    (mine / "SST-2" / "test.tsv").unlink()
    args = ("sst", "--predict", "--fill-missing")
    assert _glue(model, mine, tmp_path / "o", *args) == 0
    capsys.readouterr()
    assert _glue(model, mine, tmp_path / "o", *args) == 0
    assert "resuming: 1 finished run(s) kept, 0 to do" in capsys.readouterr().err


def test_a_damaged_prediction_file_makes_its_run_redo_and_the_submission_comes_out_the_same(env, full_run, tmp_path,
                                                                                          capsys):
    """A finished run whose test predictions no longer pass the submission checks (here cut short) is redone, as a
    damaged run record is: it gives the same predictions, so the rebuilt submission equals the one before."""
    import shutil

    root, model, glue = env
    out = shutil.copytree(full_run, tmp_path / "out")
    pred = out / "runs" / "cola-seed1" / "CoLA.tsv"
    whole = pred.read_bytes()
    pred.write_text("\n".join(pred.read_text().splitlines()[:3]) + "\n")
    before = {p.name: p.read_bytes() for p in (out / "submission").iterdir()}
    with zipfile.ZipFile(out / "submission.zip") as zf:
        zipped_before = {n: zf.read(n) for n in zf.namelist()}
    capsys.readouterr()
    assert main(["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "all", "--seeds", "1",
                 "--output", str(out), "--predict", *QUICK]) == 0
    assert "resuming: 8 finished run(s) kept, 1 to do" in capsys.readouterr().err
    assert pred.read_bytes() == whole
    assert {p.name: p.read_bytes() for p in (out / "submission").iterdir()} == before
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert {n: zf.read(n) for n in zf.namelist()} == zipped_before


def test_a_missing_prediction_file_makes_the_run_redo(env, full_run, tmp_path, capsys):
    import shutil

    root, model, glue = env
    out = shutil.copytree(full_run, tmp_path / "out")
    shutil.rmtree(out / "runs" / "rte-seed1")
    capsys.readouterr()
    assert main(["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "all", "--seeds", "1",
                 "--output", str(out), "--predict", *QUICK]) == 0
    assert "resuming: 8 finished run(s) kept, 1 to do" in capsys.readouterr().err
    assert (out / "runs" / "rte-seed1" / "RTE.tsv").is_file()


def test_the_python_api_routes_its_report_through_log(env, tmp_path, capsys):
    """run_glue with a `log` callback writes nothing to stdout or stderr: the table comes through the callback."""
    from convbert.finetune.runner import GlueOptions, run_glue
    from convbert.finetune.trainer import FinetuneConfig

    _, model, glue = env
    lines = []
    cfg = FinetuneConfig(epochs=1, batch_size=8, max_seq_length=32)
    # str paths and a display name, as a user would write them (the CLI hands over Paths and canonical names)
    summary = run_glue(GlueOptions(str(model), str(glue), str(tmp_path / "o"), ["RTE"], [1], cfg, progress=False,
                                   log=lines.append))
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert any(line.startswith("# GLUE dev results") and "| RTE |" in line for line in lines)
    assert "rte" in summary["tasks"]
    with pytest.raises(ConvBertError, match=r"--seeds lists a seed twice: \[1, 1\]"):  # one run counted twice
        run_glue(GlueOptions(model, glue, tmp_path / "o2", ["rte"], [1, 1], cfg, progress=False, log=lines.append))
    with pytest.raises(ConvBertError, match="unknown GLUE task 'glue'"):
        run_glue(GlueOptions(model, glue, tmp_path / "o3", ["glue"], [1], cfg, progress=False, log=lines.append))


def test_save_models_writes_folders_that_load_again(env, tmp_path):
    from convbert.model.heads import ConvBertForSequenceClassification

    _, model, glue = env
    assert _glue(model, glue, tmp_path / "o", "rte") == 0
    assert _glue(model, glue, tmp_path / "o", "rte", "--save-models") == 0  # the finished run is redone to save it
    saved = tmp_path / "o" / "runs" / "rte-seed1" / "model"
    assert (saved / "vocab.txt").read_bytes() == (model / "vocab.txt").read_bytes()
    assert ConvBertForSequenceClassification.from_pretrained(saved).num_labels == 2


def test_mnli_without_mismatched_dev_is_noted_and_an_empty_test_file_refused(env, tmp_path, capsys):
    import shutil

    _, model, glue = env
    mine = shutil.copytree(glue, tmp_path / "glue")
    (mine / "MNLI" / "dev_mismatched.tsv").unlink()
    assert _glue(model, mine, tmp_path / "o", "mnli") == 0
    assert "MNLI: no dev_mismatched file" in capsys.readouterr().err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "mnli" not in results["paper_average"]["missing"]  # it needs MNLI-m only
    assert "mnli" in results["leaderboard_average"]["missing"]  # the mean of m and mm
    test = mine / "SST-2" / "test.tsv"
    test.write_text(test.read_text().splitlines()[0] + "\n")
    assert _glue(model, mine, tmp_path / "o2", "sst", "--predict", "--fill-missing") == 2
    assert f"{test}: no test rows" in capsys.readouterr().err


def test_a_nan_metric_is_written_as_strict_json_null_and_shown_as_n_a(env, tmp_path, capsys, monkeypatch):
    import convbert.finetune.runner as runner

    _, model, glue = env
    real = runner._eval_metrics
    monkeypatch.setattr(runner, "_eval_metrics", lambda task, outs: {**real(task, outs), "spearman": float("nan")})
    assert _glue(model, glue, tmp_path / "o", "sts") == 0

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    record = json.loads((tmp_path / "o" / "runs" / "sts-seed1.json").read_text(), parse_constant=refuse)
    assert record["metrics"]["spearman"] is None
    results = json.loads((tmp_path / "o" / "results.json").read_text(), parse_constant=refuse)
    assert results["tasks"]["sts"]["metrics"]["spearman"]["median"] is None
    assert "n/a" in (tmp_path / "o" / "results.md").read_text()


def test_results_are_read_against_a_published_reference(env, full_run, tmp_path):
    """`--reference`: each paper task's median beside the published dev row, its gap, and the gap in seed stds
    (none with one seed); the tiny model has no paper size, so `auto` adds nothing."""
    assert "published reference" not in (full_run / "results.md").read_text()
    assert "reference" not in json.loads((full_run / "results.json").read_text())
    _, model, glue = env
    out = tmp_path / "o"
    assert main(["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "rte,sts", "--seeds", "2",
                 "--output", str(out), "--reference", "electra-small-owt", *QUICK]) == 0
    summary = json.loads((out / "results.json").read_text())
    ref = summary["reference"]
    assert ref["key"] == "electra-small-owt" and set(ref["tasks"]) == {"rte", "sts"}
    rte = summary["tasks"]["rte"]["metrics"]["accuracy"]
    row = ref["tasks"]["rte"]
    assert row["reference"] == 68.5 and row["ours"] == rte["median"]
    assert math.isclose(row["gap"], rte["median"] - 68.5)
    if rte["std"] > 0:
        assert math.isclose(row["gap_in_std"], row["gap"] / rte["std"])
    assert ref["paper_average"]["ours"] is None and math.isclose(ref["paper_average"]["reference"], 80.3625)
    md = (out / "results.md").read_text()
    assert "## Against a published reference: ELECTRA-Small-OWT" in md
    assert f"| RTE | accuracy | {rte['median']:.2f} | 68.50 | {row['gap']:+.2f} |" in md
    assert "| STS-B | Spearman |" in md and "reference 80.36" in md


def test_reference_rows_and_the_automatic_choice():
    from convbert import ConvBertConfig
    from convbert.finetune import references as R

    # The paper averages of the published rows (ELECTRA-Small-OWT's README average is 80.36).
    assert round(R.REFERENCES["electra-small-owt"].paper_average, 2) == 80.36
    assert all(set(r.scores) == set(R.M.PAPER_TASKS) for r in R.REFERENCES.values())
    pick = {size: R.choose_reference("auto", ConvBertConfig.from_preset(size)) for size in
            ("tiny", "small", "medium-small", "base")}
    assert pick["tiny"] is None and pick["small"].key == pick["medium-small"].key == "electra-small-owt"
    assert pick["base"].key == "convbert-base"
    plain_base = ConvBertConfig.from_preset("base", attention_type="plain")
    assert R.choose_reference("auto", plain_base).key == "electra-base"
    assert R.choose_reference("none", plain_base) is None
    assert R.choose_reference("electra-small", plain_base).key == "electra-small"
    # one seed: no spread to judge the gap by
    summary = {"tasks": {"cola": {"metrics": {"mcc": {"median": 50.0, "std": 0.0, "n": 1}}}},
               "paper_average": {"of_medians": None}}
    row = R.compare(summary, R.REFERENCES["electra-small-owt"])["tasks"]["cola"]
    assert row["gap"] == pytest.approx(-6.8) and row["gap_in_std"] is None


def test_glue_diagnostic_scores_the_submission_of_a_glue_run(env, full_run, tmp_path, capsys):
    """The AX.tsv that `convbert glue --predict` wrote is what `convbert glue-diagnostic` reads."""
    from test_finetune_diagnostic import write_full

    _, _, glue = env
    labels = write_full(tmp_path / "diagnostic-full.tsv", glue)
    out = tmp_path / "ax.json"
    assert main(["glue-diagnostic", "--predictions", str(full_run), "--diagnostic-full",
                 str(tmp_path / "diagnostic-full.tsv"), "--glue-dir", str(glue), "--output", str(out)]) == 0
    scores = json.loads(out.read_text())
    predicted = [r[1] for r in _rows((full_run / "submission" / "AX.tsv").read_text())]
    assert scores["all"]["examples"] == len(labels) == len(predicted) == TEST_SIZES["AX"]
    assert scores["accuracy"] == pytest.approx(100 * sum(p == y for p, y in zip(predicted, labels)) / len(labels))


def test_a_default_given_explicitly_is_the_same_setting_not_a_change(env, tmp_path, capsys):
    """--lr at the size's default and --epochs at the task's default (10 for RTE, given as 10.0 by argparse) are
    the settings the run already used: it is kept, not refused."""
    from convbert.finetune.trainer import default_lr
    from convbert.interop.hf import read_config

    _, model, glue = env
    out = tmp_path / "o"
    base = ["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "rte", "--seeds", "1",
            "--output", str(out), "--batch-size", "8", "--max-seq-length", "32", "--no-progress",
            "--max-train-examples", "8"]
    assert main(base) == 0
    capsys.readouterr()
    lr = default_lr(read_config(model))
    assert main(base + ["--lr", str(lr), "--epochs", "10"]) == 0
    assert "resuming: 1 finished run(s) kept, 0 to do" in capsys.readouterr().err
    assert main(base + ["--lr", str(lr * 2)]) == 2
    assert f"lr: {lr!r} -> {lr * 2!r}" in capsys.readouterr().err


def test_submission_flags_without_predict_are_named_as_unused(env, tmp_path, capsys):
    _, model, glue = env
    assert _glue(model, glue, tmp_path / "o", "rte", "--wnli", "model", "--submission-seed", "1") == 0
    assert "note: --wnli model, --submission-seed only apply with --predict" in capsys.readouterr().err


def test_a_glue_folder_with_some_tasks_names_the_missing_and_the_found_ones(env, tmp_path, capsys):
    """Only SST-2 and RTE downloaded: the default --tasks all names every missing task and the --tasks that runs
    the ones there; with --predict and no WNLI folder the error says why WNLI is needed and how to do without it."""
    import shutil

    _, model, glue = env
    part = tmp_path / "glue"
    for name in ("SST-2", "RTE"):
        shutil.copytree(glue / name, part / name)
    base = ["glue", "--model", str(model), "--glue-dir", str(part), *QUICK]
    assert main(base + ["--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert (f"{part}: no train.tsv for tasks cola, mrpc, sts, qqp, mnli, qnli, wnli (found: sst, rte; pass --tasks "
            "sst,rte to run only those)") in err
    assert main(base + ["--tasks", "sst,rte", "--predict", "--output", str(tmp_path / "b")]) == 2
    assert "--predict needs every GLUE task" in capsys.readouterr().err
    assert main(base + ["--tasks", "all", "--predict", "--output", str(tmp_path / "c")]) == 2
    capsys.readouterr()
    shutil.copytree(glue, tmp_path / "nownli")
    shutil.rmtree(tmp_path / "nownli" / "WNLI")
    args = ["glue", "--model", str(model), "--glue-dir", str(tmp_path / "nownli"), "--tasks",
            "cola,sst,mrpc,sts,qqp,mnli,qnli,rte", "--predict", "--output", str(tmp_path / "d"), *QUICK]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("no WNLI train.tsv; the submission's WNLI.tsv is its training majority class (the BERT/ELECTRA rule): "
            "add the WNLI folder, pass --wnli model with wnli in --tasks, or --fill-missing") in err
    assert not (tmp_path / "d" / "runs").exists()  # refused before training


def test_a_test_file_cut_inside_its_last_row_or_of_a_non_standard_size_is_noted(env, tmp_path, capsys):
    """A cut inside the last row's last field leaves a well-formed row: nothing can refuse it, but the missing final
    newline (GLUE's files end with one) and a row count other than GLUE's are both named before training."""
    import shutil

    _, model, glue = env
    mine = shutil.copytree(glue, tmp_path / "glue")
    test = mine / "RTE" / "test.tsv"
    test.write_bytes(test.read_bytes()[:-3])
    assert _glue(model, mine, tmp_path / "o", "rte", "--predict", "--fill-missing") == 0
    err = capsys.readouterr().err
    assert f"note: {test}: the last line has no newline" in err
    assert f"note: {test}: {TEST_SIZES['RTE']:,} test rows, where GLUE's RTE test set has 3,000" in err
    test.write_bytes(test.read_bytes() + b"\n")
    assert _glue(model, mine, tmp_path / "o2", "rte", "--predict", "--fill-missing") == 0
    assert "the last line has no newline" not in capsys.readouterr().err
