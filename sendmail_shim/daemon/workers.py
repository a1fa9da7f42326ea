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

:meth:`IntakeWorkers.close` joins the threads; the daemon calls it before it
closes the state, so no intake ever uses a closed database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
THREADS = 8  # intake threads in all
SHARE = 2  # intakes one uid may run at once


class IntakeWorkers:
    """The intake's threads and each uid's share of them (see the module docstring)."""

    def __init__(self, threads: int = THREADS, share: int = SHARE) -> None:
        self.share = share
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="intake")
        self._slots: dict[int, asyncio.Semaphore] = {}
        self._users: dict[int, int] = {}  # uid -> intakes running or waiting for its share

    async def run(self, uid: int, work: Callable[..., T], *args: object) -> T:
        """``work(*args)`` on an intake thread, within ``uid``'s share."""
        slots = self._slots.get(uid)
        if slots is None:
            slots = self._slots[uid] = asyncio.Semaphore(self.share)
        self._users[uid] = self._users.get(uid, 0) + 1
        try:
            async with slots:
                return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)
        finally:
            self._users[uid] -= 1
            if not self._users[uid]:  # nobody holds or waits for its share now
                del self._users[uid]
                del self._slots[uid]

    def close(self) -> None:
        """Wait for the intakes in hand (blocking); no new one starts."""
        self._pool.shutdown(wait=True)
