"""`convbert glue`: every (task, seed) run, per-run JSON, the summary table, both averages and the submission.

Layout under OUTPUT:

* ``runs/<task>-seed<k>.json`` — one finished run (written last and atomically, so its presence means "done");
* ``runs/<task>-seed<k>/<File>.tsv`` — that run's test predictions in submission format (with ``--predict``);
* ``results.md`` / ``results.json`` — per task and metric: median, mean, sample std over seeds, and both averages;
* ``submission/*.tsv`` and ``submission.zip`` (with ``--predict``).

Re-running the same command skips finished runs. A run depends only on (model, data, settings, seed), so an
interrupted-and-resumed invocation gives the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convbert.errors import ConvBertError
from convbert.finetune import metrics as M
from convbert.finetune.features import featurize_examples
from convbert.finetune.references import choose_reference, compare
from convbert.finetune.submission import (
    build_submission,
    check_prediction_file,
    format_predictions,
    test_file_indexes,
    write_prediction_file,
)
from convbert.finetune.tasks import (
    GLUE_TASKS,
    STANDARD_TEST_SIZES,
    SUBMISSION_FILES,
    SUBMISSION_SOURCE,
    TASKS,
    canonical_task,
    find_split_file,
    read_split,
    require_examples,
    require_split_file,
)
from convbert.finetune.trainer import (
    FinetuneConfig,
    check_vocab_matches,
    default_lr,
    load_tokenizer,
    predict_logits,
    set_seed,
    train,
    train_steps_for,
)
from convbert.interop.hf import copy_tokenizer_files, read_config
from convbert.utils import (folder_kind_hint, progress_bar, read_json_object, remove_stale_temporaries,
                            sha256_file, write_json_atomic, write_text_atomic)

DISPLAY = {
    "cola": "CoLA", "sst": "SST-2", "mrpc": "MRPC", "sts": "STS-B", "qqp": "QQP", "mnli": "MNLI", "qnli": "QNLI",
    "rte": "RTE", "wnli": "WNLI", "ax": "AX",
}
METRIC_LABEL = {
    "mcc": "MCC", "accuracy": "accuracy", "f1": "F1", "spearman": "Spearman", "pearson": "Pearson",
    "accuracy_m": "accuracy (m)", "accuracy_mm": "accuracy (mm)", "r3": "R3",
}
PAPER_AVG_LABEL = (
    "Paper average (8 tasks, WNLI excluded; CoLA MCC, STS-B Spearman, MNLI-m accuracy, accuracy for the others)"
)
LEADERBOARD_AVG_LABEL = (
    "GLUE leaderboard-style average (9 tasks incl. WNLI; MRPC/QQP mean of accuracy and F1, STS-B mean of Pearson "
    "and Spearman, MNLI mean of m and mm; AX not averaged)"
)


@dataclass
class GlueOptions:
    model_dir: Path
    glue_dir: Path
    output: Path
    tasks: list[str]
    seeds: list[int]
    cfg: FinetuneConfig
    predict: bool = False
    fill_missing: bool = False
    wnli_majority: bool = True
    submission_seed: str = "best"
    save_models: bool = False
    overwrite: bool = False
    progress: bool = True
    reference: str = "auto"  # a published dev row to compare with (references.CHOICES)
    log: object = field(default=None)


def _log(opts: GlueOptions, msg: str) -> None:
    (opts.log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)


def _report(opts: GlueOptions, text: str) -> None:
    """Results go to stdout (the CLI's output), or to `opts.log` when a caller gives one."""
    (opts.log or print)(text)


def model_identity(model_dir: Path) -> dict:
    """Hashes of config.json, the weights and vocab.txt: a run is only reused for the same model."""
    ident = {}
    for name in ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt"):
        p = model_dir / name
        if p.is_file():
            ident[name] = sha256_file(p)
    return ident


def data_identity(glue_dir: Path, task: str) -> dict:
    """Hashes of the task's train, dev and test files: a run is only reused for the same data."""
    spec = TASKS[task]
    splits = ["train", *_dev_splits(glue_dir, task), *spec.test]
    found = {split: find_split_file(glue_dir, task, split) for split in dict.fromkeys(splits)}
    if task == "mnli":  # the MNLI model also predicts the AX diagnostic set
        found["AX"] = find_split_file(glue_dir, "ax", "AX")
    return {split: sha256_file(path) for split, path in found.items() if path is not None}


def run_fingerprint(opts: GlueOptions, task: str, ident: dict) -> dict:
    cfg = opts.cfg.to_dict()
    spec = TASKS[task]
    cfg["epochs"] = cfg["epochs"] if cfg["epochs"] is not None else spec.epochs
    cfg["double_unordered"] = bool(cfg["double_unordered"] and spec.double_unordered)
    return {"task": task, "model": ident, "settings": cfg, "data": data_identity(opts.glue_dir, task)}


def _fp_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _what_changed(record: dict, fp: dict, lr_default: float | None = None) -> list[str]:
    """What differs between a finished run's record and this invocation, as `key: old -> new` items. Values are
    compared as what the run uses: no --lr is the size's default lr, and 10 epochs equal 10.0."""
    changes = []
    old_settings, new_settings = record.get("settings"), dict(fp["settings"])
    if isinstance(old_settings, dict) and lr_default is not None:
        old_settings = dict(old_settings)
        for settings in (old_settings, new_settings):
            settings["lr"] = lr_default if settings.get("lr") is None else settings["lr"]
    if isinstance(old_settings, dict):
        changes += [f"{k}: {old_settings.get(k)!r} -> {new_settings.get(k)!r}"
                    for k in sorted(set(old_settings) | set(new_settings)) if old_settings.get(k) != new_settings.get(k)]
    if record.get("model") != _fp_hash(fp["model"]):
        changes.append("another model (its config, weights or vocab differ)")
    old_data = record.get("data")
    if isinstance(old_data, dict):
        changed = sorted(k for k in set(old_data) | set(fp["data"]) if old_data.get(k) != fp["data"].get(k))
        if changed:
            changes.append(f"other {DISPLAY[fp['task']]} data (the {', '.join(changed)} file(s) changed)")
    return changes


def run_paths(output: Path, task: str, seed: int) -> tuple[Path, Path]:
    return output / "runs" / f"{task}-seed{seed}.json", output / "runs" / f"{task}-seed{seed}"


def _check_model(opts: GlueOptions, tokenizer) -> None:
    """Load the encoder once before any output is written, so a bad model folder fails first, on one line."""
    from convbert.model.modeling import ConvBertModel

    encoder = ConvBertModel.from_pretrained(opts.model_dir)
    check_vocab_matches(encoder, tokenizer, opts.model_dir, opts.cfg.max_seq_length)


def _check_eval_splits(opts: GlueOptions, task: str) -> None:
    """Read the dev (and, with --predict, test) files before training: a bad file fails before any work."""
    splits = _dev_splits(opts.glue_dir, task)
    for split in splits:
        require_examples(read_split(opts.glue_dir, task, split), split)
    for missing in (name for name in TASKS[task].dev if splits and name not in splits):
        _log(opts, f"note: {DISPLAY[task]}: no {missing} file in {opts.glue_dir}; scored on "
                   f"{', '.join(splits)} only (averages that need it will list {DISPLAY[task]} as missing)")
    if opts.predict:
        tests = dict(TASKS[task].test)
        if task == "mnli":
            tests["AX"] = TASKS["ax"].test["AX"]
        for name in tests:
            t_task = "ax" if name == "AX" else task
            path = find_split_file(opts.glue_dir, t_task, name)
            if path is None:
                continue
            data = read_split(None, t_task, name, path=path)
            if not data.examples:
                raise ConvBertError(f"{path}: no test rows; a GLUE submission needs every test example")
            # Notes, not errors (a hand-made test file is fine to predict): what the GLUE server would refuse.
            if data.unterminated:
                _log(opts, f"note: {path}: the last line has no newline; GLUE's files end with one, so if this file "
                           "was cut short its last row is incomplete (re-download to be sure)")
            standard = STANDARD_TEST_SIZES.get(name)
            if standard is not None and len(data.examples) != standard:
                _log(opts, f"note: {path}: {len(data.examples):,} test rows, where GLUE's {name} test set has "
                           f"{standard:,}; the GLUE server scores complete files only")


def _train_examples(glue_dir: Path, task: str, cfg: FinetuneConfig):
    data = require_examples(read_split(glue_dir, task, "train"), "train")
    ex = data.examples
    if cfg.max_train_examples is not None:
        ex = ex[: cfg.max_train_examples]
    if cfg.double_unordered and TASKS[task].double_unordered:
        from convbert.finetune.tasks import Example

        ex = ex + [Example(e.eid, e.text_b, e.text_a, e.label) for e in ex]
    return data, ex


def _dev_splits(glue_dir: Path, task: str) -> list[str]:
    spec = TASKS[task]
    out = []
    for name in spec.dev:
        if find_split_file(glue_dir, task, name) is not None:
            out.append(name)
    return out


def _eval_metrics(task: str, dev_outputs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    spec = TASKS[task]
    res: dict[str, float] = {}
    for split, (out, y) in dev_outputs.items():
        if spec.is_regression:
            res.update(M.regression_metrics(out.reshape(-1), y))
        else:
            m = M.classification_metrics(task, out.argmax(axis=-1), y)
            if task == "mnli":
                res["accuracy_m" if split == "dev_matched" else "accuracy_mm"] = m["accuracy"]
            else:
                res.update(m)
    return res


def check_inputs(opts: GlueOptions) -> None:
    if opts.output.exists() and not opts.output.is_dir():
        raise ConvBertError(f"--output {opts.output}: exists and is not a folder")
    if opts.predict and opts.submission_seed != "best":
        try:
            seed = int(opts.submission_seed)
        except ValueError:
            raise ConvBertError(
                f"--submission-seed must be 'best' or a seed number, got {opts.submission_seed!r}"
            ) from None
        if seed not in opts.seeds:
            raise ConvBertError(f"--submission-seed {seed}: not one of --seeds ({', '.join(map(str, opts.seeds))})")
    md = opts.model_dir
    if not (md / "config.json").is_file():
        hint = folder_kind_hint(md) or " (expected an HF-layout ConvBERT folder with vocab.txt)"
        raise ConvBertError(f"{md}: no config.json{hint}")
    if not (md / "vocab.txt").is_file():
        hint = folder_kind_hint(md) or " (a model folder is HF layout plus its vocab.txt)"
        raise ConvBertError(f"{md}: no vocab.txt{hint}")
    mp = read_json_object(md / "config.json").get("max_position_embeddings")
    if isinstance(mp, int) and opts.cfg.max_seq_length > mp:
        raise ConvBertError(
            f"--max-seq-length {opts.cfg.max_seq_length} exceeds the model's max_position_embeddings {mp} "
            f"({md}/config.json)"
        )
    if not opts.glue_dir.is_dir():
        raise ConvBertError(f"{opts.glue_dir}: GLUE folder not found (run `convbert glue-download --output DIR`)")
    absent = [t for t in opts.tasks if t != "ax" and find_split_file(opts.glue_dir, t, "train") is None]
    if absent:
        present = [t for t in GLUE_TASKS if find_split_file(opts.glue_dir, t, "train") is not None]
        where = (f"found: {', '.join(present)}; pass --tasks {','.join(present)} to run only those" if present else
                 "no GLUE task folder found there; run `convbert glue-download` or point --glue-dir at the folder "
                 "holding the task folders (CoLA/, SST-2/, … or cola/, sst/, …)")
        which = f"task {absent[0]}" if len(absent) == 1 else f"tasks {', '.join(absent)}"
        raise ConvBertError(f"{opts.glue_dir}: no train.tsv for {which} ({where})")
    for t in opts.tasks:
        if t == "ax":
            continue
        require_split_file(opts.glue_dir, t, "train")
        if not _dev_splits(opts.glue_dir, t):
            require_split_file(opts.glue_dir, t, next(iter(TASKS[t].dev)))
        if opts.predict:
            for name in TASKS[t].test:
                if find_split_file(opts.glue_dir, t, name) is None and not opts.fill_missing:
                    require_split_file(opts.glue_dir, t, name)
    if opts.predict and "mnli" in opts.tasks and find_split_file(opts.glue_dir, "ax", "AX") is None:
        if not opts.fill_missing:
            raise ConvBertError(
                f"{opts.glue_dir}: no diagnostic.tsv (AX) in diagnostic/ or mnli/; it is needed for AX.tsv "
                "(or pass --fill-missing)"
            )


def _intact_predictions(path: Path, name: str, glue_dir: Path) -> bool:
    """A finished run's test predictions are there and pass the submission checks; a damaged file makes the run
    be redone (it gives the same predictions), as a damaged run record does."""
    if not path.is_file():
        return False
    try:
        check_prediction_file(path, name, test_file_indexes(glue_dir, name))
    except ConvBertError:
        return False
    return True


def _finished(json_path: Path, task: str, seed: int) -> dict | None:
    """The record of a finished run, or None when there is none or it is damaged (the run is then redone)."""
    if not json_path.is_file():
        return None
    try:
        rec = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, OSError):  # torn JSON, not UTF-8
        return None
    if not (isinstance(rec, dict) and rec.get("task") == task and rec.get("seed") == seed
            and isinstance(rec.get("fingerprint"), str) and isinstance(rec.get("metrics"), dict)
            and isinstance(rec.get("predictions", {}), dict)):
        return None
    return rec


def run_one(opts: GlueOptions, task: str, seed: int, data_cache: dict, tokenizer, fp: dict, bar) -> dict:
    from convbert.model.heads import ConvBertForSequenceClassification

    spec = TASKS[task]
    cfg = opts.cfg
    json_path, run_dir = run_paths(opts.output, task, seed)
    if task not in data_cache:
        data_cache.clear()  # keep one task's features in memory at a time
        raw, train_ex = _train_examples(opts.glue_dir, task, cfg)
        labels = spec.labels
        entry = {
            "skipped_train": raw.skipped,
            "train": featurize_examples(train_ex, tokenizer, cfg.max_seq_length, labels, cfg.regression_scale),
            "dev": {},
            "test": {},
        }
        for split in _dev_splits(opts.glue_dir, task):
            d = read_split(opts.glue_dir, task, split)
            entry["dev"][split] = (d, featurize_examples(d.examples, tokenizer, cfg.max_seq_length, labels,
                                                         cfg.regression_scale))
        if opts.predict:
            tests = dict(spec.test)
            if task == "mnli":
                tests["AX"] = TASKS["ax"].test["AX"]
            for name in tests:
                t_task = "ax" if name == "AX" else task
                path = find_split_file(opts.glue_dir, t_task, name)
                if path is None:
                    continue
                d = read_split(None, t_task, name, path=path)
                entry["test"][name] = (d, featurize_examples(d.examples, tokenizer, cfg.max_seq_length, labels))
        data_cache[task] = entry
        notes = [(raw, "train")] + [(d, split) for split, (d, _) in entry["dev"].items()]
        for d, split in notes:
            if d.skipped:
                msg = (f"{DISPLAY[task]} {split}: skipped {d.skipped} malformed row(s) in {d.path} (lines "
                       f"{', '.join(map(str, d.skipped_lines))}{', ...' if d.skipped > len(d.skipped_lines) else ''})")
                bar.write(msg, file=sys.stderr) if bar is not None else _log(opts, msg)
    entry = data_cache[task]
    feats = entry["train"]
    epochs = cfg.epochs if cfg.epochs is not None else spec.epochs

    set_seed(seed)
    model = ConvBertForSequenceClassification.from_encoder(opts.model_dir, spec.num_labels)
    check_vocab_matches(model, tokenizer, opts.model_dir, cfg.max_seq_length)
    peak_lr = cfg.lr if cfg.lr is not None else default_lr(model.config)
    t0 = time.time()
    if bar is not None:
        bar.set_description(f"{DISPLAY[task]} seed {seed}")
        bar.set_postfix(loss="…", refresh=False)  # not the previous run's last loss

    def on_step(step, loss):
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == 1:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    stats = train(model, feats, cfg, spec.is_regression, epochs, seed, peak_lr, on_step=on_step)

    def predict(f, what):
        if bar is None:
            return predict_logits(model, f, cfg.eval_batch_size, cfg.pad_to_max, precision=cfg.precision)
        with progress_bar(total=len(f), unit="ex", leave=False,
                          desc=f"{DISPLAY[task]} seed {seed}: predicting {what}") as pbar:
            return predict_logits(model, f, cfg.eval_batch_size, cfg.pad_to_max, on_batch=pbar.update,
                                  precision=cfg.precision)

    dev_outputs = {}
    dev_sizes = {}
    for split, (d, f) in entry["dev"].items():
        out = predict(f, split)
        y = np.array([e.label for e in d.examples], dtype=np.float64) if spec.is_regression else f.labels
        dev_outputs[split] = (out, y)
        dev_sizes[split] = {"examples": len(d.examples), "skipped_rows": d.skipped}
    scores = _eval_metrics(task, dev_outputs)
    if spec.is_regression:
        # Metrics on the original 0-5 scale: predictions ×5 (correlations are scale-free; MSE is not).
        d_out, y = next(iter(dev_outputs.values()))
        scores["mse"] = float(np.mean((d_out.reshape(-1) * cfg.regression_scale - y) ** 2))
    predictions = {}
    if opts.predict:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, (d, f) in entry["test"].items():
            out = predict(f, f"{name} test")
            vals = format_predictions("ax" if name == "AX" else task, out, cfg.regression_scale)
            p = run_dir / f"{name}.tsv"
            write_prediction_file(p, [e.index for e in d.examples], vals)
            predictions[name] = str(p.relative_to(opts.output))
    if opts.save_models:  # a folder `convbert glue --model` and `from_pretrained` read as it is
        model.save_pretrained(run_dir / "model")
        copy_tokenizer_files(opts.model_dir, run_dir / "model")
    record = {
        "task": task,
        "seed": seed,
        "fingerprint": _fp_hash(fp),
        "model": _fp_hash(fp["model"]),
        "settings": fp["settings"],
        "data": fp["data"],  # per split file: its sha256 (to say what changed when a re-run is refused)
        "metrics": scores,
        "paper_metric": M.PAPER_METRIC.get(task),
        "train": {
            "examples": stats.n_train,
            "skipped_rows": entry["skipped_train"],
            "steps": stats.steps,
            "warmup_steps": stats.warmup_steps,
            "epochs": epochs,
            "peak_lr": peak_lr,
            "final_loss": stats.final_loss,
            "loss_history": stats.loss_history,
            "seconds": round(stats.seconds, 2),
        },
        "dev": dev_sizes,
        "predictions": predictions,
        "seconds": round(time.time() - t0, 2),
    }
    record = finite_json(record)  # a metric of degenerate predictions (Pearson of a constant) is NaN: null
    write_json_atomic(json_path, record)
    return record


def summarize(records: list[dict]) -> dict:
    """Per task and metric: median, mean and std over seeds, and both GLUE averages."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    table = {}
    for task in [t for t in GLUE_TASKS if t in by_task]:
        rs = sorted(by_task[task], key=lambda r: r["seed"])
        names = list(M.TASK_METRICS[task])
        if task == "cola":
            names.append("accuracy")
        row = {}
        for name in names:
            vals = [r["metrics"][name] for r in rs if name in r["metrics"]]
            if not vals:
                continue
            arr = np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64)
            defined = arr[np.isfinite(arr)]  # a run whose metric is undefined (null) is counted, not averaged
            row[name] = {
                "median": float(np.median(defined)) if len(defined) else None,
                "mean": float(defined.mean()) if len(defined) else None,
                "std": float(defined.std(ddof=1)) if len(defined) > 1 else (0.0 if len(defined) else None),
                "n": len(defined),
                "undefined": len(arr) - len(defined),
                "values": [float(v) if math.isfinite(v) else None for v in arr],
            }
        table[task] = {"seeds": [r["seed"] for r in rs], "metrics": row}
    medians = {t: {m: v["median"] for m, v in d["metrics"].items()} for t, d in table.items()}
    means = {t: {m: v["mean"] for m, v in d["metrics"].items()} for t, d in table.items()}
    return {
        "tasks": table,
        "paper_average": {"of_medians": M.paper_average(medians), "of_means": M.paper_average(means),
                          "missing": M.paper_missing(medians), "label": PAPER_AVG_LABEL},
        "leaderboard_average": {"of_medians": M.leaderboard_average(medians),
                                "of_means": M.leaderboard_average(means),
                                "missing": M.missing_for(medians, M.LEADERBOARD_TASKS),
                                "label": LEADERBOARD_AVG_LABEL},
    }


def finite_json(obj):
    """`obj` with every NaN or infinite float replaced by None, so the file is strict JSON (null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def render_reference(comparison: dict) -> list[str]:
    """The results.md section that reads each task's median against a published dev row."""
    lines = ["", f"## Against a published reference: {comparison['label']}", "",
             f"Source: {comparison['source']}. Paper metric of each task; gap = our median − reference; in stds: the "
             "gap over our seeds' sample std (a gap of a few stds is more than seed noise; with one seed there is "
             "no spread to judge by). A reference trained longer or with another recipe is expected to differ.", "",
             "| Task | Metric | Ours (median) | Reference | Gap | Gap in stds |", "| --- | --- | --- | --- | --- | --- |"]
    for task, r in comparison["tasks"].items():
        in_std = "n/a" if r["gap_in_std"] is None else f"{r['gap_in_std']:+.1f}"
        lines.append(f"| {DISPLAY[task]} | {METRIC_LABEL[M.PAPER_METRIC[task]]} | {_fmt(r['ours'])} | "
                     f"{_fmt(r['reference'])} | {r['gap']:+.2f} | {in_std} |")
    avg = comparison["paper_average"]
    ours = "n/a (not every paper task was run)" if avg["ours"] is None else f"{_fmt(avg['ours'])} ({avg['gap']:+.2f})"
    lines += ["", f"- Paper average: ours {ours}, reference {_fmt(avg['reference'])}"]
    return lines


def render_markdown(summary: dict, header: str = "") -> str:
    """`summarize`'s output as the `results.md` table."""
    lines = ["# GLUE dev results", ""]
    if header:
        lines += [header, ""]
    lines += ["Scores ×100. Std is the sample standard deviation over seeds (0 with one seed).", ""]
    lines += ["| Task | Metric | Median | Mean | Std | Seeds |", "| --- | --- | --- | --- | --- | --- |"]
    for task, d in summary["tasks"].items():
        for m, v in d["metrics"].items():
            lines.append(
                f"| {DISPLAY[task]} | {METRIC_LABEL.get(m, m)} | {_fmt(v['median'])} | {_fmt(v['mean'])} | "
                f"{_fmt(v['std'])} | {v['n']}{f' (+{u} n/a)' if (u := v.get('undefined', 0)) else ''} |"
            )
    lines.append("")
    for key in ("paper_average", "leaderboard_average"):
        a = summary[key]
        if a["of_medians"] is None:
            lines.append(f"- {a['label']}: n/a (missing: {', '.join(DISPLAY[t] for t in a['missing'])})")
        else:
            lines.append(f"- {a['label']}: {_fmt(a['of_medians'])} (of medians), {_fmt(a['of_means'])} (of means)")
    if summary.get("reference"):
        lines += render_reference(summary["reference"])
    return "\n".join(lines) + "\n"


def run_glue(opts: GlueOptions) -> dict:
    """Fine-tune and evaluate every (task, seed) not finished in `opts.output`, write `results.md`/`.json` (and with
    `predict` the submission), and return the summary. Notes and results go to `opts.log` if given, else to
    stderr and stdout."""
    cfg = opts.cfg
    cfg.validate()
    if not opts.seeds:
        raise ConvBertError("--seeds must be at least 1")
    if len(set(opts.seeds)) != len(opts.seeds):  # (one run would count twice in the median, mean and std)
        raise ConvBertError(f"--seeds lists a seed twice: {list(opts.seeds)}")
    # What the CLI hands over, also from Python: paths as Path, task names as canonical ones ('SST-2' -> 'sst')
    opts.model_dir, opts.glue_dir, opts.output = Path(opts.model_dir), Path(opts.glue_dir), Path(opts.output)
    named = {canonical_task(str(t)) for t in opts.tasks}
    tasks = [t for t in (*GLUE_TASKS, "ax") if t in named]
    if "ax" in tasks and "mnli" not in tasks:
        _log(opts, "AX has no training data: it is predicted by the MNLI model, so mnli is run too")
        tasks.insert(tasks.index("ax"), "mnli")
    opts.tasks = tasks
    check_inputs(opts)
    train_tasks = [t for t in tasks if t != "ax"]
    tokenizer = load_tokenizer(opts.model_dir)
    _check_model(opts, tokenizer)
    ident = model_identity(opts.model_dir)
    lr_default = default_lr(read_config(opts.model_dir))
    opts.output.mkdir(parents=True, exist_ok=True)
    runs = opts.output / "runs"  # temporaries an interrupted earlier invocation left (records, predictions)
    remove_stale_temporaries(opts.output, runs, opts.output / "submission",
                             *(d for d in (runs.iterdir() if runs.is_dir() else ()) if d.is_dir()))

    # Plan: which (task, seed) runs are finished, which are pending.
    pending, done = [], []
    fps = {t: run_fingerprint(opts, t, ident) for t in train_tasks}
    for t in train_tasks:
        for s in opts.seeds:
            json_path, run_dir = run_paths(opts.output, t, s)
            rec = _finished(json_path, t, s)
            if rec is not None and not opts.overwrite:
                if rec.get("fingerprint") != _fp_hash(fps[t]):
                    # (the same settings spelled otherwise, e.g. the default --lr given, hash apart: not a change)
                    changes = _what_changed(rec, fps[t], lr_default)
                    if changes or not isinstance(rec.get("settings"), dict) or not isinstance(rec.get("data"), dict):
                        what = "; ".join(changes) or "different settings, data or another model"
                        raise ConvBertError(f"{json_path}: finished with {what}; use a new --output or --overwrite "
                                            "to redo it")
                need = set()
                if opts.predict:  # the test files that exist (with --fill-missing some may not)
                    need = {n for n in TASKS[t].test if find_split_file(opts.glue_dir, t, n) is not None}
                    if t == "mnli" and find_split_file(opts.glue_dir, "ax", "AX") is not None:
                        need.add("AX")
                have = {n for n, f in rec.get("predictions", {}).items()
                        if isinstance(f, str) and _intact_predictions(opts.output / f, n, opts.glue_dir)}
                no_model = opts.save_models and not (run_dir / "model" / "config.json").is_file()
                if need - have or no_model:
                    pending.append((t, s))  # finished without test predictions or the model asked for: redo (same
                    # result, plus what is missing)
                else:
                    done.append(rec)
                continue
            pending.append((t, s))
    if done:
        _log(opts, f"resuming: {len(done)} finished run(s) kept, {len(pending)} to do")
    if opts.predict:
        _check_submission_coverage(opts, train_tasks)

    # Total optimisation steps of the pending runs, for one progress bar with an ETA.
    total_steps = 0
    for t in dict.fromkeys(t for t, _ in pending):
        _, ex = _train_examples(opts.glue_dir, t, cfg)
        _check_eval_splits(opts, t)
        epochs = cfg.epochs if cfg.epochs is not None else TASKS[t].epochs
        total_steps += train_steps_for(len(ex), cfg.batch_size, epochs) * sum(1 for tt, _ in pending if tt == t)
    bar = None
    if pending and opts.progress:
        bar = progress_bar(total=total_steps, unit="step", smoothing=0.05)
    records = list(done)
    cache: dict = {}
    try:
        for k, (t, s) in enumerate(pending):
            if bar is None:
                _log(opts, f"[{k + 1}/{len(pending)}] {DISPLAY[t]} seed {s}")
            rec = run_one(opts, t, s, cache, tokenizer, fps[t], bar)
            records.append(rec)
            msg = f"{DISPLAY[t]} seed {s}: " + ", ".join(
                f"{METRIC_LABEL.get(m, m)} {_fmt(v)}" for m, v in rec["metrics"].items() if m != "mse"
            )
            (bar.write(msg, file=sys.stderr) if bar is not None else _log(opts, msg))
    finally:
        if bar is not None:
            bar.close()

    # Summary over every finished run in OUTPUT for the requested seeds (tasks may be run in separate invocations).
    all_records, other_model = [], []
    for t in GLUE_TASKS:
        for s in opts.seeds:
            json_path = run_paths(opts.output, t, s)[0]
            rec = _finished(json_path, t, s)
            if rec is None:
                continue
            if rec.get("model") != _fp_hash(ident):
                other_model.append(json_path.name)
                continue
            all_records.append(rec)
    if other_model:
        _log(opts, f"note: left out of the summary, made with another model: {', '.join(other_model)}")
    summary = summarize(all_records)
    reference = choose_reference(opts.reference, read_config(opts.model_dir))
    if reference is not None and summary["tasks"]:
        summary["reference"] = compare(summary, reference)
    header = f"Model: `{opts.model_dir}`; seeds: {', '.join(map(str, opts.seeds))}."
    md = render_markdown(summary, header)
    write_text_atomic(opts.output / "results.md", md)
    summary = finite_json(summary)
    write_json_atomic(opts.output / "results.json", summary)
    _report(opts, md.rstrip("\n"))

    if opts.predict:
        sources: dict[str, Path | None] = {}
        for name in SUBMISSION_FILES:
            task = SUBMISSION_SOURCE[name]
            cands = [r for r in all_records if r["task"] == task and name in r.get("predictions", {})]
            chosen = choose_run(cands, opts.submission_seed, task)
            sources[name] = (opts.output / chosen["predictions"][name]) if chosen else None
        zpath = build_submission(opts.output, sources, opts.glue_dir, opts.fill_missing, opts.wnli_majority,
                                 log=lambda m: _log(opts, m))
        _report(opts, f"submission: {opts.output / 'submission'}/ and {zpath}")
        summary["submission"] = str(zpath)
    return summary


def _check_submission_coverage(opts: GlueOptions, train_tasks: list[str]) -> None:
    """Before any training: every submission file must come from a run (this one or a finished one in OUTPUT),
    from the WNLI majority rule, or from --fill-missing."""
    if opts.fill_missing:
        return
    covered = set(train_tasks)
    for t in GLUE_TASKS:
        for s in opts.seeds:
            rec = _finished(run_paths(opts.output, t, s)[0], t, s)
            if rec is not None and rec.get("predictions"):
                covered.add(t)
    missing = [
        n for n in SUBMISSION_FILES
        if SUBMISSION_SOURCE[n] not in covered and not (n == "WNLI" and opts.wnli_majority)
    ]
    if missing:
        raise ConvBertError(
            "--predict needs every GLUE task for a submission; not run: " + ", ".join(missing)
            + " (add them to --tasks, AX comes from mnli; or pass --fill-missing to fill them with a constant)"
        )
    if opts.wnli_majority:
        for split, why in (("train", "its training majority class"), ("test", "one row per test example")):
            if find_split_file(opts.glue_dir, "wnli", split) is None:
                raise ConvBertError(
                    f"{opts.glue_dir}: no WNLI {split}.tsv; the submission's WNLI.tsv is {why} (the BERT/ELECTRA "
                    "rule): add the WNLI folder, pass --wnli model with wnli in --tasks, or --fill-missing")


def choose_run(cands: list[dict], how: str, task: str) -> dict | None:
    """The run whose predictions are submitted: 'best' dev paper metric (ties: lowest seed) or a given seed."""
    if not cands:
        return None
    if how == "best":
        key = M.PAPER_METRIC[task]
        def score(r: dict) -> float:  # an undefined metric (null) ranks last
            v = r["metrics"].get(key)
            return v if isinstance(v, (int, float)) and math.isfinite(v) else float("-inf")

        return sorted(cands, key=lambda r: (-score(r), r["seed"]))[0]
    try:
        seed = int(how)
    except ValueError:
        raise ConvBertError(f"--submission-seed must be 'best' or a seed number, got {how!r}")
    for r in cands:
        if r["seed"] == seed:
            return r
    raise ConvBertError(f"--submission-seed {seed}: no finished {task} run with that seed")
