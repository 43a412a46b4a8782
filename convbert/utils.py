"""Small shared helpers: atomic writes, JSON, hashing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from convbert.errors import ConvBertError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_mode(path: str | os.PathLike) -> None:
    """The usual permissions for a new file or folder (what the umask allows): temporary files and folders, and
    what some writers (safetensors) create, are private (0600/0700)."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        fix_mode(tmp_path)  # mkstemp (and safetensors, which replaces the file) make it 0600
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_output_location(path: str | os.PathLike, flag: str = "--output") -> None:
    """Fail now, naming `path`, if the file or folder `path` could not be written there at the end of a long job:
    a file where a parent folder must be, or a location without write permission. Creates nothing: a temporary
    file is made and removed in the nearest existing ancestor folder."""
    target = Path(path)
    ancestor = target.parent
    while not ancestor.exists():
        if ancestor.is_symlink():  # a dangling link: writing through it fails
            raise ConvBertError(f"{flag} {path}: {ancestor} is a broken link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConvBertError(f"{flag} {path}: {ancestor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".convbert-probe-", dir=ancestor)
    except OSError as err:
        raise ConvBertError(f"{flag} {path}: cannot write in {ancestor} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's SHA-256, hex, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_folder(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished folder `staging` to `final`. An existing `final` is first renamed aside and removed
    after, so a crash leaves the old folder or the new one (or the old one beside it), never a mix."""
    staging, final = Path(staging), Path(final)
    if not final.exists():
        os.replace(staging, final)
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(*folders: str | os.PathLike) -> None:
    """Delete what an interrupted `atomic_path` write leaves (`.<name>.<random>.tmp` files) in `folders`: the
    commands that write there call this when they start, so a kill does not leave litter for good."""
    for folder in map(Path, folders):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                if p.is_file():
                    p.unlink(missing_ok=True)


def recover_folder(final: str | os.PathLike) -> None:
    """Undo what a kill inside `replace_folder`/`staged_folder` left: the old folder renamed aside with no new one
    in its place is put back; staging folders and a superseded old folder are removed."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.is_dir():
        os.replace(old, final)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
    for staging in final.parent.glob(f".{glob_escape(final.name)}.tmp-*") if final.parent.is_dir() else ():
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)


def shell_abspath(path: str | os.PathLike) -> Path:
    """`path` made absolute from the shell's working folder: `$PWD` when it is the process's working folder (so a
    folder entered through a link keeps the link's parents, as the shell shows them), else `os.getcwd()`."""
    path = os.fspath(path)
    if os.path.isabs(path):
        return Path(os.path.normpath(path))
    cwd, pwd = os.getcwd(), os.environ.get("PWD")
    try:
        base = pwd if pwd and os.path.isabs(pwd) and os.path.samefile(pwd, cwd) else cwd
    except OSError:
        base = cwd
    return Path(os.path.normpath(os.path.join(base, path)))


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


@contextmanager
def staged_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder next to `final` to write the whole output into; on success it replaces `final`
    (`replace_folder`), so an interrupted write leaves the old folder whole and nothing stale from an earlier run
    survives; on failure it is removed. It gets the usual permissions (mkdtemp's are private)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        fix_mode(staging)
        yield staging
        replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def refuse_foreign_folder(path: str | os.PathLike, markers: tuple[str, ...], made_by: str,
                          replaces: tuple[str, ...] | None = None) -> None:
    """An existing output folder with (non-hidden) files in it must be an earlier output of the same command, one
    that holds one of `markers`: writing into a folder of other files would mix with or overwrite them. A command
    that replaces the whole folder (`staged_folder`) names what it writes in `replaces`: an earlier output holding
    anything else (say, results saved inside it) is refused too, since the replacement would delete it."""
    path = Path(path)
    if not path.is_dir():
        return
    entries = [p.name for p in path.iterdir() if not p.name.startswith(".")]
    if entries and not any((path / m).exists() for m in markers):
        raise ConvBertError(f"--output {path}: exists and holds other files (not {made_by}); use a new or empty folder")
    others = sorted(set(entries) - set(replaces)) if replaces is not None else []
    if others:
        raise ConvBertError(f"--output {path}: {made_by} that also holds {', '.join(others[:3])}"
                            f"{' …' if len(others) > 3 else ''}, which rewriting the folder would delete; move "
                            "them out or use a new folder")


def decode_utf8(raw: bytes, path: str | os.PathLike, message: str = "not valid UTF-8",
                encoding: str = "utf-8") -> str:
    """`raw` decoded; a bad byte is an error naming the file and its line (`message` may use `{byte}`, its
    offset in the file)."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConvBertError(f"{path}:{line}: " + message.format(byte=err.start)) from None


def replace_lone_surrogates(text: str) -> tuple[str, int]:
    """Lone UTF-16 surrogates (from JSON escapes such as "\\ud800") as U+FFFD, as invalid UTF-8 bytes are read, with
    their count: the tokenizer drops U+FFFD, while the text's other characters are kept."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        fixed = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
        return fixed, sum(1 for c in fixed if c == "\ufffd") - text.count("\ufffd")


def read_json_object(path: str | os.PathLike, hint: str = "") -> dict:
    """A JSON file that must hold an object: a missing, undecodable, malformed or other-typed file is a one-line
    `ConvBertError` naming it (with `hint`, e.g. what to do next), not a traceback."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConvBertError(f"{path}: not found{tail}") from None
    except OSError as err:
        raise ConvBertError(f"{path}: cannot read ({err.strerror or err}){tail}") from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConvBertError(f"{path}: not UTF-8 (byte {err.start}): damaged{tail}") from None
    except json.JSONDecodeError as err:
        raise ConvBertError(f"{path}: line {err.lineno}: not valid JSON ({err.msg}){tail}") from None
    if not isinstance(value, dict):
        raise ConvBertError(f"{path}: holds a JSON {type(value).__name__}, expected an object{tail}")
    return value


def folder_kind_hint(path: str | os.PathLike, wanted: str = "model") -> str:
    """Why `path` is not the kind of folder a command wanted, with what to do, for the errors of `--model`,
    `--init-from` and `export --checkpoint`: "" when nothing more specific can be said. `wanted`: "model" (an
    HF-layout model folder) or "checkpoint" (a pre-training run or checkpoint)."""
    path = Path(path)
    if not path.exists():
        return " (no such folder)"
    if not path.is_dir():
        return " (it is a file, not a folder)"
    if wanted == "model":
        if (path / "trainer_state.json").is_file():
            return (f" ({path} is a pre-training checkpoint: export it first, `convbert export --checkpoint {path} "
                    "--output DIR`, and use DIR)")
        if (path / "run_config.json").is_file() or (path / "checkpoints").is_dir():
            return (f" ({path} is a pre-training run folder: export it first, `convbert export --checkpoint {path} "
                    "--output DIR`, and use DIR)")
    if wanted == "checkpoint":
        if (path / "export.json").is_file() or (path / "config.json").is_file():
            return f" ({path} is already an exported model folder: give it as --model or --init-from as it is)"
    manifest = path / "manifest.json"
    if manifest.is_file() and "convbert-pretraining-data" in manifest.read_text("utf-8", errors="replace")[:4096]:
        return f" ({path} is a dataset folder written by `convbert build-data`, for `convbert pretrain --data`)"
    return ""


def interactive_stderr() -> bool:
    """A terminal, or a Jupyter kernel (whose stderr is no TTY, but where tqdm draws a notebook bar)."""
    import sys

    try:
        if sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return "ipykernel" in sys.modules


class _LinesOnly:
    """tqdm's output for a log file (a batch job's stderr): each redraw, at most one a minute, becomes a plain line
    instead of carriage-return frames that pile up into one huge line."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


# tqdm's default layout with the remaining time spelled out: "[01:12, ETA 03:40, 1.16step/s]" rather than
# "[01:12<03:40, ...]", which few users read as an ETA. Only where the total is known (otherwise tqdm has none).
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}, {rate_fmt}{postfix}]"


def progress_bar(**kwargs):
    """A tqdm bar on stderr: drawn as usual on a terminal or in Jupyter; elsewhere one plain status line a minute
    (a transient `leave=False` bar then prints nothing)."""
    import sys

    from tqdm.auto import tqdm

    if kwargs.get("total") is not None:
        kwargs.setdefault("bar_format", BAR_FORMAT)
    if interactive_stderr():
        return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)
    if not kwargs.get("leave", True):
        kwargs["disable"] = True
    return tqdm(file=_LinesOnly(sys.stderr), mininterval=60.0, maxinterval=60.0, ncols=100, ascii=True, **kwargs)
