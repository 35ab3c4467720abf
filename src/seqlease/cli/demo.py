"""``seqlease demo``: the app seqlease was founded on, replayed against a real model.

A desktop app had a "Random" button that asked a local model for a short story, building an
ephemeral chat session per click on a context of 2 sequences. The first click worked; the
second failed because the sessions leaked their sequences. This command clicks that button
again and again from several threads -- single clicks, double clicks that race for the pool,
and an impatient click that gets "busy, try again" while both sequences are in use -- streams
every reply to the terminal, and ends by proving from the pool's own counters that no sequence
leaked.

The pool has the app's 2 sequences unless ``--sequences`` says otherwise; the llama.cpp options
(``--n-ctx``, ``--n-gpu-layers``, ``--flash-attn``, ``--cache-type-k/v``...) reach llama.cpp as
given, and the line headed ``llama.cpp`` shows what it was given once every "auto" is settled.

Exit status 0 when every lease came back and nothing unexpected failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TextIO

from seqlease.cli.common import (
    Style,
    add_context_options,
    color_enabled,
    describe_llama,
    open_context,
    positive_int,
)

if TYPE_CHECKING:
    from seqlease.context import Context
    from seqlease.pool.stats import PoolStats
    from seqlease.request.job import Result

__all__ = [
    "HELP",
    "NAME",
    "Click",
    "Display",
    "Step",
    "Style",
    "color_enabled",
    "open_context",
    "plan_clicks",
    "register",
]

NAME = "demo"
HELP = (
    "replay the 'Random' button app: clicks racing for 2 sequences (--sequences), then prove "
    "none leaked"
)

SYSTEM_PROMPT = "You are a storyteller. Answer with a two-sentence story and nothing else."

TOPICS = (
    "a lighthouse keeper",
    "a lost umbrella",
    "a robot learning to bake",
    "the last train of the night",
    "a cat who owns a bookshop",
    "a message in a bottle",
    "a village without clocks",
    "a dragon afraid of heights",
    "an astronaut's houseplant",
    "a map that redraws itself",
    "the quietest orchestra",
    "a snowman in July",
    "a detective who is a dog",
    "a library after midnight",
    "a kite that would not come down",
    "the first rain on Mars",
    "a haunted vending machine",
    "a bridge built by ants",
    "a pirate who hates the sea",
    "a forgotten birthday",
)

#: How long a plain click waits for a sequence: like a UI spinner, it is patient.
SINGLE_TIMEOUT = 30.0
#: How long each half of a double click waits: a second request is cheap to drop.
DOUBLE_TIMEOUT = 3.0
#: The longest the demo waits for both sequences to be busy before the impatient click.
_SATURATE_WAIT = 15.0

ClickKind = Literal["single", "double", "no-wait"]


def register(parser: argparse.ArgumentParser) -> None:
    """Add demo's arguments to its subparser."""
    parser.add_argument(
        "--clicks",
        type=positive_int,
        default=8,
        metavar="N",
        help="how many times the 'Random' button is clicked (default: 8)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="seed for the click schedule, topics and sampling (default: random, printed)",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=48,
        metavar="N",
        help="longest reply per click, in tokens (default: 48)",
    )
    add_context_options(parser, sequences=2, sequences_help="the app's pool")
    parser.set_defaults(handler=_handle)


# -- the click plan -------------------------------------------------------------------------


@dataclass
class Click:
    """One press of the "Random" button and what came of it."""

    #: 1-based click number, in the order the clicks are fired.
    number: int
    #: "single", one half of a "double" click, or an impatient "no-wait" click (timeout=0).
    kind: ClickKind
    #: What the story should be about.
    topic: str
    #: How long the click waits for a sequence (0: answer "busy" at once).
    timeout: float
    #: Sampling seed, so ``--seed`` replays the same stories.
    seed: int
    #: The sequence it got, ``None`` when busy or failed before leasing.
    seq_id: int | None = None
    #: Seconds from the click to the lease (or to giving up).
    wait: float | None = None
    #: The generation's numbers, when it completed.
    result: Result | None = None
    #: Characters of reply text received.
    chars: int = 0
    #: Whether the pool answered "busy, try again" (``PoolExhausted``).
    busy: bool = False
    #: An unexpected error, as ``Type: message``.
    error: str | None = None
    #: Reply text streamed but not yet printed.
    pending: str = field(default="", repr=False)

    @property
    def prompt(self) -> str:
        """The user turn sent to the model."""
        return f"Write a two-sentence story about {self.topic}."


@dataclass
class Step:
    """Clicks fired together, and what the user waits for before firing them."""

    clicks: list[Click]
    #: Seconds to pause before firing (the user's hand moving to the button).
    gap: float = 0.0
    #: Wait for every earlier click to finish first.
    after_idle: bool = False
    #: Wait until the pool is full, or every running click holds a sequence (to show "busy").
    when_full: bool = False


def plan_clicks(n: int, rng: random.Random) -> list[Step]:
    """The click schedule for ``n`` clicks.

    Four clicks or more open with the founding story's script: one click on its own (it always
    worked), then a double click racing for the pool, then an impatient ``timeout=0`` click
    while the double click holds its sequences (on the app's 2 sequences: the whole pool). The
    rest are single and double clicks at random moments, fired without waiting for earlier
    replies.
    """
    clicks: list[Click] = []

    def click(kind: ClickKind, timeout: float) -> Click:
        made = Click(len(clicks) + 1, kind, rng.choice(TOPICS), timeout, rng.randrange(1 << 30))
        clicks.append(made)
        return made

    steps: list[Step] = []
    left = n
    if left >= 4:
        steps.append(Step([click("single", SINGLE_TIMEOUT)]))
        left -= 1
    if left >= 2:
        steps.append(
            Step(
                [click("double", DOUBLE_TIMEOUT), click("double", DOUBLE_TIMEOUT)], after_idle=True
            )
        )
        left -= 2
        if left >= 1:
            steps.append(Step([click("no-wait", 0.0)], when_full=True))
            left -= 1
    while left > 0:
        gap = rng.uniform(0.3, 1.2)
        if left >= 2 and rng.random() < 0.35:
            pair = [click("double", DOUBLE_TIMEOUT), click("double", DOUBLE_TIMEOUT)]
            steps.append(Step(pair, gap=gap))
            left -= 2
        else:
            steps.append(Step([click("single", SINGLE_TIMEOUT)], gap=gap))
            left -= 1
    return steps


# -- output ---------------------------------------------------------------------------------

_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class Display:
    """Thread-safe terminal output for clicks streaming at the same time.

    Reply text is buffered per click and printed as whole lines prefixed with the click's
    label, so concurrent replies never interleave mid-line. On a terminal, a live area under
    the printed lines shows each running click with a spinner and its unfinished line.
    """

    def __init__(self, out: TextIO, style: Style, *, live: bool) -> None:
        """Write to ``out``; redraw a live area when ``live`` (``out`` must be a terminal)."""
        self._out = out
        self._style = style
        self._live = live
        self._lock = threading.Lock()
        self._clicks: list[Click] = []
        self._drawn = 0  # lines in the live area currently on screen
        self._frame = 0
        self._started: dict[int, float] = {}
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        columns = shutil.get_terminal_size((100, 24)).columns
        self._columns = max(40, columns)

    def start(self) -> None:
        """Start redrawing the live area (when live)."""
        if self._live:
            self._ticker = threading.Thread(target=self._tick, name="demo-display", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        """Stop redrawing and remove the live area."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._erase()
            self._out.flush()

    def label(self, click: Click) -> str:
        """``[click 3 · seq 1]`` in the click's colour."""
        where = f" · seq {click.seq_id}" if click.seq_id is not None else ""
        return self._style.cycle(f"[click {click.number}{where}]", click.number - 1)

    def line(self, text: str) -> None:
        """Print one line above the live area."""
        self._print([text])

    def begin(self, click: Click) -> None:
        """A click was fired."""
        with self._lock:
            self._clicks.append(click)
            self._started[click.number] = time.monotonic()
        how = {
            "single": f"waits up to {click.timeout:g} s",
            "double": f"double click, waits up to {click.timeout:g} s",
            "no-wait": "impatient: timeout=0, does not wait for a sequence",
        }[click.kind]
        self._print([f"{self.label(click)} {self._style.dim(f'clicked: {click.topic} ({how})')}"])

    def leased(self, click: Click) -> None:
        """A click got its sequence."""
        assert click.wait is not None
        note = f"got sequence {click.seq_id} after {click.wait * 1000:.0f} ms"
        self._print([f"{self.label(click)} {self._style.dim(note)}"])

    def chunk(self, click: Click, text: str) -> None:
        """Stream reply text; complete lines are printed, the rest waits in the buffer."""
        width = self._text_width(click)
        ready: list[str] = []
        with self._lock:
            click.chars += len(text)
            buffer = click.pending + text.replace("\r", "")
            while True:
                buffer = buffer.lstrip(" \n")  # a line never starts with blanks
                if "\n" in buffer[: width + 1]:
                    head, buffer = buffer.split("\n", 1)
                elif len(buffer) > width:
                    cut = buffer.rfind(" ", 0, width + 1)
                    cut = cut if cut > 0 else width
                    head, buffer = buffer[:cut], buffer[cut:]
                else:
                    break
                if head.strip():
                    ready.append(f"{self.label(click)} {head.rstrip()}")
            click.pending = buffer
        if ready:
            self._print(ready)

    def finish(self, click: Click, summary: str, *, tone: Callable[[str], str]) -> None:
        """A click ended: flush its last line, then print ``summary``."""
        with self._lock:
            rest = click.pending.strip()
            click.pending = ""
            if click in self._clicks:
                self._clicks.remove(click)
        lines = [f"{self.label(click)} {rest}"] if rest else []
        lines.append(f"{self.label(click)} {tone(summary)}")
        self._print(lines)

    def _text_width(self, click: Click) -> int:
        # Room for reply text after "<spinner> [click N · seq M] ", leaving the last column
        # free: a line that exactly fills the row wraps on some terminals.
        return self._columns - len(f"x [click {click.number} · seq {click.seq_id}] ") - 1

    def _print(self, lines: Sequence[str]) -> None:
        with self._lock:
            self._erase()
            for text in lines:
                self._out.write(text + "\n")
            self._draw()
            self._out.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.08):
            with self._lock:
                self._frame += 1
                self._erase()
                self._draw()
                self._out.flush()

    def _erase(self) -> None:
        # Cursor to the first line of the live area, then clear to the end of the screen.
        if self._drawn:
            self._out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        if not self._live or self._stop.is_set():
            return
        spin = _SPINNER[self._frame % len(_SPINNER)]
        now = time.monotonic()
        for click in self._clicks:
            if click.seq_id is None:
                waited = now - self._started.get(click.number, now)
                tail = self._style.dim(f"waiting for a sequence... {waited:.1f} s")
            elif not click.chars:
                tail = self._style.dim("reading the prompt...")
            else:
                # Lines are committed at this width, so the unfinished one always fits.
                tail = _fit(click.pending.replace("\n", " "), self._text_width(click))
            # Never let a live line wrap: the erase above counts one screen row per line.
            self._out.write(f"{self._style.dim(spin)} {self.label(click)} {tail}\x1b[K\n")
            self._drawn += 1


def _fit(text: str, columns: int) -> str:
    """The head of ``text`` that fits in ``columns`` terminal cells (wide characters take 2)."""
    used = 0
    for i, char in enumerate(text):
        used += 2 if unicodedata.east_asian_width(char) in "WF" else 1
        if used > columns:
            return text[:i]
    return text


# -- running the clicks ---------------------------------------------------------------------


class _Runner:
    """Fires the planned clicks at one Context and records what each one got."""

    def __init__(self, ctx: Context, display: Display, style: Style, *, max_tokens: int) -> None:
        self.ctx = ctx
        self.display = display
        self.style = style
        self.max_tokens = max_tokens
        self.stop = threading.Event()  # set on Ctrl-C: streams end at their next chunk
        self.fired: list[Click] = []
        self._threads: list[threading.Thread] = []
        self._done: list[threading.Event] = []
        self._barriers: list[threading.Barrier] = []

    def run(self, steps: list[Step]) -> None:
        """Fire every step's clicks on its own threads, then wait for all of them."""
        for step in steps:
            if step.after_idle:
                self.wait()
            elif step.when_full:
                self._wait_until_full()
            elif step.gap:
                self.stop.wait(step.gap)
            if self.stop.is_set():
                return
            # A double click is two threads released by one barrier: they hit the pool together.
            barrier = None
            if len(step.clicks) > 1:
                barrier = threading.Barrier(len(step.clicks))
                self._barriers.append(barrier)
            for click in step.clicks:
                done = threading.Event()
                thread = threading.Thread(
                    target=self._click, args=(click, barrier, done), name=f"click-{click.number}"
                )
                self.fired.append(click)
                self._threads.append(thread)
                self._done.append(done)
                self.display.begin(click)
                thread.start()
        self.wait()

    def interrupt(self) -> None:
        """Stop early (Ctrl-C): no new clicks, streams end at their next chunk."""
        self.stop.set()
        for barrier in self._barriers:
            barrier.abort()  # a double click whose second half never started must not hang

    def wait(self) -> None:
        """Wait until every fired click has finished, its lease included."""
        # Events, not Thread.join: on Python < 3.12 a join interrupted by Ctrl-C can leave
        # the thread looking finished, and the summary would then race the click's release.
        for done in self._done:
            while not done.wait(0.1):
                pass
        for thread in self._threads:
            thread.join()

    def _wait_until_full(self) -> None:
        # A pool larger than the clicks in flight (--sequences 3 and up) never fills: then
        # wait until each of them holds its sequence, and the impatient click gets one too.
        deadline = time.monotonic() + _SATURATE_WAIT
        while time.monotonic() < deadline and not self.stop.is_set():
            stats = self.ctx.stats()
            running = sum(not done.is_set() for done in self._done)
            if stats.leased >= min(stats.size, running):
                return
            time.sleep(0.001)

    def _click(
        self, click: Click, barrier: threading.Barrier | None, done: threading.Event
    ) -> None:
        try:
            if barrier is not None:
                # Broken when Ctrl-C came before the other half started: click alone.
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait()
            self._lease_and_stream(click)
        finally:
            done.set()

    def _lease_and_stream(self, click: Click) -> None:
        import seqlease

        started = time.monotonic()
        try:
            # The whole point of seqlease: the session lives inside the lease, and the lease
            # gives the sequence back on every way out of this block.
            with self.ctx.lease(timeout=click.timeout) as seq:
                click.wait = time.monotonic() - started
                click.seq_id = seq.id
                self.display.leased(click)
                if not self.stop.is_set():
                    chat = seqlease.ChatSession(seq, system_prompt=SYSTEM_PROMPT)
                    for chunk in chat.stream(
                        click.prompt, max_tokens=self.max_tokens, seed=click.seed
                    ):
                        self.display.chunk(click, chunk)
                        if self.stop.is_set():
                            break  # closing the stream cancels the generation
                    click.result = chat.last_result
        except seqlease.PoolExhausted:
            click.wait = time.monotonic() - started
            click.busy = True
            why = (
                "every sequence is in use and this click does not wait"
                if click.timeout == 0
                else f"no sequence came free within {click.timeout:g} s"
            )
            self.display.finish(click, f"busy, try again ({why})", tone=self.style.warn)
            return
        except Exception as exc:  # a demo must report any failure, not die on one thread
            click.error = f"{type(exc).__name__}: {exc}"
            self.display.finish(click, f"failed: {click.error}", tone=self.style.bad)
            return
        result = click.result
        if result is None:
            summary = f"stopped; sequence {click.seq_id} released"
        else:
            summary = (
                f"{result.n_generated} tokens in {result.seconds:.2f} s "
                f"({result.finish_reason}); sequence {click.seq_id} released"
            )
        self.display.finish(click, summary, tone=self.style.dim)


# -- the summary ----------------------------------------------------------------------------


def _table(clicks: list[Click]) -> list[str]:
    header = (
        "click",
        "kind",
        "seq",
        "wait ms",
        "gen s",
        "prompt/eval",
        "gen tok",
        "chars",
        "finish",
    )
    rows: list[tuple[str, ...]] = [header]
    for c in clicks:
        r = c.result
        wait = f"{c.wait * 1000:.1f}" if c.wait is not None else "-"
        if c.busy:
            finish = "busy"
        elif c.error is not None:
            finish = "error"
        elif r is None:
            finish = "stopped"
        else:
            finish = r.finish_reason
        rows.append(
            (
                str(c.number),
                c.kind,
                str(c.seq_id) if c.seq_id is not None else "-",
                wait,
                f"{r.seconds:.2f}" if r else "-",
                f"{r.n_prompt}/{r.n_evaluated}" if r else "-",
                str(r.n_generated) if r else "-",
                str(c.chars) if c.seq_id is not None else "-",
                finish,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {1, 8}  # text columns read better left-aligned, numbers right-aligned
    return [
        "  ".join(
            v.ljust(w) if i in left else v.rjust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _settled_stats(ctx: Context, timeout: float = 2.0) -> PoolStats:
    # A slot is briefly "clearing" while its memory is cleared after release.
    deadline = time.monotonic() + timeout
    while True:
        stats = ctx.stats()
        if stats.clearing == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.005)


def _summary(
    ctx: Context, clicks: list[Click], args: argparse.Namespace, style: Style, elapsed: float
) -> tuple[list[str], bool]:
    stats = _settled_stats(ctx)
    caps = ctx.capabilities
    lines = ["", style.bold("summary"), *_table(clicks), ""]
    label = 10
    chosen = "auto-selected" if args.backend == "auto" else f"forced with --backend {args.backend}"
    lines.append(f"{'backend':<{label}}{ctx.backend.name} ({chosen})")
    lines.extend(f"{'why' if i == 0 else '':<{label}}{r}" for i, r in enumerate(caps.reasons))
    lines.append(f"{'binding':<{label}}llama-cpp-python {caps.binding_version or 'unknown'}")
    done = [c for c in clicks if c.result is not None]
    busy = [c for c in clicks if c.busy]
    errors = [c for c in clicks if c.error is not None]
    lines.append(
        f"{'clicks':<{label}}{len(clicks)} fired: {len(done)} answered, {len(busy)} busy, "
        f"{len(errors)} failed, in {elapsed:.1f} s"
    )
    lines.append(
        f"{'pool':<{label}}size {stats.size} · leased {stats.leased} · free {stats.free} · "
        f"acquires {stats.acquires} · releases {stats.releases} · timeouts {stats.timeouts} · "
        f"leaked {stats.leaked} · longest wait {stats.longest_wait * 1000:.0f} ms"
    )
    problems = []
    if stats.leased:
        problems.append(f"{stats.leased} still leased")
    if stats.free != stats.size:
        problems.append(f"only {stats.free} of {stats.size} free")
    if stats.acquires != stats.releases:
        problems.append(f"{stats.acquires} acquires but {stats.releases} releases")
    if stats.leaked:
        problems.append(f"{stats.leaked} reclaimed from dropped handles")
    if problems:
        verdict = style.bad("SEQUENCES LEAKED: " + "; ".join(problems))
    else:
        verdict = style.good(
            f"no sequence leaked: {stats.acquires} acquires = {stats.releases} releases, "
            f"{stats.free}/{stats.size} sequences free, 0 reclaimed"
        )
    lines.append(f"{'verdict':<{label}}{verdict}")
    for c in errors:
        lines.append(f"{'error':<{label}}" + style.bad(f"click {c.number}: {c.error}"))
    return lines, not problems and not errors


def _handle(args: argparse.Namespace) -> int:
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        # Model text can hold characters the terminal's encoding lacks: never crash on them.
        out.reconfigure(errors="replace")
    style = Style(color_enabled(out, no_color=args.no_color))
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    steps = plan_clicks(args.clicks, random.Random(seed))
    clicks = [c for step in steps for c in step.clicks]

    print(style.bold('seqlease demo: the "Random" button, replayed'), flush=True)
    ctx = open_context(args, style=style, out=out)
    if ctx is None:
        return 1
    with ctx:
        print(
            f"{'model':<10}{ctx.model_path}\n"
            f"{'llama.cpp':<10}{style.dim(describe_llama(ctx))}\n"
            f"{'clicks':<10}{len(clicks)}: each leases a sequence, streams a story of at most "
            f"{args.max_tokens} tokens, releases it · seed {seed}",
            flush=True,
        )
        print(flush=True)
        live = style.enabled and os.environ.get("TERM", "") != "dumb"
        display = Display(out, style, live=live)
        runner = _Runner(ctx, display, style, max_tokens=args.max_tokens)
        started = time.monotonic()
        interrupted = False
        display.start()
        try:
            runner.run(steps)
        except KeyboardInterrupt:
            interrupted = True
            runner.interrupt()
            runner.wait()
        finally:
            display.stop()
        lines, ok = _summary(ctx, runner.fired, args, style, time.monotonic() - started)
        print("\n".join(lines), flush=True)
    if interrupted:
        print(style.warn("interrupted"), flush=True)
        return 130
    return 0 if ok else 1
