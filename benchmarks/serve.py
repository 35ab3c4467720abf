"""Serving over HTTP: ``python -m seqlease serve`` against ``python -m llama_cpp.server``.

Run: ``python benchmarks/serve.py`` (about 40 s a round on 2 cores).

Two OpenAI-compatible servers on the same model (the embedded SmolLM2-135M-Instruct), the
same ``n_ctx`` (2048) and the same llama.cpp thread count (``--threads``, default 1, for
prompts and generation alike), one at a time, each a subprocess of this script:

- ``python -m llama_cpp.server --model M --n_threads T --n_threads_batch T --n_ctx 2048
  --interrupt_requests False --verbose False``: it runs one request at a time, and queues the
  rest. By default (``--interrupt_requests True``) a request that arrives while another streams
  cuts that one short: it ends with ``[DONE]`` after its current token. Then no reply at 8
  clients would run to ``max_tokens``, so the flag turns that off.
- ``python -m seqlease serve --model M --n-threads T --sequences 8 --n-ctx 2048``: up to 8
  requests decode together, a token of each in every step.

Both get the same environment, without ``OMP_WAIT_POLICY`` (OpenMP's default wait policy).
Each server is started, polled on ``GET /v1/models`` until it answers, sent one warm-up request
(streamed) and one check (the warm-up's message, not streamed: its ``usage`` must say
``max_tokens`` completion tokens, and its text must be the streamed one), then measured at 1
and at 8 concurrent clients, and stopped (SIGINT, then SIGKILL after 30 s).

A client (asyncio + httpx, the same code for both servers) sends ``--requests`` streamed chat
completions one after another, each with its own short user message, ``temperature: 0``,
``repeat_penalty: 1`` (llama_cpp.server's default is 1.1, seqlease's 1: off), ``max_tokens``
(``--max-tokens``, default 64), ``stream_options: {"include_usage": true}`` and ``logit_bias``
-100 on every end-of-generation token of the vocabulary, so every reply is exactly
``max_tokens`` long. A reply's tokens are its ``usage.completion_tokens`` when the
server sends it, otherwise its chunks with non-empty content (llama_cpp.server streams one
token a chunk and sends no usage in a stream); the script fails if any reply is not
``max_tokens`` long. Throughput is the completion tokens of all clients over the wall time from
the first request sent to the last reply done. Time to first token (TTFT) runs from sending a
request to its first chunk with non-empty content; median and 90th percentile over the requests
(at 8 clients it includes waiting for the server to take the request).

``--rounds N`` repeats the whole (both servers, each restarted), the servers' order alternating;
figures are medians over the rounds, ratios are taken within a round, then the median.
``--only ARM`` measures one server (trying the harness out; no page then). Writes
``docs/benchmarks-serving.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from report import (
    DOCS,
    CpuMeter,
    as_ratio,
    child_env,
    machine,
    markdown_table,
    never_end,
    print_table,
    rerun_command,
    write_page,
)

import seqlease

PAGE = DOCS / "benchmarks-serving.md"

N_CTX = 2048
SEQUENCES = 8
CLIENTS = (1, 8)
GOAL = 2.0  # seqlease / llama_cpp.server throughput at 8 clients
READY_TIMEOUT = 300.0  # seconds for a server to load the model and answer
STOP_TIMEOUT = 30.0  # seconds after SIGINT before SIGKILL

ARMS = ("llama_cpp", "seqlease")
LABELS = {"llama_cpp": "llama_cpp.server", "seqlease": "seqlease serve"}

TOPICS = (
    "cats",
    "the moon",
    "bicycles",
    "volcanoes",
    "bread",
    "the ocean",
    "trains",
    "honey bees",
    "glaciers",
    "chess",
    "tea",
    "lighthouses",
    "owls",
    "deserts",
    "violins",
    "rainbows",
    "maps",
    "penguins",
    "thunderstorms",
    "gardens",
    "clocks",
    "rivers",
    "kites",
    "mushrooms",
)
WARM_UP = "Say something about the weather."


def message(i: int) -> str:
    """The ``i``-th distinct user message (the same ``i`` in both arms)."""
    topic = TOPICS[i % len(TOPICS)]
    lap = i // len(TOPICS)
    return f"Tell me about {topic}." if lap == 0 else f"Tell me more about {topic} ({lap + 1})."


def eog_tokens(model: Path) -> list[int]:
    """Every end-of-generation token of the model's vocabulary (banned in every request)."""
    # A small context, closed before any server starts: only its vocabulary is read.
    with seqlease.Context(model, sequences=1, n_ctx=256) as ctx:
        return sorted(never_end(ctx))


# -- the servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_command(arm: str, model: str, threads: int | str, port: str) -> list[str]:
    where = ["--host", "127.0.0.1", "--port", port]
    if arm == "llama_cpp":
        return [
            *(sys.executable, "-m", "llama_cpp.server", "--model", model),
            *("--n_threads", str(threads), "--n_threads_batch", str(threads)),
            *("--n_ctx", str(N_CTX), "--interrupt_requests", "False", "--verbose", "False"),
            *where,
        ]
    return [
        *(sys.executable, "-m", "seqlease", "serve", "--model", model),
        *("--n-threads", str(threads), "--sequences", str(SEQUENCES), "--n-ctx", str(N_CTX)),
        *where,
    ]


def shown(cmd: list[str]) -> str:
    """``cmd`` as a reader would type it: ``python``, the model as ``M``."""
    return " ".join("python" if a == sys.executable else a for a in cmd)


@dataclasses.dataclass
class Server:
    arm: str
    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    model_id: str = ""

    def cpu_seconds(self) -> float:
        """CPU time of the server process so far (its threads included)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def running(arm: str, cmd: list[str], port: int, logdir: Path) -> Iterator[Server]:
    """Start ``cmd``, wait until ``GET /v1/models`` answers, stop it on the way out."""
    log = logdir / f"{arm}-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(None))
    server = Server(arm, proc, f"http://127.0.0.1:{port}", log)
    try:
        started = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise SystemExit(
                    f"{shown(cmd)} exited with {proc.returncode}:\n{server.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{server.base}/v1/models", timeout=5)
                if r.status_code == 200:
                    server.model_id = r.json()["data"][0]["id"]
                    break
            if time.perf_counter() - started > READY_TIMEOUT:
                raise SystemExit(f"{shown(cmd)} not ready in {READY_TIMEOUT:.0f} s")
            time.sleep(0.25)
        print(f"{LABELS[arm]}: ready in {time.perf_counter() - started:.1f} s", flush=True)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{LABELS[arm]}: no exit {STOP_TIMEOUT:.0f} s after SIGINT, killed")
                proc.kill()
                proc.wait()


# -- the clients ----------------------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    sent: float  # perf_counter when the request was sent
    first: float  # ... when the first chunk with content came
    done: float  # ... when the stream ended
    tokens: int  # completion tokens: usage if sent, else content chunks
    chunks: int  # chunks with non-empty content
    usage: int | None  # usage.completion_tokens, if the server sent it
    text: str
    message: str  # the user message it answered

    @property
    def ttft(self) -> float:
        return self.first - self.sent


def body(server: Server, text: str, args: argparse.Namespace, *, stream: bool) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": server.model_id,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        # llama_cpp.server's default is 1.1, seqlease's 1 (off): the same greedy decoding in both.
        "repeat_penalty": 1.0,
        "max_tokens": args.max_tokens,
        "logit_bias": {str(t): -100 for t in args.eog},
        "stream": stream,
    }
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


async def stream_one(
    client: httpx.AsyncClient, server: Server, text: str, args: argparse.Namespace
) -> Reply:
    """One streamed chat completion, timed from sending to its ``[DONE]``."""
    url = f"{server.base}/v1/chat/completions"
    sent = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    parts: list[str] = []
    async with client.stream("POST", url, json=body(server, text, args, stream=True)) as r:
        if r.status_code != 200:
            await r.aread()
            raise SystemExit(f"{LABELS[server.arm]}: HTTP {r.status_code}: {r.text[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments (pings), event names
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    chunks += 1
                    parts.append(content)
    done = time.perf_counter()
    if first is None:
        raise SystemExit(f"{LABELS[server.arm]}: a reply to {text!r} had no content")
    tokens = usage if usage is not None else chunks
    return Reply(sent, first, done, tokens, chunks, usage, "".join(parts), text)


async def check(client: httpx.AsyncClient, server: Server, args: argparse.Namespace) -> str:
    """Warm up, then check the token count: usage of the same request, not streamed."""
    streamed = await stream_one(client, server, WARM_UP, args)
    url = f"{server.base}/v1/chat/completions"
    r = await client.post(url, json=body(server, WARM_UP, args, stream=False))
    r.raise_for_status()
    whole = r.json()
    usage = whole.get("usage") or {"completion_tokens": None, "prompt_tokens": None}
    text = whole["choices"][0]["message"]["content"]
    finish = whole["choices"][0]["finish_reason"]
    if usage["completion_tokens"] != args.max_tokens or finish != "length":
        raise SystemExit(
            f"{LABELS[server.arm]}: the check reply has {usage['completion_tokens']} tokens "
            f"(finish_reason {finish!r}), not {args.max_tokens}: is the EOG ban ignored?"
        )
    note = (
        f"{usage['prompt_tokens']} prompt tokens; the stream of the same request had "
        f"{streamed.chunks} content chunks, usage "
        f"{'not sent' if streamed.usage is None else streamed.usage}, "
        f"{'the same' if streamed.text == text else 'NOT the same'} text"
    )
    print(f"{LABELS[server.arm]}: check: {note}", flush=True)
    return note


async def run_clients(
    client: httpx.AsyncClient, server: Server, n: int, args: argparse.Namespace
) -> tuple[list[Reply], float]:
    """``n`` clients, each ``args.requests`` streamed requests in a row; replies, wall time."""

    async def one_client(c: int) -> list[Reply]:
        return [
            await stream_one(client, server, message(c * args.requests + k), args)
            for k in range(args.requests)
        ]

    start = time.perf_counter()
    per_client = await asyncio.gather(*(one_client(c) for c in range(n)))
    replies = [r for rs in per_client for r in rs]
    return replies, max(r.done for r in replies) - start


def p90(values: list[float]) -> float:
    """The 90th percentile, nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


async def measure_server(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=max(CLIENTS) + 2, max_keepalive_connections=0)
    timeout = httpx.Timeout(600.0, connect=10.0)
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        out["check"] = await check(client, server, args)
        for n in CLIENTS:
            meter = CpuMeter()
            mark = meter.start()
            cpu0 = server.cpu_seconds()
            replies, wall = await run_clients(client, server, n, args)
            other = other_share(meter, mark, server.cpu_seconds() - cpu0)
            wrong = [r.tokens for r in replies if r.tokens != args.max_tokens]
            if wrong:
                raise SystemExit(
                    f"{LABELS[server.arm]} x{n}: replies of {sorted(set(wrong))} tokens, "
                    f"not {args.max_tokens}"
                )
            ttft = [r.ttft for r in replies]
            result: dict[str, Any] = {
                "tok_s": sum(r.tokens for r in replies) / wall,
                "ttft_median": statistics.median(ttft),
                "ttft_p90": p90(ttft),
                "requests": len(replies),
                "wall": wall,
                "usage_sent": all(r.usage is not None for r in replies),
                "other": other,
                "texts": {r.message: r.text for r in replies},
            }
            out[str(n)] = result
            print(
                f"{LABELS[server.arm]} x{n}: {result['tok_s']:.1f} tok/s, TTFT median "
                f"{result['ttft_median'] * 1e3:.0f} ms, p90 {result['ttft_p90'] * 1e3:.0f} ms, "
                f"{len(replies)} requests in {wall:.1f} s, other load {other:.0%}",
                flush=True,
            )
    return out


def other_share(meter: CpuMeter, mark: tuple[float, float, float], server_cpu: float) -> float:
    """CpuMeter's share of other processes, less the server's own CPU time."""
    ncpu = os.cpu_count() or 1
    wall = time.perf_counter() - mark[0]
    return max(0.0, meter.other_share(mark) - server_cpu / (wall * ncpu))


# -- report ---------------------------------------------------------------------------------

HEADER = [
    "server",
    "clients",
    "tok/s (all clients)",
    "TTFT median ms",
    "TTFT p90 ms",
    "requests",
    "tok/s vs llama_cpp.server",
    "TTFT median vs llama_cpp.server",
    "other load (max)",
]


def med(rounds: list[dict[str, Any]], arm: str, n: int, key: str) -> float:
    return float(statistics.median(r[arm][str(n)][key] for r in rounds))


def ratio(rounds: list[dict[str, Any]], n: int, key: str) -> float:
    return float(
        statistics.median(r["seqlease"][str(n)][key] / r["llama_cpp"][str(n)][key] for r in rounds)
    )


def rows(rounds: list[dict[str, Any]], arms: list[str]) -> list[list[str]]:
    both = len(arms) == 2
    out = []
    for arm in arms:
        for n in CLIENTS:
            if both and arm == "seqlease":
                tput = f"**{as_ratio(ratio(rounds, n, 'tok_s'))}**"
                ttft = as_ratio(ratio(rounds, n, "ttft_median"))
            else:
                tput = ttft = as_ratio(1.0) if both else "-"
            out.append(
                [
                    LABELS[arm],
                    str(n),
                    f"{med(rounds, arm, n, 'tok_s'):.1f}",
                    f"{med(rounds, arm, n, 'ttft_median') * 1e3:.0f}",
                    f"{med(rounds, arm, n, 'ttft_p90') * 1e3:.0f}",
                    str(sum(r[arm][str(n)]["requests"] for r in rounds)),
                    tput,
                    ttft,
                    f"{max(r[arm][str(n)]['other'] for r in rounds):.0%}",
                ]
            )
    return out


def findings(rounds: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = []
    per_round = [r["seqlease"]["8"]["tok_s"] / r["llama_cpp"]["8"]["tok_s"] for r in rounds]
    at8 = statistics.median(per_round)
    lines.append(
        f"Throughput at 8 clients, seqlease / llama_cpp.server: {as_ratio(at8)}"
        + (f" (rounds: {', '.join(f'{v:.2f}' for v in per_round)})" if len(rounds) > 1 else "")
        + f"; {'meets' if at8 >= GOAL else 'misses'} the goal of {as_ratio(GOAL, 0)}."
    )
    lines.append(
        f"Throughput at 1 client: {as_ratio(ratio(rounds, 1, 'tok_s'))}; TTFT median, seqlease "
        f"/ llama_cpp.server: {as_ratio(ratio(rounds, 1, 'ttft_median'))} at 1 client, "
        f"{as_ratio(ratio(rounds, 8, 'ttft_median'))} at 8 (below 1: seqlease answers sooner)."
    )
    for arm in ARMS:
        sent = all(r[arm][str(n)]["usage_sent"] for r in rounds for n in CLIENTS)
        lines.append(
            f"{LABELS[arm]}: every reply had {args.max_tokens} completion tokens, counted "
            + ("from the stream's `usage`" if sent else "as content chunks (no `usage` sent)")
            + f"; check request: {rounds[0][arm]['check']}."
        )
    counts = []
    for n in CLIENTS:
        same = total = 0
        for r in rounds:
            a, b = r["llama_cpp"][str(n)]["texts"], r["seqlease"][str(n)]["texts"]
            total += len(a)
            same += sum(a[m] == b.get(m) for m in a)
        counts.append(f"{same} of {total} at {n} client{'s' if n > 1 else ''}")
    lines.append(
        f"Replies with the same text from both servers (greedy, no repeat penalty): "
        f"{', '.join(counts)} (batched decoding may round differently)."
    )
    return lines


def section(threads: int, rounds: list[dict[str, Any]], args: argparse.Namespace) -> str:
    cores = os.cpu_count() or 1
    title = (
        f"{threads} thread{'s' if threads > 1 else ''}"
        + (": the defaults (half the cores)" if threads == max(1, cores // 2) else "")
        + (": every core (tuned)" if threads == cores and threads != max(1, cores // 2) else "")
    )
    lines = "\n".join(f"- {line}" for line in findings(rounds, args))
    return f"### {title}\n\n{markdown_table(HEADER, rows(rounds, list(ARMS)))}\n\n{lines}\n"


def render_page(
    sections: list[tuple[int, list[dict[str, Any]]]], args: argparse.Namespace, command: str
) -> str:
    m = machine()
    model = Path(args.model)
    commands = {arm: shown(server_command(arm, "M", "T", "P")) for arm in ARMS}
    counts = ", ".join(str(threads) for threads, _ in sections)
    results = "\n".join(section(threads, rounds, args) for threads, rounds in sections)
    return f"""# Benchmarks: serving over HTTP

Generated by `{command}` on {datetime.date.today().isoformat()}; rerun it to refresh this page.

What it measures: two OpenAI-compatible servers on the same model, the same `n_ctx`
({N_CTX}) and the same llama.cpp threads (`T`: {counts}, one table each, for prompts and
generation), at 1 and at 8 concurrent clients, one server at a time:

- `{commands["llama_cpp"]}`: it runs one request at a time and queues the others.
  `--interrupt_requests False` because by default a request that arrives while another streams
  ends that one early (`[DONE]` after its current token), and no reply could reach
  `max_tokens` at 8 clients.
- `{commands["seqlease"]}`: up to {SEQUENCES} requests decode together (its `--n-ctx` is per
  sequence: each request has the same {N_CTX} tokens of room as in llama_cpp.server).

(`M`: the embedded model, `{model.name}`; `P`: a free port.) Both servers get the same
environment, without `OMP_WAIT_POLICY`.

How:

- Each client (asyncio + httpx, the same code for both servers) sends {args.requests} streamed
  chat completions one after another: its own short user message (`Tell me about cats.`, ...),
  `temperature: 0`, `repeat_penalty: 1` (off; llama_cpp.server's default is 1.1, seqlease's
  1), `max_tokens: {args.max_tokens}`, `stream_options: {{"include_usage":
  true}}`, and `logit_bias` -100 on the end-of-generation tokens ({", ".join(map(str, args.eog))}),
  so every reply is exactly {args.max_tokens} tokens long: the script fails otherwise.
- Throughput: completion tokens of all clients over the wall time from the first request sent
  to the last reply done. TTFT: from sending a request to its first chunk with content (at 8
  clients it includes the wait for the server to take the request); median and 90th percentile
  over the requests.
- Each server: started, polled on `/v1/models` until it answers, one warm-up request and one
  check (the same request not streamed: `usage.completion_tokens` must be {args.max_tokens}),
  then 1 client, then 8, then stopped. {args.rounds} round(s), the servers' order alternating;
  medians over the rounds, ratios within a round, then the median. "Other load" is the share of
  the machine used by other processes (neither this script nor the server) while measuring.

## Results

The first table is the headline: both servers' default thread count on this machine (half
the cores). The second gives both every core.

{results}
The goal was at least {as_ratio(GOAL, 0)} llama_cpp.server's throughput at 8 clients.

## Reproduce

```bash
{command}
```

`--rounds N` repeats both servers N times (default 1), `--requests`, `--max-tokens` and
`--threads` set the load (3, 64, half the cores then all); `--no-write` prints without
writing this page.

Machine: {m["cpu"]}, {m["ram"]} RAM, {m["os"]}; Python {m["python"]}, llama-cpp-python
{m["llama-cpp-python"]}, seqlease {m["seqlease"]}; model `{model.name}`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both servers (1)")
    parser.add_argument("--requests", type=int, default=3, help="requests per client (3)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (64)")
    half = max(1, (os.cpu_count() or 1) // 2)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({half, os.cpu_count() or 1}),
        help="llama.cpp thread counts, one table each; the first is the headline (default: "
        "half the cores, seqlease's and llama_cpp.server's default, then all of them)",
    )
    parser.add_argument("--model", default=str(seqlease.default_model_path()))
    parser.add_argument("--only", choices=ARMS, help="measure one server only (writes no docs)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no docs")
    args = parser.parse_args()
    started = time.perf_counter()
    args.eog = eog_tokens(Path(args.model))
    arms = [args.only] if args.only else list(ARMS)
    sections: list[tuple[int, list[dict[str, Any]]]] = []
    with tempfile.TemporaryDirectory(prefix="seqlease-serve-") as logs:
        for threads in args.threads:
            rounds: list[dict[str, Any]] = []
            for k in range(args.rounds):
                result: dict[str, Any] = {}
                for arm in arms if k % 2 == 0 else arms[::-1]:
                    port = free_port()
                    cmd = server_command(arm, args.model, threads, str(port))
                    with running(arm, cmd, port, Path(logs)) as server:
                        result[arm] = asyncio.run(measure_server(server, args))
                rounds.append(result)
            sections.append((threads, rounds))
    for threads, rounds in sections:
        print(f"\n{threads} thread{'s' if threads > 1 else ''}:")
        print_table(HEADER, rows(rounds, arms))
        if len(arms) == 2:
            for line in findings(rounds, args):
                print(f"- {line}")
    if len(arms) == 2:
        page = render_page(sections, args, rerun_command(__file__))
        write_page(None if args.no_write else PAGE, page)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
