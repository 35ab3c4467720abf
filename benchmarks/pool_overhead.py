"""What a lease costs: median uncontended acquire + release (memory clear included).

Run: ``python benchmarks/pool_overhead.py`` (default model; ``--model PATH`` for another).
Prints each figure next to a plain ``threading.Lock`` acquire + release measured in the same
run, so the ratio means something on a noisy machine.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import threading
import time
from collections.abc import Callable

import seqlease
from seqlease.native.library import load_library
from seqlease.native.memory import resolve_memory_api


def _median_ns(step: Callable[[], int], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        samples.append(step())
    return float(statistics.median(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="GGUF path (default: the embedded model)")
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--sequences", type=int, default=4)
    args = parser.parse_args()

    lock = threading.Lock()

    def lock_cycle() -> int:
        t0 = time.perf_counter_ns()
        lock.acquire()
        lock.release()
        return time.perf_counter_ns() - t0

    # One llama.cpp thread: with more, its workers spin after each decode and, on a 2-core
    # machine, their spinning would be timed as the pool's cost.
    with seqlease.Context(args.model, sequences=args.sequences, n_ctx=256, n_threads=1) as ctx:
        # The floor calls llama.cpp itself: the functions seqlease resolved for this binding.
        lib = load_library()
        memory, _ = resolve_memory_api(lib)
        assert memory is not None
        tokens = [100 + i for i in range(8)]
        token_array = (ctypes.c_int32 * len(tokens))(*tokens)

        def lease_cycle() -> int:
            t0 = time.perf_counter_ns()
            seq = ctx.acquire()
            seq.release()
            return time.perf_counter_ns() - t0

        def with_cycle() -> int:
            t0 = time.perf_counter_ns()
            with ctx.lease():
                pass
            return time.perf_counter_ns() - t0

        def filled_cycle() -> int:
            # Time acquire and release only; the 8-token decode in between is not the pool's.
            t0 = time.perf_counter_ns()
            seq = ctx.acquire()
            t1 = time.perf_counter_ns()
            ctx.probe.append(seq.id, tokens)  # positions 0-7, recorded as the engine's own
            t2 = time.perf_counter_ns()
            seq.release()
            return (t1 - t0) + (time.perf_counter_ns() - t2)

        def native_clear() -> int:
            # The same decode-then-clear as above, calling llama.cpp directly: the floor. The
            # engine is held meanwhile; sequence 0 is idle and ends empty, as seqlease recorded.
            with ctx.probe.paused():
                native = ctx.probe.context_ptr()
                batch = lib.llama_batch_get_one(token_array, len(tokens))  # sequence 0, 0-7
                if lib.llama_decode(native, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                t0 = time.perf_counter_ns()
                memory.seq_rm(native, 0, -1, -1)
                return time.perf_counter_ns() - t0

        slow_rounds = max(200, args.rounds // 40)
        for step in (lock_cycle, lease_cycle, with_cycle):  # warm up
            _median_ns(step, 200)
        results = [
            ("threading.Lock acquire+release", _median_ns(lock_cycle, args.rounds)),
            ("ctx.acquire() + seq.release()", _median_ns(lease_cycle, args.rounds)),
            ("with ctx.lease(): pass", _median_ns(with_cycle, args.rounds)),
            (
                "acquire+release, 8 tokens to clear",
                _median_ns(filled_cycle, slow_rounds),
            ),
            (
                "llama.cpp seq_rm alone, 8 tokens",
                _median_ns(native_clear, max(200, args.rounds // 40)),
            ),
        ]
        stats = ctx.stats()
    base = results[0][1]
    print(f"model: {ctx.model_path}  sequences: {args.sequences}  rounds: {args.rounds}")
    print(f"{'operation':38} {'median us':>10} {'x Lock':>8}")
    for name, ns in results:
        print(f"{name:38} {ns / 1000:10.2f} {ns / base:8.1f}")
    print(f"pool after the run: leased={stats.leased} free={stats.free} leaked={stats.leaked}")


if __name__ == "__main__":
    main()
