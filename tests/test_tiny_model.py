"""The generated tiny model works in the real llama.cpp, through llama-cpp-python and seqlease.

Every context here uses one thread. This llama.cpp build runs its threads with OpenMP; on a
busy machine, a decode with two or more threads can stall for tens or hundreds of milliseconds
while the threads spin waiting for each other. One thread takes about 0.1 ms per token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from helpers import native_context
from seqlease.native.context import NativeContext
from seqlease.native.library import load_library
from seqlease.native.memory import resolve_memory_api
from seqlease.native.model import NativeModel
from tiny_model import (
    BOS,
    CHAT_TEMPLATE,
    EOS,
    IM_END,
    N_BLOCKS,
    N_CTX_TRAIN,
    N_EMBD,
    make_tiny_model,
    tiny_model_path,
    vocabulary,
)

TOKENS = vocabulary()[0]
N_VOCAB = len(TOKENS)
HELLO, WORLD = TOKENS.index("▁hello"), TOKENS.index("▁world")


@pytest.fixture(scope="module")
def llm() -> Iterator[llama_cpp.Llama]:
    model = llama_cpp.Llama(
        model_path=str(tiny_model_path()),
        n_ctx=256,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
    )
    yield model
    model.close()


@pytest.fixture(scope="module")
def native_model() -> Iterator[NativeModel]:
    model = NativeModel(load_library(), tiny_model_path())
    yield model
    model.close()


@pytest.fixture
def native_ctx(native_model: NativeModel) -> Iterator[NativeContext]:
    lib = load_library()
    memory, reasons = resolve_memory_api(lib)
    assert memory is not None, reasons
    ctx = native_context(
        lib, native_model, memory, n_seq_max=4, n_ctx_seq=256, n_batch=64, unified=True
    )
    yield ctx
    ctx.close()


# -- the file ---------------------------------------------------------------------------------


def test_generation_is_deterministic_and_matches_the_cached_file(tmp_path: Path) -> None:
    first = make_tiny_model(tmp_path / "a.gguf").read_bytes()
    second = make_tiny_model(tmp_path / "b.gguf").read_bytes()
    assert first == second
    assert tiny_model_path().read_bytes() == first
    assert tiny_model_path() is tiny_model_path()  # generated once per process


def test_file_has_the_llama_layout() -> None:
    reader = gguf.GGUFReader(tiny_model_path())
    arch = reader.get_field("general.architecture")
    assert arch is not None
    assert arch.contents() == "llama"
    # GGUF stores ggml's ne order: (n_embd, n_vocab) for the embedding matrix.
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["token_embd.weight"] == [N_EMBD, N_VOCAB]
    assert len(shapes) == 3 + 9 * N_BLOCKS
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)


# -- llama-cpp-python's high-level API --------------------------------------------------------


def test_completion(llm: llama_cpp.Llama) -> None:
    out = llm.create_completion("hello", max_tokens=8)
    choice = out["choices"][0]
    assert isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("length", "stop")
    assert 1 <= out["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize("text", ["hello world", "the end\n", "  two  spaces", "Grüße, 世界! 42"])
def test_tokenize_round_trips(llm: llama_cpp.Llama, text: str) -> None:
    tokens = llm.tokenize(text.encode())
    assert tokens[0] == BOS
    assert llm.detokenize(tokens) == text.encode()


def test_words_become_whole_pieces_and_the_rest_falls_back_to_bytes(llm: llama_cpp.Llama) -> None:
    assert llm.tokenize(b"hello world") == [BOS, HELLO, WORLD]
    # "H" has no piece of its own: it is the byte token <0x48>, id 3 + 0x48.
    assert 3 + ord("H") in llm.tokenize(b"Hello")


def test_chat_completion_uses_the_embedded_template(llm: llama_cpp.Llama) -> None:
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str)


# -- seqlease's native layer ------------------------------------------------------------------


def test_native_model_metadata(native_model: NativeModel) -> None:
    assert native_model.n_vocab == N_VOCAB
    assert native_model.n_ctx_train == N_CTX_TRAIN
    assert (native_model.bos, native_model.eos) == (BOS, EOS)
    assert native_model.chat_template() == CHAT_TEMPLATE
    assert native_model.is_eog(EOS)
    assert native_model.is_eog(IM_END)  # llama.cpp recognizes "<|im_end|>" as end of turn
    assert native_model.tokenize("hello world") == [BOS, HELLO, WORLD]
    # Without the BOS that llama-cpp-python strips it after, SentencePiece's leading space shows.
    assert native_model.detokenize([HELLO, WORLD]) == " hello world"


def test_native_decode_into_one_sequence(
    native_model: NativeModel, native_ctx: NativeContext
) -> None:
    tokens = native_model.tokenize("hello world")
    native_ctx.decode([(t, i, 1, i == len(tokens) - 1) for i, t in enumerate(tokens)])
    assert [native_ctx.seq_pos_max(s) for s in range(4)] == [-1, 2, -1, -1]
    logits = np.ctypeslib.as_array(native_ctx.logits(len(tokens) - 1), shape=(N_VOCAB,))
    assert np.isfinite(logits).all()
    assert logits.std() > 0  # random weights still give every token a different score


def test_one_token_decode_is_fast(native_ctx: NativeContext) -> None:
    times = []
    for pos in range(50):
        start = time.perf_counter()
        native_ctx.decode([(100, pos, 0, True)])
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"1-token decode: median {median * 1e6:.0f} us, min {min(times) * 1e6:.0f} us")
    # Typically 0.1-0.2 ms; the bound is loose so that a busy CI machine does not fail it.
    assert median < 2e-3
