"""One ``llama_context``: per-sequence memory, state, batched decode and logits.

Every sequence id and token is validated here, in Python, before it reaches llama.cpp: a bad
``seq_id`` trips a ``GGML_ASSERT`` that aborts the whole process instead of raising.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from seqlease.errors import (
    DecodeError,
    InvalidSequenceError,
    NativeError,
    SeqleaseError,
)
from seqlease.native.library import holding_the_gil
from seqlease.native.memory import MemoryOps
from seqlease.native.model import NativeModel
from seqlease.native.names import STATE_NEEDS, bound, missing
from seqlease.native.params import KvCells, check_kv_shape, context_params, kv_cache_bytes
from seqlease.options import ContextOptions

__all__ = ["BatchEntry", "NativeContext"]

#: One token of a batch: (token id, position, sequence id, whether its logits are wanted).
BatchEntry = tuple[int, int, int, bool]

_DECODE_MEANING = {
    1: "no KV-cache slot for the batch (the context is full: use a smaller batch or wait)",
    2: "aborted by the abort callback",
    -1: "invalid batch",
}


class NativeContext:
    """Owns one ``llama_context`` with ``n_seq_max`` sequences of ``n_ctx_seq`` tokens each.

    Not thread-safe: llama.cpp allows one thread per context at a time, and callers serialize.
    """

    def __init__(
        self,
        lib: ModuleType,
        model: NativeModel,
        memory: MemoryOps,
        options: ContextOptions,
        cells: KvCells,
    ) -> None:
        """Create the context for resolved ``options`` with the sequences and cells ``cells``.

        Raises:
            ValueError: the KV cache type cannot hold this model's attention heads.
            NativeError: llama.cpp refuses to create the context.

        """
        self._lib = lib
        self.model = model
        self.memory = memory
        shape = model.kv_shape()
        check_kv_shape(shape, options)
        params = context_params(lib, options, cells)
        n_seq_max, n_ctx_total = cells.n_seq_max, cells.n_cells
        create = bound(lib, "create a context")
        ptr = create(model.ptr, params)
        if not ptr:
            raise NativeError(
                f"llama.cpp could not create a context of {n_seq_max} sequences and "
                f"{n_ctx_total} KV cells: lower sequences= or n_ctx= (see the log on logger "
                "'seqlease.llama')"
            )
        self._ptr: Any = ptr
        self.n_seq_max = n_seq_max
        # With kv_unified=False each sequence has its own stream, and llama.cpp aborts on a
        # partial seq_cp between two streams (GGML_ASSERT "only supported for full KV buffers").
        self.kv_unified = cells.unified
        self.n_batch = int(lib.llama_n_batch(ptr))
        self.n_ubatch = int(lib.llama_n_ubatch(ptr))
        #: KV cells llama.cpp made: what was asked, rounded up (to 256 per stream).
        self.n_cells = int(lib.llama_n_ctx(ptr))
        #: Bytes of the KV cache llama.cpp allocated (``None`` for a model of unknown shape).
        self.kv_cache_bytes = kv_cache_bytes(shape, self.n_cells, options)
        # Our own budget: llama.cpp may round each stream up (to 256 cells), never down.
        self.n_ctx_seq = cells.n_ctx_seq
        self._batch = lib.llama_batch_init(self.n_batch, 0, n_seq_max)
        self._logits_ith = holding_the_gil(lib, lib.llama_get_logits_ith)  # once per reply a step
        #: Called with each batch before it is decoded: a test hook (``ctx.probe``).
        self.observer: Callable[[list[BatchEntry]], None] | None = None
        # Older families have no usable seq_pos_max: track the highest position ourselves.
        self._tracked_pos_max = [-1] * n_seq_max
        #: Whether one sequence's memory can be saved and loaded (``llama_state_seq_*``).
        self.has_state = not missing(lib, STATE_NEEDS)
        #: Whether positions can be moved (a chat's context shift keeps its memory).
        self.can_shift = (
            memory.seq_add is not None and memory.can_shift is not None and memory.can_shift(ptr)
        )

    # -- validation -------------------------------------------------------------------------

    @property
    def ptr(self) -> Any:
        """The raw ``llama_context *``; raises once the context is freed."""
        if self._ptr is None:
            raise SeqleaseError("the llama.cpp context has been freed")
        return self._ptr

    def check_seq(self, seq_id: int) -> None:
        """Raise :class:`InvalidSequenceError` for an id llama.cpp would abort on."""
        if isinstance(seq_id, bool) or not isinstance(seq_id, int):
            raise InvalidSequenceError(f"a sequence id must be an int, not {type(seq_id).__name__}")
        if not 0 <= seq_id < self.n_seq_max:
            raise InvalidSequenceError(
                f"sequence id {seq_id} is outside [0, {self.n_seq_max}): this context has "
                f"{self.n_seq_max} sequences; lease one with ctx.lease() instead of picking ids"
            )

    # -- per-sequence memory ----------------------------------------------------------------

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions ``[p0, p1)`` of a sequence (``-1, -1``: all of it)."""
        self.check_seq(seq_id)
        ok = self.memory.seq_rm(self.ptr, seq_id, p0, p1)
        if ok:
            tracked = self._tracked_pos_max[seq_id]
            if p0 <= 0 and p1 < 0:
                self._tracked_pos_max[seq_id] = -1
            elif p1 < 0 or p1 > tracked:
                # llama.cpp reads a negative p0 as 0: never track a position below -1.
                self._tracked_pos_max[seq_id] = min(tracked, max(p0, 0) - 1)
        return ok

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Copy positions ``[p0, p1)`` of ``src`` into ``dst``."""
        self.check_seq(src)
        self.check_seq(dst)
        split = not self.kv_unified and src != dst
        if split and (p0 > 0 or p1 >= 0):
            raise ValueError(
                "only whole sequences can be copied between sequences of this context "
                f"(kv_unified=False): use p0=-1, p1=-1, not p0={p0}, p1={p1}"
            )
        self.memory.seq_cp(self.ptr, src, dst, p0, p1)
        copied = self._tracked_pos_max[src]
        if split:  # a copy across streams replaces the destination's stream
            self._tracked_pos_max[dst] = copied
        else:
            if p1 >= 0:
                copied = min(copied, p1 - 1)
            self._tracked_pos_max[dst] = max(self._tracked_pos_max[dst], copied)

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        """Make ``dst`` hold exactly the first ``n`` positions of ``src``; returns what it holds.

        One buffer: ``dst`` then shares those cells with ``src`` (no data moves). One stream
        per sequence: the whole stream is copied, then cut at ``n``. Where a sequence cannot be
        cut (recurrent models), ``dst`` ends up empty and 0 is returned.
        """
        if self.kv_unified:
            self.seq_rm(dst)
            self.seq_cp(src, dst, 0, n)
            return n
        self.seq_cp(src, dst)  # across streams: replaces whatever dst held
        if self.seq_rm(dst, n, -1):
            return n
        self.seq_rm(dst)
        return 0

    def cut(self, seq_id: int, start: int, stop: int) -> bool:
        """Remove positions ``[start, stop)`` and move the later ones down to close the gap.

        Returns ``False``, with nothing changed, where this memory cannot move positions
        (a recurrent model, or a binding without ``seq_add``).
        """
        self.check_seq(seq_id)
        if not 0 <= start <= stop:
            raise ValueError(f"cannot cut positions [{start}, {stop}) of sequence {seq_id}")
        if not self.can_shift or self.memory.seq_add is None:
            return False
        if start == stop:
            return True
        if not self.memory.seq_rm(self.ptr, seq_id, start, stop):
            return False
        self.memory.seq_add(self.ptr, seq_id, stop, -1, start - stop)
        if self._tracked_pos_max[seq_id] >= start:
            self._tracked_pos_max[seq_id] = max(
                start - 1, self._tracked_pos_max[seq_id] - (stop - start)
            )
        return True

    def save_state(self, seq_id: int) -> bytes:
        """The sequence's memory as llama.cpp writes it (``llama_state_seq_get_data``)."""
        self.check_seq(seq_id)
        size = int(self._lib.llama_state_seq_get_size(self.ptr, seq_id))
        buffer = (ctypes.c_ubyte * size)()
        written = int(self._lib.llama_state_seq_get_data(self.ptr, buffer, size, seq_id))
        if written != size:
            raise NativeError(f"llama.cpp wrote {written} of {size} bytes of sequence {seq_id}")
        return bytes(buffer)

    def load_state(self, seq_id: int, data: bytes, n_tokens: int) -> bool:
        """Replace the sequence's memory by ``data`` holding ``n_tokens`` positions.

        ``data`` must come from :meth:`save_state` of a context of the same model and cache
        layout, checked by the caller: llama.cpp reads it natively. Returns ``False``, with
        the sequence empty, when llama.cpp refuses it.
        """
        self.check_seq(seq_id)
        self.seq_rm(seq_id)
        buffer = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
        read = int(self._lib.llama_state_seq_set_data(self.ptr, buffer, len(data), seq_id))
        ok = read == len(data)
        if ok and self.memory.seq_pos_max is not None:
            ok = self.memory.seq_pos_max(self.ptr, seq_id) == n_tokens - 1
        if not ok:
            self.seq_rm(seq_id)
            return False
        self._tracked_pos_max[seq_id] = n_tokens - 1
        return True

    def seq_keep(self, seq_id: int) -> None:
        """Remove every sequence but ``seq_id``."""
        self.check_seq(seq_id)
        self.memory.seq_keep(self.ptr, seq_id)
        if not self.kv_unified:
            # llama.cpp's seq_keep only sweeps the kept sequence's own stream: with one stream
            # per sequence the others are untouched, so remove them explicitly.
            for other in range(self.n_seq_max):
                if other != seq_id:
                    self.memory.seq_rm(self.ptr, other, -1, -1)
        for other in range(self.n_seq_max):
            if other != seq_id:
                self._tracked_pos_max[other] = -1

    def seq_pos_max(self, seq_id: int) -> int:
        """Highest position held by a sequence, -1 when it is empty (asks llama.cpp if it can)."""
        self.check_seq(seq_id)
        if self.memory.seq_pos_max is None:
            return self._tracked_pos_max[seq_id]
        return self.memory.seq_pos_max(self.ptr, seq_id)

    def clear(self) -> None:
        """Forget every sequence's tokens."""
        self.memory.clear(self.ptr)
        self._tracked_pos_max = [-1] * self.n_seq_max

    # -- decode -----------------------------------------------------------------------------

    def check_batch(self, entries: Sequence[BatchEntry]) -> None:
        """Raise ``ValueError`` for a batch llama.cpp would reject or abort on.

        Empty, longer than ``n_batch``, a token outside the vocabulary, a sequence id outside
        the context (:class:`InvalidSequenceError`), or a position outside the sequence.
        """
        if not entries:
            raise ValueError("an empty batch cannot be decoded")
        if len(entries) > self.n_batch:
            raise ValueError(f"a batch of {len(entries)} tokens exceeds n_batch={self.n_batch}")
        for token, pos, seq_id, _ in entries:
            self.model.check_token(token)
            self.check_seq(seq_id)
            if not 0 <= pos < self.n_ctx_seq:
                raise ValueError(
                    f"position {pos} of sequence {seq_id} is outside [0, {self.n_ctx_seq})"
                )

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        """Decode one batch. Validates everything first; maps failures to :class:`DecodeError`."""
        self.check_batch(entries)
        if self.observer is not None:
            self.observer(list(entries))
        batch = self._batch
        for i, (token, pos, seq_id, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        code = int(self._lib.llama_decode(self.ptr, batch))
        if code != 0:
            meaning = _DECODE_MEANING.get(code, "fatal error")
            raise DecodeError(f"llama_decode returned {code}: {meaning}", code)
        for _, pos, seq_id, _ in entries:
            if pos > self._tracked_pos_max[seq_id]:
                self._tracked_pos_max[seq_id] = pos

    def logits(self, index: int) -> Any:
        """Pointer to the logits of batch row ``index`` of the last decode."""
        return self._logits_ith(self.ptr, index)

    def logit_row(self, index: int) -> Any:
        """The logits of batch row ``index`` as a NumPy view, valid until the next decode.

        Raises:
            NativeError: llama.cpp kept no logits for that row.

        """
        ptr = self.logits(index)
        if not ptr:
            raise NativeError(f"llama.cpp kept no logits for batch row {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def close(self) -> None:
        """Free the batch and the context; idempotent."""
        if self._ptr is not None:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ptr)
            self._ptr = None
