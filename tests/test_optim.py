"""The original optimiser, schedule and layer-wise lr multipliers (spec §3.7, §5.3)."""

import copy
import math

import pytest
import torch

from convbert.errors import ConvBertError
from convbert.optim import (
    AdamWeightDecay,
    layer_depth,
    layerwise_lr_scale,
    linear_warmup_decay,
    param_groups,
)


def _hand_step(p, g, m, v, lr, wd, b1=0.9, b2=0.999, eps=1e-6):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = m / (math.sqrt(v) + eps) + wd * p
    return p - lr * u, m, v


def test_one_step_matches_hand_computed_update():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = AdamWeightDecay(
        [
            {"params": [w], "weight_decay": 0.01, "lr_scale": 0.5},
            {"params": [b], "weight_decay": 0.0},
        ],
        lr=0.1,
    )
    w.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
    b.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    # Hand computation, first step: m = 0.1 g, v = 0.001 g^2, u = m/(sqrt(v)+eps) (+ wd p), p -= lr*scale*u.
    # w[0]: m = 0.05, v = 0.00025, sqrt v = 0.0158113883, u = 3.1620778 + 0.01 -> p = 1 - 0.05 * 3.1720778
    expected_w0 = 1.0 - 0.05 * (0.05 / (math.sqrt(0.00025) + 1e-6) + 0.01 * 1.0)
    expected_w1 = -2.0 - 0.05 * (-0.1 / (math.sqrt(0.001) + 1e-6) + 0.01 * -2.0)
    expected_b = 0.5 - 0.1 * (0.2 / (math.sqrt(0.004) + 1e-6))  # no decay in this group
    assert w.detach().tolist() == pytest.approx([expected_w0, expected_w1], abs=1e-12)
    assert b.item() == pytest.approx(expected_b, abs=1e-12)
    assert expected_w0 == pytest.approx(0.841396, abs=1e-5)  # the number written out by hand


def test_no_bias_correction_over_steps_and_state_dict_roundtrip():
    torch.manual_seed(0)
    p0 = [0.3, -0.7]
    grads = [[0.1, -0.2], [0.3, 0.05], [-0.4, 0.2]]
    w = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = AdamWeightDecay([{"params": [w], "weight_decay": 0.01}], lr=1e-2)
    expect = list(p0)
    ms, vs = [0.0, 0.0], [0.0, 0.0]
    for k, g in enumerate(grads):
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        for j in range(2):
            expect[j], ms[j], vs[j] = _hand_step(expect[j], g[j], ms[j], vs[j], 1e-2, 0.01)
        if k == 1:
            saved = copy.deepcopy(opt.state_dict())
            saved_w = w.detach().clone()
    assert w.detach().tolist() == pytest.approx(expect, abs=1e-12)
    # torch AdamW (bias-corrected) would give a different first step; ours is the raw-moment version.
    w2 = torch.nn.Parameter(saved_w.clone())
    opt2 = AdamWeightDecay([{"params": [w2], "weight_decay": 0.01}], lr=1e-2)
    opt2.load_state_dict(saved)
    w2.grad = torch.tensor(grads[2], dtype=torch.float64)
    opt2.step()
    assert torch.allclose(w2, w)


def test_schedule_values():
    # total 100, warmup 10: 0 at step 0, ramps linearly while decaying from step 0.
    assert linear_warmup_decay(0, 100, 10) == 0.0
    assert linear_warmup_decay(5, 100, 10) == pytest.approx(0.5 * 0.95)
    assert linear_warmup_decay(10, 100, 10) == pytest.approx(0.9)
    assert linear_warmup_decay(50, 100, 10) == pytest.approx(0.5)
    assert linear_warmup_decay(100, 100, 10) == 0.0
    assert linear_warmup_decay(150, 100, 10) == 0.0
    assert linear_warmup_decay(0, 100, 0) == 1.0


def test_layerwise_multipliers_base():
    L = 12
    assert layerwise_lr_scale("embeddings.word_embeddings.weight", L) == pytest.approx(0.8**14)
    assert layerwise_lr_scale("convbert.embeddings.LayerNorm.weight", L) == pytest.approx(0.0439804651)
    assert layerwise_lr_scale("convbert.embeddings_project.weight", L) == pytest.approx(0.8**14)
    assert layerwise_lr_scale("encoder.layer.0.attention.self.query.weight", L) == pytest.approx(0.8**13)
    assert layerwise_lr_scale("convbert.encoder.layer.5.output.dense.weight", L) == pytest.approx(0.8**8)
    assert layerwise_lr_scale("convbert.encoder.layer.11.output.dense.weight", L) == pytest.approx(0.64)
    assert layerwise_lr_scale("classifier.weight", L) == 1.0
    assert layer_depth("convbert.encoder.layer.11.x", L) == 12
    assert layer_depth("classifier.bias", L) == 14


@pytest.mark.parametrize(
    "name",
    ["pooler.dense.weight", "encoder.layer.12.output.dense.weight", "convbert.classifier.weight", "encoder.rel"],
)
def test_unmatched_names_raise(name):
    with pytest.raises(ConvBertError):
        layerwise_lr_scale(name, 12)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = torch.nn.Module()
        self.embeddings.word_embeddings = torch.nn.Embedding(5, 3)
        self.embeddings.LayerNorm = torch.nn.LayerNorm(3)
        self.encoder = torch.nn.Module()
        self.encoder.layer = torch.nn.ModuleList([torch.nn.Linear(3, 3) for _ in range(2)])
        self.classifier = torch.nn.Linear(3, 2)


def test_param_groups_exclusions_and_scales():
    model = _Toy()
    groups = param_groups(model, 0.01, lambda n: layerwise_lr_scale(n, 2))
    by_name = {}
    for g in groups:
        for n in g["param_names"]:
            by_name[n] = (g["weight_decay"], g["lr_scale"])
    assert by_name["embeddings.word_embeddings.weight"] == (0.01, pytest.approx(0.8**4))
    assert by_name["embeddings.LayerNorm.weight"] == (0.0, pytest.approx(0.8**4))
    assert by_name["encoder.layer.1.weight"] == (0.01, pytest.approx(0.8**2))
    assert by_name["encoder.layer.0.bias"] == (0.0, pytest.approx(0.8**3))
    assert by_name["classifier.weight"] == (0.01, 1.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = AdamWeightDecay(groups, lr=1e-3)
    loss = model.classifier(model.encoder.layer[1](model.embeddings.word_embeddings(torch.tensor([1, 2])))).sum()
    loss.backward()
    opt.step()
    assert "state" in opt.state_dict()


def test_foreach_update_is_bit_identical_to_the_per_parameter_loop():
    """The multi-tensor path (default on GPUs) must give the same bits as the loop, step after step."""
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes[:3]] for _ in range(4)]  # the last parameter never gets a gradient
    results = []
    for foreach in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = AdamWeightDecay([{"params": params[:2], "weight_decay": 0.01},
                               {"params": params[2:], "weight_decay": 0.0, "lr_scale": 0.3}], lr=1e-2,
                              foreach=foreach, fused=False)
        assert opt.update_path(params, [torch.zeros_like(p) for p in params]) == ("foreach" if foreach else "loop")
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append(([p.detach().clone() for p in params], opt.state_dict()))
    (loop_params, loop_state), (fe_params, fe_state) = results
    for a, b in zip(loop_params, fe_params):
        assert torch.equal(a, b)
    assert not torch.equal(loop_params[0], start[0]) and torch.equal(loop_params[3], start[3])
    assert loop_state["state"].keys() == fe_state["state"].keys() and len(loop_state["state"]) == 3
    for k, st in loop_state["state"].items():
        assert st["step"] == fe_state["state"][k]["step"] == 4
        assert torch.equal(st["exp_avg"], fe_state["state"][k]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], fe_state["state"][k]["exp_avg_sq"])


@pytest.mark.parametrize("foreach", [False, True])
def test_a_group_without_gradients_is_skipped(foreach):
    """An unused head's group has no gradients: the multi-tensor path raised on its empty tensor lists."""
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = AdamWeightDecay([{"params": [used]}, {"params": [unused], "lr_scale": 0.5}], lr=0.1, foreach=foreach)
    used.grad = torch.ones(3)
    opt.step()
    assert (used < 1).all() and torch.equal(unused, torch.ones(2)) and unused not in opt.state


@pytest.mark.parametrize("capturable", [False, True])
def test_compiled_update_matches_the_eager_update(capturable):
    """`compile_update` (`convbert pretrain --compile`): the multi-tensor update through torch.compile gives the eager
    update within an ulp or so, for `step()` and for the CUDA-graph `capturable_step`, over several steps."""
    torch.manual_seed(0)
    shapes = [(9, 5), (5,), (4, 3)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    runs = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = AdamWeightDecay([{"params": params[:2], "weight_decay": 0.01},
                               {"params": params[2:], "weight_decay": 0.0, "lr_scale": 0.5}], lr=1e-2, foreach=True)
        if compiled:
            torch._dynamo.reset()
            opt.compile_update()
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.capturable_step(torch.tensor(1e-2)) if capturable else opt.step()
        runs.append([p.detach().clone() for p in params])
    for eager, compiled in zip(*runs):
        assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-8)
    assert not torch.equal(runs[1][0], start[0])


def test_capturable_step_reads_the_lr_from_a_tensor_and_matches_step():
    """The CUDA-graph update: lr from a 0-dim tensor (changed between calls without re-tracing Python), step counters
    advanced by `count_steps`; within an ulp or two of `step()`."""
    torch.manual_seed(0)
    shapes = [(6, 4), (4,), (3,)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes[:2]] for _ in range(3)]  # the last parameter never gets a gradient
    rates = [1e-2, 5e-3, 0.0]
    runs = []
    for capturable in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = AdamWeightDecay([{"params": params[:1], "weight_decay": 0.01},
                               {"params": params[1:2], "weight_decay": 0.0, "lr_scale": 0.5},
                               {"params": params[2:], "weight_decay": 0.0}], lr=1.0)  # a group without gradients
        lr = torch.zeros(())
        for rate, step_grads in zip(rates, grads):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            if capturable:
                lr.fill_(rate)
                opt.capturable_step(lr)
                opt.count_steps()
            else:
                for group in opt.param_groups:
                    group["lr"] = rate
                opt.step()
        runs.append((params, opt.state_dict()["state"]))
    (ref, ref_state), (got, got_state) = runs
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    assert not torch.equal(got[0], start[0]) and torch.equal(got[2], start[2])
    assert {k: v["step"] for k, v in got_state.items()} == {k: v["step"] for k, v in ref_state.items()} == {0: 3, 1: 3}


def _run_steps(dtype, fused, steps=5):
    """Two groups (decayed with lr_scale, not decayed), one parameter without a gradient, `steps` updates."""
    torch.manual_seed(1)
    shapes = [(33, 17), (17,), (4, 5, 6), (3,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype) * 0.05) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt = AdamWeightDecay([{"params": params[:2], "weight_decay": 0.01, "lr_scale": 0.5},
                           {"params": params[2:], "weight_decay": 0.0}], lr=1e-3, fused=fused)
    paths = set()
    for _ in range(steps):
        for p in params[:3]:
            p.grad = torch.randn_like(p) * 1e-2
        paths |= {opt.update_path([p for p in g["params"] if p.grad is not None]) for g in opt.param_groups}
        opt.step()
    return params, start, opt, paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_cpu_update_matches_the_loop(dtype):
    """The fused kernel with its bias correction switched off computes the original update: within an ulp or two
    of the loop each step (fp32 and fp64), the same moments and step counts, and no bias correction (the first
    step of a bias-corrected Adam would move each weight by ~lr, ours by lr·0.1/√0.001 ≈ 3.2·lr)."""
    fused, start, fused_opt, fused_paths = _run_steps(dtype, fused=None)
    loop, _, loop_opt, loop_paths = _run_steps(dtype, fused=False)
    assert fused_paths == {"fused"} and loop_paths == {"loop"}
    tol = dict(rtol=1e-5, atol=1e-9) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-18)
    for a, b in zip(fused, loop):
        assert torch.allclose(a, b, **tol)
    assert not torch.equal(fused[0], start[0]) and torch.equal(fused[3], start[3])
    fused_state, loop_state = fused_opt.state_dict()["state"], loop_opt.state_dict()["state"]
    assert fused_state.keys() == loop_state.keys() and len(fused_state) == 3
    for k in fused_state:
        assert fused_state[k]["step"] == loop_state[k]["step"] == 5
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(fused_state[k][moment], loop_state[k][moment], **tol)


def test_fused_first_step_has_no_bias_correction():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = AdamWeightDecay([{"params": [w], "weight_decay": 0.0}], lr=1e-3)
    w.grad = torch.full((4,), 0.5)
    assert opt.update_path([w]) == "fused"
    opt.step()
    # m = 0.05, v = 0.00025: u = 0.05 / (0.0158114 + 1e-6) = 3.16208; bias-corrected Adam would give 1.0.
    assert torch.allclose(w.detach(), torch.full((4,), -1e-3 * 0.05 / (math.sqrt(0.00025) + 1e-6)), rtol=1e-6)


def test_fused_and_loop_checkpoints_are_interchangeable():
    """A state dict written by one path resumes on the other and gives the same next step."""
    params, _, opt, _ = _run_steps(torch.float64, fused=None, steps=2)
    saved, saved_params = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) * 1e-2 for p in params[:3]]
    after = []
    for fused in (True, False):
        ps = [torch.nn.Parameter(t.clone()) for t in saved_params]
        o = AdamWeightDecay([{"params": ps[:2], "weight_decay": 0.01, "lr_scale": 0.5},
                             {"params": ps[2:], "weight_decay": 0.0}], lr=1e-3, fused=fused)
        o.load_state_dict(copy.deepcopy(saved))  # (loading shares the tensors, and the step updates them in place)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
        assert o.state_dict()["state"][0]["step"] == 3
        after.append(ps)
    for a, b in zip(*after):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-18)


def test_fused_is_skipped_where_the_kernel_does_not_apply():
    w = torch.nn.Parameter(torch.zeros(3, 4))
    w.grad = torch.ones(4, 3).t()  # a non-contiguous gradient
    opt = AdamWeightDecay([w], lr=1e-3)
    assert opt.update_path([w]) == "loop"
    opt.step()  # the loop handles it
    assert (w.detach() < 0).all()
    half = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    half.grad = torch.ones(3, dtype=torch.bfloat16)
    assert AdamWeightDecay([half], lr=1e-3).update_path([half]) == "loop"
    with pytest.raises(ConvBertError, match="fused=True"):
        AdamWeightDecay([w], lr=1e-3, fused=True).update_path([w])
    w.grad = torch.ones(3, 4)
    assert AdamWeightDecay([w], lr=1e-3, foreach=True, fused=True).update_path([w]) == "foreach"
    strided_moment = torch.zeros(4, 3).t()  # e.g. from an unusual state dict
    assert AdamWeightDecay([w], lr=1e-3).update_path([w], [w.grad], [strided_moment], [torch.zeros(3, 4)]) == "loop"
    assert AdamWeightDecay([w], lr=1e-3).update_path([w], [w.grad], [torch.zeros(3, 4)], [torch.zeros(3, 4)]) == "fused"


def test_without_a_fused_cpu_kernel_the_loop_runs(monkeypatch):
    """torch 2.3 (allowed by the package metadata) has the fused op for CUDA only."""
    import convbert.optim as optim

    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    assert AdamWeightDecay([w], lr=1e-3).update_path([w]) == "fused"
    monkeypatch.setattr(optim, "_FUSED_ON_CPU", False)
    opt = AdamWeightDecay([w], lr=1e-3)
    assert opt.update_path([w]) == "loop"
    opt.step()
    assert (w.detach() < 0).all()
