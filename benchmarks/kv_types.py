"""KV cache types: memory and speed of 8 sequences x 4,096 tokens with f16, q8_0 and q4_0.

Run: ``python benchmarks/kv_types.py`` (about 30 to 40 minutes on 2 cores, estimated from
``--quick``: 2 repeats of 5 configurations, each evaluating 8 prompts of 3,000 tokens;
``--repeats 1`` halves it; ``--quick`` takes about 2 minutes).

One ``seqlease.Context(sequences=8, n_ctx=4096, type_k=K, type_v=V, flash_attn=FA,
prefix_cache=False)`` on the embedded model per configuration:

* f16 / f16 with flash attention off (seqlease's CPU default, the baseline) and on;
* q8_0 / q8_0 and q4_0 / q4_0, flash attention on (llama.cpp needs it for a quantized V cache);
* q8_0 K with f16 V, flash attention off: the only quantized cache without flash attention;
* q8_0 / q8_0 with flash attention off is tried too, and refused by seqlease (``ValueError``)
  before llama.cpp is reached: the table shows the message.

KV memory is read twice: from llama.cpp's own log line (``llama_kv_cache: size = ... MiB``, on
logger ``seqlease.llama``; summed if there are several) and from ``Context.kv_cache_bytes``
(seqlease's formula over the cells llama.cpp allocated); the two must agree.

The workload, 8 threads with one lease each: every sequence evaluates a different prompt of
``--prompt-tokens`` tokens (numbered sentences drawn from word lists with a seed of its own;
two prompts share their BOS token at most), all 8 at once, then generates
``--gen-tokens`` greedy tokens (``temperature=0``) at that depth, all 8 at once. Prompt tok/s:
the prompt tokens evaluated (sum of ``Result.n_evaluated``) over the wall time from the start
until the last prompt is done (each thread asks for one token, so the prompt is evaluated and
its reply begun); generation tok/s: the tokens generated (sum of ``Result.n_generated``) over
the wall time of the second phase, which re-sends the same prompt (the sequence keeps it: only
its last two tokens are evaluated again, as seqlease always does) with ``max_tokens``.

Settings as users run them: every measured run is a fresh process of this script (so peak RSS,
the process's VmHWM, compares), OpenMP's default wait policy (``OMP_WAIT_POLICY`` is removed
from the measuring processes' environment), seqlease's default ``n_threads``. Each run warms
up on one short unrelated prompt. Repeats run the configurations in alternating order; ratios
are taken against the f16 / flash-attention-off run of the same repeat, then the median.
Writes ``docs/benchmarks-kv-types.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import random
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from report import (
    DOCS,
    CpuMeter,
    as_ratio,
    child_json,
    machine,
    markdown_table,
    peak_rss_mb,
    print_table,
    rerun_command,
    write_page,
)

import seqlease
from seqlease.context import default_threads
from seqlease.request.prompt import common_prefix

PAGE = DOCS / "benchmarks-kv-types.md"
SEQUENCES = 8
MIB = 1024 * 1024


@dataclass(frozen=True)
class Config:
    """One KV cache configuration: ``Context(type_k=..., type_v=..., flash_attn=...)``."""

    key: str
    type_k: str
    type_v: str
    flash_attn: bool

    @property
    def label(self) -> str:
        types = self.type_k if self.type_k == self.type_v else f"{self.type_k} K, {self.type_v} V"
        return f"{types}, FA {'on' if self.flash_attn else 'off'}"

    def call(self, n_ctx: int) -> str:
        return (
            f"Context(sequences={SEQUENCES}, n_ctx={n_ctx}, type_k={self.type_k!r}, "
            f"type_v={self.type_v!r}, flash_attn={self.flash_attn}, prefix_cache=False)"
        )


CONFIGS = (
    Config("f16-off", "f16", "f16", False),  # the baseline: seqlease's CPU default
    Config("f16-on", "f16", "f16", True),
    Config("q8_0-on", "q8_0", "q8_0", True),
    Config("q4_0-on", "q4_0", "q4_0", True),
    Config("q8_0k-off", "q8_0", "f16", False),
)
REFUSED = Config("q8_0-off", "q8_0", "q8_0", False)
BY_KEY = {c.key: c for c in (*CONFIGS, REFUSED)}
BASE = CONFIGS[0]

# llama.cpp's summary of the KV cache it allocated, one line per cache (llama_kv_cache, or
# llama_kv_cache_unified on older releases):
# "llama_kv_cache: size =  180.00 MiB (  1024 cells,  30 layers,  8/8 seqs), K (f16): ..."
KV_LINE = re.compile(
    r"llama_kv_cache\w*: size =\s*(?P<mib>[\d.]+) MiB \(\s*(?P<cells>\d+) cells,"
    r"\s*(?P<layers>\d+) layers,\s*(?P<seqs>\d+)/\d+ seqs\), "
    r"K \((?P<k>\w+)\):\s*[\d.]+ MiB, V \((?P<v>\w+)\):\s*[\d.]+ MiB"
)
FA_LINE = re.compile(r"llama_context: flash_attn\s*=\s*(\w+)")

# Word lists for the prompts: each sequence draws its sentences with a seed of its own.
NAMES = (
    "Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Kwame", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar",
)  # fmt: skip
VERBS = (
    "repaired", "painted", "carried", "counted", "weighed", "sold", "borrowed", "polished",
    "measured", "packed", "sketched", "returned", "ordered", "tested", "labelled", "stored",
)  # fmt: skip
THINGS = (
    "a copper kettle", "three wool blankets", "the old bicycle", "a crate of apples",
    "two brass lanterns", "the harbour map", "a violin case", "forty clay bricks",
    "the blue canoe", "a sack of barley", "the station clock", "six glass jars",
    "a leather saddle", "the garden gate", "a box of nails", "the printing press",
)  # fmt: skip
PLACES = (
    "near the mill", "at the market", "behind the chapel", "in the boathouse",
    "by the river", "on the hill farm", "at the bakery", "in the north tower",
    "under the bridge", "at the ferry landing", "in the orchard", "beside the forge",
)  # fmt: skip
TIMES = (
    "before dawn", "at noon", "on Tuesday", "after the storm", "in early spring",
    "during the fair", "late in the evening", "on the first of May", "at harvest time",
)  # fmt: skip
TOWNS = ("Aldmere", "Brackwater", "Corrin", "Dunholt", "Eastwick", "Fenmoor", "Glenhaven",
         "Hollowby")  # fmt: skip


def prompt_text(k: int, sentences: int) -> str:
    rng = random.Random(1000 + k)
    # The first word differs between sequences: two prompts share their BOS token at most.
    lines = [f"{TOWNS[k % len(TOWNS)]} town ledger, entry by entry:"]
    for i in range(1, sentences + 1):
        lines.append(
            f"{i}. {rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)} "
            f"{rng.choice(PLACES)} {rng.choice(TIMES)}."
        )
    return "\n".join(lines)


def build_prompts(ctx: seqlease.Context, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` tokens (a BOS too, if the model adds one)."""
    model = ctx.model
    prompts = []
    for k in range(n):
        sentences = max(4, length // 10)
        tokens = model.tokenize(prompt_text(k, sentences))
        while len(tokens) < length:
            sentences *= 2
            tokens = model.tokenize(prompt_text(k, sentences))
        prompts.append(tokens[:length])
    return prompts


class LogLines(logging.Handler):
    """Keeps llama.cpp's log lines (logger ``seqlease.llama``) while a context is made."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# -- one configuration, in a fresh process ---------------------------------------------------


def make_context(args: argparse.Namespace, config: Config) -> tuple[seqlease.Context, list[str]]:
    llama_log = logging.getLogger("seqlease.llama")
    handler = LogLines()
    llama_log.addHandler(handler)
    llama_log.setLevel(logging.INFO)
    llama_log.propagate = False
    try:
        ctx = seqlease.Context(
            args.model,
            sequences=SEQUENCES,
            n_ctx=args.n_ctx,
            type_k=config.type_k,
            type_v=config.type_v,
            flash_attn=config.flash_attn,
            prefix_cache=False,
        )
    finally:
        # Quiet again before anything is timed: llama.cpp's lines are not even formatted then.
        llama_log.removeHandler(handler)
        llama_log.setLevel(logging.WARNING)
    return ctx, handler.lines


def kv_from_log(lines: list[str]) -> dict[str, Any]:
    found = [m for m in map(KV_LINE.search, lines) if m]
    fa = [m.group(1) for m in map(FA_LINE.search, lines) if m]
    return {
        "llama_kv_mib": sum(float(m["mib"]) for m in found) if found else None,
        "llama_kv_lines": [m.group(0) for m in found],
        "llama_kv_types": sorted({f"{m['k']}/{m['v']}" for m in found}),
        "llama_flash_attn": fa[-1] if fa else None,
    }


def run_config(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"key": config.key}
    t = time.perf_counter()
    try:
        ctx, lines = make_context(args, config)
    except ValueError as exc:
        return {**out, "refused": f"{type(exc).__name__}: {exc}"}
    out["load_seconds"] = time.perf_counter() - t
    try:
        out.update(kv_from_log(lines))
        out["kv_cache_bytes"] = ctx.kv_cache_bytes
        out["options"] = dataclasses.asdict(ctx.context_options)
        prompts = build_prompts(ctx, SEQUENCES, args.prompt_tokens)
        out["prompt_lengths"] = [len(p) for p in prompts]
        out["max_shared_prefix"] = max(
            common_prefix(a, b) for i, a in enumerate(prompts) for b in prompts[i + 1 :]
        )
        with ctx.lease() as seq:  # pages the weights in; shares nothing with the prompts
            seq.generate("Warm-up: the weather today.", temperature=0.0, max_tokens=4).result()
        out.update(measure(ctx, prompts, args.gen_tokens))
        out["peak_rss_mib"] = peak_rss_mb()
        return out
    finally:
        ctx.close()


def measure(ctx: seqlease.Context, prompts: list[list[int]], gen_tokens: int) -> dict[str, Any]:
    """All prompts evaluated at once, then ``gen_tokens`` generated by all at once."""
    n = len(prompts)
    start, prompted = threading.Barrier(n + 1), threading.Barrier(n + 1)
    done: list[dict[str, Any]] = [{} for _ in range(n)]
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with ctx.lease() as seq:
                start.wait()
                first = seq.generate(prompts[k], temperature=0.0, max_tokens=1).result()
                prompted.wait()
                reply = seq.generate(prompts[k], temperature=0.0, max_tokens=gen_tokens).result()
            done[k] = {
                "n_evaluated": first.n_evaluated,
                "gen_n_evaluated": reply.n_evaluated,
                "n_generated": reply.n_generated,
                "finish": reply.finish_reason,
            }
        except BaseException as exc:
            errors.append(exc)
            start.abort()
            prompted.abort()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for thread in threads:
        thread.start()
    meter = CpuMeter()
    mark = meter.start()
    t0 = t1 = time.perf_counter()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed: errors says
        start.wait()
        mark = meter.start()
        t0 = time.perf_counter()
        prompted.wait()
        t1 = time.perf_counter()
    for thread in threads:
        thread.join()
    t2 = time.perf_counter()
    if errors:
        raise errors[0]
    return {
        "prompt_wall": t1 - t0,
        "gen_wall": t2 - t1,
        "neighbours": meter.other_share(mark),
        "replies": done,
    }


def run_child(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    """One configuration in a fresh process, OpenMP's default wait policy."""
    options = ["--model", args.model]
    for name in ("n_ctx", "prompt_tokens", "gen_tokens"):
        options += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return child_json(__file__, *options, "--_config", config.key, wait_policy=None)


# -- summary ----------------------------------------------------------------------------------


def prompt_tps(run: dict[str, Any]) -> float:
    tokens: int = sum(r["n_evaluated"] for r in run["replies"])
    return tokens / float(run["prompt_wall"])


def gen_tps(run: dict[str, Any]) -> float:
    tokens: int = sum(r["n_generated"] for r in run["replies"])
    return tokens / float(run["gen_wall"])


def formula_mib(run: dict[str, Any]) -> float | None:
    kv = run.get("kv_cache_bytes")
    return None if kv is None else kv / MIB


def agree(run: dict[str, Any]) -> bool:
    # llama.cpp prints MiB with two decimals: within rounding, or they disagree.
    ours, theirs = formula_mib(run), run.get("llama_kv_mib")
    return ours is not None and theirs is not None and abs(ours - theirs) <= 0.006


def ratios(
    runs: dict[str, list[dict[str, Any]]],
    key: str,
    of: Callable[[dict[str, Any]], float],
    base: str = BASE.key,
) -> list[float]:
    """``of(run)`` of ``key`` over ``base``, one ratio per repeat (they ran next to each other)."""
    return [of(a) / of(b) for a, b in zip(runs[key], runs[base], strict=True)]


def rx(values: list[float]) -> str:
    return as_ratio(statistics.median(values))


def mib(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


HEADER = [
    "config",
    "KV MiB (llama.cpp)",
    "KV MiB (seqlease formula)",
    "vs f16",
    "prompt tok/s",
    "gen tok/s",
    "peak RSS MiB",
    "FA (llama.cpp)",
    "other load",
]


def table_rows(runs: dict[str, list[dict[str, Any]]], refused: dict[str, Any]) -> list[list[str]]:
    base_kv = runs[BASE.key][0]["llama_kv_mib"]
    rows = []
    for config in CONFIGS:
        its = runs[config.key]
        first = its[0]
        kv = first["llama_kv_mib"]
        pt = statistics.median(prompt_tps(r) for r in its)
        gt = statistics.median(gen_tps(r) for r in its)
        rss = statistics.median(r["peak_rss_mib"] for r in its)
        base = config.key == BASE.key
        rows.append(
            [
                config.label,
                mib(kv) + ("" if agree(first) else " (disagree)"),
                mib(formula_mib(first)),
                "?" if kv is None or not base_kv else as_ratio(kv / base_kv),
                f"{pt:.0f}" + ("" if base else f" ({rx(ratios(runs, config.key, prompt_tps))})"),
                f"{gt:.1f}" + ("" if base else f" ({rx(ratios(runs, config.key, gen_tps))})"),
                f"{rss:.0f}",
                str(first["llama_flash_attn"]),
                f"{statistics.median(r['neighbours'] for r in its):.0%}",
            ]
        )
    why = "refused: llama.cpp needs flash attention for a quantized V cache"
    if "refused" not in refused:  # seqlease let it through: say so rather than hide it
        why = "NOT refused"
    rows.append([REFUSED.label, why, *["-"] * (len(HEADER) - 2)])
    return rows


def reading(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> str:
    """One paragraph on what the table says, from its numbers."""
    kv = {key: its[0]["llama_kv_mib"] or float("nan") for key, its in runs.items()}
    base = kv[BASE.key]
    q8, q4, mixed = kv["q8_0-on"] / base, kv["q4_0-on"] / base, kv["q8_0k-off"] / base
    verdict = "well under" if q8 <= 0.6 else "not well under"
    fa_p, fa_g = rx(ratios(runs, "f16-on", prompt_tps)), rx(ratios(runs, "f16-on", gen_tps))
    q8_p = rx(ratios(runs, "q8_0-on", prompt_tps, "f16-on"))
    q8_g = rx(ratios(runs, "q8_0-on", gen_tps, "f16-on"))
    q4_p = rx(ratios(runs, "q4_0-on", prompt_tps, "f16-on"))
    q4_g = rx(ratios(runs, "q4_0-on", gen_tps, "f16-on"))
    mx_p, mx_g = rx(ratios(runs, "q8_0k-off", prompt_tps)), rx(ratios(runs, "q8_0k-off", gen_tps))
    rss = {key: statistics.median(r["peak_rss_mib"] for r in its) for key, its in runs.items()}
    cells = SEQUENCES * args.n_ctx

    def rss_change(key: str) -> str:
        return (
            f"{rss[key]:.0f} MiB ({rss[key] - rss[BASE.key]:+.0f} MiB; KV "
            f"{kv[key] - base:+.0f} MiB)"
        )

    return (
        f"For {SEQUENCES} sequences x {args.n_ctx:,} tokens ({cells:,} KV cells), an f16 cache "
        f"takes {base:.0f} MiB; q8_0 takes {kv['q8_0-on']:.0f} MiB ({as_ratio(q8)}, {verdict} "
        f"f16's memory), q4_0 {kv['q4_0-on']:.0f} MiB ({as_ratio(q4)}), and a q8_0 K with an "
        f"f16 V {kv['q8_0k-off']:.0f} MiB ({as_ratio(mixed)}). Flash attention on the CPU, f16 "
        f"cache, "
        f"against off: prompt {fa_p}, generation {fa_g}. With flash attention on both sides, "
        f"q8_0 against f16: prompt {q8_p}, generation {q8_g}; q4_0 against f16: prompt {q4_p}, "
        f"generation {q4_g}. The q8_0 K / f16 V cache without flash attention, against the "
        f"f16 baseline: prompt {mx_p}, generation {mx_g}. Peak RSS: f16 FA off "
        f"{rss[BASE.key]:.0f} MiB, f16 FA on {rss_change('f16-on')}, q8_0 "
        f"{rss_change('q8_0-on')}, q4_0 {rss_change('q4_0-on')}, q8_0 K / f16 V "
        f"{rss_change('q8_0k-off')}. A quantized V cache needs flash attention: seqlease "
        "refuses `type_v='q8_0'` with `flash_attn=False` (a `ValueError`) before llama.cpp "
        "is reached."
    )


def checks(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    """What a reader should know about the measurements themselves (empty: nothing odd)."""
    out = []
    for key, its in runs.items():
        config = BY_KEY[key]
        for run in its:
            if not agree(run):
                out.append(
                    f"{config.label}: llama.cpp reports {mib(run['llama_kv_mib'])} MiB, "
                    f"Context.kv_cache_bytes {mib(formula_mib(run))} MiB: they disagree."
                )
            if run["llama_kv_types"] != [f"{config.type_k}/{config.type_v}"]:
                out.append(f"{config.label}: llama.cpp's KV types {run['llama_kv_types']}.")
            wanted = "enabled" if config.flash_attn else "disabled"
            if run["llama_flash_attn"] != wanted:
                out.append(f"{config.label}: llama.cpp says flash_attn = {run['llama_flash_attn']}")
            evaluated = [r["n_evaluated"] for r in run["replies"]]
            if evaluated != [args.prompt_tokens] * SEQUENCES:
                out.append(f"{config.label}: prompt tokens evaluated {evaluated}.")
            short = [r["n_generated"] for r in run["replies"] if r["n_generated"] < args.gen_tokens]
            if short:
                out.append(f"{config.label}: replies ended early ({short} tokens generated).")
    return sorted(set(out))


def render_page(
    args: argparse.Namespace,
    command: str,
    runs: dict[str, list[dict[str, Any]]],
    rows: list[list[str]],
    refused: dict[str, Any],
    odd: list[str],
) -> str:
    m = machine()
    model = Path(args.model)
    first = runs[BASE.key][0]
    configs = "\n".join(f"  - {c.label}: `{c.call(args.n_ctx)}`" for c in (*CONFIGS, REFUSED))
    kv_line = first["llama_kv_lines"][0] if first["llama_kv_lines"] else "(none)"
    n_shared = first["max_shared_prefix"]
    shared = f"{n_shared} token" + ("" if n_shared == 1 else "s")
    text = f"""# Benchmarks: KV cache types

Generated by `{command}` on {datetime.date.today().isoformat()}; rerun it to refresh this page.

What it measures: the KV memory and the speed of {SEQUENCES} sequences x {args.n_ctx:,} tokens
with f16, q8_0 and q4_0 KV caches, flash attention on and off. {SEQUENCES} threads lease a
sequence each; every sequence evaluates a different prompt of exactly {args.prompt_tokens:,}
tokens as the model tokenizes them (numbered sentences from word lists, a seed per sequence;
the longest prefix two prompts share: {shared}), all at once, then generates
{args.gen_tokens} greedy tokens (`temperature=0`) at that depth, all at once.

- Machine: {m["cpu"]}, {m["ram"]} RAM, {m["os"]}, Python {m["python"]}.
- llama-cpp-python {m["llama-cpp-python"]}, seqlease {m["seqlease"]}; model
  `{model.name}` ({model.stat().st_size / 1e6:.0f} MB).
- Threads: seqlease's default `n_threads` ({default_threads()} here); OpenMP's default wait
  policy (`OMP_WAIT_POLICY` unset).
- Configurations:
{configs}
- KV MiB (llama.cpp): the size llama.cpp logs when it makes the cache (logger
  `seqlease.llama`), for the baseline: `{kv_line}`. KV MiB (seqlease formula):
  `Context.kv_cache_bytes`. vs f16: against the f16 cache's llama.cpp size.
- Prompt tok/s: `Result.n_evaluated` summed over the {SEQUENCES} sequences, over the wall time
  until the last prompt was evaluated (each asks for one token). Gen tok/s:
  `Result.n_generated` summed, over the wall time of a second call on the same prompt with
  `max_tokens={args.gen_tokens}` (the sequence keeps the prompt; seqlease evaluates its last two
  tokens again). In brackets: against f16 with flash attention off, the median of the ratios
  between runs of one repeat.
- Every run is a fresh process (peak RSS is that process's VmHWM), warmed up on one short
  unrelated prompt. Repeats: {args.repeats}, the configurations' order alternating; the
  numbers are medians over repeats. FA (llama.cpp): what llama.cpp's log says it chose. Other
  load: the share of the machine other processes used while a run was timed (median).

## {SEQUENCES} sequences x {args.n_ctx:,} tokens

<!-- --8<-- [start:table] -->
{markdown_table(HEADER, rows)}
<!-- --8<-- [end:table] -->

## Reading

{reading(args, runs)}

Refused configuration, `{REFUSED.call(args.n_ctx)}`:

```text
{refused.get("refused", "not refused: " + json.dumps(refused)[:200])}
```
"""
    if odd:
        text += "\n## Checks that failed\n\n" + "\n".join(f"- {line}" for line in odd) + "\n"
    text += f"""
## Reproduce

```bash
{command}
```

`--quick` runs {SEQUENCES} x {QUICK["n_ctx"]:,} tokens with {QUICK["prompt_tokens"]}-token
prompts in about 2 minutes, `--repeats N` sets the repeats, `--no-write` prints without
writing this page.
"""
    return text


# -- main -------------------------------------------------------------------------------------

FULL = {"n_ctx": 4096, "prompt_tokens": 3000, "gen_tokens": 64, "repeats": 2}
QUICK = {"n_ctx": 1024, "prompt_tokens": 512, "gen_tokens": 32, "repeats": 1}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="GGUF path (default: the embedded model)")
    for name, what in (
        ("n_ctx", "KV tokens per sequence"),
        ("prompt_tokens", "prompt tokens per sequence"),
        ("gen_tokens", "tokens generated per sequence"),
        ("repeats", "runs of each configuration"),
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=None,
            help=f"{what} ({FULL[name]}; --quick: {QUICK[name]})",
        )
    parser.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no docs")
    parser.add_argument("--_config", choices=sorted(BY_KEY), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = str(args.model or seqlease.default_model_path())
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    if args._config:  # hidden mode: this script again in a fresh process, one JSON line
        print(json.dumps(run_config(args, BY_KEY[args._config])))
        return
    if args.prompt_tokens + args.gen_tokens > args.n_ctx:
        parser.error("--prompt-tokens + --gen-tokens must fit in --n-ctx")

    command = rerun_command(__file__)
    started = time.perf_counter()
    print(
        f"model {args.model}\n{SEQUENCES} sequences x {args.n_ctx} tokens; prompts of "
        f"{args.prompt_tokens} tokens, {args.gen_tokens} generated; n_threads "
        f"{default_threads()} (seqlease's default); OMP_WAIT_POLICY unset",
        flush=True,
    )
    refused = run_child(args, REFUSED)
    print(f"  {REFUSED.label}: {refused.get('refused', 'NOT refused')}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in CONFIGS}
    for rep in range(args.repeats):
        for config in CONFIGS if rep % 2 == 0 else CONFIGS[::-1]:
            run = run_child(args, config)
            runs[config.key].append(run)
            print(
                f"  run {rep + 1} {config.label:22} KV llama.cpp {mib(run['llama_kv_mib'])} MiB, "
                f"seqlease {mib(formula_mib(run))} MiB ({'agree' if agree(run) else 'DISAGREE'}); "
                f"prompts {run['prompt_lengths'][0]} tokens x {len(run['prompt_lengths'])} "
                f"(longest shared prefix {run['max_shared_prefix']}): "
                f"{prompt_tps(run):.0f} tok/s ({run['prompt_wall']:.1f} s); generation "
                f"{sum(r['n_generated'] for r in run['replies'])} tokens: {gen_tps(run):.1f} tok/s "
                f"({run['gen_wall']:.1f} s); peak RSS {run['peak_rss_mib']:.0f} MiB; "
                f"FA {run['llama_flash_attn']}; other load {run['neighbours']:.0%}",
                flush=True,
            )
    rows = table_rows(runs, refused)
    odd = checks(runs, args)
    print()
    print_table(HEADER, rows)
    print()
    print(reading(args, runs))
    for line in odd:
        print(f"CHECK: {line}")
    page = render_page(args, command, runs, rows, refused, odd)
    write_page(None if args.no_write else PAGE, page)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
