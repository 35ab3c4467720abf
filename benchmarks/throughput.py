"""Aggregate generation throughput: seqlease against llama.cpp driven directly, and serial Llama.

Run: ``python benchmarks/throughput.py`` (about 8 minutes; ``--quick`` for about 2).

Three paths generate the same requests (same model, same prompt tokens, same sampling: top-k
40, temperature 0.8, a seeded draw, no top-p / min-p / repeat penalty) with the same
``n_ctx`` per sequence, ``n_batch`` and ``n_threads``:

* seqlease: one ``Context``, N threads each leasing a sequence and generating;
* raw: a plain ctypes loop over ``llama_cpp.llama_cpp`` that prefills every prompt, then decodes
  one token per sequence per ``llama_decode``: the floor for one-batch-per-step decoding;
* serial: the requests one after another through ``llama_cpp.Llama.create_completion``.

Every repeat runs the paths interleaved, so noise from the rest of the machine lands on all of
them alike; the table shows each point's best run, with the median-run ratio beside it. Peak
memory of 8 sequences (one Context against 8 ``Llama`` objects) is measured in fresh subprocesses
of this script. Writes ``docs/benchmarks.md`` and ``docs/throughput.png`` unless ``--no-write``.

Every path uses all cores with OpenMP's passive wait policy (``OMP_WAIT_POLICY=PASSIVE``, set
here before llama.cpp loads unless the environment already sets it): with the default policy
llama.cpp's threads spin at every barrier and collapse as soon as another process takes a core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# Must precede the first load of llama.cpp's OpenMP runtime, which reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import seqlease
from seqlease.native.library import load_library

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# Sampling shared by every path. top_p=1 and min_p=0 switch those samplers off, so all three
# chains reduce to top-k -> temperature -> seeded draw (Llama also adds no-op typical/penalties).
TOP_K = 40
TEMPERATURE = 0.8
N_BATCH = 512

TOPICS = (
    "a lighthouse keeper",
    "a lost robot",
    "a dragon who bakes bread",
    "two rival chess players",
    "a city under the sea",
    "a time-travelling cat",
    "a haunted library",
    "the first colony on Mars",
    "a detective in Venice",
    "a tiny village in the Alps",
    "a pirate who fears water",
    "an old violin",
    "a garden that grows at night",
    "a clockmaker's apprentice",
    "a storm over the desert",
    "a forgotten king",
)


def prompt_text(i: int) -> str:
    # A chat-formatted request for a *long* story: the model then runs to max_tokens instead
    # of ending early, so every path decodes the same number of steps (checked and reported).
    topic = TOPICS[i % len(TOPICS)]
    return (
        f"<|im_start|>user\nWrite a long, detailed story about {topic}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@dataclass
class Run:
    """One timed batch of requests on one path."""

    seconds: float
    generated: list[int]  # tokens generated per request

    @property
    def tok_s(self) -> float:
        return sum(self.generated) / self.seconds


# -- the three paths --------------------------------------------------------------------------


class SeqleasePath:
    def __init__(self, model: str, sequences: int, n_ctx: int, n_threads: int) -> None:
        self.ctx = seqlease.Context(
            model, sequences=sequences, n_ctx=n_ctx, n_threads=n_threads, n_batch=N_BATCH
        )

    def run(self, prompts: list[list[int]], max_tokens: int) -> Run:
        generated = [0] * len(prompts)
        # Callers start together: the clock starts when the last of them is ready.
        barrier = threading.Barrier(len(prompts) + 1)

        def caller(i: int) -> None:
            barrier.wait()
            with self.ctx.lease() as seq:
                result = seq.generate(
                    prompts[i],
                    max_tokens=max_tokens,
                    temperature=TEMPERATURE,
                    top_k=TOP_K,
                    top_p=1.0,
                    min_p=0.0,
                    seed=i,
                ).result()
            generated[i] = result.n_generated

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        return Run(time.perf_counter() - t0, generated)

    def close(self) -> None:
        self.ctx.close()


class RawPath:
    """llama.cpp's batched decode through ctypes, with nothing on top: the floor."""

    def __init__(self, model: str, sequences: int, n_ctx: int, n_threads: int) -> None:
        lib = self.lib = load_library()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(model.encode(), mparams)
        self.vocab = lib.llama_model_get_vocab(self.model)
        # The same context parameters seqlease's NativeContext sets, and nothing else.
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx * sequences
        cparams.n_batch = N_BATCH
        cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = sequences
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        self.batch = lib.llama_batch_init(N_BATCH, 0, sequences)
        self.memory = lib.llama_get_memory(self.ctx)

    def _sampler(self, seed: int) -> object:
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(TOP_K))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(TEMPERATURE))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def run(self, prompts: list[list[int]], max_tokens: int) -> Run:
        lib, ctx = self.lib, self.ctx
        t0 = time.perf_counter()
        lib.llama_memory_clear(self.memory, True)
        samplers = [self._sampler(seed) for seed in range(len(prompts))]
        generated = [0] * len(prompts)
        n_past = [len(p) for p in prompts]
        live: dict[int, int] = {}  # sequence -> the token to decode next

        def sampled(seq: int, row: int) -> None:
            token = lib.llama_sampler_sample(samplers[seq], ctx, row)
            generated[seq] += 1
            if not lib.llama_vocab_is_eog(self.vocab, token) and generated[seq] < max_tokens:
                live[seq] = token

        # Prefill: whole prompts packed into batches of up to n_batch tokens, as seqlease's
        # scheduler does when requests arrive together; each samples from its last row.
        entries: list[tuple[int, int, int, bool]] = []
        ends: list[tuple[int, int]] = []
        for seq, prompt in enumerate(prompts):
            if len(entries) + len(prompt) > N_BATCH:
                self._decode(entries)
                for s, row in ends:
                    sampled(s, row)
                entries, ends = [], []
            last = len(prompt) - 1
            entries.extend((tok, pos, seq, pos == last) for pos, tok in enumerate(prompt))
            ends.append((seq, len(entries) - 1))
        self._decode(entries)
        for s, row in ends:
            sampled(s, row)
        # Decode: one token per live sequence per step.
        while live:
            step = list(live.items())
            live.clear()
            self._decode([(tok, n_past[seq], seq, True) for seq, tok in step])
            for row, (seq, _) in enumerate(step):
                n_past[seq] += 1
                sampled(seq, row)
        seconds = time.perf_counter() - t0
        for chain in samplers:
            lib.llama_sampler_free(chain)
        return Run(seconds, generated)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


class SerialPath:
    """What users do today: one ``Llama``, one request at a time."""

    def __init__(self, model: str, n_ctx: int, n_threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model,
            n_ctx=n_ctx,
            n_batch=N_BATCH,
            n_ubatch=N_BATCH,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )

    def one(self, prompt: list[int] | str, max_tokens: int, seed: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = self.llm.create_completion(
            prompt,
            max_tokens=max_tokens,
            temperature=TEMPERATURE,
            top_k=TOP_K,
            top_p=1.0,
            min_p=0.0,
            typical_p=1.0,
            repeat_penalty=1.0,
            seed=seed,
        )
        return time.perf_counter() - t0, int(out["usage"]["completion_tokens"])

    def close(self) -> None:
        self.llm.close()


def tokenize_prompts(model: str, n: int) -> list[list[int]]:
    # Token ids, not text, go to every path: all three then evaluate exactly the same prompt.
    from seqlease.native.model import NativeModel

    native = NativeModel(load_library(), model)
    try:
        return [native.tokenize(prompt_text(i)) for i in range(n)]
    finally:
        native.close()


class CpuMeter:
    """How much of the machine *other* processes used while a run was timed.

    The box is shared: a neighbour's test run takes a core for seconds at a time. Recording its
    share next to every timing shows which numbers it touched.
    """

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._ncpu = os.cpu_count() or 1

    def _busy(self) -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields) - idle) / self._tick

    def start(self) -> tuple[float, float, float]:
        return time.perf_counter(), self._busy(), time.process_time()

    def other_share(self, mark: tuple[float, float, float]) -> float:
        wall = time.perf_counter() - mark[0]
        ours = time.process_time() - mark[2]
        other = self._busy() - mark[1] - ours
        return max(0.0, min(1.0, other / (wall * self._ncpu)))


# -- thread probe (a fresh subprocess per OpenMP wait policy) -------------------------------


def probe_threads(model: str, n_ctx: int, steps: int) -> dict[str, float]:
    """Raw 8-sequence decode speed at 1 and 2 threads, on the box as it is and with one core busy.

    The busy core is a spinning subprocess: what a neighbour, or the application's own Python
    threads, do to a 2-core machine.
    """
    raw = RawPath(model, 8, n_ctx, 1)
    prompts = [[100 + (p % 7) for p in range(20)] for _ in range(8)]
    out: dict[str, float] = {}
    for busy in (False, True):
        hog = None
        if busy:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.3)
        try:
            for n_threads in (1, 2):
                raw.lib.llama_set_n_threads(raw.ctx, n_threads, n_threads)
                raw.lib.llama_memory_clear(raw.memory, True)
                for seq, prompt in enumerate(prompts):
                    raw._decode([(tok, pos, seq, False) for pos, tok in enumerate(prompt)])
                t0 = time.perf_counter()
                done = 0
                # A stalled configuration takes seconds per step: stop after 8 s either way.
                while done < steps and time.perf_counter() - t0 < 8.0:
                    raw._decode([(200, 20 + done, seq, True) for seq in range(8)])
                    done += 1
                out[f"{n_threads}:{'busy' if busy else 'as is'}"] = (
                    8 * done / (time.perf_counter() - t0)
                )
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    raw.close()
    return out


# -- memory (a fresh subprocess per variant) ------------------------------------------------


def measure_memory(kind: str, model: str, n_ctx: int, n_threads: int) -> dict[str, float]:
    """Peak RSS (and final PSS) after loading 8 sequences and one short generation on each."""
    # Text, not token ids: tokenizing here would map the model once more and inflate the peak.
    prompt = prompt_text(0)
    keep: list[object] = []
    if kind == "seqlease":
        ctx = seqlease.Context(model, sequences=8, n_ctx=n_ctx, n_threads=n_threads)
        keep.append(ctx)
        leases = [ctx.acquire() for _ in range(8)]  # all 8 held at once: every sequence used
        for i, seq in enumerate(leases):
            seq.generate(prompt, max_tokens=8, temperature=TEMPERATURE, seed=i).result()
        keep.extend(leases)
    elif kind == "llama":
        for i in range(8):
            path = SerialPath(model, n_ctx, n_threads)
            keep.append(path)
            path.one(prompt, 8, seed=i)
    # "python": imports only, the floor both variants start from.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # RSS counts a file page once per mapping: 8 Llama objects map the same GGUF 8 times. PSS
    # splits shared pages between their mappings, so it shows what the machine really spends.
    pss_mb = float("nan")
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss_mb = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"peak_rss_mb": peak_mb, "pss_mb": pss_mb}


def run_child(args: argparse.Namespace, *extra: str, wait_policy: str | None = None) -> dict:
    """Run this script in a fresh process; ``wait_policy=None`` leaves OpenMP's default."""
    cmd = [sys.executable, __file__, "--model", args.model, "--n-ctx", str(args.n_ctx)]
    cmd += ["--threads", str(args.threads), *extra]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the throughput sweep -------------------------------------------------------------------


@dataclass
class Sweep:
    concurrency: list[int]
    seqlease: dict[int, list[Run]]
    raw: dict[int, list[Run]]
    serial: dict[int, list[Run]]
    other_load: list[float]

    def best(self, path: dict[int, list[Run]], c: int) -> Run:
        return max(path[c], key=lambda r: r.tok_s)

    def median(self, path: dict[int, list[Run]], c: int) -> float:
        return statistics.median(r.tok_s for r in path[c])


def repeats(args: argparse.Namespace, c: int) -> int:
    # A run of 1 or 2 callers lasts about a second, short enough for one burst from a
    # neighbour to decide it: those points get more runs, for about the same cost in tokens.
    return args.repeats * max(1, 4 // c)


def runs_text(args: argparse.Namespace) -> str:
    counts = {c: repeats(args, c) for c in args.concurrency}
    extra = [
        f"{n} for {c} caller{'s' if c > 1 else ''}" for c, n in counts.items() if n != args.repeats
    ]
    return f"{args.repeats} runs" + (f" ({', '.join(extra)})" if extra else "")


def sweep(args: argparse.Namespace, prompts: list[list[int]]) -> Sweep:
    top = max(args.concurrency)
    meter = CpuMeter()
    sl = SeqleasePath(args.model, top, args.n_ctx, args.threads)
    raw = RawPath(args.model, top, args.n_ctx, args.threads)
    serial = SerialPath(args.model, args.n_ctx, args.threads)
    result = Sweep(args.concurrency, {}, {}, {}, [])
    try:
        # Warm-up: page the weights in, let every path build its graphs once.
        sl.run(prompts[:2], 16)
        raw.run(prompts[:2], 16)
        serial.one(prompts[0], 16, seed=0)
        for rep in range(max(repeats(args, c) for c in args.concurrency)):
            active = [c for c in args.concurrency if rep < repeats(args, c)]
            for c in active:
                # Alternate which path goes first, so a neighbour's burst is not always
                # billed to the same one.
                order = [("seqlease", sl), ("raw", raw)]
                for name, path in order if rep % 2 == 0 else order[::-1]:
                    mark = meter.start()
                    run = path.run(prompts[:c], args.tokens)
                    load = meter.other_share(mark)
                    result.other_load.append(load)
                    getattr(result, name).setdefault(c, []).append(run)
                    print(
                        f"  run {rep + 1} c={c:2} {name:8} {run.tok_s:6.1f} tok/s "
                        f"({sum(run.generated)} tokens, {run.seconds:5.2f} s, "
                        f"neighbours {load:4.0%})",
                        flush=True,
                    )
            # Serial: each request timed alone; concurrency c is then the first c of them run
            # back to back, the same requests the other paths got.
            times: list[float] = []
            counts: list[int] = []
            mark = meter.start()
            for i in range(max(active)):
                seconds, n = serial.one(prompts[i], args.tokens, seed=i)
                times.append(seconds)
                counts.append(n)
            result.other_load.append(meter.other_share(mark))
            for c in active:
                result.serial.setdefault(c, []).append(Run(sum(times[:c]), counts[:c]))
            print(
                f"  run {rep + 1} serial   {sum(counts) / sum(times):6.1f} tok/s "
                f"({sum(counts)} tokens over {len(counts)} requests)",
                flush=True,
            )
    finally:
        serial.close()
        raw.close()
        sl.close()
    return result


# -- report ---------------------------------------------------------------------------------

TARGETS = (
    # (what, the path seqlease is compared with, callers, goal for seqlease's tok/s ratio)
    ("seqlease / raw ctypes batch at 8 callers", "raw", 8, 0.9),
    ("seqlease / serial Llama at 8 callers", "serial", 8, 1.8),
    ("1 seqlease caller / 1 Llama.create_completion", "serial", 1, 0.95),
)


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
        with open("/proc/meminfo") as f:
            ram = f"{int(f.readline().split()[1]) / 1024**2:.0f} GiB"
    except OSError:
        ram = "?"
    return {
        "cpu": f"{os.cpu_count()} cores, {cpu}",
        "ram": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "llama-cpp-python": metadata.version("llama-cpp-python"),
        "seqlease": seqlease.__version__,
    }


def table_rows(s: Sweep, tokens: int) -> list[list[str]]:
    rows = []
    for c in s.concurrency:
        a, r, z = s.best(s.seqlease, c), s.best(s.raw, c), s.best(s.serial, c)
        med = s.median(s.seqlease, c) / s.median(s.raw, c)
        med_serial = s.median(s.seqlease, c) / s.median(s.serial, c)
        short = [
            name
            for name, path in (("seqlease", s.seqlease), ("raw", s.raw), ("serial", s.serial))
            if any(n != tokens for run in path[c] for n in run.generated)
        ]
        rows.append(
            [
                str(c),
                f"{a.tok_s:.1f}",
                f"{r.tok_s:.1f}",
                f"{z.tok_s:.1f}",
                f"{a.tok_s / r.tok_s:.2f}x",
                f"{med:.2f}x",
                f"{a.tok_s / z.tok_s:.2f}x",
                f"{med_serial:.2f}x",
                "all" if not short else "short: " + ", ".join(short),
            ]
        )
    return rows


HEADER = [
    "callers",
    "seqlease tok/s",
    "raw batch tok/s",
    "serial Llama tok/s",
    "seqlease / raw",
    "(median runs)",
    "seqlease / serial",
    "(median runs)",
    "reached max_tokens",
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(s: Sweep, against: str, c: int) -> float | None:
    if c not in s.concurrency:
        return None
    return s.best(s.seqlease, c).tok_s / s.best(getattr(s, against), c).tok_s


def interpretation(s: Sweep, probe: dict, memory: dict, args: argparse.Namespace) -> list[str]:
    notes = []
    lo, hi = min(s.concurrency), max(s.concurrency)
    gain = s.best(s.raw, hi).tok_s / s.best(s.raw, lo).tok_s
    notes.append(
        f"llama.cpp itself gains {gain:.2f}x from decoding {hi} sequences per step instead of "
        f"{lo} on this machine (raw column), where llama-facts lists 2x (180 -> 360 tok/s from "
        "1 to 16 sequences, conditions not recorded). That gain is the ceiling for any library "
        "on top: seqlease / serial can exceed it only by what Llama.create_completion loses "
        "per token."
    )
    vs_raw = ratio(s, "raw", 8)
    if vs_raw is not None and vs_raw < 0.9:
        notes.append(
            f"seqlease reaches {vs_raw:.2f}x of the raw loop at 8 callers: target missed. It "
            "runs the same decode and the same native sampler chain, and when this benchmark "
            "was written its own Python work per token (batch building, sampling call, text "
            "assembly, queue hand-off) was under 1% of the engine thread's time. The gap was "
            "the row order of its batches: with one KV stream per sequence (llama.cpp's "
            "default, `kv_unified=False`) llama.cpp cuts a batch into separate forward passes "
            "wherever the sequence ids, in row order, stop being consecutive and increasing. "
            "The raw loop sends ids 0..N-1 in order, one pass per step; seqlease 0.1.0 orders "
            "rows by arrival and rotates them every step, and its pool hands ids out first in, "
            "first out, so a step ran as several passes: 1.9 to 3.7 on average over a run at 8 "
            "callers and 2.5 to 5.6 at 16, depending on the order the callers arrived in. Sorting "
            "each step's rows by sequence id brought it to 0.95x (8 callers) and 1.01x (16) of "
            "raw in a side experiment."
        )
    vs_serial = ratio(s, "serial", 8)
    if vs_serial is not None and vs_serial < 1.8:
        raw8 = s.best(s.raw, 8).tok_s / s.best(s.serial, 8).tok_s
        why = (
            "the target is out of reach on this machine, where batching gains so little"
            if raw8 < 1.8
            else "the shortfall is seqlease's own"
        )
        notes.append(
            f"seqlease / serial at 8 callers is {vs_serial:.2f}x: the 1.8x target is missed. "
            f"The raw batch loop itself reaches {raw8:.2f}x over serial, so {why}."
        )
    one = ratio(s, "serial", 1)
    if one is not None:
        verdict = "meets" if one >= 0.95 else "misses"
        notes.append(
            f"One caller: seqlease runs at {one:.2f}x of Llama.create_completion ({verdict} the "
            "0.95x target)."
        )
    seq_mem, llama_mem = memory["seqlease"], memory["llama"]
    times = llama_mem["peak_rss_mb"] / seq_mem["peak_rss_mb"]
    notes.append(
        f"Memory for 8 sequences of {args.n_ctx} tokens: one Context peaks at "
        f"{seq_mem['peak_rss_mb']:.0f} MB RSS, 8 Llama objects at "
        f"{llama_mem['peak_rss_mb']:.0f} MB ({times:.1f}x). "
        "RSS counts the memory-mapped GGUF once per Llama, although the 8 mappings share "
        "physical pages; PSS counts those once and still gives "
        f"{seq_mem['pss_mb']:.0f} MB against {llama_mem['pss_mb']:.0f} MB: each Llama has its "
        "own compute buffers and context."
    )
    default, passive = probe["default"], probe["passive"]
    notes.append(
        f"Threads: {args.threads} for every path, OpenMP wait policy "
        f"{os.environ['OMP_WAIT_POLICY']}. With one core taken by a spinning process, 2 "
        f"threads decoded {default.get('2:busy', 0.0):.1f} tok/s with OpenMP's default policy "
        f"and {passive.get('2:busy', 0.0):.1f} with PASSIVE (quiet machine: "
        f"{default.get('2:as is', 0.0):.1f} and {passive.get('2:as is', 0.0):.1f}). The "
        "default policy spins at every barrier of the forward pass; earlier runs of this probe "
        "saw it collapse to about 40 tok/s, with single steps stalled for 2 to 3 seconds, "
        "where PASSIVE stayed above 100. The probe is short, so single runs vary."
    )
    loads = s.other_load
    notes.append(
        f"Noise: other processes used {statistics.median(loads):.0%} of the machine during "
        f"the median timed run (max {max(loads):.0%}). The table takes the best of "
        f"{runs_text(args)}, interleaved across paths; the median-run ratio beside it shows "
        "how much that choice matters."
    )
    return notes


def plot(s: Sweep, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, runs, style in (
        ("seqlease", s.seqlease, "o-"),
        ("raw ctypes batch", s.raw, "s--"),
        ("serial Llama.create_completion", s.serial, "^:"),
    ):
        ax.plot(s.concurrency, [s.best(runs, c).tok_s for c in s.concurrency], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(s.concurrency, [str(c) for c in s.concurrency])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("generated tokens / s (all callers)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_markdown(
    args: argparse.Namespace,
    s: Sweep,
    probe: dict,
    memory: dict,
    rows: list[list[str]],
    command: str,
    prompts: list[list[int]],
) -> str:
    m = machine()
    model = Path(args.model)
    lengths = sorted(len(p) for p in prompts[: max(s.concurrency)])
    targets = []
    for label, against, c, goal in TARGETS:
        got = ratio(s, against, c)
        if got is not None:
            verdict = "met" if got >= goal else "**missed**"
            targets.append([label, f">= {goal}x", f"{got:.2f}x", verdict])
    probe_rows = [
        [
            f"{n} thread{'s' if n > 1 else ''}",
            policy,
            f"{probe[key].get(f'{n}:as is', 0.0):.1f}",
            f"{probe[key].get(f'{n}:busy', 0.0):.1f}",
        ]
        for key, policy in (("default", "default"), ("passive", "OMP_WAIT_POLICY=PASSIVE"))
        for n in (1, 2)
    ]
    mem_rows = [
        [name, f"{memory[key]['peak_rss_mb']:.0f}", f"{memory[key]['pss_mb']:.0f}"]
        for key, name in (
            ("python", "Python + llama_cpp imported, nothing loaded"),
            ("seqlease", f"seqlease.Context(sequences=8, n_ctx={args.n_ctx})"),
            ("llama", f"8 x llama_cpp.Llama(n_ctx={args.n_ctx})"),
        )
    ]
    text = f"""# Benchmarks

## Throughput and memory against llama-cpp-python

Generated by `{command}` on {datetime.date.today().isoformat()} (rerun it to refresh this
section; it rewrites this file and `throughput.png`).

- Machine: {m["cpu"]}, {m["ram"]} RAM, {m["os"]}, Python {m["python"]}; shared with other
  processes (see the note on noise below).
- llama-cpp-python {m["llama-cpp-python"]}, seqlease {m["seqlease"]}.
- Model: `{model.name}` ({model.stat().st_size / 1e6:.0f} MB).
- Every path: `n_ctx={args.n_ctx}` per sequence, `n_batch={N_BATCH}`, `n_threads={args.threads}`,
  `OMP_WAIT_POLICY={os.environ["OMP_WAIT_POLICY"]}`,
  top-k {TOP_K}, temperature {TEMPERATURE}, top-p 1, min-p 0, no repeat penalty, seed = request
  index; `max_tokens={args.tokens}`; prompts are {len(lengths)} chat-formatted requests for a long
  story, {lengths[0]} to {lengths[-1]} tokens, passed to every path as the same token ids.
- seqlease: one `Context(sequences={max(s.concurrency)})`, N threads each doing
  `with ctx.lease() as seq: seq.generate(...).result()`.
- raw: ctypes on `llama_cpp.llama_cpp`, the same context parameters, one `llama_decode` per
  step with one token per sequence (sequence ids 0..N-1 in order), a sampler chain per sequence
  sampled by batch row.
- serial: one `Llama`, the same N requests one after another through `create_completion`.
- tok/s = generated tokens of all N requests / wall time from the first request to the last
  reply; best of {runs_text(args)}, interleaved across paths, after a warm-up.

![throughput against concurrency](throughput.png)

{markdown_table(HEADER, rows)}

{markdown_table(["target", "goal", "measured", ""], targets)}

### Memory: 8 sequences

Each measured in a fresh process after loading and one 8-token generation per sequence.

{markdown_table(["what", "peak RSS MB", "PSS MB at the end"], mem_rows)}

### Threads

Raw 8-sequence decode, tok/s, measured in fresh processes at the start of the run; "one core
busy" runs a spinning process beside it.

{markdown_table(["llama.cpp threads", "OpenMP wait policy", "as is", "one core busy"], probe_rows)}

### Interpretation

"""
    text += "\n".join(f"- {note}" for note in interpretation(s, probe, memory, args)) + "\n"
    return text


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="GGUF path (default: the embedded model)")
    parser.add_argument("--tokens", type=int, default=None, help="max_tokens per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp threads for every path (default: all cores)",
    )
    parser.add_argument("--n-ctx", type=int, default=512, help="context per sequence")
    parser.add_argument("--quick", action="store_true", help="shorter run (about 2 minutes)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no docs")
    parser.add_argument(
        "--_memory", choices=["python", "seqlease", "llama"], help=argparse.SUPPRESS
    )
    parser.add_argument("--_probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = str(args.model or seqlease.default_model_path())

    # Hidden modes: this script run again in a fresh process, answering one JSON line.
    if args._memory:
        load_library()  # llama.cpp's log goes to logging (silent), not to our stdout
        print(json.dumps(measure_memory(args._memory, args.model, args.n_ctx, args.threads)))
        return
    if args._probe:
        print(json.dumps(probe_threads(args.model, args.n_ctx, args._probe)))
        return

    args.tokens = args.tokens or (32 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 4)
    args.concurrency = sorted(set(args.concurrency))
    command = " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]])
    started = time.perf_counter()
    print(
        f"model {args.model}\nthreads {args.threads} "
        f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
        f"n_ctx {args.n_ctx}, {args.tokens} tokens"
    )

    # Memory first: Linux carries a process's peak RSS over into the program it execs, so a
    # child started after this process has loaded three models would report our peak, not its.
    print("memory ...", flush=True)
    policy = os.environ["OMP_WAIT_POLICY"]
    memory = {
        kind: run_child(args, "--_memory", kind, wait_policy=policy)
        for kind in ("python", "seqlease", "llama")
    }
    print(f"  {memory}")

    print("thread probe ...", flush=True)
    steps = "6" if args.quick else "12"
    probe = {
        "default": run_child(args, "--_probe", steps),
        "passive": run_child(args, "--_probe", steps, wait_policy="PASSIVE"),
    }
    print(f"  {probe}")

    prompts = tokenize_prompts(args.model, max(args.concurrency))
    if max(len(p) for p in prompts) + args.tokens > args.n_ctx:
        parser.error(f"--n-ctx {args.n_ctx} is too small for the prompts + {args.tokens} tokens")
    print("throughput ...", flush=True)
    s = sweep(args, prompts)

    rows = table_rows(s, args.tokens)
    print()
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    print("  ".join(h.rjust(w) for h, w in zip(HEADER, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    for note in interpretation(s, probe, memory, args):
        print(f"- {note}")
    if not args.no_write:
        DOCS.mkdir(exist_ok=True)
        title = f"{Path(args.model).name}, {args.threads} thread(s), {args.tokens} tokens/request"
        plot(s, DOCS / "throughput.png", title)
        md = write_markdown(args, s, probe, memory, rows, command, prompts)
        (DOCS / "benchmarks.md").write_text(md)
        print(f"wrote {DOCS / 'benchmarks.md'} and {DOCS / 'throughput.png'}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
