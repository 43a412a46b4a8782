import os

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
