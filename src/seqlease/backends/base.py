"""What every backend offers a :class:`~seqlease.Context`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from seqlease.engine.job import Event, Job
from seqlease.engine.params import SamplingParams
from seqlease.errors import ContextOverflowError

__all__ = ["Backend", "ModelInfo", "check_prompt"]


class ModelInfo(Protocol):
    """The tokenizer and metadata side of a loaded model."""

    @property
    def bos(self) -> int:
        """Beginning-of-sequence token id."""
        ...

    @property
    def eos(self) -> int:
        """End-of-sequence token id."""
        ...

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        ...

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Token ids of ``text``."""
        ...

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """Bytes of one token."""
        ...

    def check_token(self, token: int) -> None:
        """Raise ``ValueError`` for an id outside the vocabulary."""
        ...

    def chat_template(self) -> str | None:
        """The GGUF ``tokenizer.chat_template``, if any."""
        ...


class Backend(Protocol):
    """A way to run generations for leased sequences."""

    #: "session" or "completion".
    name: str

    @property
    def model(self) -> ModelInfo:
        """The loaded model's tokenizer and metadata."""
        ...

    def generate(
        self,
        seq_id: int,
        prompt: list[int],
        params: SamplingParams,
        abort: threading.Event | None,
        emit: Callable[[Event], None],
    ) -> Job:
        """Start one generation for ``seq_id``; its events go to ``emit``."""
        ...

    def clear_sequence(self, seq_id: int) -> None:
        """Stop the sequence's generation and forget what it holds (on release)."""
        ...

    def n_tokens(self, seq_id: int) -> int:
        """Tokens the sequence holds in memory."""
        ...

    def close(self) -> None:
        """Free everything; idempotent."""
        ...


def check_prompt(prompt: list[int], n_ctx: int, model: ModelInfo) -> None:
    """Reject, before any native call, a prompt no backend can run.

    Raises:
        ValueError: the prompt is empty or holds a token outside the vocabulary.
        ContextOverflowError: it leaves no room for a reply in ``n_ctx`` tokens.

    """
    if not prompt:
        raise ValueError("a prompt must have at least one token")
    if len(prompt) >= n_ctx:
        raise ContextOverflowError(
            f"the prompt has {len(prompt)} tokens but a sequence holds n_ctx={n_ctx} "
            "tokens, and at least one must be left for the reply: shorten the prompt or "
            "create the Context with a larger n_ctx"
        )
    for token in prompt:
        model.check_token(token)
