"""Continuing a saved chat: resuming its saved memory against evaluating its history again.

Run: ``python benchmarks/resume.py`` (about 1 minute on 2 cores).

A chat parked with ``chat.save().to_bytes()`` carries the sequence's KV memory, so
``ChatSession.resume(seq, SavedChat.from_bytes(blob))`` can load it and the next turn
evaluates only its own tokens; without that memory (``state=None``: what a saved chat of the
completion backend holds, and what every chat store that keeps only the messages does) the
next turn evaluates the whole conversation again. This measures what the user waits for in
each case before the reply starts. The goal: resuming at least 5x faster.

The conversation: a short system prompt and user turns about planning a cycling trip, with
the model's own greedy replies (``temperature=0``, at most ``REPLY_TOKENS`` tokens each),
until it holds about ``TARGET`` tokens; it is built once, saved, and serialized twice: with
its memory (the resume arm) and the same ``SavedChat`` with ``state=None`` (the re-evaluate
arm, the identical history). Then, on a fresh lease each time, both arms do the same:
``SavedChat.from_bytes(blob)``, ``ChatSession.resume(seq, saved)`` and ``chat.stream(NEXT_TURN,
temperature=0, max_tokens=8)``, read to its end. Time to first token (TTFT) runs from the call
of ``from_bytes`` to the stream's first chunk, so loading the memory counts: the user pays for
it. The load (``from_bytes`` + ``resume``) is also reported on its own. Waiting for the lease
and releasing it are not timed. The blob is read from memory, not from a file.

One process, one ``seqlease.Context(sequences=2, n_ctx=2048, prefix_cache_tokens=0)`` on the
embedded model: a released lease is cleared, and with no room for the prefix cache no earlier
lease's tokens can be copied into the re-evaluating arm's sequence (``Result.n_evaluated``
proves it: the whole prompt there, only the new turn after a resume). Otherwise seqlease's
defaults, ``n_threads`` included, and OpenMP's default wait policy (the measuring process is a
child whose environment has no ``OMP_WAIT_POLICY``). One untimed round of each arm warms up;
then ``--repeats`` rounds, the arms' order alternating; the ratio is taken within a round,
then the median. Writes ``docs/benchmarks-persistence.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import statistics
import time
from typing import Any

from report import (
    DOCS,
    CpuMeter,
    as_ratio,
    child_json,
    machine,
    markdown_table,
    print_table,
    rerun_command,
    write_page,
)

import seqlease
from seqlease.context import default_threads

PAGE = DOCS / "benchmarks-persistence.md"

N_CTX = 2048
TARGET = 1500  # tokens of conversation to continue
REPLY_TOKENS = 160  # at most, per reply while building it
FIRST_TOKENS = 8  # of the measured turn: only its first chunk is timed
GOAL = 5.0

SYSTEM_PROMPT = (
    "You are Atlas, a travel assistant for cyclists. You plan routes, daily stages, places "
    "to sleep and what to pack. Give concrete distances and names where you can, say when "
    "you are not sure, and keep answers short enough to read on a phone."
)
USER_TURNS = (
    "I want to cycle from Basel to Rotterdam along the Rhine in late May. How many days "
    "should I plan if I ride about 80 km a day?",
    "Split that into daily stages, please, with a town to sleep in at the end of each day.",
    "Which of those stages are the hilliest, and is there a train that can skip one?",
    "I will camp most nights. What should I pack for the bike and for the campsites?",
    "What about the weather in late May: how much rain should I expect, and how cold?",
    "Can I take my bike on German and Dutch regional trains, and do I need a ticket for it?",
    "Suggest two rest days along the way, with something worth seeing at each place.",
    "How do I find water and food on the Dutch part, where the villages are smaller?",
    "What tools and spare parts should I carry, and where are the good bike shops?",
    "Give me a budget per day for campsites, food and the odd hotel night.",
)
NEXT_TURN = "Thanks. Last question: what is the best way to get my bike home from Rotterdam?"

# What one arm's blob holds: the memory too, or the history alone.
ARMS = {"resume": "resume: saved memory loaded", "reevaluate": "re-evaluate: history only"}


# -- measuring (the child process) ----------------------------------------------------------


def build_conversation(ctx: seqlease.Context) -> tuple[seqlease.SavedChat, int]:
    """The conversation, with its memory, and how many tokens it holds."""
    held = 0
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, system_prompt=SYSTEM_PROMPT)
        for text in USER_TURNS:
            chat.prompt(text, temperature=0, max_tokens=REPLY_TOKENS)
            result = chat.last_result
            assert result is not None
            held = result.n_prompt + result.n_generated
            if held >= TARGET:
                return chat.save(), held
    raise SystemExit(f"the user turns made only {held} tokens of conversation, not {TARGET}")


def continue_chat(ctx: seqlease.Context, blob: bytes) -> dict[str, Any]:
    """Load ``blob`` on a fresh lease and start the next turn: what the user waits for."""
    with ctx.lease() as seq:
        t0 = time.perf_counter()
        saved = seqlease.SavedChat.from_bytes(blob)
        read = time.perf_counter()
        chat = seqlease.ChatSession.resume(seq, saved)
        loaded = time.perf_counter()
        first = None
        for _chunk in chat.stream(NEXT_TURN, temperature=0, max_tokens=FIRST_TOKENS):
            first = first or time.perf_counter()
        result = chat.last_result
    assert first is not None
    assert result is not None
    return {
        "ttft": first - t0,
        "from_bytes": read - t0,
        "resume": loaded - read,
        "resumed_from": chat.resumed_from,
        "n_prompt": result.n_prompt,
        "n_evaluated": result.n_evaluated,
        "text": result.text,
    }


def measure(repeats: int) -> dict[str, Any]:
    # The re-evaluating arm resumes without memory on purpose; its warning says nothing new.
    logging.getLogger("seqlease.chat").setLevel(logging.ERROR)
    with seqlease.Context(sequences=2, n_ctx=N_CTX, prefix_cache_tokens=0) as ctx:
        t = time.perf_counter()
        saved, held = build_conversation(ctx)  # also the warm-up: weights paged in
        print(
            f"conversation: {held} tokens, {len(saved.history)} messages, "
            f"built in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        t = time.perf_counter()
        blobs = {"resume": saved.to_bytes()}
        to_bytes = time.perf_counter() - t
        blobs["reevaluate"] = dataclasses.replace(saved, state=None).to_bytes()
        for arm in ARMS:  # warm-up: the first load and the first long prefill
            continue_chat(ctx, blobs[arm])
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        others: list[float] = []
        for turn in range(repeats):
            meter = CpuMeter()
            mark = meter.start()
            for arm in list(ARMS) if turn % 2 == 0 else list(ARMS)[::-1]:
                runs[arm].append(continue_chat(ctx, blobs[arm]))
            others.append(meter.other_share(mark))
            got = {arm: runs[arm][-1] for arm in ARMS}
            print(
                f"round {turn + 1}: "
                + ", ".join(
                    f"{arm} TTFT {r['ttft'] * 1e3:.0f} ms ({r['n_evaluated']} evaluated)"
                    for arm, r in got.items()
                )
                + f", other load {others[-1]:.0%}",
                flush=True,
            )
    return {
        "conversation_tokens": held,
        "messages": len(saved.history),
        "blob_bytes": {arm: len(blob) for arm, blob in blobs.items()},
        "to_bytes": to_bytes,
        "n_threads": default_threads(),
        "runs": runs,
        "others": others,
    }


# -- report (the parent process) ------------------------------------------------------------

HEADER = [
    "arm",
    "blob MB",
    "TTFT ms",
    "of which from_bytes ms",
    "of which resume ms",
    "of which stream ms",
    "TTFT range ms",
    "n_evaluated / n_prompt",
    "TTFT / resume's",
]


def ratios(data: dict[str, Any]) -> list[float]:
    pairs = zip(data["runs"]["reevaluate"], data["runs"]["resume"], strict=True)
    return [slow["ttft"] / fast["ttft"] for slow, fast in pairs]


def stream_ms(run: dict[str, Any]) -> float:
    # The part of TTFT after resume(): evaluating the prompt, up to the first chunk.
    return float(run["ttft"] - run["from_bytes"] - run["resume"]) * 1e3


def counts(values: list[int]) -> str:
    # One number when every round agrees, as they should; each distinct one if not.
    return "/".join(f"{v:,}" for v in sorted(set(values)))


def rows(data: dict[str, Any]) -> list[list[str]]:
    ratio = statistics.median(ratios(data))
    out = []
    for arm, label in ARMS.items():
        runs = data["runs"][arm]
        ttft = [r["ttft"] * 1e3 for r in runs]
        evaluated = [r["n_evaluated"] for r in runs]
        prompt = [r["n_prompt"] for r in runs]
        out.append(
            [
                label,
                f"{data['blob_bytes'][arm] / 1e6:.2f}",
                f"{statistics.median(ttft):.0f}",
                f"{statistics.median(r['from_bytes'] * 1e3 for r in runs):.1f}",
                f"{statistics.median(r['resume'] * 1e3 for r in runs):.1f}",
                f"{statistics.median(stream_ms(r) for r in runs):.0f}",
                f"{min(ttft):.0f} to {max(ttft):.0f}",
                f"{counts(evaluated)} / {counts(prompt)}",
                f"**{as_ratio(ratio, 1)}**" if arm == "reevaluate" else as_ratio(1, 1),
            ]
        )
    return out


def findings(data: dict[str, Any]) -> list[str]:
    r = ratios(data)
    ratio = statistics.median(r)
    resumed = {x["resumed_from"] for x in data["runs"]["resume"]}
    reevaluated = {x["resumed_from"] for x in data["runs"]["reevaluate"]}
    texts = {x["text"] for arm in ARMS for x in data["runs"][arm]}
    resumed_turn = data["runs"]["resume"][0]
    new_tokens = resumed_turn["n_prompt"] - data["conversation_tokens"]
    per_token = data["blob_bytes"]["resume"] / data["conversation_tokens"]
    return [
        f"Re-evaluate / resume TTFT: {as_ratio(ratio, 1)} (rounds: "
        f"{', '.join(f'{v:.1f}' for v in r)}; "
        f"{'meets' if ratio >= GOAL else 'misses'} the goal of {as_ratio(GOAL, 0)}).",
        f"`resumed_from`: {', '.join(sorted(map(str, resumed)))} in the resume arm, "
        f"{', '.join(sorted(map(str, reevaluated)))} in the re-evaluate arm.",
        f"After a resume the next turn's prompt adds {new_tokens} tokens to the conversation's "
        f"{data['conversation_tokens']:,}; it evaluated {resumed_turn['n_evaluated']}.",
        # Greedy replies: both arms should say the same, or the loaded memory differs.
        f"The reply ({FIRST_TOKENS} tokens, greedy) is "
        + (
            f"the same in both arms and every round: {next(iter(texts))!r}."
            if len(texts) == 1
            else f"NOT the same in every run: {sorted(texts)!r}."
        ),
        f"The blob with memory holds {per_token / 1e3:.1f} KB a token of the conversation (the "
        f"f16 KV cache); `to_bytes` took {data['to_bytes'] * 1e3:.0f} ms.",
        f"Other processes' share of the machine during a round: at most "
        f"{max(data['others']):.0%} (the machine is shared).",
    ]


def render_page(data: dict[str, Any], command: str, repeats: int) -> str:
    m = machine()
    goal = as_ratio(GOAL, 0)
    return (
        f"""# Benchmarks: saving and resuming chats

Generated by `{command}` on {datetime.date.today().isoformat()}; rerun it to refresh this page.

What it measures: the time to first token (TTFT) of the next turn of a chat of
{data["conversation_tokens"]:,} tokens ({data["messages"]} messages: a system prompt and the
model's own greedy replies to questions about a cycling trip), continued from a saved chat in
two ways:

- resume: `ChatSession.resume(seq, SavedChat.from_bytes(blob))` with the blob of
  `chat.save().to_bytes()`, which holds the sequence's KV memory; it is loaded, and the next
  turn evaluates only its own tokens;
- re-evaluate: the same `SavedChat` with `state=None` (the identical history, no memory:
  what the completion backend saves, or a store that keeps only the messages); the next turn
  evaluates the whole conversation.

How:

- Both arms, on a fresh lease each time: `SavedChat.from_bytes(blob)`,
  `ChatSession.resume(seq, saved)`, then `chat.stream(next_turn, temperature=0,
  max_tokens={FIRST_TOKENS})` read to its end. TTFT runs from the call of `from_bytes` to the
  stream's first chunk (which may hold a piece back while it could be the start of a stop
  marker), so loading the memory counts. The table splits it: `from_bytes` (reading the
  frame, its SHA-256 checked), `resume` (loading the memory into the sequence) and the stream
  (evaluating the prompt up to the first chunk). Waiting for the lease and releasing it are
  not timed; the blob is in memory, not read from a file.
- One `Context(sequences=2, n_ctx={N_CTX}, prefix_cache_tokens=0)` on the embedded model: a
  released lease is cleared, and the prefix cache has no room, so no earlier lease's tokens
  reach the re-evaluating arm's sequence; `n_evaluated` (from `chat.last_result`) shows it.
- seqlease's default `n_threads` ({data["n_threads"]} here), OpenMP's default wait policy
  (`OMP_WAIT_POLICY` unset). One untimed round of each arm first; then {repeats} rounds in
  one process, the arms' order alternating. Medians over the rounds; the ratio is re-evaluate
  over resume within a round, then the median.

## Results

{markdown_table(HEADER, rows(data))}

"""
        + "\n".join(f"- {line}" for line in findings(data))
        + f"""

The goal was resuming at least {goal} faster. The blob holds the KV memory of every token
of the conversation, so it grows with the conversation as re-evaluating does, but loading it is
a copy (after a SHA-256 check in `from_bytes` and in `load_state`), not a forward pass.

## Reproduce

```bash
{command}
```

`--repeats N` sets the rounds (default 3); `--no-write` prints without writing this page.

Machine: {m["cpu"]}, {m["ram"]} RAM, {m["os"]}; Python {m["python"]}, llama-cpp-python
{m["llama-cpp-python"]}, seqlease {m["seqlease"]}; model `{seqlease.default_model_path().name}`.
"""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both arms (3)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no docs")
    parser.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:  # this script again, in a process without OMP_WAIT_POLICY
        print(json.dumps(measure(args.repeats)))
        return
    started = time.perf_counter()
    data = child_json(
        __file__, "--_measure", "--repeats", str(args.repeats), wait_policy=None, echo=True
    )
    print()
    print_table(HEADER, rows(data))
    for line in findings(data):
        print(f"- {line}")
    page = render_page(data, rerun_command(__file__), args.repeats)
    write_page(None if args.no_write else PAGE, page)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
