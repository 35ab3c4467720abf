"""seqlease: safe, leak-proof, batched use of llama.cpp sequences from Python."""

from __future__ import annotations

import logging

from seqlease.chat.session import ChatSession
from seqlease.context import Context
from seqlease.detection import Capabilities, detect
from seqlease.engine.job import Result
from seqlease.engine.params import SamplingParams
from seqlease.engine.stream import AsyncGeneration, Generation
from seqlease.engine.text import trim_at_stop
from seqlease.errors import (
    BackendUnavailableError,
    ContextClosedError,
    ContextOverflowError,
    DecodeError,
    EmptyPromptError,
    InvalidSequenceError,
    LeaseLeakWarning,
    MissingSequenceError,
    ModelLoadError,
    NativeError,
    PoolExhausted,
    SeqleaseError,
    SequenceBusyError,
    SequenceReleasedError,
    TooManyWaiters,
)
from seqlease.model_path import default_model_path
from seqlease.pool import Holder, PoolStats
from seqlease.sequence import Sequence

__version__ = "0.1.0"

__all__ = [
    "AsyncGeneration",
    "BackendUnavailableError",
    "Capabilities",
    "ChatSession",
    "Context",
    "ContextClosedError",
    "ContextOverflowError",
    "DecodeError",
    "EmptyPromptError",
    "Generation",
    "Holder",
    "InvalidSequenceError",
    "LeaseLeakWarning",
    "MissingSequenceError",
    "ModelLoadError",
    "NativeError",
    "PoolExhausted",
    "PoolStats",
    "Result",
    "SamplingParams",
    "SeqleaseError",
    "Sequence",
    "SequenceBusyError",
    "SequenceReleasedError",
    "TooManyWaiters",
    "__version__",
    "default_model_path",
    "detect",
    "trim_at_stop",
]

# A library never prints on its own: applications opt in by configuring logging.
logging.getLogger("seqlease").addHandler(logging.NullHandler())
