"""Four defects found in review, each pinned on the real llama.cpp and the real default model.

- A small ``n_batch`` aborted the process: the prefix cache's sequence ids count towards
  llama.cpp's ``n_seq_max``, which must not exceed ``n_batch``.
- A model file replaced in place (same size, mtime kept) got the old file's cached
  fingerprint, so a Context of the new weights resumed the old weights' memory.
- On the completion backend an earlier lease's prompt changed the next greedy reply:
  ``Llama`` evaluated only the last prompt token after reusing a prefix.
- A temperature so small that logits / temperature overflow gave nonsense, not greedy text.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import pytest

import seqlease
from tiny_model import make_tiny_model

pytestmark = pytest.mark.timeout(600)

GREEDY = {"temperature": 0, "max_tokens": 24}

# -- 1. n_batch and the prefix cache's sequence ids ------------------------------------------

_SMALL_BATCH = """
import sys
import seqlease
n_batch, sequences, backend, unified = sys.argv[1:]
try:
    ctx = seqlease.Context(
        n_batch=int(n_batch), sequences=int(sequences), backend=backend, n_ctx=64,
        n_threads=1, kv_unified=None if unified == "auto" else unified == "unified",
    )
except ValueError as exc:
    print("refused:", exc)
    sys.exit(0)
with ctx, ctx.lease() as seq:
    text = seq.generate("The capital of France is", temperature=0, max_tokens=4).result().text
print("ran:", repr(text))
"""


@pytest.mark.parametrize(
    ("n_batch", "sequences", "backend", "unified"),
    [
        (4, 4, "session", "auto"),
        (1, 1, "session", "auto"),
        (2, 2, "session", "unified"),
        (17, 2, "session", "unified"),  # room for some cache ids, not the 16 it would take
        (4, 4, "completion", "auto"),
        (1, 1, "completion", "auto"),
    ],
)
def test_a_small_n_batch_runs_instead_of_aborting(run_python, n_batch, sequences, backend, unified):
    done = run_python(_SMALL_BATCH, str(n_batch), str(sequences), backend, unified)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ran: " in done.stdout, done.stdout


@pytest.mark.parametrize("backend", ["session", "completion"])
def test_n_batch_below_sequences_is_a_clear_error(run_python, backend):
    done = run_python(_SMALL_BATCH, "3", "4", backend, "auto")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: n_batch must be >= sequences" in done.stdout
    assert "raise n_batch" in done.stdout


# -- 2. the model fingerprint ----------------------------------------------------------------


def _variant(model: Path, to: Path) -> Path:
    """Another model of ``model``'s exact size: its output weights with the signs flipped."""
    data = bytearray(model.read_bytes())
    (tensor,) = [t for t in gguf.GGUFReader(model).tensors if t.name == "output.weight"]
    start = int(tensor.data_offset)
    for at in range(start + 3, start + int(tensor.n_bytes), 4):  # f32: sign in byte 3
        data[at] ^= 0x80
    to.write_bytes(bytes(data))
    return to


def _chat_reply(seq: seqlease.Sequence, text: str) -> seqlease.ChatSession:
    chat = seqlease.ChatSession(seq)
    chat.prompt(text, **GREEDY)
    return chat


@pytest.mark.parametrize("how", ["replaced in place", "symlink switched"])
def test_a_replaced_model_file_never_resumes_the_old_weights_memory(tmp_path, how):
    old = make_tiny_model(tmp_path / "old.gguf")
    new = _variant(old, tmp_path / "new.gguf")
    path = tmp_path / "model.gguf"
    if how == "replaced in place":
        shutil.copyfile(old, path)
    else:
        path.symlink_to(old)
    options = {"sequences": 1, "n_ctx": 256, "n_threads": 1}
    with seqlease.Context(path, **options) as first:
        with first.lease() as seq:
            saved = _chat_reply(seq, "abc").save()
        with first.lease() as seq:
            expected = seqlease.ChatSession.resume(seq, saved).prompt("def", **GREEDY)
        if how == "replaced in place":
            # As ``cp -p`` or ``rsync -a`` over the old file do: same path, size and mtime.
            st = path.stat()
            shutil.copyfile(new, tmp_path / "incoming.gguf")
            os.replace(tmp_path / "incoming.gguf", path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert path.stat().st_size == st.st_size
        else:
            path.unlink()
            path.symlink_to(new)
        with seqlease.Context(path, **options) as second:
            with second.lease() as seq, pytest.raises(seqlease.StateError, match="another model"):
                seqlease.ChatSession.resume(seq, saved)
            assert second.model.fingerprint != first.model.fingerprint
        # The first Context still holds the old weights, and resumes its own chat as before.
        with first.lease() as seq:
            chat = seqlease.ChatSession.resume(seq, saved)
            assert chat.resumed_from == "state"
            assert chat.prompt("def", **GREEDY) == expected


# -- 3. completion backend: an earlier lease never changes a greedy reply --------------------

PROMPTS = [
    "In 1492, Columbus",
    "The history of",
    "My favourite recipe for",
    "Here is a list of prime numbers:",
    "Q: Why is the sky blue?\nA:",
    "Once there was a dragon who",
]


def _earlier(prompt: str) -> list[str]:
    """Prompts sharing all of ``prompt`` or all but its end with it, and one sharing nothing."""
    return [prompt + " and", prompt[:-1], prompt + prompt, "Zebra crossings are striped"]


def test_completion_greedy_replies_never_depend_on_an_earlier_lease():
    options = {"backend": "completion", "sequences": 1, "n_ctx": 512, "n_threads": 1}
    fresh: dict[str, str] = {}
    for prompt in PROMPTS:
        with seqlease.Context(**options) as ctx, ctx.lease() as seq:
            fresh[prompt] = seq.generate(prompt, **GREEDY).result().text
    differing, evaluated = [], []
    with seqlease.Context(**options) as ctx:
        for prompt in PROMPTS:
            for earlier in _earlier(prompt):
                with ctx.lease() as seq:
                    seq.generate(earlier, **GREEDY).result()
                with ctx.lease() as seq:
                    result = seq.generate(prompt, **GREEDY).result()
                if result.text != fresh[prompt]:
                    differing.append((earlier, prompt))
                evaluated.append(result.n_evaluated)
    assert differing == []
    assert min(evaluated) == 2  # the last two prompt tokens, as on the session backend


# -- 4. temperatures too small to divide by --------------------------------------------------


@pytest.mark.parametrize("backend", ["session", "completion"])
def test_underflowing_temperatures_are_greedy(backend):
    prompts = ["The capital of France is", "Write a haiku about rain."]
    with seqlease.Context(backend=backend, sequences=1, n_ctx=256, n_threads=1) as ctx:
        for prompt in prompts:
            with ctx.lease() as seq:
                greedy = seq.generate(prompt, **GREEDY).result().text
            for temperature in (5e-324, 1e-45, 1e-40, 1e-38, 1e-30, 1e-21):
                for top_k in (0, 40):
                    with ctx.lease() as seq:
                        text = (
                            seq.generate(
                                prompt, temperature=temperature, top_k=top_k, max_tokens=24
                            )
                            .result()
                            .text
                        )
                    assert text == greedy, (temperature, top_k)
