"""Run logging for pre-training: a progress bar, a JSONL log, TensorBoard events and a PNG of the curves.

Only rank 0 creates a `RunLogger`; other ranks use `NullLogger`.

* `<run>/log.jsonl`: one JSON object per line, `{"kind": "train"|"eval"|"event", "step": …, …}`. On resume, lines
  past the resumed step are dropped first, so the log of a resumed run matches an uninterrupted one.
* `<run>/tensorboard/`: event files (`torch.utils.tensorboard`), skipped with a note if tensorboard is missing.
  Written from a background thread: building the events costs ~0.6 ms a step, host time a GPU would sit idle for.
* `<run>/curves.png`: training losses, learning rate and evaluation metrics (matplotlib, Agg backend).
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..utils import interactive_stderr, progress_bar

LOG_FILE = "log.jsonl"
PLOT_FILE = "curves.png"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_log(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    records = []
    if not path.is_file():
        return records
    with open(path, encoding="utf-8", errors="replace") as f:  # a torn write may leave any bytes
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
            if isinstance(record, dict) and isinstance(record.get("step", 0), int):
                records.append(record)
    return records


def truncate_log(path: str | os.PathLike, step: int) -> None:
    """Keep the records up to `step` (inclusive) — used when resuming from a checkpoint at `step` — less the
    evaluations a time-limit stop added off the schedule (`at_stop`), which an uninterrupted run does not have."""
    from convbert.utils import write_text_atomic

    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_log(path) if int(r.get("step", 0)) <= step and not r.get("at_stop")]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class _TensorBoardThread:
    """`SummaryWriter.add_scalar` off the training thread, in order; `close()` writes everything queued first."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="convbert-tensorboard", daemon=True)
        self._thread.start()

    def add_scalars(self, scalars: list[tuple[str, float, int]]) -> None:
        """(tag, value, step) triples."""
        if scalars:
            self._queue.put(scalars)

    def _run(self) -> None:
        while (scalars := self._queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                for tag, value, step in scalars:
                    self.writer.add_scalar(tag, value, step)
            except Exception as err:  # e.g. disk full: stop writing events, say so at close
                self.error = err

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.writer.flush()
        self.writer.close()


class NullLogger:
    def start(self, *a, **k) -> None: ...
    def train(self, *a, **k) -> None: ...
    def eval(self, *a, **k) -> None: ...
    def event(self, *a, **k) -> None: ...
    def message(self, *a, **k) -> None: ...
    def close(self, *a, **k) -> None: ...

    def eval_batches(self, batches, total: int, examples: int):
        return batches


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class RunLogger:
    """`progress`: True = a progress bar on a terminal, and a status line every `status_every` seconds where
    stderr is not one (a batch job's log, where a bar's carriage returns pile up); "lines" = status lines only
    (`--no-progress`); False = neither."""

    def __init__(self, run_dir: str | os.PathLike, total_steps: int, *, progress: bool | str = True,
                 tensorboard: bool = True, log_every: int = 1, status_every: float = 60.0) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.log_every = max(1, int(log_every))
        self.progress = progress
        self.mode = ("bar" if progress is True and interactive_stderr() else "lines" if progress else "quiet")
        self.status_every = float(status_every)
        self._last_status = 0.0
        self._f = None
        self._bar = None
        self._tb = None
        self._tb_enabled = tensorboard
        self._window: list[tuple[float, int]] = []  # (time, tokens) for a moving tokens/s
        self._start_step = 0

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # From step 0 (no checkpoint to resume from) the log starts afresh: records of an invocation killed before
        # its first checkpoint (its step-0 evaluation) would otherwise be doubled.
        truncate_log(self.run_dir / LOG_FILE, step if step else -1)
        self._f = open(self.run_dir / LOG_FILE, "a", encoding="utf-8")
        self._start_step = step
        self._t0 = self._last_status = time.perf_counter()
        if self._tb_enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events past the resumed step (>= step + 1; from step 0, all), like the JSONL.
                self._tb = _TensorBoardThread(
                    SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1 if step else 0))
            except Exception as err:  # tensorboard not installed or broken
                self.message(f"TensorBoard logging disabled ({type(err).__name__}: {err})")
                self._tb = None
        if self.mode == "bar":  # (a terminal or Jupyter: progress_bar draws tqdm's bar there)
            self._bar = progress_bar(total=self.total_steps, initial=step, unit="step", desc="pretrain",
                                     smoothing=0.05)

    def close(self, plot: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            if self._tb.error is not None:
                self.message(f"TensorBoard events stopped early ({type(self._tb.error).__name__}: {self._tb.error})")
            self._tb = None
        if self._f is not None:
            self._f.close()
            self._f = None
        if plot:
            try:
                plot_curves(self.run_dir / LOG_FILE, self.run_dir / PLOT_FILE)
            except Exception as err:  # the plot is a convenience; never fail a finished run on it
                self.message(f"could not write {PLOT_FILE}: {type(err).__name__}: {err}")

    # -- records ---------------------------------------------------------------------------------------------------
    def _write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._f.flush()

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def event(self, step: int, name: str, **fields) -> None:
        self._write({"kind": "event", "step": step, "event": name, **fields})

    def train(self, step: int, metrics: dict, tokens: int) -> None:
        now = time.perf_counter()
        self._window.append((now, tokens))
        self._window = self._window[-50:]
        if len(self._window) >= 2:
            dt = self._window[-1][0] - self._window[0][0]
            tok = sum(t for _, t in self._window[1:])
            tps = tok / dt if dt > 0 else None
        else:
            tps = None  # one step gives no rate yet: null in the log, not a made-up number
        record = {"kind": "train", "step": step, **metrics, "tokens_per_s": tps,
                  "elapsed_s": now - self._t0}
        if step % self.log_every == 0 or step == self.total_steps:
            self._write(record)
            if self._tb is not None:
                self._tb.add_scalars(_scalars("train", {**metrics, "tokens_per_s": tps}, step))
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            post = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
            if tps is not None:
                post["tok/s"] = f"{tps:,.0f}"
            self._bar.set_postfix(post, refresh=False)
        elif self.mode == "lines" and (now - self._last_status >= self.status_every or step == self.total_steps):
            self._last_status = now
            done = step - self._start_step
            eta = (now - self._t0) / done * (self.total_steps - step) if done > 0 else float("nan")
            rate = f", {tps:,.0f} tok/s" if tps is not None else ""
            self.message(f"step {step:,}/{self.total_steps:,} ({100 * step / max(1, self.total_steps):.1f} %), "
                         f"loss {metrics.get('loss', float('nan')):.4f}{rate}, elapsed {_duration(now - self._t0)}"
                         + (f", ETA {_duration(eta)}" if math.isfinite(eta) else ""))

    def eval_batches(self, batches, total: int, examples: int):
        """The held-out batches, with a transient bar (or one line) saying what the pause is for: a large held-out
        set takes minutes before the first step."""
        if self.mode == "bar":
            return progress_bar(iterable=batches, total=total, desc="held-out eval", unit="batch", leave=False)
        if self.mode == "lines":
            self.message(f"evaluating {examples:,} held-out examples ({total:,} batch{'es' if total != 1 else ''})")
        return batches

    def eval(self, step: int, metrics: dict) -> None:
        self._write({"kind": "eval", "step": step, **metrics})
        if self._tb is not None and not metrics.get("at_stop"):  # (TensorBoard's files cannot drop it on resume)
            self._tb.add_scalars(_scalars("eval", metrics, step))
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items()
            if k in ("masked_lm_loss", "masked_lm_accuracy", "disc_loss", "disc_auc", "disc_accuracy")
            and isinstance(v, float)
        )
        self.message(f"[eval step {step}] {shown}")


def _scalars(prefix: str, metrics: dict, step: int) -> list[tuple[str, float, int]]:
    return [(f"{prefix}/{key}", value, step) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]


def plot_curves(log_path: str | os.PathLike, out_path: str | os.PathLike) -> Path | None:
    """PNG with the training losses, learning rate and eval metrics found in a run's JSONL log."""
    records = read_log(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows, key):
        xs, ys = [], []
        for r in rows:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                xs.append(r["step"])
                ys.append(v)
        return xs, ys

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    for key in ("loss",):
        ax.plot(*series(train, key), label="total loss", lw=0.8)
    ax.set_title("training loss (gen + 50·disc)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax = axes[0][1]
    ax.plot(*series(train, "gen_loss"), label="generator MLM", lw=0.8, color="tab:blue")
    ax.set_ylabel("generator MLM loss", color="tab:blue")
    ax.set_title("component losses (train)")
    ax.set_xlabel("step")
    xs, ys = series(train, "disc_loss")
    if xs and any(ys):
        ax2 = ax.twinx()
        ax2.plot(xs, ys, lw=0.8, color="tab:orange")
        ax2.set_ylabel("discriminator RTD loss", color="tab:orange")
    ax = axes[1][0]
    plotted = False
    for key, label in (("disc_auc", "disc AUC"), ("disc_accuracy", "disc accuracy"),
                       ("masked_lm_accuracy", "MLM accuracy"), ("sampled_masked_lm_accuracy", "sampled MLM acc.")):
        xs, ys = series(evals, key)
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=label)
            plotted = True
    ax.set_title("held-out evaluation" if plotted else "held-out evaluation (none)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    if plotted:
        ax.legend(fontsize=8)
    ax = axes[1][1]
    ax.plot(*series(train, "lr"), lw=0.8)
    ax.set_title("learning rate")
    ax.set_xlabel("step")
    fig.tight_layout()
    from convbert.utils import atomic_path

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_path
