"""Grammars and schemas a hostile caller sends: none crashes, stalls or slows the others.

Each case of the issue crashed the process (llama.cpp's recursive GBNF parser ran out of C
stack), stalled the shared engine thread for good, or slowed every lease for tens of seconds
on the old grammar path. The cases that could crash run in a child process with a timeout, so
a regression fails a test instead of killing the test run.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import json
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import seqlease
from helpers import settle

TIMEOUT = 120


@pytest.fixture(scope="module", params=["session", "completion"])
def ctx(request: pytest.FixtureRequest) -> Iterator[seqlease.Context]:
    with seqlease.Context(sequences=2, n_ctx=512, n_threads=1, backend=request.param) as ctx:
        yield ctx


def nested_array(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema, "maxItems": 1}
    return schema


def chained_rules(n: int) -> str:
    rules = "".join(f"r{i} ::= r{i + 1}\n" for i in range(n))
    return f'root ::= r0\n{rules}r{n} ::= "a"'


def ref_chain(n: int) -> dict[str, Any]:
    defs: dict[str, Any] = {
        f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}, "maxItems": 1}
        for i in range(n)
    }
    defs[f"d{n}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


#: name -> generate() arguments. Each must give a GrammarError at the call or a reply.
HOSTILE: dict[str, dict[str, Any]] = {
    "maxLength 30000": {"json_schema": {"type": "string", "maxLength": 30000}},
    "pattern a{0,30000}": {"json_schema": {"type": "string", "pattern": "^a{0,30000}$"}},
    "nested repetition": {
        "json_schema": {"type": "string", "pattern": "^((a{0,50}){0,50}){0,50}$"}
    },
    "20,000 nested parentheses": {"grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000},
    "array nested 950 deep": {"json_schema": nested_array(950)},
    "array nested 5000 deep": {"json_schema": nested_array(5000)},
    "enum of 100k strings": {"json_schema": {"enum": [f"value {i}" for i in range(100_000)]}},
    "100k GBNF alternatives": {
        "grammar": "root ::= " + " | ".join(f'"a{i}"' for i in range(100_000))
    },
    "maxLength 1500": {"json_schema": {"type": "string", "maxLength": 1500}},
    # Found while testing this file: a chain of rules crashed llguidance's compiler (SIGSEGV
    # on an 8 MiB thread stack) from about 3,000 rules or 5,000 $refs.
    "20,000 chained GBNF rules": {"grammar": chained_rules(20_000)},
    "1,000 chained GBNF rules": {"grammar": chained_rules(998)},
    "2,000 chained GBNF rules": {"grammar": chained_rules(2_000)},
    "$ref chain of 3000 arrays": {"json_schema": ref_chain(3000)},
    "$ref chain of 12000 arrays": {"json_schema": ref_chain(12_000)},
    "enum of 20k strings": {"json_schema": {"enum": [f"value {i}" for i in range(20_000)]}},
    "left recursion": {"grammar": 'root ::= root "a" | "a"'},
    "self-referencing root": {
        "json_schema": {"type": "object", "properties": {"next": {"$ref": "#"}}}
    },
    "5000 required properties": {
        "json_schema": {
            "type": "object",
            "properties": {f"p{i}": {"type": "integer"} for i in range(5000)},
            "required": [f"p{i}" for i in range(5000)],
        }
    },
    "minItems 100000": {
        "json_schema": {"type": "array", "items": {"type": "integer"}, "minItems": 100_000}
    },
    "ambiguous alternation": {"json_schema": {"type": "string", "pattern": "^(a|aa|aaa|aaaa)*b$"}},
    "anyOf of 2000 objects": {
        "json_schema": {
            "anyOf": [
                {"type": "object", "properties": {f"k{i}": {"const": i}}, "required": [f"k{i}"]}
                for i in range(2000)
            ]
        }
    },
    "grammar over the size cap": {"grammar": 'root ::= "' + "a" * 1_100_000 + '"'},
    "multipleOf 1e-300": {"json_schema": {"type": "number", "multipleOf": 1e-300}},
    "look-ahead pattern": {"json_schema": {"type": "string", "pattern": "^(?=a).*$"}},
}

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import seqlease
    from test_hostile_grammars import HOSTILE

    names = sys.argv[1:]
    with seqlease.Context(sequences=1, n_ctx=256, n_threads=1) as ctx, ctx.lease() as seq:
        for name in names:
            start = time.monotonic()
            try:
                result = seq.generate("Answer:", max_tokens=8, **HOSTILE[name]).result()
                outcome = {"reply": result.text, "finish": result.finish_reason}
            except seqlease.GrammarError as exc:
                outcome = {"error": str(exc)}
            outcome.update(name=name, seconds=time.monotonic() - start)
            print(json.dumps(outcome), flush=True)
    """
)


def _run_child(names: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *names],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=str(__import__("pathlib").Path(__file__).parent),
    )
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-2000:]}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.timeout(TIMEOUT + 30)
def test_no_hostile_grammar_crashes_or_stalls_the_process() -> None:
    outcomes = {o["name"]: o for o in _run_child(sorted(HOSTILE))}
    assert outcomes.keys() == HOSTILE.keys()
    for name, outcome in outcomes.items():
        print(f"{name}: {outcome}")
        # A refusal comes at once; a reply within its few tokens' time.
        assert outcome["seconds"] < 10, f"{name} took {outcome['seconds']:.1f} s"
        if "error" in outcome:
            assert outcome["error"], name
    # What llguidance can enforce, it does: these are answered, not refused.
    for name in ("maxLength 30000", "pattern a{0,30000}", "nested repetition", "maxLength 1500"):
        assert "reply" in outcomes[name], (name, outcomes[name])
    assert set(json.loads(outcomes["pattern a{0,30000}"]["reply"])) <= {"a"}
    assert outcomes["array nested 5000 deep"].get("error")
    for name in ("1,000 chained GBNF rules", "$ref chain of 3000 arrays", "left recursion"):
        assert "reply" in outcomes[name], (name, outcomes[name])
    assert "rules" in outcomes["2,000 chained GBNF rules"]["error"]
    assert "characters" in outcomes["20,000 chained GBNF rules"]["error"]


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"const": "x", "enum": ["y"]}, "(?i)unsatisfiable schema"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "(?i)unsatisfiable schema"),
    ],
)
def test_a_schema_nothing_can_satisfy_is_refused(schema: dict[str, Any], reason: str) -> None:
    with pytest.raises(seqlease.GrammarError, match=reason):
        seqlease.sanitize(json_schema=schema)


SCHEMAS_ONCE_WRONG: dict[str, dict[str, Any]] = {
    # Became a grammar for {} on the old path.
    "allOf": {"allOf": [{"type": "string", "maxLength": 12}]},
    # `required` naming a property absent from `properties` was not enforced.
    "required without properties": {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": {"type": "integer"},
    },
    # pydantic's self-referencing model: KeyError('#/$defs/n') on the old path.
    "linked list": {
        "$defs": {
            "n": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": 0, "maximum": 9},
                    "next": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]},
                },
                "required": ["v", "next"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/n",
    },
    # Property names with a quote or a backslash failed to parse.
    "odd property names": {
        "type": "object",
        "properties": {'a"b': {"type": "boolean"}, "c\\d": {"type": "boolean"}},
        "required": ['a"b', "c\\d"],
        "additionalProperties": False,
    },
    # Integer bounds were ignored by the binding's converter.
    "integer bounds": {"type": "integer", "minimum": 3, "maximum": 7},
}


#: SmolLM2 keeps a linked list going unless shown where it ends.
PROMPTS = {
    "linked list": 'A linked list of two nodes in JSON, the last like {"v": 3, "next": null}:'
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(SCHEMAS_ONCE_WRONG))
def test_schemas_the_old_path_got_wrong_now_hold(ctx: seqlease.Context, name: str) -> None:
    schema = SCHEMAS_ONCE_WRONG[name]
    ended = 0
    with ctx.lease(timeout=TIMEOUT) as seq:
        for seed in range(6):
            result = seq.generate(
                PROMPTS.get(name, "Reply in JSON:"),
                json_schema=schema,
                temperature=0.7,
                seed=seed,
                max_tokens=160,
            ).result()
            if result.finish_reason == "length":
                continue  # a linked list may go on for ever: only what ends can validate
            ended += 1
            jsonschema.validate(json.loads(result.text), schema)
    assert ended >= 4, f"only {ended} of 6 replies ended"


NEIGHBOURS = [
    "The three most common colours of a car are",
    "A short poem about the sea:",
    "List three fruits:",
    "The capital of France is",
    "Water boils at",
    "Once upon a time, a small robot",
    "The best way to learn Python is",
]


def _neighbours(ctx: seqlease.Context) -> list[str]:
    """The neighbours' greedy texts, all seven generating at once."""

    def one(prompt: str) -> str:
        with ctx.lease(timeout=TIMEOUT) as seq:
            return seq.generate(prompt, temperature=0, max_tokens=40).result().text

    with ThreadPoolExecutor(len(NEIGHBOURS)) as pool:
        return list(pool.map(one, NEIGHBOURS))


class _Steps:
    """Each engine step's length, from the probe's decode observer (the engine's own clock).

    A step runs from its first ``llama_decode`` call to the next step's first. Steps that
    evaluate a neighbour's prompt (more than two of its tokens) are left out: those are the
    neighbours' own work, as large alone as beside anything.
    """

    def __init__(self, ctx: seqlease.Context) -> None:
        self._probe = ctx.probe
        self._starts: list[tuple[float, int, bool]] = []  # (time, step, a neighbour's prompt)
        self.hostile_id = -1

    def __call__(self, entries: list[Any]) -> None:
        counts = collections.Counter(seq_id for _, _, seq_id, _ in entries)
        prompt = any(n > 2 for seq_id, n in counts.items() if seq_id != self.hostile_id)
        step = self._probe.steps
        if self._starts and self._starts[-1][1] == step:
            if prompt:
                self._starts[-1] = (self._starts[-1][0], step, True)
            return
        self._starts.append((time.monotonic(), step, prompt))

    def take(self) -> list[tuple[float, float]]:
        """When each decoding step since the last call began and ended."""
        starts, self._starts = self._starts, []
        return [(a[0], b[0]) for a, b in itertools.pairwise(starts) if not a[2]]


class _FullCollections:
    """When Python's full garbage collections ran (``gc.callbacks``), in any thread.

    One holds the GIL for tens of milliseconds (35 ms measured in a fresh process here),
    whoever's allocations set it off: a pause of the interpreter, not of the engine.
    """

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._began = time.monotonic()
        else:
            self.spans.append((self._began, time.monotonic()))

    def overlaps(self, step: tuple[float, float]) -> bool:
        return any(a < step[1] and step[0] < b for a, b in self.spans)


def measure_beside_hostile() -> dict[str, Any]:
    """7 greedy leases, alone and beside an 8th cycling through every hostile case."""
    collections_seen = _FullCollections()
    gc.callbacks.append(collections_seen)
    with seqlease.Context(sequences=8, n_ctx=2048, n_threads=1, backend="session") as ctx:
        steps = _Steps(ctx)
        ctx.probe.observe_decodes(steps)
        alone = _neighbours(ctx)
        alone_steps = steps.take()
        stop = threading.Event()
        tried: list[str] = []

        def hostile() -> None:
            with ctx.lease(timeout=TIMEOUT) as seq:
                steps.hostile_id = seq.id
                while not stop.is_set():
                    for name, kwargs in HOSTILE.items():
                        if stop.is_set():
                            return
                        with contextlib.suppress(seqlease.GrammarError):
                            seq.generate("Answer:", max_tokens=4, **kwargs).result()
                        tried.append(name)

        thread = threading.Thread(target=hostile)
        thread.start()
        runs = []
        try:
            # Beside it until it has been through every case at least once.
            while len(runs) < 2 or len(set(tried)) < len(HOSTILE):
                assert thread.is_alive(), "the hostile caller died"
                runs.append(_neighbours(ctx))
            beside_steps = steps.take()
        finally:
            stop.set()
            thread.join(TIMEOUT)
            ctx.probe.observe_decodes(None)
        assert not thread.is_alive()
        leased = settle(ctx).leased
    gc.callbacks.remove(collections_seen)

    def lengths(spans: list[tuple[float, float]]) -> list[float]:
        return [b - a for a, b in spans if not collections_seen.overlaps((a, b))]

    return {
        "alone": alone,
        "runs": runs,
        "tried": tried,
        "leased": leased,
        "alone_steps": lengths(alone_steps),
        "beside_steps": lengths(beside_steps),
        "steps_in_a_collection": sum(map(collections_seen.overlaps, beside_steps)),
    }


@pytest.mark.timeout(TIMEOUT * 3)
def test_seven_neighbours_keep_their_replies_and_step_times_beside_a_hostile_lease() -> None:
    # In a process of its own, as an application runs: the heap a thousand earlier tests
    # leave makes each full garbage collection longer. Steps a collection fell into are left
    # out (and counted): an interpreter-wide pause, whichever thread's allocations set it off.
    assert len(HOSTILE) >= 20
    code = "import json, test_hostile_grammars as t; print(json.dumps(t.measure_beside_hostile()))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        cwd=str(Path(__file__).parent),
    )
    assert done.returncode == 0, f"the child failed ({done.returncode}): {done.stderr[-3000:]}"
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["leased"] == 0
    assert set(seen["tried"]) == set(HOSTILE)
    assert all(run == seen["alone"] for run in seen["runs"])
    median = statistics.median(seen["alone_steps"])
    worst = max(seen["beside_steps"])
    print(
        f"{len(seen['runs'])} runs beside {len(seen['tried'])} hostile replies: step median "
        f"alone {median * 1000:.1f} ms, beside "
        f"{statistics.median(seen['beside_steps']) * 1000:.1f} ms, worst beside "
        f"{worst * 1000:.1f} ms; {seen['steps_in_a_collection']} steps met a full collection"
    )
    assert worst <= 2 * median
