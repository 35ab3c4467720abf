"""The sequence pool: slots, waiters, FIFO hand-off, leak reclamation and statistics."""

from seqlease.pool.pool import SequencePool
from seqlease.pool.slot import Slot, SlotState
from seqlease.pool.stats import Holder, PoolStats

__all__ = ["Holder", "PoolStats", "SequencePool", "Slot", "SlotState"]
