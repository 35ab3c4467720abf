"""The smoke suite that the compatibility matrix runs against each llama-cpp-python release.

It is self-contained (no conftest fixtures, no Sybil), so ``tests/compat_matrix.py`` can run it
with ``pytest --noconftest`` in a virtual environment holding only an older binding, seqlease
and pytest. In the main suite it runs on the newest release like every other test.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import pytest

import seqlease
from seqlease.native.library import load_library

#: The per-sequence memory API that each release binds, from the releases' own sources (see
#: docs/compatibility.md), written down independently of ``detect()``'s ``hasattr`` checks.
GENERATIONS = (
    ((0, 3, 10), "memory"),  # llama_memory_* (0.3.10 to 0.3.16 bind kv_self too)
    ((0, 3, 9), "kv_self"),  # llama_kv_self_*, but seq_rm only as llama_kv_cache_seq_rm
    ((0, 0, 0), "kv_cache"),  # llama_kv_cache_* only
)


PROMPT = "The three largest oceans on Earth are"
TOKENS = 12


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3])


def supported_from() -> tuple[int, ...]:
    """The oldest llama-cpp-python seqlease supports: its requirement in pyproject.toml."""
    for requirement in metadata.requires("seqlease") or ():
        if match := re.fullmatch(r"llama-cpp-python\s*>=\s*([\d.]+)", requirement.strip()):
            return version_tuple(match.group(1))
    raise AssertionError("seqlease declares no llama-cpp-python>=... requirement")


def expected_generation(version: str) -> str:
    return next(name for first, name in GENERATIONS if version_tuple(version) >= first)


def test_generation_table() -> None:
    assert expected_generation("0.3.36") == "memory"
    assert expected_generation("0.3.16") == "memory"
    assert expected_generation("0.3.10") == "memory"
    assert expected_generation("0.3.9") == "kv_self"
    assert expected_generation("0.3.8") == "kv_cache"


def test_detect_generation() -> None:
    import llama_cpp

    caps = seqlease.detect()
    assert caps.binding_version == llama_cpp.__version__
    assert caps.memory_api == expected_generation(caps.binding_version), caps.reasons
    if version_tuple(caps.binding_version) >= supported_from():
        assert caps.session and caps.completion, caps.reasons
        assert caps.backend == "session"


def test_auto_backend_answers() -> None:
    caps = seqlease.detect()
    with seqlease.Context(sequences=1, n_ctx=256, n_threads=1) as ctx:
        assert ctx.backend.name == caps.backend
        assert ctx.complete(PROMPT, max_tokens=TOKENS, temperature=0).strip()


@pytest.fixture(scope="module")
def ctx() -> Iterator[seqlease.Context]:
    if not seqlease.detect().session:  # below the supported range: refused, with the reasons
        with pytest.raises(seqlease.BackendUnavailableError, match="missing"):
            seqlease.Context(sequences=2, n_ctx=256, n_threads=1, backend="session")
        pytest.skip("this release cannot run the session backend (refused cleanly)")
    with seqlease.Context(sequences=2, n_ctx=256, n_threads=1, backend="session") as ctx:
        yield ctx


def native_state_size(ctx: seqlease.Context, seq_id: int) -> int:
    """Bytes llama.cpp needs to snapshot one sequence: grows with every token it holds.

    Bound in every release since 0.2.61, unlike ``seq_pos_max``, so "empty" is checked by
    llama.cpp itself on every generation.
    """
    assert ctx.backend.name == "session"
    with ctx.probe.paused():  # every native call holds the engine's guard
        return int(load_library().llama_state_seq_get_size(ctx.probe.context_ptr(), seq_id))


def test_two_leases_batched_then_empty(ctx: seqlease.Context) -> None:
    empty = [native_state_size(ctx, i) for i in range(2)]
    probe = ctx.probe
    with ctx.lease(timeout=0) as a, ctx.lease(timeout=0) as b:
        alone = a.generate(PROMPT, max_tokens=TOKENS, temperature=0).result()
        steps_before = probe.steps
        gen_a = a.generate(PROMPT + " Please.", max_tokens=TOKENS, temperature=0)
        gen_b = b.generate(PROMPT, max_tokens=TOKENS, temperature=0)
        res_a, res_b = gen_a.result(), gen_b.result()
        steps = probe.steps - steps_before
        held = [native_state_size(ctx, i) for i in (a.id, b.id)]
    assert res_a.text and res_b.text
    assert res_b.text == alone.text  # batching next to another sequence changes nothing
    # Both decoded in shared steps: one after the other would take at least one step per
    # generated token of each.
    assert steps < res_a.n_generated + res_b.n_generated, steps
    assert all(h > e for h, e in zip(held, empty, strict=True))
    stats = ctx.stats()
    assert (stats.leased, stats.free, stats.leaked) == (0, 2, 0)
    assert [native_state_size(ctx, i) for i in range(2)] == empty


def test_completion_backend_answers() -> None:
    with seqlease.Context(sequences=1, n_ctx=256, n_threads=1, backend="completion") as ctx:
        assert ctx.backend.name == "completion"
        text = ctx.complete(PROMPT, max_tokens=TOKENS, temperature=0)
    assert text.strip()


def test_llama_log_levels(caplog: pytest.LogCaptureFixture) -> None:
    # ggml renumbered its log levels once; loading a model is never an error (one warning:
    # n_ctx below the trained context).
    with (
        caplog.at_level(logging.DEBUG, logger="seqlease.llama"),
        seqlease.Context(sequences=1, n_ctx=256, n_threads=1),
    ):
        pass
    levels = {r.levelno for r in caplog.records if r.name == "seqlease.llama"}
    assert levels and max(levels) < logging.ERROR, sorted(levels)


def test_no_log_noise(capfd: pytest.CaptureFixture[str]) -> None:
    with seqlease.Context(sequences=1, n_ctx=256, n_threads=1) as ctx:
        ctx.complete(PROMPT, max_tokens=2)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


LONG_PROMPT = " ".join(
    f"Rule {i}: answer briefly, cite sources, and use metric units." for i in range(12)
)


def test_prefix_is_copied_not_evaluated(ctx: seqlease.Context) -> None:
    """Every binding generation shares prefixes: one stream per sequence where the binding
    has ``kv_unified`` (whole copies), one buffer before it (partial copies)."""
    unified = "kv_unified" not in {f for f, *_ in load_library().llama_context_params._fields_}
    assert ctx.probe.kv_unified is unified  # type: ignore[attr-defined]
    with ctx.lease(timeout=0) as seq:
        cold = seq.generate(LONG_PROMPT, max_tokens=TOKENS, temperature=0).result()
    before = ctx.stats()
    with ctx.lease(timeout=0) as seq:
        warm = seq.generate(LONG_PROMPT, max_tokens=TOKENS, temperature=0).result()
    after = ctx.stats()
    assert cold.n_evaluated == cold.n_prompt > 64
    assert warm.n_evaluated == 2
    assert after.prefix_hits == before.prefix_hits + 1
    assert after.prefix_tokens_reused - before.prefix_tokens_reused == warm.n_prompt - 2
    assert warm.text == cold.text
    with ctx.lease(timeout=0) as seq:
        seq.generate(LONG_PROMPT, max_tokens=2, temperature=0).result()
        with seq.fork(timeout=0) as branch:
            assert branch.n_tokens == seq.n_tokens > 64
    assert [native_state_size(ctx, i) for i in range(2)] == [native_state_size(ctx, 0)] * 2


def test_kv_unified_false_needs_a_binding_that_has_it() -> None:
    if not seqlease.detect().session:
        pytest.skip("below the supported range: the session backend is refused (tested above)")
    version = metadata.version("llama-cpp-python")
    if version_tuple(version) >= (0, 3, 15):
        with seqlease.Context(sequences=2, n_ctx=256, n_threads=1, kv_unified=False) as ctx:
            assert ctx.probe.kv_unified is False  # type: ignore[attr-defined]
        return
    with pytest.raises(
        seqlease.BackendUnavailableError,
        match=rf"^kv_unified=False cannot be honoured by llama-cpp-python {version}: .*0\.3\.15",
    ):
        seqlease.Context(sequences=2, n_ctx=256, n_threads=1, kv_unified=False)


KV_LINE = re.compile(r"K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB")


def native_ptr(ctx: seqlease.Context) -> Any:
    """The ``llama_context *`` behind a Context, whichever backend it runs on."""
    return ctx.probe.context_ptr()


def test_options_read_back_from_llama_cpp(caplog: pytest.LogCaptureFixture) -> None:
    """Batches, threads and a quantized KV cache (with the flash attention it needs) reach
    llama.cpp on every release, under whichever field names it has; where the backend cannot
    take an option, asking for it is refused with the option and the version."""
    import inspect

    import llama_cpp

    lib = load_library()
    version = metadata.version("llama-cpp-python")
    options: dict[str, Any] = {
        "sequences": 1,
        "n_ctx": 256,
        "n_batch": 64,
        "n_ubatch": 32,
        "n_threads": 1,
        "n_threads_batch": 2,
        "type_k": "q8_0",
        "type_v": "q8_0",
    }
    llama_takes = inspect.signature(llama_cpp.Llama.__init__).parameters
    if seqlease.detect().backend == "completion" and "n_ubatch" not in llama_takes:
        with pytest.raises(
            seqlease.BackendUnavailableError,
            match=rf"^n_ubatch=32 cannot be honoured by llama-cpp-python {version}: ",
        ):
            seqlease.Context(**options)
        del options["n_ubatch"]
    with caplog.at_level(logging.INFO, logger="seqlease.llama"), seqlease.Context(**options) as ctx:
        ptr = native_ptr(ctx)
        assert lib.llama_n_batch(ptr) == 64
        if "n_ubatch" in options:
            assert lib.llama_n_ubatch(ptr) == 32
        assert (lib.llama_n_threads(ptr), lib.llama_n_threads_batch(ptr)) == (1, 2)
        assert ctx.context_options.flash_attn is True  # llama.cpp needs it for a q8_0 V cache
        assert ctx.complete(PROMPT, max_tokens=TOKENS, temperature=0).strip()
        size = ctx.kv_cache_bytes
    reported = [m for r in caplog.records if (m := KV_LINE.search(r.getMessage()))]
    assert len(reported) == 1, [r.getMessage() for r in caplog.records][-30:]
    k_type, k_mib, v_type, v_mib = reported[0].groups()
    assert (k_type, v_type) == ("q8_0", "q8_0")
    assert size is not None
    assert size / 2**20 == pytest.approx(float(k_mib) + float(v_mib), abs=0.01)


def test_use_mmap_reads_back_from_the_process_maps(tmp_path: Any) -> None:
    """``use_mmap`` (a field until 0.3.36 made it part of ``load_mode``) reaches llama.cpp."""
    import shutil

    model = shutil.copy(seqlease.default_model_path(), tmp_path / "copy.gguf")

    def mapped() -> bool:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return any(line.rstrip().endswith(str(model)) for line in maps)

    for use_mmap in (True, False):
        with seqlease.Context(model, sequences=1, n_ctx=256, n_threads=1, use_mmap=use_mmap):
            assert mapped() is use_mmap


def test_gpu_offload_is_reported_and_refused_on_a_cpu_build() -> None:
    lib = load_library()
    caps = seqlease.detect()
    assert caps.gpu_offload is bool(lib.llama_supports_gpu_offload())
    if caps.gpu_offload:
        pytest.skip("a GPU build: n_gpu_layers can be honoured here")
    version = metadata.version("llama-cpp-python")
    with pytest.raises(
        seqlease.BackendUnavailableError,
        match=rf"^n_gpu_layers=8 cannot be honoured by llama-cpp-python {version}: ",
    ):
        seqlease.Context(sequences=1, n_ctx=256, n_threads=1, n_gpu_layers=8)
    with seqlease.Context(sequences=1, n_ctx=256, n_threads=1) as ctx:
        assert ctx.model_options.n_gpu_layers == 0


SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green"]}, "count": {"type": "integer"}},
    "required": ["colour", "count"],
}


def structured_replies(ctx: seqlease.Context) -> None:
    """A schema, a grammar, bad grammars, logprobs and a bias on one Context."""
    with ctx.lease(timeout=0) as seq:
        # llguidance masks the logits in Python: grammars work the same on every binding.
        assert seqlease.detect().grammars
        reply = seq.generate("JSON:", json_schema=SCHEMA, max_tokens=64, seed=1).result()
        parsed = json.loads(reply.text)
        assert parsed["colour"] in ("red", "green") and isinstance(parsed["count"], int)
        choice = seq.generate("Yes or no?", grammar='root ::= "yes" | "no"', max_tokens=4)
        assert choice.result().text in ("yes", "no")
        with pytest.raises(seqlease.GrammarError):
            seq.generate("Hi", grammar="root ::= undefined")
        with pytest.raises(seqlease.GrammarError):  # no text completes it: fails, never aborts
            seq.generate("Hi", grammar='root ::= "a" root', max_tokens=200).result()
        logprobs_and_bias(seq)


def logprobs_and_bias(seq: seqlease.Sequence) -> None:
    first = seq.generate(PROMPT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    result = first.result()
    assert result.logprobs is not None and len(result.logprobs) == result.n_generated
    best = result.logprobs[0]
    assert best.top[0][1] == pytest.approx(best.logprob) and best.logprob <= 0
    banned = seq.generate(
        PROMPT, max_tokens=1, temperature=0, logprobs=True, logit_bias={best.token: -100}
    ).result()
    assert banned.logprobs is not None and banned.logprobs[0].token != best.token


def test_structured_output_on_the_session_backend(ctx: seqlease.Context) -> None:
    structured_replies(ctx)


def test_structured_output_on_the_completion_backend() -> None:
    with seqlease.Context(sequences=1, n_ctx=256, n_threads=1, backend="completion") as ctx:
        structured_replies(ctx)


def test_saved_state_and_resumed_chat(ctx: seqlease.Context) -> None:
    greedy: dict[str, Any] = {"temperature": 0, "max_tokens": 12}
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, system_prompt="Be brief.")
        chat.prompt("Name a colour.", **greedy)
        saved = chat.save()
        expected = chat.prompt("Name another.", **greedy)
    assert saved.state is not None
    with ctx.lease() as seq:
        with pytest.raises(seqlease.StateError, match="truncated"):
            seq.load_state(saved.state[:-10])
        assert seq.n_tokens == 0
        blob = saved.to_bytes()
        resumed = seqlease.ChatSession.resume(seq, seqlease.SavedChat.from_bytes(blob))
        assert resumed.resumed_from == "state"
        assert resumed.prompt("Name another.", **greedy) == expected
        result = resumed.last_result
        assert result is not None and result.n_evaluated < result.n_prompt / 2


def test_context_shift_moves_the_kept_turns(ctx: seqlease.Context) -> None:
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, system_prompt="Be brief.")
        trimmed = []
        for i in range(10):
            chat.prompt(f"Tell me about the number {i}.", temperature=0, max_tokens=40)
            result = chat.last_result
            assert result is not None
            if result.n_trimmed > (trimmed[-1].n_trimmed if trimmed else 0):
                trimmed.append(result)
        assert trimmed
        assert all(r.n_evaluated < 24 < r.n_prompt / 3 for r in trimmed), trimmed


def test_completion_backend_resumes_by_evaluating_again() -> None:
    with (
        seqlease.Context(sequences=1, n_ctx=256, n_threads=1, backend="completion") as ctx,
        ctx.lease() as seq,
    ):
        chat = seqlease.ChatSession(seq)
        chat.prompt("Name a colour.", temperature=0, max_tokens=8)
        saved = chat.save()
        assert saved.state is None
        resumed = seqlease.ChatSession.resume(seq, saved)
        assert resumed.resumed_from == "history"
        assert resumed.prompt("Name another.", temperature=0, max_tokens=8)
