"""Intake workers: the threads every road's intake runs on, shared among the calling uids.

Trusts: the uid it is given (the kernel's: SO_PEERCRED, a drop file's owner, the
capture listener's /proc proof).
Guarantees: the intake (``intake.accept.accept_submission``: state, compose,
commit) of the hand-off socket (and so of ``-bs``, which hands off through it)
and of the capture listener runs on THREADS threads of its own, not on the
loop's default executor that the queue runner, the pickup scan and listings
use; and one uid runs at most SHARE intakes at once, whatever it sends
through any of these roads.  A site that submits expensive messages in
parallel waits for its own share (its connections hold their own slots,
daemon/submission.py) while the other THREADS - SHARE threads stay free for
everyone else: another site's hand-off never queues behind it.  (Drop files
are taken by pickup's own threads, one owner at a time in turn: daemon/pickup.py.)
The intake's work is itself bounded per message (intake/compose.py), so a share
is held for a bounded time.

:class:`PerUid` is the one per-uid slot keeper: the intake's shares here and the
capture listener's session slots (daemon/capture.py) both use it.

:meth:`IntakeWorkers.close` joins the threads; the daemon calls it before it
closes the state, so no intake ever uses a closed database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
THREADS = 8  # intake threads in all
SHARE = 2  # intakes one uid may run at once


class SlotTimeout(Exception):
    """No slot of the uid became free in time."""


class PerUid:
    """``size`` slots per uid; a uid's entry is forgotten when nobody holds or waits."""

    def __init__(self) -> None:
        self._open: dict[int, int] = {}  # holding or waiting
        self._slots: dict[int, asyncio.Semaphore] = {}

    def open(self, uid: int) -> int:
        return self._open.get(uid, 0)

    @contextlib.asynccontextmanager
    async def slot(self, uid: int, size: int, wait: float | None = None) -> AsyncIterator[None]:
        """Hold one of ``uid``'s slots; :class:`SlotTimeout` after ``wait`` seconds."""
        self._open[uid] = self._open.get(uid, 0) + 1
        slots = self._slots.setdefault(uid, asyncio.Semaphore(size))
        try:
            try:
                async with asyncio.timeout(wait):
                    await slots.acquire()
            except TimeoutError:
                raise SlotTimeout from None
            try:
                yield
            finally:
                slots.release()
        finally:
            self._open[uid] -= 1
            if not self._open[uid]:
                del self._open[uid]
                del self._slots[uid]


class IntakeWorkers:
    """The intake's threads and each uid's share of them (see the module docstring)."""

    def __init__(self, threads: int = THREADS, share: int = SHARE) -> None:
        self.share = share
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="intake")
        self._shares = PerUid()

    async def run(self, uid: int, work: Callable[..., T], *args: object) -> T:
        """``work(*args)`` on an intake thread, within ``uid``'s share."""
        async with self._shares.slot(uid, self.share):
            return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    def close(self) -> None:
        """Wait for the intakes in hand (blocking); no new one starts."""
        self._pool.shutdown(wait=True)
