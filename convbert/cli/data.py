"""Subcommands of this area (filled in by its issue)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `convbert` parser."""
