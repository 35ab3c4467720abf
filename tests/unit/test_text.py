"""Reply text: stop markers."""

from __future__ import annotations

from seqlease.request.text import trim_at_stop


def test_trim_at_stop():
    assert trim_at_stop("hi\nUSER: x", ["USER:", "\nUSER:"]) == "hi"
    assert trim_at_stop("no marker", ["USER:"]) == "no marker"
