"""An OpenAI-compatible HTTP server on a :class:`seqlease.Context` (the ``web`` extra).

``python -m seqlease serve`` runs it; :func:`create_app` gives the FastAPI app, to mount or
run under another ASGI server. One Context serves every request, each on a sequence leased
for exactly as long as its reply runs.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"the seqlease server needs the web extra ({exc.name} is missing): "
        "pip install 'seqlease[web]'"
    ) from exc

from seqlease.server.app import create_app

__all__ = ["create_app"]
