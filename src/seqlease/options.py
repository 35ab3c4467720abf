"""llama.cpp's model and context options, as two frozen, validated objects.

:class:`~seqlease.Context` builds them from its keyword arguments and hands them whole to the
backend, which hands them to :mod:`seqlease.native`: no option is threaded through layers as a
loose keyword. Values are checked here, where they are made, so a bad one never reaches
llama.cpp; what depends on the installed binding ("auto", what it cannot honour) is settled by
:func:`seqlease.native.params.resolve`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from seqlease.checks import check_bool, check_int, check_number, describe

__all__ = [
    "KV_TYPE_NAMES",
    "MAX_SEQUENCES",
    "ContextOptions",
    "ModelOptions",
    "default_threads",
    "is_quantized",
]

#: Largest pool seqlease accepts (llama.cpp's own LLAMA_MAX_SEQ is 256).
MAX_SEQUENCES = 256

#: KV cache types by name, as llama.cpp's ``--cache-type-k/v`` spells them.
KV_TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
_FLOAT_KV_TYPES = ("f32", "f16", "bf16")


def default_threads() -> int:
    """llama.cpp threads of a :class:`~seqlease.Context` built with ``n_threads=None``."""
    # Half the logical cores, as llama-cpp-python does: llama.cpp's OpenMP workers spin while
    # waiting, and on a small machine they fight the engine thread and the callers for cores
    # (measured on 2 cores: a 48-token reply took 0.9 s with 1 thread, 6.7 s with 2).
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def is_quantized(kv_type: str) -> bool:
    """Whether a KV cache type (by name) is a block-quantized one."""
    return kv_type not in _FLOAT_KV_TYPES


def _check_kv_type(name: str, value: object) -> str:
    if not isinstance(value, str) or value not in KV_TYPE_NAMES:
        raise ValueError(f"{name} must be one of {KV_TYPE_NAMES}, not {describe(value)}")
    return value


@dataclass(frozen=True)
class ModelOptions:
    """How llama.cpp loads the weights: where they go (CPU, GPUs) and how they are mapped.

    ``n_gpu_layers="auto"`` offloads every layer when the installed build supports GPU
    offload and none otherwise; an int offloads that many (``-1``: all). ``main_gpu`` and
    ``tensor_split`` choose GPUs as llama.cpp's ``--main-gpu`` / ``--tensor-split`` do.
    """

    #: Layers on the GPU: ``"auto"``, an int, or ``-1`` for all (resolved: an int).
    n_gpu_layers: int | Literal["auto"] = "auto"
    #: The GPU for the whole model when it is not split across GPUs.
    main_gpu: int = 0
    #: Shares of the model per GPU (``(3, 1)``: three quarters on GPU 0); ``None``: llama.cpp's.
    tensor_split: tuple[float, ...] | None = None
    #: Map the model file instead of reading it into memory.
    use_mmap: bool = True
    #: Lock the model in RAM so that it is never swapped out.
    use_mlock: bool = False

    def __post_init__(self) -> None:
        if self.n_gpu_layers != "auto":
            check_int("n_gpu_layers", self.n_gpu_layers, -1, 1 << 20)
        check_int("main_gpu", self.main_gpu, 0, 1 << 10)
        if self.tensor_split is not None:
            object.__setattr__(self, "tensor_split", _check_split(self.tensor_split))
        check_bool("use_mmap", self.use_mmap)
        check_bool("use_mlock", self.use_mlock)


def _check_split(value: object) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"tensor_split must be a sequence of numbers (one share per GPU), not {describe(value)}"
        )
    shares = tuple(check_number("tensor_split[]", share) for share in value)
    if not shares or any(not math.isfinite(s) or s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(
            f"tensor_split must hold one finite share >= 0 per GPU, not all 0, not {value!r}"
        )
    return shares


@dataclass(frozen=True)
class ContextOptions:
    """The llama.cpp context: sequences, memory per sequence, batches, threads, KV cache.

    ``None`` and ``"auto"`` leave the choice to seqlease (:func:`seqlease.native.params.resolve`
    makes it, and ``Context.context_options`` shows what it chose).
    """

    #: Sequences that can be leased at once.
    sequences: int = 2
    #: Tokens each sequence holds: prompt and reply together.
    n_ctx: int = 2048
    #: Most tokens one decode step takes (the logical batch).
    n_batch: int = 512
    #: Tokens per compute pass (the physical batch); ``None``: ``n_batch``.
    n_ubatch: int | None = None
    #: llama.cpp threads for generation; ``None``: :func:`default_threads`.
    n_threads: int | None = None
    #: llama.cpp threads for prompt evaluation; ``None``: ``n_threads``.
    n_threads_batch: int | None = None
    #: Flash attention: ``"auto"``, ``True`` or ``False`` (resolved: a bool).
    flash_attn: bool | Literal["auto"] = "auto"
    #: KV cache type of the keys, one of :data:`KV_TYPE_NAMES`.
    type_k: str = "f16"
    #: KV cache type of the values; a quantized one needs flash attention.
    type_v: str = "f16"
    #: One KV buffer for all sequences (``True``) or a stream each; ``None``: seqlease decides.
    kv_unified: bool | None = None
    #: Keep the KV cache on the GPU beside the offloaded layers.
    offload_kqv: bool = True
    #: Share prompt prefixes between sequences and keep them in a cache.
    prefix_cache: bool = True
    #: KV cells the prefix cache may use on top of the leases'; ``None``: ``n_ctx``.
    prefix_cache_tokens: int | None = None

    def __post_init__(self) -> None:
        check_int("sequences", self.sequences, 1, MAX_SEQUENCES)
        check_int("n_ctx", self.n_ctx, 8, 1 << 20)
        check_int("n_batch", self.n_batch, 1, 1 << 16)
        if self.n_batch < self.sequences:
            # llama.cpp aborts the process (GGML_ASSERT n_outputs_max) where n_batch is below
            # its n_seq_max; the prefix cache's ids fit into what n_batch leaves above
            # sequences (seqlease.engine.layout.plan_layout), so this is the one bound.
            raise ValueError(
                f"n_batch must be >= sequences: a step decodes one token of every sequence, "
                f"so n_batch={self.n_batch} cannot serve sequences={self.sequences}; raise "
                "n_batch"
            )
        if self.n_ubatch is not None:
            check_int("n_ubatch", self.n_ubatch, 1, self.n_batch)
        for name in ("n_threads", "n_threads_batch"):
            if (value := getattr(self, name)) is not None:
                check_int(name, value, 1, 1024)
        if self.flash_attn != "auto":
            check_bool("flash_attn", self.flash_attn)
        _check_kv_type("type_k", self.type_k)
        _check_kv_type("type_v", self.type_v)
        if self.flash_attn is False and is_quantized(self.type_v):
            raise ValueError(
                f"type_v={self.type_v!r} needs flash attention: llama.cpp refuses a quantized "
                "V cache without it; pass flash_attn=True or 'auto', or type_v='f16'"
            )
        if self.kv_unified is not None:
            check_bool("kv_unified", self.kv_unified)
        check_bool("offload_kqv", self.offload_kqv)
        check_bool("prefix_cache", self.prefix_cache)
        if self.prefix_cache_tokens is not None:
            check_int("prefix_cache_tokens", self.prefix_cache_tokens, 0, 1 << 24)

    @property
    def cache_tokens(self) -> int:
        """KV cells the prefix cache may keep on top of the leases' (default: ``n_ctx``)."""
        if not self.prefix_cache:
            return 0
        return self.n_ctx if self.prefix_cache_tokens is None else self.prefix_cache_tokens

    def replace(self, **changes: object) -> ContextOptions:
        """A copy with ``changes`` applied (and validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
