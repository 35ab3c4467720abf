"""Errors as OpenAI sends them: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause is a 4xx that says what was wrong; "busy" is a 503 with
``Retry-After``; only a bug in seqlease is a 500, and it still has OpenAI's shape.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from seqlease.errors import (
    ContextClosedError,
    ContextOverflowError,
    PoolExhausted,
    TooManyWaiters,
)

__all__ = ["ApiError", "error_body", "install_handlers"]

logger = logging.getLogger("seqlease.server")

_FIELD = re.compile(r"^(\d+|(?!(str|int|float|bool|list|dict)$)[a-z_][a-z0-9_]*)$")

#: A value quoted back in a message is cut to this many characters.
_ECHO_CHARS = 80


class ApiError(Exception):
    """A request the server refuses, with the status and OpenAI error fields to send."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """An error answered with ``status``; ``retry_after`` adds the header (seconds)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        """The error as a JSON response."""
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        body = error_body(self.message, self.kind, param=self.param, code=self.code)
        return JSONResponse(body, status_code=self.status, headers=headers)

    @classmethod
    def busy(
        cls, exc: PoolExhausted | TooManyWaiters | ContextClosedError, retry_after: int
    ) -> ApiError:
        """The 503 for a full pool and queue, or a server shutting down."""
        closing = isinstance(exc, ContextClosedError)
        return cls(
            503,
            f"the server is shutting down: {exc}" if closing else f"the server is busy: {exc}",
            kind="server_error",
            code="shutting_down" if closing else "server_busy",
            retry_after=retry_after,
        )

    @classmethod
    def bad_input(cls, exc: Exception) -> ApiError:
        """The 400 for a value seqlease refused (sampling, prompt, grammar)."""
        code = "context_length_exceeded" if isinstance(exc, ContextOverflowError) else None
        return cls(400, str(exc), code=code)


def error_body(
    message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _quote(value: object) -> str:
    """A client's value, safe to quote: short, finite, valid UTF-8."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    if len(text) > _ECHO_CHARS:
        text = text[: _ECHO_CHARS - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {})
        return ApiError(400, f"the body is not valid JSON: {ctx.get('error', 'cannot parse')}")
    # Field names and list indices; not "body", nor the union branch pydantic tried
    # ("str", "list[TextPart]", "function-after[...]").
    loc = [str(part) for part in first.get("loc", ()) if _FIELD.match(str(part))][1:]
    param = ".".join(loc) or None
    kind = str(first.get("type", ""))
    if isinstance(first.get("input"), bytes) or (not loc and kind.endswith("_type")):
        message = "the body must be a JSON object, sent as application/json"
    elif not loc:  # a check of the whole body
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    else:
        message = f"{param}: {first.get('msg', 'invalid')}"
        if "input" in first and kind != "missing":
            message += f" (got {_quote(first['input'])})"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''}"
    return ApiError(400, message, param=param)


def install_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(
            error_body(message, kind), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = f"internal error ({type(exc).__name__}): please report it to seqlease"
        return JSONResponse(error_body(message, "server_error"), status_code=500)
