"""The relay's answers on their way to the outbreak rules (``relay_5xx_share``), in groups.

Trusts: the writer it is given (the runner's: one state transaction, then the rule
checked once per site; it logs its own trouble).
Guarantees: :meth:`AnswerBook.record` returns only after a group holding its answers
was written and the rule checked, so a lane never runs ahead of the rule; one thread
of the book's own writes one group at a time and what is handed in meanwhile forms
the next (as ``durable.GroupSync`` does for fsyncs): under load one transaction and
one rule check per site for many messages.  The lanes wait on the event loop (a
future each), not in a thread: a waiting lane holds no worker thread, and a group
costs one wake-up of the loop, not one per message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from sendmail_shim.config import Site

log = logging.getLogger(__name__)
Answer = tuple[Site, int, str, float]  # site, uid, RELAY_OK or RELAY_5XX, time
IDLE_EXIT = 2.0  # seconds the writer thread waits for answers before it ends
_Waiter = tuple[list[Answer], asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class AnswerBook:
    """Answers handed in by the lanes, written in groups by one thread at a time."""

    def __init__(self, write: Callable[[list[Answer]], None]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._pending: list[_Waiter] = []
        self._writer = False  # a writer thread runs
        self.groups = 0  # groups written (for tests and measurements)

    async def record(self, answers: list[Answer]) -> None:
        """Return once a group holding ``answers`` was written (or its write failed)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._cond:
            self._pending.append((answers, loop, done))
            if self._writer:
                self._cond.notify()
            else:
                self._writer = True
                threading.Thread(target=self._run, name="answers", daemon=True).start()
        await done

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._pending, IDLE_EXIT):
                    self._writer = False
                    return
                batch, self._pending = self._pending, []
            try:
                self._write([answer for answers, _loop, _done in batch for answer in answers])
            except Exception:  # the writer logs its own trouble; a lane never waits forever
                log.exception("relay answers not written; the next ones are")
            self.groups += 1
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for _answers, loop, done in batch:
                by_loop.setdefault(loop, []).append(done)
            for loop, futures in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_wake, futures)
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass


def _wake(futures: list[asyncio.Future[None]]) -> None:
    for done in futures:
        if not done.done():  # a lane cancelled meanwhile (shutdown)
            done.set_result(None)
