"""A reusable ``llama_token_data_array``: one candidate per vocabulary entry, from logits."""

from __future__ import annotations

import ctypes
from types import ModuleType
from typing import Any

import numpy as np

from seqlease.errors import NativeError

__all__ = ["Candidates"]


class Candidates:
    """Every token with its logit, for ``llama_sampler_apply`` to filter and choose from.

    The buffer is allocated once and refilled per token through a NumPy view (a Python loop
    over 49k entries would cost more than the decode).
    """

    def __init__(self, lib: ModuleType, n_vocab: int) -> None:
        """Room for ``n_vocab`` candidates."""
        self._lib = lib
        self._n_vocab = n_vocab
        self._data = (lib.llama_token_data * n_vocab)()
        self._view: Any = np.ctypeslib.as_array(self._data)
        self._ids = np.arange(n_vocab, dtype=self._view["id"].dtype)
        self._array = lib.llama_token_data_array()
        self._one = (lib.llama_token_data * 1)()
        self._single = lib.llama_token_data_array()

    def load(self, logits: Any) -> None:
        """Start over from one row of logits (``n_vocab`` floats, by token id)."""
        view = self._view
        view["id"] = self._ids
        view["logit"] = logits
        view["p"] = 0.0
        array = self._array
        # A sampler may point ``data`` at a buffer of its own: start from ours every time.
        array.data = ctypes.cast(self._data, type(array.data))
        array.size = self._n_vocab
        array.selected = -1
        array.sorted = False

    def apply(self, sampler: Any) -> None:
        """Let ``sampler`` filter, reorder or choose among the candidates."""
        self._lib.llama_sampler_apply(sampler, ctypes.byref(self._array))

    def selected(self) -> int:
        """The token the last sampler applied chose."""
        array = self._array
        if not 0 <= array.selected < array.size:
            raise NativeError(f"llama.cpp's sampler chose no token (selected={array.selected})")
        return int(array.data[array.selected].id)

    def ruled_out(self) -> Any:
        """Ids of the candidates a sampler set to ``-inf``."""
        view = self._view[: self._array.size]
        return view["id"][np.isneginf(view["logit"])]

    def allows(self, sampler: Any, token: int) -> bool:
        """Whether ``sampler`` (a grammar) leaves ``token`` a finite logit."""
        self._one[0].id = token
        self._one[0].logit = 1.0
        self._one[0].p = 0.0
        single = self._single
        single.data = ctypes.cast(self._one, type(single.data))
        single.size = 1
        single.selected = -1
        single.sorted = False
        self._lib.llama_sampler_apply(sampler, ctypes.byref(single))
        return bool(np.isfinite(single.data[0].logit))
