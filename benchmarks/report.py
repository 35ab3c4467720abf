"""What every benchmark here shares: child processes, the machine, the neighbours, tables.

Imported by the benchmark scripts of this folder (run as ``python benchmarks/<name>.py``, which
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

import seqlease

__all__ = ["CpuMeter", "child_json", "machine", "markdown_table", "print_table"]


def child_json(cmd: list[str], *, wait_policy: str | None, echo: bool = False) -> dict[str, Any]:
    """Run ``cmd`` (a benchmark in a fresh process) and return the JSON line it ends with.

    OpenMP reads its wait policy once, when llama.cpp loads, so each policy needs a process of
    its own: ``wait_policy=None`` leaves OpenMP's default, whatever this environment sets.
    ``echo`` prints the child's other lines (progress) as they come and lets its stderr through.
    """
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    if echo:
        lines: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if not line.startswith("{"):
                    print(line, end="", flush=True)
        out, err, code = "".join(lines), "", proc.returncode
    else:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        out, err, code = done.stdout, done.stderr, done.returncode
    if code != 0:
        sys.stderr.write(err)
        raise SystemExit(f"measurement {' '.join(cmd[2:])} failed (exit code {code})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


class CpuMeter:
    """How much of the machine *other* processes used while a run was timed.

    The box is shared: a neighbour's test run takes a core for seconds at a time. Recording its
    share next to every timing shows which numbers it touched.
    """

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._ncpu = os.cpu_count() or 1

    def _busy(self) -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0.0
        return (sum(fields) - fields[3] - fields[4]) / self._tick  # minus idle and iowait

    def start(self) -> tuple[float, float, float]:
        return time.perf_counter(), self._busy(), time.process_time()

    def other_share(self, mark: tuple[float, float, float]) -> float:
        wall = time.perf_counter() - mark[0]
        ours = time.process_time() - mark[2]
        other = self._busy() - mark[1] - ours
        return max(0.0, min(1.0, other / (wall * self._ncpu)))


def machine() -> dict[str, str]:
    """The machine and versions a page's numbers were measured with."""
    cpu = platform.processor() or platform.machine()
    ram = "?"
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
        with open("/proc/meminfo") as f:
            ram = f"{int(f.readline().split()[1]) / 1024**2:.0f} GiB"
    except OSError:
        pass
    return {
        "cpu": f"{os.cpu_count()} cores, {cpu}",
        "ram": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "llama-cpp-python": metadata.version("llama-cpp-python"),
        "seqlease": seqlease.__version__,
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
