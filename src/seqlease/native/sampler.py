"""A per-sequence llama.cpp sampler chain, built one stage at a time."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from typing_extensions import Self

from seqlease.errors import SeqleaseError

__all__ = ["SamplerChain"]


class SamplerChain:
    """One ``llama_sampler`` chain: add stages in order, then :meth:`sample` from logits.

    Each sequence gets its own chain: the repeat-penalty history and the random state are per
    sequence. Stage values must already be validated by the caller. The chain owns every stage
    added to it; :meth:`close` frees them all.
    """

    def __init__(self, lib: ModuleType) -> None:
        """An empty chain."""
        self._lib = lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if not chain:
            raise SeqleaseError("llama.cpp could not create a sampler chain")
        self._ptr: Any = chain

    def _add(self, stage: Any) -> Self:
        if not stage:
            raise SeqleaseError("llama.cpp could not create a sampler stage")
        self._lib.llama_sampler_chain_add(self._ptr, stage)
        return self

    def top_k(self, k: int) -> Self:
        """Keep the ``k`` most likely tokens."""
        return self._add(self._lib.llama_sampler_init_top_k(k))

    def top_p(self, p: float) -> Self:
        """Keep the smallest set of tokens whose probabilities add up to ``p``."""
        return self._add(self._lib.llama_sampler_init_top_p(p, 1))

    def min_p(self, p: float) -> Self:
        """Drop tokens less likely than ``p`` times the most likely one."""
        return self._add(self._lib.llama_sampler_init_min_p(p, 1))

    def temperature(self, t: float) -> Self:
        """Scale the logits by ``1 / t``."""
        return self._add(self._lib.llama_sampler_init_temp(t))

    def greedy(self) -> Self:
        """Pick the most likely token (the chain's last stage)."""
        return self._add(self._lib.llama_sampler_init_greedy())

    def draw(self, seed: int) -> Self:
        """Draw from the distribution with a seeded generator (the chain's last stage)."""
        return self._add(self._lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def penalties(self, n_vocab: int, last_n: int, penalty: float) -> Self:
        """Penalise tokens seen in the last ``last_n`` (``penalty`` > 1 discourages repeats)."""
        init = self._lib.llama_sampler_init_penalties
        # The arity drifted: (last_n, repeat, freq, present) in 0.3.x up to at least 0.3.16,
        # with the vocabulary size in front again in the newest releases.
        if len(init.argtypes) == 4:
            return self._add(init(last_n, penalty, 0.0, 0.0))
        if len(init.argtypes) == 5:
            return self._add(init(n_vocab, last_n, penalty, 0.0, 0.0))
        raise SeqleaseError(
            "this llama-cpp-python's llama_sampler_init_penalties takes "
            f"{len(init.argtypes)} arguments; use repeat_penalty=1.0 or upgrade the binding"
        )

    def sample(self, ctx_ptr: Any, index: int) -> int:
        """Draw a token from the logits of batch row ``index`` (and accept it into the chain)."""
        return int(self._lib.llama_sampler_sample(self._ptr, ctx_ptr, index))

    def accept(self, token: int) -> None:
        """Feed a token the model did not sample (a prompt token) to the penalty history."""
        self._lib.llama_sampler_accept(self._ptr, token)

    def close(self) -> None:
        """Free the chain and every stage in it; idempotent."""
        if self._ptr is not None:
            self._lib.llama_sampler_free(self._ptr)
            self._ptr = None
