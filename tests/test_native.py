"""The native adapter against the real binding and the real default model (no fakes).

Anything that could abort the process (a bad sequence id or token reaching llama.cpp) runs in
a child interpreter, so a regression shows up as a failed test instead of a dead pytest. Each
such test has a control proving that the raw llama.cpp call really does abort.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlease
from helpers import native_context
from seqlease.errors import DecodeError, InvalidSequenceError
from seqlease.native.context import NativeContext
from seqlease.native.library import LLAMA_LOGGER, load_library
from seqlease.native.memory import MemoryOps, resolve_memory_api
from seqlease.native.model import NativeModel

N_SEQ = 2
N_CTX_SEQ = 256
N_BATCH = 64

# Builds the same context as the fixtures below, in a child process, and fills sequence 0.
PRELUDE = f"""
import ast, sys
sys.path.insert(0, "tests")
from helpers import native_context
from seqlease import InvalidSequenceError
from seqlease.model_path import default_model_path
from seqlease.native.library import load_library
from seqlease.native.memory import resolve_memory_api
from seqlease.native.model import NativeModel

lib = load_library()
memory, _ = resolve_memory_api(lib)
model = NativeModel(lib, default_model_path())
ctx = native_context(
    lib, model, memory, n_seq_max={N_SEQ}, n_ctx_seq={N_CTX_SEQ}, n_batch={N_BATCH},
    unified=False,
)
tokens = model.tokenize("The quick brown fox", add_special=False)
ctx.decode([(t, i, 0, False) for i, t in enumerate(tokens)])
"""


def _child(body: str) -> str:
    """A child-process script: the context set-up above, then ``body``."""
    return PRELUDE + body


ABORTED = -signal.SIGABRT  # subprocess reports death by a signal as its negative number


@pytest.fixture(scope="module")
def lib() -> Any:
    return load_library()


@pytest.fixture(scope="module")
def model(lib: Any) -> Iterator[NativeModel]:
    native = NativeModel(lib, seqlease.default_model_path())
    yield native
    native.close()


def _context(lib: Any, model: NativeModel, memory: MemoryOps) -> NativeContext:
    # One thread: this build uses OpenMP, whose spinning barriers make a tiny decode take
    # seconds when another process is busy on one of the machine's two cores.
    # One stream per sequence (llama.cpp's own default), where cross-sequence copies are
    # whole-stream only: the layout with the most hazards.
    return native_context(
        lib, model, memory, n_seq_max=N_SEQ, n_ctx_seq=N_CTX_SEQ, n_batch=N_BATCH, unified=False
    )


@pytest.fixture(scope="module")
def shared_ctx(lib: Any, model: NativeModel) -> Iterator[NativeContext]:
    memory, _ = resolve_memory_api(lib)
    assert memory is not None
    native = _context(lib, model, memory)
    yield native
    native.close()


@pytest.fixture
def ctx(shared_ctx: NativeContext) -> NativeContext:
    """The module's context, emptied: tests share one context but not its contents."""
    shared_ctx.clear()
    return shared_ctx


def _fill(ctx: NativeContext, model: NativeModel, seq_id: int, text: str) -> list[int]:
    tokens = model.tokenize(text, add_special=False)
    ctx.decode([(t, i, seq_id, i == len(tokens) - 1) for i, t in enumerate(tokens)])
    return tokens


# -- bad sequence ids: raised in Python, the process survives ------------------------------

BAD_IDS = [7, N_SEQ, -1, -(2**31), True, False, "0", 1.0, None]
OPERATIONS = {
    "seq_rm": "ctx.seq_rm(bad)",
    "seq_rm_partial": "ctx.seq_rm(bad, 0, 2)",
    "seq_pos_max": "ctx.seq_pos_max(bad)",
    "seq_cp_src": "ctx.seq_cp(bad, 1)",
    "seq_cp_dst": "ctx.seq_cp(0, bad)",
    "seq_keep": "ctx.seq_keep(bad)",
    "decode": "ctx.decode([(tokens[0], 0, bad, True)])",
}


def test_bad_seq_id_raises_and_process_survives(run_python: Any) -> None:
    # One child runs every operation with every bad id (a child per case would cost a model
    # load each); it prints one line per case and must get to the end alive.
    code = _child(f"""
for bad in ast.literal_eval(sys.argv[1]):
    for name, call in {OPERATIONS!r}.items():
        try:
            eval(call)
        except InvalidSequenceError as exc:
            print(repr(bad), name, type(exc).__name__)
        else:
            print(repr(bad), name, "no error")
print("seq0", ctx.seq_pos_max(0), len(tokens) - 1)
print("done")
""")
    result = run_python(code, repr(BAD_IDS))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "done"
    expected = [f"{bad!r} {name} InvalidSequenceError" for bad in BAD_IDS for name in OPERATIONS]
    assert lines[:-2] == expected
    # Nothing reached llama.cpp: the valid sequence still holds all its tokens.
    _, pos_max, last = lines[-2].split()
    assert pos_max == last


@pytest.mark.parametrize(
    "raw_call",
    [
        "lib.llama_memory_seq_rm(mem, 7, -1, -1)",
        "lib.llama_memory_seq_rm(mem, 7, 0, 2)",
        "lib.llama_memory_seq_pos_max(mem, 7)",
        "lib.llama_memory_seq_pos_max(mem, -1)",
        "lib.llama_memory_seq_cp(mem, 0, 7, -1, -1)",
        "lib.llama_memory_seq_keep(mem, 7)",
        "lib.llama_memory_seq_keep(mem, -1)",
    ],
)
def test_control_raw_bad_seq_id_aborts(run_python: Any, raw_call: str) -> None:
    # The same ids handed straight to llama.cpp kill the interpreter with a GGML_ASSERT: this
    # is what the validation above prevents.
    code = _child(f"mem = lib.llama_get_memory(ctx.ptr)\n{raw_call}\nprint('survived')\n")
    result = run_python(code)
    assert result.returncode == ABORTED, (result.returncode, result.stdout, result.stderr)
    assert "survived" not in result.stdout
    assert "GGML_ASSERT" in result.stderr


def test_control_raw_calls_that_do_not_abort(run_python: Any) -> None:
    # On llama-cpp-python 0.3.36, two raw paths do NOT abort on a bad id: llama_decode rejects
    # the batch with -1 ("invalid batch"), and llama_state_seq_get_size answers with a size for
    # a sequence that does not exist. Validation still matters there: without it a caller
    # gets a generic decode failure, or a snapshot of nothing, instead of InvalidSequenceError.
    code = _child("""
b = lib.llama_batch_init(1, 0, 1)
b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0], b.n_tokens = tokens[0], 0, 1, True, 1
b.seq_id[0][0] = 7
print("decode", lib.llama_decode(ctx.ptr, b))
print("state_size", lib.llama_state_seq_get_size(ctx.ptr, 7) > 0)
print("survived")
""")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["decode", "-1", "state_size", "True", "survived"]


def test_raw_seq_rm_minus_one_wipes_every_sequence(
    lib: Any, ctx: NativeContext, model: NativeModel
) -> None:
    # In llama.cpp seq_id -1 means "all sequences": legal, and it would wipe every other lease.
    # That is why NativeContext rejects -1 even though it does not crash.
    _fill(ctx, model, 0, "one two three")
    _fill(ctx, model, 1, "four five")
    assert lib.llama_memory_seq_rm(lib.llama_get_memory(ctx.ptr), -1, -1, -1)
    assert ctx.seq_pos_max(0) == ctx.seq_pos_max(1) == -1
    _fill(ctx, model, 0, "one two three")
    with pytest.raises(InvalidSequenceError):
        ctx.seq_rm(-1)
    assert ctx.seq_pos_max(0) >= 0


def test_check_seq_message(ctx: NativeContext) -> None:
    with pytest.raises(InvalidSequenceError, match=r"outside \[0, 2\).*ctx\.lease\(\)"):
        ctx.check_seq(7)
    with pytest.raises(InvalidSequenceError, match="must be an int, not bool"):
        ctx.check_seq(True)
    assert issubclass(InvalidSequenceError, ValueError)
    assert issubclass(InvalidSequenceError, seqlease.SeqleaseError)


# -- partial copies between per-sequence streams ---------------------------------------------


def test_partial_seq_cp_between_streams_raises(run_python: Any) -> None:
    code = _child("""
print("kv_unified", ctx.kv_unified)
try:
    ctx.seq_cp(0, 1, 0, 3)
except ValueError as exc:
    print(type(exc).__name__)
ctx.seq_cp(0, 1)  # the whole sequence is fine
print(ctx.seq_pos_max(1) == ctx.seq_pos_max(0))
""")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kv_unified", "False", "ValueError", "True"]


def test_control_raw_partial_seq_cp_aborts(run_python: Any) -> None:
    code = _child("lib.llama_memory_seq_cp(lib.llama_get_memory(ctx.ptr), 0, 1, 0, 3)\n")
    result = run_python(code)
    assert result.returncode == ABORTED
    assert "only supported for full KV buffers" in result.stderr


# -- memory, state, decode ---------------------------------------------------------------------


def test_decode_then_seq_pos_max(ctx: NativeContext, model: NativeModel) -> None:
    tokens = _fill(ctx, model, 0, "The quick brown fox jumps")
    assert ctx.seq_pos_max(0) == len(tokens) - 1
    assert ctx.seq_pos_max(1) == -1


def test_one_batch_feeds_both_sequences(ctx: NativeContext, model: NativeModel) -> None:
    a = model.tokenize("alpha beta gamma", add_special=False)
    b = model.tokenize("one", add_special=False)
    entries = [(t, i, 0, False) for i, t in enumerate(a)]
    entries += [(t, i, 1, True) for i, t in enumerate(b)]
    ctx.decode(entries)
    assert (ctx.seq_pos_max(0), ctx.seq_pos_max(1)) == (len(a) - 1, len(b) - 1)


def test_seq_rm_clears_to_minus_one(ctx: NativeContext, model: NativeModel) -> None:
    _fill(ctx, model, 0, "The quick brown fox jumps over")
    _fill(ctx, model, 1, "the lazy dog")
    assert ctx.seq_rm(0, 3, -1)
    assert ctx.seq_pos_max(0) == 2
    assert ctx.seq_rm(0)
    assert ctx.seq_pos_max(0) == -1
    assert ctx.seq_pos_max(1) >= 0  # the other sequence is untouched


def test_seq_keep_and_clear(ctx: NativeContext, model: NativeModel) -> None:
    _fill(ctx, model, 0, "keep me")
    _fill(ctx, model, 1, "drop me")
    ctx.seq_keep(0)
    assert ctx.seq_pos_max(1) == -1
    assert ctx.seq_pos_max(0) >= 0
    ctx.clear()
    assert ctx.seq_pos_max(0) == -1


def test_decode_errors_are_mapped(ctx: NativeContext, model: NativeModel) -> None:
    tokens = _fill(ctx, model, 0, "The quick brown fox")
    # A gap in a sequence's positions: llama.cpp refuses the batch (-1) without crashing.
    with pytest.raises(DecodeError, match="invalid batch") as info:
        ctx.decode([(tokens[0], len(tokens) + 10, 0, True)])
    assert info.value.code == -1
    assert ctx.seq_pos_max(0) == len(tokens) - 1


def test_decode_validates_before_native(ctx: NativeContext, model: NativeModel) -> None:
    tok = model.tokenize("x", add_special=False)[0]
    with pytest.raises(ValueError, match="empty batch"):
        ctx.decode([])
    with pytest.raises(ValueError, match="exceeds n_batch"):
        ctx.decode([(tok, i, 0, False) for i in range(N_BATCH + 1)])
    with pytest.raises(ValueError, match="position"):
        ctx.decode([(tok, N_CTX_SEQ, 0, True)])
    with pytest.raises(ValueError, match="position"):
        ctx.decode([(tok, -1, 0, True)])
    assert ctx.seq_pos_max(0) == -1


# -- tokens ------------------------------------------------------------------------------------


def test_invalid_token_raises_value_error_before_native(run_python: Any) -> None:
    # In a child: token_to_piece with a bad token aborts the process if it reaches llama.cpp
    # (see the control below). decode would only get -1 back, but must still say why.
    code = _child("""
calls = {
    "check_token": lambda: model.check_token(bad),
    "token_to_piece": lambda: model.token_to_piece(bad),
    "detokenize": lambda: model.detokenize([model.bos, bad]),
    "decode": lambda: ctx.decode([(bad, len(tokens), 0, True)]),
}
for bad in (-1, model.n_vocab, model.n_vocab + 100, -(2**31), 2**31 - 1):
    for name, call in calls.items():
        try:
            call()
        except ValueError as exc:
            ok = type(exc) is ValueError and "outside the vocabulary" in str(exc)
            print(name, "ValueError" if ok else repr(exc))
        else:
            print(name, "no error")
print("seq0", ctx.seq_pos_max(0) == len(tokens) - 1)
""")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    expected = ["check_token", "token_to_piece", "detokenize", "decode"] * 5
    assert result.stdout.splitlines() == [f"{name} ValueError" for name in expected] + ["seq0 True"]


def test_control_raw_token_to_piece_with_bad_token_aborts(run_python: Any) -> None:
    # llama.cpp looks the token up with std::vector::at; the std::out_of_range it throws cannot
    # cross the C API, so the process terminates.
    code = _child("""
import ctypes
buf = ctypes.create_string_buffer(64)
lib.llama_token_to_piece(lib.llama_model_get_vocab(model.ptr), model.n_vocab, buf, 64, 0, False)
print("survived")
""")
    result = run_python(code)
    assert result.returncode == ABORTED
    assert "out_of_range" in result.stderr


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "héllo wörld, ça va?",
        "日本語のテキスト",
        "emoji 🦙🚀",
        "  leading\n\ttabs  ",
        "",
    ],
)
def test_tokenize_detokenize_round_trip(model: NativeModel, text: str) -> None:
    tokens = model.tokenize(text, add_special=False)
    assert all(0 <= t < model.n_vocab for t in tokens)
    assert model.detokenize(tokens) == text


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(
        st.characters(categories=("L", "M", "N", "P", "S", "Zs"), include_characters="\n\t")
    )
)
def test_tokenize_round_trip_property(model: NativeModel, text: str) -> None:
    # Control characters and unassigned code points are excluded: llama.cpp's pre-tokenizer
    # drops or mangles them, which is the tokenizer's business, not seqlease's.
    tokens = model.tokenize(text, add_special=False, parse_special=False)
    assert model.detokenize(tokens) == text


def test_tokenize_long_text(model: NativeModel) -> None:
    text = " ".join(str(i) for i in range(3000))
    tokens = model.tokenize(text, add_special=False)
    assert len(tokens) > 3000
    assert model.detokenize(tokens) == text


def test_special_tokens(model: NativeModel) -> None:
    parsed = model.tokenize("<|im_start|>user", add_special=False)
    assert parsed[0] == model.bos  # SmolLM2's BOS is <|im_start|>
    assert model.detokenize(parsed, special=True) == "<|im_start|>user"
    assert model.detokenize(parsed) == "user"  # special pieces are hidden by default
    literal = model.tokenize("<|im_start|>user", add_special=False, parse_special=False)
    assert model.bos not in literal
    assert model.is_eog(model.eos)
    assert not model.is_eog(parsed[-1])


def test_model_metadata(model: NativeModel) -> None:
    assert model.n_vocab == 49152
    assert model.n_ctx_train > 0
    assert model.description().startswith("llama")
    template = model.chat_template()
    assert template is not None
    assert "<|im_start|>" in template
    assert model.meta("no.such.key") is None


# -- the kv_cache generation's position tracking, on real llama.cpp ---------------------------


@pytest.fixture(scope="module")
def tracking_ctx(lib: Any, model: NativeModel) -> Iterator[NativeContext]:
    # Not a fake: the real llama_memory_* functions, with seq_pos_max withheld, so that
    # NativeContext runs the tracking it uses on bindings that never had seq_pos_max (0.3.8
    # and older). The real llama.cpp answer (_native_pos_max) is the oracle.
    real, _ = resolve_memory_api(lib)
    assert real is not None
    memory = MemoryOps("kv_cache", real.clear, real.seq_rm, real.seq_cp, real.seq_keep, None)
    native = _context(lib, model, memory)
    yield native
    native.close()


def _native_pos_max(ctx: NativeContext, seq_id: int) -> int:
    lib = load_library()
    return int(lib.llama_memory_seq_pos_max(lib.llama_get_memory(ctx.ptr), seq_id))


@pytest.mark.parametrize(
    ("p0", "p1"),
    [(-1, -1), (0, -1), (3, -1), (3, 7), (3, 100), (-1, 3), (0, 3), (3, 5), (10, -1), (-1, 100)],
)
def test_tracked_pos_max_matches_llama_cpp(
    tracking_ctx: NativeContext, model: NativeModel, p0: int, p1: int
) -> None:
    tracking_ctx.clear()
    tokens = _fill(tracking_ctx, model, 0, "The quick brown fox jumps over the")
    assert len(tokens) == 7
    assert tracking_ctx.seq_pos_max(0) == _native_pos_max(tracking_ctx, 0) == 6
    tracking_ctx.seq_rm(0, p0, p1)
    assert tracking_ctx.seq_pos_max(0) == _native_pos_max(tracking_ctx, 0)


def test_tracked_pos_max_through_copy_and_keep(
    tracking_ctx: NativeContext, model: NativeModel
) -> None:
    tracking_ctx.clear()
    _fill(tracking_ctx, model, 0, "short")
    _fill(tracking_ctx, model, 1, "a much longer sequence of several tokens")
    tracking_ctx.seq_cp(0, 1)
    for seq in (0, 1):
        assert tracking_ctx.seq_pos_max(seq) == _native_pos_max(tracking_ctx, seq)
    tracking_ctx.seq_keep(1)
    for seq in (0, 1):
        assert tracking_ctx.seq_pos_max(seq) == _native_pos_max(tracking_ctx, seq)


# -- logs --------------------------------------------------------------------------------------


def test_llama_logs_reach_the_seqlease_logger(lib: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=LLAMA_LOGGER.name):
        extra = NativeModel(lib, seqlease.default_model_path())
        extra.close()
    records = [r for r in caplog.records if r.name == "seqlease.llama"]
    assert len(records) > 10
    assert any("llama_model_loader" in r.getMessage() for r in records)
    # Fragments are joined into whole lines: no record carries a newline or is blank.
    assert all("\n" not in r.getMessage() and r.getMessage().strip() for r in records)


def test_llama_errors_are_logged_at_error_level(run_python: Any, tmp_path: Any) -> None:
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    code = """
import logging, sys
fmt = "%(name)s %(levelname)s %(message)s"
logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format=fmt)
from seqlease import ModelLoadError
from seqlease.native.library import load_library
from seqlease.native.model import NativeModel
try:
    NativeModel(load_library(), sys.argv[1])
except ModelLoadError:
    print("ModelLoadError")
"""
    result = run_python(code, str(damaged))
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert errors
    assert all(line.startswith("seqlease.llama ERROR ") for line in errors)
    assert any("failed to load model" in line for line in errors)
    assert result.stdout.splitlines()[-1] == "ModelLoadError"


def test_nothing_printed_by_default(run_python: Any) -> None:
    # A library must stay quiet unless the application configures logging: llama.cpp's chatter
    # (model loading, context creation) goes to the 'seqlease.llama' logger only.
    code = _child("""
ctx.seq_rm(0)
ctx.close()
model.close()
""")
    result = run_python(code)
    assert result.returncode == 0
    assert result.stdout == ""
    assert result.stderr == ""


def test_close_is_idempotent(lib: Any, model: NativeModel) -> None:
    memory, _ = resolve_memory_api(lib)
    assert memory is not None
    native = _context(lib, model, memory)
    native.close()
    native.close()
    with pytest.raises(seqlease.SeqleaseError, match="freed"):
        native.seq_pos_max(0)


def test_logits_rows(ctx: NativeContext, model: NativeModel) -> None:
    tokens = _fill(ctx, model, 0, "Hello there")
    last = ctx.logits(len(tokens) - 1)  # the only row decoded with logits
    assert all(abs(last[i]) < 1e6 for i in (0, model.n_vocab - 1))
    # logits() does not validate the row: llama.cpp answers NULL (and logs an error) for a row
    # without logits; ctypes then refuses to read it instead of crashing.
    missing = ctx.logits(N_BATCH + 5)
    assert not missing
    with pytest.raises(ValueError, match="NULL pointer"):
        missing[0]


# -- copying a prefix between sequences, in both KV layouts -----------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["streams", "unified"])
def layout_ctx(
    request: pytest.FixtureRequest, lib: Any, model: NativeModel
) -> Iterator[NativeContext]:
    memory, _ = resolve_memory_api(lib)
    assert memory is not None
    native = native_context(
        lib,
        model,
        memory,
        n_seq_max=3,
        n_ctx_seq=N_CTX_SEQ,
        n_batch=N_BATCH,
        unified=request.param,
    )
    yield native
    native.close()


def test_copy_prefix_gives_exactly_the_prefix(
    layout_ctx: NativeContext, model: NativeModel
) -> None:
    ctx = layout_ctx
    ctx.clear()
    src = _fill(ctx, model, 0, "The quick brown fox jumps over the lazy dog")
    _fill(ctx, model, 2, "Something else entirely")
    assert ctx.copy_prefix(0, 2, 4) == 4
    assert ctx.seq_pos_max(2) == _native_pos_max(ctx, 2) == 3  # the rest of 2 is gone
    assert ctx.seq_pos_max(0) == len(src) - 1  # the source keeps everything
    # The copy is usable: decoding goes on from position 4 in the destination.
    ctx.decode([(src[4], 4, 2, True)])
    assert _native_pos_max(ctx, 2) == 4


def test_copy_prefix_where_a_sequence_cannot_be_cut(lib: Any, model: NativeModel) -> None:
    # Recurrent and hybrid models refuse a partial seq_rm (it returns false): the destination
    # then ends up empty and the caller evaluates the whole prompt. The real functions, with
    # partial removals refused as llama.cpp refuses them on such models.
    real, _ = resolve_memory_api(lib)
    assert real is not None

    def seq_rm(ptr: Any, seq_id: int, p0: int, p1: int) -> bool:
        if p0 > 0 or p1 >= 0:
            return False
        return real.seq_rm(ptr, seq_id, p0, p1)

    memory = MemoryOps("memory", real.clear, seq_rm, real.seq_cp, real.seq_keep, real.seq_pos_max)
    native = _context(lib, model, memory)
    try:
        _fill(native, model, 0, "The quick brown fox jumps over the lazy dog")
        assert native.copy_prefix(0, 1, 4) == 0
        assert native.seq_pos_max(1) == _native_pos_max(native, 1) == -1
    finally:
        native.close()
