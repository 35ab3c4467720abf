"""The request bodies the server accepts, as pydantic models in OpenAI's field names.

Validation is strict where a silent reinterpretation would change a reply: an unknown field
is refused (a misspelt ``temprature`` must not be ignored), ``"8"`` is no ``max_tokens``, and
NaN or Infinity (which Python's JSON parser reads) is no temperature. Fields OpenAI clients
send that change nothing here (``user``, ``n=1``, zero penalties) are accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from seqlease.checks import check_text

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ResponseFormat",
    "StreamOptions",
]

#: llama.cpp keeps seeds as 32 bits; OpenAI clients send any int64.
_INT64 = 1 << 63


def _text(value: str) -> str:
    """Text the tokenizer can take as meant: valid Unicode (the library's check), no NUL."""
    check_text("text", value)
    if "\0" in value:
        raise ValueError(f"holds a NUL character at index {value.index(chr(0))}")
    return value


Text = Annotated[str, AfterValidator(_text)]


class _Strict(BaseModel):
    # forbid: unknown fields are errors; strict: no coercion ("8" is not 8, true is not 1);
    # no NaN or Infinity.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    """One part of a message's content; only text parts can be read by a text model."""

    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    """One message of a conversation. ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        """The message as the chat template takes it: role and text."""
        content = self.content
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: a named schema the reply must follow."""

    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", ...}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self

    def reply_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the reply is held to, if any (any object for ``json_object``)."""
        if self.json_schema is not None:
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints take; seqlease's defaults apply to what is left out."""

    model: str = Field(max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    # llama.cpp's samplers, which llama-server also takes under these names.
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = Field(default=None, ge=-_INT64, lt=_INT64)
    stop: Text | list[Text] | None = Field(default=None)
    logit_bias: dict[str, float] | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    user: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> _Sampling:
        stops = self.stops()
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are in [-100, 100], not {bias}")
        return self

    def stops(self) -> list[str]:
        """The caller's stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments for seqlease's generating calls (without ``stop`` and tokens)."""
        options: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty,
            "seed": self.seed,
        }
        if self.logit_bias:
            options["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        return {key: value for key, value in options.items() if value is not None}

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages must hold at least one user message")
        return self

    @property
    def limit(self) -> int | None:
        """The reply's token limit; ``None``: until the sequence is full."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    """The body of ``POST /v1/completions`` (legacy completions: raw text, no template)."""

    prompt: Text | list[Text] | list[int] = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] = 1

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError("prompt takes one text (or a list of one); batch by sending more")
        return self

    def text_or_tokens(self) -> str | list[int]:
        """The prompt as text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        return prompt[0] if isinstance(prompt[0], str) else [int(t) for t in prompt]
