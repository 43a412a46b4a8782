"""Fault tolerance: processes SIGKILLed at random points resume to exactly the uninterrupted result.

* pre-training killed at random steps and during checkpoint writes → the re-run resumes from the last complete
  checkpoint and the final weights and optimiser state are bit-identical to an uninterrupted run;
* a checkpoint write interrupted at every point (a snapshot of the folder taken at that instant) never leaves the
  latest checkpoint unreadable;
* the data builder killed mid-run → re-running gives a byte-identical folder;
* a GLUE run killed mid-task → re-running finishes with the results of an uninterrupted run;
* non-finite losses: skipped and counted; N in a row stop the run with a one-line message.

Everything runs on the CPU with the `tiny` preset and one thread per process, so runs are reproducible bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convbert.cli import main
from convbert.pretrain import checkpoint as ckpt_io
from convbert.pretrain.logging import read_log
from test_finetune_data import WORDS, make_tiny_model, write_glue

STEPS = 14


def _corpus(path: Path, n_docs: int, lines_per_doc: int = 8) -> Path:
    docs = []
    for d in range(n_docs):
        docs.append("\n".join(" ".join(WORDS[(d * 13 + i * 7 + j * 3) % len(WORDS)] for j in range(6 + (i + d) % 9))
                              for i in range(lines_per_doc)))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from convbert.data import build_dataset

    root = tmp_path_factory.mktemp("faults")
    model = make_tiny_model(root / "model")
    vocab = model / "vocab.txt"
    corpus = _corpus(root / "corpus.txt", 80)
    data = root / "data"
    build_dataset([str(corpus)], str(vocab), str(data), max_seq_length=32, progress=False)
    return root, model, vocab, data


def _pretrain_argv(data: Path, out: Path, steps: int = STEPS) -> list[str]:
    return ["pretrain", "--data", str(data), "--size", "tiny", "--output", str(out), "--steps", str(steps),
            "--batch-size", "8", "--threads", "1", "--no-progress", "--save-every", "1", "--eval-batches", "0",
            "--keep-checkpoints", "3"]


def _spawn(argv: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "convbert", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _finish(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "convbert", *argv], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 90) -> bool:
    """Poll `condition()` every ~0.5 ms; SIGKILL the process as soon as it holds. False if the process ended first."""
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if condition():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.0005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _checkpoint_names(ckdir: Path) -> list[str]:
    try:
        return os.listdir(ckdir)
    except FileNotFoundError:
        return []


def _tmp_step(name: str) -> int:
    """The step of a checkpoint's temporary folder `.step-XXXXXXXX.<random>.tmp`, else -1."""
    if name.startswith(".step-") and name.endswith(".tmp"):
        return int(name[len(".step-"):].split(".")[0])
    return -1


def _steps_done(ckdir: Path) -> int:
    return max([s for s, _ in ckpt_io.list_checkpoints(ckdir)], default=0)


def _assert_same_final_state(a: Path, b: Path) -> None:
    ca, cb = ckpt_io.latest_checkpoint(a / "checkpoints"), ckpt_io.latest_checkpoint(b / "checkpoints")
    assert ca.name == cb.name == ckpt_io.checkpoint_name(STEPS)
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(ca / name)), load_file(str(cb / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k} differs"
    sa = json.loads((ca / ckpt_io.STATE_FILE).read_text())
    sb = json.loads((cb / ckpt_io.STATE_FILE).read_text())
    assert sa["loader"] == sb["loader"] and sa["tokens_seen"] == sb["tokens_seen"]


# ---------------------------------------------------------------------------------------------------- pre-training


@pytest.mark.slow
def test_pretraining_sigkilled_at_random_steps_and_mid_checkpoint_resumes_bit_exact(env, tmp_path):
    root, _, _, data = env
    ref = tmp_path / "ref"
    _finish(_pretrain_argv(data, ref))

    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    rng = random.Random(7)
    trials = ["step", "write", "step", "write", "write"]
    killed_mid_write = 0
    for kind in trials:
        done = _steps_done(ckdir)
        target = min(STEPS - 1, done + rng.randint(1, 3))
        proc = _spawn(_pretrain_argv(data, out))
        if kind == "step":  # some random moment after checkpoint `target` appeared (mid-step, mid-log, ...)
            delay = rng.uniform(0.0, 0.03)
            seen: dict[str, float] = {}

            def cond():
                if _steps_done(ckdir) >= target:
                    seen.setdefault("t", time.monotonic())
                    return time.monotonic() - seen["t"] >= delay
                return False
        else:  # the instant the temporary folder of a checkpoint >= `target` appears: the write is under way

            def cond():
                return any(_tmp_step(n) >= target for n in _checkpoint_names(ckdir))

        assert _kill_when(proc, cond), f"the run ended before the {kind} kill at step {target}"
        assert proc.returncode == -signal.SIGKILL
        leftovers = [n for n in _checkpoint_names(ckdir) if n.endswith(".tmp")]
        if kind == "write" and leftovers:
            killed_mid_write += 1
        # whatever the moment, the latest complete checkpoint reads back
        latest = ckpt_io.latest_checkpoint(ckdir)
        assert latest is not None
        data_ = ckpt_io.load_checkpoint(latest)
        assert data_["state"]["step"] == int(latest.name.split("-")[1])
    assert killed_mid_write >= 1, "no kill landed inside a checkpoint write"

    last_good = ckpt_io.latest_checkpoint(ckdir)
    p = _finish(_pretrain_argv(data, out))
    assert f"resumed from {last_good}" in p.stderr
    assert not [n for n in _checkpoint_names(ckdir) if n.endswith(".tmp")]  # leftovers of the kills cleaned up
    _assert_same_final_state(ref, out)


class _Crash(BaseException):
    pass


def test_checkpoint_write_interrupted_at_every_point_leaves_a_readable_latest(tmp_path, monkeypatch):
    """Crash points: before and after every file write, fsync and rename of `save_checkpoint`, and half-way through
    every tensor file. At each, the folder as it is at that instant (what a SIGKILL leaves) is copied aside; its
    latest checkpoint must load, and be the previous or the new step."""
    import convbert.pretrain.checkpoint as mod

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    rng = [mod.capture_rng(None, None, "cpu")]
    ckdir = tmp_path / "checkpoints"

    def save(step):
        mod.save_checkpoint(ckdir, step, model=model, optimizer=opt, rng_states=rng, loader_states=[{"p": step}],
                            trainer_state={"total_steps": 9})

    save(1)
    state = {"k": 0, "crash_at": None, "snapshots": []}

    def point(label):
        state["k"] += 1
        if state["k"] == state["crash_at"]:
            snap = tmp_path / f"snap-{len(state['snapshots']):03d}"
            shutil.copytree(ckdir, snap, symlinks=True)
            state["snapshots"].append((label, snap))
            raise _Crash(label)

    def wrap(name, fn, torn=False):
        def inner(*args, **kw):
            point(f"before {name}")
            out = fn(*args, **kw)
            if torn:  # the file is only half on disk
                path = Path(args[1])
                full = path.read_bytes()
                path.write_bytes(full[: len(full) // 2])
                point(f"half-way through {name} {path.name}")
                path.write_bytes(full)
            point(f"after {name}")
            return out

        return inner

    monkeypatch.setattr(mod, "save_file", wrap("save_file", mod.save_file, torn=True))
    monkeypatch.setattr(mod, "_fsync_file", wrap("fsync", mod._fsync_file))
    monkeypatch.setattr(mod, "_fsync_dir", wrap("fsync dir", mod._fsync_dir))
    real_replace = os.replace
    monkeypatch.setattr(mod.os, "replace", wrap("rename", real_replace))
    real_dump = json.dump
    monkeypatch.setattr(mod.json, "dump", wrap("json.dump", real_dump))

    for step in (2, 2):  # a new checkpoint, then a re-save of the same step (the replace-an-existing path)
        crash_at = 1
        while True:
            state.update(k=0, crash_at=crash_at)
            try:
                save(step)
            except _Crash:
                crash_at += 1
                continue
            break
        assert crash_at > 10  # every write/fsync/rename was a crash point
    assert len(state["snapshots"]) > 20
    for label, snap in state["snapshots"]:
        latest = mod.latest_checkpoint(snap)
        assert latest is not None, label
        loaded = mod.load_checkpoint(latest)  # raises ConvBertError if unreadable
        assert loaded["state"]["step"] in (1, 2), label
        assert set(loaded["model"]) == set(model.state_dict()), label
    monkeypatch.undo()
    final = mod.load_checkpoint(mod.latest_checkpoint(ckdir))
    assert final["state"]["step"] == 2 and final["state"]["loader"] == [{"p": 2}]


# ---------------------------------------------------------------------------------------------------- data builder


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_data_builder_sigkilled_mid_run_gives_identical_shards_and_manifest(env, tmp_path):
    from convbert.data import build_dataset

    _, _, vocab, _ = env
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        _corpus(corpus / f"part{i:02d}.txt", 60 + i)
    kwargs = dict(seed=3, max_seq_length=32, shard_tokens=3000, chunk_bytes=4000)
    ref = tmp_path / "ref"
    build_dataset([str(corpus)], str(vocab), str(ref), progress=False, **kwargs)
    n_shards = len(json.loads((ref / "manifest.json").read_text())["shards"])
    assert n_shards >= 6

    out = tmp_path / "out"
    code = ("from convbert.data import build_dataset; "
            f"build_dataset([{str(corpus)!r}], {str(vocab)!r}, {str(out)!r}, progress=False, workers=2, **{kwargs!r})")
    rng = random.Random(11)
    kills = 0
    for _ in range(2):
        done = 0
        if (out / "manifest.json").is_file():
            done = len(json.loads((out / "manifest.json").read_text())["shards"])
        target = min(n_shards - 1, done + rng.randint(1, 2))
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))

        def cond():
            try:
                return len(json.loads((out / "manifest.json").read_text())["shards"]) >= target
            except (OSError, ValueError, KeyError):
                return False

        if _kill_when(proc, cond):
            kills += 1
            m = json.loads((out / "manifest.json").read_text())
            assert not m["complete"]
            print(f"killed the builder after {len(m['shards'])} of {n_shards} shards")
    assert kills >= 1, "the build finished before it could be killed"
    build_dataset([str(corpus)], str(vocab), str(out), progress=False, **kwargs)
    assert _tree(out) == _tree(ref)


# ---------------------------------------------------------------------------------------------------- GLUE


@pytest.mark.slow
def test_glue_run_sigkilled_mid_task_finishes_with_the_uninterrupted_results(env, tmp_path):
    root, model, _, _ = env
    glue = write_glue(tmp_path / "glue", n_train=24, n_dev=6)

    def argv(out):
        return ["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "rte", "--seeds", "2",
                "--output", str(out), "--epochs", "20", "--batch-size", "4", "--max-seq-length", "32",
                "--no-progress", "--threads", "1"]

    _finish(argv(tmp_path / "ref"))
    out = tmp_path / "out"
    rng = random.Random(5)
    for seed in (1, 2):  # killed while training seed 1, then (re-run) while training seed 2
        proc = _spawn(argv(out))
        started = {}

        def cond():
            # stderr lines "[k/n] RTE seed s" are printed when run (task, seed) starts
            if "t" not in started:
                line = proc.stderr.readline()
                if f"RTE seed {seed}" in line and line.startswith("["):
                    started["t"] = time.monotonic()
                    started["delay"] = rng.uniform(0.02, 0.2)
                return False
            return time.monotonic() - started["t"] >= started["delay"]

        assert _kill_when(proc, cond), f"the GLUE run finished before the kill during seed {seed}"
        assert not (out / "results.md").exists()
        assert not (out / "runs" / f"rte-seed{seed}.json").exists()  # the killed run left no record
    p = _finish(argv(out))
    assert "resuming: 1 finished run(s) kept, 1 to do" in p.stderr
    for s in (1, 2):
        a = json.loads((tmp_path / "ref" / "runs" / f"rte-seed{s}.json").read_text())
        b = json.loads((out / "runs" / f"rte-seed{s}.json").read_text())
        assert a["metrics"] == b["metrics"] and a["train"]["loss_history"] == b["train"]["loss_history"]
    assert (tmp_path / "ref" / "results.md").read_text() == (out / "results.md").read_text()
    assert (tmp_path / "ref" / "results.json").read_text() == (out / "results.json").read_text()


# ---------------------------------------------------------------------------------------------------- non-finite loss


def _nan_on(monkeypatch, bad_calls: set[int] | None):
    """Make the pre-training loss NaN on the given forward calls (1-based; None: on every call)."""
    from convbert.pretrain.model import ElectraPretrainingModel

    orig = ElectraPretrainingModel.forward
    calls = {"n": 0}

    def forward(self, *a, **k):
        out = orig(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if bad_calls is None or calls["n"] in bad_calls:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ElectraPretrainingModel, "forward", forward)
    return calls


def test_non_finite_losses_are_skipped_and_counted(env, tmp_path, monkeypatch, capsys):
    _, _, _, data = env
    out = tmp_path / "run"
    calls = _nan_on(monkeypatch, {2, 5})
    rc = main(_pretrain_argv(data, out, steps=4) + ["--max-bad-steps", "2"])
    assert rc == 0, capsys.readouterr().err
    assert calls["n"] == 6  # 4 good steps + 2 skipped ones
    log = read_log(out / "log.jsonl")
    bad = [r for r in log if r.get("event") == "non_finite_loss"]
    assert [r["in_a_row"] for r in bad] == [1, 1] and [r["total"] for r in bad] == [1, 2]
    assert len([r for r in log if r["kind"] == "train"]) == 4
    state = json.loads((ckpt_io.latest_checkpoint(out / "checkpoints") / ckpt_io.STATE_FILE).read_text())
    assert state["step"] == 4 and state["bad_steps_total"] == 2 and state["bad_steps_in_row"] == 0
    for k, v in load_file(str(ckpt_io.latest_checkpoint(out / "checkpoints") / "model.safetensors")).items():
        assert torch.isfinite(v).all(), k


def test_non_finite_losses_in_a_row_stop_the_run_with_one_line(env, tmp_path, monkeypatch, capsys):
    _, _, _, data = env
    out = tmp_path / "run"
    _nan_on(monkeypatch, set(range(3, 100)))  # two good steps, then NaN forever
    rc = main(_pretrain_argv(data, out, steps=10) + ["--max-bad-steps", "3"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [l for l in err.splitlines() if "error" in l]
    assert lines == ["convbert pretrain: error: 3 steps in a row had a non-finite loss (at step 3); stopping. "
                     "Lower --lr, use --precision fp32/bf16, or check the data"]
    assert "Traceback" not in err
    # the good steps' checkpoints are intact, and the run can be resumed once the cause is fixed
    assert _steps_done(out / "checkpoints") == 2
    monkeypatch.undo()
    assert main(_pretrain_argv(data, out, steps=3)) == 0
    assert _steps_done(out / "checkpoints") == 3


# ---------------------------------------------------------------------------------------------------- atomic writes


def test_atomic_writes_sigkilled_leave_the_old_or_the_new_file(tmp_path):
    """`write_json_atomic` (used for manifests, run records, results) in a tight loop, SIGKILLed at random moments:
    the file always parses and holds one complete version; an exception inside the block leaves the old file."""
    from convbert.utils import atomic_path, write_json_atomic

    target = tmp_path / "state.json"
    write_json_atomic(target, {"version": -1, "pad": ""})
    code = ("import sys; from convbert.utils import write_json_atomic\n"
            "for i in range(10**9):\n"
            "    write_json_atomic(sys.argv[1], {'version': i, 'pad': 'x' * (1000 + 37 * (i % 5000))})\n")
    rng = random.Random(3)
    last = -1
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)])
        time.sleep(0.3 + rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        obj = json.loads(target.read_text())  # never torn
        assert obj["version"] >= 0 and len(obj["pad"]) == 1000 + 37 * (obj["version"] % 5000)
        last = obj["version"]
    assert last >= 0
    before = target.read_bytes()
    temps = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))  # a SIGKILL may leave one each
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash inside the block")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == temps  # its own one is gone


def test_a_kill_between_the_two_renames_of_replace_folder_is_undone_by_the_next_write(tmp_path):
    """replace_folder renames the old folder aside, then the new one in: killed in between, only `.X.old` is left.
    The next staged write of X puts nothing half-done in place: it restores or supersedes the old folder and removes
    the stale staging folders."""
    from convbert.utils import recover_folder, staged_folder

    final = tmp_path / "ex"
    (tmp_path / ".ex.old").mkdir()
    (tmp_path / ".ex.old" / "config.json").write_text("old")
    (tmp_path / ".ex.tmp-abc").mkdir()  # the staging folder of the killed write
    recover_folder(final)
    assert (final / "config.json").read_text() == "old"
    assert not (tmp_path / ".ex.old").exists() and not (tmp_path / ".ex.tmp-abc").exists()
    # a stale .old beside a complete folder is removed; then a staged write replaces the folder whole
    (tmp_path / ".ex.old").mkdir()
    with staged_folder(final) as staging:
        (staging / "config.json").write_text("new")
    assert (final / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"]


def test_temporaries_of_killed_writes_are_removed_when_the_command_starts_again(tmp_path):
    """glue and pretrain clear the `.<name>.<random>.tmp` files an interrupted atomic write leaves."""
    from convbert.cli import main
    from test_finetune_data import make_tiny_model, write_glue

    model = make_tiny_model(tmp_path / "model")
    glue = write_glue(tmp_path / "glue", n_train=6, n_dev=3)
    out = tmp_path / "o"
    argv = ["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "rte", "--output", str(out),
            "--epochs", "1", "--batch-size", "4", "--max-seq-length", "24", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    litter = [out / ".results.json.x1.tmp", out / "runs" / ".rte-seed1.json.x2.tmp",
              out / "runs" / "rte-seed1" / ".RTE.tsv.x3.tmp"]
    for p in litter:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("torn")
    assert main(argv) == 0
    assert not any(p.exists() for p in litter)
