"""Backend detection: the real installed binding, fake shapes of older generations, and doctor.

Fakes (tests/fake_bindings.py) are used here and only here: detection is pure attribute
inspection, and the older generations cannot be installed next to the real one.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as real_lib
import pytest

import fake_bindings as fb
import seqlease
from seqlease.__main__ import main
from seqlease.detection import Capabilities, detect, detect_from
from seqlease.native.memory import resolve_memory_api
from seqlease.native.names import NAMES, SESSION_NEEDS

# -- the real, installed binding ---------------------------------------------------------------


def test_detect_real_binding() -> None:
    caps = detect()
    assert caps.memory_api == "memory"
    assert caps.backend == "session"
    assert caps.session is True
    assert caps.completion is True
    assert caps.native_pos_max is True
    assert caps.binding_version == llama_cpp.__version__
    assert caps.system_info  # llama_print_system_info is bound and says something
    assert "recommended backend: session" in caps.reasons


def test_detect_is_exported_and_cached() -> None:
    assert seqlease.detect is detect
    assert detect() is detect()


def test_newest_fake_matches_the_installed_binding() -> None:
    # Ties the fakes to reality for the one generation that is installed: if the fake drifts,
    # the tests against it stop meaning anything.
    for name in fb.NAMES_NEWEST:
        assert hasattr(real_lib, name), name
    real_fields = [name for name, *_ in real_lib.llama_context_params._fields_]
    assert tuple(real_fields) == fb.FIELDS_NEWEST
    stale = [n for n in dir(real_lib) if n.startswith(("llama_kv_self_", "llama_kv_cache_seq"))]
    assert stale == []


# -- fake generations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "memory_api", "native_pos_max"),
    [
        (fb.binding_0_3_8, "kv_cache", False),
        (fb.binding_0_3_9, "kv_self", False),  # its seq_pos_max says 0 for an empty sequence
        (fb.binding_0_3_16, "memory", True),
        (fb.binding_newest, "memory", True),
    ],
    ids=["0.3.8", "0.3.9", "0.3.16", "newest"],
)
def test_generations_with_a_session_backend(
    make: Any, memory_api: str, native_pos_max: bool
) -> None:
    caps = detect_from(make(), fb.FakeLlama, "x.y.z")
    assert caps.memory_api == memory_api
    assert caps.native_pos_max is native_pos_max
    assert caps.session is True
    assert caps.completion is True
    assert caps.backend == "session"
    assert caps.binding_version == "x.y.z"
    assert caps.system_info == fb.SYSTEM_INFO.decode().strip()


def test_newest_generation_wins_where_several_are_bound() -> None:
    lib = fb.binding_0_3_16()  # both llama_kv_self_* and llama_memory_* exist
    ops, reasons = resolve_memory_api(lib)
    assert ops is not None
    assert ops.name == "memory"
    assert ops.seq_rm("ctx", 1, -1, -1) is True
    assert ops.seq_pos_max is not None
    assert ops.seq_pos_max("ctx", 1) == 41
    # The memory generation works on llama_get_memory(ctx), never on the context directly.
    assert lib.calls == [
        ("llama_get_memory", ("ctx",)),
        ("llama_memory_seq_rm", (fb.MEMORY_HANDLE, 1, -1, -1)),
        ("llama_get_memory", ("ctx",)),
        ("llama_memory_seq_pos_max", (fb.MEMORY_HANDLE, 1)),
    ]
    assert not any(name.startswith("llama_kv_self") for name, _ in lib.calls)
    assert reasons == ("memory API 'memory': all per-sequence operations are bound",)


def test_memory_clear_passes_the_data_flag() -> None:
    lib = fb.binding_newest()
    ops, _ = resolve_memory_api(lib)
    assert ops is not None
    ops.clear("ctx")
    assert lib.calls[-1] == ("llama_memory_clear", (fb.MEMORY_HANDLE, False))


def test_0_3_9_removes_through_llama_kv_cache_seq_rm() -> None:
    lib = fb.binding_0_3_9()
    assert not hasattr(lib, "llama_kv_self_seq_rm")
    ops, _ = resolve_memory_api(lib)
    assert ops is not None
    assert ops.name == "kv_self"
    assert ops.seq_rm is lib.llama_kv_cache_seq_rm
    # Everything else comes from the kv_self generation, not from the older names.
    assert ops.seq_cp is lib.llama_kv_self_seq_cp
    assert ops.seq_keep is lib.llama_kv_self_seq_keep
    assert ops.clear is lib.llama_kv_self_clear
    assert ops.seq_add is lib.llama_kv_self_seq_add
    # Its seq_pos_max cannot tell an empty sequence from one token: positions are tracked.
    assert ops.seq_pos_max is None


def test_0_3_8_has_no_native_pos_max() -> None:
    ops, reasons = resolve_memory_api(fb.binding_0_3_8())
    assert ops is not None
    assert ops.name == "kv_cache"
    assert ops.seq_pos_max is None
    assert any("'memory' not usable" in r and "llama_memory_clear" in r for r in reasons)
    assert any("'kv_self' not usable" in r for r in reasons)


def test_incomplete_newest_generation_is_not_used() -> None:
    lib = fb.binding_newest(without=["llama_memory_seq_pos_max"])
    caps = detect_from(lib, fb.FakeLlama, None)
    assert caps.memory_api is None
    assert caps.session is False
    assert caps.backend == "completion"
    assert any("llama_memory_seq_pos_max" in r for r in caps.reasons)
    assert any("per-sequence memory operations" in r for r in caps.reasons)


def test_0_2_x_falls_back_to_completion_and_says_why() -> None:
    caps = detect_from(fb.binding_0_2_x(), fb.FakeLlama, "0.2.26")
    assert caps.memory_api == "kv_cache"  # the memory ops exist ...
    assert caps.session is False  # ... but the rest of the session backend does not
    assert caps.completion is True
    assert caps.backend == "completion"
    unavailable = next(r for r in caps.reasons if r.startswith("session backend unavailable"))
    assert "llama_sampler_chain_init" in unavailable
    assert "n_seq_max" in unavailable
    assert "llama_model_get_vocab" in unavailable
    assert "recommended backend: completion" in caps.reasons


@pytest.mark.parametrize("purpose", SESSION_NEEDS)
def test_each_session_need_is_required(purpose: str) -> None:
    names = NAMES[purpose]
    caps = detect_from(fb.binding_newest(without=names), fb.FakeLlama, None)
    assert caps.session is False
    assert caps.backend == "completion"
    assert any(purpose in r and names[0] in r for r in caps.reasons)


def test_either_name_of_a_renamed_function_is_enough() -> None:
    # 0.3.x before llama_model_load_from_file / llama_init_from_model existed.
    lib = fb.binding_newest(without=["llama_model_load_from_file", "llama_init_from_model"])
    assert detect_from(lib, fb.FakeLlama, None).session is True


def test_no_n_seq_max_means_no_session() -> None:
    lib = fb.make_module(fb.NAMES_NEWEST, [f for f in fb.FIELDS_NEWEST if f != "n_seq_max"])
    caps = detect_from(lib, fb.FakeLlama, None)
    assert caps.memory_api == "memory"
    assert caps.session is False
    assert any("n_seq_max" in r for r in caps.reasons)


def test_session_without_llama_class() -> None:
    caps = detect_from(fb.binding_newest(), None, None)
    assert caps.backend == "session"
    assert caps.completion is False
    assert any(
        r.startswith("completion backend unavailable: llama_cpp.Llama lacks") for r in caps.reasons
    )


def test_nothing_bound_means_no_backend() -> None:
    caps = detect_from(fb.binding_empty(), None, None)
    assert caps.backend is None
    assert caps.memory_api is None
    assert caps.session is False
    assert caps.completion is False
    assert caps.native_pos_max is False
    assert caps.system_info is None
    assert "no backend can run on this binding" in caps.reasons


def test_binding_not_importable() -> None:
    caps = detect_from(None, None, None)
    assert caps.backend is None
    assert caps.session is caps.completion is False
    assert any("pip install llama-cpp-python" in r for r in caps.reasons)


def test_capabilities_is_frozen() -> None:
    caps = detect_from(fb.binding_newest(), fb.FakeLlama, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.backend = "completion"  # type: ignore[misc]
    assert isinstance(caps, Capabilities)
    assert hash(caps) == hash(dataclasses.replace(caps))


# -- doctor ------------------------------------------------------------------------------------


def test_doctor_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^llama-cpp-python +" + re.escape(llama_cpp.__version__) + "$", out, re.M)
    assert re.search(r"^backend +session$", out, re.M)
    assert re.search(r"^status +ready$", out, re.M)
    for reason in detect().reasons:
        assert reason in out
    assert re.search(r"^threads +\d+ by default", out, re.M)
    # This machine's build: no GPU offload, one CPU device, and the GPU options refused.
    assert re.search(r"^GPU offload +no \(a CPU-only build\)$", out, re.M)
    assert re.search(r"^devices +CPU \(CPU: ", out, re.M)
    assert re.search(r"^options refused +n_gpu_layers, main_gpu, tensor_split: ", out, re.M)


def test_gpu_offload_and_refusals_come_from_the_binding() -> None:
    lib = fb.binding_newest()
    caps = detect_from(lib, fb.FakeLlama, "0.3.36")
    assert caps.gpu_offload is False  # the fake's llama_supports_gpu_offload says nothing
    assert caps.unhonoured[0].startswith("n_gpu_layers, main_gpu, tensor_split: ")
    lib.llama_supports_gpu_offload = lambda: True
    assert detect_from(lib, fb.FakeLlama, "0.3.36").gpu_offload is True
    old = detect_from(fb.binding_0_3_9(), fb.FakeLlama, "0.3.9")
    assert any(line.startswith("kv_unified: ") for line in old.unhonoured), old.unhonoured
    assert detect().devices and detect().devices[0].startswith("CPU")


def test_refusals_of_llama_count_where_the_completion_backend_runs() -> None:
    class Llama0290(fb.FakeLlama):  # the keywords of 0.2.90's Llama that seqlease passes
        def __init__(
            self,
            model_path: str,
            n_gpu_layers: int = 0,
            main_gpu: int = 0,
            tensor_split: Any = None,
            use_mmap: bool = True,
            use_mlock: bool = False,
            n_ctx: int = 512,
            n_batch: int = 512,
            n_threads: Any = None,
            n_threads_batch: Any = None,
            offload_kqv: bool = True,
            flash_attn: bool = False,
            type_k: Any = None,
            type_v: Any = None,
        ) -> None:
            pass

    caps = detect_from(fb.binding_0_2_x(), Llama0290, "0.2.90")
    assert caps.backend == "completion"
    assert any(line.startswith("n_ubatch: llama_cpp.Llama takes no") for line in caps.unhonoured)
    newest = detect_from(fb.binding_newest(), Llama0290, "0.3.36")
    assert not any("n_ubatch" in line for line in newest.unhonoured)  # the session backend runs


@pytest.mark.parametrize(("policy", "hint"), [(None, True), ("active", True), ("passive", False)])
def test_doctor_shows_the_openmp_wait_policy(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    policy: str | None,
    hint: bool,
) -> None:
    if "OPENMP = 1" not in (detect().system_info or ""):
        pytest.skip("this llama.cpp build does not use OpenMP")
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    assert main(["doctor"]) == 0
    line = re.search(r"^OMP_WAIT_POLICY +(.*)$", capsys.readouterr().out, re.M)
    assert line is not None
    assert line.group(1).startswith(policy or "unset")
    assert ("PASSIVE avoids stalls" in line.group(1)) is hint


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "doctor" in capsys.readouterr().err


def _doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seqlease", "doctor", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )


def test_doctor_subprocess() -> None:
    result = _doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    assert llama_cpp.__version__ in result.stdout
    assert re.search(r"^backend +session$", result.stdout, re.M)
    assert "memory" in result.stdout
    assert result.stderr == ""


def test_doctor_subprocess_missing_model(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    result = _doctor(env={"SEQLEASE_MODEL": str(missing)})
    assert result.returncode == 1
    words = " ".join(result.stdout.split())  # long messages are wrapped
    assert "NOT READY" in words
    assert f"model file {str(missing)!r} does not exist" in words


def test_doctor_load_rejects_damaged_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert main(["doctor", "--load", "--model", str(damaged)]) == 1
    words = " ".join(capsys.readouterr().out.split())
    assert "GGUF header ok" in words  # the magic is right ...
    assert "llama.cpp cannot load the model" in words  # ... but llama.cpp refuses it


def test_doctor_load_real_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--load"]) == 0
    assert re.search(r"^model load +ok: llama ", capsys.readouterr().out, re.M)


@pytest.mark.parametrize(
    ("make", "llama_class", "status", "backend"),
    [
        (fb.binding_empty, None, 1, "none"),
        (fb.binding_0_2_x, fb.FakeLlama, 0, "completion"),
        (fb.binding_0_3_8, fb.FakeLlama, 0, "session"),
    ],
    ids=["nothing", "0.2.x", "0.3.8"],
)
def test_doctor_reports_other_generations(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make: Any,
    llama_class: Any,
    status: int,
    backend: str,
) -> None:
    # Only what detection reports is faked; the model checks below it stay real.
    caps = detect_from(make(), llama_class, "0.0.0")
    monkeypatch.setattr("seqlease.detection.detect", lambda: caps)
    assert main(["doctor"]) == status
    out = capsys.readouterr().out
    assert re.search(rf"^backend +{backend}$", out, re.M)
    for reason in caps.reasons:
        assert " ".join(reason.split()) in " ".join(out.split())
    if status:
        assert "no backend can run on this llama-cpp-python" in out
    else:
        assert re.search(r"^status +ready$", out, re.M)


@pytest.mark.parametrize(
    ("make", "version"),
    [
        (fb.binding_0_2_x, "0.2.90"),
        (fb.binding_0_3_8, "0.3.8"),
        (fb.binding_0_3_9, "0.3.9"),
        (fb.binding_0_3_16, "0.3.16"),
        (fb.binding_newest, "0.3.36"),
    ],
)
def test_grammars_run_on_llguidance_on_every_binding(make: Any, version: str) -> None:
    # llama.cpp's grammar sampler is never used: 0.2.90 has none, and 0.3.8's turned a
    # grammar it could not parse into one that constrains nothing.
    caps = detect_from(make(), fb.FakeLlama, version)
    assert caps.grammars
    line = next(r for r in caps.reasons if r.startswith("grammars and JSON schemas"))
    assert "llguidance" in line


@pytest.mark.parametrize(
    ("make", "saved_state", "context_shift"),
    [
        (fb.binding_0_2_x, False, False),  # no session backend at all
        (fb.binding_0_3_8, True, True),
        (fb.binding_0_3_9, True, True),
        (fb.binding_0_3_16, True, True),
        (fb.binding_newest, True, True),
        (lambda: fb.binding_newest(without=["llama_state_seq_set_data"]), False, True),
        (lambda: fb.binding_newest(without=["llama_memory_seq_add"]), True, False),
    ],
)
def test_saved_states_and_context_shift_are_detected(
    make: Any, saved_state: bool, context_shift: bool
) -> None:
    caps = detect_from(make(), fb.FakeLlama, "0.3.x")
    assert caps.saved_state is saved_state
    assert caps.context_shift is context_shift
    line = next(r for r in caps.reasons if r.startswith("saved sequence states"))
    assert ("unavailable" in line) is not saved_state
    if make is not fb.binding_0_2_x and not saved_state:
        assert "llama_state_seq_set_data" in line
