"""Own tasks: `convbert finetune` on CSV/TSV/JSONL and `convbert predict` with the result.

Input files have a header row (CSV, TSV) or one JSON object per line (JSONL). CSV uses standard quoting; TSV is
read with quoting disabled, like GLUE. Classification labels are the distinct training-set label strings, sorted;
regression labels must be numbers. The output folder holds the model (HF-layout encoder + head), its vocab.txt and
`finetune_task.json` (columns, labels, sequence length), which `convbert predict` reads.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from convbert.errors import ConvBertError
from convbert.finetune import metrics as M
from convbert.finetune.features import featurize
from convbert.finetune.trainer import (
    FinetuneConfig,
    check_vocab_matches,
    default_lr,
    load_tokenizer,
    predict_logits,
    set_seed,
    softmax,
    train,
    train_steps_for,
)
from convbert.interop.hf import copy_tokenizer_files
from convbert.utils import (atomic_path, check_output_location, decode_utf8, refuse_foreign_folder,
                            replace_lone_surrogates, staged_folder, write_json_atomic)

TASK_FILE = "finetune_task.json"
# What a fine-tuned model folder holds (it is rewritten whole).
FINETUNE_FILES = ("config.json", "model.safetensors", "classifier.safetensors", "head.json", "vocab.txt",
                  "tokenizer_config.json", TASK_FILE)
csv.field_size_limit(1 << 30)


def detect_format(path: Path, fmt: str | None, hint: str = "use .csv, .tsv, .jsonl or --format") -> str:
    if fmt:
        return fmt
    suf = path.suffix.lower()
    if suf == ".csv":
        return "csv"
    if suf in (".tsv", ".tab"):
        return "tsv"
    if suf in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise ConvBertError(f"{path}: cannot tell the format from the extension ({hint})")


def read_table(path: Path, fmt: str | None = None) -> tuple[list[str], list[tuple[int, dict]]]:
    """(column names, [(line number, row dict)]) of a CSV/TSV with a header or a JSONL file."""
    fmt = detect_format(path, fmt)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConvBertError(f"{path}: file not found")
    except OSError as err:
        raise ConvBertError(f"{path}: cannot read ({err.strerror or err})")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConvBertError(f"{path}: a UTF-16 file (Excel's \"Unicode text\" saves these); save it as UTF-8")
    text = decode_utf8(raw, path, "not valid UTF-8 (byte {byte} of the file)", encoding="utf-8-sig")
    rows: list[tuple[int, dict]] = []
    if fmt == "jsonl":
        cols: list[str] = []
        for ln, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            if not rows and line.lstrip().startswith("["):
                raise ConvBertError(f"{path}:{ln}: a JSON array; expected JSON Lines, one object per line "
                                    "(e.g. `jq -c '.[]' file.json > file.jsonl`)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConvBertError(f"{path}:{ln}: not valid JSON ({err.msg})")
            if not isinstance(obj, dict):
                raise ConvBertError(f"{path}:{ln}: expected a JSON object per line")
            for k in obj:
                if k not in cols:
                    cols.append(k)
            rows.append((ln, obj))
        return cols, rows
    if fmt == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = next(reader, None)
        while header == []:  # blank lines before the header
            header = next(reader, None)
        if header is None:
            raise ConvBertError(f"{path}: empty file (expected a header row)")
        header_line = reader.line_num
        header = [h.strip() for h in header]
        # Unnamed columns (a spreadsheet's trailing empty ones) may repeat; they cannot be asked for by name.
        repeated = sorted({h for h in header if h and header.count(h) > 1})
        if repeated:
            raise ConvBertError(f"{path}:{header_line}: column name(s) {', '.join(map(repr, repeated))} appear more "
                                "than once in the header")
        start = reader.line_num + 1  # where the next record starts
        for row in reader:
            if row and len(row) != len(header):
                where = f"{start}" if reader.line_num == start else f"{start}-{reader.line_num}"
                first = text.split("\n", start)[start - 1] if reader.line_num > start else ""
                hint = "; a quote opened on its first line is never closed" if first.count('"') % 2 else ""
                raise ConvBertError(f"{path}:{where}: expected {len(header)} fields like the header, found "
                                    f"{len(row)}{hint}")
            if row:
                rows.append((start, {h: v for h, v in zip(header, row) if h}))
            start = reader.line_num + 1
    except csv.Error as err:
        raise ConvBertError(f"{path}:{reader.line_num}: cannot parse ({err})")
    return [h for h in header if h], rows


def _column_values(path: Path, cols: list[str], rows, name: str, what: str, allow_missing=False) -> list | None:
    if name not in cols:
        if allow_missing:
            return None
        raise ConvBertError(f"{path}: no {what} column {name!r} (columns: {', '.join(cols) or 'none'})")
    out = []
    for ln, row in rows:
        if name not in row:
            raise ConvBertError(f"{path}:{ln}: field {name!r} is missing")
        if row[name] is None:
            raise ConvBertError(f"{path}:{ln}: field {name!r} is null: expected a {what} (a string or number)")
        v = row[name]
        if what == "text" and isinstance(v, (list, dict)):
            raise ConvBertError(f"{path}:{ln}: field {name!r} is a JSON {'list' if isinstance(v, list) else 'object'}: "
                                "expected a text (a string or number)")
        if isinstance(v, str):
            out.append(replace_lone_surrogates(v)[0])  # (JSON's lone \ud800 escapes: the tokenizer cannot take them)
        else:
            out.append(json.dumps(v) if isinstance(v, (list, dict)) else _scalar(v))
    return out


def _cell(v) -> str:
    """A kept input value as CSV/TSV text (null: empty; JSON's lone surrogates as U+FFFD)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return replace_lone_surrogates(v)[0]
    return replace_lone_surrogates(json.dumps(v))[0] if isinstance(v, (list, dict)) else _scalar(v)


def _json_safe(v):
    """A kept JSON value for JSONL output: lone surrogates replaced, non-finite numbers (1e400) as strings."""
    if isinstance(v, str):
        return replace_lone_surrogates(v)[0]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _labels(path: Path, rows, raw: list[str], name: str, regression: bool, label_list=None):
    if regression:
        out = []
        for (ln, _), v in zip(rows, raw):
            try:
                f = float(v)
            except ValueError:
                raise ConvBertError(f"{path}:{ln}: field {name!r}: {v!r} is not a number (--regression)")
            if not math.isfinite(f):
                raise ConvBertError(f"{path}:{ln}: field {name!r}: {v!r} is not a finite number")
            out.append(f)
        return out
    for (ln, row), v in zip(rows, raw):
        if isinstance(row.get(name), (list, dict)):
            raise ConvBertError(f"{path}:{ln}: field {name!r}: {v} is a JSON {type(row[name]).__name__}; expected a "
                                "label (a string, number or true/false)")
    vals = [v.strip() for v in raw]
    for (ln, _), v in zip(rows, vals):
        if not v:
            raise ConvBertError(f"{path}:{ln}: field {name!r} is empty: expected a label")
    if label_list is not None:
        known = set(label_list)
        for (ln, _), v in zip(rows, vals):
            if v not in known:
                twin = [k for k in label_list if _same_number(k, v)]
                hint = f"; it is the same number as the training label {twin[0]!r}: write the labels alike" if twin else ""
                raise ConvBertError(
                    f"{path}:{ln}: field {name!r}: label {v!r} does not occur in the training file "
                    f"(labels: {', '.join(label_list)}){hint}"
                )
    else:
        _refuse_numeric_twins(path, rows, vals, name)
    return vals


def _number(text: str) -> Decimal | None:
    """The exact decimal value of a label that is a finite number (not a float: 2**53 and 2**53 + 1 differ)."""
    try:
        d = Decimal(text)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _same_number(a: str, b: str) -> bool:
    x, y = _number(a), _number(b)
    return a != b and x is not None and x == y


def _refuse_numeric_twins(path: Path, rows, vals: list[str], name: str) -> None:
    """Labels are strings, so `1` and `1.0` (a column written by two tools) would be two classes: refused, naming
    the first line of each spelling."""
    first: dict[Decimal, tuple[str, int]] = {}
    for (ln, _), v in zip(rows, vals):
        x = _number(v)
        if x is None:
            continue
        seen = first.setdefault(x, (v, ln))
        if seen[0] != v:
            raise ConvBertError(
                f"{path}:{ln}: field {name!r}: label {v!r} is the same number as label {seen[0]!r} (line {seen[1]}) "
                "but spelt differently, so the two would be separate classes; write the labels alike (or use "
                "--regression for scores)")


def _texts(path, cols, rows, text_columns):
    a = _column_values(path, cols, rows, text_columns[0], "text")
    b = _column_values(path, cols, rows, text_columns[1], "text") if len(text_columns) > 1 else None
    return a, b


def finetune_own_task(
    model_dir: Path,
    train_file: Path,
    dev_file: Path | None,
    text_columns: list[str],
    label_column: str,
    regression: bool,
    output: Path,
    cfg: FinetuneConfig,
    seed: int = 1,
    file_format: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    output_note: str | None = None,
    symmetric: bool = False,
) -> dict:
    """Fine-tune `model_dir` on a CSV/TSV/JSONL file and write the model, its vocab and `finetune_task.json` to
    `output`. An earlier output of the same --model and --train there is replaced; one of another model or training
    file only with `overwrite`. `output_note` (why the default output moved) is printed once the inputs have been
    read and checked, so that a run that fails on its input does not announce a write. `symmetric=True` (a pair
    task whose two texts may be swapped, `--symmetric`) doubles the training set with them swapped, unless
    `cfg.double_unordered` is False; a pair task is not doubled otherwise."""
    from convbert.model.heads import ConvBertForSequenceClassification

    model_dir, train_file, output = Path(model_dir), Path(train_file), Path(output)
    dev_file = Path(dev_file) if dev_file is not None else None
    cfg.validate()
    # own scores are used as they are (GLUE's STS-B: / 5); the doubling recorded is the one applied
    cfg = dataclasses.replace(cfg, regression_scale=1.0, double_unordered=bool(symmetric and cfg.double_unordered))
    if output.exists() and not output.is_dir():
        raise ConvBertError(f"--output {output}: exists and is not a folder")
    if output.is_dir() and output.resolve() == Path(model_dir).resolve():
        raise ConvBertError(f"--output {output}: is the --model folder; write the fine-tuned model to a new folder")
    refuse_foreign_folder(output, (TASK_FILE,), "an earlier `convbert finetune` output", replaces=FINETUNE_FILES)
    check_output_location(output)  # (before training, not when the model is written)
    _refuse_replacing_another_task(output, model_dir, train_file, overwrite)
    tokenizer = load_tokenizer(model_dir)
    cols, rows = read_table(train_file, file_format)
    if not rows:
        raise ConvBertError(f"{train_file}: no data rows")
    # The label set is the whole file's, also when --max-train-examples trains on its first rows only.
    y = _labels(train_file, rows, _column_values(train_file, cols, rows, label_column, "label"), label_column,
                regression)
    label_list = None if regression else sorted(set(y))
    if cfg.max_train_examples is not None:
        rows, y = rows[: cfg.max_train_examples], y[: cfg.max_train_examples]
    a, b = _texts(train_file, cols, rows, text_columns)
    if label_list is not None and len(label_list) < 2:
        raise ConvBertError(f"{train_file}: column {label_column!r} has a single label {label_list[0]!r}; "
                            "classification needs at least two (or pass --regression)")
    if symmetric and b is None:
        raise ConvBertError(f"symmetric: swaps the two texts of a pair, but text_columns names one ({text_columns!r})")
    if cfg.double_unordered and b is not None:
        a, b, y = a + b, b + a, y + y
    feats = featurize(a, b, y, tokenizer, cfg.max_seq_length, label_list, regression_scale=cfg.regression_scale)
    if dev_file is not None:  # read and check the dev file before spending time on training
        dcols, drows = read_table(dev_file, file_format)
        if not drows:
            raise ConvBertError(f"{dev_file}: no data rows")
        da, db = _texts(dev_file, dcols, drows, text_columns)
        dy = _labels(dev_file, drows, _column_values(dev_file, dcols, drows, label_column, "label"), label_column,
                     regression, label_list)
        dfeats = featurize(da, db, dy, tokenizer, cfg.max_seq_length, label_list,
                           regression_scale=cfg.regression_scale)

    set_seed(seed)
    model = ConvBertForSequenceClassification.from_encoder(model_dir, 1 if regression else len(label_list))
    check_vocab_matches(model, tokenizer, model_dir, cfg.max_seq_length)
    if output_note:
        print(output_note)
    peak_lr = cfg.lr if cfg.lr is not None else default_lr(model.config)
    epochs = cfg.epochs if cfg.epochs is not None else 3
    total = train_steps_for(len(feats), cfg.batch_size, epochs)
    bar = None
    if progress:
        from convbert.utils import progress_bar

        bar = progress_bar(total=total, unit="step", desc="fine-tuning")

    def on_step(step, loss):
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    try:
        stats = train(model, feats, cfg, regression, epochs, seed, peak_lr, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    result = {
        "train_examples": len(feats),
        "steps": stats.steps,
        "peak_lr": peak_lr,
        "epochs": epochs,
        "final_loss": stats.final_loss,
        "seconds": round(stats.seconds, 2),
    }
    if dev_file is not None:
        out = predict_logits(model, dfeats, cfg.eval_batch_size, cfg.pad_to_max, precision=cfg.precision)
        if regression:
            result["dev"] = M.regression_metrics(out.reshape(-1), np.asarray(dy, dtype=np.float64))
        else:
            pred, gold = out.argmax(-1), dfeats.labels
            dev = {"accuracy": M.accuracy(pred, gold), "mcc": M.matthews(pred, gold)}
            if len(label_list) == 2:
                dev["f1"] = M.f1_binary(pred, gold, positive=1)
            result["dev"] = dev
        result["dev_examples"] = len(dy)
        print("dev: " + ", ".join(f"{k} {v:.2f}" for k, v in result["dev"].items()))
    # The whole folder is written aside and renamed into place: an interrupted run never leaves a new head next
    # to an old task file.
    with staged_folder(output) as staging:
        model.save_pretrained(staging)
        copy_tokenizer_files(model_dir, staging)
        write_json_atomic(
            staging / TASK_FILE,
            {
                "text_columns": text_columns,
                "label_column": label_column,
                "regression": regression,
                "labels": label_list,
                "max_seq_length": cfg.max_seq_length,
                "pad_to_max": cfg.pad_to_max,
                "source_model": str(model_dir.resolve()),  # absolute: compared by a later fine-tuning
                "train_file": str(train_file.resolve()),
                "seed": seed,
                "settings": cfg.to_dict(),
                "result": result,
            },
        )
    print(f"saved the fine-tuned model to {output}")
    return result


DEFAULT_OUTPUT = "finetuned"


def default_output(model_dir: str | os.PathLike, train_file: str | os.PathLike,
                   base: str | os.PathLike = DEFAULT_OUTPUT, overwrite: bool = False) -> tuple[Path, str | None]:
    """Where `convbert finetune` writes when --output is not given: ./finetuned, unless that holds another task's
    model (or other files, or is not a folder), then the first free ./finetuned-2, -3, …, with a note saying why.
    A default must not fail, nor replace someone else's work; an explicit --output that would is refused instead.
    With `overwrite`, ./finetuned is replaced if it is an earlier fine-tuned model (of any task)."""
    base = Path(base)
    for n in itertools.count(1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if candidate.is_symlink() and not candidate.exists():
            continue  # a dangling link: writing through it would fail at the end
        if candidate.exists() and not candidate.is_dir():
            continue
        try:
            refuse_foreign_folder(candidate, (TASK_FILE,), "an earlier `convbert finetune` output",
                                  replaces=FINETUNE_FILES)
            _refuse_replacing_another_task(candidate, Path(model_dir), Path(train_file), overwrite=overwrite)
        except ConvBertError:
            continue
        note = (f"{base} is taken (another task's fine-tuned model, other files, or not a folder); writing to "
                f"{candidate}") if n > 1 else None
        return candidate, note
    raise AssertionError("unreachable")


def _refuse_replacing_another_task(output: Path, model_dir: Path, train_file: Path, overwrite: bool) -> None:
    """Re-running a fine-tuning replaces its output; a different model or training file (two tasks both left at
    the default --output ./finetuned, say) must not silently take the place of the earlier one."""
    record = output / TASK_FILE
    if overwrite or not record.is_file():
        return
    try:
        earlier = json.loads(record.read_text(encoding="utf-8"))
        was_model, was_train = earlier.get("source_model"), earlier.get("train_file")
    except (OSError, ValueError, AttributeError):
        was_model = was_train = None
    differs = []
    if was_model is None or Path(was_model).resolve() != model_dir.resolve():
        differs.append(f"--model {was_model}" if was_model else "an unreadable record")
    if was_train is not None and Path(was_train) != train_file.resolve():
        differs.append(f"--train {was_train}")
    if differs:
        raise ConvBertError(f"--output {output}: holds an earlier fine-tuned model of {' and '.join(differs)}; choose "
                            "a new --output or pass --overwrite to replace it")


def _check_task_file(path: Path, task: dict, columns, regression: bool, labels, max_len: int) -> None:
    """What `finetune` writes, field by field: an edited or damaged file is named, not a traceback later."""
    def bad(field: str, expected: str) -> ConvBertError:
        return ConvBertError(f"{path}: field {field!r} is {task.get(field)!r}: expected {expected} (the file was "
                             "edited or damaged; fine-tune again)")

    if not (isinstance(columns, list) and columns and all(isinstance(c, str) for c in columns)) or len(columns) > 2:
        raise bad("text_columns", "a list of 1 or 2 column names")
    if not isinstance(task.get("regression"), bool):
        raise bad("regression", "true or false")
    if regression and labels is not None:
        raise bad("labels", "null for a regression task")
    if not regression and not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)):
        raise bad("labels", "a list of at least 2 label strings")
    if not 4 <= max_len <= 65535:
        raise bad("max_seq_length", "4..65535")
    scale = task.get("score_scale", 1.0)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise bad("score_scale", "a positive number")
    bounds = task.get("score_range")
    if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2
                                   and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
                                   and bounds[0] < bounds[1]):
        raise bad("score_range", "null or [low, high]")


def predict_file(
    model_dir: Path,
    input_file: Path,
    output_file: Path,
    batch_size: int = 32,
    file_format: str | None = None,
    text_columns: list[str] | None = None,
    keep_columns: list[str] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> int:
    """Label `input_file` with the fine-tuned model in `model_dir`; `keep_columns`: input columns copied into each
    output row (before the prediction), e.g. an id. `device` ("cpu", "cuda", "cuda:1", …) and `precision` ("fp32",
    or "bf16"/"fp16" autocast) as in fine-tuning. Returns the number of rows written."""
    from convbert.model.heads import ConvBertForSequenceClassification

    model_dir, input_file, output_file = Path(model_dir), Path(input_file), Path(output_file)
    if output_file.exists() and input_file.exists() and output_file.resolve() == input_file.resolve():
        raise ConvBertError(f"--output {output_file}: is the --input file; it would overwrite it (choose another path)")
    if output_file.is_dir():
        raise ConvBertError(f"--output {output_file}: is a folder; expected a file path such as {output_file}/pred.csv")
    check_output_location(output_file)  # (before predicting, not when the predictions are written)
    task_path = model_dir / TASK_FILE
    if not task_path.is_file():
        from convbert.utils import folder_kind_hint

        hint = folder_kind_hint(model_dir)
        raise ConvBertError(f"{task_path}: not found{hint or ''} (predict needs a folder written by `convbert "
                            "finetune`, or by `convbert import-tf --task` with a GLUE task name)")
    try:
        task = json.loads(task_path.read_text(encoding="utf-8"))
        trained_columns = task["text_columns"]
        regression = bool(task["regression"])
        labels = task["labels"]
        max_len = int(task["max_seq_length"])
        pad_to_max = bool(task.get("pad_to_max", True))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConvBertError(f"{task_path}: malformed ({err})")
    _check_task_file(task_path, task, trained_columns, regression, labels, max_len)
    cols_needed = list(trained_columns)
    if text_columns:  # other column names in this file, as many as the model was fine-tuned on
        if len(text_columns) != len(trained_columns) or not all(text_columns):
            raise ConvBertError(
                f"--text-columns {','.join(text_columns)}: the model was fine-tuned on {len(trained_columns)} text "
                f"column(s) ({', '.join(trained_columns)}); give {len(trained_columns)} column name(s) of "
                f"{input_file}, in that order")
        cols_needed = list(text_columns)
    if batch_size < 1:
        raise ConvBertError(f"--batch-size must be at least 1, got {batch_size}")
    FinetuneConfig(device=device, precision=precision).validate()  # (the same checks as for fine-tuning)
    out_fmt = detect_format(output_file, None, "name the output .csv, .tsv or .jsonl; --format is the input's")
    tokenizer = load_tokenizer(model_dir)
    model = ConvBertForSequenceClassification.from_pretrained(model_dir)
    heads = 1 if regression else len(labels)
    if model.num_labels != heads:
        raise ConvBertError(f"{task_path}: lists {heads} output(s) but the model's head has {model.num_labels} "
                            "(the folder mixes two fine-tuning runs; fine-tune again)")
    if max_len > model.config.max_position_embeddings:
        raise ConvBertError(f"{task_path}: max_seq_length {max_len} is longer than the model's "
                            f"{model.config.max_position_embeddings} positions")
    cols, rows = read_table(input_file, file_format)
    keep = list(keep_columns or [])
    repeated = sorted({name for name in keep if keep.count(name) > 1})
    if repeated:
        raise ConvBertError(f"--keep-columns {','.join(keep)}: {', '.join(map(repr, repeated))} given twice")
    for name in keep:
        if not name or name not in cols:
            raise ConvBertError(f"--keep-columns {','.join(keep)}: {input_file} has no column {name!r} (columns: "
                                f"{', '.join(cols) or 'none'})")
    reserved = sorted(set(keep) & ({"index", "label", "score", "probabilities"} | {f"prob_{l}" for l in labels or []}))
    if reserved:
        raise ConvBertError(f"--keep-columns: {', '.join(reserved)} would clash with the prediction's own columns")
    # Kept as they are: a JSONL id stays a number (or null) in JSONL output; CSV/TSV output writes its text
    for name in keep:
        for ln, row in rows:
            if name not in row:
                raise ConvBertError(f"{input_file}:{ln}: field {name!r} is missing (--keep-columns)")
    kept = [{name: _json_safe(row[name]) for name in keep} for _, row in rows]
    a, b = _texts(input_file, cols, rows, cols_needed)
    feats = featurize(a, b, [None] * len(a), tokenizer, max_len, labels, regression_scale=1.0)
    model.to(device)
    if progress:
        from convbert.utils import progress_bar

        with progress_bar(total=len(feats), unit="row", desc="predicting") as bar:
            out = predict_logits(model, feats, batch_size, pad_to_max, on_batch=bar.update, precision=precision)
    else:
        out = predict_logits(model, feats, batch_size, pad_to_max, precision=precision)
    records = []
    if regression:
        sts = task.get("glue_task") == "sts"  # (an STS-B head imported before the scale was recorded: the same)
        scores = out.reshape(-1).astype(np.float64) * float(task.get("score_scale", 5.0 if sts else 1.0))
        bounds = task.get("score_range", [0.0, 5.0] if sts else None)  # (STS-B: trained on score / 5)
        if bounds is not None:
            scores = np.clip(scores, *bounds)
        for i, v in enumerate(scores):
            records.append({"index": i, **kept[i], "score": float(v)})
    else:
        probs = softmax(out.astype(np.float64))
        for i, p in enumerate(probs):
            records.append({"index": i, **kept[i], "label": labels[int(p.argmax())],
                            "probabilities": {l: float(x) for l, x in zip(labels, p)}})
    with atomic_path(output_file) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if out_fmt == "jsonl":
                for r in records:
                    f.write(json.dumps(r) + "\n")
            else:
                # TSV as GLUE and our reader have it: no quoting (a tab or line break in a value is refused)
                w = (csv.writer(f, lineterminator="\n") if out_fmt == "csv" else
                     csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, quotechar=None))
                def cells(r):
                    row = [_cell(r[k]) for k in keep]
                    if out_fmt == "tsv" and any("\r" in c for c in row):  # (the writer itself refuses \t, \n)
                        raise csv.Error("carriage return")
                    return row

                try:
                    if regression:
                        w.writerow(["index", *keep, "score"])
                        for r in records:
                            w.writerow([r["index"], *cells(r), f"{r['score']:.9g}"])
                    else:
                        w.writerow(["index", *keep, "label"] + [f"prob_{l}" for l in labels])
                        for r in records:
                            w.writerow([r["index"], *cells(r), r["label"]]
                                       + [f"{r['probabilities'][l]:.6f}" for l in labels])
                except csv.Error:
                    raise ConvBertError(f"--output {output_file}: a kept column or label holds a tab or line break, "
                                        "which TSV cannot hold unquoted; write .csv or .jsonl") from None
    print(f"wrote {len(records)} predictions to {output_file}")
    return len(records)
