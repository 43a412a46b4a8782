"""The fused Triton span convolution, run on the CPU through Triton's interpreter (skipped without triton)."""

import os

import pytest
import torch

_interpret_was = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: set it for this import only
try:
    triton = pytest.importorskip("triton", reason="triton is not installed (GPU installs of PyTorch bring it)")
    from convbert.model.triton_span_conv import span_conv  # noqa: E402
finally:
    if _interpret_was is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _interpret_was

from convbert.model.kernels import same_conv  # noqa: E402


def reference(value: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return same_conv(value, kernel.unsqueeze(-2))


@pytest.mark.parametrize("shape,K", [((2, 11, 3, 8), 9), ((1, 5, 2, 6), 3), ((2, 4, 1, 5), 7)])
def test_forward_and_backward_match_shift_and_add(shape, K, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton also reads it when a kernel runs
    torch.manual_seed(0)
    value = torch.randn(*shape, requires_grad=True)
    kernel = torch.randn(*shape[:3], K).softmax(-1).requires_grad_()
    out = span_conv(value, kernel)
    expected = reference(value, kernel)
    assert torch.allclose(out, expected, atol=1e-5)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (value, kernel), grad)
    theirs = torch.autograd.grad(expected, (value, kernel), grad)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5)
