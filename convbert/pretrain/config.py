"""The resolved pre-training configuration: per-size defaults (spec §3.8) ← YAML file ← command-line flags ← --set.

Keys are the fields of `PretrainConfig`; `model.<field>` keys override `ConvBertConfig` fields (e.g.
`--set model.hidden_dropout_prob=0.0`). A YAML file is a mapping with the same keys and an optional `model:` mapping.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convbert.errors import ConvBertError
from convbert.precision import PRECISIONS
from convbert.utils import read_json_object

SIZES = ("tiny", "small", "medium-small", "base")
MASKINGS = ("with-replacement", "without-replacement")
ATTENTIONS = ("mixed", "plain")
OBJECTIVES = ("electra", "mlm")

# Spec §3.8 (the paper sizes); `tiny` is ours, for tests and the CPU quickstart.
SIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(lr=1e-3, batch_size=32, eval_batch_size=32, steps=2000, warmup_steps=100, generator_fraction=0.25,
                 save_every=500, eval_every=500),
    "small": dict(lr=3e-4, batch_size=128, eval_batch_size=128, steps=1_000_000, warmup_steps=10_000,
                  generator_fraction=0.25),
    "medium-small": dict(lr=5e-4, batch_size=128, eval_batch_size=128, steps=1_000_000, warmup_steps=10_000,
                         generator_fraction=0.25),
    "base": dict(lr=2e-4, batch_size=256, eval_batch_size=256, steps=1_000_000, warmup_steps=10_000,
                 generator_fraction=1 / 3),
}

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes in which Inductor captures CUDA graphs of its own (its "triton.cudagraphs" option)
COMPILE_MODES_WITH_CUDA_GRAPHS = ("reduce-overhead", "max-autotune")


@dataclass
class PretrainConfig:
    data: str = ""
    output: str = ""
    size: str = "medium-small"
    eval_data: str | None = None  # default: <data>/eval, else the last examples of --data are held out
    vocab: str | None = None  # default: <data>/vocab.txt or the manifest's record (checked by sha256)
    steps: int = 1_000_000
    batch_size: int = 128  # global (all ranks, all accumulation micro-steps)
    grad_accum: int = 1
    lr: float = 5e-4
    warmup_steps: int = 10_000
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0
    seed: int = 42
    save_every: int = 10_000
    keep_checkpoints: int = 3
    eval_every: int = 10_000  # 0 disables periodic evaluation (the final one still runs)
    eval_batches: int = 50
    eval_batch_size: int = 128
    eval_at_start: bool = True
    log_every: int = 1
    precision: str = "fp32"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode when compile is on (reduce-overhead: CUDA graphs per encoder)
    cuda_graphs: bool = False  # capture the whole step as CUDA graphs (one GPU, fp32/bf16)
    masking: str = "with-replacement"
    attention: str = "mixed"
    objective: str = "electra"
    generator_fraction: float = 0.25
    mask_prob: float = 0.15
    mask_token_prob: float = 0.85
    gen_weight: float = 1.0
    disc_weight: float = 50.0
    temperature: float = 1.0
    max_bad_steps: int = 10
    max_seq_length: int | None = None  # default: the dataset's length
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads for torch (0: torch's default)
    stop_at_step: int | None = None  # stop early (after a checkpoint) at this step; the schedule still uses `steps`
    time_limit: float | None = None  # seconds of training in this invocation; then checkpoint, evaluate and stop
    model: dict = field(default_factory=dict)  # ConvBertConfig overrides
    init_from: str | None = None  # an HF-layout model folder to start from (see convbert.pretrain.init)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConvBertError(f"{key} = {getattr(self, key)!r}: expected {expected}")

        need(self.size in SIZES, "size", "one of " + ", ".join(SIZES))
        need(self.precision in PRECISIONS, "precision", "one of " + ", ".join(PRECISIONS))
        need(self.masking in MASKINGS, "masking", "one of " + ", ".join(MASKINGS))
        need(self.attention in ATTENTIONS, "attention", "one of " + ", ".join(ATTENTIONS))
        need(self.objective in OBJECTIVES, "objective", "one of " + ", ".join(OBJECTIVES))
        need(self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda")
        need(self.init_from is None or (isinstance(self.init_from, str) and bool(self.init_from)), "init_from",
             "a model folder")
        need(self.compile_mode in COMPILE_MODES, "compile_mode", "one of " + ", ".join(COMPILE_MODES))
        for key in ("steps", "batch_size", "grad_accum", "eval_batch_size", "max_bad_steps", "log_every"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, key, "an integer >= 1")
        for key in ("warmup_steps", "save_every", "eval_every", "eval_batches", "keep_checkpoints", "threads"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 0, key, "an integer >= 0")
        for key in ("lr", "weight_decay", "adam_eps", "max_grad_norm", "gen_weight", "disc_weight", "temperature",
                    "generator_fraction", "mask_prob", "mask_token_prob", "adam_beta1", "adam_beta2"):
            need(math.isfinite(getattr(self, key)), key, "a finite number")
        need(self.lr >= 0, "lr", "a number >= 0")
        need(self.adam_eps > 0, "adam_eps", "a number > 0 (0 divides by zero where a gradient is 0)")
        need(self.max_grad_norm >= 0, "max_grad_norm", "a number >= 0 (0 switches clipping off)")
        need(self.gen_weight >= 0 and self.disc_weight >= 0, "gen_weight" if self.gen_weight < 0 else "disc_weight",
             "a number >= 0")
        need(0 <= self.seed < 2**63, "seed", "an integer in 0..2**63-1")
        need(self.threads <= 4096, "threads", "at most 4096 (0: torch's default)")
        need(0 < self.generator_fraction <= 1, "generator_fraction", "a number in (0, 1]")
        need(0 < self.mask_prob < 1, "mask_prob", "a number in (0, 1)")
        need(0 <= self.mask_token_prob <= 1, "mask_token_prob", "a number in [0, 1]")
        need(self.temperature > 0, "temperature", "a number > 0")
        if self.time_limit is not None:
            need(self.time_limit > 0, "time_limit", "a number of seconds > 0")
        if self.max_seq_length is not None:
            need(isinstance(self.max_seq_length, int) and 5 <= self.max_seq_length <= 65535, "max_seq_length",
                 "an integer in 5..65535")
        if self.stop_at_step is not None:
            need(isinstance(self.stop_at_step, int) and self.stop_at_step >= 1, "stop_at_step", "an integer >= 1")
        if not self.data:
            raise ConvBertError("no training data: pass --data DIR (a folder written by `convbert build-data`)")
        if not self.output:
            raise ConvBertError("no output folder: pass --output DIR")


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def _coerce(key: str, value: Any, source: str, typ: str | None = None) -> Any:
    """Convert a YAML/--set value to the field's type (`typ`, default the PretrainConfig field's): ints stay ints,
    '1e-3' becomes a float (the rules of `ConvBertConfig`'s fields, `as_field_type`)."""
    from convbert.model.config import WRONG_TYPE, as_field_type

    typ = typ or str(FIELDS[key].type)
    if value is None:
        if "None" in typ:
            return None
        raise ConvBertError(f"{source}: key {key!r} cannot be null")
    typed = as_field_type(value, typ.split(" | ")[0])
    if typed is WRONG_TYPE:
        raise ConvBertError(f"{source}: key {key!r} = {value!r}: expected {typ}")
    return typed


def _model_fields() -> dict[str, str]:
    """ConvBertConfig's settable fields and their types."""
    from convbert.model.config import ConvBertConfig

    return {f.name: str(f.type) for f in dataclasses.fields(ConvBertConfig) if f.name != "extra"}


def apply_mapping(cfg: PretrainConfig, values: dict, source: str) -> None:
    model_fields = None
    for key, value in values.items():
        key = str(key).replace("-", "_") if str(key) != "model" and not str(key).startswith("model.") else str(key)
        if key == "model":
            if not isinstance(value, dict):
                raise ConvBertError(f"{source}: key 'model' must be a mapping of ConvBertConfig fields")
            for k, v in value.items():
                apply_mapping(cfg, {f"model.{k}": v}, source)
            continue
        if key.startswith("model."):
            name = key[len("model."):]
            model_fields = model_fields or _model_fields()
            if name not in model_fields:
                raise ConvBertError(f"{source}: unknown key {key!r} (model keys: {', '.join(sorted(model_fields))})")
            cfg.model[name] = _coerce(key, value, source, typ=model_fields[name])
            continue
        if key not in FIELDS:
            raise ConvBertError(f"{source}: unknown key {key!r} (known keys: {', '.join(sorted(FIELDS))}, model.<field>)")
        setattr(cfg, key, _coerce(key, value, source))


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConvBertError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConvBertError(f"{path}: is a folder; expected a YAML config file") from None
    except UnicodeDecodeError as err:
        raise ConvBertError(f"{path}: not UTF-8 text (byte {err.start}); expected a YAML config file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConvBertError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConvBertError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def parse_set(items: list[str] | None) -> dict:
    import yaml

    values: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConvBertError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        values[key] = value
    return values


def resolve_config(
    size: str | None = None,
    config_file: str | None = None,
    flags: dict | None = None,
    sets: list[str] | None = None,
) -> PretrainConfig:
    """defaults(size) ← YAML ← explicit flags (values that are not None) ← --set."""
    file_values = load_yaml(config_file) if config_file else {}
    set_values = parse_set(sets)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    output = set_values.get("output") or flags.get("output") or file_values.get("output")
    recorded, record_path = recorded_settings(output)
    given = set_values.get("size") or flags.get("size") or size
    if given and file_values.get("size") and given != file_values["size"]:
        # the file's other values (its warmup, lr, model overrides) are that size's: mixing them with another
        # size's defaults gives neither recipe
        raise ConvBertError(f"size {given!r} was asked for, but {config_file} is the recipe for size "
                            f"{file_values['size']!r}; use that file's size, or another file")
    chosen = given or file_values.get("size") or recorded.get("size") or "medium-small"
    if chosen not in SIZES:
        raise ConvBertError(f"size {chosen!r}: expected one of {', '.join(SIZES)}")
    cfg = PretrainConfig(size=chosen)
    for key, value in SIZE_DEFAULTS[chosen].items():
        setattr(cfg, key, value)
    explicit: set[str] = set()
    if file_values:
        apply_mapping(cfg, file_values, config_file or "config")
        # A file value equal to the size's default (the configs/ presets spell them all out) is not a choice.
        defaults = {**PretrainConfig().to_dict(), **SIZE_DEFAULTS[chosen]}
        explicit |= {str(k).replace("-", "_") for k, v in file_values.items()
                     if defaults.get(str(k).replace("-", "_"), object()) != v}
    apply_mapping(cfg, flags, "command line")
    explicit |= set(flags)
    apply_mapping(cfg, set_values, "--set")
    explicit |= {k.replace("-", "_") for k in set_values}
    if recorded:  # resuming: what is not given now is the run's own setting, not this size's default
        for key, value in recorded.items():
            if key in NOT_RESUMED or key == "size" or key in explicit or key not in FIELDS:
                continue
            if key == "model" and any(k == "model" or k.startswith("model.") for k in explicit):
                continue
            apply_mapping(cfg, {key: value}, str(record_path))
            explicit.add(key)
    cfg.size = chosen
    # A short run keeps the recipe's warmup fraction (1 %) unless the warmup was given explicitly.
    if "warmup_steps" not in explicit and cfg.steps < SIZE_DEFAULTS[chosen]["warmup_steps"] * 10:
        cfg.warmup_steps = max(1, int(round(cfg.steps * 0.01))) if chosen != "tiny" else min(
            cfg.warmup_steps, max(1, cfg.steps // 10))
    if "save_every" not in explicit and cfg.save_every > cfg.steps:
        cfg.save_every = cfg.steps
    cfg.validate()
    return cfg


RECORDED_PATHS = ("data", "eval_data", "vocab", "init_from")  # resolved against the run's recorded "cwd"
# Per-invocation and machine settings: a resumed run takes these from the command line (or their defaults), not
# from its record. Everything else not given again is the run's own.
NOT_RESUMED = ("output", "stop_at_step", "time_limit", "device", "threads", "compile", "compile_mode", "cuda_graphs")


def recorded_settings(output) -> tuple[dict, Path | None]:
    """The settings recorded in `output`/run_config.json when that run has a checkpoint to resume from, else {}."""
    if not output or not isinstance(output, str):
        return {}, None
    run = Path(output)
    record = run / "run_config.json"
    try:
        if not record.is_file() or not any((run / "checkpoints").glob("step-*")):
            return {}, None
    except OSError:
        return {}, None
    from convbert.utils import read_json_object

    saved = read_json_object(record, "restore the run's record, or start a new --output")
    values = saved.get("pretrain")
    if not isinstance(values, dict):
        return {}, None
    base = saved.get("cwd")
    if isinstance(base, str) and Path(base).is_absolute():  # relative paths of a run started in another folder
        values = dict(values)
        for key in RECORDED_PATHS:
            given = values.get(key)
            if isinstance(given, str) and given and not Path(given).is_absolute() and (Path(base) / given).exists():
                values[key] = str(Path(base) / given)  # (a moved project: the path as given, from here)
    return values, record


def config_from_dict(values: dict) -> PretrainConfig:
    cfg = PretrainConfig()
    for key, value in values.items():
        if key in FIELDS:
            setattr(cfg, key, value)
    return cfg


def save_config(path: str | Path, obj: dict) -> None:
    from convbert.utils import write_json_atomic

    write_json_atomic(path, obj)


def load_json(path: str | Path) -> dict:
    """A run's JSON record (run_config.json): an object, or a one-line error naming the file."""
    return read_json_object(path, "restore the run's record, or start a new --output")