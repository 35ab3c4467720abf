"""The server's work: a request's prompt and sampling, checked, then a lease and a reply.

Everything a client can get wrong is checked before a sequence is leased (:meth:`Service.
prepare_chat`, :meth:`Service.prepare_completion`), so a bad request never takes a place in
the queue, and is a 400 that says what was wrong. A good one waits for a sequence (up to the
queue's bound), runs on it, and gives it back, cleared, however the request ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from seqlease.chat.template import ChatTemplate
from seqlease.context import Context
from seqlease.errors import (
    ContextClosedError,
    PoolExhausted,
    SeqleaseError,
    TooManyWaiters,
)
from seqlease.request.job import Result
from seqlease.request.params import SamplingParams, sanitize
from seqlease.request.prompt import check_prompt, check_text_fits, prompt_tokens
from seqlease.request.stream import AsyncGeneration
from seqlease.request.structured import check_for_model
from seqlease.sequence import Sequence
from seqlease.server.errors import ApiError, error_body
from seqlease.server.metrics import Metrics
from seqlease.server.replies import ReplyFormat
from seqlease.server.schemas import ChatCompletionRequest, CompletionRequest
from seqlease.server.streaming import EventStream, until_disconnected

__all__ = ["Prepared", "Service"]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request checked and ready to run: its prompt tokens, sampling and reply format."""

    tokens: list[int]
    params: SamplingParams
    reply: ReplyFormat
    stream: bool
    include_usage: bool


class Service:
    """What the endpoints share: the Context, the model's template, metrics, queue policy."""

    def __init__(self, ctx: Context, *, queue_timeout: float | None, retry_after: int) -> None:
        """Serve ``ctx``; a request waits ``queue_timeout`` seconds at most for a sequence."""
        self.ctx = ctx
        self.model = ctx.model
        self.template = ChatTemplate.from_model(self.model)
        #: The model's name in the API: its file name without ``.gguf``.
        self.model_id = os.path.basename(ctx.model_path).removesuffix(".gguf")
        self.metrics = Metrics(ctx)
        self.queue_timeout = queue_timeout
        self.retry_after = retry_after

    # -- checking a request, before it takes a sequence -----------------------------------

    def prepare_chat(self, body: ChatCompletionRequest) -> Prepared:
        """The chat's prompt (the model's template) and sampling, or a 400 saying why not."""
        messages = [message.plain() for message in body.messages]
        text = sum(len(m["content"]) for m in messages)
        try:
            stop = self.template.stops(body.stops())  # the template's end of turn, the caller's
        except ValueError as exc:  # too many or too long
            raise ApiError.bad_input(exc) from exc
        schema = body.response_format.reply_schema() if body.response_format else None

        def tokenize() -> list[int]:
            check_text_fits(text, self.model, self.ctx.n_ctx)
            return self.template.tokenize(self.model, messages)

        return self._prepare(
            tokenize,
            body.limit,
            ReplyFormat("chat", self.model_id),
            body.stream,
            body.include_usage,
            stop=stop,
            json_schema=schema,
            logprobs=body.logprobs,
            top_logprobs=body.top_logprobs or 0,
            **body.sampling(),
        )

    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        """The raw prompt and sampling of a legacy completion, or a 400 saying why not."""
        return self._prepare(
            lambda: prompt_tokens(body.text_or_tokens(), self.model, self.ctx.n_ctx),
            body.max_tokens,
            ReplyFormat("completion", self.model_id),
            body.stream,
            body.include_usage,
            stop=body.stops() or None,
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
            **body.sampling(),
        )

    def _prepare(
        self,
        tokenize: Callable[[], list[int]],
        limit: int | None,
        reply: ReplyFormat,
        stream: bool,
        include_usage: bool,
        **sampling: Any,
    ) -> Prepared:
        try:
            tokens = tokenize()
            check_prompt(tokens, self.ctx.n_ctx)
            # No limit: until the sequence is full, as OpenAI runs to the context's end.
            params = sanitize(max_tokens=limit or self.ctx.n_ctx - len(tokens), **sampling)
            check_for_model(self.model, params)
        except (SeqleaseError, ValueError) as exc:
            raise ApiError.bad_input(exc) from exc
        return Prepared(tokens, params, reply, stream, include_usage)

    # -- running it on a lease ----------------------------------------------------------------

    async def respond(self, request: Request, job: Prepared) -> Response:
        """Lease a sequence (waiting in the queue), run the reply, and answer."""
        arrived = time.monotonic()
        lease = AsyncExitStack()
        try:
            seq = await until_disconnected(request.receive, lambda: self._lease(lease))
            reply = _Reply(seq, job, self.metrics, arrived)
        except BaseException:
            await lease.aclose()
            raise
        lease.push_async_callback(reply.aclose)  # the reply stops before the lease ends
        if job.stream:
            return EventStream(self._events(reply, job), lease.aclose)
        async with lease:
            result = await until_disconnected(request.receive, reply.finish)
        return JSONResponse(job.reply.whole(result))

    async def _lease(self, stack: AsyncExitStack) -> Sequence:
        try:
            return await stack.enter_async_context(self.ctx.alease(self.queue_timeout))
        except (PoolExhausted, TooManyWaiters, ContextClosedError) as exc:
            raise ApiError.busy(exc, self.retry_after) from exc

    async def _events(self, reply: _Reply, job: Prepared) -> AsyncIterator[dict[str, Any]]:
        first = True
        try:
            async for text in reply.chunks():
                yield job.reply.chunk(text, first=first)
                first = False
            result = await reply.result()
        except SeqleaseError as exc:
            # The 200 is sent: the failure goes in the stream, as OpenAI reports one.
            yield error_body(f"the reply failed: {exc}", "server_error")
            return
        if first:
            yield job.reply.chunk("", first=True)  # the role, even for an empty reply
        yield job.reply.last(result)
        if job.include_usage:
            yield job.reply.usage_chunk(result)


class _Reply:
    """One generation on a leased sequence, timed for the metrics."""

    def __init__(self, seq: Sequence, job: Prepared, metrics: Metrics, arrived: float) -> None:
        self._generation: AsyncGeneration = seq.agenerate_with(job.tokens, job.params)
        self._metrics = metrics
        self._arrived = arrived
        self._first: float | None = None
        self._counted = False

    async def chunks(self) -> AsyncIterator[str]:
        async for chunk in self._generation:
            if self._first is None:
                self._first = time.monotonic()
                self._metrics.ttft.observe(self._first - self._arrived)
            yield chunk

    async def result(self) -> Result:
        result = await self._generation.result()
        if not self._counted:
            self._counted = True
            self._metrics.reply(result, self._first, time.monotonic())
        return result

    async def finish(self) -> Result:
        """Read the whole reply and return its result."""
        async for _ in self.chunks():
            pass
        return await self.result()

    async def aclose(self) -> None:
        """Stop the reply (if it still runs); a reply cut short still counts its tokens."""
        await self._generation.aclose()
        if not self._counted:
            with contextlib.suppress(Exception):  # a failed reply was reported already
                await self.result()
