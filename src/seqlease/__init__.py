"""seqlease: safe, leak-proof, batched use of llama.cpp sequences from Python."""

from __future__ import annotations

import logging

from seqlease.chat.saved import SavedChat
from seqlease.chat.session import ChatSession
from seqlease.context import Context
from seqlease.detection import Capabilities, detect
from seqlease.errors import (
    BackendUnavailableError,
    ContextClosedError,
    ContextOverflowError,
    DecodeError,
    EmptyPromptError,
    GrammarError,
    InvalidSequenceError,
    LeaseLeakWarning,
    MissingSequenceError,
    ModelLoadError,
    NativeError,
    PoolExhausted,
    SeqleaseError,
    SequenceBusyError,
    SequenceReleasedError,
    SessionBusyError,
    SessionReleasedError,
    StateError,
    StreamInUseError,
    TooManyWaiters,
)
from seqlease.lease import AsyncLease, Lease
from seqlease.model_path import default_model_path
from seqlease.options import ContextOptions, ModelOptions
from seqlease.pool import Holder, PoolStats
from seqlease.request.job import Result
from seqlease.request.logprobs import TokenLogprob
from seqlease.request.params import SamplingParams, sanitize
from seqlease.request.stream import AsyncGeneration, Generation
from seqlease.request.text import trim_at_stop
from seqlease.sequence import Sequence

__version__ = "0.1.0"

__all__ = [
    "AsyncGeneration",
    "AsyncLease",
    "BackendUnavailableError",
    "Capabilities",
    "ChatSession",
    "Context",
    "ContextClosedError",
    "ContextOptions",
    "ContextOverflowError",
    "DecodeError",
    "EmptyPromptError",
    "Generation",
    "GrammarError",
    "Holder",
    "InvalidSequenceError",
    "Lease",
    "LeaseLeakWarning",
    "MissingSequenceError",
    "ModelLoadError",
    "ModelOptions",
    "NativeError",
    "PoolExhausted",
    "PoolStats",
    "Result",
    "SamplingParams",
    "SavedChat",
    "SeqleaseError",
    "Sequence",
    "SequenceBusyError",
    "SequenceReleasedError",
    "SessionBusyError",
    "SessionReleasedError",
    "StateError",
    "StreamInUseError",
    "TokenLogprob",
    "TooManyWaiters",
    "__version__",
    "default_model_path",
    "detect",
    "sanitize",
    "trim_at_stop",
]

# A library never prints on its own: applications opt in by configuring logging.
logging.getLogger("seqlease").addHandler(logging.NullHandler())
