"""A loaded GGUF model: weights, vocabulary, tokenizer and metadata."""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from seqlease.errors import ContextClosedError, ModelLoadError
from seqlease.model_path import check_model_file
from seqlease.native.guidance import Constraint, tokenizer_from
from seqlease.native.library import holding_the_gil
from seqlease.native.names import bound
from seqlease.native.params import KvShape, model_params
from seqlease.options import ModelOptions

__all__ = ["ControlToken", "NativeModel"]

#: Compiled grammars kept per model: a server's distinct response formats are few.
_COMPILED_KEPT = 64


@dataclasses.dataclass(frozen=True)
class ControlToken:
    """A token that text becomes only when special tokens are parsed (``<|im_start|>``)."""

    #: Its text in a prompt.
    text: str
    #: Its id.
    id: int
    #: llama.cpp strips the whitespace before it (``LLAMA_TOKEN_ATTR_LSTRIP``) ...
    lstrip: bool
    #: ... and after it (``LLAMA_TOKEN_ATTR_RSTRIP``) when it parses the text.
    rstrip: bool


class NativeModel:
    """One ``llama_model``: loaded here (and freed by :meth:`close`) or borrowed.

    Tokenization is thread-safe in llama.cpp; the small lock only keeps a call from running
    into :meth:`close`, which frees (or, when borrowed, forgets) the model.
    """

    def __init__(
        self,
        lib: ModuleType,
        path: str | os.PathLike[str],
        options: ModelOptions = ModelOptions(n_gpu_layers=0),  # noqa: B008 (frozen)
        *,
        vocab_only: bool = False,
    ) -> None:
        """Load the model at ``path`` as resolved ``options`` say (default: on the CPU).

        ``vocab_only=True`` reads the metadata and vocabulary, not the weights.

        Raises:
            ModelLoadError: the file is missing, a directory, not GGUF, or llama.cpp rejects it.

        """
        checked = check_model_file(path)
        params, keep = model_params(lib, options)
        params.vocab_only = vocab_only
        load = bound(lib, "load a model")
        ptr = load(os.fsencode(checked), params)
        del keep  # llama.cpp has read the tensor split by now
        if not ptr:
            raise ModelLoadError(
                f"llama.cpp could not load {str(checked)!r}: the GGUF file is damaged or uses "
                "an architecture this llama-cpp-python build does not know (see the log on "
                "logger 'seqlease.llama')"
            )
        self._setup(lib, ptr, checked, owned=True)

    @classmethod
    def borrow(cls, lib: ModuleType, ptr: Any, path: Path) -> NativeModel:
        """Wrap a ``llama_model *`` someone else owns (a ``Llama``'s); close never frees it."""
        model = cls.__new__(cls)
        model._setup(lib, ptr, path, owned=False)
        return model

    def _setup(self, lib: ModuleType, ptr: Any, path: Path, *, owned: bool) -> None:
        self._lib = lib
        self.path = path
        self._owned = owned
        self._ptr: Any = ptr
        # llama.cpp moved its tokenizer calls from the model to a vocabulary object; before,
        # the same calls took the model itself (llama-cpp-python 0.2.x, for one).
        get_vocab = getattr(lib, "llama_model_get_vocab", None)
        self._vocab: Any = get_vocab(ptr) if get_vocab is not None else ptr
        # Both are called for every token on the engine thread.
        self._is_eog = holding_the_gil(lib, bound(lib, "end-of-generation test"))
        self._token_to_piece = holding_the_gil(lib, lib.llama_token_to_piece)
        self.n_vocab: int = int(bound(lib, "vocabulary size")(self._vocab))
        self.n_ctx_train: int = int(bound(lib, "training context size")(ptr))
        self.bos: int = int(bound(lib, "BOS token")(self._vocab))
        self.eos: int = int(bound(lib, "EOS token")(self._vocab))
        self._lock = threading.Lock()
        # Grammars: llguidance's tokenizer (built once, on first use) and compiled grammars,
        # each copied per reply; a lock of their own, so that compiling never holds up the
        # engine's calls on self._lock.
        self._guidance_lock = threading.Lock()
        self._guidance_tokenizer: Any = None
        self._compiled: collections.OrderedDict[str, Constraint] = collections.OrderedDict()

    @property
    def ptr(self) -> Any:
        """The raw ``llama_model *``; raises once the model is closed."""
        if self._ptr is None:
            raise ContextClosedError("the model has been freed: the context is closed")
        return self._ptr

    def _live_vocab(self) -> Any:
        # Callers hold self._lock, so close() cannot free the model during the call.
        if self._ptr is None:
            raise ContextClosedError("the model has been freed: the context is closed")
        return self._vocab

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Tokenize ``text`` (BOS added when the model wants it and ``add_special`` is true)."""
        return self._tokenize(text.encode("utf-8"), add_special, parse_special)

    def _tokenize(self, data: bytes, add_special: bool, parse_special: bool) -> list[int]:
        with self._lock:
            vocab = self._live_vocab()
            capacity = len(data) + 8
            buf = (ctypes.c_int32 * capacity)()
            n = self._lib.llama_tokenize(
                vocab, data, len(data), buf, capacity, add_special, parse_special
            )
            if n < 0:  # the buffer was too small: -n is the size needed
                capacity = -n
                buf = (ctypes.c_int32 * capacity)()
                n = self._lib.llama_tokenize(
                    vocab, data, len(data), buf, capacity, add_special, parse_special
                )
        return list(buf[:n])

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The raw bytes of one token; may be part of a multi-byte UTF-8 character."""
        self.check_token(token)
        with self._lock:
            vocab = self._live_vocab()
            buf = ctypes.create_string_buffer(64)
            n = self._token_to_piece(vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._token_to_piece(vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        """Decode ``tokens`` to text, replacing invalid UTF-8."""
        return b"".join(self.token_to_piece(t, special=special) for t in tokens).decode(
            "utf-8", errors="replace"
        )

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...)."""
        with self._lock:
            return bool(self._is_eog(self._live_vocab(), token))

    @functools.cached_property
    def control_tokens(self) -> tuple[ControlToken, ...]:
        """The tokens ``parse_special`` matches in text, longest text first (llama.cpp's order).

        Those with the control or unknown attribute: llama.cpp matches user-defined tokens
        in text even without ``parse_special``, so those are text. One pass over the
        vocabulary (tens of milliseconds), once per model.
        """
        attr, lib = bound(self._lib, "token attributes"), self._lib
        special = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_UNKNOWN
        with self._lock:
            vocab = self._live_vocab()
            attrs = {t: a for t in range(self.n_vocab) if (a := int(attr(vocab, t))) & special}
        found = []
        for t, a in attrs.items():
            text = self.token_to_piece(t, special=True).decode("utf-8", "replace")
            if text:
                lstrip, rstrip = lib.LLAMA_TOKEN_ATTR_LSTRIP, lib.LLAMA_TOKEN_ATTR_RSTRIP
                found.append(ControlToken(text, t, bool(a & lstrip), bool(a & rstrip)))
        return tuple(sorted(found, key=lambda c: len(c.text), reverse=True))

    def constraint(self, grammar: str) -> Constraint:
        """A new :class:`Constraint` for one reply on ``grammar`` (llguidance's form).

        The first call builds llguidance's view of the vocabulary (about 0.2 s); a grammar is
        compiled once and copied for every later reply (a server sends the same schema again
        and again).

        Raises:
            GrammarError: the grammar cannot be compiled for this vocabulary.
            ContextClosedError: the model has been freed.

        """
        with self._guidance_lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.copy()
            if self._guidance_tokenizer is None:
                self._guidance_tokenizer = tokenizer_from(
                    self.n_vocab,
                    lambda token, special: self.token_to_piece(token, special=special),
                    lambda data: self._tokenize(data, False, False),
                    (t for t in range(self.n_vocab) if self.is_eog(t)),
                    self.bos,
                )
            compiled = Constraint(self._guidance_tokenizer, grammar, self.n_vocab)
            self._compiled[grammar] = compiled
            if len(self._compiled) > _COMPILED_KEPT:
                self._compiled.popitem(last=False)
            return compiled.copy()

    def is_recurrent(self) -> bool:
        """Whether the model keeps recurrent state (partial KV removal fails on those)."""
        checks = [
            getattr(self._lib, name)
            for name in ("llama_model_is_recurrent", "llama_model_is_hybrid")
            if hasattr(self._lib, name)
        ]
        with self._lock:
            return any(bool(check(self.ptr)) for check in checks)

    def check_token(self, token: int) -> None:
        """Raise a ``ValueError`` for a token id llama.cpp would reject or abort on."""
        if not 0 <= token < self.n_vocab:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.n_vocab})")

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or ``None`` when the model has no such key."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            with self._lock:
                n = self._lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def kv_shape(self) -> KvShape | None:
        """What one KV cell holds per layer, from the GGUF metadata; ``None`` when unknown.

        Models whose head counts vary by layer (stored as arrays) give ``None``.
        """
        arch = self.meta("general.architecture")
        try:
            n_layer = int(self.meta(f"{arch}.block_count") or "")
            n_embd = int(self.meta(f"{arch}.embedding_length") or "")
            n_head = int(self.meta(f"{arch}.attention.head_count") or "")
            n_head_kv = int(self.meta(f"{arch}.attention.head_count_kv") or n_head)
            head_k = int(self.meta(f"{arch}.attention.key_length") or n_embd // n_head)
            head_v = int(self.meta(f"{arch}.attention.value_length") or n_embd // n_head)
        except (ValueError, ZeroDivisionError):
            return None
        return KvShape(n_layer, head_k, head_v, n_head_kv)

    def chat_template(self) -> str | None:
        """The model's ``tokenizer.chat_template``, or ``None`` when it has none."""
        return self.meta("tokenizer.chat_template")

    def description(self) -> str:
        """llama.cpp's one-line description (architecture, size, quantization)."""
        buf = ctypes.create_string_buffer(256)
        with self._lock:
            self._lib.llama_model_desc(self.ptr, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def close(self) -> None:
        """Free the weights (a borrowed model is only forgotten); idempotent."""
        with self._lock:
            if self._ptr is not None and self._owned:
                free = bound(self._lib, "free a model")
                free(self._ptr)
            self._ptr = None
