"""Resources: the data loader's memory stays flat over a long run; running out of memory is a one-line error with a
hint (batch size, gradient accumulation), whatever raised it (MemoryError, torch's CPU allocator, CUDA OOM)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch

from convbert.cli import main
from test_finetune_data import WORDS, make_tiny_model, write_glue

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from convbert.data import build_dataset

    root = tmp_path_factory.mktemp("resources")
    model = make_tiny_model(root / "model")
    corpus = root / "corpus.txt"
    docs = ["\n".join(" ".join(WORDS[(d * 13 + i * 7 + j * 3) % len(WORDS)] for j in range(6 + (i + d) % 9))
                      for i in range(8)) for d in range(80)]
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    data = root / "data"
    build_dataset([str(corpus)], str(model / "vocab.txt"), str(data), max_seq_length=32, progress=False)
    return root, model, data


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_loader_memory_stays_flat_over_many_steps(env):
    """10,000 steps (hundreds of epochs of a small dataset) through the trainer's loader and masking: after a short
    warm-up the resident set grows by less than 4 MiB, and the samples show no upward trend."""
    from convbert.data.dataset import PretrainingDataset
    from convbert.pretrain.data import InfiniteLoader, default_loader_factory
    from convbert.pretrain.masking import mask_batch

    _, _, data = env
    ds = PretrainingDataset(data)
    loader = InfiniteLoader(default_loader_factory(ds, 16, 42, 0, 1))
    gen = torch.Generator().manual_seed(0)
    steps, warmup, every = 10_000, 500, 500
    assert steps * 16 > 100 * len(ds)  # many epochs

    def step():
        raw = loader.next()
        mask_batch(raw["input_ids"], raw["input_mask"], raw["segment_ids"], cls_id=ds.cls_id, sep_id=ds.sep_id,
                   mask_id=ds.mask_id, generator=gen, mask_prob=0.15, max_predictions=5)

    for _ in range(warmup):
        step()
    gc.collect()
    samples = [rss_bytes()]
    for i in range(1, steps + 1):
        step()
        if i % every == 0:
            gc.collect()
            samples.append(rss_bytes())
    growth = max(samples) - samples[0]
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {steps} steps: {samples}"
    # no trend: the second half is no higher than the first half's peak plus 1 MiB
    half = len(samples) // 2
    assert max(samples[half:]) <= max(samples[:half]) + 2**20, samples


def _pretrain_argv(data, out):
    return ["pretrain", "--data", str(data), "--size", "tiny", "--output", str(out), "--steps", "3",
            "--batch-size", "8", "--threads", "1", "--no-progress", "--eval-batches", "0"]


def _one_line(err: str, cmd: str) -> str:
    """The error is one line, the last one (the run's start-up message may precede it), and there is no traceback."""
    lines = err.splitlines()
    errors = [l for l in lines if ": error: " in l]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    assert errors[0].startswith(f"convbert {cmd}: error: out of memory"), errors[0]
    return errors[0]


@pytest.mark.parametrize("kind", ["MemoryError", "torch CPU allocator", "CUDA OutOfMemoryError", "real allocation"])
def test_out_of_memory_in_pretraining_is_one_line_with_a_hint(env, tmp_path, monkeypatch, capsys, kind):
    from convbert.pretrain.trainer import Trainer

    def boom(self):
        if kind == "MemoryError":
            raise MemoryError
        if kind == "torch CPU allocator":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")
        if kind == "CUDA OutOfMemoryError":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        torch.empty(1 << 48, dtype=torch.uint8)  # 256 TiB: more than the address space, so the allocator fails

    monkeypatch.setattr(Trainer, "train_step", boom)
    _, _, data = env
    rc = main(_pretrain_argv(data, tmp_path / "run"))
    assert rc == 2
    line = _one_line(capsys.readouterr().err, "pretrain")
    assert "--grad-accum" in line and "--batch-size" in line


def test_out_of_memory_in_glue_names_batch_size_and_sequence_length(env, tmp_path, monkeypatch, capsys):
    import convbert.finetune.runner as runner

    def boom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(runner, "train", boom)
    root, model, _ = env
    glue = write_glue(tmp_path / "glue")
    rc = main(["glue", "--model", str(model), "--glue-dir", str(glue), "--tasks", "rte", "--output",
               str(tmp_path / "o"), "--epochs", "1", "--max-seq-length", "32", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    line = err.splitlines()[-1]  # after the "[1/1] RTE seed 1" progress line
    assert line.startswith("convbert glue: error: out of memory") and "Traceback" not in err
    assert line.endswith("out of memory; lower --batch-size or --max-seq-length")  # (glue has no accumulation)


def test_out_of_memory_with_debug_shows_the_traceback(env, tmp_path):
    """In a real process: --debug adds the traceback; the last line is still the one-line message."""
    _, _, data = env
    code = ("import sys; from convbert.pretrain.trainer import Trainer\n"
            "def boom(self): raise MemoryError\n"
            "Trainer.train_step = boom\n"
            "from convbert.cli import main; sys.exit(main(sys.argv[1:]))\n")
    argv = _pretrain_argv(data, tmp_path / "run")
    quiet = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    loud = subprocess.run([sys.executable, "-c", code, "--debug", *argv], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == loud.returncode == 2
    quiet_line = [l for l in quiet.stderr.splitlines() if "error" in l]
    assert len(quiet_line) == 1 and "Traceback" not in quiet.stderr
    assert "Traceback (most recent call last)" in loud.stderr and "MemoryError" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet_line[0]
