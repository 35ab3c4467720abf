"""A sequence's sampler chain for one generation, from its :class:`SamplingParams`."""

from __future__ import annotations

import random
from types import ModuleType

from seqlease.engine.seam import Samplers
from seqlease.native.context import NativeContext
from seqlease.native.guidance import Constraint
from seqlease.native.sampler import SamplerChain
from seqlease.request.params import SamplingParams

__all__ = ["build_sampler", "native_samplers"]


def native_samplers(lib: ModuleType, native: NativeContext) -> Samplers:
    """The engine's :data:`Samplers`: llama.cpp sampler chains on ``native``'s logits."""
    return lambda params, grammar: build_sampler(lib, native, params, grammar)


def build_sampler(
    lib: ModuleType,
    native: NativeContext,
    params: SamplingParams,
    grammar: Constraint | None = None,
) -> SamplerChain:
    """Logit bias, penalties, top-k, top-p, min-p and temperature, then a seeded draw.

    Greedy at temperature 0. ``grammar`` (compiled at the call) masks what the chain sees.
    """
    model = native.model
    chain = SamplerChain(lib, native)
    try:
        if grammar is not None:
            chain.constrain(grammar)
        if params.logit_bias:
            chain.logit_bias(model.n_vocab, params.logit_bias)
        # Penalties scan the candidates: after top-k they look at k tokens, not the vocabulary.
        if params.top_k > 0 and params.temperature > 0.0:
            chain.top_k(params.top_k)
        if params.repeat_penalty != 1.0:
            chain.penalties(model.n_vocab, params.repeat_last_n, params.repeat_penalty)
        if params.temperature <= 0.0:
            return chain.greedy()
        if params.top_p < 1.0:
            chain.top_p(params.top_p)
        if params.min_p > 0.0:
            chain.min_p(params.min_p)
        seed = random.getrandbits(32) if params.seed is None else params.seed
        return chain.temperature(params.temperature).draw(seed)
    except BaseException:
        chain.close()
        raise
