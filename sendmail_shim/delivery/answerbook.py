"""The relay's answers on their way to the outbreak rules (``relay_5xx_share``), in groups.

Trusts: the writer it is given (the runner's: one state transaction, then the rule
checked once per site).
Guarantees: a message's answers are written, and the rule checked, before
:meth:`AnswerBook.record` returns for it, so a lane never runs ahead of the rule;
one group is written at a time and what arrives meanwhile forms the next.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from sendmail_shim.config import Site

Answer = tuple[Site, int, str, float]  # site, uid, RELAY_OK or RELAY_5XX, time


class AnswerBook:
    """The relay's answers on their way to the outbreak rules, written in groups.

    A settling thread hands in one message's answers and returns only after a group
    holding them was written (one state transaction) and the rule checked for its
    site, so a lane's next message still starts after its last answers were seen.
    One thread writes at a time; what is handed in meanwhile forms the next group
    (as ``durable.GroupSync`` does for fsyncs): under load one transaction and one
    rule check per site for many messages, instead of a write and two counts each.
    """

    def __init__(self, write: Callable[[list[Answer]], None]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._pending: list[Answer] = []
        self._handed = 0  # messages handed in
        self._written = 0  # messages whose group was written (or failed)
        self._writing = False

    def record(self, answers: list[Answer]) -> None:
        with self._cond:
            self._pending.extend(answers)
            self._handed += 1
            mine = self._handed
            while self._written < mine:
                if self._writing:
                    self._cond.wait()
                    continue
                group, self._pending, upto = self._pending, [], self._handed
                self._writing = True
                self._cond.release()
                try:
                    self._write(group)
                finally:
                    self._cond.acquire()
                    self._writing = False
                    self._written = upto
                    self._cond.notify_all()

