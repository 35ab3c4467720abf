"""Token log-probabilities as OpenAI defines them: log-softmax of the model's raw logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["Pieces", "TokenLogprob", "token_logprob"]


class Pieces(Protocol):
    """What names a token: its bytes."""

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """Bytes of one token."""
        ...


@dataclass(frozen=True)
class TokenLogprob:
    """How likely the model found one generated token, and its best alternatives."""

    #: The token id.
    token: int
    #: Its text, special tokens included (``"<|im_end|>"``); a piece of a character split
    #: across tokens shows as U+FFFD (the reply's text is assembled whole).
    text: str
    #: Natural log of its probability under the raw logits (before bias, grammar, sampling).
    logprob: float
    #: The ``top_logprobs`` most likely tokens as ``(text, logprob)``, best first.
    top: tuple[tuple[str, float], ...]


def token_logprob(logits: Any, token: int, n_top: int, vocab: Pieces) -> TokenLogprob:
    """``token``'s entry from one row of raw logits (any float array of the vocabulary size).

    Computed in float64: the sum runs over the whole vocabulary.
    """
    row = np.asarray(logits, dtype=np.float64)
    peak = float(row.max())
    log_total = peak + float(np.log(np.exp(row - peak).sum()))
    top: tuple[tuple[str, float], ...] = ()
    if n_top > 0:
        best = np.sort(np.argpartition(row, -n_top)[-n_top:])  # ties: the lower id first
        best = best[np.argsort(-row[best], kind="stable")]
        top = tuple((_text(vocab, int(i)), float(row[i]) - log_total) for i in best)
    return TokenLogprob(
        token=token,
        text=_text(vocab, token),
        logprob=float(row[token]) - log_total,
        top=top,
    )


def _text(vocab: Pieces, token: int) -> str:
    return vocab.token_to_piece(token, special=True).decode("utf-8", errors="replace")
