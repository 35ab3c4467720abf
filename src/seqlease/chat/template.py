"""The model's chat template (GGUF ``tokenizer.chat_template``), rendered safely."""

from __future__ import annotations

import datetime
import functools
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from seqlease.errors import SeqleaseError
from seqlease.model_info import ModelInfo
from seqlease.native.model import ControlToken
from seqlease.request.text import USER_TURN_MARKERS, check_stop

__all__ = ["FALLBACK_TEMPLATE", "ChatTemplate"]

#: For models without a template: the plain "USER:/ASSISTANT:" format the seed note's app used.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}USER: {{ m.content }}\n"
    "{% else %}ASSISTANT: {{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# End-of-turn markers of common template families; those that occur in a template stop a reply.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


# What C's isspace() strips beside an lstrip/rstrip token in llama.cpp's tokenizer.
_SPACE = " \t\n\v\f\r"


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    """A Jinja chat template in a sandbox (templates ship inside downloaded model files)."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        """Compile ``source``; ``None`` selects :data:`FALLBACK_TEMPLATE`."""
        #: Whether the model had no template of its own.
        self.is_fallback = source is None
        self.source = FALLBACK_TEMPLATE if source is None else source
        self._bos = bos_token
        self._eos = eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise SeqleaseError(f"the model's chat template does not compile: {exc}") from exc
        markers = [m for m in _END_OF_TURN if m in self.source]
        if eos_token and eos_token not in markers:
            markers.append(eos_token)
        #: Strings that end an assistant turn in this template. In the fallback layout a
        #: turn ends where the next begins, so they include its user-turn markers (``USER:``).
        self.end_of_turn: tuple[str, ...] = (
            USER_TURN_MARKERS + tuple(markers) if self.is_fallback else tuple(markers)
        )

    def stops(self, stop: str | Sequence[str] | None = None) -> tuple[str, ...]:
        """A reply's stop strings: this template's end of turn always, then ``stop``'s.

        The one rule of every chat reply (sessions and the server). The user-turn marker a
        reply must stop at is the template's own turn markup (ChatML's ``<|im_end|>``, ...):
        the literal ``USER:`` is one only in the fallback layout, so a reply of a real
        template may say "USER:". A caller's ``stop`` (one string or several) adds to the
        end of turn, never replaces it.
        """
        return tuple(dict.fromkeys((*self.end_of_turn, *check_stop(stop, allow_empty=False))))

    @classmethod
    def from_model(cls, model: ModelInfo, source: str | None = None) -> ChatTemplate:
        """The model's template (or ``source``) with its BOS/EOS texts; fallback if none.

        ``source``: a template saved with a chat, so that a resumed conversation is rendered
        exactly as its saved memory was.
        """

        def text(token: int) -> str:
            if token < 0:
                return ""
            return model.token_to_piece(token, special=True).decode("utf-8", "replace")

        if source is None:
            source = model.chat_template
        return _compiled(source, text(model.bos), text(model.eos))

    def render(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for ``messages``, ending where the assistant's reply begins."""
        context: dict[str, Any] = {
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._bos,
            "eos_token": self._eos,
        }
        try:
            return self._template.render(**context)
        except TemplateError as exc:
            raise SeqleaseError(f"the model's chat template failed: {exc}") from exc

    def tokenize(
        self,
        model: ModelInfo,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """:meth:`render` ``messages`` and tokenize the text with ``model``.

        Message content is data: only the template's own markup becomes control tokens.
        ``<|im_end|>`` typed in a message stays those characters, as OpenAI's API treats
        content; llama.cpp's own tokenizer would make it a real end of turn.

        Raises:
            SeqleaseError: a message holds control-token text and the template rewrites
                content beyond trimming it, so content cannot be told from markup.

        """
        rendered = self.render(messages, add_generation_prompt=add_generation_prompt)
        parts = self._parts(messages, rendered, add_generation_prompt, model.control_tokens)
        items: list[str | ControlToken] = []
        for text, markup in parts:
            items.extend(_partition(text, model.control_tokens) if markup else [text])
        # A template that writes BOS itself must not get a second one from the tokenizer.
        tokens = [] if self._bos and rendered.startswith(self._bos) else list(model.bos_tokens)
        for item in _stripped(items):
            if isinstance(item, str):
                tokens += model.tokenize(item, special=False, add_bos=False)
            else:
                tokens.append(item.id)
        return tokens

    def _parts(
        self,
        messages: Sequence[Mapping[str, str]],
        rendered: str,
        add_generation_prompt: bool,
        controls: Sequence[ControlToken],
    ) -> list[tuple[str, bool]]:
        # Where content lies in ``rendered``: render once more with each content replaced by
        # a mark no text can hold, then read ``rendered`` along that skeleton. Searching for
        # the content instead is fooled by content that repeats the markup around it.
        key = secrets.token_hex(8)
        shaped = [
            {**m, "content": f"\ue000{key}{i}\ue001"}
            if isinstance(m.get("content"), str) and m["content"]
            else dict(m)
            for i, m in enumerate(messages)
        ]
        skeleton = re.split(
            f"\ue000{key}(\\d+)\ue001",
            self.render(shaped, add_generation_prompt=add_generation_prompt),
        )
        parts = [(skeleton[0], True)]
        at = len(skeleton[0])
        fits = rendered.startswith(skeleton[0])
        for index, markup in zip(skeleton[1::2], skeleton[2::2], strict=True):
            content = messages[int(index)]["content"]
            # Templates trim content (Llama 3, Gemma); any other rewrite is not followed.
            for text in dict.fromkeys(
                (content, content.strip(), content.lstrip(), content.rstrip())
            ):
                if rendered.startswith(text, at) and rendered.startswith(markup, at + len(text)):
                    break
            else:
                fits = False
                break
            parts += [(text, False), (markup, True)]
            at += len(text) + len(markup)
        if fits and at == len(rendered):
            return parts
        for m in messages:
            said = m.get("content")
            hit = next((c.text for c in controls if isinstance(said, str) and c.text in said), None)
            if hit is not None:
                raise SeqleaseError(
                    f"a {m.get('role', '')} message holds the control-token text {hit!r}, and "
                    "this model's chat template rewrites message content, so seqlease cannot "
                    "keep it plain text: remove it from the message"
                )
        return [(rendered, True)]  # no content can turn into control tokens


def _partition(text: str, controls: Sequence[ControlToken]) -> list[str | ControlToken]:
    """``text`` cut at control-token texts, longest first: llama.cpp's ``parse_special``."""
    pieces: list[str | ControlToken] = [text]
    for control in controls:
        if not any(isinstance(p, str) and control.text in p for p in pieces):
            continue
        cut: list[str | ControlToken] = []
        for piece in pieces:
            if not isinstance(piece, str):
                cut.append(piece)
                continue
            for i, chunk in enumerate(piece.split(control.text)):
                if i:
                    cut.append(control)
                if chunk:
                    cut.append(chunk)
        pieces = cut
    return pieces


def _stripped(items: list[str | ControlToken]) -> list[str | ControlToken]:
    """Adjacent texts joined, whitespace stripped beside ``lstrip``/``rstrip`` tokens."""
    out: list[str | ControlToken] = []
    strip_next = False
    for item in items:
        if isinstance(item, str):
            text = item.lstrip(_SPACE) if strip_next else item
            if out and isinstance(out[-1], str):
                out[-1] += text
            elif text:
                out.append(text)
            strip_next = False
            continue
        if item.lstrip and out and isinstance(out[-1], str):
            out[-1] = out[-1].rstrip(_SPACE)
            if not out[-1]:
                out.pop()
        out.append(item)
        strip_next = item.rstrip
    return out


@functools.lru_cache(maxsize=16)
def _compiled(source: str | None, bos_token: str, eos_token: str) -> ChatTemplate:
    # A session per request must not compile the same template each time (milliseconds, on
    # the event loop in async apps); a ChatTemplate never changes once built.
    return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token)
