"""A per-sequence llama.cpp sampler chain."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from seqlease.errors import SeqleaseError

__all__ = ["NativeSampler"]


class NativeSampler:
    """Penalties, top-k, top-p, min-p and temperature, then a seeded draw (or greedy at temp 0).

    Each sequence gets its own chain: the repeat penalty and the random state are per sequence.
    """

    def __init__(
        self,
        lib: ModuleType,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repeat_penalty: float,
        repeat_last_n: int,
        seed: int,
        n_vocab: int,
    ) -> None:
        """Build the chain. Values must already be validated by the caller."""
        self._lib = lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if not chain:
            raise SeqleaseError("llama.cpp could not create a sampler chain")
        self._ptr: Any = chain
        add = lib.llama_sampler_chain_add
        # Penalties scan the candidates: after top-k they look at k tokens, not the vocabulary.
        if top_k > 0 and temperature > 0.0:
            add(chain, lib.llama_sampler_init_top_k(top_k))
        if repeat_penalty != 1.0:
            add(chain, self._penalties(n_vocab, repeat_last_n, repeat_penalty))
        if temperature <= 0.0:
            add(chain, lib.llama_sampler_init_greedy())
            return
        if top_p < 1.0:
            add(chain, lib.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            add(chain, lib.llama_sampler_init_min_p(min_p, 1))
        add(chain, lib.llama_sampler_init_temp(temperature))
        add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def _penalties(self, n_vocab: int, last_n: int, penalty: float) -> Any:
        init = self._lib.llama_sampler_init_penalties
        # The arity drifted: (last_n, repeat, freq, present) in 0.3.x up to at least 0.3.16,
        # with the vocabulary size in front again in the newest releases.
        if len(init.argtypes) == 4:
            return init(last_n, penalty, 0.0, 0.0)
        if len(init.argtypes) == 5:
            return init(n_vocab, last_n, penalty, 0.0, 0.0)
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
        """Free the chain and every sampler in it; idempotent."""
        if self._ptr is not None:
            self._lib.llama_sampler_free(self._ptr)
            self._ptr = None
