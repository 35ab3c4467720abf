"""The ``seqlease`` command line: one module per subcommand.

Each command module exposes ``NAME``, ``HELP`` and ``register(parser)``, which adds the
command's arguments and sets a ``handler(args) -> int`` default on the parser. Adding a command
(``demo``, ``chat``) means writing ``seqlease/cli/<name>.py`` and listing it in ``_COMMANDS``;
a command module should import the heavy parts of seqlease inside its handler, so ``--help``
and the other commands stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Protocol

from seqlease.cli import chat, demo, doctor, serve

__all__ = ["build_parser", "run"]

Handler = Callable[[argparse.Namespace], int]


class _Command(Protocol):
    NAME: str
    HELP: str

    def register(self, parser: argparse.ArgumentParser) -> None: ...


_COMMANDS: tuple[_Command, ...] = (doctor, demo, chat, serve)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="seqlease",
        description="Safe, leak-proof, batched llama.cpp sequences from Python.",
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        sub = commands.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        command.register(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        # No command given: say what there is instead of doing nothing silently.
        parser.print_help(sys.stderr)
        return 2
    return handler(args)
