"""`convbert glue-download`: fetch GLUE and lay it out (spec §5.4, peers §5.1).

Sources (those of the widely used updated ``download_glue_data.py``; the original Firebase URLs are dead):

* ``https://dl.fbaipublicfiles.com/glue/data/{CoLA,SST-2,QQP-clean,STS-B,MNLI,QNLIv2,RTE,WNLI}.zip``;
* AX: ``https://dl.fbaipublicfiles.com/glue/data/AX.tsv`` → ``diagnostic/diagnostic.tsv``;
* MRPC (not in a GLUE zip, for licensing reasons): SentEval's ``msr_paraphrase_train.txt`` and
  ``msr_paraphrase_test.txt`` from ``https://dl.fbaipublicfiles.com/senteval/senteval_data/`` split into train/dev by
  ``https://dl.fbaipublicfiles.com/glue/data/mrpc_dev_ids.tsv``; test.tsv gets an ``index`` column.

The unpack-and-layout step (`install_archive`, `install_ax`, `build_mrpc`) is separate from the download and works
on local files. Archive members with absolute paths, ``..`` components, links or device files are refused.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from convbert.errors import ConvBertError
from convbert.finetune.tasks import GLUE_TASKS, TASKS
from convbert.utils import atomic_path

GLUE_BASE_URL = "https://dl.fbaipublicfiles.com/glue/data/"
MRPC_BASE_URL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/"
ARCHIVES = {
    "cola": "CoLA.zip", "sst": "SST-2.zip", "qqp": "QQP-clean.zip", "sts": "STS-B.zip", "mnli": "MNLI.zip",
    "qnli": "QNLIv2.zip", "rte": "RTE.zip", "wnli": "WNLI.zip",
}
AX_FILE = "AX.tsv"
MRPC_FILES = ("msr_paraphrase_train.txt", "msr_paraphrase_test.txt")
MRPC_DEV_IDS = "mrpc_dev_ids.tsv"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def task_dir_name(task: str, layout: str) -> str:
    if layout == "glue":
        return TASKS[task].dir_names[0]
    if layout == "convbert":
        return task
    raise ConvBertError(f"unknown layout {layout!r} (expected glue or convbert)")


def _check_member_name(archive: Path, name: str) -> PurePosixPath:
    norm = name.replace("\\", "/")
    p = PurePosixPath(norm)
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or p.is_absolute():
        raise ConvBertError(f"{archive}: refusing member {name!r} with an absolute path")
    if any(part == ".." for part in p.parts):
        raise ConvBertError(f"{archive}: refusing member {name!r} with a '..' component")
    return p


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract a .zip or .tar(.gz) archive into `dest`, refusing unsafe members. Returns the extracted files."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return _extract(archive, dest)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, lzma.LZMAError) as err:
        raise ConvBertError(f"{archive}: the archive is damaged ({err}); download it again") from None


def _extract(archive: Path, dest: Path) -> list[Path]:
    out: list[Path] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:  # check everything before writing anything
                _check_member_name(archive, info.filename)
                ftype = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver stored no Unix type
                if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise ConvBertError(f"{archive}: refusing member {info.filename!r}: links and special files are not "
                                        "allowed")
            for info in infos:
                rel = _check_member_name(archive, info.filename)
                target = dest.joinpath(*rel.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.append(target)
        return out
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_member_name(archive, m.name)
                if not (m.isfile() or m.isdir()):
                    raise ConvBertError(f"{archive}: refusing member {m.name!r}: links and special files are not "
                                        "allowed")
            for m in members:
                rel = _check_member_name(archive, m.name)
                target = dest.joinpath(*rel.parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.append(target)
        return out
    raise ConvBertError(f"{archive}: not a zip or tar archive")


def _find_task_folder(root: Path, marker: str) -> Path | None:
    """The folder under `root` (itself included) that holds `marker`, skipping macOS metadata folders."""
    hits = sorted(p.parent for p in root.rglob(marker) if "__MACOSX" not in p.parts)
    return hits[0] if hits else None


def install_archive(archive: str | os.PathLike, glue_dir: str | os.PathLike, task: str, layout: str = "glue") -> Path:
    """Unpack one GLUE task archive and put its files in `glue_dir/<task folder>`; returns that folder."""
    archive, glue_dir = Path(archive), Path(glue_dir)
    spec = TASKS[task]
    marker = spec.train.filename if spec.train is not None else "train.tsv"
    glue_dir.mkdir(parents=True, exist_ok=True)
    final = glue_dir / task_dir_name(task, layout)
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=glue_dir) as tmp:
        safe_extract(archive, tmp)
        folder = _find_task_folder(Path(tmp), marker)
        if folder is None:
            raise ConvBertError(f"{archive}: no {marker} inside (is this the {spec.glue_name} archive?)")
        final.mkdir(parents=True, exist_ok=True)
        for item in folder.iterdir():
            if item.name.startswith(".") or item.name == "__MACOSX":
                continue
            target = final / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(item), str(target))
    return final


def install_ax(source: str | os.PathLike, glue_dir: str | os.PathLike, layout: str = "glue") -> Path:
    """Place the AX diagnostic file (a .tsv, or a zip holding AX.tsv/diagnostic.tsv) where `convbert glue` finds it:
    `diagnostic/diagnostic.tsv` (standard) or `mnli/diagnostic.tsv` (ConvBERT)."""
    source, glue_dir = Path(source), Path(glue_dir)
    dest = glue_dir / ("diagnostic" if layout == "glue" else "mnli") / "diagnostic.tsv"
    if zipfile.is_zipfile(source) or (source.suffix != ".tsv" and tarfile.is_tarfile(source)):
        with tempfile.TemporaryDirectory(prefix=".unpack-", dir=glue_dir if glue_dir.is_dir() else None) as tmp:
            files = safe_extract(source, tmp)
            cands = [f for f in files if f.name in ("diagnostic.tsv", "AX.tsv") and "__MACOSX" not in f.parts]
            if not cands:
                raise ConvBertError(f"{source}: no AX.tsv or diagnostic.tsv inside")
            with atomic_path(dest) as t:
                shutil.copyfile(cands[0], t)
    else:
        with atomic_path(dest) as t:
            shutil.copyfile(source, t)
    return dest


def build_mrpc(train_txt, test_txt, dev_ids_tsv, glue_dir, layout: str = "glue") -> Path:
    """MRPC train/dev/test.tsv from SentEval's msr_paraphrase files split by GLUE's dev id pairs."""
    glue_dir = Path(glue_dir)
    final = glue_dir / task_dir_name("mrpc", layout)

    def lines(path):
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except OSError as err:
            raise ConvBertError(f"{path}: cannot read ({err.strerror or err})")
        return [l.rstrip("\r") for l in text.split("\n")]

    dev_ids = set()
    for ln, l in enumerate(lines(dev_ids_tsv), start=1):
        if not l.strip():
            continue
        parts = l.split("\t")
        if len(parts) != 2:
            raise ConvBertError(f"{dev_ids_tsv}:{ln}: expected two tab-separated ids")
        dev_ids.add((parts[0].strip(), parts[1].strip()))
    train_rows, dev_rows = [], []
    for ln, l in enumerate(lines(train_txt)[1:], start=2):
        if not l.strip():
            continue
        parts = l.split("\t")
        if len(parts) != 5:
            raise ConvBertError(f"{train_txt}:{ln}: expected 5 tab-separated fields, found {len(parts)}")
        (dev_rows if (parts[1], parts[2]) in dev_ids else train_rows).append("\t".join(parts))
    test_rows = []
    for ln, l in enumerate(lines(test_txt)[1:], start=2):
        if not l.strip():
            continue
        parts = l.split("\t")
        if len(parts) != 5:
            raise ConvBertError(f"{test_txt}:{ln}: expected 5 tab-separated fields, found {len(parts)}")
        test_rows.append("\t".join([str(len(test_rows))] + parts[1:]))
    final.mkdir(parents=True, exist_ok=True)
    for name, header, rows in (
        ("train.tsv", MRPC_HEADER, train_rows),
        ("dev.tsv", MRPC_HEADER, dev_rows),
        ("test.tsv", "index\t#1 ID\t#2 ID\t#1 String\t#2 String", test_rows),
    ):
        with atomic_path(final / name) as t:
            t.write_text("\n".join([header] + rows) + "\n", encoding="utf-8")
    return final


def fetch(url: str, dest: Path) -> Path:
    """Download `url` to `dest` (atomically), with a one-line error when it fails."""
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(resp, f)
                got = f.tell()
            expected = resp.headers.get("Content-Length")
            if expected is not None and expected.strip().isdigit() and got != int(expected):
                raise _Truncated(f"got {got} of {int(expected)} bytes: the connection was cut")
    except (urllib.error.URLError, OSError, ValueError, _Truncated) as err:
        reason = getattr(err, "reason", None) or err
        raise ConvBertError(f"cannot download {url} ({reason}); check the network or pass --base-url")
    return dest


class _Truncated(Exception):
    pass


# Names accepted for each archive when laying out a folder of already-downloaded files.
ALTERNATE_NAMES = {
    "cola": ("CoLA.zip",), "sst": ("SST-2.zip", "SST.zip"), "qqp": ("QQP-clean.zip", "QQP.zip"),
    "sts": ("STS-B.zip", "STS.zip"), "mnli": ("MNLI.zip",), "qnli": ("QNLIv2.zip", "QNLI.zip"),
    "rte": ("RTE.zip",), "wnli": ("WNLI.zip",), "ax": ("AX.tsv", "AX.zip", "diagnostic.tsv"),
}


def _pick(src: Path, names: tuple[str, ...], what: str) -> Path:
    for n in names:
        if (src / n).is_file():
            return src / n
    raise ConvBertError(f"{src}: no {' or '.join(names)} for {what}")


def layout_glue(
    src_dir: str | os.PathLike,
    output: str | os.PathLike,
    tasks: list[str] | None = None,
    layout: str = "glue",
    log=print,
) -> Path:
    """Lay out a folder of downloaded GLUE files (the task zips, AX.tsv, the MRPC SentEval files and
    mrpc_dev_ids.tsv) into `output` — the offline half of `glue-download` (`--from-dir`)."""
    src, output = Path(src_dir), Path(output)
    if not src.is_dir():
        raise ConvBertError(f"--from-dir {src}: no such folder (expected the downloaded GLUE files)")
    tasks = list(tasks or list(GLUE_TASKS) + ["ax"])
    sources = {}  # every file is looked up before anything is written
    for task in tasks:
        if task == "mrpc":
            sources[task] = [_pick(src, (f,), "MRPC") for f in MRPC_FILES] + [_pick(src, (MRPC_DEV_IDS,), "MRPC")]
        elif task == "ax":
            sources[task] = [_pick(src, ALTERNATE_NAMES["ax"], "AX")]
        else:
            sources[task] = [_pick(src, ALTERNATE_NAMES[task], TASKS[task].glue_name)]
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    try:
        for task, files in sources.items():
            if task == "mrpc":
                where = build_mrpc(files[0], files[1], files[2], output, layout)
            elif task == "ax":
                where = install_ax(files[0], output, layout)
            else:
                where = install_archive(files[0], output, task, layout)
            log(f"{TASKS[task].glue_name if task != 'ax' else 'AX'}: {where}")
    except ConvBertError:
        if created:  # a damaged archive: no half-built folder is left behind
            shutil.rmtree(output, ignore_errors=True)
        raise
    return output


def download_glue(
    output: str | os.PathLike,
    tasks: list[str] | None = None,
    layout: str = "glue",
    base_url: str = GLUE_BASE_URL,
    mrpc_base_url: str = MRPC_BASE_URL,
    log=print,
) -> Path:
    """Fetch the GLUE files into a temporary folder inside `output`, then `layout_glue` them."""
    output = Path(output)
    tasks = list(tasks or list(GLUE_TASKS) + ["ax"])
    task_dir_name(tasks[0] if tasks[0] != "ax" else "mnli", layout)  # validate the layout name early
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    mrpc_base_url = mrpc_base_url if mrpc_base_url.endswith("/") else mrpc_base_url + "/"
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=output) as tmp:
        tmp = Path(tmp)
        for task in tasks:
            if task == "mrpc":
                for f in MRPC_FILES:
                    fetch(mrpc_base_url + f, tmp / f)
                fetch(base_url + MRPC_DEV_IDS, tmp / MRPC_DEV_IDS)
            elif task == "ax":
                fetch(base_url + AX_FILE, tmp / AX_FILE)
            else:
                fetch(base_url + ARCHIVES[task], tmp / ARCHIVES[task])
            log(f"downloaded {TASKS[task].glue_name if task != 'ax' else 'AX'}")
        layout_glue(tmp, output, tasks, layout, log)
    return output
