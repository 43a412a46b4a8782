"""A corpus that needs no download: the documentation that ships with the running Python.

Sources, read as text with `ast` (nothing is imported or executed):

* the docstrings of modules, classes and functions in the standard library's `.py` files (tests, IDLE, tkinter,
  site-packages and `__pycache__` skipped);
* the language/library reference topics in `pydoc_data/topics.py` (the text `help()` shows).

Files are visited in sorted order, so the corpus is deterministic for a given Python version. Each docstring or topic is
one document; the text is split into sentences, one per line, with a blank line between documents (the layout
`convbert build-data` reads). Interactive examples (`>>>` and their output) and code-like lines are dropped.
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

from convbert.errors import ConvBertError

SKIP_PARTS = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "site-packages", "dist-packages",
              "__pycache__", "lib2to3", "ensurepip", "venv"}
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")
_WS = re.compile(r"\s+")


@dataclass
class Document:
    module: str  # dotted module name (or "pydoc_topics.<topic>")
    name: str  # qualified object name inside the module ("" for the module docstring)
    sentences: list[str]


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths()["stdlib"])
    if not path.is_dir():
        raise ConvBertError(f"cannot find the Python standard library (expected it at {path})")
    return path


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _looks_like_code(line: str) -> bool:
    s = line.strip()
    if s.startswith((">>>", "...", "$ ", "%", "#", "{", "}", "|", "+-", "==", "--")):
        return True
    symbols = sum(ch in "=(){}[]<>;:_*/\\|" for ch in s)
    return len(s) > 0 and symbols / len(s) > 0.2


def split_sentences(text: str, min_words: int = 3) -> list[str]:
    """Paragraph-wise sentence split; drops doctests, code-like and very short lines."""
    sentences: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if not paragraph:
            return
        joined = _WS.sub(" ", " ".join(paragraph)).strip()
        paragraph.clear()
        for sent in _SENT_SPLIT.split(joined):
            sent = sent.strip()
            if len(sent.split()) >= min_words and any(c.isalpha() for c in sent):
                sentences.append(sent)

    in_example = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            flush()
            in_example = False
            continue
        if line.startswith(">>>"):
            flush()
            in_example = True
            continue
        if in_example or _looks_like_code(line) or set(line) <= set("-=~^*#"):
            flush()
            continue
        paragraph.append(line)
    flush()
    return sentences


def _docstrings(tree: ast.Module) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        out.append(("", doc))

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                d = ast.get_docstring(child, clean=True)
                if d:
                    out.append((name, d))
                if isinstance(child, ast.ClassDef):
                    visit(child, name + ".")

    visit(tree, "")
    return out


def _topics(root: Path) -> list[Document]:
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str):
                    sents = split_sentences(v.value)
                    if sents:
                        docs.append(Document(f"pydoc_topics.{k.value}", "", sents))
            break
    return docs


def _chars(d: Document) -> int:
    return sum(len(s) + 1 for s in d.sentences)


def harvest(max_chars: int | None = None, include_topics: bool = True) -> list[Document]:
    """All documents in a fixed order; with `max_chars`, a deterministic spread-out subset of about that size."""
    docs = list(_harvest_all(include_topics))
    total = sum(_chars(d) for d in docs)
    if max_chars is None or total <= max_chars:
        return docs
    keep = max_chars / total
    return [d for d in docs if zlib.crc32(f"{d.module}:{d.name}".encode("utf-8")) / 2**32 < keep]


@functools.lru_cache(maxsize=2)
def _harvest_all(include_topics: bool = True) -> tuple[Document, ...]:
    root = stdlib_dir()
    docs: list[Document] = list(_topics(root)) if include_topics else []
    for path in sorted(root.rglob("*.py")):
        rel_parts = path.relative_to(root).parts
        if any(part in SKIP_PARTS or part.startswith("config-") for part in rel_parts[:-1]):
            continue
        if path.name.startswith(("test_", "_sysconfigdata")) or path.name in ("antigravity.py", "this.py"):
            continue
        if path.parent == root / "pydoc_data":
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        module = _module_name(root, path)
        for name, doc in _docstrings(tree):
            sents = split_sentences(doc)
            if sents:
                docs.append(Document(module, name, sents))
    if not docs:
        raise ConvBertError(f"no docstrings found under {root}")
    return tuple(docs)


def is_heldout(module: str, fraction: float) -> bool:
    """Deterministic module-level split (a stable hash, not Python's salted `hash`)."""
    key = module if module.startswith("pydoc_topics.") else module.split(".")[0]
    return (zlib.crc32(key.encode("utf-8")) % 10_000) < fraction * 10_000


def write_corpus(output: str | Path, max_chars: int | None = 3_000_000, heldout_fraction: float = 0.1) -> dict:
    """Write `train.txt` and `heldout.txt` (one sentence per line, blank line between documents)."""
    from convbert.utils import write_text_atomic

    output = Path(output)
    docs = harvest(max_chars)
    parts: dict[str, list[str]] = {"train": [], "heldout": []}
    counts = {"train": 0, "heldout": 0}
    for d in docs:
        split = "heldout" if is_heldout(d.module, heldout_fraction) else "train"
        parts[split].append("\n".join(d.sentences) + "\n")
        counts[split] += len(d.sentences)
    if not parts["heldout"]:  # tiny harvests: hold out the last documents instead
        k = max(1, len(parts["train"]) // 10)
        parts["heldout"], parts["train"] = parts["train"][-k:], parts["train"][:-k]
    output.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, chunks in parts.items():
        text = "\n".join(chunks)
        write_text_atomic(output / f"{split}.txt", text)
        stats[split] = {"documents": len(chunks), "characters": len(text), "path": str(output / f"{split}.txt")}
    return stats
