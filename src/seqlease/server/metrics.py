"""The server's Prometheus metrics (``GET /metrics``), all named ``seqlease_*``.

Each app has a registry of its own, so that two apps in one process (tests, a mounted
sub-app) never count into each other. The pool's gauges are read from ``ctx.stats()`` when
scraped, so they can never drift from the pool.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from seqlease.context import Context
from seqlease.request.job import Result

__all__ = ["Metrics"]

#: Seconds from a request's arrival to its first token: queueing and prompt evaluation.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Seconds per generated token after the first, one observation per reply.
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    """Counters, gauges and histograms of one server, in a registry of their own."""

    def __init__(self, ctx: Context) -> None:
        """Metrics of a server on ``ctx``; the pool gauges read its stats when scraped."""
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "seqlease_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        Gauge(
            "seqlease_queue_length", "Requests waiting for a free sequence", registry=registry
        ).set_function(lambda: ctx.stats().waiting)
        Gauge(
            "seqlease_sequences_busy", "Sequences leased to requests", registry=registry
        ).set_function(lambda: ctx.stats().leased)
        Gauge("seqlease_sequences", "Sequences in the pool", registry=registry).set(ctx.sequences)
        self.generated = Counter("seqlease_tokens_generated", "Tokens generated", registry=registry)
        self.evaluated = Counter(
            "seqlease_prompt_tokens_evaluated",
            "Prompt tokens evaluated by llama.cpp",
            registry=registry,
        )
        self.reused = Counter(
            "seqlease_prompt_tokens_reused",
            "Prompt tokens copied from memory (prefix cache, another sequence) instead",
            registry=registry,
        )
        self.ttft = Histogram(
            "seqlease_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first reply token",
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.per_token = Histogram(
            "seqlease_time_per_output_token_seconds",
            "Seconds per generated token after the first, one observation per reply",
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )

    def reply(self, result: Result, first_token: float | None, ended: float) -> None:
        """Count a finished (or cancelled) reply; times are ``time.monotonic()`` readings."""
        self.generated.inc(result.n_generated)
        self.evaluated.inc(result.n_evaluated)
        self.reused.inc(result.n_prompt - result.n_evaluated)
        if first_token is not None and result.n_generated > 1:
            self.per_token.observe((ended - first_token) / (result.n_generated - 1))

    def text(self) -> bytes:
        """The metrics in Prometheus's text format."""
        return generate_latest(self.registry)
