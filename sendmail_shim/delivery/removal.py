"""Delivered messages leave the spool in the background: a lane never waits for an unlink.

A message whose recipients all have their final outcome is removed: its queue file,
then its status file (``spool.remove_delivered``, not fsync'd).  Each unlink frees
blocks, and on a file system mounted with ``discard`` (or a slow disk) that waits
for the device: two unlinks cost a lane 0.3-0.5 ms a message on the 2-CPU test
machine, and with the removals on the loop's shared threads, 44 % of their time
went to them and bounded the drain.  Here a few threads of their own do it, so the
lane goes on to its next message as soon as the outcome is known (as Postfix's
queue manager removes a queue file apart from the delivery agents).

Trusts: the runner, which hands in only messages whose recipients all have their
final outcome (record.py).
Guarantees:

* a message handed in is never taken again by the runner of this process: its id
  is in :meth:`Removals.__contains__` from :meth:`Removals.add` until its files are
  gone (the runner skips such ids wherever it lists the queue), so a removal that
  has not happened yet never means a second delivery;
* a crash before a removal reaches the disk brings the message back and it is
  delivered once more (at-least-once, as before: the removal was never fsync'd);
  a SIGTERM waits for the removals handed in (``QueueRunner.run_forever``);
* a removal that fails (other than the file being gone: the operator held or
  deleted it meanwhile) is kept in :attr:`Removals.failed`, logged with the queue
  id and what to do, and retried by :meth:`Removals.retry_failed`; while one is
  kept the runner sends nothing (as for any bookkeeping the disk refuses, record.py);
* each removal logs ``removed`` (or ``moved_meanwhile``) as before, with the site
  and the counts of delivered and bounced recipients.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

from sendmail_shim.store import spool
from sendmail_shim.store.address import printable
from sendmail_shim.wire.paths import SpoolLayout

log = logging.getLogger(__name__)
REMOVERS = 3  # threads at most; one is started per removal waiting beyond the busy ones
IDLE_EXIT = 2.0  # seconds a remover thread waits for work before it ends


@dataclass(frozen=True)
class Removal:
    layout: SpoolLayout
    queue_id: str
    state: str
    site: str
    delivered: int
    bounced: int


class Removals:
    """The removals handed in and not done yet; thread safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Removal] = deque()
        self._pending: set[str] = set()  # handed in and not removed (queued, busy, failed)
        self.failed: list[Removal] = []
        self._busy = 0
        self._threads = 0

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, removal: Removal) -> None:
        with self._cond:
            self._pending.add(removal.queue_id)
            self._queue.append(removal)
            if self._threads < REMOVERS and len(self._queue) > self._threads - self._busy:
                self._threads += 1
                threading.Thread(target=self._work, name="remove", daemon=True).start()
            self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._queue, IDLE_EXIT):
                    self._threads -= 1
                    return
                removal = self._queue.popleft()
                self._busy += 1
            done = _remove(removal)
            with self._cond:
                self._busy -= 1
                if done:
                    self._pending.discard(removal.queue_id)
                else:
                    self.failed.append(removal)
                self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every removal handed in was tried; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def retry_failed(self) -> bool:
        """Try the failed removals again (in a thread); True when none is left."""
        with self._cond:
            failed, self.failed = self.failed, []
        for number, removal in enumerate(failed):
            if not _remove(removal):
                with self._cond:
                    self.failed.extend(failed[number:])
                return False
            with self._cond:
                self._pending.discard(removal.queue_id)
        return True


def _remove(removal: Removal) -> bool:
    """Unlink one delivered message's files; False when the disk refused."""
    queue_id, site = removal.queue_id, printable(removal.site)
    try:
        spool.remove_delivered(removal.layout, queue_id, removal.state)
    except FileNotFoundError:
        # Held or deleted by the operator meanwhile.
        log.info("moved_meanwhile queue_id=%s site=%s", queue_id, site)
    except OSError as exc:
        log.error("paused queue_id=%s site=%s reason=%r action='the message was delivered "
                  "but cannot be removed from %s (check the disk); delivery stops and "
                  "nothing is sent again until it is removed'", queue_id, site, str(exc),
                  removal.layout.root)
        return False
    else:
        log.info("removed queue_id=%s site=%s delivered=%d bounced=%d", queue_id, site,
                 removal.delivered, removal.bounced)
    return True
