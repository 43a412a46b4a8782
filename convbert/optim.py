"""The original ELECTRA/ConvBERT optimiser and learning-rate schedule (spec §3.7, §5.3).

* `AdamWeightDecay`: Adam with beta 0.9/0.999, eps 1e-6 and **no bias correction**; decoupled weight decay is added
  to the update before the learning-rate multiply. Each parameter group may carry `lr_scale` (layer-wise decay).
  Three interchangeable update paths: PyTorch's fused single-pass kernel on the CPU, multi-tensor kernels on GPUs,
  a per-parameter loop otherwise (`update_path` says which a parameter list gets).
* `param_groups`: splits a model's parameters into decayed / not-decayed groups (names containing `LayerNorm`,
  `layer_norm` or `bias` are not decayed), optionally with a per-parameter `lr_scale`.
* `linear_warmup_decay`: the factor on the peak learning rate at a step (linear decay from step 0, times the warmup
  ramp).
* `layerwise_lr_scale`: the original layer-wise multipliers for HF-layout parameter names (top layer 0.8², head 1).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable

import torch

from convbert.errors import ConvBertError

NO_DECAY_KEYS = ("LayerNorm", "layer_norm", "bias")


class AdamWeightDecay(torch.optim.Optimizer):
    """Adam without bias correction plus decoupled weight decay (the TF `AdamWeightDecayOptimizer`).

    Per parameter:  m = b1·m + (1−b1)·g;  v = b2·v + (1−b2)·g²;  u = m / (√v + eps) (+ wd·p if the group's
    weight_decay > 0);  p ← p − lr·lr_scale·u.  `lr` is the group's current learning rate (a scheduler may set it);
    `lr_scale` (default 1.0) is a fixed per-group multiplier.  State (`exp_avg`, `exp_avg_sq`, `step`) is saved by
    `state_dict()` like any torch optimiser, the same whichever update path wrote it.

    `fused` (default: on where it applies, dense contiguous fp32/fp64 CPU tensors) runs the update as PyTorch's fused
    AdamW kernel, one pass over each parameter, gradient and pair of moments instead of the loop's ~9: 3.4× faster on
    a Zen 5 CPU (the medium-small pre-training model's 18.5M parameters: 14 ms against 49 ms;
    `benchmarks/optimizer_step.py`). That kernel applies Adam's bias correction 1 − βᵗ; it is given t = ∞, where the
    correction is exactly 1, so it computes this optimiser's update (within an ulp or two per step: it decays the
    weights as p·(1 − lr·wd) before the step, where the original adds lr·wd·p to the update). `fused=True` raises
    where it cannot apply. `foreach=True` picks the multi-tensor kernels over both; by default they update CUDA
    tensors.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if lr < 0.0:
            raise ConvBertError(f"learning rate must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConvBertError(f"Adam betas must lie in [0, 1), got {betas}")
        if eps < 0.0:
            raise ConvBertError(f"Adam eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            raise ConvBertError(f"weight decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lr_scale=1.0)
        super().__init__(params, defaults)
        self.foreach = foreach
        self.fused = fused
        self._multi_tensor_update = _foreach_update

    def compile_update(self) -> None:
        """Run the multi-tensor update through `torch.compile` (what `convbert pretrain --compile` does on GPUs):
        Inductor fuses its ~9 multi-tensor ops, each a full pass over every parameter and moment, into a few
        kernels. One graph per parameter group; within an ulp or so of the eager update (fused multiply-adds)."""
        self._multi_tensor_update = torch.compile(_foreach_update)

    def _use_foreach(self, params: list[torch.Tensor]) -> bool:
        """Multi-tensor kernels by default on GPUs, where a per-parameter loop is ~7 kernel launches per tensor
        (thousands per step for the generator + discriminator); on the CPU the loop is as fast."""
        if self.foreach is not None:
            return self.foreach
        return bool(params) and all(p.device.type == "cuda" for p in params)

    def update_path(self, params: list[torch.Tensor], grads: list[torch.Tensor] | None = None,
                    *moments: list[torch.Tensor]) -> str:
        """Which kernels update these parameters (given their gradients, else `.grad`, and optionally their moment
        lists): "foreach", "fused" or "loop"."""
        if self.foreach:
            return "foreach"
        grads = grads if grads is not None else [p.grad for p in params]
        if self.fused is not False and _fusable(params, grads, *moments):
            return "fused"
        if self.fused:
            raise ConvBertError("AdamWeightDecay(fused=True) needs dense, contiguous float32/float64 CPU parameters, "
                                "gradients and moments of one dtype, and a PyTorch with the fused AdamW kernel (2.4 or later)")
        return "foreach" if self._use_foreach(params) else "loop"

    def _gather(self, group: dict, count: bool) -> tuple[list, list, list, list]:
        """The group's parameters that have a gradient, with their moments (created at zero on first use)."""
        params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ConvBertError("AdamWeightDecay does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if count:
                state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        return params, grads, exp_avgs, exp_avg_sqs

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient (groups without one are skipped); returns the
        closure's loss, if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            tensors = self._gather(group, count=True)
            if not tensors[0]:  # (multi-tensor ops refuse empty lists)
                continue
            path = self.update_path(*tensors)
            update = {"foreach": self._multi_tensor_update, "fused": _fused_update, "loop": _update}[path]
            update(*tensors, beta1, beta2, group["eps"], group["weight_decay"], group["lr"] * group.get("lr_scale", 1.0))
        return loss

    @torch.no_grad()
    def capturable_step(self, lr: torch.Tensor) -> None:
        """`step()` with the learning rate read from a 0-dim tensor on the parameters' device, for a CUDA graph.

        A graph replays its kernels with the scalars they were captured with, so the scheduled rate must live in
        device memory (`lr.fill_(value)` before each replay). Multi-tensor kernels only, and no host-side effect
        that a replay would skip except the step counters, which `count_steps()` advances instead.
        """
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            tensors = self._gather(group, count=False)
            if tensors[0]:  # multi-tensor ops refuse empty lists
                step_size = lr * group.get("lr_scale", 1.0)
                self._multi_tensor_update(*tensors, beta1, beta2, group["eps"], group["weight_decay"], step_size)

    def count_steps(self) -> None:
        """Advance the per-parameter step counters as `step()` does (they are saved in checkpoints)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and self.state[p]:
                    self.state[p]["step"] += 1


def _update(params, grads, exp_avgs, exp_avg_sqs, beta1, beta2, eps, wd, step_size) -> None:
    for p, grad, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        update = m / (v.sqrt() + eps)
        if wd > 0.0:
            update.add_(p, alpha=wd)
        p.add_(update, alpha=-step_size)


_FUSED_DTYPES = (torch.float32, torch.float64)
# The fused AdamW op has a CPU kernel since torch 2.4 (on 2.3 it exists for CUDA only).
_FUSED_ON_CPU = hasattr(torch, "_fused_adamw_") and torch.__version__ >= "2.4"


def _fusable(params: list[torch.Tensor], *companions: list[torch.Tensor | None]) -> bool:
    """Whether PyTorch's fused CPU AdamW kernel takes these tensors as they are (the cases tested here): the
    parameters and their companions (gradients, moments) all dense, contiguous CPU tensors of one fp32/fp64 dtype."""
    if not params or not _FUSED_ON_CPU or params[0].dtype not in _FUSED_DTYPES:
        return False
    dtype = params[0].dtype
    return all(t is not None and t.device.type == "cpu" and t.layout == torch.strided and t.dtype == dtype
               and t.is_contiguous() for tensors in (params, *companions) for t in tensors)


def _fused_update(params, grads, exp_avgs, exp_avg_sqs, beta1, beta2, eps, wd, step_size) -> None:
    """`_update` as PyTorch's fused AdamW kernel, its bias correction switched off by a step count of infinity
    (1 − β^∞ = 1 exactly)."""
    never_corrected = [torch.full((), math.inf)] * len(params)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], never_corrected, lr=float(step_size), beta1=beta1,
                        beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)


def _foreach_update(params, grads, exp_avgs, exp_avg_sqs, beta1, beta2, eps, wd, step_size) -> None:
    """`_update` with multi-tensor kernels: the same operations in the same order, so the same bits (for a float
    `step_size`; a tensor one multiplies first, then adds: within an ulp of the update)."""
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    if wd > 0.0:
        torch._foreach_add_(updates, params, alpha=wd)
    if isinstance(step_size, torch.Tensor):  # a device-resident rate (`capturable_step`)
        torch._foreach_mul_(updates, -step_size)
        torch._foreach_add_(params, updates)
    else:
        torch._foreach_add_(params, updates, alpha=-step_size)


def _decays(name: str) -> bool:
    return not any(key in name for key in NO_DECAY_KEYS)


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr_scale_fn: Callable[[str], float] | None = None,
) -> list[dict]:
    """Group `model`'s trainable parameters for `AdamWeightDecay`.

    One group per (decayed?, lr_scale) pair, in first-seen order. Groups carry `weight_decay` (0.0 for names with
    `LayerNorm`, `layer_norm` or `bias`), `lr_scale` (from `lr_scale_fn(name)`, else 1.0) and `param_names`.
    """
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = _decays(name)
        scale = float(lr_scale_fn(name)) if lr_scale_fn is not None else 1.0
        key = (decay, scale)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": float(weight_decay) if decay else 0.0,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def linear_warmup_decay(step: int, total_steps: int, warmup_steps: float) -> float:
    """Factor on the peak lr: (1 − step/total) clipped at 0, times min(1, step/warmup) (1 when warmup is 0)."""
    if total_steps <= 0:
        raise ConvBertError(f"total_steps must be positive, got {total_steps}")
    decay = max(0.0, 1.0 - float(step) / float(total_steps))
    warm = 1.0 if warmup_steps <= 0 else min(1.0, float(step) / float(warmup_steps))
    return decay * warm


_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.")
_HEAD_PREFIXES = ("classifier.", "head.", "task_specific.")


def layer_depth(name: str, num_layers: int) -> int:
    """Depth of an HF-layout parameter name: embeddings 0, encoder layer i → i+1, head → L+2."""
    bare = name[len("convbert."):] if name.startswith("convbert.") else name
    if bare.startswith("embeddings.") or bare.startswith("embeddings_project."):
        return 0
    m = _LAYER_RE.match(bare)
    if m:
        i = int(m.group(1))
        if i >= num_layers:
            raise ConvBertError(f"parameter {name!r}: layer index {i} out of range for {num_layers} layers")
        return i + 1
    if not name.startswith("convbert.") and bare.startswith(_HEAD_PREFIXES):
        return num_layers + 2
    raise ConvBertError(
        f"parameter {name!r} matches no layer-wise lr key (expected embeddings.*, embeddings_project.*, "
        "encoder.layer.<i>.*, or a head classifier.*/head.*)"
    )


def layerwise_lr_scale(name: str, num_layers: int, decay: float = 0.8) -> float:
    """Original multiplier decay^(L + 2 − depth): embeddings decay^(L+2), layer i decay^(L+1−i), head 1.0.

    The top encoder layer gets decay², not decay¹, because no parameter has depth L+1 (inherited from ELECTRA).
    """
    depth = layer_depth(name, num_layers)
    return float(math.pow(decay, num_layers + 2 - depth))
