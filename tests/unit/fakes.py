"""A deterministic stand-in for the engine's native seam: engine policy tested without a model.

The fake "model" is a rule, not weights: after token ``t`` the next token is ``t + 1`` (wrapping
before :data:`EOG`), so a reply is known in advance from its prompt's last token. The fake
holds each sequence's tokens by position and checks, as llama.cpp does, that a decode extends a
sequence exactly where it ends; it records every decode call and copy, so a test can see what
the engine asked for. Faults are injected with plain callables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from seqlease.engine.layout import KvLayout
from seqlease.engine.seam import BatchEntry
from seqlease.errors import DecodeError
from seqlease.request.params import SamplingParams

__all__ = ["EOG", "FakeSampler", "FakeSeam", "FakeVocab", "Samplers", "layout"]

#: The fake vocabulary's end-of-generation token.
EOG = 0
N_VOCAB = 1000


def follows(token: int) -> int:
    """The fake model's rule: what comes after ``token``."""
    nxt = (token + 1) % N_VOCAB
    return nxt if nxt != EOG else 1


class FakeVocab:
    """Token ``t`` reads as ``"t "``; ``broken`` tokens raise when written as text."""

    def __init__(self) -> None:
        self.broken: set[int] = set()

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        if token in self.broken:
            raise RuntimeError(f"cannot write token {token}")
        return f"{token} ".encode()

    def is_eog(self, token: int) -> bool:
        return token == EOG


@dataclass
class FakeSeam:
    """One fake llama.cpp context of ``n_seq_max`` sequences."""

    n_seq_max: int
    n_ctx_seq: int = 256
    n_batch: int = 64
    n_ubatch: int = 64
    kv_unified: bool = True
    vocab: FakeVocab = field(default_factory=FakeVocab)
    #: Called with each decode's entries before it runs; may raise to fail the decode.
    on_decode: Callable[[list[BatchEntry]], None] | None = None
    #: Called with each reply's entries when the engine checks them; may raise.
    on_check: Callable[[list[BatchEntry]], None] | None = None
    calls: list[list[BatchEntry]] = field(default_factory=list)
    copies: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.held: list[list[int]] = [[] for _ in range(self.n_seq_max)]
        self._last: list[BatchEntry] = []  # the last decode's entries: its logits rows

    @property
    def model(self) -> FakeVocab:
        return self.vocab

    def check_batch(self, entries: Sequence[BatchEntry]) -> None:
        if self.on_check is not None:
            self.on_check(list(entries))

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        if self.on_decode is not None:
            self.on_decode(list(entries))
        ends = {seq_id: len(tokens) for seq_id, tokens in enumerate(self.held)}
        for _, pos, seq_id, _ in entries:  # llama.cpp: positions continue each sequence
            if pos != ends[seq_id]:
                raise DecodeError(f"position {pos} of sequence {seq_id} is not its end", -1)
            ends[seq_id] += 1
        self.calls.append(list(entries))
        for token, _, seq_id, _ in entries:
            self.held[seq_id].append(token)
        self._last = list(entries)

    def next_token(self, row: int) -> int:
        """What the fake model predicts after batch row ``row`` of the last decode."""
        token, _, _, logits = self._last[row]
        assert logits, f"row {row} was decoded without logits"
        return follows(token)

    def logit_row(self, index: int) -> list[float]:
        raise AssertionError("no test here asks for logprobs")

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        tokens = self.held[seq_id]
        start = 0 if p0 < 0 else p0
        if p1 >= 0 and p1 < len(tokens):
            return False  # only a tail can be removed
        del tokens[start:]
        return True

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        self.copies.append((src, dst, n))
        self.held[dst] = self.held[src][:n]
        return n

    def cut(self, seq_id: int, start: int, stop: int) -> bool:
        del self.held[seq_id][start:stop]
        return True

    def seq_pos_max(self, seq_id: int) -> int:
        return len(self.held[seq_id]) - 1

    def save_state(self, seq_id: int) -> bytes:
        return bytes(t % 256 for t in self.held[seq_id])

    def load_state(self, seq_id: int, data: bytes, n_tokens: int) -> bool:
        return False

    def tokens_decoded(self, seq_id: int) -> int:
        """How many tokens of ``seq_id`` all decode calls evaluated."""
        return sum(1 for call in self.calls for entry in call if entry[2] == seq_id)


class FakeSampler:
    """Greedy on the fake model; ``fail_at`` makes the n-th sample raise."""

    def __init__(self, seam: FakeSeam, params: SamplingParams, fail_at: int | None) -> None:
        self._seam = seam
        self.params = params
        self.fail_at = fail_at
        self.samples = 0
        self.accepted: list[int] = []
        self.closed = False

    def sample(self, row: int) -> int:
        self.samples += 1
        if self.fail_at is not None and self.samples >= self.fail_at:
            raise RuntimeError("simulated sampler fault")
        return self._seam.next_token(row)

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def close(self) -> None:
        self.closed = True


class Samplers:
    """The engine's sampler factory over a :class:`FakeSeam`; keeps every sampler it made.

    ``refuse`` and ``fail_at`` key on ``params.seed``: a test marks a faulty request by its seed.
    """

    def __init__(self, seam: FakeSeam) -> None:
        self._seam = seam
        self.made: list[FakeSampler] = []
        self.refuse: set[int] = set()
        self.fail_at: dict[int, int] = {}

    def __call__(self, params: SamplingParams, grammar: object = None) -> FakeSampler:
        # Grammars are llguidance's: tested for real on the model, not simulated here.
        if params.seed in self.refuse:
            raise ValueError("simulated bad sampling setup")
        sampler = FakeSampler(self._seam, params, self.fail_at.get(params.seed))
        self.made.append(sampler)
        return sampler


def layout(seam: FakeSeam, sequences: int, cache_tokens: int = 0) -> KvLayout:
    """The layout of ``seam``: ``sequences`` leased ids, the rest for the prefix cache."""
    cache_slots = seam.n_seq_max - sequences
    return KvLayout(sequences, seam.n_ctx_seq, cache_slots, cache_tokens, seam.kv_unified)
