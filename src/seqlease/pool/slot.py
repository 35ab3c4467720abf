"""A pool slot: one llama.cpp sequence and the bookkeeping of whoever holds it."""

from __future__ import annotations

import enum
import threading

__all__ = ["Slot", "SlotState"]


class SlotState(enum.Enum):
    """Where a slot is in its cycle: FREE -> LEASED -> CLEARING -> FREE (or QUARANTINED)."""

    FREE = "free"
    LEASED = "leased"
    #: Released; its session is being closed and its memory cleared before it is handed on.
    CLEARING = "clearing"
    #: Its memory could not be cleared: kept out of service so no one sees another's tokens.
    QUARANTINED = "quarantined"


class Slot:
    """The long-lived side of a lease; handles come and go, the slot stays.

    ``lease_number`` grows by one on every lease, so a handle can tell that the slot has moved on
    to a new owner. All fields are guarded by the pool's lock.
    """

    __slots__ = ("lease_number", "leased_at", "origin", "seq_id", "state", "thread")

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.lease_number = 0
        self.state = SlotState.FREE
        self.origin = ""
        self.thread: threading.Thread | None = None
        self.leased_at = 0.0

    def __lt__(self, other: Slot) -> bool:
        # Free slots are kept in a heap: the lowest id is leased first.
        return self.seq_id < other.seq_id

    def __repr__(self) -> str:
        return f"<Slot seq={self.seq_id} lease=#{self.lease_number} {self.state.value}>"
