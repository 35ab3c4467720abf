"""Option objects to llama.cpp's parameter structs, and what the installed build can honour.

The one place that knows how each of seqlease's model and context options reaches llama.cpp:
which struct field (across renames, through :mod:`seqlease.native.names`), which ggml type id
a KV type name is, which ``llama_cpp.Llama`` keyword the completion backend passes, and which
options this binding cannot honour (refused with the option and the version, never ignored).
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

from seqlease.errors import BackendUnavailableError
from seqlease.native import names
from seqlease.native.devices import gpu_count
from seqlease.native.library import binding_version
from seqlease.options import ContextOptions, ModelOptions, default_threads, is_quantized

__all__ = [
    "KV_TYPES",
    "KvCells",
    "KvShape",
    "KvType",
    "check_kv_shape",
    "context_params",
    "kv_cache_bytes",
    "llama_kwargs",
    "llama_unhonoured",
    "model_params",
    "resolve",
    "unhonoured",
]

#: llama.cpp reads an n_gpu_layers above the model's layer count as "all of them".
_ALL_LAYERS = 0x7FFFFFFF


@dataclass(frozen=True)
class KvType:
    """One ggml tensor type of the KV cache: its id and how many bytes a block of values takes."""

    ggml_id: int
    block: int  # values per block
    block_bytes: int

    def row_bytes(self, n: int) -> int:
        """Bytes of ``n`` values (``n`` a multiple of :attr:`block`)."""
        return n // self.block * self.block_bytes


#: ggml's type ids are part of its file format (GGUF) and never change.
KV_TYPES: dict[str, KvType] = {
    "f32": KvType(0, 1, 4),
    "f16": KvType(1, 1, 2),
    "bf16": KvType(30, 1, 2),
    "q8_0": KvType(8, 32, 34),
    "q5_1": KvType(7, 32, 24),
    "q5_0": KvType(6, 32, 22),
    "q4_1": KvType(3, 32, 20),
    "q4_0": KvType(2, 32, 18),
    "iq4_nl": KvType(20, 32, 18),
}


@dataclass(frozen=True)
class KvShape:
    """What one KV cell holds per layer: the K and V widths of all KV heads together."""

    n_layer: int
    head_k: int
    head_v: int
    n_head_kv: int


def kv_cache_bytes(shape: KvShape | None, cells: int, options: ContextOptions) -> int | None:
    """Bytes of a KV cache of ``cells`` cells: every layer holds one K and one V row per cell.

    ``None`` for a model of unknown shape.
    """
    if shape is None:
        return None
    k = KV_TYPES[options.type_k].row_bytes(shape.head_k * shape.n_head_kv)
    v = KV_TYPES[options.type_v].row_bytes(shape.head_v * shape.n_head_kv)
    return shape.n_layer * cells * (k + v)


def check_kv_shape(shape: KvShape | None, options: ContextOptions) -> None:
    """Refuse a quantized KV type whose blocks do not divide the model's attention heads.

    Older llama.cpp releases abort the process on it (a ``GGML_ASSERT`` on the row size).
    """
    if shape is None:
        return
    for option, kv_type, head in (
        ("type_k", options.type_k, shape.head_k),
        ("type_v", options.type_v, shape.head_v),
    ):
        block = KV_TYPES[kv_type].block
        if head % block:
            raise ValueError(
                f"{option}={kv_type!r} cannot hold this model's KV cache: its blocks of {block} "
                f"values do not divide the attention head size {head}; use 'f16' (or 'bf16')"
            )


def _version() -> str:
    return f"llama-cpp-python {binding_version() or '(unknown version)'}"


def unhonoured(lib: Any) -> dict[str, str]:
    """Options the installed session binding cannot honour, each with the reason."""
    out: dict[str, str] = {}
    if not _supports_gpu_offload(lib):
        why = (
            "this build has no GPU offload (llama_supports_gpu_offload() is false): "
            "reinstall llama-cpp-python with CMAKE_ARGS for CUDA, Metal or Vulkan"
        )
        out.update(n_gpu_layers=why, main_gpu=why, tensor_split=why)
    if names.flash_attention_field(lib) is None:
        out["flash_attn"] = "llama_context_params has no flash_attn or flash_attn_type field"
    if "kv_unified" not in names.context_fields(lib):
        out["kv_unified"] = (
            "one KV stream per sequence needs 0.3.15 or newer: older releases have one KV "
            "buffer for all sequences"
        )
    supports_mlock = getattr(lib, "llama_supports_mlock", None)
    if supports_mlock is not None and not supports_mlock():
        out["use_mlock"] = "llama_supports_mlock() is false on this system"
    return out


def _supports_gpu_offload(lib: Any) -> bool:
    fn = getattr(lib, "llama_supports_gpu_offload", None)
    return bool(fn()) if fn is not None else False


def _refuse(option: str, value: object, why: str, fix: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"{option}={value!r} cannot be honoured by {_version()}: {why}; {fix}"
    )


def resolve(
    lib: Any, model: ModelOptions, context: ContextOptions
) -> tuple[ModelOptions, ContextOptions]:
    """Settle every "auto" and ``None`` for this build, and refuse what it cannot honour.

    ``n_gpu_layers="auto"``: all layers where the build offloads, else 0. ``flash_attn="auto"``:
    on where llama.cpp needs it (a quantized V cache) or where layers go to a GPU; off on the
    CPU, where its kernel rounds differently for different batch sizes and a reply would
    depend on how its prompt was chunked. ``kv_unified=None``: one stream per sequence where
    the binding offers it.

    Raises:
        BackendUnavailableError: an option was asked for that this binding cannot honour.
        ValueError: ``main_gpu`` or ``tensor_split`` name GPUs llama.cpp does not see.

    """
    refused = unhonoured(lib)
    gpu = "n_gpu_layers" not in refused
    layers = (-1 if gpu else 0) if model.n_gpu_layers == "auto" else model.n_gpu_layers
    # option: (asked for, its value, how to do without it)
    asked: dict[str, tuple[bool, object, str]] = {
        "n_gpu_layers": (layers != 0, layers, "pass n_gpu_layers='auto' or 0"),
        "main_gpu": (model.main_gpu != 0, model.main_gpu, "leave main_gpu=0"),
        "tensor_split": (
            model.tensor_split is not None,
            model.tensor_split,
            "leave tensor_split=None",
        ),
        "use_mlock": (model.use_mlock, True, "leave use_mlock=False"),
        "kv_unified": (context.kv_unified is False, False, "leave kv_unified=None"),
        "flash_attn": (context.flash_attn is True, True, "leave flash_attn='auto'"),
    }
    for option, (wanted, value, fix) in asked.items():
        if wanted and option in refused:
            raise _refuse(option, value, refused[option], fix)
    _check_gpus(lib, model)
    flash = context.flash_attn
    if flash == "auto":
        flash = is_quantized(context.type_v) or layers != 0
        if flash and "flash_attn" in refused:
            raise _refuse("type_v", context.type_v, refused["flash_attn"], "use type_v='f16'")
    unified = context.kv_unified
    if unified is None:
        unified = "kv_unified" in refused
    threads = context.n_threads or default_threads()
    return dataclasses.replace(model, n_gpu_layers=layers), context.replace(
        flash_attn=flash,
        kv_unified=unified,
        n_ubatch=context.n_ubatch or context.n_batch,
        n_threads=threads,
        n_threads_batch=context.n_threads_batch or threads,
        prefix_cache_tokens=context.cache_tokens,
    )


def _check_gpus(lib: Any, model: ModelOptions) -> None:
    gpus = gpu_count()
    if gpus and model.main_gpu >= gpus:
        raise ValueError(
            f"main_gpu={model.main_gpu} names a GPU llama.cpp does not see: it sees {gpus} "
            f"(0 to {gpus - 1}); see `python -m seqlease doctor`"
        )
    max_devices = int(lib.llama_max_devices()) if hasattr(lib, "llama_max_devices") else 1
    if model.tensor_split is not None and len(model.tensor_split) > max_devices:
        raise ValueError(
            f"tensor_split has {len(model.tensor_split)} shares but this build splits over at "
            f"most {max_devices} devices (llama_max_devices)"
        )


def model_params(lib: Any, options: ModelOptions) -> tuple[Any, Any]:
    """``llama_model_params`` for resolved ``options``, and what must outlive the load call.

    The second value keeps the ``tensor_split`` array alive while llama.cpp reads it.
    """
    if not isinstance(options.n_gpu_layers, int):
        raise TypeError("model_params needs resolved options (see resolve)")
    params = lib.llama_model_default_params()
    params.n_gpu_layers = _ALL_LAYERS if options.n_gpu_layers == -1 else options.n_gpu_layers
    params.main_gpu = options.main_gpu
    keep: Any = None
    if options.tensor_split is not None:
        size = int(lib.llama_max_devices())
        keep = (ctypes.c_float * size)(*options.tensor_split)
        params.tensor_split = ctypes.cast(keep, ctypes.POINTER(ctypes.c_float))
    names.set_load_mode(lib, params, mmap=options.use_mmap, mlock=options.use_mlock)
    return params, keep


@dataclass(frozen=True)
class KvCells:
    """The sequences and KV cells one context is created with (what llama.cpp is told)."""

    #: Sequence ids llama.cpp must know.
    n_seq_max: int
    #: KV cells of the whole context.
    n_cells: int
    #: Tokens each sequence may hold (seqlease's budget; llama.cpp may round a stream up).
    n_ctx_seq: int
    #: One KV buffer for all sequences, instead of one stream per sequence.
    unified: bool


def context_params(lib: Any, options: ContextOptions, cells: KvCells) -> Any:
    """``llama_context_params`` for resolved ``options`` and ``cells``."""
    if not isinstance(options.flash_attn, bool) or None in (
        options.n_ubatch,
        options.n_threads,
        options.n_threads_batch,
    ):
        raise TypeError("context_params needs resolved options (see resolve)")
    params = lib.llama_context_default_params()
    if "kv_unified" in names.context_fields(lib):
        params.kv_unified = cells.unified
    names.set_flash_attention(lib, params, options.flash_attn)
    params.n_ctx = cells.n_cells
    params.n_batch = options.n_batch
    params.n_ubatch = options.n_ubatch
    params.n_seq_max = cells.n_seq_max
    params.n_threads = options.n_threads
    params.n_threads_batch = options.n_threads_batch
    params.type_k = KV_TYPES[options.type_k].ggml_id
    params.type_v = KV_TYPES[options.type_v].ggml_id
    params.offload_kqv = options.offload_kqv
    return params


_NO_KEYWORD = "llama_cpp.Llama takes no such keyword (the completion backend runs on it)"
#: Options the completion backend hands ``Llama`` under their own names, when asked for.
_LLAMA_OPTIONS = (
    "n_gpu_layers",
    "main_gpu",
    "tensor_split",
    "use_mmap",
    "use_mlock",
    "n_ubatch",
    "n_threads_batch",
    "flash_attn",
    "type_k",
    "type_v",
    "offload_kqv",
)


def _llama_keywords(llama_class: Any) -> set[str]:
    # Named parameters only: Llama also takes **kwargs, and drops what it does not know.
    return set(inspect.signature(llama_class.__init__).parameters)


def llama_unhonoured(llama_class: Any) -> dict[str, str]:
    """Options the completion backend's ``Llama`` cannot take, each with the reason."""
    accepted = _llama_keywords(llama_class)
    return {name: _NO_KEYWORD for name in _LLAMA_OPTIONS if name not in accepted}


def llama_kwargs(llama_class: Any, model: ModelOptions, context: ContextOptions) -> dict[str, Any]:
    """Keywords for ``llama_cpp.Llama`` from resolved options (the completion backend's).

    ``Llama`` has one sequence, so ``kv_unified`` does not apply. An option ``Llama`` takes no
    keyword for is refused when it was asked for, and left to ``Llama`` when it was not.

    Raises:
        BackendUnavailableError: an option was asked for that this ``Llama`` takes no keyword for.

    """
    accepted = _llama_keywords(llama_class)
    wanted: dict[str, tuple[Any, bool]] = {
        # name: (value, whether it differs from what Llama does unasked)
        "n_gpu_layers": (model.n_gpu_layers, model.n_gpu_layers != 0),
        "main_gpu": (model.main_gpu, model.main_gpu != 0),
        "tensor_split": (
            list(model.tensor_split) if model.tensor_split else None,
            model.tensor_split is not None,
        ),
        "use_mmap": (model.use_mmap, not model.use_mmap),
        "use_mlock": (model.use_mlock, model.use_mlock),
        "n_ctx": (context.n_ctx, True),
        "n_batch": (context.n_batch, True),
        "n_ubatch": (context.n_ubatch, context.n_ubatch not in (None, context.n_batch)),
        "n_threads": (context.n_threads, True),
        "n_threads_batch": (
            context.n_threads_batch,
            context.n_threads_batch != context.n_threads,
        ),
        "flash_attn": (context.flash_attn, context.flash_attn is True),
        "type_k": (KV_TYPES[context.type_k].ggml_id, context.type_k != "f16"),
        "type_v": (KV_TYPES[context.type_v].ggml_id, context.type_v != "f16"),
        "offload_kqv": (context.offload_kqv, not context.offload_kqv),
    }
    kwargs: dict[str, Any] = {}
    for name, (value, asked) in wanted.items():
        if name in accepted:
            kwargs[name] = value
        elif asked:
            raise _refuse(
                name,
                value,
                _NO_KEYWORD,
                "upgrade llama-cpp-python or leave the option at its default",
            )
    return kwargs
