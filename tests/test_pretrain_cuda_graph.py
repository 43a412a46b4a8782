"""`--cuda-graphs` on the CPU: the graphed step (`GraphedTrainStep`) with `RecordedOps`, which records the step's ATen
ops once and replays them into the same tensors as a CUDA graph replays its kernels. The model runs its GPU code path
(`kernels._gpu_path`), so these tests check what a GPU would capture: no host reads, no Python state that changes
between steps, the warm-up undone, exact resume. `tests/test_gpu.py` runs the real CUDA graphs on a GPU.
"""

from pathlib import Path

import pytest
import torch

from convbert.errors import ConvBertError
from convbert.model import kernels
from convbert.optim import AdamWeightDecay
from convbert.pretrain.config import resolve_config
from convbert.pretrain.cuda_graph import GraphedTrainStep, RecordedOps
from convbert.pretrain.logging import read_log
from convbert.pretrain.model import ElectraPretrainingModel
from convbert.pretrain.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from convbert.pretrain.quickstart import prepare_data

    root = tmp_path_factory.mktemp("graph_data")
    return prepare_data(root, max_chars=120_000, vocab_size=600, max_seq_length=32, progress=False)


@pytest.fixture(autouse=True)
def _gpu_code_path(monkeypatch):
    """The ops a GPU runs (conv1d depthwise conv, SDPA, plain LayerNorm), not the CPU kernels."""
    monkeypatch.setattr(kernels, "_lean_path", lambda x: False)
    monkeypatch.setattr(kernels, "_gpu_path", lambda x: True)


def _cfg(data, out, **flags):
    base = dict(data=str(data["data"]), output=str(out), steps=6, batch_size=8, eval_every=0, eval_batches=2,
                save_every=3, threads=1, log_every=1, lr=1e-3, warmup_steps=2)
    base.update(flags)
    return resolve_config("tiny", None, base, [])


def _run(cfg, graphed: bool):
    trainer = Trainer(cfg, progress=False, graph_type=RecordedOps if graphed else None)
    result = trainer.run()
    records = [r for r in read_log(Path(cfg.output) / "log.jsonl") if r["kind"] == "train"]
    return trainer, result, records


def test_graphed_steps_replay_the_eager_steps(tiny_data, tmp_path, monkeypatch):
    calls = []
    forward = ElectraPretrainingModel.forward
    monkeypatch.setattr(ElectraPretrainingModel, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    _, _, eager = _run(_cfg(tiny_data, tmp_path / "eager"), graphed=False)
    eager_calls = len(calls)
    calls.clear()
    trainer, result, graphed = _run(_cfg(tiny_data, tmp_path / "graphed", cuda_graphs=True), graphed=True)
    assert result["finished"] and len(graphed) == len(eager) == 6
    # Python ran the forward only for the 2 warm-up steps, the capture and the 2 evaluations; the 6 steps replayed
    assert len(calls) == 2 + 1 + (eager_calls - 6)
    for e, g in zip(eager, graphed):
        assert g["lr"] == e["lr"]
        for key in ("loss", "gen_loss", "disc_loss", "grad_norm"):
            # the same data, masks, dropout and samples; the update multiplies by a device-resident lr (an ulp)
            assert g[key] == pytest.approx(e[key], rel=1e-5), key
    assert graphed[0]["loss"] != graphed[-1]["loss"]  # the replays see new batches and new weights
    steps = {s["step"] for s in trainer.optimizer.state.values()}
    assert steps == {6}


@pytest.mark.parametrize("flags", [{"objective": "mlm"}, {"attention": "plain"}, {"precision": "bf16"},
                                   {"grad_accum": 2}, {"grad_accum": 4}],
                         ids=["mlm", "plain-attention", "bf16", "accumulate-2", "accumulate-4"])
def test_graphed_variants_match_eager(tiny_data, tmp_path, flags):
    _, _, eager = _run(_cfg(tiny_data, tmp_path / "eager", steps=3, **flags), graphed=False)
    _, _, graphed = _run(_cfg(tiny_data, tmp_path / "graphed", steps=3, cuda_graphs=True, **flags), graphed=True)
    assert [g["loss"] for g in graphed] == pytest.approx([e["loss"] for e in eager], rel=1e-5)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_graphed_run_resumes_exactly(tiny_data, tmp_path, grad_accum):
    _, _, full = _run(_cfg(tiny_data, tmp_path / "full", cuda_graphs=True, grad_accum=grad_accum), graphed=True)
    part = tmp_path / "part"
    _run(_cfg(tiny_data, part, cuda_graphs=True, grad_accum=grad_accum, stop_at_step=3), graphed=True)
    trainer, result, records = _run(_cfg(tiny_data, part, cuda_graphs=True, grad_accum=grad_accum), graphed=True)
    assert result["resumed"] and result["step"] == 6
    # the resumed process captures again (warm-up undone, generators restored): the same bits as not stopping
    assert [r["loss"] for r in records] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in full]


def test_graphed_run_skips_non_finite_losses(tiny_data, tmp_path, nan_loss):
    with pytest.raises(ConvBertError, match="3 steps in a row had a non-finite loss"):
        _run(_cfg(tiny_data, tmp_path / "nan", cuda_graphs=True, max_bad_steps=3), graphed=True)
    events = [r for r in read_log(tmp_path / "nan" / "log.jsonl") if r.get("event") == "non_finite_loss"]
    assert len(events) == 3


@pytest.mark.parametrize("flags, graph_type, message", [
    ({}, None, "needs a GPU"),
    ({"compile": True, "compile_mode": "reduce-overhead"}, RecordedOps, "reduce-overhead, which captures CUDA graphs"),
    ({"compile": True, "compile_mode": "max-autotune"}, RecordedOps, "max-autotune, which captures CUDA graphs"),
    ({"compile": True}, RecordedOps, "cannot replay torch.compile'd modules"),  # the stand-in's limit, not CUDA's
])
def test_graphed_run_refuses_what_it_cannot_capture(tiny_data, tmp_path, flags, graph_type, message):
    with pytest.raises(ConvBertError, match=message):
        Trainer(_cfg(tiny_data, tmp_path / "x", cuda_graphs=True, **flags), progress=False, graph_type=graph_type)


def test_graphed_run_refuses_gradient_checkpointing(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path / "x", cuda_graphs=True)
    cfg.model["gradient_checkpointing"] = True
    with pytest.raises(ConvBertError, match="gradient checkpointing"):
        Trainer(cfg, progress=False, graph_type=RecordedOps)


class _ToyStep(torch.nn.Module):
    """A one-linear stand-in for the pre-training model whose forward runs `body(loss)` before returning."""

    def __init__(self, body):
        super().__init__()
        self.net = torch.nn.Linear(3, 1)
        self.body = body

    def forward(self, batch, sample_generator=None):
        loss = self.body(self.net(batch.input_ids.float()).sum())
        return type("Out", (), {"loss": loss, "gen_loss": loss, "disc_loss": loss})()


def _compute_toy_step(body):
    from convbert.pretrain.masking import MaskedBatch

    model = _ToyStep(body)
    ids = torch.ones(2, 3, dtype=torch.long)
    batch = MaskedBatch(ids, ids, ids, ids, ids[:, :1], ids[:, :1], ids[:, :1].float())
    step = GraphedTrainStep(model, AdamWeightDecay(model.parameters(), lr=0.1), precision="fp32", max_grad_norm=1.0,
                            sample_generator=None, graph_type=RecordedOps, warmup=1)
    return step.compute(batch)


def test_a_host_read_inside_the_capture_is_refused():
    def branches_on_a_value(loss):  # as a CUDA graph cannot
        return loss * 2 if loss.item() > 0 else loss

    with pytest.raises(ConvBertError, match="reads a tensor's value on the host"):
        _compute_toy_step(branches_on_a_value)
    graph = RecordedOps()
    with pytest.raises(ConvBertError, match="nonzero"), graph.capture():
        torch.arange(4).nonzero()  # a data-dependent shape


def test_a_failed_capture_says_what_to_do():
    def fails(loss):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(ConvBertError, match="capturing the training step failed .*run without --cuda-graphs"):
        _compute_toy_step(fails)


def test_recorded_ops_replay_into_the_same_tensors_and_draw_new_random_numbers():
    x = torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    graph = RecordedOps()
    with graph.capture():
        noise = torch.rand(4, generator=gen)
        x.add_(noise * 2)
    captured_noise = noise.clone()
    graph.replay()
    before = x.clone()
    graph.replay()
    assert not torch.equal(noise, captured_noise)  # a new draw on each replay, written into the captured tensor
    assert torch.allclose(x, before + 2 * noise)  # the in-place op replayed on the same tensor
    reference = torch.Generator().manual_seed(0)
    draws = [torch.rand(4, generator=reference) for _ in range(3)]
    assert torch.equal(noise, draws[2])  # capture + 2 replays = 3 draws from the generator, in order
