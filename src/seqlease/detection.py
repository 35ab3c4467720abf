"""Which backend the installed llama-cpp-python can run, decided by looking, not by version.

The founding bug of this project came from trusting one binding version's behaviour; every
decision here is made with ``hasattr`` on the installed module instead.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Literal

from seqlease.native import names
from seqlease.native.devices import list_devices
from seqlease.native.library import binding_version, load_library
from seqlease.native.memory import MemoryApiName, resolve_memory_api
from seqlease.native.params import llama_unhonoured, unhonoured

__all__ = ["BackendName", "Capabilities", "detect", "detect_from"]

BackendName = Literal["session", "completion"]


@dataclass(frozen=True)
class Capabilities:
    """What the installed binding can do, and the backend seqlease recommends for it."""

    #: llama-cpp-python's version string, ``None`` when it is not installed.
    binding_version: str | None
    #: Which per-sequence memory API family is bound, ``None`` when none is complete.
    memory_api: MemoryApiName | None
    #: The recommended backend, ``None`` when nothing can run.
    backend: BackendName | None
    #: Human-readable lines explaining the choice, one per fact that mattered.
    reasons: tuple[str, ...]
    #: Whether the session (multi-sequence, batched) backend can run.
    session: bool
    #: Whether the completion (``Llama.create_completion``) backend can run.
    completion: bool
    #: Whether per-sequence memory queries come from llama.cpp (else seqlease tracks them).
    native_pos_max: bool
    #: llama.cpp's build and CPU feature line, when available.
    system_info: str | None = None
    #: Whether the build can offload layers to a GPU (``llama_supports_gpu_offload``).
    gpu_offload: bool = False
    #: The devices llama.cpp sees (``"CPU (CPU: AMD EPYC)"``, ...); empty when it cannot say.
    devices: tuple[str, ...] = ()
    #: Options this binding cannot honour, ``"option: why"``: asking for them raises.
    unhonoured: tuple[str, ...] = ()
    #: Whether ``grammar=`` and ``json_schema=`` can be used (the reasons say why not).
    grammars: bool = False
    #: Whether one sequence's memory can be saved and loaded (``llama_state_seq_*``);
    #: without it, a resumed chat evaluates its history again.
    saved_state: bool = False
    #: Whether positions can be moved (``seq_add``), so a chat's context shift keeps the
    #: memory of the turns it keeps (else it evaluates them again).
    context_shift: bool = False


def detect_from(lib: Any, llama_class: Any, version: str | None) -> Capabilities:
    """Decide from a module-shaped ``lib`` (``llama_cpp.llama_cpp``) and ``Llama`` class.

    Both may be ``None`` (not importable). Pure apart from reading attributes, so it can be
    checked against fake shapes of binding releases that cannot be installed side by side.
    """
    if lib is None:
        return Capabilities(
            version,
            None,
            None,
            ("llama-cpp-python is not importable: run `pip install llama-cpp-python`",),
            session=False,
            completion=False,
            native_pos_max=False,
        )
    memory, reasons_t = resolve_memory_api(lib)
    reasons = list(reasons_t)
    missing = names.missing(lib, names.SESSION_NEEDS)
    if "n_seq_max" not in names.context_fields(lib):
        missing.append("a context with several sequences (llama_context_params.n_seq_max)")
    if memory is None:
        missing.append("per-sequence memory operations")
    session = not missing
    if session:
        reasons.append("session backend available: multi-sequence memory ops, n_seq_max, batches")
    else:
        reasons.append("session backend unavailable: missing " + "; ".join(missing))
    # The completion backend drives Llama.generate (what create_completion runs inside) so
    # that it can count tokens and stop exactly; it reseeds per request with set_seed.
    llama_needs = ("create_completion", "generate", "set_seed")
    completion = llama_class is not None and all(hasattr(llama_class, n) for n in llama_needs)
    reasons.append(
        "completion backend available: llama_cpp.Llama.generate"
        if completion
        else "completion backend unavailable: llama_cpp.Llama lacks one of "
        + ", ".join(llama_needs)
    )
    backend: BackendName | None = "session" if session else "completion" if completion else None
    reasons.append(
        f"recommended backend: {backend}" if backend else "no backend can run on this binding"
    )
    # llguidance masks the logits in Python on every binding: nothing of llama.cpp's own
    # grammar sampler (which crashed or constrained nothing on some releases) is used.
    reasons.append("grammars and JSON schemas: llguidance, on every binding")
    state_missing = names.missing(lib, names.STATE_NEEDS)
    saved_state = session and not state_missing
    reasons.append(
        "saved sequence states: llama_state_seq_get_data/set_data"
        if saved_state
        else "saved sequence states unavailable ("
        + ("; ".join(f"missing {m}" for m in state_missing) or "no session backend")
        + "): a resumed chat evaluates its history again"
    )
    context_shift = session and memory is not None and memory.seq_add is not None
    reasons.append(
        "context shift keeps the memory of kept turns (seq_rm + seq_add)"
        if context_shift
        else "context shift evaluates kept turns again (no seq_add on the session backend)"
    )
    system_info = None
    info_fn = getattr(lib, "llama_print_system_info", None)
    if info_fn is not None:
        raw = info_fn()
        system_info = raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else None
    refused = unhonoured(lib)
    if backend == "completion":  # what it cannot take matters only where it is what runs
        for option, why in llama_unhonoured(llama_class).items():
            refused.setdefault(option, why)
    by_reason: dict[str, list[str]] = {}
    for option, why in refused.items():
        by_reason.setdefault(why, []).append(option)
    return Capabilities(
        binding_version=version,
        memory_api=memory.name if memory else None,
        backend=backend,
        reasons=tuple(reasons),
        session=session,
        completion=completion,
        native_pos_max=memory is not None and memory.seq_pos_max is not None,
        system_info=system_info,
        gpu_offload="n_gpu_layers" not in refused,
        unhonoured=tuple(f"{', '.join(options)}: {why}" for why, options in by_reason.items()),
        grammars=True,
        saved_state=saved_state,
        context_shift=context_shift,
    )


@functools.lru_cache(maxsize=1)
def detect() -> Capabilities:
    """Inspect the installed llama-cpp-python once and say which backend seqlease will use."""
    version = binding_version()
    try:
        lib = load_library()
    except (ImportError, OSError) as exc:
        caps = detect_from(None, None, version)
        return Capabilities(
            caps.binding_version,
            None,
            None,
            (*caps.reasons, f"import failed: {exc}"),
            session=False,
            completion=False,
            native_pos_max=False,
        )
    import llama_cpp

    caps = detect_from(lib, getattr(llama_cpp, "Llama", None), version)
    return dataclasses.replace(caps, devices=tuple(map(str, list_devices() or ())))
