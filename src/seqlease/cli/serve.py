"""``seqlease serve``: an OpenAI-compatible HTTP server on one Context (the ``web`` extra).

The model is loaded once; every request leases a sequence for as long as its reply runs, so
``--sequences`` requests decode together. Up to ``--max-waiting`` more wait for a sequence (at
most ``--queue-timeout`` seconds); beyond that a request is answered ``503`` with
``Retry-After`` at once. Ctrl-C (or SIGTERM) stops taking connections, lets running replies
finish for up to ``--shutdown-timeout`` seconds, then closes the Context.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys

from seqlease.cli.common import (
    Style,
    add_context_options,
    color_enabled,
    describe_llama,
    non_negative_float,
    non_negative_int,
    open_context,
    positive_int,
)

__all__ = ["HELP", "NAME", "register"]

NAME = "serve"
HELP = "serve the model over an OpenAI-compatible HTTP API (needs the web extra)"


def register(parser: argparse.ArgumentParser) -> None:
    """Add serve's arguments to its subparser."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--max-waiting",
        type=non_negative_int,
        default=64,
        metavar="N",
        help="requests that may wait for a sequence; more get 503 at once (default: 64)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=non_negative_float,
        default=60.0,
        metavar="S",
        help="longest wait for a sequence before a 503 (default: 60)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=non_negative_float,
        default=30.0,
        metavar="S",
        help="on Ctrl-C or SIGTERM, how long running replies may finish (default: 30)",
    )
    add_context_options(
        parser, sequences=4, sequences_help="requests decoded together", n_threads=None
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    style = Style(color_enabled(sys.stderr, no_color=args.no_color))
    try:
        import uvicorn

        from seqlease.server import create_app
        from seqlease.server.streaming import HalfCloseH11Protocol
    except ImportError as exc:
        print(style.bad(str(exc)), file=sys.stderr)
        return 2
    ctx = open_context(args, style=style, out=sys.stderr, max_waiting=args.max_waiting)
    if ctx is None:
        return 1
    print(f"llama.cpp: {describe_llama(ctx)}", file=sys.stderr, flush=True)
    app = create_app(ctx, queue_timeout=args.queue_timeout)
    config = uvicorn.Config(
        app,
        http=HalfCloseH11Protocol,
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=max(1, math.ceil(args.shutdown_timeout)),
        log_level="info",
    )
    server = uvicorn.Server(config)
    # Uvicorn shuts down for SIGTERM as for Ctrl-C, then raises the signal again for the
    # handler it found: the default one would kill the process (-15) before the lines below.
    # As Ctrl-C's does, this one raises KeyboardInterrupt.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the signal it shut down for: a graceful stop is exit 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        ctx.close(timeout=0)  # already closed by the app's shutdown, unless it never started
    return 0 if server.started else 1
