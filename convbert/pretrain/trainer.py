"""The pre-training loop: CPU, one GPU or torchrun DDP; autocast; gradient accumulation; exact resume.

One optimisation step = `grad_accum` micro-batches on every rank; the global batch `batch_size` is split evenly over
ranks and micro-steps. Per micro-batch: dynamic masking on the host with a dedicated generator (checkpointed),
forward under autocast (sampling and losses in fp32), backward (DDP all-reduces on the last micro-step). Then: skip
the step if the loss is not finite on any rank, unscale (fp16), clip the global norm, set the scheduled learning rate
(linear decay from step 0 × linear warmup, spec §3.7) and step `AdamWeightDecay`. With `--cuda-graphs` (one GPU) the
same step replays CUDA graphs captured at the first step (`convbert/pretrain/cuda_graph.py`).

Only rank 0 writes (checkpoints, logs, evaluation); every rank reads the checkpoint on resume and restores its own
RNG states and data cursor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from convbert.errors import ConvBertError
from convbert.precision import allow_tf32_under_autocast, autocast, fp16_note
from convbert.pretrain import checkpoint as ckpt_io
from convbert.pretrain.config import (
    COMPILE_MODES_WITH_CUDA_GRAPHS, SIZE_DEFAULTS, PretrainConfig, config_from_dict, load_json, save_config,
)
from convbert.pretrain.data import (
    DataBundle,
    InfiniteLoader,
    LoaderFactory,
    data_fingerprint,
    default_loader_factory,
    open_data,
    recorded_vocab,
    sequential_batches,
    tokenizer_settings,
)
from convbert.pretrain.evaluate import evaluate
from convbert.pretrain.logging import LOG_FILE, PLOT_FILE, NullLogger, RunLogger, read_log
from convbert.pretrain.masking import MaskedBatch, mask_batch, num_predictions
from convbert.pretrain.model import ElectraPretrainingModel
from convbert.utils import refuse_foreign_folder, remove_stale_temporaries

RUN_CONFIG = "run_config.json"
# Keys that must not change when a run is resumed (they change the model or the objective).
# Settings a resumed run cannot change. The seed too: the data order and the masking come back from the checkpoint
# whatever it says, while the held-out masks would follow the new one (the records would no longer be comparable).
FROZEN_KEYS = ("size", "objective", "attention", "generator_fraction", "model", "masking", "max_seq_length", "seed")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_pref: str = "auto") -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; init NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConvBertError("--device cuda: no CUDA device is available")
    if use_cuda:
        device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    info = DistInfo(rank, world, local, device)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise ConvBertError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        info.initialized_here = True
    return info


def _min_holdout(run_dir: Path) -> int:
    """1, or 0 for a run recorded before a dataset under 50 examples held one out (its run_config.json has no
    held-out examples, or no record of them): resuming it keeps the split it trained on."""
    try:
        recorded = json.loads((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 1
    if not isinstance(recorded, dict) or not (run_dir / "checkpoints").is_dir():
        return 1
    return 0 if not recorded.get("eval_holdout_examples") else 1


def _autocast_factory(precision: str, device: torch.device):
    if precision == "fp32":
        return None
    return functools.partial(autocast, precision, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_model_config(cfg: PretrainConfig, vocab_size: int, max_seq_length: int, pad_id: int = 0, init=None):
    """The discriminator's configuration: the size's preset with `--set model.*`, or the `--init-from` folder's
    architecture with the non-architecture overrides."""
    from convbert.model.config import ConvBertConfig

    overrides = dict(cfg.model)
    if overrides.get("attention_type", cfg.attention) != cfg.attention:
        raise ConvBertError(f"model.attention_type = {overrides['attention_type']!r}: the attention is chosen with "
                            f"--attention (mixed or plain; now {cfg.attention!r}), which sets it for both networks")
    overrides.setdefault("pad_token_id", pad_id)  # recorded in the exported config.json (the [PAD] row is trained)
    if init is not None:
        from convbert.pretrain.init import model_config

        return model_config(init, overrides, cfg.attention, max_seq_length, vocab_size)
    if "vocab_size" in overrides and int(overrides["vocab_size"]) < vocab_size:
        raise ConvBertError(
            f"model.vocab_size = {overrides['vocab_size']} is smaller than the data's vocab ({vocab_size} entries)"
        )
    overrides.setdefault("vocab_size", vocab_size)
    overrides["attention_type"] = cfg.attention
    try:
        config = ConvBertConfig.from_preset(cfg.size, **overrides)
    except TypeError as err:
        raise ConvBertError(f"model overrides: {err}") from None
    if config.max_position_embeddings < max_seq_length:
        raise ConvBertError(
            f"sequences are {max_seq_length} long but model.max_position_embeddings is "
            f"{config.max_position_embeddings}; raise it with --set model.max_position_embeddings={max_seq_length}"
        )
    config.validate()
    return config


class Trainer:
    """Build everything from a resolved `PretrainConfig` and run it (`run()`)."""

    def __init__(
        self,
        cfg: PretrainConfig,
        *,
        data: DataBundle | None = None,
        loader_factory: LoaderFactory | None = None,
        dist_info: DistInfo | None = None,
        resume: bool | None = None,
        progress: bool = True,
        log: Any = None,
        graph_type: type | None = None,
    ) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_path = Path(cfg.output)
        if out_path.exists() and not out_path.is_dir():
            raise ConvBertError(f"--output {out_path}: exists and is not a folder")
        if out_path.is_dir() and out_path.resolve() == Path(cfg.data).resolve():
            raise ConvBertError(f"--output {out_path}: is the --data folder; write the run to a folder of its own")
        refuse_foreign_folder(out_path, (RUN_CONFIG, "checkpoints"), "a `convbert pretrain` run")
        self.dist = dist_info or setup_distributed(cfg.device)
        self.device = self.dist.device
        self.autocast = _autocast_factory(cfg.precision, self.device)
        allow_tf32_under_autocast(cfg.precision, self.device)  # the fp32 MLM head on tensor cores
        self.data = data or open_data(cfg.data, cfg.eval_data, cfg.max_seq_length, vocab=cfg.vocab,
                                      eval_examples=cfg.eval_batches * cfg.eval_batch_size,
                                      # the loader's batch: micro-batch x ranks (one accumulation step)
                                      min_train=max(1, cfg.batch_size // max(1, cfg.grad_accum)),
                                      min_holdout=_min_holdout(out_path))
        self.loader_factory = loader_factory or default_loader_factory
        self.resume_flag = resume
        self.progress = progress
        self._signals: StopSignals | None = None  # set while run() trains
        self.eval_interrupted = False  # a held-out evaluation stopped by a signal (not logged)
        self.out = Path(cfg.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.print = log or (lambda text: print(text, file=sys.stderr, flush=True))

        world = self.dist.world_size
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ConvBertError(
                f"batch size {cfg.batch_size} does not split over {world} rank(s) × {cfg.grad_accum} accumulation "
                f"step(s); choose a multiple of {world * cfg.grad_accum}"
            )
        self.micro_batch = cfg.batch_size // (world * cfg.grad_accum)
        self.max_grad_norm = cfg.max_grad_norm or float("inf")  # 0 switches clipping off
        self.T = self.data.max_seq_length
        if cfg.max_seq_length is None:
            cfg.max_seq_length = self.T
        self.n_pred = num_predictions(self.T, cfg.mask_prob)
        # (a run started from --init-from resumes with its recorded model, whether or not the flag is repeated)
        self.init, recorded = self._init_weights() if cfg.init_from or self._started_from_init() else (None, None)
        if recorded is not None:  # resuming a run that started from --init-from
            from convbert.model.config import ConvBertConfig

            self.model_config = ConvBertConfig.from_dict(recorded, source=f"{self.out / RUN_CONFIG} model_config")
        else:
            self.model_config = build_model_config(cfg, self.data.vocab_size, self.T, self.data.special.pad,
                                                   self.init)

        # Identical initial weights on every rank: seed, build, then give each rank its own streams.
        seed_everything(cfg.seed)
        self.model = ElectraPretrainingModel(
            self.model_config, cfg.generator_fraction, cfg.objective, cfg.gen_weight, cfg.disc_weight,
            cfg.temperature,
        )
        if self.init is not None:
            from convbert.pretrain.init import check_generator, load_into

            if self.model.generator_config is not None:
                check_generator(self.init, self.model.generator_config)
            fresh = load_into(self.model, self.init, f"--init-from {cfg.init_from}")
            if self.dist.rank == 0:
                self.print(f"init: weights from {cfg.init_from}")
                for what in fresh:
                    self.print(f"init: {what} starts from scratch")
        self.model.to(self.device)
        seed_everything(cfg.seed + 1 + 1000 * self.dist.rank)
        self.mask_gen = torch.Generator(device="cpu")
        self.mask_gen.manual_seed(cfg.seed * 7919 + 17 + self.dist.rank)
        self.sample_gen = torch.Generator(device=self.device)
        self.sample_gen.manual_seed(cfg.seed * 104729 + 29 + self.dist.rank)

        from convbert.optim import AdamWeightDecay, param_groups

        self.optimizer = AdamWeightDecay(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
        )
        self.scaler = None
        if cfg.precision == "fp16":  # fp16's range needs loss scaling (bf16 has fp32's range and does not)
            self.scaler = torch.amp.GradScaler(self.device.type)
        if cfg.compile:  # the encoders, heads, losses and sampler, in place (parameter names unchanged)
            self.model.compile_pieces(mode=cfg.compile_mode)
            self.optimizer.compile_update()  # the multi-tensor update (GPUs; the CPU runs the per-tensor loop)
        self.graphed = self._graphed_step(graph_type) if cfg.cuda_graphs else None
        self._prefetched: tuple | None = None  # (batch, loader state and masking state before it): --cuda-graphs
        self.train_model: torch.nn.Module = self.model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.model, device_ids=None)  # the model has no buffers to sync

        self.loader = InfiniteLoader(
            self.loader_factory(self.data.train, self.micro_batch, cfg.seed, self.dist.rank, world)
        )
        self.step = 0
        self.bad_in_row = 0
        self.bad_total = 0
        self.tokens_seen = 0
        self.logger = NullLogger()

    @functools.cached_property
    def vocab_sha256(self) -> str | None:
        """The data's vocab file hash (recorded, so `convbert export` can check the vocab it finds); the one the
        data's manifest records when the file was not found."""
        from convbert.utils import sha256_file

        if self.data.vocab_path:
            return sha256_file(self.data.vocab_path)
        return recorded_vocab(Path(self.cfg.data), self.data.manifest or {})[1]

    @property
    def vocab_file(self) -> str | None:
        """The vocab file used, else the path the data's manifest records (not found now; export looks there)."""
        if self.data.vocab_path:
            return str(self.data.vocab_path)
        return recorded_vocab(Path(self.cfg.data), self.data.manifest or {})[0]

    @functools.cached_property
    def data_fingerprint(self) -> str | None:
        """`pretrain.data.data_fingerprint` of --data, computed once (it is recorded with every checkpoint)."""
        return data_fingerprint(self.data)

    def _started_from_init(self) -> bool:
        """Whether this output holds checkpoints of a run that started from `--init-from`."""
        recorded = self.out / RUN_CONFIG
        if ckpt_io.latest_checkpoint(self.ckpt_dir) is None or not recorded.is_file():
            return False
        return bool((load_json(recorded).get("pretrain") or {}).get("init_from"))

    def _init_weights(self):
        """`--init-from`: (the folder's weights, None) for a new run; (None, the recorded model config) for a run
        that already has checkpoints: it resumes from them, whatever became of the folder."""
        from convbert.pretrain.init import read_init_weights

        cfg = self.cfg
        recorded = self.out / RUN_CONFIG
        if ckpt_io.latest_checkpoint(self.ckpt_dir) is not None and recorded.is_file():
            saved = load_json(recorded)
            if not isinstance(saved.get("model_config"), dict):
                raise ConvBertError(f"{recorded}: no model_config recorded; cannot resume this --init-from run")
            cfg.generator_fraction = saved.get("pretrain", {}).get("generator_fraction", cfg.generator_fraction)
            return None, saved["model_config"]
        init = read_init_weights(cfg.init_from, self.data.vocab_path)
        if init.generator_fraction is not None:
            chosen = abs(cfg.generator_fraction - SIZE_DEFAULTS[cfg.size]["generator_fraction"]) > 1e-9
            if chosen and abs(init.generator_fraction - cfg.generator_fraction) > 1e-9:
                self.print(f"note: generator_fraction {cfg.generator_fraction:g} is not used: the generator in "
                           f"{cfg.init_from} is continued as it is (fraction {init.generator_fraction:g})")
            cfg.generator_fraction = init.generator_fraction  # the folder's generator, not the size's rule
        return init, None

    def _graphed_step(self, graph_type: type | None):
        """`--cuda-graphs`: the step as CUDA graphs (`graph_type` lets the tests use the CPU stand-in)."""
        from convbert.pretrain.cuda_graph import CudaGraph, GraphedTrainStep

        cfg = self.cfg
        refusals = [
            (self.device.type != "cuda" and graph_type is None, "needs a GPU (--device cuda)"),
            (self.dist.distributed, "runs on one GPU, not under torchrun with several processes"),
            (cfg.precision == "fp16", "supports --precision fp32 or bf16 (fp16's loss scaling reads values on the host)"),
            (cfg.compile and cfg.compile_mode in COMPILE_MODES_WITH_CUDA_GRAPHS,
             f"cannot be combined with --compile-mode {cfg.compile_mode}, which captures CUDA graphs of its own: "
             f"use --compile-mode default or max-autotune-no-cudagraphs with --cuda-graphs, or leave --cuda-graphs "
             f"out"),
            (self.model_config.gradient_checkpointing, "cannot capture gradient checkpointing's recomputation"),
        ]
        for refused, why in refusals:
            if refused:
                raise ConvBertError(f"--cuda-graphs {why}")
        return GraphedTrainStep(
            self.model, self.optimizer, precision=cfg.precision, max_grad_norm=self.max_grad_norm,
            sample_generator=self.sample_gen, accumulation=cfg.grad_accum, graph_type=graph_type or CudaGraph,
        )

    # ---- masking -------------------------------------------------------------------------------------------------
    def mask(self, raw: dict, generator: torch.Generator) -> MaskedBatch:
        sp = self.data.special
        return mask_batch(
            raw["input_ids"], raw["input_mask"], raw["segment_ids"], cls_id=sp.cls, sep_id=sp.sep, mask_id=sp.mask,
            generator=generator, mask_prob=self.cfg.mask_prob, max_predictions=self.n_pred,
            with_replacement=self.cfg.masking == "with-replacement", mask_token_prob=self.cfg.mask_token_prob,
        )

    # ---- run config / resume -------------------------------------------------------------------------------------
    def resolved(self) -> dict:
        return {
            "pretrain": self.cfg.to_dict(),
            "cwd": os.getcwd(),  # what relative paths in "pretrain" are relative to (a resume may run elsewhere)
            "model_config": self.model_config.to_dict(),
            "generator_config": (
                self.model.generator_config.to_dict() if self.model.generator_config is not None else None
            ),
            "vocab_file": self.vocab_file,
            "vocab_sha256": self.vocab_sha256,
            "eval_holdout_examples": self.data.holdout,
            "eval_data_dir": str(self.data.eval_dir) if self.data.eval_dir is not None else None,
            "data_fingerprint": self.data_fingerprint,
            "tokenizer": tokenizer_settings(self.data),
            "vocab_size": self.data.vocab_size,
            "special_ids": self.data.special.__dict__,
            "max_predictions_per_seq": self.n_pred,
            "world_size": self.dist.world_size,
            "micro_batch_size": self.micro_batch,
            "device": str(self.device),
            "parameters": {
                "total": sum(p.numel() for p in self.model.parameters()),
                "discriminator": sum(p.numel() for p in self.model.discriminator.parameters()),
            },
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
        }

    def _check_compatible(self, saved: dict) -> list[str]:
        old = saved.get("pretrain", {})
        new = self.cfg.to_dict()
        changed = [k for k in FROZEN_KEYS if k in old and old[k] != new.get(k)]
        if changed:
            raise ConvBertError(
                f"{self.out}: the run was started with different {', '.join(changed)} "
                f"({'; '.join(f'{k} {old[k]!r}, now {new.get(k)!r}' for k in changed)}); resume with the same "
                "settings (a setting not given is the run's own) or choose a new --output"
            )
        was, now = saved.get("data_fingerprint"), self.data_fingerprint
        if was is not None and now is not None and was != now:
            raise ConvBertError(
                f"{self.out}: the run was started on other training data than --data {self.cfg.data} (data "
                f"fingerprint {was}, now {now}); resume it on the same data, or start a new --output from its "
                "weights (`convbert export`, then `convbert pretrain --init-from`)")
        held, holding = saved.get("eval_holdout_examples"), self.data.holdout
        if "eval_holdout_examples" in saved and held != holding:
            def split(n):
                return f"{n} held-out examples" if n else "no held-out examples (a separate --eval-data set, or none)"

            recorded_eval = saved.get("eval_data_dir")
            hint = "resume with the run's evaluation settings"
            if not held and recorded_eval and self.data.eval_dir is None:
                hint = (f"the run evaluated on {recorded_eval}, which is not there now: restore that folder, or "
                        "pass --eval-data with it")
            raise ConvBertError(
                f"{self.out}: the run trained on --data less {split(held)}, this invocation on --data less "
                f"{split(holding)} (--eval-batches x eval_batch_size and --eval-data decide it); {hint}")
        # Paths may move with the run (the fingerprint above follows the data); --stop-at-step is per invocation.
        # (--threads not given is 0, "torch's choice": no change to report; the thread count itself is checked
        # against the checkpoint's below)
        return [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k]
                and k not in ("stop_at_step", "time_limit", "output", "data", "eval_data", "vocab", "init_from")
                and not (k == "threads" and not new[k])]

    def maybe_resume(self) -> bool:
        try:
            return self._resume()
        except ConvBertError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
            latest = ckpt_io.latest_checkpoint(self.ckpt_dir)
            raise ConvBertError(
                f"{latest}: checkpoint is damaged ({type(err).__name__}: {err}); move that folder aside to resume "
                "from the checkpoint before it"
            ) from err

    def _resume(self) -> bool:
        latest = ckpt_io.latest_checkpoint(self.ckpt_dir)
        if latest is None:
            if self.resume_flag:
                raise ConvBertError(f"--resume: no checkpoint under {self.ckpt_dir}")
            return False
        if self.resume_flag is False:
            raise ConvBertError(f"{self.out} already holds checkpoints; choose a new --output or resume it")
        run_cfg = self.out / RUN_CONFIG
        changed = self._check_compatible(load_json(run_cfg)) if run_cfg.is_file() else []
        data = ckpt_io.load_checkpoint(latest)
        state = data["state"]
        ckpt_io.load_model_tensors(self.model, data["model"], state.get("model_aliases", {}), str(latest))
        opt_state = ckpt_io.unflatten_optimizer_state(data["optimizer_tensors"], state["optimizer"])
        try:
            self.optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError) as err:
            raise ConvBertError(f"{latest}: optimiser state does not match the model ({err})") from None
        for s in self.optimizer.state.values():
            for k, v in list(s.items()):
                if torch.is_tensor(v):
                    s[k] = v.to(self.device)
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        self.bad_in_row = int(state.get("bad_steps_in_row", 0))
        self.bad_total = int(state.get("bad_steps_total", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        same_world = int(state.get("world_size", 1)) == self.dist.world_size
        loaders = state.get("loader") or []
        rng = ckpt_io.rng_state_for_rank(data, self.dist.rank)
        if same_world and self.dist.rank < len(loaders) and rng is not None:
            self.loader.load_state_dict(loaders[self.dist.rank])
            ckpt_io.restore_rng(rng, self.mask_gen, self.sample_gen, self.device)
        else:
            if self.dist.is_main:
                self.print(
                    f"note: checkpoint written by {state.get('world_size')} rank(s), now {self.dist.world_size}: "
                    "the random streams (masking, sampling, dropout) restart; weights, optimiser, schedule and the "
                    "position in the data are restored"
                )
            if loaders:  # the position is global (every rank records the same one): each rank resumes from it
                self.loader.load_state_dict(loaders[0])
        if changed and self.dist.is_main:
            self.print(f"note: resuming with changed settings: {', '.join(changed)} (the new values apply)")
        threads_then, threads_now = state.get("cpu_threads"), torch.get_num_threads()
        if (self.device.type == "cpu" and threads_then and threads_then != threads_now and self.dist.is_main
                and same_world):  # (with another world size the random streams restart: no resume is bit-exact)
            # --threads is a machine setting, not resumed; the CPU kernels split their sums by thread count
            then = f"{threads_then} CPU thread{'s' * (threads_then != 1)}"
            self.print(f"note: this checkpoint was written with {then}, now {threads_now}: the losses will differ "
                       f"in the last bits from a run that did not stop (--threads {threads_then} resumes it bit "
                       "for bit)")
        if self.dist.is_main:
            self.print(f"resumed from {latest} (step {self.step})")
        return True

    def _copy_vocab(self) -> None:
        """Keep the data's vocab with the run, so `convbert export` finds it even if the data moves."""
        target = self.out / "vocab.txt"
        if self.data.vocab_path is None:
            if not target.is_file():
                where = f" ({self.vocab_file})" if self.vocab_file else ""
                self.print(
                    f"note: the vocab {self.cfg.data} was built with{where} was not found, or the file found there "
                    "has another sha256 than the one recorded (pass --vocab FILE); `convbert export` will need it "
                    "(there, in the run folder as vocab.txt, or at the path above; it checks the recorded sha256)"
                )
            return
        if target.is_file():
            return
        import shutil

        from convbert.utils import atomic_path

        with atomic_path(target) as tmp:
            shutil.copyfile(self.data.vocab_path, tmp)

    # ---- checkpoint ----------------------------------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        if not self.dist.distributed:
            return [obj]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, obj)
        return out

    def save(self) -> None:
        self._unfetch()
        rng = ckpt_io.capture_rng(self.mask_gen, self.sample_gen, self.device)
        rng_all = self._gather(rng)
        loaders = self._gather(self.loader.state_dict())
        if self.dist.is_main:
            ckpt_io.save_checkpoint(
                self.ckpt_dir, self.step, model=self.model, optimizer=self.optimizer, rng_states=rng_all,
                loader_states=loaders,
                trainer_state={
                    "total_steps": self.cfg.steps,
                    "lr_schedule": {"peak_lr": self.cfg.lr, "warmup_steps": self.cfg.warmup_steps,
                                    "total_steps": self.cfg.steps, "kind": "linear_warmup_decay"},
                    "bad_steps_in_row": self.bad_in_row,
                    "bad_steps_total": self.bad_total,
                    "tokens_seen": self.tokens_seen,
                    "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
                    "run_config": self.resolved(),
                },
            )
            ckpt_io.prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints, ckpt_io.milestone_steps(self.cfg.steps))
            self.logger.event(self.step, "checkpoint", path=str(self.ckpt_dir / ckpt_io.checkpoint_name(self.step)))
        if self.dist.distributed:
            dist.barrier()

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def _eval_missing_here(self) -> bool:
        """Whether the evaluation at this step was never logged: a finished run's final one (the process was
        killed after the last checkpoint), or a scheduled one a signal interrupted. Decided on the main rank, for
        every rank (the evaluation has a barrier)."""
        missing = False
        if self.dist.is_main and self.data.eval is not None and self.cfg.eval_batches > 0:
            records = read_log(self.out / LOG_FILE) if (self.out / LOG_FILE).is_file() else []
            missing = not any(r.get("kind") == "eval" and r.get("step") == self.step and not r.get("at_stop")
                              for r in records)  # (a time-limit stop's evaluation is not the final one)
        if self.dist.distributed:
            flag = torch.tensor([1.0 if missing else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            missing = bool(flag.item() > 0)
        return missing

    def _logged_eval(self) -> dict | None:
        """The last evaluation log.jsonl holds at or before this step (its metrics), if any."""
        path = self.out / LOG_FILE
        if not self.dist.is_main or not path.is_file():
            return None
        evals = [r for r in read_log(path) if r.get("kind") == "eval" and int(r.get("step", -1)) <= self.step]
        if not evals:
            return None
        return {k: v for k, v in evals[-1].items() if k not in ("kind", "step", "time", "at_stop")}

    def run_eval(self, at_stop: bool = False) -> dict | None:
        """Evaluate the held-out set (main rank). `at_stop`: an evaluation off the schedule at a time-limit stop,
        marked so in log.jsonl and dropped when the run resumes (an uninterrupted run has no such record)."""
        if self.data.eval is None or self.cfg.eval_batches == 0:
            return None
        result = None
        if self.dist.is_main:
            t0 = time.perf_counter()
            n = min(self.cfg.eval_batches, -(-len(self.data.eval) // self.cfg.eval_batch_size))
            examples = min(len(self.data.eval), self.cfg.eval_batches * self.cfg.eval_batch_size)
            batches = sequential_batches(self.data.eval, self.cfg.eval_batch_size, self.cfg.eval_batches)
            try:
                result = evaluate(
                    self.model, self.logger.eval_batches(self._unless_signalled(batches), n, examples),
                    self.mask, device=self.device, seed=self.cfg.seed + 99991, max_batches=self.cfg.eval_batches,
                    autocast=self.autocast,
                )
            except _EvalInterrupted:  # a scheduler allows ~30 s after SIGTERM: checkpoint first, evaluate later
                self.logger.message(f"held-out evaluation at step {self.step} interrupted "
                                    f"({self._signals.received}); it runs when the run continues")
                self.eval_interrupted = True
            else:
                result["eval_seconds"] = time.perf_counter() - t0
                self.logger.eval(self.step, {**result, "at_stop": True} if at_stop else result)
        if self.dist.distributed:
            dist.barrier()
        return result

    def _unless_signalled(self, batches):
        """The batches, until SIGINT/SIGTERM arrives (then `_EvalInterrupted`)."""
        for batch in batches:
            if self._signals is not None and self._signals.received is not None:
                raise _EvalInterrupted
            yield batch

    def _signalled(self) -> bool:
        """Whether any rank has received SIGINT/SIGTERM (every rank must call it: it is a collective)."""
        got = self._signals is not None and self._signals.received is not None
        if self.dist.distributed:
            flag = torch.tensor([float(got)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            got = bool(flag.item() > 0)
        return got

    # ---- one step ------------------------------------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One optimisation step; None when it was skipped for a non-finite loss."""
        if self.cfg.compile and self.cfg.compile_mode in COMPILE_MODES_WITH_CUDA_GRAPHS:
            torch.compiler.cudagraph_mark_step_begin()  # the encoders' graphs may overwrite last step's outputs
        if self.graphed is not None:
            return self._graphed_train_step()
        cfg = self.cfg
        model = self.train_model
        if not model.training:  # .train() walks all ~500 modules: ~1 ms of host time a step, were it called each step
            model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, gen, disc, tokens
        for micro in range(cfg.grad_accum):
            batch = self._next_batch()
            if self.device.type == "cuda":
                batch = batch.to(self.device, non_blocking=True)
            sync = contextlib.nullcontext()
            if self.dist.distributed and micro < cfg.grad_accum - 1:
                sync = model.no_sync()
            with sync:
                if self.autocast is not None:
                    with self.autocast():
                        out = model(batch, sample_generator=self.sample_gen)
                else:
                    out = model(batch, sample_generator=self.sample_gen)
                loss = out.loss / cfg.grad_accum
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            sums += torch.stack(
                [out.loss.detach(), out.gen_loss.detach(), out.disc_loss.detach(), batch.input_mask.sum()]
            ).to(torch.float64)
        finite = torch.isfinite(sums[:1]).to(torch.float64)
        if self.dist.distributed:
            packed = sums.clone()
            flags = finite.clone()
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            sums, finite = packed, flags
        stats = sums.cpu()
        if float(finite.cpu()[0]) < 1.0:
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip_non_finite()
        self.bad_in_row = 0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        lr = self._set_scheduled_lr()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._finish_step(stats, cfg.grad_accum * self.dist.world_size, lr, grad_norm)

    def _graphed_train_step(self) -> dict | None:
        """`train_step` replaying the captured graphs (one GPU: `_graphed_step` checked). While the GPU runs a
        micro-batch's forward and backward, the host masks the next batch (`save` puts it back)."""
        if not self.model.training:  # (the replays ignore it; the capture, in the first call, needs it)
            self.model.train()
        stats = torch.zeros(4, dtype=torch.float64)  # loss, gen, disc, tokens
        for micro in range(self.cfg.grad_accum):
            batch = self._prefetched[0] if self._prefetched is not None else self._next_batch()
            micro_stats = self.graphed.compute(batch, micro)
            before = self.loader.state_dict(), self.mask_gen.get_state()
            self._prefetched = (self._next_batch(), *before)
            stats += micro_stats.cpu()
        if not math.isfinite(float(stats[0])):
            return self._skip_non_finite()  # the next replay overwrites the gradients: nothing to zero
        self.bad_in_row = 0
        lr = self._set_scheduled_lr()  # (the graph reads its device copy; the groups keep it for the checkpoint)
        grad_norm = self.graphed.update(lr)
        return self._finish_step(stats, self.cfg.grad_accum, lr, grad_norm)

    def _unfetch(self) -> None:
        """Rewind the data cursor and the masking generator past a prefetched batch, so that a checkpoint written
        now resumes with it."""
        if self._prefetched is not None:
            _, loader_state, mask_state = self._prefetched
            self.loader.load_state_dict(loader_state)
            self.mask_gen.set_state(mask_state)
            self._prefetched = None

    def _next_batch(self) -> MaskedBatch:
        batch = self.mask(self.loader.next(), self.mask_gen)
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def _set_scheduled_lr(self) -> float:
        """This step's learning rate (spec §3.7), written into the optimiser's groups."""
        from convbert.optim import linear_warmup_decay

        lr = self.cfg.lr * linear_warmup_decay(self.step, self.cfg.steps, self.cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _skip_non_finite(self) -> None:
        self.bad_in_row += 1
        self.bad_total += 1
        self.logger.event(self.step, "non_finite_loss", in_a_row=self.bad_in_row, total=self.bad_total)
        self.logger.message(
            f"step {self.step + 1}: non-finite loss, step skipped ({self.bad_in_row} in a row, "
            f"{self.bad_total} in all)"
        )
        if self.bad_in_row >= self.cfg.max_bad_steps:
            raise ConvBertError(
                f"{self.bad_in_row} steps in a row had a non-finite loss (at step {self.step + 1}); stopping. "
                "Lower --lr, use --precision fp32/bf16, or check the data"
            )
        return None

    def _finish_step(self, stats: torch.Tensor, n_avg: int, lr: float, grad_norm: torch.Tensor) -> dict:
        tokens = int(stats[3])
        self.step += 1
        self.tokens_seen += tokens
        return {
            "loss": float(stats[0]) / n_avg,
            "gen_loss": float(stats[1]) / n_avg,
            "disc_loss": float(stats[2]) / n_avg,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": tokens,
        }

    # ---- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        resumed = self.maybe_resume()
        done = self.step >= cfg.steps or (cfg.stop_at_step is not None and self.step >= cfg.stop_at_step)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out)  # an interrupted earlier invocation's (curves.png, run_config.json)
            if not done:  # a run with nothing to do keeps the settings it was trained with
                save_config(self.out / RUN_CONFIG, self.resolved())
            self._copy_vocab()
            self.logger = RunLogger(self.out, cfg.steps, progress=self.progress, log_every=cfg.log_every)
        if self.step >= cfg.steps or (cfg.stop_at_step is not None and self.step >= cfg.stop_at_step):
            finished = self.step >= cfg.steps
            if finished and self._eval_missing_here():  # stopped after the last checkpoint, before the end
                self.logger.start(self.step)
                if self.dist.is_main:
                    self.print(f"{self.out}: trained for {self.step} of {cfg.steps} steps; finishing the end of the "
                               "run (final evaluation, plot)")
                try:
                    self.run_eval()
                finally:
                    self.logger.close(plot=True)
            elif self.dist.is_main:
                if finished and not (self.out / PLOT_FILE).is_file():
                    self.logger.close(plot=True)  # (a kill while plotting; the logger has nothing open)
                why = ("already trained for {} of {} steps".format(self.step, cfg.steps) if finished
                       else f"already at step {self.step} (--stop-at-step {cfg.stop_at_step})")
                self.print(f"{self.out}: {why}; nothing to do")
            # the same keys as a run that trained, its last evaluation read back from the log
            return {"step": self.step, "resumed": resumed, "finished": finished, "timed_out": False,
                    "stopped_by": None, "eval": self._logged_eval(), "bad_steps": self.bad_total}
        self.logger.start(self.step)
        if self.dist.is_main:
            r = self.resolved()
            what = cfg.size
            if cfg.init_from:  # the architecture is the init model's; --size only chose the recipe
                from convbert.interop.tf import matching_preset

                mc = self.model_config
                arch = matching_preset(mc) or f"{mc.num_hidden_layers}-layer, hidden {mc.hidden_size}"
                what = f"the {arch} model from {cfg.init_from} with the {cfg.size} recipe"
            self.logger.message(
                f"pre-training {what} ({cfg.objective}, attention {cfg.attention}): "
                f"{r['parameters']['total']:,} parameters (generator + discriminator, vocab "
                f"{self.model_config.vocab_size:,}), {cfg.steps:,} steps, global batch {cfg.batch_size} "
                f"({self.dist.world_size} rank(s) × {cfg.grad_accum} accumulation × {self.micro_batch}), "
                f"seq {self.T}, lr {cfg.lr:g}, warmup {cfg.warmup_steps}, {cfg.precision} on {self.device}"
            )
            if self.data.eval is not None and cfg.eval_batches > 0:
                source = (f"{self.data.eval_dir}" if self.data.eval_dir is not None
                          else f"the last {self.data.holdout:,} examples of --data, held out")
                self.logger.message(f"held-out evaluation on {source} ({len(self.data.eval):,} examples)")
            note = fp16_note(self.device) if cfg.precision == "fp16" else None
            if note:
                self.logger.message(note)
            if self.data.eval is None and cfg.eval_batches > 0:
                self.logger.message(f"note: no held-out evaluation: --data has {len(self.data.train):,} example(s), "
                                    "too few to hold one out and still fill a batch; give --eval-data for one")
        milestones = ckpt_io.milestone_steps(cfg.steps)
        last_eval = last_eval_step = None
        stop_at = cfg.stop_at_step
        finished = False
        timed_out = False
        stopped_by = None  # the signal that stopped the run
        signals = self._signals = StopSignals(announce=self.dist.is_main)
        try:
            with signals:
                if not resumed and cfg.eval_at_start:
                    last_eval = self.run_eval()
                elif resumed and cfg.eval_every and self.step % cfg.eval_every == 0 and self._eval_missing_here():
                    last_eval, last_eval_step = self.run_eval(), self.step  # (a signal had interrupted it)
                t_train = time.perf_counter()
                if self._signalled():  # during that evaluation: nothing trained in this invocation to save
                    stopped_by = signals.received or "a signal on another rank"
                    self.logger.message(f"stopped at step {self.step} of {cfg.steps} ({stopped_by}) before "
                                        "training; re-run the same command to continue")
                while self.step < cfg.steps and stopped_by is None:
                    metrics = self.train_step()
                    if metrics is None:
                        continue
                    self.logger.train(self.step, {k: v for k, v in metrics.items() if k != "tokens"},
                                      metrics["tokens"])
                    at_end = self.step >= cfg.steps
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and not at_end:
                        last_eval, last_eval_step = self.run_eval(), self.step
                    stopping = stop_at is not None and self.step >= stop_at
                    over = cfg.time_limit is not None and time.perf_counter() - t_train >= cfg.time_limit
                    signalled = signals.received is not None
                    if self.dist.distributed:  # every rank must agree, or the collectives below would hang
                        flags = torch.tensor([float(over), float(signalled)], device=self.device)
                        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                        over, signalled = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
                    if not at_end and signalled:
                        stopped_by = signals.received or "a signal on another rank"
                        stopping = True
                    elif not at_end and over:
                        timed_out = stopping = True
                    if ((cfg.save_every and self.step % cfg.save_every == 0) or self.step in milestones or at_end
                            or stopping):
                        self.save()
                    if stopping and not at_end:
                        why = stopped_by or ("the time limit" if timed_out else "--stop-at-step")
                        how = ("re-run without --stop-at-step (or with a later one)" if why == "--stop-at-step"
                               else "re-run the same command")
                        self.logger.message(f"stopped at step {self.step:,} of {cfg.steps:,} ({why}); {how} to "
                                            "continue from this checkpoint")
                        self.logger.event(self.step, "stopped", reason=why)
                        break
                else:
                    finished = stopped_by is None
                if finished:
                    last_eval = self.run_eval()
                    if self.eval_interrupted:  # trained to the end; re-running writes the final evaluation
                        stopped_by = signals.received or "a signal on another rank"
                elif timed_out and last_eval_step != self.step:  # (on the schedule, it has just been evaluated)
                    last_eval = self.run_eval(at_stop=True)
        finally:
            self.logger.close(plot=True)
        return {"step": self.step, "resumed": resumed, "finished": finished, "timed_out": timed_out,
                "stopped_by": stopped_by, "eval": last_eval, "bad_steps": self.bad_total}

    def close(self) -> None:
        if self.dist.initialized_here and dist.is_initialized():
            # Every rank waits for the others (rank 0 may still be evaluating or plotting): a rank that tears the
            # process group down early aborts gloo under the ranks still using it.
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


class _EvalInterrupted(Exception):
    """Raised inside a held-out evaluation when SIGINT/SIGTERM arrives."""


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (what Slurm and torchrun send) ask the run to stop after the current step with a
    checkpoint, as `--time-limit` does, instead of losing every step since the last one. A second signal stops at
    once (KeyboardInterrupt). Handlers can only be set from the main thread; elsewhere this does nothing."""

    def __init__(self, announce: bool) -> None:
        self.received: str | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if self.announce:  # (os.write: no lock that the interrupted code might hold)
            os.write(2, f"\n{self.received}: stopping after this step with a checkpoint (send it again to stop at "
                        "once and lose the steps since the last checkpoint)\n".encode())

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_pretraining(cfg: PretrainConfig, **kwargs) -> dict:
    """Run (or resume) pre-training as `cfg` says; returns at least the step reached, whether it resumed and whether
    the run is finished."""
    trainer = Trainer(cfg, **kwargs)
    try:
        return trainer.run()
    finally:
        trainer.close()


def load_run_config(run_dir: str | os.PathLike) -> PretrainConfig:
    return config_from_dict(load_json(Path(run_dir) / RUN_CONFIG)["pretrain"])
