"""Pre-training checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of one checkpoint, `<run>/checkpoints/step-00001000/`:

* `model.safetensors`: the `ElectraPretrainingModel` state dict (the generator's view of the shared embeddings is
  stored once; `trainer_state.json` lists the aliases);
* `optimizer.safetensors` + the non-tensor part of the optimiser state in `trainer_state.json`;
* `rng.safetensors`: per rank, the torch CPU (and CUDA) generator, the masking generator and the sampling generator;
  numpy and Python RNG states go to the JSON;
* `trainer_state.json` (written last): step, schedule, data cursor of every rank, grad-scaler state, bad-step counter,
  the resolved run configuration. A folder without it is incomplete and ignored.

The folder is assembled under a temporary name, every file is fsynced, then it is renamed into place and the parent
directory fsynced: a crash leaves either no checkpoint or a complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from convbert.errors import ConvBertError
from convbert.utils import fix_mode, replace_folder, sha256_file

STATE_FILE = "trainer_state.json"
CKPT_RE = re.compile(r"^step-(\d+)$")
MILESTONE_FRACTIONS = (0.0625, 0.125, 0.25, 0.5, 1.0)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def milestone_steps(total_steps: int) -> set[int]:
    """Steps at 6.25 / 12.5 / 25 / 50 / 100 % of the run (rounded, at least 1)."""
    return {max(1, int(round(total_steps * f))) for f in MILESTONE_FRACTIONS}


# ---- tensor-dict helpers -------------------------------------------------------------------------------------


def _contiguous_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, dict] = {}
    for idx, pstate in state_dict["state"].items():
        entry: dict[str, Any] = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = _contiguous_cpu(value)
                entry[key] = {"__tensor__": f"state.{idx}.{key}"}
            else:
                entry[key] = value
        meta_state[str(idx)] = entry
    return tensors, {"state": meta_state, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for idx, entry in meta["state"].items():
        restored = {}
        for key, value in entry.items():
            if isinstance(value, dict) and "__tensor__" in value:
                restored[key] = tensors[value["__tensor__"]]
            else:
                restored[key] = value
        state[int(idx)] = restored
    return {"state": state, "param_groups": meta["param_groups"]}


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with shared tensors stored once; returns (tensors, aliases name → stored name)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = _contiguous_cpu(t)
    return tensors, aliases


def check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str,
                what: str = "checkpoint does not match the model", unknown_label: str = "unexpected") -> None:
    """Raise a one-line ConvBertError naming unknown/missing keys or the first shape mismatches."""
    unknown = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    shapes = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]

    def few(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    problems = []
    if unknown:
        problems.append(f"{unknown_label} {few(unknown)}")
    if missing:
        problems.append(f"missing {few(missing)}")
    for k in shapes[:3]:
        problems.append(
            f"{k} has shape {list(got[k].shape)} in the checkpoint, the model expects shape {list(expected[k].shape)}"
        )
    if problems:
        raise ConvBertError(f"{source}: {what}: " + "; ".join(problems))


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str],
                       source: str = "checkpoint") -> None:
    full = dict(tensors)
    for alias, target in aliases.items():
        if target not in tensors:
            raise ConvBertError(f"{source}: checkpoint does not match the model: alias {alias} -> missing {target}")
        full[alias] = tensors[target]
    check_state(model.state_dict(), full, source)
    model.load_state_dict(full, strict=True)


# ---- RNG states ------------------------------------------------------------------------------------------------


def capture_rng(mask_generator: torch.Generator | None, sample_generator: torch.Generator | None, device) -> dict:
    """This process's RNG states (tensors as uint8 CPU tensors, numpy/python as JSON-able lists)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(torch.device(device))
    if mask_generator is not None:
        tensors["mask_generator"] = mask_generator.get_state()
    if sample_generator is not None:
        tensors["sample_generator"] = sample_generator.get_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return {"tensors": {k: v.detach().cpu().clone() for k, v in tensors.items()}, "meta": meta}


def restore_rng(state: dict, mask_generator, sample_generator, device) -> None:
    tensors, meta = state["tensors"], state["meta"]
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(tensors["torch_cuda"], torch.device(device))
    if mask_generator is not None and "mask_generator" in tensors:
        mask_generator.set_state(tensors["mask_generator"])
    if sample_generator is not None and "sample_generator" in tensors:
        sample_generator.set_state(tensors["sample_generator"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ---- write / read ----------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng_states: list[dict],
    loader_states: list[Any],
    trainer_state: dict,
) -> Path:
    """Write `<directory>/step-XXXXXXXX` atomically; `rng_states`/`loader_states` are indexed by rank."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory))
    try:
        tensors, aliases = model_tensors(model)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        rng_tensors = {}
        rng_meta = []
        for rank, rs in enumerate(rng_states):
            for key, value in rs["tensors"].items():
                rng_tensors[f"rank{rank}.{key}"] = value.contiguous()
            rng_meta.append(rs["meta"])
        save_file(rng_tensors, str(tmp / "rng.safetensors"), metadata={"format": "pt"})
        state = dict(trainer_state)
        state.update(
            # checked when read back: a flipped byte inside a tensor is otherwise loadable and silently wrong
            files={name: sha256_file(tmp / name) for name in TENSOR_FILES},
            step=int(step),
            world_size=len(rng_states),
            model_aliases=aliases,
            optimizer=opt_meta,
            rng=rng_meta,
            loader=loader_states,
        )
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(state, f)
        for p in tmp.iterdir():
            fix_mode(p)  # safetensors and mkdtemp make private files and folders
            _fsync_file(p)
        fix_mode(tmp)
        _fsync_dir(tmp)
        replace_folder(tmp, final)  # a re-save of the same step (e.g. after a resume) replaces it
        _fsync_dir(directory)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(err):  # a full disk or a quota: the earlier checkpoints are whole, the run resumes
            raise ConvBertError(f"{final}: cannot write the checkpoint ({_write_failure_text(err)}); the earlier "
                                "checkpoints are intact: free some space and re-run the same command to resume "
                                "from the last one") from None
        raise
    return final


def _is_write_failure(err: BaseException) -> bool:
    """OSError from Python, or safetensors' own error for the same failure (it reports I/O errors in its text)."""
    return isinstance(err, OSError) or (type(err).__name__ == "SafetensorError" and "I/O error" in str(err))


def _write_failure_text(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err).split("I/O error: ", 1)[-1]


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder meaning its latest checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for candidate in (path / "checkpoints", path):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    if not path.exists():
        raise ConvBertError(f"{path}: no such checkpoint or run folder")
    from convbert.utils import folder_kind_hint

    hint = folder_kind_hint(path, "checkpoint")
    hint = hint or f" (expected {STATE_FILE} in it or in checkpoints/step-*/)"
    raise ConvBertError(f"{path}: no complete checkpoint found{hint}")


def read_trainer_state(path: str | os.PathLike) -> dict:
    path = Path(path) / STATE_FILE
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: JSON or UTF-8 decoding
        raise ConvBertError(f"{path}: cannot read checkpoint state ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ConvBertError(f"{path}: cannot read checkpoint state (expected a JSON object with an integer 'step')")
    return state


TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
_SET_ASIDE = "move that checkpoint folder aside to resume from the one before it"
_EXPORT_ANOTHER = "export an earlier one instead (--checkpoint <run>/checkpoints/step-…)"


def load_checkpoint(path: str | os.PathLike, for_export: bool = False) -> dict:
    """Read a checkpoint: {'state', 'model', 'optimizer_tensors', 'rng_tensors'}. A damaged one is an error whose
    advice fits the reader: set it aside to resume from the one before, or export another."""
    path = Path(path)
    advice = _EXPORT_ANOTHER if for_export else _SET_ASIDE
    state = read_trainer_state(path)
    recorded = state.get("files") if isinstance(state.get("files"), dict) else {}  # (checkpoints since stop 24)
    tensors = {}
    for name in TENSOR_FILES:
        file = path / name
        if not file.is_file():
            if name == "model.safetensors" or name in recorded:
                raise ConvBertError(f"{file}: missing; {advice}")
            tensors[name] = {}
            continue
        if name in recorded and sha256_file(file) != recorded[name]:
            raise ConvBertError(f"{file}: its contents differ from what was written (sha256 recorded in "
                                f"{STATE_FILE}): damaged; {advice}")
        try:
            tensors[name] = load_file(str(file))
        except Exception as err:  # safetensors raises its own error types
            raise ConvBertError(f"{file}: cannot read the tensors ({err}); {advice}") from None
    return {"state": state, "model": tensors["model.safetensors"],
            "optimizer_tensors": tensors["optimizer.safetensors"], "rng_tensors": tensors["rng.safetensors"]}


def rng_state_for_rank(ckpt: dict, rank: int) -> dict | None:
    metas = ckpt["state"].get("rng") or []
    if rank >= len(metas):
        return None
    prefix = f"rank{rank}."
    tensors = {k[len(prefix):]: v for k, v in ckpt["rng_tensors"].items() if k.startswith(prefix)}
    return {"tensors": tensors, "meta": metas[rank]}


def prune_checkpoints(directory: str | os.PathLike, keep_last: int, protected: set[int]) -> list[Path]:
    """Keep the newest `keep_last` regular checkpoints and every protected (milestone) one; delete the rest.

    A checkpoint that was a milestone of the run length recorded in it stays protected too, so resuming with
    another `--steps` never deletes the earlier milestones."""
    found = list_checkpoints(directory)
    removed = []
    for p in Path(directory).glob(".step-*.tmp"):  # leftovers of an interrupted save
        shutil.rmtree(p, ignore_errors=True)
    if keep_last <= 0:
        return removed
    protected = set(protected) | {step for step, p in found if (total := _recorded_total_steps(p))
                                  and step in milestone_steps(total)}
    regular = [step for step, _ in found if step not in protected]
    recent = set(regular[-keep_last:])
    for step, p in found:
        if step in recent or step in protected:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _recorded_total_steps(checkpoint: Path) -> int:
    """The run length a checkpoint was written for (0 if its state cannot be read)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state["lr_schedule"]["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
