"""What every benchmark here shares: child processes, the machine, the neighbours, tables, pages.

Imported by the benchmark scripts of this folder (run as ``python benchmarks/<name>.py``, which
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import seqlease

__all__ = [
    "DOCS",
    "ROOT",
    "CpuMeter",
    "as_ratio",
    "child_env",
    "child_json",
    "machine",
    "markdown_table",
    "never_end",
    "peak_rss_mb",
    "print_table",
    "rerun_command",
    "write_page",
]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


# -- child processes ------------------------------------------------------------------------


def child_env(wait_policy: str | None) -> dict[str, str]:
    """This environment for a measuring process, with ``OMP_WAIT_POLICY=wait_policy``.

    OpenMP reads its wait policy once, when llama.cpp loads, so each policy needs a process of
    its own: ``wait_policy=None`` leaves OpenMP's default, whatever this environment sets.
    """
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    return env


def child_json(
    script: str, *args: str, wait_policy: str | None, echo: bool = False
) -> dict[str, Any]:
    """Run ``script`` (a benchmark) again in a fresh process and return the JSON line it ends with.

    ``wait_policy``: see :func:`child_env`. ``echo`` prints the child's other lines (progress)
    as they come and lets its stderr through.
    """
    cmd = [sys.executable, str(Path(script).resolve()), *args]
    env = child_env(wait_policy)
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
        raise SystemExit(f"measurement {' '.join(args)} failed (exit code {code})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# -- what a measuring process reads ---------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB (the pages' "MB").

    VmHWM starts afresh at exec; ``ru_maxrss`` carries a parent's peak over into the program it
    execs, so it is only the fallback where ``/proc`` is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def never_end(ctx: seqlease.Context) -> dict[int, float]:
    """A ``logit_bias`` of -100 on every end-of-generation token: replies run to max_tokens."""
    return dict.fromkeys(ctx.model.eog_tokens, -100.0)


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


def as_ratio(value: float, digits: int = 2) -> str:
    """A ratio as the pages print it: ``1.23x``."""
    return f"{value:.{digits}f}x"


# -- pages ----------------------------------------------------------------------------------


def rerun_command(script: str, *, drop: tuple[str, ...] = ()) -> str:
    """``python benchmarks/<script> ...`` with this run's arguments: a page's way to reproduce it.

    Leaves out ``--no-write`` (a page is written only without it) and each option of ``drop``
    with its value.
    """
    args = [a for a in sys.argv[1:] if a != "--no-write"]
    for option in drop:
        if option in args:
            at = args.index(option)
            del args[at : at + 2]
    return " ".join(["python", f"benchmarks/{Path(script).name}", *args])


def write_page(path: Path | None, text: str) -> None:
    """Write a benchmark's results page (``None``: ``--no-write``, only say so)."""
    if path is None:
        print(f"page rendered ({len(text):,} characters), not written (--no-write)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    shown = path.resolve()
    print(f"wrote {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else path}")
