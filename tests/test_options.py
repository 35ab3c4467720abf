"""llama.cpp's model and context options: each reaches llama.cpp, read back from llama.cpp.

What llama.cpp reports comes from its own getters (``llama_n_ctx``, ``llama_n_ubatch``, ...),
from its log (KV cache size and types, flash attention, unified KV), or from the operating
system (a memory-mapped or locked model file). The "auto" rules and the refusals are checked
against fake binding shapes only where this machine cannot show them (a GPU build).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

import seqlease
from helpers import completion_backend
from seqlease.native.library import load_library
from seqlease.native.params import KV_TYPES, llama_kwargs, resolve
from seqlease.options import KV_TYPE_NAMES, ContextOptions, ModelOptions
from tiny_model import tiny_model_path

SMALL = {"sequences": 2, "n_ctx": 256, "n_threads": 1}
KV_LINE = re.compile(r"K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB")


def native_ptr(ctx: seqlease.Context) -> Any:
    """The ``llama_context *`` behind a Context, whichever backend it runs on."""
    return ctx.probe.context_ptr()


@pytest.fixture
def llama_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="seqlease.llama"):
        yield caplog


def logged(caplog: pytest.LogCaptureFixture, pattern: str) -> list[re.Match[str]]:
    found = (re.search(pattern, r.getMessage()) for r in caplog.records)
    return [m for m in found if m is not None and m.re.pattern == pattern]


def reported_kv(caplog: pytest.LogCaptureFixture) -> tuple[str, str, float]:
    """The KV cache types and size (MiB) llama.cpp logged when it made the context."""
    lines = logged(caplog, KV_LINE.pattern)
    assert len(lines) == 1, [m.group(0) for m in lines]
    k_type, k_mib, v_type, v_mib = lines[0].groups()
    return k_type, v_type, float(k_mib) + float(v_mib)


# -- each option reaches llama.cpp --------------------------------------------------------


@pytest.mark.parametrize("backend", ["session", "completion"])
def test_sizes_batches_and_threads_read_back(backend: str) -> None:
    lib = load_library()
    with seqlease.Context(
        backend=backend,  # type: ignore[arg-type]
        sequences=3,
        n_ctx=512,
        n_batch=96,
        n_ubatch=32,
        n_threads=1,
        n_threads_batch=2,
        prefix_cache=False,
    ) as ctx:
        ptr = native_ptr(ctx)
        assert lib.llama_n_batch(ptr) == 96
        assert lib.llama_n_ubatch(ptr) == 32
        assert lib.llama_n_threads(ptr) == 1
        assert lib.llama_n_threads_batch(ptr) == 2
        if backend == "session":  # the completion backend runs one sequence
            assert lib.llama_n_seq_max(ptr) == 3
            assert lib.llama_n_ctx_seq(ptr) == 512
            assert lib.llama_n_ctx(ptr) == 3 * 512
        else:
            assert lib.llama_n_ctx(ptr) == 512


def test_n_ubatch_defaults_to_n_batch() -> None:
    with seqlease.Context(n_batch=64, **SMALL) as ctx:
        assert ctx.context_options.n_ubatch == 64
        assert load_library().llama_n_ubatch(native_ptr(ctx)) == 64


@pytest.mark.parametrize("backend", ["session", "completion"])
@pytest.mark.parametrize(("type_k", "type_v"), [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "f16")])
def test_kv_types_and_memory_read_back(
    llama_log: pytest.LogCaptureFixture, backend: str, type_k: str, type_v: str
) -> None:
    with seqlease.Context(
        backend=backend,  # type: ignore[arg-type]
        type_k=type_k,
        type_v=type_v,
        **SMALL,
    ) as ctx:
        size = ctx.kv_cache_bytes
    k, v, mib = reported_kv(llama_log)
    assert (k, v) == (type_k, type_v)
    assert size is not None
    assert size / 2**20 == pytest.approx(mib, abs=0.01)


def test_quantized_cache_is_smaller_by_its_block_size(llama_log: pytest.LogCaptureFixture) -> None:
    sizes = {}
    for kv_type in ("f16", "q8_0", "q4_0"):
        llama_log.clear()
        with seqlease.Context(type_k=kv_type, type_v=kv_type, **SMALL):
            pass
        sizes[kv_type] = reported_kv(llama_log)[2]
    assert sizes["q8_0"] / sizes["f16"] == pytest.approx(34 / 64, rel=0.01)
    assert sizes["q4_0"] / sizes["f16"] == pytest.approx(18 / 64, rel=0.01)


@pytest.mark.parametrize("kv_type", KV_TYPE_NAMES)
def test_every_kv_type_size_matches_the_formula(
    llama_log: pytest.LogCaptureFixture, kv_type: str
) -> None:
    with seqlease.Context(type_k=kv_type, type_v=kv_type, **SMALL) as ctx:
        assert ctx.context_options.flash_attn is (kv_type not in ("f32", "f16", "bf16"))
        size = ctx.kv_cache_bytes
    assert size is not None
    assert size / 2**20 == pytest.approx(reported_kv(llama_log)[2], abs=0.01)


@pytest.mark.parametrize(
    ("asked", "type_v", "expected"),
    [("auto", "f16", "disabled"), (True, "f16", "enabled"), ("auto", "q8_0", "enabled")],
)
def test_flash_attention_reaches_llama_cpp(
    llama_log: pytest.LogCaptureFixture, asked: Any, type_v: str, expected: str
) -> None:
    with seqlease.Context(flash_attn=asked, type_v=type_v, **SMALL) as ctx:
        assert ctx.context_options.flash_attn is (expected == "enabled")
    assert [m.group(1) for m in logged(llama_log, r"flash_attn\s+= (\w+)")] == [expected]


@pytest.mark.parametrize(("asked", "expected"), [(None, "false"), (True, "true"), (False, "false")])
def test_kv_unified_reaches_llama_cpp(
    llama_log: pytest.LogCaptureFixture, asked: bool | None, expected: str
) -> None:
    with seqlease.Context(kv_unified=asked, **SMALL) as ctx:
        assert ctx.context_options.kv_unified is (expected == "true")
    assert [m.group(1) for m in logged(llama_log, r"kv_unified\s+= (\w+)")] == [expected]


def _mapped(path: Any) -> bool:
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


@pytest.mark.parametrize("backend", ["session", "completion"])
@pytest.mark.parametrize("use_mmap", [True, False])
def test_use_mmap_reads_back_from_the_process_maps(
    tmp_path: Any, backend: str, use_mmap: bool
) -> None:
    # A copy of its own, so that no other open model's mapping can answer for this one.
    model = shutil.copy(tiny_model_path(), tmp_path / "mapped.gguf")
    with seqlease.Context(
        model,
        backend=backend,  # type: ignore[arg-type]
        use_mmap=use_mmap,
        **SMALL,
    ):
        assert _mapped(model) is use_mmap
    assert not _mapped(model)


_MLOCK = """
import sys
sys.path.insert(0, "tests")
import seqlease
from tiny_model import tiny_model_path

def locked_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1])

before = locked_kb()
with seqlease.Context(tiny_model_path(), use_mlock=sys.argv[1] == "on", sequences=1, n_ctx=64,
                      n_threads=1, backend=sys.argv[2]):
    print(locked_kb() - before)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["session", "completion"])
def test_use_mlock_reads_back_as_locked_memory(run_python: Any, backend: str) -> None:
    locked = {}
    for switch in ("on", "off"):
        done = run_python(_MLOCK, switch, backend)
        assert done.returncode == 0, done.stderr[-2000:]
        locked[switch] = int(done.stdout.split()[-1])
    model_kb = tiny_model_path().stat().st_size // 1024
    assert locked["off"] == 0
    assert locked["on"] >= model_kb // 2, (locked, model_kb)


def test_gpu_layers_auto_is_none_on_a_cpu_build(llama_log: pytest.LogCaptureFixture) -> None:
    assert not load_library().llama_supports_gpu_offload()
    with seqlease.Context(**SMALL) as ctx:
        assert ctx.model_options.n_gpu_layers == 0
        assert ctx.capabilities.gpu_offload is False
    devices = logged(llama_log, r"layer\s+\d+ assigned to device (\w+)")
    assert devices and {m.group(1) for m in devices} == {"CPU"}


@pytest.mark.parametrize(
    ("option", "value"),
    [("n_gpu_layers", 4), ("n_gpu_layers", -1), ("main_gpu", 1), ("tensor_split", (1.0, 1.0))],
)
@pytest.mark.parametrize("backend", ["session", "completion"])
def test_gpu_options_are_refused_on_a_cpu_build(option: str, value: Any, backend: str) -> None:
    version = seqlease.detect().binding_version
    with pytest.raises(seqlease.BackendUnavailableError) as caught:
        seqlease.Context(backend=backend, **{option: value}, **SMALL)  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith(f"{option}=")
    assert f"llama-cpp-python {version}" in message
    assert "no GPU offload" in message and "CMAKE_ARGS" in message


@pytest.mark.parametrize("offload_kqv", [True, False])
def test_offload_kqv_keeps_the_cache_on_the_cpu_here(
    llama_log: pytest.LogCaptureFixture, offload_kqv: bool
) -> None:
    # Without a GPU there is nowhere else for the KV cache: llama.cpp puts every layer's on
    # the CPU either way (on a GPU build, True puts it beside the offloaded layers).
    with seqlease.Context(offload_kqv=offload_kqv, **SMALL) as ctx:
        assert ctx.context_options.offload_kqv is offload_kqv
    devices = logged(llama_log, r"llama_kv_cache: layer\s+\d+: dev = (\w+)")
    assert devices and {m.group(1) for m in devices} == {"CPU"}


# -- refused before any native call -------------------------------------------------------


@pytest.mark.parametrize("backend", ["session", "completion"])
def test_quantized_cache_that_does_not_fit_the_heads_is_refused(backend: str) -> None:
    # The tiny model's heads are 16 wide; q8_0 blocks are 32: older llama.cpp aborts on it.
    with pytest.raises(ValueError, match=r"type_k='q8_0' .* blocks of 32 .* head size 16"):
        seqlease.Context(
            tiny_model_path(),
            backend=backend,  # type: ignore[arg-type]
            type_k="q8_0",
            **SMALL,
        )
    with seqlease.Context(tiny_model_path(), backend=backend, **SMALL) as ctx:  # type: ignore[arg-type]
        assert ctx.complete("hello", max_tokens=2, temperature=0) is not None


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"type_v": "q8_0", "flash_attn": False}, ValueError, r"type_v='q8_0' needs flash"),
        ({"type_k": "q8"}, ValueError, r"type_k must be one of"),
        ({"type_v": 8}, ValueError, r"type_v must be one of"),
        ({"flash_attn": "yes"}, TypeError, r"flash_attn must be True or False"),
        ({"n_gpu_layers": -2}, ValueError, r"n_gpu_layers must be an int in \[-1,"),
        ({"n_gpu_layers": "all"}, ValueError, r"n_gpu_layers must be an int"),
        ({"main_gpu": -1}, ValueError, r"main_gpu must be an int in \[0,"),
        ({"tensor_split": "1,1"}, TypeError, r"tensor_split must be a sequence"),
        ({"tensor_split": [0, 0]}, ValueError, r"tensor_split must hold one finite share"),
        ({"tensor_split": [1, math.nan]}, ValueError, r"tensor_split must hold"),
        ({"tensor_split": [1, "a"]}, TypeError, r"tensor_split\[\] must be a number"),
        ({"use_mmap": 1}, TypeError, r"use_mmap must be True or False"),
        ({"use_mlock": "no"}, TypeError, r"use_mlock must be True or False"),
        ({"offload_kqv": None}, TypeError, r"offload_kqv must be True or False"),
        ({"n_ubatch": 1024}, ValueError, r"n_ubatch must be an int in \[1, 512\]"),
        ({"n_threads_batch": 0}, ValueError, r"n_threads_batch must be an int in \[1,"),
    ],
)
def test_bad_values_name_the_option(options: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        seqlease.Context(tiny_model_path(), **SMALL, **options)


# -- the "auto" rules and refusals on builds this machine is not -------------------------


def _gpu_build() -> Any:
    from fake_bindings import binding_newest

    lib = binding_newest()
    lib.llama_supports_gpu_offload = lambda: True
    lib.llama_max_devices = lambda: 16
    return lib


def test_auto_offloads_every_layer_and_flash_attention_on_a_gpu_build() -> None:
    model, context = resolve(_gpu_build(), ModelOptions(), ContextOptions())
    assert model.n_gpu_layers == -1
    assert context.flash_attn is True
    model, context = resolve(_gpu_build(), ModelOptions(n_gpu_layers=0), ContextOptions())
    assert context.flash_attn is False  # nothing offloaded: the CPU rule
    model, _ = resolve(_gpu_build(), ModelOptions(n_gpu_layers=10, tensor_split=[3, 1]), SMALL_C)
    assert (model.n_gpu_layers, model.tensor_split) == (10, (3.0, 1.0))


SMALL_C = ContextOptions(**SMALL)


def test_tensor_split_longer_than_the_devices_is_refused() -> None:
    with pytest.raises(ValueError, match=r"tensor_split has 17 shares .* at most 16 devices"):
        resolve(_gpu_build(), ModelOptions(tensor_split=[1.0] * 17), SMALL_C)


def test_flash_attention_on_a_binding_without_it() -> None:
    from fake_bindings import FIELDS_NEWEST, NAMES_NEWEST, make_module

    lib = make_module(NAMES_NEWEST, [f for f in FIELDS_NEWEST if "flash_attn" not in f])
    with pytest.raises(seqlease.BackendUnavailableError, match=r"^flash_attn=True cannot be"):
        resolve(lib, ModelOptions(), ContextOptions(flash_attn=True))
    with pytest.raises(seqlease.BackendUnavailableError, match=r"^type_v='q8_0' cannot be"):
        resolve(lib, ModelOptions(), ContextOptions(type_v="q8_0"))
    _, context = resolve(lib, ModelOptions(), ContextOptions(type_k="q8_0"))
    assert context.flash_attn is False


def test_completion_backend_refuses_what_its_llama_takes_no_keyword_for() -> None:
    class OldLlama:  # llama-cpp-python 0.2.90's Llama: no n_ubatch keyword
        def __init__(
            self, model_path: str, n_ctx: int = 512, n_batch: int = 512, n_threads: int = 1
        ) -> None:
            pass

    lib = load_library()
    model, context = resolve(
        lib, ModelOptions(), ContextOptions(n_batch=64, n_ubatch=32, n_threads=1)
    )
    with pytest.raises(seqlease.BackendUnavailableError, match=r"^n_ubatch=32 cannot be"):
        llama_kwargs(OldLlama, model, context)
    model, context = resolve(lib, ModelOptions(), ContextOptions(n_batch=64, n_threads=1))
    assert llama_kwargs(OldLlama, model, context) == {"n_ctx": 2048, "n_batch": 64, "n_threads": 1}


def test_llama_gets_every_option_it_takes() -> None:
    import llama_cpp

    model, context = resolve(
        load_library(),
        ModelOptions(use_mmap=False),
        ContextOptions(n_batch=64, n_ubatch=16, type_k="q4_0", type_v="q8_0", offload_kqv=False),
    )
    kwargs = llama_kwargs(llama_cpp.Llama, model, context)
    assert kwargs["type_k"] == KV_TYPES["q4_0"].ggml_id == llama_cpp.GGML_TYPE_Q4_0
    assert kwargs["type_v"] == KV_TYPES["q8_0"].ggml_id == llama_cpp.GGML_TYPE_Q8_0
    expected = {"flash_attn": True, "n_ubatch": 16, "use_mmap": False, "offload_kqv": False}
    assert expected.items() <= kwargs.items()
    assert "kv_unified" not in kwargs


def test_kv_type_ids_are_ggml_s() -> None:
    import llama_cpp

    for name, kv_type in KV_TYPES.items():
        constant = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
        if constant is not None:  # this binding does not export GGML_TYPE_BF16
            assert constant == kv_type.ggml_id, name


def test_completion_backend_reads_its_kv_size(llama_log: pytest.LogCaptureFixture) -> None:
    backend = completion_backend(tiny_model_path(), sequences=1, n_ctx=64, n_threads=1)
    try:
        assert backend.kv_cache_bytes is not None
        assert backend.kv_cache_bytes / 2**20 == pytest.approx(reported_kv(llama_log)[2], abs=0.01)
    finally:
        backend.close()
