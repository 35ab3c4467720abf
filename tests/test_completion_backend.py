"""The completion backend ("Option C"): one ``llama_cpp.Llama`` behind one worker thread.

Most tests run the real llama.cpp on the tiny random-weight model (fast); the last group runs
the real default model and compares with llama-cpp-python's own ``create_completion``.
Tests that must catch a generation in the middle hold the worker inside the ``put`` of a
:class:`HeldChannel` instead of racing a model that writes a token in a fraction of a
millisecond. Every call that could block runs under a timeout (:func:`bounded`), so a bug
fails a test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import llama_cpp
import llama_cpp.llama_cpp as lib
import pytest

import seqlease
from helpers import completion_backend
from seqlease.backends.completion import CompletionBackend
from seqlease.backends.worker import JobWorker
from seqlease.errors import (
    ContextClosedError,
    ContextOverflowError,
    DecodeError,
    EmptyPromptError,
    InvalidSequenceError,
    ModelLoadError,
    NativeError,
    SequenceBusyError,
)
from seqlease.native.library import load_library
from seqlease.native.model import NativeModel
from seqlease.request.job import Channel, Request, Result
from seqlease.request.params import sanitize
from seqlease.request.prompt import prompt_tokens
from seqlease.request.stream import AsyncGeneration, Generation
from seqlease.request.text import trim_at_stop
from tiny_model import BOS, CHAT_TEMPLATE, EOS, IM_END, tiny_model_path

N_CTX = 128
# One llama.cpp thread: with OpenMP, two threads on a busy 2-core box stall for 100s of ms.
OPTIONS = {"sequences": 4, "n_ctx": N_CTX, "n_batch": 32, "n_threads": 1}
TIMEOUT = 30

T = TypeVar("T")


def bounded(call: Callable[[], T], timeout: float = TIMEOUT) -> T:
    """``call()`` on a helper thread: its value or its exception, or a failure after ``timeout``.

    For the calls that wait without a timeout of their own (``Generation`` iteration and
    ``result()``, ``close()``, ``clear_sequence()``): a hang fails the test instead.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # re-raised on the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{call!r} still blocked after {timeout}s"
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


@pytest.fixture(scope="module")
def backend() -> Iterator[CompletionBackend]:
    b = completion_backend(tiny_model_path(), **OPTIONS)
    yield b
    bounded(b.close)


@pytest.fixture
def fresh() -> Iterator[CompletionBackend]:
    """A backend of its own, for tests that close it or leave it in a special state."""
    b = completion_backend(tiny_model_path(), **OPTIONS)
    yield b
    bounded(b.close)


def tokens_of(backend: CompletionBackend, text: str = "hello world the") -> list[int]:
    return backend.model.tokenize(text)


def run(backend: CompletionBackend, tokens: list[int], seq_id: int = 0, **kw: Any):
    """Generate through the public stream type (greedy unless told); returns (chunks, result)."""
    kw.setdefault("temperature", 0)
    gen = Generation(
        seq_id, lambda channel: backend.generate(seq_id, tokens, sanitize(**kw), None, channel)
    )
    chunks = bounded(lambda: list(gen))
    return chunks, bounded(gen.result)


def end_of(job: Request) -> Result | BaseException:
    """How ``job`` ended, once the worker has let go of it."""
    assert job.channel.done.wait(TIMEOUT)
    end = job.channel.wait_end(0)
    assert end is not None  # the end is recorded before done is set
    return end


class Spans:
    """Wraps ``backend.llama.generate`` to record when each generation holds the Llama."""

    def __init__(self, backend: CompletionBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.spans: list[tuple[float, float, tuple[int, ...]]] = []
        self.entered: list[tuple[int, ...]] = []
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()
        real = backend.llama.generate

        def generate(tokens: list[int], **kw: Any) -> Iterator[int]:
            with self._lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
                self.entered.append(tuple(tokens))
            start = time.monotonic()
            try:
                # Widen the window in which an unserialized caller would overlap.
                time.sleep(0.005)
                yield from real(tokens, **kw)
            finally:
                with self._lock:
                    self.active -= 1
                    self.spans.append((start, time.monotonic(), tuple(tokens)))

        monkeypatch.setattr(backend.llama, "generate", generate)


class JobChannel(Channel):
    """A channel that knows its job: the worker's calls wait (bounded) until it is attached."""

    def __init__(self) -> None:
        super().__init__()
        self._job: Request | None = None
        self._attached = threading.Event()

    def attach(self, job: Request) -> Request:
        """Called with what ``generate`` returned."""
        self._job = job
        self._attached.set()
        return job

    @property
    def job(self) -> Request:
        assert self._attached.wait(TIMEOUT)
        assert self._job is not None
        return self._job


class HeldChannel(JobChannel):
    """Holds the worker inside ``put`` after the first text chunk (which is delivered).

    The worker stays there until ``release`` is set or the job is told to stop (cancelled,
    aborted, closed), so a test can cancel, clear or close at a known point of a generation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.first_text = threading.Event()
        self.release = threading.Event()

    def put(self, text: str) -> None:
        super().put(text)
        if self.first_text.is_set():
            return
        job = self.job
        self.first_text.set()
        deadline = time.monotonic() + TIMEOUT
        while not (self.release.is_set() or job.should_stop()):
            assert time.monotonic() < deadline
            time.sleep(0.001)


class Held:
    """A generation whose worker is held inside ``put`` after its first text chunk."""

    def __init__(
        self,
        backend: CompletionBackend,
        seq_id: int = 0,
        *,
        abort: threading.Event | None = None,
        **kw: Any,
    ) -> None:
        params = sanitize(temperature=0, max_tokens=kw.pop("max_tokens", 60), **kw)
        self.channel = HeldChannel()
        self.first_text = self.channel.first_text
        self.release = self.channel.release
        self.job = self.channel.attach(
            backend.generate(seq_id, tokens_of(backend), params, abort, self.channel)
        )

    def result(self) -> Result:
        end = end_of(self.job)
        if not isinstance(end, Result):
            raise AssertionError(f"unexpected error {end!r}")
        return end


# -- the model adapter ----------------------------------------------------------------------


def test_identity_and_no_per_sequence_tokens(backend: CompletionBackend) -> None:
    assert backend.name == "completion"
    assert isinstance(backend, JobWorker)  # the worker thread both backends run on
    run(backend, tokens_of(backend), temperature=0, max_tokens=4)
    # Nothing is kept per sequence: Llama's own prefix cache is not a sequence's memory.
    assert [backend.n_tokens(i) for i in range(OPTIONS["sequences"])] == [0, 0, 0, 0]


def test_model_adapter_matches_native_model(backend: CompletionBackend) -> None:
    model = backend.model
    native = NativeModel(load_library(), tiny_model_path())
    try:
        for text in ["hello world the", "", "Zażółć gęślą jaźń", "<|im_start|>user\nhi<|im_end|>"]:
            for add_special in (True, False):
                for parse_special in (True, False):
                    kw = {"add_special": add_special, "parse_special": parse_special}
                    assert model.tokenize(text, **kw) == native.tokenize(text, **kw)
            ids = model.tokenize(text, add_special=False)
            for special in (True, False):
                assert model.detokenize(ids, special=special) == native.detokenize(
                    ids, special=special
                )
        assert model.detokenize(model.tokenize("hello world", add_special=False)).strip() == (
            "hello world"
        )
        for token in range(model.n_vocab):
            assert model.token_to_piece(token) == native.token_to_piece(token)
            assert model.token_to_piece(token, special=True) == native.token_to_piece(
                token, special=True
            )
            assert model.is_eog(token) == native.is_eog(token)
        assert (model.bos, model.eos, model.n_vocab) == (BOS, EOS, native.n_vocab)
        assert model.n_ctx_train == native.n_ctx_train
        assert model.description() == native.description()
    finally:
        native.close()
    assert model.is_eog(EOS)
    assert model.is_eog(IM_END)
    assert not model.is_eog(model.tokenize("hello", add_special=False)[0])
    assert model.meta("general.architecture") == "llama"
    assert model.meta("no.such.key") is None
    assert model.chat_template() == CHAT_TEMPLATE
    for bad in (-1, model.n_vocab, 10**9):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.check_token(bad)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.token_to_piece(bad)


# -- generation -----------------------------------------------------------------------------


def test_streams_text_and_reports_the_result(backend: CompletionBackend) -> None:
    tokens = tokens_of(backend)
    chunks, result = run(backend, tokens, temperature=0, max_tokens=16)
    assert len(chunks) > 1
    assert all(isinstance(c, str) and c for c in chunks)
    assert "".join(chunks) == result.text
    assert result.finish_reason == "length"
    assert result.n_prompt == len(tokens)
    assert result.n_generated == 16
    assert 1 <= result.n_evaluated <= len(tokens)
    assert result.seconds > 0
    # Greedy and stateless: the same request gives the same reply, whatever Llama cached.
    assert run(backend, tokens, temperature=0, max_tokens=16)[1].text == result.text
    assert run(backend, tokens_of(backend, "the"), temperature=0, max_tokens=3)[1].text
    assert run(backend, tokens, temperature=0, max_tokens=16)[1].text == result.text


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 40, 64])
def test_max_tokens_is_exact(backend: CompletionBackend, max_tokens: int) -> None:
    # Llama.create_completion can overshoot max_tokens while it waits for the rest of a UTF-8
    # character (seen: 43 tokens for max_tokens=40 on this model); this backend must not.
    _, result = run(backend, tokens_of(backend), temperature=0, max_tokens=max_tokens)
    assert result.n_generated == max_tokens
    assert result.finish_reason == "length"


def test_reply_is_bounded_by_n_ctx(backend: CompletionBackend) -> None:
    tokens = (tokens_of(backend) * N_CTX)[: N_CTX - 3]
    _, result = run(backend, tokens, temperature=0, max_tokens=100)
    assert result.n_generated == 3
    assert result.finish_reason == "length"


def test_seed_makes_sampling_repeatable(backend: CompletionBackend) -> None:
    tokens = tokens_of(backend)
    kw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_tokens": 24}
    a = run(backend, tokens, seed=7, **kw)[1].text
    assert run(backend, tokens, seed=7, **kw)[1].text == a
    others = {run(backend, tokens, seed=s, **kw)[1].text for s in (8, 9, 10)}
    assert others - {a}


def _boundary_marker(chunks: list[str]) -> str:
    """A stop string made of the end of one chunk and the start of the next."""
    for left, right in itertools.pairwise(chunks):
        if len(left) >= 2 and left[-2:].isalnum() and right[:1].isalnum():
            return left[-2:] + right[:1]
    raise AssertionError(f"no usable chunk boundary in {chunks!r}")


def test_stop_strings_never_leak_even_across_chunks(backend: CompletionBackend) -> None:
    tokens = tokens_of(backend)
    chunks, full = run(backend, tokens, temperature=0, max_tokens=48)
    marker = _boundary_marker(chunks)
    expected = trim_at_stop(full.text, [marker])
    assert len(expected) < len(full.text)

    stops = ["never-written-marker", marker]
    chunks, result = run(backend, tokens, temperature=0, max_tokens=48, stop=stops)
    assert result.finish_reason == "stop"
    # The first part of the marker arrived in one chunk and was held back, not emitted.
    assert "".join(chunks) == result.text == expected
    assert all(marker not in c for c in chunks)
    assert result.n_generated < full.n_generated

    # A marker that is the whole reply's first token: nothing at all is emitted.
    first = next(c for c in run(backend, tokens, temperature=0, max_tokens=4)[0] if c.strip())
    chunks, result = run(backend, tokens, temperature=0, max_tokens=48, stop=[first[:1]])
    assert "".join(chunks) == result.text == trim_at_stop(full.text, [first[:1]])
    assert result.finish_reason == "stop"


def test_held_back_text_that_is_no_marker_is_released(backend: CompletionBackend) -> None:
    tokens = tokens_of(backend)
    chunks, full = run(backend, tokens, temperature=0, max_tokens=30)
    marker = _boundary_marker(chunks)
    almost = marker[:-1] + "\x00"  # begins like text in the reply but never completes
    chunks2, result = run(backend, tokens, temperature=0, max_tokens=30, stop=[almost])
    assert result.text == full.text
    assert "".join(chunks2) == full.text
    assert chunks2 != chunks  # the look-alike was held back for a while, then released
    assert result.finish_reason == "length"


def test_cancel_with_generation_close_mid_stream(backend: CompletionBackend) -> None:
    tokens = tokens_of(backend)
    # The worker is held after the first chunk until the consumer gives up: no race with a
    # fast model. Generation makes and reads its own channel; its put is wrapped to hold.
    first_text = threading.Event()

    def start(channel: Channel) -> Request:
        assert type(channel) is Channel and not channel.ended  # a plain one, not notifying
        put = channel.put

        def held_put(text: str) -> None:
            put(text)
            if not first_text.is_set():
                first_text.set()
                deadline = time.monotonic() + TIMEOUT
                while not channel.cancelled.is_set():
                    assert time.monotonic() < deadline
                    time.sleep(0.001)

        channel.put = held_put  # type: ignore[method-assign]
        return backend.generate(0, tokens, sanitize(temperature=0, max_tokens=100), None, channel)

    gen = Generation(0, start)
    assert first_text.wait(TIMEOUT)
    chunk = bounded(lambda: next(gen))
    assert chunk
    bounded(gen.close)  # cancels and waits for the worker to let go
    assert gen.finished
    result = bounded(gen.result)
    assert result.finish_reason == "cancelled"
    assert result.n_generated < 100
    # The worker is free for the next caller and the sequence is not busy.
    assert run(backend, tokens, temperature=0, max_tokens=5)[1].n_generated == 5


def test_abort_event(backend: CompletionBackend) -> None:
    tokens = tokens_of(backend)
    abort = threading.Event()
    abort.set()
    gen = Generation(0, lambda channel: backend.generate(0, tokens, sanitize(), abort, channel))
    assert bounded(lambda: list(gen)) == []
    result = bounded(gen.result)
    assert (result.finish_reason, result.n_generated, result.text) == ("cancelled", 0, "")

    abort = threading.Event()
    held = Held(backend, 1, abort=abort, max_tokens=100)
    assert held.first_text.wait(TIMEOUT)
    abort.set()
    result = held.result()
    assert result.finish_reason == "cancelled"
    assert 1 <= result.n_generated < 100


class RecordingChannel(Channel):
    """Records everything the worker writes into it."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[object] = []

    def put(self, text: str) -> None:
        self.written.append(text)
        super().put(text)

    def end(self, outcome: Result | BaseException) -> None:
        self.written.append(outcome)
        super().end(outcome)


def test_overflow_and_bad_sequence_ids_raise_before_any_call(
    backend: CompletionBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # backend.generate checks what only the backend knows (sequence ids, n_ctx); the prompt
    # itself is checked one level up (next test).
    spans = Spans(backend, monkeypatch)
    # The worker counts a job just after its caller heard the end: let the last one settle.
    time.sleep(0.05)
    before = backend.completed
    channel = RecordingChannel()
    params = sanitize()
    with pytest.raises(ContextOverflowError, match=rf"{N_CTX} tokens but .* n_ctx={N_CTX}"):
        backend.generate(0, [5] * N_CTX, params, None, channel)
    with pytest.raises(ContextOverflowError, match=rf"{N_CTX + 50} tokens"):
        backend.generate(0, [5] * (N_CTX + 50), params, None, channel)
    for seq_id in (OPTIONS["sequences"], -1):
        with pytest.raises(InvalidSequenceError, match=f"sequence id {seq_id} is outside"):
            backend.generate(seq_id, [5], params, None, channel)
    time.sleep(0.05)
    assert (channel.written, spans.entered, backend.completed) == ([], [], before)
    # N_CTX - 1 prompt tokens leave room for exactly one reply token.
    _, result = run(backend, [5] * (N_CTX - 1), max_tokens=10)
    assert result.n_generated == 1


def test_bad_prompts_raise_before_any_call(
    backend: CompletionBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rule that Sequence applies before it calls backend.generate.
    with pytest.raises(EmptyPromptError, match="no tokens: send at least one"):
        prompt_tokens([], backend.model)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prompt_tokens([5, backend.model.n_vocab], backend.model)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prompt_tokens([-1, 5], backend.model)
    assert prompt_tokens([5, backend.model.n_vocab - 1], backend.model) == [
        5,
        backend.model.n_vocab - 1,
    ]

    # Through a Context on the completion backend: rejected before the worker sees anything.
    ctx = seqlease.Context(
        tiny_model_path(), backend="completion", sequences=1, n_ctx=N_CTX, n_batch=32, n_threads=1
    )
    try:
        with ctx.lease(timeout=0) as seq:
            n_vocab = ctx.model.n_vocab
            with pytest.raises(EmptyPromptError, match="at least one"):
                seq.generate([])
            with pytest.raises(EmptyPromptError, match="empty"):
                seq.generate("  ")
            with pytest.raises(ValueError, match="outside the vocabulary"):
                seq.generate([5, n_vocab])
            with pytest.raises(ContextOverflowError, match=rf"{N_CTX} tokens but"):
                seq.generate([5] * N_CTX)
            time.sleep(0.05)
            assert ctx.probe.completed == 0
            gen = seq.generate([5] * (N_CTX - 1), temperature=0, max_tokens=10)
            assert bounded(gen.result).n_generated == 1
    finally:
        bounded(ctx.close)


def test_four_threads_are_served_one_at_a_time(
    backend: CompletionBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [tokens_of(backend, t) for t in ("hello world", "the world", "hello", "world the")]
    serial = [
        run(backend, p, seq_id=i, temperature=0, max_tokens=20)[1] for i, p in enumerate(prompts)
    ]
    spans = Spans(backend, monkeypatch)
    results: list[Result | None] = [None] * 4
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        try:
            barrier.wait(TIMEOUT)
            for _ in range(3):
                results[i] = run(backend, prompts[i], seq_id=i, temperature=0, max_tokens=20)[1]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert [r.text if r else None for r in results] == [r.text for r in serial]
    assert all(r is not None and r.finish_reason == "length" for r in results)
    # Serialized: 12 generations, never two inside the Llama at once.
    assert len(spans.spans) == 12
    assert spans.peak == 1
    ordered = sorted(spans.spans)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(ordered))


def test_queued_jobs_run_in_arrival_order(
    backend: CompletionBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans = Spans(backend, monkeypatch)
    held = Held(backend, 0)
    assert held.first_text.wait(TIMEOUT)
    words = ["hello", "world", "the"]
    gens = [
        Generation(
            i + 1,
            lambda channel, i=i: backend.generate(
                i + 1,
                tokens_of(backend, words[i]),
                sanitize(temperature=0, max_tokens=2),
                None,
                channel,
            ),
        )
        for i in range(3)
    ]
    time.sleep(0.05)
    assert len(spans.entered) == 1  # the held one; the rest wait their turn
    held.release.set()
    assert held.result().finish_reason == "length"
    for gen in gens:
        assert bounded(gen.result).n_generated == 2
    assert spans.entered[1:] == [tuple(tokens_of(backend, w)) for w in words]


def test_same_sequence_twice_is_busy(backend: CompletionBackend) -> None:
    held = Held(backend, 2)
    assert held.first_text.wait(TIMEOUT)
    with pytest.raises(SequenceBusyError, match="sequence 2 is already generating"):
        backend.generate(2, tokens_of(backend), sanitize(), None, Channel())
    held.release.set()
    held.result()
    # Its end is announced only after the sequence is free again.
    assert run(backend, tokens_of(backend), seq_id=2, max_tokens=2)[1].n_generated == 2


def test_next_generation_can_start_from_the_end(backend: CompletionBackend) -> None:
    tokens = tokens_of(backend)
    chained: queue.SimpleQueue[Request | Exception] = queue.SimpleQueue()

    class Chain(Channel):
        """Starts the next generation on the same sequence as its end is delivered."""

        def end(self, outcome: Result | BaseException) -> None:  # on the worker thread
            if not self.ended:
                try:
                    chained.put(
                        backend.generate(
                            3, tokens, sanitize(temperature=0, max_tokens=1), None, Channel()
                        )
                    )
                except Exception as exc:
                    chained.put(exc)
            super().end(outcome)

    first = backend.generate(3, tokens, sanitize(temperature=0, max_tokens=2), None, Chain())
    second = chained.get(timeout=TIMEOUT)
    assert isinstance(second, Request), second  # the sequence was free before its end was heard
    end = end_of(first)
    assert isinstance(end, Result) and end.n_generated == 2, end
    end = end_of(second)
    assert isinstance(end, Result) and end.n_generated == 1, end


def test_clear_sequence_cancels_a_running_job(backend: CompletionBackend) -> None:
    held = Held(backend, 1, max_tokens=100)
    assert held.first_text.wait(TIMEOUT)
    bounded(lambda: backend.clear_sequence(1))
    assert held.job.channel.done.is_set()  # clear_sequence waited for the end
    result = held.result()
    assert result.finish_reason == "cancelled"
    assert result.n_generated < 100
    bounded(lambda: backend.clear_sequence(1))  # nothing running: a no-op
    assert run(backend, tokens_of(backend), seq_id=1, max_tokens=3)[1].n_generated == 3


def test_clear_sequence_of_a_queued_job_does_not_wait_for_others(
    backend: CompletionBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans = Spans(backend, monkeypatch)
    held = Held(backend, 0)
    assert held.first_text.wait(TIMEOUT)
    gen = Generation(
        3, lambda channel: backend.generate(3, tokens_of(backend, "the"), sanitize(), None, channel)
    )
    started = time.monotonic()
    # Returns although sequence 0 still holds the worker.
    bounded(lambda: backend.clear_sequence(3), timeout=1)
    assert time.monotonic() - started < 1
    assert gen.finished  # ended by the clear itself, not by the worker
    assert bounded(gen.result).finish_reason == "cancelled"
    assert not held.job.channel.done.is_set()
    held.release.set()
    held.result()
    assert spans.entered == [tuple(tokens_of(backend))]  # the cleared job never ran


def test_close_cancels_everything_and_is_idempotent(fresh: CompletionBackend) -> None:
    held = Held(fresh, 0, max_tokens=100)
    assert held.first_text.wait(TIMEOUT)
    queued = Generation(
        1, lambda channel: fresh.generate(1, tokens_of(fresh), sanitize(), None, channel)
    )
    bounded(fresh.close)
    assert held.result().finish_reason == "cancelled"
    assert bounded(queued.result).finish_reason == "cancelled"
    assert not fresh.serving
    assert fresh.freed
    bounded(fresh.close)
    bounded(fresh.close)
    with pytest.raises(ContextClosedError):
        fresh.generate(0, [5], sanitize(), None, Channel())
    with pytest.raises(ContextClosedError):
        fresh.model.tokenize("hello")
    with pytest.raises(ContextClosedError):
        fresh.model.meta("general.architecture")
    bounded(lambda: fresh.clear_sequence(0))  # after close: nothing to do, must not hang


def test_close_on_the_worker_thread_frees_as_it_exits(fresh: CompletionBackend) -> None:
    # A finalizer (Context dropped without close) may run on the worker thread itself.
    at_close: list[tuple[str, bool]] = []

    class ClosingChannel(JobChannel):
        def put(self, text: str) -> None:
            super().put(text)
            if not at_close:
                assert self.job
                fresh.close()  # must neither join itself nor free the Llama under its own feet
                at_close.append((text, fresh.freed))

    channel = ClosingChannel()
    job = channel.attach(
        fresh.generate(0, tokens_of(fresh), sanitize(temperature=0, max_tokens=50), None, channel)
    )
    assert job.channel.done.wait(TIMEOUT)
    assert fresh.join(TIMEOUT)
    assert fresh.freed  # as the thread exited
    first_text, freed_at_close = at_close[0]
    assert not freed_at_close  # not while the worker still ran
    end = end_of(job)
    assert isinstance(end, Result) and end.finish_reason == "cancelled", end
    assert end.text == first_text  # cancelled right after the first text
    with pytest.raises(ContextClosedError):
        fresh.model.tokenize("hello")
    bounded(fresh.close)


def test_close_from_another_thread_while_idle(fresh: CompletionBackend) -> None:
    run(fresh, tokens_of(fresh), max_tokens=2)
    closer = threading.Thread(target=fresh.close)
    closer.start()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert not fresh.serving
    assert fresh.freed


def test_missing_or_bad_model_raises_model_load_error(tmp_path: Any) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        completion_backend(tmp_path / "missing.gguf", **OPTIONS)
    with pytest.raises(ModelLoadError, match="directory"):
        completion_backend(tmp_path, **OPTIONS)
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        completion_backend(text, **OPTIONS)


def test_damaged_gguf_raises_model_load_error(run_python: Any, tmp_path: Any) -> None:
    # llama.cpp reads the file: in a child process, in case it ever aborts instead.
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    code = """
import sys
sys.path.insert(0, "tests")
from helpers import completion_backend
from seqlease import ModelLoadError
try:
    completion_backend(sys.argv[1], sequences=1, n_ctx=64, n_batch=32, n_threads=1)
except ModelLoadError as exc:
    assert "could not load" in str(exc) and "seqlease.llama" in str(exc), exc
    assert isinstance(exc.__cause__, ValueError), repr(exc.__cause__)
    print("ModelLoadError")
"""
    result = run_python(code, str(damaged))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ModelLoadError"


def test_nothing_printed_by_default(run_python: Any) -> None:
    # llama.cpp's log goes to logger "seqlease.llama"; Llama(verbose=False) prints nothing.
    code = """
import sys
sys.path.insert(0, sys.argv[1])
from tiny_model import tiny_model_path
from helpers import completion_backend
from seqlease.request.params import sanitize
from seqlease.request.stream import Generation
b = completion_backend(tiny_model_path(), sequences=1, n_ctx=64, n_batch=32, n_threads=1)
t = b.model.tokenize("hello world")
g = Generation(0, lambda ch: b.generate(0, t, sanitize(temperature=0, max_tokens=4), None, ch))
assert g.result().n_generated == 4
b.close()
"""
    import pathlib

    result = run_python(code, str(pathlib.Path(__file__).parent))
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")


def test_prefix_reuse_evaluates_only_what_is_new(backend: CompletionBackend) -> None:
    first = tokens_of(backend, "hello world the hello world")
    llama = backend.llama
    _, a = run(backend, tokens_of(backend, "the the the"), temperature=0, max_tokens=3)
    _, r1 = run(backend, first, temperature=0, max_tokens=6)
    assert first[0] == BOS
    assert r1.n_evaluated == r1.n_prompt - 1  # nothing in common with the last prompt but BOS

    # The second prompt extends the first: only the new part is evaluated.
    second = first + backend.model.tokenize(" the world hello", add_special=False)
    lib.llama_perf_context_reset(llama.ctx)
    _, r2 = run(backend, second, temperature=0, max_tokens=6)
    perf = lib.llama_perf_context(llama.ctx)
    assert r2.n_prompt == len(second)
    assert 2 <= r2.n_evaluated <= len(second) - len(first)
    assert r2.n_evaluated < r2.n_prompt
    # llama.cpp's own count agrees (a batch of more than one token counts as prompt eval).
    assert perf.n_p_eval == r2.n_evaluated

    # The same prompt again: its last two tokens are evaluated, as on the session backend (a
    # batch of one token rounds differently, and the reply would change).
    _, r3 = run(backend, second, temperature=0, max_tokens=6)
    assert r3.n_evaluated == 2
    # Reuse never changes the reply: a cold start gives the same text.
    _, other = run(backend, tokens_of(backend, "world"), temperature=0, max_tokens=2)
    assert other.n_evaluated == other.n_prompt == 2  # BOS in common, but the last two go
    with backend.make_probe(tuple).paused():  # the Llama is touched only under the guard
        llama.reset()  # forget everything: a cold start
    _, r4 = run(backend, second, temperature=0, max_tokens=6)
    assert r4.n_evaluated == r4.n_prompt
    assert r2.text == r3.text == r4.text
    assert a.text


def test_errors_reach_their_caller_and_the_worker_survives(
    backend: CompletionBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = tokens_of(backend)
    # Greedy: the first token is text, never end-of-generation (sampled, it is about 1 in 100),
    # so every failure below happens after it.
    greedy = sanitize(temperature=0)
    real = backend.llama.generate

    def failing(message: str, exc_type: type[BaseException]) -> Callable[..., Iterator[int]]:
        def generate(prompt: list[int], **kw: Any) -> Iterator[int]:
            it = real(prompt, **kw)
            yield next(it)
            it.close()
            raise exc_type(message)

        return generate

    monkeypatch.setattr(
        backend.llama, "generate", failing("llama_decode returned -1", RuntimeError)
    )
    gen = Generation(0, lambda channel: backend.generate(0, tokens, greedy, None, channel))
    with pytest.raises(DecodeError, match="llama_decode returned -1") as info:
        bounded(gen.result)
    assert info.value.code == -1
    assert isinstance(info.value.__cause__, RuntimeError)
    assert backend.llama.n_tokens == 0  # the prefix cache was dropped after the failure

    monkeypatch.setattr(backend.llama, "generate", failing("boom", ZeroDivisionError))
    gen = Generation(0, lambda channel: backend.generate(0, tokens, greedy, None, channel))
    with pytest.raises(NativeError, match="boom"):
        bounded(gen.result)

    # A channel that fails to take text fails its own job only; the worker serves on.
    monkeypatch.setattr(backend.llama, "generate", real)

    class BrokenChannel(Channel):
        def put(self, text: str) -> None:
            raise RuntimeError("the consumer's queue is gone")

    job = backend.generate(0, tokens, greedy, None, BrokenChannel())
    end = end_of(job)
    assert isinstance(end, NativeError), end
    assert "the consumer's queue is gone" in str(end)
    assert isinstance(end.__cause__, RuntimeError)
    assert backend.serving
    assert run(backend, tokens, seq_id=0, max_tokens=3)[1].n_generated == 3


def test_asyncio_consumer(backend: CompletionBackend) -> None:
    tokens = tokens_of(backend)
    expected = run(backend, tokens, temperature=0, max_tokens=12)[1].text

    async def main() -> list[str]:
        async def one(seq_id: int) -> str:
            gen = AsyncGeneration(
                seq_id,
                lambda channel: backend.generate(
                    seq_id, tokens, sanitize(temperature=0, max_tokens=12), None, channel
                ),
            )
            return "".join([chunk async for chunk in gen])

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), TIMEOUT)

    assert asyncio.run(main()) == [expected] * 4


# -- the real default model, against llama-cpp-python's own create_completion ------------------

REAL_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def real() -> Iterator[tuple[CompletionBackend, llama_cpp.Llama]]:
    path = seqlease.default_model_path()
    b = completion_backend(path, sequences=2, n_ctx=256, n_batch=64, n_threads=1)
    direct = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_batch=64,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
    )
    yield b, direct
    bounded(b.close)
    direct.close()


@pytest.mark.parametrize("prompt", REAL_PROMPTS)
@pytest.mark.parametrize("stop", [None, ["\n"], [".", "!"]])
def test_greedy_text_equals_llama_create_completion(
    real: tuple[CompletionBackend, llama_cpp.Llama], prompt: str, stop: list[str] | None
) -> None:
    backend, direct = real
    tokens = backend.model.tokenize(prompt)
    kw = {"temperature": 0.0, "top_p": 0.9, "top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0}
    chunks, result = run(backend, tokens, max_tokens=40, stop=stop, **kw)
    reference = direct.create_completion(prompt=tokens, max_tokens=40, stop=stop, seed=1, **kw)
    choice = reference["choices"][0]  # type: ignore[index]
    assert result.text == choice["text"]
    assert "".join(chunks) == result.text
    if stop:
        assert not any(s in result.text for s in stop)
    # Llama says "stop" for both an end-of-generation token and a stop string.
    if choice["finish_reason"] == "length":
        assert result.finish_reason == "length"
        assert result.n_generated == reference["usage"]["completion_tokens"] == 40  # type: ignore[index]
    elif stop and result.finish_reason == "stop":
        assert trim_at_stop(result.text, stop) == result.text
    else:
        assert result.finish_reason == "eog"
        # Llama does not count the end-of-generation token; seqlease does, like the session
        # backend.
        assert result.n_generated == reference["usage"]["completion_tokens"] + 1  # type: ignore[index]


def test_chat_reply_ends_with_eog(real: tuple[CompletionBackend, llama_cpp.Llama]) -> None:
    backend, _ = real
    tokens = backend.model.tokenize(REAL_PROMPTS[-2])
    _, result = run(backend, tokens, temperature=0, max_tokens=100)
    assert result.finish_reason == "eog"
    assert result.text == "The capital of France is Paris."
    assert result.n_generated == 8  # 7 tokens of text, then <|im_end|>


def test_real_model_cancel_mid_stream(real: tuple[CompletionBackend, llama_cpp.Llama]) -> None:
    backend, _ = real
    tokens = backend.model.tokenize(
        "<|im_start|>user\nWrite a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"
    )
    gen = Generation(
        0,
        lambda channel: backend.generate(
            0, tokens, sanitize(temperature=0, max_tokens=200), None, channel
        ),
    )
    assert bounded(lambda: next(gen))
    bounded(gen.close)
    result = bounded(gen.result)
    assert result.finish_reason == "cancelled"
    assert result.n_generated < 200
