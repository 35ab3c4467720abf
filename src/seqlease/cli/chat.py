"""``seqlease chat``: talk to the model in the terminal, one leased sequence per conversation.

The conversation lives in a :class:`~seqlease.ChatSession` on one leased sequence, so each turn
evaluates only its new tokens. ``/reset`` ends the lease (the sequence is cleared and given
back) and starts a new conversation on a fresh lease; ``/stats`` shows the pool and the last
reply's numbers; ``/quit``, end of input (Ctrl-D) or Ctrl-C at the prompt exit, releasing the
lease. Ctrl-C while a reply streams stops that reply only.

Input is read from stdin line by line, so the command also runs with piped input. The llama.cpp
options (``--n-ctx``, ``--n-gpu-layers``, ``--flash-attn``, ``--cache-type-k/v``...) reach
llama.cpp as given; the dim ``llama.cpp:`` line at the start shows what it was given once every
"auto" is settled.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Literal, TextIO

from seqlease.cli.common import (
    Style,
    add_context_options,
    color_enabled,
    describe_llama,
    non_negative_float,
    open_context,
    positive_int,
)

if TYPE_CHECKING:
    from seqlease.chat.session import ChatSession
    from seqlease.context import Context

__all__ = ["HELP", "NAME", "register"]

NAME = "chat"
HELP = "chat with the model in the terminal (one leased sequence per conversation)"

_DEFAULT_SYSTEM = "You are a helpful, concise assistant."

_COMMAND_HELP = (
    "/reset  end this conversation (release its sequence) and start a new one",
    "/stats  pool counters, this sequence's memory and the last reply's numbers",
    "/help   this list",
    "/quit   leave (also /exit, Ctrl-D, or Ctrl-C at the prompt)",
)

Action = Literal["reset", "quit"]


def register(parser: argparse.ArgumentParser) -> None:
    """Add chat's arguments to its subparser."""
    parser.add_argument(
        "--system",
        default=_DEFAULT_SYSTEM,
        metavar="TEXT",
        help=f"system prompt (default: {_DEFAULT_SYSTEM!r}; '' for none)",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=256,
        metavar="N",
        help="longest reply, in tokens (default: 256)",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.6,
        metavar="T",
        help="sampling temperature, 0 for greedy (default: 0.6)",
    )
    add_context_options(parser, sequences=1, sequences_help="a conversation uses one")
    parser.set_defaults(handler=_handle)


class _Repl:
    """The read-reply loop over one Context; one lease per conversation."""

    def __init__(self, ctx: Context, args: argparse.Namespace, style: Style, out: TextIO) -> None:
        self.ctx = ctx
        self.args = args
        self.style = style
        self.out = out
        interactive = sys.stdin.isatty()
        # Piped input is not echoed by a terminal: echo it so the transcript reads as a dialogue.
        self.echo = not interactive
        self.conversation = 0
        self.prompt = style.bold("you> ")
        if interactive:
            try:
                import readline  # noqa: F401  (importing it gives input() editing and history)
            except ImportError:  # not on every platform; plain input() still works
                pass
            else:
                if style.enabled:
                    # readline counts every prompt character as a column unless the invisible
                    # escape sequences are bracketed by \001 and \002.
                    self.prompt = "\001\x1b[1m\002you> \001\x1b[0m\002"

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> int:
        import seqlease

        while True:
            self.conversation += 1
            try:
                # timeout=0: this command is the pool's only user, so a busy pool is a bug
                # worth reporting at once, not something to wait for.
                with self.ctx.lease(timeout=0) as seq:
                    chat = seqlease.ChatSession(seq, system_prompt=self.args.system or None)
                    self.say(
                        self.style.dim(f"[conversation {self.conversation} on sequence {seq.id}]")
                    )
                    action = self.converse(chat)
            except seqlease.SeqleaseError as exc:
                self.say(self.style.bad(f"error: {type(exc).__name__}: {exc}"))
                return 1
            if action == "quit":
                self.say(self.style.dim(f"[sequence {seq.id} released; bye]"))
                return 0
            self.say(self.style.dim(f"[sequence {seq.id} released; starting over]"))

    def read(self) -> str | None:
        """One line from the user; ``None`` at end of input or Ctrl-C."""
        try:
            line = input(self.prompt)
        except (EOFError, KeyboardInterrupt):
            self.say()
            return None
        if self.echo:
            self.say(line)
        return line

    def converse(self, chat: ChatSession) -> Action:
        while True:
            line = self.read()
            if line is None:
                return "quit"
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command = text.split()[0].lower()
                if command in ("/quit", "/exit"):
                    return "quit"
                if command == "/reset":
                    return "reset"
                if command == "/stats":
                    self.stats(chat)
                elif command == "/help":
                    self.say("\n".join(_COMMAND_HELP))
                else:
                    self.say(self.style.warn(f"unknown command {command}; /help lists them"))
                continue
            self.reply(chat, text)

    def reply(self, chat: ChatSession, text: str) -> None:
        import seqlease

        self.out.write(self.style.bold("bot> "))
        self.out.flush()
        started = False
        try:
            for chunk in chat.stream(
                text, max_tokens=self.args.max_tokens, temperature=self.args.temperature
            ):
                if not started:
                    # The template leaves a blank before the reply: start flush with "bot> ".
                    chunk = chunk.lstrip()
                    started = bool(chunk)
                self.out.write(chunk)
                self.out.flush()
        except KeyboardInterrupt:
            # Leaving the stream cancels the generation; the turn is not kept in the history.
            self.say(self.style.warn(" [interrupted]"))
            return
        except seqlease.ContextOverflowError as exc:
            self.say()
            self.say(self.style.warn(f"{exc}\n/reset starts a new, empty conversation"))
            return
        except seqlease.SeqleaseError as exc:
            self.say()
            self.say(self.style.bad(f"error: {type(exc).__name__}: {exc}"))
            return
        self.say()
        result = chat.last_result
        if result is not None and result.finish_reason == "length":
            self.say(self.style.dim(f"[cut at --max-tokens {self.args.max_tokens}]"))

    def stats(self, chat: ChatSession) -> None:
        import seqlease

        s = self.ctx.stats()
        seq = chat.sequence
        try:
            memory = f"{seq.n_tokens} tokens in memory of {self.ctx.n_ctx}"
            if self.ctx.backend.name == "completion":
                memory += " (this backend keeps no memory per sequence: each turn re-sends all)"
        except seqlease.SeqleaseError as exc:
            memory = f"memory unknown ({exc})"
        turns = sum(m["role"] == "user" for m in chat.history)
        rows = [
            ("backend", f"{self.ctx.backend.name}"),
            (
                "pool",
                f"size {s.size} · leased {s.leased} · free {s.free} · acquires {s.acquires} "
                f"· releases {s.releases} · leaked {s.leaked}",
            ),
            ("sequence", f"{seq.id}: {memory}"),
            ("conversation", f"#{self.conversation}, {turns} turn{'' if turns == 1 else 's'}"),
        ]
        r = chat.last_result
        if r is not None:
            rows.append(
                (
                    "last reply",
                    f"{r.n_prompt} prompt tokens ({r.n_evaluated} evaluated) · "
                    f"{r.n_generated} generated · {r.seconds:.2f} s · finished by "
                    f"{r.finish_reason}",
                )
            )
        else:
            rows.append(("last reply", "none yet"))
        for label, value in rows:
            self.say(f"{self.style.dim(label.ljust(13))}{value}")


def _handle(args: argparse.Namespace) -> int:
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        # Model text can hold characters the terminal's encoding lacks: never crash on them.
        out.reconfigure(errors="replace")
    style = Style(color_enabled(out, no_color=args.no_color))
    ctx = open_context(args, style=style, out=out)
    if ctx is None:
        return 1
    try:
        with ctx:
            print(
                style.dim(
                    f"seqlease chat · {ctx.backend.name} backend · {ctx.model_path}\n"
                    f"llama.cpp: {describe_llama(ctx)}\n"
                    "/help lists commands; /quit or Ctrl-D leaves"
                ),
                file=out,
                flush=True,
            )
            status = _Repl(ctx, args, style, out).run()
            leased = ctx.stats().leased
    except KeyboardInterrupt:
        # A Ctrl-C outside a read or a reply (say, while printing): still a clean exit, and
        # leaving the `with` blocks above has released the lease and closed the context.
        print(file=out, flush=True)
        return 130
    if leased:
        print(style.bad(f"{leased} sequence(s) still leased at exit"), file=out, flush=True)
        return 1
    return status
