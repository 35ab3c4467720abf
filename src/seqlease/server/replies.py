"""Replies in OpenAI's shapes: whole objects, stream chunks, usage and logprobs.

One :class:`ReplyFormat` per request knows its endpoint (``chat.completion`` or
``text_completion``), its id and its creation time, and turns seqlease's text chunks and
:class:`~seqlease.Result` into what OpenAI's clients parse.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from seqlease.request.job import Result
from seqlease.request.logprobs import TokenLogprob

__all__ = ["ReplyFormat", "finish_reason", "usage"]

Endpoint = Literal["chat", "completion"]


def finish_reason(result: Result) -> str:
    """OpenAI's ``finish_reason``: ``length`` for a token limit or a full sequence, else stop."""
    return "length" if result.finish_reason == "length" else "stop"


def usage(result: Result) -> dict[str, Any]:
    """Token counts; ``cached_tokens``: prompt tokens already in memory, not evaluated."""
    return {
        "prompt_tokens": result.n_prompt,
        "completion_tokens": result.n_generated,
        "total_tokens": result.n_prompt + result.n_generated,
        "prompt_tokens_details": {"cached_tokens": result.n_prompt - result.n_evaluated},
    }


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", "replace"))


def _chat_logprobs(entries: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": entry.text,
                "logprob": entry.logprob,
                "bytes": _bytes(entry.text),
                "top_logprobs": [
                    {"token": text, "logprob": logprob, "bytes": _bytes(text)}
                    for text, logprob in entry.top
                ],
            }
            for entry in entries
        ],
        "refusal": None,
    }


def _completion_logprobs(entries: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry.text)
    return {
        "tokens": [entry.text for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [dict(entry.top) for entry in entries],
        "text_offset": offsets,
    }


class ReplyFormat:
    """The OpenAI objects of one request's reply."""

    def __init__(self, endpoint: Endpoint, model: str) -> None:
        """A reply from ``model`` (the served model's id) to a request to ``endpoint``."""
        self.endpoint = endpoint
        self.model = model
        chat = endpoint == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self._kind = "chat.completion" if chat else "text_completion"
        self._chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def _logprobs(self, result: Result) -> dict[str, Any] | None:
        if result.logprobs is None:
            return None
        entries = result.logprobs
        return _chat_logprobs(entries) if self.endpoint == "chat" else _completion_logprobs(entries)

    def whole(self, result: Result) -> dict[str, Any]:
        """The complete reply (``stream: false``)."""
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish_reason(result),
            "logprobs": self._logprobs(result),
        }
        if self.endpoint == "chat":
            choice["message"] = {"role": "assistant", "content": result.text, "refusal": None}
        else:
            choice["text"] = result.text
        return {**self._object(self._kind, [choice]), "usage": usage(result)}

    def chunk(self, text: str, *, first: bool = False) -> dict[str, Any]:
        """A stream chunk carrying ``text`` (the first also says the role, in chat)."""
        return self._chunk(self._delta(text, first=first), None, None)

    def last(self, result: Result) -> dict[str, Any]:
        """The chunk that ends the reply: its finish reason and, if asked for, the logprobs.

        seqlease reports a reply's logprobs with its result, so a stream sends them all here.
        """
        return self._chunk(self._delta("", first=False), finish_reason(result), result)

    def usage_chunk(self, result: Result) -> dict[str, Any]:
        """The extra chunk of ``stream_options.include_usage``: no choices, the usage."""
        return {**self._object(self._chunk_kind, []), "usage": usage(result)}

    def _delta(self, text: str, *, first: bool) -> dict[str, Any]:
        if self.endpoint == "completion":
            return {"text": text}
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        return {"delta": delta}

    def _chunk(
        self, body: dict[str, Any], reason: str | None, result: Result | None
    ) -> dict[str, Any]:
        choice = {
            "index": 0,
            **body,
            "finish_reason": reason,
            "logprobs": self._logprobs(result) if result is not None else None,
        }
        return self._object(self._chunk_kind, [choice])
