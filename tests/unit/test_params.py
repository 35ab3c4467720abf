"""Sampling arguments: the seed note's defaults and fallbacks, and clear errors."""

from __future__ import annotations

import math

import pytest

from seqlease.request.params import DEFAULTS, sanitize


def test_sampling_arguments_are_sanitized():
    assert sanitize(temperature=math.nan, top_p=math.inf).temperature == DEFAULTS.temperature
    assert sanitize(top_p=math.nan).top_p == 0.9
    assert sanitize(max_tokens=math.inf).max_tokens == 256
    assert sanitize(stop="USER:").stop == ("USER:",)
    for bad in (
        {"max_tokens": 0},
        {"top_p": 0},
        {"temperature": -1},
        {"top_k": -1},
        {"stop": [""]},
        {"max_tokens": 2.5},
    ):
        with pytest.raises(ValueError, match="must be"):
            sanitize(**bad)
