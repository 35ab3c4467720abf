"""Compatibility matrix: seqlease's smoke suite on real llama-cpp-python releases.

Run: ``python tests/compat_matrix.py`` (from the environment of the README's test command;
``--write`` also rewrites ``docs/compatibility.md``).

One release per generation of llama.cpp's per-sequence memory API is installed from the package
index into a virtual environment of its own under ``.compat/`` (rebuilt on every run), next to
seqlease from this checkout and pytest. Each runs ``detect()`` and ``tests/test_compat_smoke.py``;
the release installed in the running environment (the newest) is checked the same way. The
matrix goes to standard output; the exit status is 1 if any release fails.

Building a release from source takes minutes; pip's wheel cache makes later runs fast. The
builds skip llava, llama-cpp-python's multimodal library, which seqlease never loads
(``CMAKE_ARGS=-DLLAVA_BUILD=OFF`` unless ``CMAKE_ARGS`` is set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from test_compat_smoke import supported_from, version_tuple  # this script's own folder

ROOT = Path(__file__).resolve().parent.parent
SMOKE = "tests/test_compat_smoke.py"
WORK = ROOT / ".compat"
DOC = ROOT / "docs" / "compatibility.md"

#: One release per API generation (see GENERATIONS in the smoke suite): 0.3.16 binds both the
#: kv_self and memory names, 0.3.9 kv_self with kv_cache's seq_rm, 0.3.8 (the oldest supported)
#: kv_cache only; 0.2.90, below the supported range, must refuse the session backend cleanly.
RELEASES = ("0.3.16", "0.3.9", "0.3.8", "0.2.90")

DETECT = """
import json, seqlease
c = seqlease.detect()
print(json.dumps({"version": c.binding_version, "memory_api": c.memory_api,
                  "backend": c.backend, "session": c.session, "completion": c.completion}))
"""


@dataclass
class Row:
    """What one release did."""

    release: str
    install_s: float = 0.0
    detected: dict[str, object] = field(default_factory=dict)
    tests: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        # A skip is the smoke suite's verdict that a release below the range refused the
        # session backend cleanly; the suite fails any supported release that skips.
        return not self.error and bool(self.tests) and "failed" not in self.tests.values()


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=3600
    )


def install(release: str) -> tuple[Path, float]:
    """A fresh venv with llama-cpp-python==release, seqlease (this checkout) and pytest."""
    venv = WORK / f"llama-cpp-python-{release}"
    started = time.perf_counter()
    done = run([sys.executable, "-m", "venv", "--clear", str(venv)])
    if done.returncode:
        raise RuntimeError(f"venv failed: {done.stderr[-2000:]}")
    python = venv / "bin" / "python"
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    env.setdefault("CMAKE_ARGS", "-DLLAVA_BUILD=OFF")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # seqlease's own requirements but the binding (its extras carry an "extra ==" marker).
    ours = [r for r in metadata.requires("seqlease") or [] if "extra" not in r and "llama" not in r]
    for args in (
        [f"llama-cpp-python=={release}", "pytest", *ours],
        ["--no-deps", "-e", str(ROOT)],  # the release asked for, not the newest binding
    ):
        done = run(pip + args, env)
        if done.returncode:
            raise RuntimeError(f"pip install {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return python, time.perf_counter() - started


def check(python: Path, row: Row, model: str) -> None:
    """Fill ``row`` with detect()'s answer and the smoke suite's per-test outcomes."""
    env = {**os.environ, "SEQLEASE_MODEL": model, "GGML_NO_BACKTRACE": "1"}
    done = run([str(python), "-c", DETECT], env)
    if done.returncode:
        row.error = f"detect() failed:\n{done.stderr[-3000:]}"
        return
    row.detected = json.loads(done.stdout.strip().splitlines()[-1])
    report = WORK / f"smoke-{row.release}.xml"
    pytest = [str(python), "-m", "pytest", "--noconftest", "-p", "no:cacheprovider", "-q"]
    done = run([*pytest, SMOKE, f"--junitxml={report}"], env)
    if not report.exists():
        row.error = f"pytest did not run:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        return
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "error" else child.tag
        row.tests[case.attrib["name"].removeprefix("test_")] = outcome
    if done.returncode:
        row.error = done.stdout[-3000:]


def table(rows: list[Row]) -> str:
    """One column per release, one row per check (smoke tests by name, without ``test_``)."""
    names = sorted({name for row in rows for name in row.tests})
    lines = [
        "| | " + " | ".join(str(r.detected.get("version", r.release)) for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    floor = supported_from()
    cells: list[tuple[str, list[str]]] = [
        (
            "supported",
            [
                "yes"
                if version_tuple(str(r.detected.get("version", r.release))) >= floor
                else "no (below the range)"
                for r in rows
            ],
        ),
        ("`detect().memory_api`", [f"`{r.detected.get('memory_api', '-')}`" for r in rows]),
        ("`detect().backend`", [str(r.detected.get("backend", "-")) for r in rows]),
        *((f"`{name}`", [r.tests.get(name, "-") for r in rows]) for name in names),
        ("set-up s", [f"{r.install_s:.0f}" for r in rows]),
        ("result", ["ok" if r.ok else "**FAILED**" for r in rows]),
    ]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in cells]
    return "\n".join(lines)


def write_doc(rows: list[Row], command: str) -> None:
    lowest = ".".join(map(str, supported_from()))
    DOC.write_text(f"""# Compatibility

seqlease supports llama-cpp-python **{lowest} and newer** (`pyproject.toml` requires it). It
chooses what to call by feature detection (`seqlease.detect()`, `python -m seqlease doctor`),
never by the version string, because llama-cpp-python renamed its per-sequence memory API twice
and removed the old names each time:

| releases | per-sequence memory API | `detect().memory_api` |
|---|---|---|
| 0.3.8 and older | `llama_kv_cache_*` only | `kv_cache` |
| 0.3.9 | `llama_kv_self_*`, but `seq_rm` only as `llama_kv_cache_seq_rm` | `kv_self` |
| 0.3.10 to 0.3.16 | `llama_kv_self_*` and `llama_memory_*` | `memory` (the newer names win) |
| 0.3.17 and newer | `llama_memory_*` only | `memory` |

On a binding that lacks what the session backend needs, `backend="auto"` falls back to the
completion backend (`Llama.generate`, one request at a time); when neither backend can run,
`Context` raises `BackendUnavailableError` listing what is missing. It never fails with an
`AttributeError` from inside.

## Matrix

Produced by

```bash
{command}
```

which installs each release from PyPI into a virtual environment of its own and runs
`detect()` and the smoke suite `{SMOKE}` there: two leased sequences
generate together (in shared decode steps, with the same greedy text as alone), are released,
and llama.cpp's own per-sequence state size shows their memory empty; the completion backend
answers; nothing is printed to the terminal. Below the supported range the session backend is
refused with `BackendUnavailableError` ("skipped" in its rows) and the completion backend
answers instead. "set-up s" is the time to create the environment and install the release (a
source build on a cold pip cache, seconds when cached; 0 for the environment the command runs
in). CI runs it on every change.

The option rows check what llama.cpp reports back on each release (`llama_n_batch`,
`llama_n_ubatch`, threads, a `q8_0` KV cache's types and size from its log, the model file in
the process's memory maps with and without `use_mmap`), and the refusals: `kv_unified=False`
before 0.3.15, `n_ubatch` on 0.2.90's `Llama` (the completion backend runs there; its `Llama`
takes no such keyword) and `n_gpu_layers` on a CPU-only build, each a
`BackendUnavailableError` naming the option and the version. Field renames handled:
`flash_attn` (to 0.3.16) and `flash_attn_type` (0.3.17+); `use_mmap`/`use_mlock` and
`load_mode` (newer releases, 0.3.36 among them).

The structured-output rows run a JSON schema, a grammar, bad grammars (refused at the call),
a grammar no text completes (fails its reply, never aborts), logprobs and a logit bias.
Grammars and JSON Schemas run on llguidance, which masks the logits in Python, so they work
on every release (checked in the same rows), as do logprobs and logit bias.

The persistence rows save a chat (`llama_state_seq_get_data`), refuse a truncated state, resume
the chat and check that its next greedy reply is the uninterrupted one, evaluating only its own
turn; and run a chat past its `n_ctx` with `overflow="shift"`, checking that the kept turns'
memory was moved (`seq_rm` + `seq_add` under each release's names), not evaluated again. The
state functions have the same names and signatures on every release; on the completion
backend (0.2.90) a resumed chat evaluates its history again and says so. On 0.3.9 positions are
tracked in Python: its `llama_kv_self_seq_pos_max` says 0 for an empty sequence.

{table(rows)}

On the `kv_cache` generation llama.cpp binds no `seq_pos_max`, and on `kv_self` (0.3.9) it
answers 0 for an empty sequence: seqlease tracks each sequence's positions itself on both
(checked against llama.cpp's own answer in `tests/test_native.py`).
""")


def main() -> int:
    """Run the matrix; exit status 1 if any release fails."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--releases", nargs="+", default=list(RELEASES))
    parser.add_argument("--write", action="store_true", help=f"rewrite {DOC.relative_to(ROOT)}")
    args = parser.parse_args()

    import seqlease  # the running environment's seqlease resolves the model for every venv

    model = str(seqlease.default_model_path())
    WORK.mkdir(exist_ok=True)
    rows = [Row(release="installed")]
    check(Path(sys.executable), rows[0], model)
    for release in args.releases:
        row = Row(release=release)
        rows.append(row)
        print(f"llama-cpp-python {release}: installing ...", flush=True)
        try:
            python, row.install_s = install(release)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            row.error = str(exc)
            continue
        check(python, row, model)
    print(table(rows))
    for row in rows:
        if row.error:
            print(f"\n{row.release}:\n{row.error}")
    if args.write:
        write_doc(rows, " ".join(["python", "tests/compat_matrix.py", *sys.argv[1:]]))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
