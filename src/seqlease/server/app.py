"""The FastAPI app: OpenAI's endpoints, ``/health`` and ``/metrics``, on one Context."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seqlease.context import Context
from seqlease.server.errors import install_handlers
from seqlease.server.schemas import ChatCompletionRequest, CompletionRequest
from seqlease.server.service import Prepared, Service
from seqlease.server.streaming import ClientGone

_Body = TypeVar("_Body", ChatCompletionRequest, CompletionRequest)

__all__ = ["create_app"]

logger = logging.getLogger("seqlease.server")

#: The status logged and counted for a request whose client hung up first (nginx's usage).
CLIENT_CLOSED = 499

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def create_app(
    ctx: Context,
    *,
    queue_timeout: float | None = 60.0,
    retry_after: int = 1,
    close_timeout: float = 10.0,
) -> FastAPI:
    """An OpenAI-compatible app serving ``ctx``'s model, a lease per request.

    The app owns ``ctx``: it is closed when the app shuts down (waiting up to
    ``close_timeout`` seconds for leases still out). A request waits up to ``queue_timeout``
    seconds for a sequence (``None``: as long as it takes) among at most the Context's
    ``max_waiting`` others; beyond either it gets a 503 with ``Retry-After: retry_after``.
    """
    service = Service(ctx, queue_timeout=queue_timeout, retry_after=retry_after)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            # Uvicorn has drained the requests it waited for; fail the queue, free the model.
            # Off the loop: leases of this loop's tasks count as its thread's, and a close on
            # that thread would not wait for them (they cannot come back while it blocks).
            await anyio.to_thread.run_sync(functools.partial(ctx.close, timeout=close_timeout))

    app = FastAPI(title="seqlease", lifespan=lifespan)
    install_handlers(app)
    app.add_middleware(_CountRequests, service=service)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """A chat reply, whole or streamed (``stream: true``)."""
        return await _answer(request, await _off_loop(service.prepare_chat, body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """A raw-text completion, whole or streamed."""
        return await _answer(request, await _off_loop(service.prepare_completion, body))

    async def _off_loop(prepare: Callable[[_Body], Prepared], body: _Body) -> Prepared:
        # Rendering, tokenizing and compiling a grammar take a while for a large request:
        # on a worker thread, /health and every other stream go on meanwhile.
        return await anyio.to_thread.run_sync(prepare, body)

    async def _answer(request: Request, job: Prepared) -> Response:
        try:
            return await service.respond(request, job)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one model this server serves."""
        return {
            "object": "list",
            "data": [
                {
                    "id": service.model_id,
                    "object": "model",
                    "created": int(os.path.getmtime(ctx.model_path)),
                    "owned_by": "seqlease",
                }
            ],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while serving (with the pool's numbers), 503 once shutting down."""
        stats = ctx.stats()
        body = {
            "status": "shutting down" if ctx.closed else "ok",
            "model": service.model_id,
            "backend": ctx.backend.name,
            "sequences": stats.size,
            "busy": stats.leased,
            "waiting": stats.waiting,
        }
        return JSONResponse(body, status_code=503 if ctx.closed else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus's text format."""
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


class _CountRequests:
    """Counts every answered request by endpoint and status (a pure ASGI middleware).

    Pure ASGI, not ``BaseHTTPMiddleware``, which would buffer streams and run the endpoint
    in a task of its own, out of reach of the disconnect watcher.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self._app = app
        self._requests = service.metrics.requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"  # bounded label values

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self._app(scope, receive, counting)
