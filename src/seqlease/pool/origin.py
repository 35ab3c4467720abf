"""Where user code took a lease, for leak warnings and "who holds what" in error messages."""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["caller_origin"]

_SKIP = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # seqlease itself
    os.path.dirname(os.path.abspath(contextlib.__file__)) + os.sep + "contextlib",
)


def caller_origin() -> str:
    """``file:line in function`` of the nearest frame outside seqlease and ``contextlib``.

    Walks raw frames (no traceback objects): this runs on every acquisition and must stay cheap.
    """
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame = frame.f_back
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
