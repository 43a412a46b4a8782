import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Two cores everywhere: keep the suite's intra-op threads predictable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def transformers_module():
    """The parity oracle; tests that need it skip with a clear reason when it is not installed."""
    return pytest.importorskip("transformers", reason="transformers is the parity oracle: pip install -e '.[test]'")


@pytest.fixture
def nan_loss(monkeypatch):
    """Every pre-training forward returns a NaN loss: for the non-finite step handling."""
    from convbert.pretrain.model import ElectraPretrainingModel

    forward = ElectraPretrainingModel.forward

    def nan_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ElectraPretrainingModel, "forward", nan_forward)


@pytest.fixture
def finetune_and_predict(tmp_path):
    """Checks that a model folder is a `--model` like any other: `convbert finetune` on a tiny cat/dog task, then
    `convbert predict` with the result. The folder's vocab.txt must hold the words the, cat, dog, sat and ran."""

    def run(model_dir: Path) -> None:
        rows = ["text,label"] + [f"the {a} {b},{a}" for a in ("cat", "dog") for b in ("sat", "ran")] * 3
        (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
        (tmp_path / "new.csv").write_text("text\nthe cat ran\nthe dog sat\n")
        cli = [sys.executable, "-m", "convbert"]
        repo = Path(__file__).resolve().parent.parent
        ft = subprocess.run(cli + ["finetune", "--model", str(model_dir), "--train", str(tmp_path / "train.csv"),
                                   "--text-columns", "text", "--label-column", "label", "--output",
                                   str(tmp_path / "ft"), "--epochs", "1", "--batch-size", "4", "--max-seq-length", "16",
                                   "--no-progress"], capture_output=True, text=True, cwd=repo)
        assert ft.returncode == 0, ft.stderr
        pred = subprocess.run(cli + ["predict", "--model", str(tmp_path / "ft"), "--input", str(tmp_path / "new.csv"),
                                     "--output", str(tmp_path / "pred.csv")], capture_output=True, text=True, cwd=repo)
        assert pred.returncode == 0, pred.stderr
        lines = (tmp_path / "pred.csv").read_text().splitlines()
        assert lines[0].startswith("index,label") and len(lines) == 3
        assert all(line.split(",")[1] in ("cat", "dog") for line in lines[1:])

    return run
