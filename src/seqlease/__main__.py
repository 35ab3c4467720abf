"""``python -m seqlease`` and the ``seqlease`` console script."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run a seqlease command (``doctor``, ...) and return its exit status.

    ``argv`` defaults to ``sys.argv[1:]``. The commands are imported here rather than at module
    level so that ``import seqlease.__main__`` stays cheap.
    """
    from seqlease.cli import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
