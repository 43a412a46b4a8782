"""Every `convbert <command> --flag` written in the README and the docs names a command and flags that exist.

A renamed or removed flag leaves the docs wrong without breaking any other test; this reads every command line in
the Markdown (code blocks and inline code) and checks its subcommand and each `--flag` against the real parser.
`docs/errors.md` is left out: its rows quote bad command lines on purpose.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from convbert.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if p.name != "errors.md")]
COMMAND = re.compile(r"(?:^|[`\s(])(?:torchrun [^`\n]*?-m )?convbert ([a-z][a-z-]*)((?: [^`\n|]*)?)")


def _subcommand_options() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def documented_commands() -> list[tuple[str, str, str]]:
    """(file, subcommand, rest of the line) for every `convbert <word> ...` in the docs."""
    found = []
    for doc in DOCS:
        for line in (ROOT / doc).read_text(encoding="utf-8").splitlines():
            for m in COMMAND.finditer(line):
                found.append((doc, m.group(1), m.group(2)))
    return found


def test_the_docs_mention_every_subcommand():
    mentioned = {cmd for _, cmd, _ in documented_commands()}
    assert set(_subcommand_options()) <= mentioned


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_and_flags_exist(doc):
    options = _subcommand_options()
    problems = []
    for where, cmd, rest in documented_commands():
        if where != doc or cmd in ("import",):  # "from convbert import ..." in prose
            continue
        if cmd not in options:
            problems.append(f"convbert {cmd}: no such command")
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if flag not in options[cmd] | {"--debug", "--help"}:
                problems.append(f"convbert {cmd} {flag}: no such flag")
    assert not problems, f"{doc}: " + "; ".join(sorted(set(problems)))
