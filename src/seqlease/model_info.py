"""``ctx.model``: the loaded model's vocabulary, tokenizer, template and metadata, public."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol

from seqlease.native.guidance import Constraint, gbnf_grammar
from seqlease.native.model import ControlToken
from seqlease.persist.fingerprint import model_fingerprint

__all__ = ["ModelInfo"]


class _Native(Protocol):
    """What :class:`ModelInfo` reads of a loaded model (``seqlease.native.model``)."""

    path: Path
    n_vocab: int
    n_ctx_train: int
    bos: int
    eos: int

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]: ...

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes: ...

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str: ...

    def is_eog(self, token: int) -> bool: ...

    @property
    def control_tokens(self) -> tuple[ControlToken, ...]: ...

    def constraint(self, grammar: str) -> Constraint: ...

    def chat_template(self) -> str | None: ...


class ModelInfo:
    """The model a :class:`~seqlease.Context` loaded: ``ctx.model`` and ``seq.model``.

    Tokenizing is thread-safe and needs no lease. Valid while the context is open.
    """

    def __init__(self, native: _Native) -> None:
        """Internal: the backends make one per loaded model."""
        self._native = native
        #: The GGUF file the model was loaded from.
        self.path: Path = native.path
        #: A digest of the model file taken at load (what saved states are checked against).
        self.fingerprint: str = model_fingerprint(native.path)
        #: Vocabulary size: token ids are ``[0, n_vocab)``.
        self.n_vocab: int = native.n_vocab
        #: The context length the model was trained with.
        self.n_ctx_train: int = native.n_ctx_train
        #: Beginning-of-sequence token id (-1: none).
        self.bos: int = native.bos
        #: End-of-sequence token id (-1: none).
        self.eos: int = native.eos
        #: The GGUF ``tokenizer.chat_template`` (``None``: the model has none).
        self.chat_template: str | None = native.chat_template()

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, as ``llama_cpp.Llama.tokenize`` gives them.

        ``special=True`` turns control-token text (``<|im_start|>``) into control tokens;
        by default it is plain text. ``add_bos`` adds BOS where the model wants one.
        """
        return self._native.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        """Text of ``tokens`` (invalid UTF-8 replaced); ``special`` renders control tokens."""
        return self._native.detokenize(list(tokens), special=special)

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The raw bytes of one token (possibly part of a multi-byte character)."""
        return self._native.token_to_piece(token, special=special)

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, end of turn, ...)."""
        return self._native.is_eog(token)

    @property
    def control_tokens(self) -> tuple[ControlToken, ...]:
        """The tokens that text becomes only with ``special=True``, longest text first.

        What a chat template's markup may contain and a message's content may not: see
        :meth:`ChatTemplate.tokenize <seqlease.chat.template.ChatTemplate.tokenize>`.
        """
        return self._native.control_tokens

    @functools.cached_property
    def max_piece_bytes(self) -> int:
        """The longest text one token stands for, in bytes (one pass over the vocabulary)."""
        return max(len(self.token_to_piece(t, special=True)) for t in range(self.n_vocab))

    @functools.cached_property
    def bos_tokens(self) -> tuple[int, ...]:
        """What ``add_bos=True`` puts before a text: ``(bos,)`` or ``()`` (the model says)."""
        return tuple(t for t in self.tokenize("", add_bos=True) if t == self.bos >= 0)

    @functools.cached_property
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token id (``logit_bias`` of -100 on each: never end)."""
        return tuple(t for t in range(self.n_vocab) if self._native.is_eog(t))

    def check_grammar(self, text: str) -> None:
        """Raise :class:`~seqlease.GrammarError` unless the GBNF ``text`` compiles here."""
        self._native.constraint(gbnf_grammar(text))

    def constraint(self, grammar: str) -> Constraint:
        """A new grammar state for one reply, from ``SamplingParams.grammar``.

        Compiled once per model and grammar, then copied: what every generating call does
        with ``grammar=`` or ``json_schema=`` before anything is queued.

        Raises:
            GrammarError: the grammar cannot be compiled for this vocabulary.

        """
        return self._native.constraint(grammar)

    def __repr__(self) -> str:
        return f"<seqlease.ModelInfo {self.path.name} n_vocab={self.n_vocab}>"
