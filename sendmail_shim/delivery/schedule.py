"""The deferred queue in memory, by next attempt: what a queue run takes without a scan.

Trusts: its own entries only as hints (the runner checks each against the message's
status when it comes due).
Guarantees: thread safe; about 50 bytes an entry (an int: the time in milliseconds
above the 64-bit queue id), so 100,000 deferred messages cost about 5 MB.
"""

from __future__ import annotations

import heapq
import math
import threading

_ID_MASK = (1 << 64) - 1


class Schedule:
    """Deferred messages by their next attempt: the runner's in-memory index.

    Built once from ``deferred/`` in the background at start, then fed by the
    runner's own deferrals, so an idle runner reads nothing.  A heap of ints
    (the time in milliseconds above the 64-bit queue id: about 50 bytes a
    message, 5 MB for 100,000).  An entry is a hint, checked against the
    message's status when it comes due: one that is stale (rescheduled since)
    or gone (delivered, held, deleted) costs one read and is dropped.  Thread
    safe (the runner's disk work runs in threads).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heap: list[int] = []

    def __len__(self) -> int:
        return len(self._heap)

    def put(self, queue_id: str, when: float) -> None:
        key = (max(0, math.ceil(when * 1000)) << 64) | int(queue_id, 16)
        with self._lock:
            heapq.heappush(self._heap, key)

    def take_due(self, now: float, most: int) -> list[str]:
        """Remove and return up to ``most`` queue ids due at ``now`` (earliest first)."""
        limit = (math.floor(now * 1000) + 1) << 64
        out: list[str] = []
        with self._lock:
            while self._heap and self._heap[0] < limit and len(out) < most:
                out.append(f"{heapq.heappop(self._heap) & _ID_MASK:016X}")
        return out

    def clear(self) -> None:
        with self._lock:
            self._heap.clear()

    def next_time(self) -> float | None:
        """When the earliest deferred message is due; None when nothing is deferred."""
        with self._lock:
            return (self._heap[0] >> 64) / 1000 if self._heap else None

