"""The model's chat template (GGUF ``tokenizer.chat_template``), rendered safely."""

from __future__ import annotations

import datetime
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from seqlease.errors import SeqleaseError
from seqlease.model_info import ModelInfo
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
        """:meth:`render` ``messages`` and tokenize the text with ``model``."""
        rendered = self.render(messages, add_generation_prompt=add_generation_prompt)
        # A template that writes BOS itself must not get a second one from the tokenizer.
        return model.tokenize(
            rendered, special=True, add_bos=not (self._bos and rendered.startswith(self._bos))
        )


@functools.lru_cache(maxsize=16)
def _compiled(source: str | None, bos_token: str, eos_token: str) -> ChatTemplate:
    # A session per request must not compile the same template each time (milliseconds, on
    # the event loop in async apps); a ChatTemplate never changes once built.
    return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token)
