"""Module-shaped fakes of llama-cpp-python generations, for detection logic ONLY.

The generations cannot be installed side by side (each one builds llama.cpp from source), so
``detect_from`` / ``resolve_memory_api`` are checked against these shapes. Nothing else may use
them: everything that calls into llama.cpp is tested against the real installed binding.

Each name list is the subset of ``def llama_*`` functions that detection looks at (memory API,
state, model/context creation, batches, logits, sampler chains, system info), copied from the
real ``llama_cpp/llama_cpp.py`` of the version named in the comment above it. The context-param
field lists are copied from the same files' ``llama_context_params._fields_``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

SYSTEM_INFO = b"CPU : FAKE = 1 | "

# llama_cpp_python 0.3.8 (llama_cpp/llama_cpp.py): the llama_kv_cache_* generation only, and no
# seq_pos_max under any name.
NAMES_0_3_8 = (
    "llama_batch_init",
    "llama_decode",
    "llama_get_logits_ith",
    "llama_init_from_model",
    "llama_kv_cache_can_shift",
    "llama_kv_cache_clear",
    "llama_kv_cache_defrag",
    "llama_kv_cache_seq_add",
    "llama_kv_cache_seq_cp",
    "llama_kv_cache_seq_div",
    "llama_kv_cache_seq_keep",
    "llama_kv_cache_seq_rm",
    "llama_kv_cache_update",
    "llama_kv_cache_view_free",
    "llama_kv_cache_view_init",
    "llama_kv_cache_view_update",
    "llama_load_model_from_file",
    "llama_model_get_vocab",
    "llama_model_load_from_file",
    "llama_new_context_with_model",
    "llama_print_system_info",
    "llama_sampler_chain_init",
    "llama_sampler_init_grammar",
    "llama_state_seq_get_data",
    "llama_state_seq_get_size",
    "llama_state_seq_load_file",
    "llama_state_seq_save_file",
    "llama_state_seq_set_data",
)

# llama_cpp_python 0.3.9: every llama_kv_cache_* name still bound, plus llama_kv_self_* -- but
# there is no llama_kv_self_seq_rm: removal exists only as llama_kv_cache_seq_rm.
NAMES_0_3_9 = (
    *NAMES_0_3_8,
    "llama_get_kv_self",
    "llama_kv_self_can_shift",
    "llama_kv_self_clear",
    "llama_kv_self_defrag",
    "llama_kv_self_n_tokens",
    "llama_kv_self_seq_add",
    "llama_kv_self_seq_cp",
    "llama_kv_self_seq_div",
    "llama_kv_self_seq_keep",
    "llama_kv_self_seq_pos_max",
    "llama_kv_self_update",
    "llama_kv_self_used_cells",
)

# llama_cpp_python 0.3.16: the llama_kv_cache_* names are gone; llama_kv_self_* (now with
# seq_rm and seq_pos_min) and llama_memory_* are both bound.
NAMES_0_3_16 = (
    "llama_batch_init",
    "llama_decode",
    "llama_get_kv_self",
    "llama_get_logits_ith",
    "llama_get_memory",
    "llama_init_from_model",
    "llama_kv_self_can_shift",
    "llama_kv_self_clear",
    "llama_kv_self_defrag",
    "llama_kv_self_n_tokens",
    "llama_kv_self_seq_add",
    "llama_kv_self_seq_cp",
    "llama_kv_self_seq_div",
    "llama_kv_self_seq_keep",
    "llama_kv_self_seq_pos_max",
    "llama_kv_self_seq_pos_min",
    "llama_kv_self_seq_rm",
    "llama_kv_self_update",
    "llama_kv_self_used_cells",
    "llama_load_model_from_file",
    "llama_memory_can_shift",
    "llama_memory_clear",
    "llama_memory_seq_add",
    "llama_memory_seq_cp",
    "llama_memory_seq_div",
    "llama_memory_seq_keep",
    "llama_memory_seq_pos_max",
    "llama_memory_seq_pos_min",
    "llama_memory_seq_rm",
    "llama_model_get_vocab",
    "llama_model_load_from_file",
    "llama_new_context_with_model",
    "llama_print_system_info",
    "llama_sampler_chain_init",
    "llama_sampler_init_grammar",
    "llama_state_seq_get_data",
    "llama_state_seq_get_size",
    "llama_state_seq_load_file",
    "llama_state_seq_save_file",
    "llama_state_seq_set_data",
)

# llama_cpp_python 0.3.36 (the installed one; test_detection checks these against it):
# llama_memory_* only, plus the *_ext state functions.
NAMES_NEWEST = (
    "llama_batch_init",
    "llama_decode",
    "llama_get_logits_ith",
    "llama_get_memory",
    "llama_init_from_model",
    "llama_load_model_from_file",
    "llama_memory_can_shift",
    "llama_memory_clear",
    "llama_memory_seq_add",
    "llama_memory_seq_cp",
    "llama_memory_seq_div",
    "llama_memory_seq_keep",
    "llama_memory_seq_pos_max",
    "llama_memory_seq_pos_min",
    "llama_memory_seq_rm",
    "llama_model_get_vocab",
    "llama_model_load_from_file",
    "llama_new_context_with_model",
    "llama_print_system_info",
    "llama_sampler_chain_init",
    "llama_sampler_init_grammar",
    "llama_state_seq_get_data",
    "llama_state_seq_get_data_ext",
    "llama_state_seq_get_size",
    "llama_state_seq_get_size_ext",
    "llama_state_seq_load_file",
    "llama_state_seq_save_file",
    "llama_state_seq_set_data",
    "llama_state_seq_set_data_ext",
)

# A 0.2.2x-era llama_cpp.py (early 2024; no sdist of it is unpacked here, the list comes from
# such a file in the public code index): llama_kv_cache_* with seq_shift, the old model/context
# constructors, batches -- but no vocab object, no sampler chain (0.3.0) and no n_seq_max in the
# context params. The session backend cannot run; Llama.create_completion can.
NAMES_0_2_X = (
    "llama_batch_init",
    "llama_decode",
    "llama_get_kv_cache_token_count",
    "llama_get_kv_cache_used_cells",
    "llama_get_logits_ith",
    "llama_kv_cache_clear",
    "llama_kv_cache_seq_cp",
    "llama_kv_cache_seq_div",
    "llama_kv_cache_seq_keep",
    "llama_kv_cache_seq_rm",
    "llama_kv_cache_seq_shift",
    "llama_kv_cache_view_free",
    "llama_kv_cache_view_init",
    "llama_kv_cache_view_update",
    "llama_load_model_from_file",
    "llama_new_context_with_model",
    "llama_print_system_info",
)

# llama_context_params._fields_ of 0.3.8 and 0.3.9 (identical).
FIELDS_0_3_8 = (
    "n_ctx",
    "n_batch",
    "n_ubatch",
    "n_seq_max",
    "n_threads",
    "n_threads_batch",
    "rope_scaling_type",
    "pooling_type",
    "attention_type",
    "rope_freq_base",
    "rope_freq_scale",
    "yarn_ext_factor",
    "yarn_attn_factor",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_orig_ctx",
    "defrag_thold",
    "cb_eval",
    "cb_eval_user_data",
    "type_k",
    "type_v",
    "logits_all",
    "embeddings",
    "offload_kqv",
    "flash_attn",
    "no_perf",
    "abort_callback",
    "abort_callback_data",
)

# 0.3.16: logits_all gone; op_offload, swa_full and kv_unified added.
FIELDS_0_3_16 = (
    *(f for f in FIELDS_0_3_8 if f != "logits_all"),
    "op_offload",
    "swa_full",
    "kv_unified",
)

# 0.3.36: flash_attn became flash_attn_type; several new fields.
FIELDS_NEWEST = (
    "n_ctx",
    "n_batch",
    "n_ubatch",
    "n_seq_max",
    "n_rs_seq",
    "n_outputs_max",
    "n_outputs_max_per_seq",
    "n_threads",
    "n_threads_batch",
    "ctx_type",
    "rope_scaling_type",
    "pooling_type",
    "attention_type",
    "flash_attn_type",
    "rope_freq_base",
    "rope_freq_scale",
    "yarn_ext_factor",
    "yarn_attn_factor",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_orig_ctx",
    "defrag_thold",
    "cb_eval",
    "cb_eval_user_data",
    "type_k",
    "type_v",
    "abort_callback",
    "abort_callback_data",
    "embeddings",
    "offload_kqv",
    "no_perf",
    "op_offload",
    "swa_full",
    "kv_unified",
    "samplers",
    "n_samplers",
    "ctx_other",
)

# The 0.2.2x file above: seed first, no n_ubatch / n_seq_max.
FIELDS_0_2_X = (
    "seed",
    "n_ctx",
    "n_batch",
    "n_threads",
    "n_threads_batch",
    "rope_scaling_type",
    "rope_freq_base",
    "rope_freq_scale",
    "yarn_ext_factor",
    "yarn_attn_factor",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_orig_ctx",
    "type_k",
    "type_v",
    "mul_mat_q",
    "logits_all",
    "embedding",
    "offload_kqv",
)

#: The handle the fake ``llama_get_memory`` returns, so tests can see it passed along.
MEMORY_HANDLE = "fake-llama-memory"


class FakeFunction:
    """A dummy native function that records every call into its module's ``calls`` list."""

    def __init__(self, name: str, calls: list[tuple[str, tuple[Any, ...]]], result: Any) -> None:
        self.__name__ = name
        self._calls = calls
        self._result = result

    def __call__(self, *args: Any) -> Any:
        self._calls.append((self.__name__, args))
        return self._result

    def __repr__(self) -> str:
        return f"<fake {self.__name__}>"


class FakeLlama:
    """Stands in for ``llama_cpp.Llama``: only the attribute detection looks for."""

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("detection must only look, never call")

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("detection must only look, never call")

    def set_seed(self, seed: int) -> None:
        raise AssertionError("detection must only look, never call")


def _params_class(fields: Iterable[str]) -> type[ctypes.Structure]:
    # A real ctypes.Structure, as in the binding; the field types do not matter to detection.
    return type(
        "llama_context_params",
        (ctypes.Structure,),
        {"_fields_": [(name, ctypes.c_int32) for name in fields]},
    )


def _results(name: str) -> Any:
    if name == "llama_get_memory":
        return MEMORY_HANDLE
    if name == "llama_print_system_info":
        return SYSTEM_INFO
    if name.endswith("_seq_rm"):
        return True
    if name.endswith("_seq_pos_max"):
        return 41
    return None


def make_module(
    names: Iterable[str], fields: Iterable[str] | None, *, without: Iterable[str] = ()
) -> SimpleNamespace:
    """A ``llama_cpp.llama_cpp``-shaped namespace binding ``names`` (minus ``without``).

    ``fields`` lists ``llama_context_params``' fields; ``None`` leaves the class out. Every call
    to a fake function is appended to the module's ``calls`` list as ``(name, args)``.
    """
    calls: list[tuple[str, tuple[Any, ...]]] = []
    skip = set(without)
    module = SimpleNamespace(calls=calls)
    for name in names:
        if name not in skip:
            setattr(module, name, FakeFunction(name, calls, _results(name)))
    if fields is not None:
        module.llama_context_params = _params_class(fields)
    return module


def binding_0_3_8() -> SimpleNamespace:
    """0.3.8 and older: ``llama_kv_cache_*`` only."""
    return make_module(NAMES_0_3_8, FIELDS_0_3_8)


def binding_0_3_9() -> SimpleNamespace:
    """0.3.9: ``llama_kv_self_*`` without ``seq_rm``, and the full ``llama_kv_cache_*`` set."""
    return make_module(NAMES_0_3_9, FIELDS_0_3_8)


def binding_0_3_16() -> SimpleNamespace:
    """0.3.10 to 0.3.16: ``llama_kv_self_*`` and ``llama_memory_*`` both bound."""
    return make_module(NAMES_0_3_16, FIELDS_0_3_16)


def binding_newest(*, without: Iterable[str] = ()) -> SimpleNamespace:
    """0.3.17 and newer: ``llama_memory_*`` only."""
    return make_module(NAMES_NEWEST, FIELDS_NEWEST, without=without)


def binding_0_2_x() -> SimpleNamespace:
    """0.2.x: no sampler chain, no vocab object, no ``n_seq_max``: completion only."""
    return make_module(NAMES_0_2_X, FIELDS_0_2_X)


def binding_empty() -> SimpleNamespace:
    """A module with nothing llama-related in it at all."""
    return make_module((), None)
