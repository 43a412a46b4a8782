"""The GPU path: the fused Triton span convolution on CUDA, the model on CUDA against the CPU model and against
transformers, bf16 autocast, `torch.compile`, and pre-training (bf16, fp16 with a scaler, CUDA graphs, torchrun +
NCCL).

Every test here skips without a CUDA device: CI and the 2-core machines never run them. They were run on a lent
GPU (see docs/performance.md, "GPU"). `CONVBERT_GPU_TEST_DEVICE=cpu` runs the device-independent ones on the CPU,
to rehearse this file before a GPU is available.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convbert.model import ConvBertConfig, ConvBertModel
from convbert.model.kernels import same_conv

DEVICE = torch.device(os.environ.get("CONVBERT_GPU_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device (run on a GPU machine)")
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA only")


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """TF32 would round fp32 products to 10-bit mantissas: keep the fp32 comparisons about our code, not TF32."""
    if DEVICE.type != "cuda":
        yield
        return
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was


def _inputs(vocab: int, batch: int = 4, length: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0  # a padded row: the conv branch still reads it (faithful mode)
    types = torch.zeros_like(ids)
    types[:, length // 3:] = 1
    return ids, mask, types


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the output (a LayerNorm's output has mean square ~1: its gradient is noise)."""
    g = torch.Generator().manual_seed(123)
    return (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """|a - b| <= rel * |b| in norm, with 1e-6 of slack for gradients that are zero in exact arithmetic (the
    key bias's: softmax ignores a shift) and so are pure rounding noise."""
    a, b = a.double().cpu(), b.double().cpu()
    return (a - b).norm().item() <= rel * b.norm().item() + 1e-6


def _assert_bf16_gradients_agree(grads: dict, ref_grads: dict) -> None:
    """All gradients together within 5 %; each tensor whose gradient is not ~0 within 30 % (the worst are the
    attention's query/key weights, small differences of large terms; the key bias's is 0 in exact arithmetic)."""
    names = sorted(ref_grads)
    assert sorted(grads) == names
    overall = _rel(torch.cat([grads[n].flatten() for n in names]), torch.cat([ref_grads[n].flatten() for n in names]))
    errors = sorted(((_rel(grads[n], ref_grads[n]), n) for n in names if ref_grads[n].norm() > 1e-3), reverse=True)
    assert overall < 5e-2, (overall, errors[:5])
    assert errors and errors[0][0] < 0.3, errors[:5]


# --- the fused span convolution ----------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("shape,K,dtype", [
    ((3, 128, 6, 64), 9, torch.float32),  # base: 6 conv heads of 64
    ((2, 37, 3, 24), 7, torch.float32),   # odd length, head size under its power-of-two block
    ((2, 128, 3, 64), 9, torch.bfloat16),  # values in bf16 as under autocast, taps in fp32
])
def test_triton_span_conv_on_cuda_matches_fp64_shift_and_add(shape, K, dtype):
    from convbert.model.triton_span_conv import span_conv, use_triton_span_conv

    g = torch.Generator().manual_seed(sum(shape) + K)
    value = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    kernel = torch.randn(*shape[:3], K, generator=g).softmax(-1).to(DEVICE).requires_grad_()
    assert use_triton_span_conv(value)
    out = span_conv(value, kernel)
    assert out.dtype == dtype and out.shape == value.shape and torch.isfinite(out).all()
    v64, k64 = value.detach().cpu().double().requires_grad_(), kernel.detach().cpu().double().requires_grad_()
    ref = same_conv(v64, k64.unsqueeze(-2))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(out, ref) < tol
    grad = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    gv, gk = torch.autograd.grad(out, (value, kernel), grad)
    rv, rk = torch.autograd.grad(ref, (v64, k64), grad.cpu().double())
    assert gv.dtype == dtype and gk.dtype == torch.float32
    assert _rel(gv, rv) < tol and _rel(gk, rk) < tol


@needs_cuda
def test_model_gradients_same_with_and_without_the_triton_kernel(monkeypatch):
    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0)).to(DEVICE)
    ids, mask, types = (t.to(DEVICE) for t in _inputs(model.config.vocab_size))

    def grads():
        model.zero_grad(set_to_none=True)
        _loss(model(ids, mask, types).last_hidden_state).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused = grads()
    monkeypatch.setenv("CONVBERT_DISABLE_TRITON", "1")
    plain = grads()
    assert fused.keys() == plain.keys() and len(fused) > 20
    for name in fused:
        assert _close(fused[name], plain[name], 1e-5), name


# --- the model on the device --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["small", "medium-small", "base"])
def test_model_on_device_matches_transformers_and_the_cpu_model(size, transformers_module):
    torch.manual_seed(0)
    ours = ConvBertModel(ConvBertConfig.from_preset(size, num_hidden_layers=4)).eval()
    c = ours.config
    hf = transformers_module.ConvBertModel(transformers_module.ConvBertConfig(
        **{k: v for k, v in c.to_hf_dict().items() if k not in ("model_type", "architectures", "convbert_extra")}))
    hf.load_state_dict(ours.state_dict(), strict=False)
    ids, mask, types = _inputs(c.vocab_size)
    with torch.no_grad():
        on_cpu = ours(ids, mask, types).last_hidden_state
        ours.to(DEVICE)
        hf.to(DEVICE).eval()
        dev = [t.to(DEVICE) for t in (ids, mask, types)]
        on_device = ours(*dev).last_hidden_state
        theirs = hf(input_ids=dev[0], attention_mask=dev[1], token_type_ids=dev[2]).last_hidden_state
    assert on_device.device.type == DEVICE.type
    assert (on_device - theirs).abs().max().item() <= 1e-4
    assert (on_device.cpu() - on_cpu).abs().max().item() <= 1e-4


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_gradients_through_a_concatenation_match_fp64(dtype, masked):
    """q, k, v as views of one projection, the output concatenated with other heads (as MixedAttention does):
    the gradient reaching the attention is a strided slice. Its q/k/v gradients must match an fp64 softmax."""
    from convbert.model import kernels

    g = torch.Generator().manual_seed(7)
    batch, length, heads, size = 3, 128, 3, 64
    projected = torch.randn(batch, length, 4 * heads * size, generator=g).to(DEVICE, dtype).requires_grad_()
    mask = torch.zeros(batch, 1, 1, length)
    if masked:
        mask[1, ..., 90:] = -10000.0
    other = torch.randn(batch, length, heads, size, generator=g).to(DEVICE, dtype)
    upstream = torch.randn(batch, length, 2 * heads, size, generator=g)

    def run(x, m):
        q, k, v, _ = (t.view(batch, length, heads, size) for t in x.split(heads * size, dim=-1))
        return q, k, v, m

    q, k, v, m = run(projected, mask.to(DEVICE, dtype))
    out = kernels.attention(q, k, v, m, scale=size**-0.5, dropout_p=0.0, training=True)
    torch.cat([out, other], dim=2).backward(upstream.to(DEVICE, dtype))

    ref_x = projected.detach().cpu().double().requires_grad_()
    q, k, v, m = run(ref_x, mask.double())
    probs = (torch.einsum("btnd,bsnd->bnts", q, k) * size**-0.5 + m).softmax(-1)
    ref_out = torch.einsum("bnts,bsnd->btnd", probs, v)
    torch.cat([ref_out, other.cpu().double()], dim=2).backward(upstream.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(out.detach(), ref_out.detach()) < tol
    for part, (got, want) in enumerate(zip(projected.grad.split(heads * size, -1), ref_x.grad.split(heads * size, -1))):
        if part < 3:  # q, k, v (the fourth block takes no gradient here)
            assert _rel(got, want) < tol, (part, _rel(got, want))


@needs_cuda
def test_cuda_gradients_match_the_cpu_model():
    """Every parameter's fp32 gradient on the GPU (TF32 off) against the CPU model's (the lean CPU kernels)."""
    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset("medium-small", num_hidden_layers=3, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0))
    inputs = _inputs(model.config.vocab_size)

    def grads(device):
        model.to(device).zero_grad(set_to_none=True)
        _loss(model(*(t.to(device) for t in inputs)).last_hidden_state).backward()
        return {n: p.grad.detach().cpu() for n, p in model.named_parameters()}

    on_cpu, on_gpu = grads("cpu"), grads(DEVICE)
    bad = [(n, _rel(on_gpu[n], on_cpu[n])) for n in on_cpu if not _close(on_gpu[n], on_cpu[n], 1e-4)]
    assert not bad, bad[:5]


def test_bf16_autocast_training_step_is_close_to_fp32():
    from convbert.precision import autocast

    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset("medium-small", num_hidden_layers=3, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0)).to(DEVICE)
    ids, mask, types = (t.to(DEVICE) for t in _inputs(model.config.vocab_size))

    def run(precision):
        model.zero_grad(set_to_none=True)
        with autocast(precision, DEVICE):
            out = model(ids, mask, types).last_hidden_state
        _loss(out).backward()
        return out.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = run("fp32")
    out, grads = run("bf16")
    assert _rel(out, ref_out) < 3e-2
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
    # bf16 operands (8-bit mantissas) through 3 layers: a few per cent overall
    _assert_bf16_gradients_agree(grads, ref_grads)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_model_matches_eager(precision):
    from convbert.precision import autocast

    torch.manual_seed(0)
    model = ConvBertModel(ConvBertConfig.from_preset("tiny", hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0)).to(DEVICE)
    ids, mask, types = (t.to(DEVICE) for t in _inputs(model.config.vocab_size))
    with autocast(precision, DEVICE):
        eager = model(ids, mask, types).last_hidden_state
    _loss(eager).backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)
    with autocast(precision, DEVICE):
        out = compiled(ids, mask, types).last_hidden_state
    _loss(out).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if precision == "fp32":
        assert _rel(out, eager) < 1e-4
        for name in grads:
            assert _close(grads[name], eager_grads[name], 1e-4), name
    else:  # Inductor fuses and rounds to bf16 in other places than eager autocast
        assert _rel(out, eager) < 3e-2
        _assert_bf16_gradients_agree(grads, eager_grads)


# --- pre-training on the device -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from convbert.pretrain.quickstart import prepare_data

    return prepare_data(tmp_path_factory.mktemp("gpu_data"), max_chars=120_000, vocab_size=600, max_seq_length=32,
                        progress=False)


def _pretrain(data, out, sets=(), **flags):
    from convbert.pretrain.config import resolve_config
    from convbert.pretrain.trainer import run_pretraining

    base = dict(data=str(data["data"]), output=str(out), steps=8, batch_size=16, eval_every=0, eval_batches=2,
                save_every=4, log_every=1, device=DEVICE.type, lr=2e-3, warmup_steps=2)
    base.update(flags)
    result = run_pretraining(resolve_config("tiny", None, base, list(sets)), progress=False)
    from convbert.pretrain.logging import read_log

    losses = [r["loss"] for r in read_log(Path(out) / "log.jsonl") if r["kind"] == "train"]
    return result, losses


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_pretraining_on_device_trains_and_resumes(tiny_data, tmp_path, precision):
    full, losses = _pretrain(tiny_data, tmp_path / "full", precision=precision)
    assert full["finished"] and full["step"] == 8 and len(losses) == 8
    assert all(torch.isfinite(torch.tensor(losses)))
    part = tmp_path / "part"
    _pretrain(tiny_data, part, precision=precision, stop_at_step=4)
    resumed, resumed_losses = _pretrain(tiny_data, part, precision=precision)
    assert resumed["resumed"] and resumed["step"] == 8
    # the data order, masks and samples are the same after the resume; on a GPU the sums of atomically
    # accumulated gradients (embedding and scatter backward) may round differently, so: equal to 1e-4
    assert torch.allclose(torch.tensor(resumed_losses), torch.tensor(losses), rtol=1e-4, atol=0)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_pretraining_matches_eager_and_resumes(tiny_data, tmp_path, precision):
    """`--cuda-graphs`: the same losses as the eager step (same data, masks, dropout and samples), and a resumed
    graphed run (captured afresh in a new trainer) the same as one that did not stop."""
    _, eager = _pretrain(tiny_data, tmp_path / "eager", precision=precision)
    full, graphed = _pretrain(tiny_data, tmp_path / "graphed", precision=precision, cuda_graphs=True)
    assert full["finished"] and len(graphed) == 8
    # atomically accumulated gradients may round differently run to run; bf16 carries that further
    assert torch.allclose(torch.tensor(graphed), torch.tensor(eager), rtol=1e-4 if precision == "fp32" else 2e-3)
    part = tmp_path / "part"
    _pretrain(tiny_data, part, precision=precision, cuda_graphs=True, stop_at_step=4)
    resumed, resumed_losses = _pretrain(tiny_data, part, precision=precision, cuda_graphs=True)
    assert resumed["resumed"] and resumed["step"] == 8
    assert torch.allclose(torch.tensor(resumed_losses), torch.tensor(graphed), rtol=1e-4, atol=0)


@needs_cuda
@pytest.mark.parametrize(("precision", "rtol"), [("fp32", 1e-3), ("bf16", 5e-2)])
def test_compiled_and_graphed_pretraining_matches_eager(tiny_data, tmp_path, precision, rtol):
    """The recommended GPU run, `--compile --cuda-graphs`: encoders, heads, losses, the sampler's arithmetic and the
    optimiser's update compiled, the step captured. Without dropout (Inductor draws its own dropout masks) its losses
    are the eager ones, within the rounding of Inductor's fusions (and, in bf16, the odd sample that flips)."""
    no_dropout = ["model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0"]
    _, eager = _pretrain(tiny_data, tmp_path / "eager", sets=no_dropout, precision=precision)
    full, fast = _pretrain(tiny_data, tmp_path / "fast", sets=no_dropout, precision=precision, compile=True,
                           cuda_graphs=True)
    assert full["finished"] and len(fast) == 8
    assert torch.allclose(torch.tensor(fast), torch.tensor(eager), rtol=rtol), (fast, eager)


@needs_cuda
def test_fp16_pretraining_with_a_gradient_scaler(tiny_data, tmp_path):
    result, losses = _pretrain(tiny_data, tmp_path / "fp16", precision="fp16", steps=6)
    assert result["finished"] and len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


@needs_cuda
def test_torchrun_nccl_one_process(tiny_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port),
           "-m", "convbert", "pretrain", "--data", str(tiny_data["data"]), "--size", "tiny", "--output", str(out),
           "--batch-size", "8", "--steps", "3", "--eval-batches", "1", "--no-progress", "--device", "cuda",
           "--precision", "bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step-00000003" / "model.safetensors").exists()


@needs_cuda
def test_foreach_optimizer_on_cuda_is_bit_identical_to_the_loop():
    from convbert.optim import AdamWeightDecay

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g).to(DEVICE) for s in [(64, 32), (32,), (7,)]]
    grads = [[torch.randn(t.shape, generator=g).to(DEVICE) for t in start] for _ in range(3)]
    finals = []
    for foreach in (None, False):  # None: the default on CUDA, which is the multi-tensor path
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = AdamWeightDecay([{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:],
                                                                               "weight_decay": 0.0}],
                              lr=1e-2, foreach=foreach)
        assert opt._use_foreach(params) is (foreach is None)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
        finals.append(params)
    for a, b in zip(*finals):
        assert torch.equal(a, b)
