"""A per-sequence llama.cpp sampler chain, built one stage at a time."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from typing_extensions import Self

from seqlease.errors import SeqleaseError
from seqlease.native.guidance import Constraint
from seqlease.native.library import holding_the_gil

if TYPE_CHECKING:
    from seqlease.native.context import NativeContext

__all__ = ["SamplerChain"]


class SamplerChain:
    """One ``llama_sampler`` chain: add stages in order, then :meth:`sample` from logits.

    Each sequence gets its own chain: the repeat-penalty history, the random state and the
    grammar's position are per sequence. Stage values must already be validated by the caller.
    The chain owns every stage added to it; :meth:`close` frees them all.

    A grammar is kept beside the chain, not in it: it masks the logits before the chain sees
    them, and prompt tokens fed to the repeat penalty (:meth:`accept`) must not reach it.
    """

    def __init__(self, lib: ModuleType, context: NativeContext) -> None:
        """An empty chain that samples from ``context``'s logits."""
        self._lib = lib
        self._context = context
        # Called for every token on the engine thread (see holding_the_gil).
        self._sample = holding_the_gil(lib, lib.llama_sampler_sample)
        self._accept = holding_the_gil(lib, lib.llama_sampler_accept)
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if not chain:
            raise SeqleaseError("llama.cpp could not create a sampler chain")
        self._ptr: Any = chain
        self._grammar: Constraint | None = None

    def _add(self, stage: Any) -> Self:
        if not stage:
            raise SeqleaseError("llama.cpp could not create a sampler stage")
        self._lib.llama_sampler_chain_add(self._ptr, stage)
        return self

    def logit_bias(self, n_vocab: int, biases: Sequence[tuple[int, float]]) -> Self:
        """Add ``bias`` to the logit of each ``token`` (ids already checked against the vocab)."""
        lib = self._lib
        entries = (lib.llama_logit_bias * len(biases))(
            *(lib.llama_logit_bias(token, bias) for token, bias in biases)
        )
        # llama.cpp copies the entries: they need not outlive this call.
        return self._add(lib.llama_sampler_init_logit_bias(n_vocab, len(biases), entries))

    def constrain(self, grammar: Constraint) -> Self:
        """Only let tokens through that ``grammar`` (this reply's own) allows."""
        self._grammar = grammar
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

    def sample(self, row: int) -> int:
        """Draw a token from the logits of batch ``row`` (and accept it into the chain).

        Raises:
            GrammarError: the grammar allows no token at all here (accepting one it refuses
                would abort the process).

        """
        grammar = self._grammar
        if grammar is None:
            return int(self._sample(self._ptr, self._context.ptr, row))
        # llama_sampler_sample reads the very logits the grammar has just masked.
        grammar.restrict(self._context.logit_row(row))
        token = int(self._sample(self._ptr, self._context.ptr, row))
        grammar.accept(token)
        return token

    def accept(self, token: int) -> None:
        """Feed a token the model did not sample (a prompt token) to the penalty history."""
        self._accept(self._ptr, token)

    def close(self) -> None:
        """Free the chain and every stage in it; idempotent."""
        if self._ptr is not None:
            self._lib.llama_sampler_free(self._ptr)
            self._ptr = None
        self._grammar = None
