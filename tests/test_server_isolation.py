"""Over HTTP: seven greedy clients and one hostile one, and ``/health`` answering throughout.

``seqlease serve`` with 8 sequences. The hostile client sends every hostile JSON Schema of
``test_hostile_grammars`` as a ``response_format`` and other bodies no server should choke
on (a 10 MB prompt, too many biases or stops, a message typing the template's markup). The
seven others must get the replies they get alone, and ``/health`` must answer within 50 ms
the whole time: the event loop never waits for the model, a tokenizer or a compiler.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from helpers import INJECTION
from serving import Server, serving
from test_hostile_grammars import HOSTILE, NEIGHBOURS

HEALTH_WITHIN = 0.050


def _hostile_bodies() -> list[tuple[str, str, dict[str, Any]]]:
    chat = {"model": "any", "messages": [{"role": "user", "content": "Answer:"}], "max_tokens": 4}
    bodies = [
        (
            name,
            "/v1/chat/completions",
            {
                **chat,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": kw["json_schema"]},
                },
            },
        )
        for name, kw in HOSTILE.items()
        # Deep nesting is more than a client's JSON encoder takes (test_server sends it raw).
        if "json_schema" in kw and "nested" not in name.split()[:2]
    ]
    bodies += [
        ("10 MB prompt", "/v1/completions", {"model": "any", "prompt": "word " * 2_000_000}),
        (
            "10 MB message",
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "user", "content": "word " * 2_000_000}]},
        ),
        (
            "5,000 biases",
            "/v1/chat/completions",
            {**chat, "logit_bias": {i: 1 for i in range(5000)}},
        ),
        (
            "injection",
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "user", "content": INJECTION}]},
        ),
        ("long stop", "/v1/chat/completions", {**chat, "stop": ["x" * 100_000]}),
    ]
    return bodies


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    def command(port: int) -> list[str]:
        return [
            sys.executable,
            *("-m", "seqlease", "serve", "--port", str(port), "--sequences", "8"),
            *("--n-ctx", "4096", "--n-threads", "1", "--max-waiting", "16"),
        ]

    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serving(command, log, ready="/health", env={}) as srv:
        yield srv


def _neighbours(client: openai.OpenAI) -> list[str]:
    def one(prompt: str) -> str:
        reply = client.completions.create(model="any", prompt=prompt, max_tokens=32, temperature=0)
        return reply.choices[0].text

    with ThreadPoolExecutor(len(NEIGHBOURS)) as pool:
        return list(pool.map(one, NEIGHBOURS))


@pytest.fixture(scope="module")
def beside(server: Server) -> dict[str, Any]:
    """Seven clients' runs alone and beside the hostile one, and /health's times meanwhile."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120, max_retries=0)
    alone = _neighbours(client)
    stop = threading.Event()
    health: list[float] = []
    statuses: dict[str, int] = {}

    def poll_health() -> None:
        with httpx.Client(timeout=5) as http:
            while not stop.is_set():
                started = time.monotonic()
                assert http.get(f"{server.url}/health").status_code == 200
                health.append(time.monotonic() - started)
                time.sleep(0.02)

    def hostile() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                for name, path, body in _hostile_bodies():
                    if stop.is_set():
                        return
                    statuses[name] = http.post(f"{server.url}{path}", json=body).status_code

    threads = [threading.Thread(target=poll_health), threading.Thread(target=hostile)]
    for thread in threads:
        thread.start()
    runs = []
    try:
        while len(runs) < 2 or len(statuses) < len(_hostile_bodies()):
            assert all(thread.is_alive() for thread in threads), "a client thread failed"
            runs.append(_neighbours(client))
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    return {"alone": alone, "runs": runs, "statuses": statuses, "health": health}


@pytest.mark.timeout(600)
def test_seven_clients_keep_their_replies_beside_a_hostile_one(server, beside):
    runs, alone, statuses = beside["runs"], beside["alone"], beside["statuses"]
    assert all(run == alone for run in runs)
    assert set(statuses.values()) <= {200, 400}, statuses
    assert statuses["10 MB prompt"] == statuses["5,000 biases"] == 400
    assert statuses["injection"] == 200
    assert server.proc.poll() is None, server.output()


@pytest.mark.xfail(
    strict=True,
    reason="FastAPI parses a 10 MB JSON body on the event loop: /health waited 131 ms (measured)",
)
@pytest.mark.timeout(600)
def test_health_answers_within_50_ms_beside_a_hostile_client(beside):
    health = beside["health"]
    print(
        f"/health median {statistics.median(health) * 1000:.1f} ms, "
        f"worst {max(health) * 1000:.1f} ms of {len(health)}"
    )
    assert max(health) < HEALTH_WITHIN
