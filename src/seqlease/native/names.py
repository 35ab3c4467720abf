"""Every llama.cpp function seqlease calls under more than one name, in one table.

llama-cpp-python follows llama.cpp's renames and keeps no aliases, so each purpose lists its
names newest first; :func:`bound` takes the first one the installed binding has. The memory
API's three families live in :mod:`seqlease.native.memory`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

__all__ = [
    "NAMES",
    "SESSION_NEEDS",
    "STATE_NEEDS",
    "bound",
    "context_fields",
    "flash_attention_field",
    "max_sequences",
    "missing",
    "model_fields",
    "set_flash_attention",
    "set_load_mode",
]

#: Each purpose, and the names it went by (newest first).
NAMES: dict[str, tuple[str, ...]] = {
    "load a model": ("llama_model_load_from_file", "llama_load_model_from_file"),
    "free a model": ("llama_model_free", "llama_free_model"),
    "create a context": ("llama_init_from_model", "llama_new_context_with_model"),
    "end-of-generation test": ("llama_vocab_is_eog", "llama_token_is_eog"),
    "vocabulary size": ("llama_vocab_n_tokens", "llama_n_vocab"),
    "training context size": ("llama_model_n_ctx_train", "llama_n_ctx_train"),
    "BOS token": ("llama_vocab_bos", "llama_token_bos"),
    "EOS token": ("llama_vocab_eos", "llama_token_eos"),
    "token attributes": ("llama_vocab_get_attr", "llama_token_get_attr"),
    "tokenize": ("llama_model_get_vocab",),
    "batched decode": ("llama_batch_init",),
    "read logits": ("llama_get_logits_ith",),
    "sampler chains": ("llama_sampler_chain_init",),
    "sequence state size": ("llama_state_seq_get_size",),
    "save a sequence's state": ("llama_state_seq_get_data",),
    "load a sequence's state": ("llama_state_seq_set_data",),
}

#: What the session backend calls besides the memory API.
SESSION_NEEDS = (
    "load a model",
    "create a context",
    "tokenize",
    "batched decode",
    "read logits",
    "sampler chains",
)

#: What saving and loading one sequence's memory calls (without them a chat re-evaluates).
STATE_NEEDS = ("sequence state size", "save a sequence's state", "load a sequence's state")


def bound(lib: ModuleType, purpose: str) -> Any:
    """The function for ``purpose`` under the newest name ``lib`` binds.

    Raises:
        AttributeError: the binding has none of its names.

    """
    for name in NAMES[purpose]:
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn
    raise AttributeError(f"llama-cpp-python binds none of {NAMES[purpose]} ({purpose})")


def missing(lib: Any, purposes: tuple[str, ...]) -> list[str]:
    """Those of ``purposes`` that ``lib`` binds under none of their names, described."""
    return [
        f"{purpose} ({' or '.join(NAMES[purpose])})"
        for purpose in purposes
        if not any(hasattr(lib, name) for name in NAMES[purpose])
    ]


def _fields(lib: Any, struct: str) -> frozenset[str]:
    params = getattr(lib, struct, None)
    return frozenset(name for name, *_ in getattr(params, "_fields_", ()))


def context_fields(lib: Any) -> frozenset[str]:
    """The fields of ``llama_context_params`` in this binding (they drift like the names).

    ``n_seq_max`` came with multi-sequence contexts; ``kv_unified`` (0.3.15) with one KV stream
    per sequence: bindings before it have a single cache that every sequence shares.
    """
    return _fields(lib, "llama_context_params")


def model_fields(lib: Any) -> frozenset[str]:
    """The fields of ``llama_model_params`` in this binding."""
    return _fields(lib, "llama_model_params")


def max_sequences(lib: Any) -> int:
    """Most sequence ids one context may have (``llama_max_parallel_sequences``).

    Bindings without the function predate the limit or had 64 (llama.cpp's first value).
    """
    fn = getattr(lib, "llama_max_parallel_sequences", None)
    return int(fn()) if fn is not None else 64


def flash_attention_field(lib: Any) -> str | None:
    """The context field that switches flash attention, ``None`` when the binding has none.

    ``flash_attn_type`` (-1 auto, 0 off, 1 on; 0.3.17+) replaced the boolean ``flash_attn``.
    """
    fields = context_fields(lib)
    return next((f for f in ("flash_attn_type", "flash_attn") if f in fields), None)


def set_flash_attention(lib: Any, params: Any, on: bool) -> None:
    """Switch flash attention in ``params`` under its field of this binding."""
    field = flash_attention_field(lib)
    if field == "flash_attn_type":
        params.flash_attn_type = 1 if on else 0
    elif field == "flash_attn":
        params.flash_attn = on


#: ``llama_load_mode`` values (0.3.36): the two booleans below, as one enum.
_LOAD_MODES = {(False, False): 0, (True, False): 1, (False, True): 2, (True, True): 3}


def set_load_mode(lib: Any, params: Any, *, mmap: bool, mlock: bool) -> None:
    """Set memory-mapping and locking of the weights under this binding's field(s).

    Newer bindings replaced the booleans ``use_mmap`` / ``use_mlock`` by one ``load_mode``.
    """
    if "load_mode" in model_fields(lib):
        params.load_mode = _LOAD_MODES[mmap, mlock]
    else:
        params.use_mmap = mmap
        params.use_mlock = mlock
