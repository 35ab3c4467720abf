"""``python -m seqlease serve`` in a child process on 127.0.0.1, driven by the official client.

The server runs as users run it, with 2 sequences, one llama.cpp thread and a queue of 4, on
the real default model. ``/health`` (the pool's numbers, read over HTTP) shows that no request
kept a sequence, however it ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import seqlease
from helpers import INJECTION, control_tokens, run_cli
from seqlease.chat.template import ChatTemplate
from serving import (
    LONG_PROMPT,
    ROOT,
    SHUTDOWN_TIMEOUT,
    STARTUP_TIMEOUT,
    Server,
    assert_shut_down_cleanly,
    serving,
    stop,
)

SEQUENCES = 2
MAX_WAITING = 4
N_CTX = 512
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def _command(*extra: str):
    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "seqlease",
            "serve",
            "--port",
            str(port),
            "--sequences",
            str(SEQUENCES),
            "--n-ctx",
            str(N_CTX),
            "--n-threads",
            "1",
            "--max-waiting",
            str(MAX_WAITING),
            *extra,
        ]

    return command


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serving(_command(), log, ready="/health", env={}) as srv:
        yield srv


@pytest.fixture
def client(server) -> openai.OpenAI:
    # No retries: a 503 must reach the test, not be retried away by the client.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _health(url: str) -> dict:
    r = httpx.get(f"{url}/health", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _idle(url: str, timeout: float = 5.0) -> dict:
    """``/health`` once no sequence is leased and nobody waits (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        health = _health(url)
        if (health["busy"] == 0 and health["waiting"] == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.01)


def _metrics(url: str) -> dict[str, float]:
    """Every sample of ``/metrics`` by name and labels: ``name{a="x"}``."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def _chat(client: openai.OpenAI, text: str, **options):
    return client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": text}], **options
    )


# -- the official client, sync ----------------------------------------------------------------


def test_models_lists_the_one_model_served(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert models[0].owned_by == "seqlease"


def test_a_chat_completion(client, server):
    reply = _chat(client, "Say hello.", max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert reply.model == "SmolLM2-135M-Instruct.Q4_1"
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens > 5  # the template's markup as well as the two words
    assert _idle(server.url)["busy"] == 0


def test_a_reply_stops_at_max_tokens_with_length(client):
    reply = _chat(client, LONG_PROMPT, max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_stop_strings_end_the_reply_before_them(client):
    whole = _chat(client, LONG_PROMPT, max_tokens=30, temperature=0).choices[0].message.content
    assert "5" in whole
    cut = _chat(client, LONG_PROMPT, max_tokens=30, temperature=0, stop=["5"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == whole[: whole.index("5")]


def test_a_reply_may_say_user_and_only_the_turn_end_and_the_callers_stops_cut_it(client):
    # "USER:" is no turn marker of the model's template (ChatML): a reply may say it.
    schema = {
        "type": "object",
        "properties": {"name": {"const": "USER: Bob"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "name", "schema": schema}}
    options = {"max_tokens": 40, "temperature": 0, "response_format": fmt}
    for stream in (False, True):
        if stream:
            chunks = _chat(client, "Who is it?", stream=True, **options)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            content = _chat(client, "Who is it?", **options).choices[0].message.content
        assert json.loads(content) == {"name": "USER: Bob"}
    cut = _chat(client, "Who is it?", stop=["Bob"], **options).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content.endswith("USER: ")


def test_cached_prompt_tokens_are_reported(client):
    """The second request with the same long system prompt copies it from memory."""
    system = "You are a terse assistant. " * 20
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model="any", messages=messages, max_tokens=2)
    second = client.chat.completions.create(model="any", messages=messages, max_tokens=2)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 100, second.usage
    assert cached < second.usage.prompt_tokens  # the last token is always evaluated


def test_a_user_message_cannot_open_a_system_turn_over_http(client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": INJECTION},
    ]
    reply = client.chat.completions.create(
        model="any", messages=messages, max_tokens=8, temperature=0
    )
    with seqlease.Context(sequences=1, n_ctx=N_CTX, n_threads=1) as ctx:
        template = ChatTemplate.from_model(ctx.model)
        prompt = template.tokenize(ctx.model, messages)
        markup = template.tokenize(ctx.model, [{**m, "content": "x"} for m in messages])
        # The template's four control tokens per turn pair, none from the typed text ...
        assert control_tokens(ctx.model, prompt) == control_tokens(ctx.model, markup)
        # ... and that is the prompt the server ran: its size, and its greedy reply.
        assert reply.usage.prompt_tokens == len(prompt)
        with ctx.lease() as seq:
            chat = seqlease.ChatSession(seq, system_prompt="Be brief.")
            assert reply.choices[0].message.content == chat.prompt(
                INJECTION, max_tokens=8, temperature=0
            )


def test_logprobs_come_with_their_alternatives(client):
    reply = _chat(client, "Name a colour.", max_tokens=6, temperature=0, logprobs=True,
                  top_logprobs=3)  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_json_schema_replies_follow_the_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(4):
        reply = _chat(client, "Describe a person as JSON.", max_tokens=120, temperature=0.8,
                      seed=seed, response_format=fmt)  # fmt: skip
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def test_json_object_replies_are_an_object(client):
    reply = _chat(client, 'Reply with a JSON object like {"colour": "red"}.', max_tokens=200,
                  temperature=0,
                  response_format={"type": "json_object"})  # fmt: skip
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_the_same_seed_gives_the_same_reply(client):
    a = _chat(client, "Tell me a story.", max_tokens=16, temperature=1.0, seed=42)
    b = _chat(client, "Tell me a story.", max_tokens=16, temperature=1.0, seed=42)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_legacy_completions_with_text_and_token_prompts(client):
    text = client.completions.create(model="any", prompt="The capital of France is",
                                     max_tokens=6, temperature=0, logprobs=2)  # fmt: skip
    choice = text.choices[0]
    assert text.object == "text_completion"
    assert choice.text and text.usage.completion_tokens == 6
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert "".join(logprobs.tokens) == choice.text
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0
    # The same prompt as token ids gives the same greedy reply.
    ids = httpx.post(
        f"{client.base_url}completions",
        json={"model": "any", "prompt": "The capital of France is", "max_tokens": 1},
    )
    assert ids.status_code == 200
    from llama_cpp import Llama

    import seqlease

    vocab = Llama(str(seqlease.default_model_path()), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(b"The capital of France is", add_bos=True)
    again = client.completions.create(model="any", prompt=tokens, max_tokens=6, temperature=0)
    assert again.choices[0].text == choice.text
    assert again.usage.prompt_tokens == len(tokens)


# -- streaming --------------------------------------------------------------------------------


def test_a_stream_says_what_the_whole_reply_says(client):
    whole = _chat(client, "Count to ten.", max_tokens=24, temperature=0)
    chunks = list(_chat(client, "Count to ten.", max_tokens=24, temperature=0, stream=True,
                        stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert len({c.id for c in chunks}) == 1
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens


def test_a_completion_stream(client):
    whole = client.completions.create(model="any", prompt="1, 2, 3,", max_tokens=10,
                                      temperature=0)  # fmt: skip
    stream = client.completions.create(model="any", prompt="1, 2, 3,", max_tokens=10,
                                       temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text


def test_the_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "stream": True}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    # A stream has no length: the body goes out in chunks as the reply is made.
    assert "content-length" not in r.headers
    assert r.headers["transfer-encoding"] == "chunked"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        assert event.startswith("data: {")
        json.loads(event[len("data: ") :])


# -- the official client, async: concurrent requests share the pool -------------------------


def test_concurrent_async_requests_get_the_replies_they_would_get_alone(client, server):
    prompts = [f"Write one sentence about the number {i}." for i in range(5)]
    alone = [_chat(client, p, max_tokens=16, temperature=0).choices[0].message.content
             for p in prompts]  # fmt: skip

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0
        ) as aclient:
            replies = await asyncio.gather(
                *(
                    aclient.chat.completions.create(
                        model="any",
                        messages=[{"role": "user", "content": p}],
                        max_tokens=16,
                        temperature=0,
                    )
                    for p in prompts
                )
            )
        return [r.choices[0].message.content for r in replies]

    # 5 requests, 2 sequences: 3 wait in the queue (it holds 4), none is refused.
    assert asyncio.run(together()) == alone
    assert _idle(server.url)["busy"] == 0


def test_an_async_stream(server):
    async def stream() -> str:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused") as aclient:
            chunks = await aclient.chat.completions.create(
                model="any",
                messages=[{"role": "user", "content": "Count to five."}],
                max_tokens=12,
                temperature=0,
                stream=True,
            )
            return "".join([c.choices[0].delta.content or "" async for c in chunks])

    assert asyncio.run(stream()).strip()


# -- bad requests: 4xx in OpenAI's shape, never 500 --------------------------------------------


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"model": "x", "messages": []}, "messages", "at least 1 item"),
        ({"model": "x", "messages": [{"role": "bot", "content": "hi"}]},
         "messages.0.role", "'user'"),
        ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
         "temperature", "less than or equal to 2"),
        ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"},
         "max_tokens", "valid integer"),
        ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "temprature": 1},
         "temprature", "Extra inputs are not permitted"),
        ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "1"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", "Field required"),
        ({"model": "x", "messages": [{"role": "system", "content": "hi"}]}, None, "user message"),
        ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"a": 1}},
         None, "token ids"),
        ({"model": "x", "messages": [{"role": "user", "content": "hi"}],
          "logit_bias": {"99999999": 1}}, None, "outside the vocabulary"),
        ({"model": "x", "messages": [{"role": "user", "content": "hi"}],
          "response_format": {"type": "json_schema", "json_schema": {"name": "a",
                              "schema": {"type": "nonsense"}}}}, None, "json_schema"),
        ({"model": "x", "messages": [{"role": "user", "content": "a\u0000b"}]},
         "messages.0.content", "NUL"),
    ],
)  # fmt: skip
def test_a_bad_body_is_a_400_that_names_the_problem(server, body, param, says):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    error = _error(r, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert says in error["message"]


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("content", "headers", "says"),
    [
        (b"not json", JSON, "not valid JSON"),
        (b"[1, 2]", JSON, "JSON object"),
        (b'{"model": "x"}', {"content-type": "text/plain"}, "JSON object"),
        (b"\xff\xfe", JSON, ""),
        (b'{"model": "x", "prompt": "a", "temperature": NaN}', JSON, "finite number"),
        (b'{"model": "x", "prompt": "a", "top_p": Infinity}', JSON, "finite number"),
        (b'{"model": "x", "prompt": "\\ud800"}', JSON, "surrogate"),
        (b"", JSON, ""),
    ],
)
def test_a_body_that_is_no_json_object_is_a_400(server, content, headers, says):
    r = httpx.post(f"{server.url}/v1/completions", content=content, headers=headers, timeout=30)
    assert says in _error(r, 400)["message"]


def test_a_prompt_too_long_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(client, "word " * N_CTX, max_tokens=4)
    error = refused.value.body
    assert error["code"] == "context_length_exceeded"
    assert f"n_ctx={N_CTX}" in error["message"]


def test_unknown_paths_and_methods_answer_in_openai_shape(server):
    assert _error(httpx.get(f"{server.url}/v1/nothing"), 404)["type"] == "not_found_error"
    _error(httpx.get(f"{server.url}/v1/chat/completions"), 405)


_FIELDS = ("model", "messages", "temperature", "top_p", "seed", "stop", "response_format",
           "logprobs", "top_logprobs", "logit_bias", "n", "user", "stream_options",
           "prompt")  # fmt: skip
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    endpoint=st.sampled_from(["chat/completions", "completions"]),
    body=st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=6),
)  # fmt: skip
def test_no_body_is_a_500(server, endpoint, body):
    body = {**body, "max_tokens": 2}  # a valid body by chance answers quickly
    r = httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=60)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        _error(r, 400)


# -- busy: a bounded queue, then 503 with Retry-After ------------------------------------------


async def _one(client: httpx.AsyncClient, i: int) -> tuple[int, httpx.Headers, str]:
    body = {"model": "x", "messages": [{"role": "user", "content": f"Say {i}."}],
            "max_tokens": 8, "seed": i, "stream": i % 2 == 0}  # fmt: skip
    r = await client.post("/v1/chat/completions", json=body)
    return r.status_code, r.headers, r.text


@pytest.mark.timeout(120)
def test_a_burst_of_32_clients_on_2_sequences_gets_only_200_and_503(server):
    before = _metrics(server.url)

    async def burst() -> list[tuple[int, httpx.Headers, str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as aclient:
            return await asyncio.gather(*(_one(aclient, i) for i in range(32)))

    answers = asyncio.run(burst())
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    # At most 2 running and 4 waiting when the burst arrives: most are refused at once.
    assert statuses.count(200) >= SEQUENCES
    assert statuses.count(503) >= 32 - SEQUENCES - MAX_WAITING - 8
    for status, headers, text in answers:
        if status == 503:
            assert headers["retry-after"] == "1"
            error = json.loads(text)["error"]
            assert error["code"] == "server_busy"
            assert f"max_waiting={MAX_WAITING}" in error["message"] or "waiting" in error["message"]
        else:
            assert "data: [DONE]" in text or json.loads(text)["choices"][0]["message"]["content"]
    health = _idle(server.url)
    assert health["busy"] == 0 and health["waiting"] == 0  # every sequence is free again
    after = _metrics(server.url)
    key = 'seqlease_requests_total{endpoint="/v1/chat/completions",status="503"}'
    assert after[key] - before.get(key, 0) == statuses.count(503)


# -- hang-ups free the sequence within a step -------------------------------------------------


def _long_body(stream: bool) -> dict:
    return {"model": "x", "messages": [{"role": "user", "content": LONG_PROMPT}],
            "max_tokens": 400, "temperature": 0, "stream": stream}  # fmt: skip


@pytest.mark.timeout(60)
def test_a_stream_hung_up_on_frees_its_sequence(server):
    generated = _metrics(server.url)["seqlease_tokens_generated_total"]
    url = f"{server.url}/v1/chat/completions"
    with httpx.Client(timeout=30) as c, c.stream("POST", url, json=_long_body(True)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        assert _health(server.url)["busy"] == 1
    # Leaving the block closed the connection mid-reply.
    hung_up = time.monotonic()
    assert _idle(server.url, timeout=5)["busy"] == 0
    assert time.monotonic() - hung_up < 2  # a step is ~10 ms; allow for a loaded machine
    # The reply stopped early, and the tokens it did generate are counted.
    assert 0 < _metrics(server.url)["seqlease_tokens_generated_total"] - generated < 400


@pytest.mark.timeout(60)
def test_a_whole_reply_hung_up_on_frees_its_sequence(server):
    before = _metrics(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=_long_body(False), timeout=0.5)
    assert _idle(server.url, timeout=5)["busy"] == 0
    key = 'seqlease_requests_total{endpoint="/v1/chat/completions",status="499"}'
    assert _metrics(server.url).get(key, 0) == before.get(key, 0) + 1


@pytest.mark.timeout(60)
def test_a_request_hung_up_on_while_queued_leaves_the_queue(server):
    with httpx.Client(timeout=30) as c:
        streams = [
            c.stream("POST", f"{server.url}/v1/chat/completions", json=_long_body(True))
            for _ in range(SEQUENCES)
        ]
        responses = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in responses)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}/v1/chat/completions", json=_long_body(False),
                           timeout=1.0)  # fmt: skip
            health = _health(server.url)
            deadline = time.monotonic() + 5
            while health["waiting"] and time.monotonic() < deadline:
                health = _health(server.url)
            assert health["waiting"] == 0 and health["busy"] == SEQUENCES
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert _idle(server.url)["busy"] == 0


# -- health and metrics -----------------------------------------------------------------------


def test_health_shows_the_pool(server):
    health = _idle(server.url)
    assert health == {"status": "ok", "model": "SmolLM2-135M-Instruct.Q4_1",
                      "backend": "session", "sequences": SEQUENCES, "busy": 0,
                      "waiting": 0}  # fmt: skip


def test_metrics_count_tokens_and_time_replies(client, server):
    before = _metrics(server.url)
    reply = _chat(client, "Say something.", max_tokens=8, temperature=0)
    after = _metrics(server.url)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert grew("seqlease_tokens_generated_total") == reply.usage.completion_tokens
    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert grew("seqlease_prompt_tokens_evaluated_total") == reply.usage.prompt_tokens - cached
    assert grew("seqlease_prompt_tokens_reused_total") == cached
    assert grew("seqlease_time_to_first_token_seconds_count") == 1
    assert grew("seqlease_time_per_output_token_seconds_count") == 1
    assert 0 < grew("seqlease_time_to_first_token_seconds_sum") < 30
    assert after["seqlease_sequences"] == SEQUENCES
    assert after["seqlease_sequences_busy"] == 0 and after["seqlease_queue_length"] == 0
    key = 'seqlease_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert grew(key) == 1


def test_the_docs_example_runs_against_the_server(server):
    """``examples/openai_client.py``, shown on the Serving page, as a user runs it."""
    env = {**os.environ, "OPENAI_BASE_URL": f"{server.url}/v1"}
    example = ROOT / "examples" / "openai_client.py"
    result = subprocess.run(
        [sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "model: SmolLM2-135M-Instruct.Q4_1"
    place = next(line for line in lines if line.startswith("json: "))
    assert "'city'" in place and "'country'" in place
    assert sum(line.startswith("async: ") for line in lines) == 3


@pytest.mark.timeout(STARTUP_TIMEOUT + SHUTDOWN_TIMEOUT + 60)
def test_the_completion_backend_serves_the_same_api(tmp_path):
    """``--backend completion`` (``Llama``, one reply at a time) behind the same endpoints."""
    with serving(_command("--backend", "completion"), tmp_path / "log", ready="/health",
                 env={}) as srv:  # fmt: skip
        assert _health(srv.url)["backend"] == "completion"
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        reply = _chat(client, "Describe a person as JSON.", max_tokens=120, temperature=0.8,
                      seed=3, response_format=fmt, logprobs=True)  # fmt: skip
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
        assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
        streamed = "".join(c.choices[0].delta.content or "" for c in _chat(
            client, "Count to ten.", max_tokens=12, temperature=0, stream=True))  # fmt: skip
        whole = _chat(client, "Count to ten.", max_tokens=12, temperature=0)
        assert streamed == whole.choices[0].message.content
        url = f"{srv.url}/v1/chat/completions"
        with httpx.Client(timeout=30) as c, c.stream("POST", url, json=_long_body(True)) as r:
            assert next(r.iter_lines()).startswith("data: {")
        assert _idle(srv.url)["busy"] == 0
        assert stop(srv.proc) == 0
    assert "Traceback" not in srv.output()


# -- start-up and shutdown --------------------------------------------------------------------


def test_a_missing_model_is_one_line_and_exit_1(tmp_path):
    result = run_cli("serve", "--model", str(tmp_path / "none.gguf"), "--no-color")
    assert result.returncode == 1
    assert "cannot start: ModelLoadError" in result.stderr
    assert "Traceback" not in result.stderr


def _a_stream_finishes_through_a_shutdown_for(sig: signal.Signals, log: Path) -> None:
    """``sig`` mid-stream: the stream runs to its end, then the server exits 0, cleanly."""
    with serving(_command("--shutdown-timeout", "20"), log, ready="/health", env={}) as srv:
        body = {**_long_body(True), "max_tokens": 40}
        url = f"{srv.url}/v1/chat/completions"
        with httpx.Client(timeout=30) as c, c.stream("POST", url, json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            srv.proc.send_signal(sig)
            rest = list(lines)
        events = [line for line in rest if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
        # The one signal is enough: a second SIGINT would force the exit.
        assert srv.proc.wait(SHUTDOWN_TIMEOUT) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{srv.url}/health", timeout=2)
    assert_shut_down_cleanly(srv)


@pytest.mark.timeout(STARTUP_TIMEOUT + SHUTDOWN_TIMEOUT + 30)
def test_shutdown_lets_a_running_stream_finish_then_exits_0(tmp_path):
    _a_stream_finishes_through_a_shutdown_for(signal.SIGINT, tmp_path / "log")


@pytest.mark.timeout(STARTUP_TIMEOUT + SHUTDOWN_TIMEOUT + 30)
def test_sigterm_shuts_down_as_ctrl_c_does_and_exits_0(tmp_path):
    # Uvicorn raised the SIGTERM again once it had shut down: the default handler ended the
    # process with -15, before serve's own exit ran.
    _a_stream_finishes_through_a_shutdown_for(signal.SIGTERM, tmp_path / "log")


def _post_half_closed(url: str, body: dict) -> tuple[int | None, bytes]:
    """POST ``body`` on a raw socket, shut down its sending side, read the reply to its end.

    The status (``None`` unless the whole reply came) and the body, de-chunked.
    """
    address = httpx.URL(url)
    client = h11.Connection(h11.CLIENT)
    payload = json.dumps(body).encode()
    headers = [("host", address.netloc.decode()), ("content-type", "application/json"),
               ("content-length", str(len(payload)))]  # fmt: skip
    request = h11.Request(method="POST", target="/v1/chat/completions", headers=headers)
    # The timeout bounds every blocking call: a server that never answers fails the test.
    with socket.create_connection((address.host, address.port), timeout=30) as sock:
        for event in (request, h11.Data(data=payload), h11.EndOfMessage()):
            sock.sendall(client.send(event))
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            client.receive_data(chunk)
    client.receive_data(b"")
    status, content = None, b""
    try:
        while not isinstance(event := client.next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Response):  # after any interim (1xx) responses
                status = event.status_code
            elif isinstance(event, h11.Data):
                content += event.data
    except h11.RemoteProtocolError:  # the connection ended before the reply did
        return None, content
    return status, content


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_client_that_half_closes_its_socket_gets_its_reply(server, stream):
    # Uvicorn took the EOF of shutdown(SHUT_WR) for a hang-up and closed the connection: the
    # client got no response at all.
    body = {"model": "any", "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 4, "temperature": 0, "stream": stream}  # fmt: skip
    status, content = _post_half_closed(server.url, body)
    assert status == 200, content
    if stream:
        events = [line.removeprefix("data: ") for line in content.decode().splitlines() if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event)["choices"][0] for event in events[:-1]]
        text = "".join(chunk["delta"].get("content") or "" for chunk in chunks)
        reason = chunks[-1]["finish_reason"]
    else:
        choice = json.loads(content)["choices"][0]
        text, reason = choice["message"]["content"], choice["finish_reason"]
    whole = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False},
                       timeout=30).json()["choices"][0]  # fmt: skip
    assert (text, reason) == (whole["message"]["content"], "length")
    assert _idle(server.url)["busy"] == 0


@pytest.mark.timeout(60)
def test_a_half_closed_client_that_then_hangs_up_frees_its_sequence(server):
    # Its half-close already drew an interim response, read: only a later probe finds it gone.
    before = _metrics(server.url)
    address = httpx.URL(server.url)
    payload = json.dumps(_long_body(False)).encode()
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(payload), payload))  # fmt: skip
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 ")
        deadline = time.monotonic() + 5
        while _health(server.url)["busy"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the reply takes its sequence
        assert _health(server.url)["busy"] == 1
    hung_up = time.monotonic()
    assert _idle(server.url, timeout=5)["busy"] == 0
    assert time.monotonic() - hung_up < 3  # a probe a second; allow for a loaded machine
    key = 'seqlease_requests_total{endpoint="/v1/chat/completions",status="499"}'
    assert _metrics(server.url).get(key, 0) == before.get(key, 0) + 1


def test_hostile_response_formats_get_a_reply_or_a_400_and_the_server_serves_on(server, client):
    from test_hostile_grammars import HOSTILE

    # Deep nesting is more than the openai client itself can encode: sent as raw JSON below.
    schemas = {
        name: kw["json_schema"]
        for name, kw in HOSTILE.items()
        if "json_schema" in kw and "nested" not in name.split()[:2]
    }
    outcomes = {}
    for name, schema in schemas.items():
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        try:
            reply = _chat(client, "Answer:", max_tokens=8, response_format=fmt)
            outcomes[name] = reply.choices[0].finish_reason
        except openai.BadRequestError as exc:
            outcomes[name] = exc.body["message"]
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0
    refused = {name: said for name, said in outcomes.items() if said not in ("length", "stop")}
    assert all("json_schema" in str(said) for said in refused.values()), refused
    deep = {
        "model": "seqlease",
        "messages": [{"role": "user", "content": "Answer:"}],
        "max_tokens": 8,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": HOSTILE["array nested 950 deep"]["json_schema"]},
        },
    }
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=json.dumps(deep),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert "nests too deeply" in _error(r, 400)["message"]
    assert outcomes["maxLength 30000"] in ("length", "stop")
    assert server.proc.poll() is None, server.output()


def test_the_module_server_shuts_down_cleanly(server):
    assert _idle(server.url)["busy"] == 0
    assert stop(server.proc) == 0
    assert_shut_down_cleanly(server)


@pytest.mark.timeout(60)
def test_shutting_down_waits_close_timeout_for_a_lease_of_the_loops_own_tasks():
    # The lifespan's close ran on the event loop's thread, where every request's lease is
    # held: the pool skipped them all, and close_timeout waited for nothing.
    import seqlease
    from seqlease.server.app import create_app
    from tiny_model import tiny_model_path

    ctx = seqlease.Context(tiny_model_path(), sequences=1, n_ctx=64, n_threads=1)
    app = create_app(ctx, close_timeout=20)

    released: list[float] = []

    async def main() -> tuple[float, bool]:
        async with app.router.lifespan_context(app):
            seq = await ctx.aacquire()

            async def answer_then_release() -> None:
                await asyncio.sleep(0.3)  # a request still running as the server stops
                released.append(time.monotonic())
                await seq.arelease()

            request = asyncio.create_task(answer_then_release())
        closed, freed = time.monotonic(), ctx.probe.freed
        await request
        return closed, freed

    closed, freed_at_close = asyncio.run(asyncio.wait_for(main(), 40))
    assert closed >= released[0]  # the close waited for the lease...
    assert freed_at_close  # ...and freed the model once it came back
    assert ctx.stats().leased == 0
