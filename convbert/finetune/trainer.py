"""The fine-tuning loop with the original recipe (spec §5.1–§5.3).

Defaults, each switchable through `FinetuneConfig`:

* head: dropout + one Glorot linear on [CLS] (`ConvBertForSequenceClassification`); regression = 1 output, squared
  error against label/5;
* per-example losses **summed** over the batch (`loss_reduction="sum"`), global-norm clip 1.0;
* `AdamWeightDecay` (no bias correction, eps 1e-6, weight decay 0.01 except LayerNorm/bias), peak lr per size (small
  and medium-small 3e-4, base 1e-4), layer-wise decay 0.8 with the original multipliers (top layer 0.8², head 1),
  10 % linear warmup, linear decay to 0 from step 0 (so the first update has lr 0, as in the original);
* batch 32, length 128 with fixed padding, 3 epochs (10 for RTE and STS-B), MRPC/STS-B doubled with swapped sides.

Train steps = ceil(n_train / batch) × epochs: the original pads the training set to a multiple of the batch size
with zero-loss dummies; with a summed loss a short last batch is the same thing. Examples are reshuffled every
epoch with a generator seeded by the run's seed (the original shuffles once in Python, unseeded, then uses a
100-example shuffle buffer), so a run is a pure function of (model, data, settings, seed).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from convbert.errors import ConvBertError
from convbert.finetune.features import Features
from convbert.optim import AdamWeightDecay, layerwise_lr_scale, linear_warmup_decay, param_groups
from convbert.precision import PRECISIONS, autocast

SIZE_LR = {"small": 3e-4, "medium-small": 3e-4, "base": 1e-4}


@dataclass
class FinetuneConfig:
    lr: float | None = None  # None: by model size (base 1e-4, smaller 3e-4)
    layer_decay: float = 0.8  # 1.0 switches layer-wise decay off
    weight_decay: float = 0.01
    warmup_proportion: float = 0.1
    batch_size: int = 32
    eval_batch_size: int = 32
    max_seq_length: int = 128
    epochs: float | None = None  # None: the task's default (3; RTE and STS-B 10)
    double_unordered: bool = True
    loss_reduction: str = "sum"  # "sum" (original) or "mean"
    clip_norm: float = 1.0
    pad_to_max: bool = True  # fixed padding to max_seq_length (faithful: the conv branch sees padding)
    max_train_examples: int | None = None
    regression_scale: float = 5.0
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ... (the CLI resolves "auto")
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (autocast + gradient scaler; slow on most CPUs)

    def validate(self) -> None:
        def need(ok, what):
            if not ok:
                raise ConvBertError(what)

        for name in ("lr", "layer_decay", "weight_decay", "warmup_proportion", "epochs", "clip_norm",
                     "regression_scale"):
            value = getattr(self, name)
            need(value is None or math.isfinite(value), f"--{name.replace('_', '-')} must be a finite number, got {value}")
        need(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 < self.layer_decay <= 1.0, f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(self.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        need(4 <= self.max_seq_length, f"--max-seq-length must be at least 4, got {self.max_seq_length}")
        need(self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        need(0 <= self.warmup_proportion < 1, f"--warmup-proportion must be in [0, 1), got {self.warmup_proportion}")
        need(self.loss_reduction in ("sum", "mean"), f"loss reduction must be sum or mean, got {self.loss_reduction}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConvBertError(f"--device {self.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConvBertError(f"--device {self.device}: CUDA is not available here (use --device cpu)")
        need(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision}")
        need(
            self.max_train_examples is None or self.max_train_examples >= 1,
            f"--max-train-examples must be at least 1, got {self.max_train_examples}",
        )

    def to_dict(self) -> dict:
        return asdict(self)


def default_lr(config) -> float:
    """Peak lr by size (spec §5.2): base (H ≥ 768) 1e-4, small/medium-small (and smaller) 3e-4."""
    return SIZE_LR["base"] if config.hidden_size >= 768 else SIZE_LR["small"]


def load_tokenizer(model_dir: str | os.PathLike):
    """The model folder's `vocab.txt`; lower-casing and accent stripping from an HF `tokenizer_config.json` when
    present (else both on, as the released uncased models; `strip_accents` null or absent follows lower-casing)."""
    from convbert.data.tokenize import WordPieceTokenizer

    model_dir = Path(model_dir)
    vocab = model_dir / "vocab.txt"
    if not vocab.is_file():
        from convbert.utils import folder_kind_hint

        hint = folder_kind_hint(model_dir)
        hint = hint or " (a model folder is HF layout plus the vocab.txt it was built with)"
        raise ConvBertError(f"{model_dir}: no vocab.txt{hint}")
    lower, strip = True, None
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        try:
            settings = json.loads(tc.read_text(encoding="utf-8"))
        except ValueError:  # JSON or UTF-8
            raise ConvBertError(f"{tc}: not valid JSON")
        if not isinstance(settings, dict):
            raise ConvBertError(f"{tc}: expected a JSON object (HF tokenizer settings), got {type(settings).__name__}")
        lower, strip = bool(settings.get("do_lower_case", True)), settings.get("strip_accents")
    return WordPieceTokenizer.from_vocab(vocab, lower_case=lower, strip_accents=lower if strip is None else bool(strip))


def check_vocab_matches(model, tokenizer, model_dir, max_seq_length: int | None = None) -> None:
    """The vocab must fit the embedding table, and the sequence length the position table."""
    mp = model.config.max_position_embeddings
    if max_seq_length is not None and max_seq_length > mp:
        raise ConvBertError(
            f"--max-seq-length {max_seq_length} exceeds the model's max_position_embeddings {mp} ({model_dir}/config.json)"
        )
    vs = model.config.vocab_size
    if tokenizer.vocab_size > vs:
        raise ConvBertError(
            f"{model_dir}/vocab.txt has {tokenizer.vocab_size} tokens but config.json says vocab_size {vs}"
        )


@dataclass
class TrainStats:
    steps: int
    warmup_steps: float  # total × warmup_proportion, not rounded (as the original)
    epochs: float
    n_train: int
    peak_lr: float
    final_loss: float  # mean per-example loss over the last (up to) 100 steps
    seconds: float
    loss_history: list[float] = field(default_factory=list)  # per-example loss, every `log_every` steps


# Dropout's seed is the run's seed shifted onto a stream of its own, apart from the one `set_seed(seed)` gave the
# head's initialisation just before (the CLI and run_glue seed both from one number).
DROPOUT_STREAM = 1 << 32


def train_steps_for(n_train: int, batch_size: int, epochs: float) -> int:
    return max(1, int(math.ceil(n_train / batch_size) * epochs))


def build_optimizer(model, cfg: FinetuneConfig, peak_lr: float) -> AdamWeightDecay:
    L = model.config.num_hidden_layers
    scale_fn = None
    if cfg.layer_decay < 1.0:
        scale_fn = lambda name: layerwise_lr_scale(name, L, cfg.layer_decay)  # noqa: E731
    groups = param_groups(model, cfg.weight_decay, scale_fn)
    return AdamWeightDecay(groups, lr=peak_lr, weight_decay=cfg.weight_decay)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, regression: bool, reduction: str) -> torch.Tensor:
    if regression:
        per = (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    else:
        per = F.cross_entropy(logits, labels, reduction="none")
    return per.sum() if reduction == "sum" else per.mean()


def train(
    model,
    feats: Features,
    cfg: FinetuneConfig,
    regression: bool,
    epochs: float,
    seed: int,
    peak_lr: float,
    on_step: Callable[[int, float], None] | None = None,
    log_every: int = 10,
) -> TrainStats:
    """Fine-tune `model` in place on `feats`. `on_step(step, per_example_loss)` is called after every update.

    `seed` fixes the data order and the dropout masks (torch's RNG is seeded from it here, on its own stream), so
    the same model, data, settings and seed give the same run. A fresh head is initialised when the model is built:
    seed torch before that (`set_seed`) to fix it too."""
    cfg.validate()  # (the CLI validates its settings; a config built in Python reaches here unchecked)
    n = len(feats)
    if n == 0:
        raise ConvBertError("no training examples left after reading the training file")
    outputs = getattr(model, "num_labels", None)
    if outputs is not None and (outputs == 1) != bool(regression):
        raise ConvBertError(f"train: regression={bool(regression)} but the model's head has {outputs} output(s): "
                            "regression takes a 1-output head, classification one output per class")
    total = train_steps_for(n, cfg.batch_size, epochs)
    warmup = total * cfg.warmup_proportion  # a float, like the original's max(T · proportion, 0)
    model.to(cfg.device)
    opt = build_optimizer(model, cfg, peak_lr)
    params = [p for p in model.parameters() if p.requires_grad]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed + DROPOUT_STREAM)
    device = next(model.parameters()).device
    model.train()
    # fp16 needs loss scaling (bf16 has fp32's range and does not)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    start = time.time()
    recent: list[float] = []
    history: list[float] = []
    step = 0
    while step < total:
        order = rng.permutation(n)
        for s in range(0, n, cfg.batch_size):
            if step >= total:
                break
            idx = order[s : s + cfg.batch_size]
            batch = {k: v.to(device, non_blocking=True) for k, v in feats.batch(idx, cfg.pad_to_max).items()}
            factor = linear_warmup_decay(step, total, warmup)
            for g in opt.param_groups:
                g["lr"] = peak_lr * factor
            with autocast(cfg.precision, device):
                logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            loss = loss_fn(logits.float(), batch["labels"], regression, cfg.loss_reduction)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)  # clip the true gradients
            else:
                loss.backward()
            if cfg.clip_norm and cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            if scaler is not None:
                scaler.step(opt)  # skipped when the scaled gradients overflowed
                scaler.update()
            else:
                opt.step()
            per_ex = float(loss.detach()) / (len(idx) if cfg.loss_reduction == "sum" else 1)
            if not math.isfinite(per_ex):
                raise ConvBertError(f"training diverged: loss is {per_ex} at step {step + 1}; lower --lr")
            recent.append(per_ex)
            if len(recent) > 100:
                recent.pop(0)
            if step % log_every == 0:
                history.append(round(per_ex, 6))
            step += 1
            if on_step is not None:
                on_step(step, per_ex)
    return TrainStats(
        steps=total,
        warmup_steps=warmup,
        epochs=epochs,
        n_train=n,
        peak_lr=peak_lr,
        final_loss=float(np.mean(recent)) if recent else float("nan"),
        seconds=time.time() - start,
        loss_history=history,
    )


@torch.no_grad()
def predict_logits(model, feats: Features, batch_size: int, pad_to_max: bool = True, on_batch=None,
                   precision: str = "fp32") -> np.ndarray:
    """Logits [N, C] (classification) or raw scores [N, 1] (regression, on the training target scale), as fp32.

    Without `pad_to_max` each batch holds rows of one length, padded to nothing: the convolution branch sees
    padding, so a row padded to its batch's longest would score differently with other neighbours or another
    batch size."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    n = len(feats)
    out = np.zeros((n, model.num_labels), dtype=np.float32)
    for idx in _prediction_batches(feats.lengths, batch_size, pad_to_max):
        b = {k: v.to(device, non_blocking=True) for k, v in feats.batch(idx, pad_to_max).items()}
        with autocast(precision, device):
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        out[idx] = logits.float().cpu().numpy()
        if on_batch is not None:
            on_batch(len(idx))
    if was_training:
        model.train()
    return out


def _prediction_batches(lengths: np.ndarray, batch_size: int, pad_to_max: bool) -> list[np.ndarray]:
    """Row indices per batch: in order, or (without `pad_to_max`) grouped by length, each batch one length."""
    n = len(lengths)
    if pad_to_max:
        return [np.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    order = np.argsort(lengths, kind="stable")
    starts = [0] + [i for i in range(1, n) if lengths[order[i]] != lengths[order[i - 1]]] + [n]
    return [order[s:min(e, s + batch_size)] for a, e in zip(starts, starts[1:]) for s in range(a, e, batch_size)]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
