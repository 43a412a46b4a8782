"""The whole pre-training step as two CUDA graphs (`convbert pretrain --cuda-graphs`).

Why: on a GPU the eager step of these small models is bound by launching kernels, not by arithmetic. An H200 spent
~92 ms on a medium-small step of ~8,000 ATen ops (~5,300 now), for ~2 ms of maths (docs/performance.md). A CUDA
graph replays every kernel of a step with one call from the host.

Two graphs, so that the host can still skip a step whose loss is not finite (the eager trainer's rule):

* `compute`: generator, sampling and discriminator under autocast, the losses, backward into the gradients (the
  capture allocates them, so each replay overwrites them: nothing to zero), and the micro-batch's statistics
  [loss, generator loss, discriminator loss, tokens] into one static tensor;
* `update`: global-norm clipping and `AdamWeightDecay.capturable_step`, the learning rate read from a device tensor.

With gradient accumulation over n micro-batches, three small graphs sum the gradients in the order the eager
backward does (g1, then + g2, ...): `keep` copies the first micro-batch's into a buffer, `add` adds the middle ones,
`finish` adds the buffer to the last one's. Between compute and update the host reads the statistics (one
synchronisation per micro-batch, as in the eager step). Each batch is copied into
static buffers before the replay. Capture needs warm-up runs first (cuBLAS workspaces, cuDNN plans, Triton
compilation, the optimiser's moments); their effect on the weights, the moments and the random generators is undone,
so a graphed run starts from the same state as an eager one and resumes exactly.

A graph cannot read a tensor on the host, change shapes, or see a Python value that changes between steps.
`RecordedOps` replays a step's ATen ops on the CPU under the same rules, so the tests check all of this without a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from convbert.errors import ConvBertError
from convbert.optim import AdamWeightDecay
from convbert.precision import autocast
from convbert.pretrain.masking import MaskedBatch


class CudaGraph:
    """`torch.cuda.CUDAGraph` behind the small interface `GraphedTrainStep` uses."""

    def __init__(self, pool=None) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def register_generator(self, generator: torch.Generator) -> None:
        """Let the graph draw from `generator` (not the device's default one) and advance it on every replay."""
        if not hasattr(self.graph, "register_generator_state"):
            raise ConvBertError(
                f"--cuda-graphs needs a PyTorch whose CUDA graphs accept other generators than the default one "
                f"(CUDAGraph.register_generator_state; this is torch {torch.__version__}): upgrade torch, or drop "
                "--cuda-graphs"
            )
        self.graph.register_generator_state(generator)

    def capture(self):
        # thread_local: only this thread's CUDA calls are checked, so other threads' (a monitor's, say) cannot
        # break the capture
        return torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local")

    def replay(self) -> None:
        self.graph.replay()


class RecordedOps:
    """A CPU stand-in for a CUDA graph: records the ATen ops run under `capture()` and replays them into the same
    tensors, as a graph replays its kernels into the same memory. Random ops draw anew from their generators on each
    replay, as a graph's do. Reading a tensor on the host during capture raises, as it does under a real capture.
    It cannot replay torch.compile'd code (Inductor's CPU kernels are C++, not ATen ops): `GraphedTrainStep` refuses
    that combination."""

    def __init__(self, pool=None) -> None:
        self.ops: list[tuple] = []

    def register_generator(self, generator: torch.Generator) -> None:
        pass

    def capture(self):
        return _Recorder(self.ops)

    def replay(self) -> None:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for func, args, kwargs, outputs in self.ops:
                for old, new in zip(outputs, pytree.tree_leaves(func(*args, **kwargs))):
                    if isinstance(old, torch.Tensor) and not _same_memory(old, new):
                        old.copy_(new)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset()
            and a.stride() == b.stride())


# Ops that need a tensor's values on the host: a value read (.item(), float(t), bool(t)) or an output whose shape
# depends on the data. A CUDA graph can do neither.
_HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in _HOST_READS:
            raise ConvBertError(
                f"the captured step reads a tensor's value on the host ({func.overloadpacket.__name__}: .item(), "
                "float(t), bool(t) or a data-dependent shape); a CUDA graph cannot: keep that value on the device"
            )
        result = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, pytree.tree_leaves(result)))
        return result


class GraphedTrainStep:
    """The forward/backward (`compute`) and clip/optimiser (`update`) halves of a training step, each captured once
    at the first call and replayed after."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: AdamWeightDecay,
        *,
        precision: str,
        max_grad_norm: float,
        sample_generator: torch.Generator | None,
        accumulation: int = 1,
        graph_type: type = CudaGraph,
        warmup: int = 2,
    ) -> None:
        if not hasattr(optimizer, "capturable_step"):
            raise ConvBertError("--cuda-graphs needs the AdamWeightDecay optimiser (its capturable_step)")
        if graph_type is RecordedOps and any(getattr(m, "_compiled_call_impl", None) for m in model.modules()):
            raise ConvBertError("RecordedOps cannot replay torch.compile'd modules (their CPU kernels are not ATen ops)")
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        self.sample_generator = sample_generator
        self.accumulation = accumulation
        self.graph_type = graph_type
        self.warmup = warmup
        self.device = next(model.parameters()).device
        # Tensors the graphs read or write: allocated outside them, so they never share the graphs' memory pool.
        self.lr = torch.zeros((), device=self.device)
        self.stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.batch: MaskedBatch | None = None
        self.graphs: dict | None = None
        self.summed: list[torch.Tensor] = []  # the accumulated gradients (accumulation > 1)

    # -- what the host calls each step ------------------------------------------------------------------------------
    def compute(self, batch: MaskedBatch, micro: int = 0) -> torch.Tensor:
        """Forward and backward on micro-batch `micro` of the step (host or device tensors); returns its
        [loss, gen, disc, tokens] (float64, the loss not divided by the accumulation)."""
        if self.graphs is None:
            try:
                self._capture(batch)
            except RuntimeError as err:  # an op that cannot be captured, or a CUDA error during capture
                raise ConvBertError(
                    f"--cuda-graphs: capturing the training step failed ({type(err).__name__}: {err}); run without "
                    "--cuda-graphs (eager), and please report it with your torch and CUDA versions"
                ) from err
        for name, value in batch.__dict__.items():
            getattr(self.batch, name).copy_(value, non_blocking=True)
        self.graphs["compute"].replay()
        if self.accumulation > 1:
            self.graphs[self._summing(micro)].replay()
        return self.stats

    def update(self, lr: float) -> torch.Tensor:
        """Clip the gradients of the last `compute` and take the optimiser step at `lr`; returns the global norm."""
        self.lr.fill_(lr)
        self.graphs["update"].replay()
        self.optimizer.count_steps()
        return self.grad_norm

    # -- the two halves, as captured ---------------------------------------------------------------------------------
    def _forward_backward(self) -> None:
        batch = self.batch
        with autocast(self.precision, self.device, cache=False):
            out = self.model(batch, sample_generator=self.sample_generator)
        (out.loss / self.accumulation if self.accumulation > 1 else out.loss).backward()
        parts = [out.loss.detach(), out.gen_loss.detach(), out.disc_loss.detach(), batch.input_mask.sum()]
        self.stats.copy_(torch.stack([t.to(torch.float64) for t in parts]))

    def _summing(self, micro: int) -> str:
        return "keep" if micro == 0 else "finish" if micro == self.accumulation - 1 else "add"

    def _sum_gradients(self, which: str) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if which == "keep":
            torch._foreach_copy_(self.summed, grads)
        elif which == "add":
            torch._foreach_add_(self.summed, grads)
        else:
            torch._foreach_add_(grads, self.summed)

    def _clip_and_step(self) -> None:
        self.grad_norm.copy_(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        self.optimizer.capturable_step(self.lr)

    # -- capture -----------------------------------------------------------------------------------------------------
    def _capture(self, batch: MaskedBatch) -> None:
        self.batch = MaskedBatch(**{k: v.to(self.device, copy=True) for k, v in batch.__dict__.items()})
        saved = self._save_state()
        summing = [self._summing(micro) for micro in range(self.accumulation)] if self.accumulation > 1 else []
        with self._side_stream():
            for _ in range(self.warmup):  # at lr 0; the moments and generators are restored below
                for which in summing or [None]:
                    self._forward_backward()
                    if which is not None:
                        if not self.summed:
                            self.summed = [torch.empty_like(p) for p in self.model.parameters() if p.grad is not None]
                        self._sum_gradients(which)
                self._clip_and_step()
                self.model.zero_grad(set_to_none=True)
        pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        graphs = {name: self.graph_type(pool) for name in ("compute", *dict.fromkeys(summing), "update")}
        if self.sample_generator is not None and self.sample_generator.device.type == "cuda":
            graphs["compute"].register_generator(self.sample_generator)
        for name, graph in graphs.items():
            with graph.capture():
                if name == "compute":
                    self._forward_backward()
                elif name == "update":
                    self._clip_and_step()
                else:
                    self._sum_gradients(name)
        self._restore_state(saved)
        self.graphs = graphs

    def _optimizer_state(self) -> Iterator[dict]:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if state:
                    yield state

    def _save_state(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "params": [p.detach().clone() for p in self.model.parameters()],
            "moments": {id(s): (s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["step"]) for s in self._optimizer_state()},
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            "sample_rng": self.sample_generator.get_state() if self.sample_generator is not None else None,
        }

    @torch.no_grad()
    def _restore_state(self, saved: dict) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for p, value in zip(self.model.parameters(), saved["params"]):
            p.copy_(value)
        for state in self._optimizer_state():  # in place: the update graph holds these tensors
            if id(state) in saved["moments"]:
                m, v, step = saved["moments"][id(state)]
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                state["step"] = step
            else:  # created by the warm-up: as if never used
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()
                state["step"] = 0
        torch.set_rng_state(saved["cpu_rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        if saved["sample_rng"] is not None:
            self.sample_generator.set_state(saved["sample_rng"])

    @contextlib.contextmanager
    def _side_stream(self):
        """Warm up off the main stream on a GPU, as capture requires; nothing on the CPU."""
        if self.device.type != "cuda":
            yield
            return
        main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            yield
        main.wait_stream(side)
