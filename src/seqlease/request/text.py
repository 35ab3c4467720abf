"""Turning token bytes into text: UTF-8 split across tokens, and stop strings held back."""

from __future__ import annotations

import codecs
import itertools
from collections.abc import Iterable, Mapping, Sequence

from seqlease.checks import check_text, describe

__all__ = [
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "USER_TURN_MARKERS",
    "TextAssembler",
    "check_stop",
    "trim_at_stop",
]

#: The seed note's stop markers: the start of a user turn, never the assistant's.
USER_TURN_MARKERS = ("USER:", "\nUSER:", "\n\nUSER:")


def trim_at_stop(text: str, stop: str | Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop marker (the marker is dropped).

    ``stop`` is one marker or a sequence of them; empty markers are ignored.
    """
    check_text("text", text)
    return _trim(text, check_stop(stop, allow_empty=True))


#: At most this many stop strings of at most this many characters. Every reply's text is
#: checked against each of them at every token on the engine thread, which every lease shares;
#: OpenAI takes 4 and real callers a handful.
MAX_STOPS = 32
MAX_STOP_CHARS = 500


def check_stop(stop: object, *, allow_empty: bool) -> tuple[str, ...]:
    """Stop markers as a tuple of strings: one ``str`` is one marker, ``None`` is none.

    Raises:
        TypeError: not a str or an iterable of str.
        ValueError: more than :data:`MAX_STOPS` markers, one longer than
            :data:`MAX_STOP_CHARS`, or one that is not valid text.

    """
    if stop is None:
        return ()
    markers = (stop,) if isinstance(stop, str) else stop
    if isinstance(markers, (bytes, Mapping)) or not isinstance(markers, Iterable):
        raise TypeError(f"stop must be a str or a sequence of str, not {describe(stop)}")
    found = tuple(itertools.islice(markers, MAX_STOPS + 1))
    if len(found) > MAX_STOPS:
        raise ValueError(f"stop takes at most {MAX_STOPS} strings: send fewer")
    for marker in found:
        check_text("stop", marker, allow_empty=allow_empty)
        if len(marker) > MAX_STOP_CHARS:
            raise ValueError(
                f"a stop string is {len(marker):,} characters, more than the {MAX_STOP_CHARS} "
                "accepted: stop at a shorter marker"
            )
    return found


def _trim(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for marker in stop:
        if marker:
            at = text.find(marker)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class TextAssembler:
    """Incremental text of one generation.

    Bytes of a multi-byte character may arrive in different tokens: an incremental decoder
    keeps the partial character until it is complete. Text that could be the beginning of a
    stop string is held back until it either completes the marker (generation stops, the marker
    is never emitted) or stops matching (it is emitted).
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._pending = ""
        #: Whether a stop string was found.
        self.stopped = False

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop strings this reply ends at (never delivered)."""
        return self._stop

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to show."""
        self._pending += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: return whatever is still held back (minus a stop marker)."""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        pending = self._pending
        if self.stopped:
            self._pending = ""
            return ""
        trimmed = _trim(pending, self._stop)
        if len(trimmed) < len(pending):
            self.stopped = True
            self._pending = ""
            return trimmed
        keep = 0 if final else self._partial_marker_len(pending)
        self._pending = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def _partial_marker_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop marker."""
        longest = 0
        for marker in self._stop:
            for size in range(min(len(marker) - 1, len(text)), longest, -1):
                if text.endswith(marker[:size]):
                    longest = size
                    break
        return longest
