"""Time per token with a JSON-schema grammar against none, at 1 and 8 concurrent sequences.

Run: ``python benchmarks/grammar.py`` (about 5 minutes on 2 cores; ``--quick``: 1 minute).

One ``seqlease.Context(sequences=8)`` on the embedded model with seqlease's defaults (its
default ``n_threads``, OpenMP's default wait policy, default sampling: temperature 0.6, top-p
0.9, top-k 40), and one with ``backend="completion"`` for the second table. Each sequence
generates ``--tokens`` tokens from a short prompt, with and without ``json_schema=`` (an array
of at least 40 people: it cannot be finished within the run, so every reply runs to the end).
End-of-generation tokens get a bias of -100 in both arms, so neither stops early, and the
bias costs the same in both.

Time per token is read from the stream: from a sequence's first chunk of text to its end,
over its tokens less one, so the prompt is not counted; at 8 sequences it is each sequence's
own rate (they share every decode step), averaged. The arms alternate, in turns, within one
process; ratios are grammar over none of the same turn, then the median over ``--repeats``.
Writes ``docs/benchmarks-structured-output.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from report import (
    DOCS,
    CpuMeter,
    as_ratio,
    machine,
    markdown_table,
    never_end,
    print_table,
    write_page,
)

import seqlease

PAGE = DOCS / "benchmarks-structured-output.md"
PROMPT = "Write a list of people as JSON:"
SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer"},
            "member": {"type": "boolean"},
        },
        "required": ["name", "age", "member"],
    },
    "minItems": 40,
}


def seconds_per_token(ctx: seqlease.Context, n: int, tokens: int, grammar: bool) -> float:
    """Mean over ``n`` concurrent sequences of each one's seconds per generated token."""
    ban = never_end(ctx)
    barrier = threading.Barrier(n)

    def one(i: int) -> float:
        with ctx.lease(timeout=600) as seq:
            barrier.wait(600)
            stream = seq.generate(
                PROMPT,
                json_schema=SCHEMA if grammar else None,
                logit_bias=ban,
                max_tokens=tokens,
                seed=i,
            )
            first = None
            for _ in stream:
                first = first or time.perf_counter()
            end = time.perf_counter()
            result = stream.result()
        assert first is not None
        assert result.finish_reason == "length", result
        return (end - first) / (result.n_generated - 1)

    with ThreadPoolExecutor(n) as pool:
        return statistics.mean(pool.map(one, range(n)))


def measure(
    backend: Literal["session", "completion"], widths: list[int], tokens: int, repeats: int
) -> list[list[str]]:
    rows: list[list[str]] = []
    with seqlease.Context(sequences=max(widths), n_ctx=512, backend=backend) as ctx:
        seconds_per_token(ctx, 1, 8, grammar=True)  # warm-up: weights in cache, code paths
        for n in widths:
            plain: list[float] = []
            constrained: list[float] = []
            ratios: list[float] = []
            others: list[float] = []
            for turn in range(repeats):
                meter = CpuMeter()
                mark = meter.start()
                arms = [False, True] if turn % 2 == 0 else [True, False]
                got = {arm: seconds_per_token(ctx, n, tokens, arm) for arm in arms}
                others.append(meter.other_share(mark))
                plain.append(got[False])
                constrained.append(got[True])
                ratios.append(got[True] / got[False])
                print(
                    f"{backend} x{n} turn {turn + 1}: none {got[False] * 1e3:.1f} ms, "
                    f"schema {got[True] * 1e3:.1f} ms per token",
                    flush=True,
                )
            rows.append(
                [
                    str(n),
                    f"{statistics.median(plain) * 1e3:.1f}",
                    f"{statistics.median(constrained) * 1e3:.1f}",
                    f"**{as_ratio(statistics.median(ratios))}**",
                    f"{max(others):.0%}",
                ]
            )
    return rows


HEADER = [
    "concurrent sequences",
    "ms/token, no grammar",
    "ms/token, JSON schema",
    "ratio",
    "other load (max)",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 tokens, 1 repeat")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tokens, repeats = (32, 1) if args.quick else (args.tokens, args.repeats)
    session = measure("session", [1, 8], tokens, repeats)
    completion = measure("completion", [1], tokens, repeats)
    print()
    print_table(HEADER, session)
    print_table(HEADER, completion)
    write_page(None if args.no_write else PAGE, page(session, completion, tokens, repeats))


def page(session: list[list[str]], completion: list[list[str]], tokens: int, n: int) -> str:
    about = machine()
    return f"""# Benchmarks: structured output

Time per generated token with a JSON-schema grammar against none (`python
benchmarks/grammar.py`, {datetime.date.today()}: {tokens} tokens per sequence, median of {n}
turns; the arms alternate within one process). seqlease's defaults, OpenMP's default wait policy;
the embedded SmolLM2-135M-Instruct (a 49,152-token vocabulary). The schema is an array of at
least 40 objects, so no reply can finish early; end-of-generation tokens get a bias of -100 in
both arms. How each figure is taken is in the script's docstring.

## Session backend (the default)

{markdown_table(HEADER, session)}

At 8 sequences each step of the engine decodes one token of every sequence, so a sequence's
time per token is a whole step. Before each token, llguidance computes the reply's mask over
the whole vocabulary (49k tokens, 0.05 to 0.15 ms) and the refused logits are set to -inf;
the grammar was compiled at the call, off the engine thread. The goal is at most 1.10x.

## Completion backend (`llama_cpp.Llama`)

{markdown_table(HEADER, completion)}

Here the same llguidance mask filters the logits in a logits processor before `Llama`'s
sampler sees them. This backend runs one request at a time, so there is no row for 8.

Machine: {about["cpu"]}, {about["ram"]}, {about["os"]}; Python {about["python"]},
llama-cpp-python {about["llama-cpp-python"]}, seqlease {about["seqlease"]}.
"""


if __name__ == "__main__":
    main()
