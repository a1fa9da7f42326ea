"""One delivery attempt's outcome on its way to the disk: status, bounce, removal or deferral.

Trusts: the outcomes the sessions return (one per recipient) and the queue files
(re-validated on read: a file that does not parse moves to ``corrupt/``).
Guarantees:

* a message leaves the spool only when every recipient has a final outcome
  (delivered or bounced).  A message delivered to all its recipients is only
  removed (no status is written, the removal is not fsync'd): a crash before
  that reaches the disk re-sends it (at-least-once, as every MTA), never
  skips it.  Refused recipients are written to ``status/`` before their
  bounce is queued (never two bounces), waiting ones with the deferral;
* bookkeeping that fails (a full disk: the status, the bounce, the removal)
  never makes the runner send again: the attempt's outcome is kept in
  :attr:`Recorder.unsaved`, the runner pauses delivery and first retries it
  (:meth:`Recorder.retry_unsaved`), step by step from where it stopped;
* temporary trouble waits with exponential backoff and jitter
  (:func:`backoff`); after ``retry.lifetime`` in the queue the remaining
  recipients are bounced;
* a message that broke the runner is deferred with ``last_error`` naming the
  exception, and after :data:`MAX_INTERNAL_FAILURES` in a row it moves to hold
  for the operator (:meth:`Recorder.internal_failure`).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field, replace

from sendmail_shim.config import Config
from sendmail_shim.delivery import bounce
from sendmail_shim.delivery.removal import Removal, Removals
from sendmail_shim.delivery.schedule import Schedule
from sendmail_shim.store import spool
from sendmail_shim.store.address import printable
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import OK, PERM, Outcome

log = logging.getLogger(__name__)
MAX_INTERNAL_FAILURES = 3  # in a row; then the message waits in hold for the operator


def backoff(config: Config, attempts: int) -> float:
    """Seconds to wait after ``attempts`` failed attempts."""
    policy = config.retry
    exponent = min(max(0, attempts - 1), 60)  # 2**60 * initial is past any maximum
    delay: float = min(policy.maximum, policy.initial * (2.0 ** exponent))
    return delay * (1 + random.uniform(-policy.jitter, policy.jitter))


@dataclass
class Attempt:
    """One attempt's outcome on its way to the disk, step by step (see _persist)."""

    state: str
    queue_id: str
    env: Envelope
    message: bytes
    status: spool.Status  # done, failed and delayed recipients of this attempt
    new_failures: dict[str, Outcome]
    deferred: spool.Status | None  # the status to write when recipients wait; None: remove
    delay: float = 0.0
    first: Outcome | None = None
    step: int = 0  # 0 status (if refusals), 1 queue the bounce, 2 remove or defer, 3 done
    notice: str | None = field(default=None)



class Recorder:
    """Writes each attempt's outcome (runs in threads); keeps what the disk refused.

    ``config`` is the runner's current configuration (replaced on a reload);
    ``schedule`` gets every deferral's next attempt.
    """

    def __init__(self, config: Config, schedule: Schedule) -> None:
        self.config = config
        self.schedule = schedule
        self.unsaved: list[Attempt] = []  # outcomes the disk refused: delivery is paused
        self.removals = Removals()  # delivered messages, unlinked in the background

    @property
    def blocked(self) -> bool:
        """Bookkeeping the disk refused waits (an outcome or a removal): send nothing."""
        return bool(self.unsaved or self.removals.failed)

    def retry_unsaved(self) -> bool:
        """Write the outcomes that failed before; True when all of them are on disk now."""
        if self.removals.failed and not self.removals.retry_failed():
            return False
        while self.unsaved:
            attempt = self.unsaved[0]
            try:
                self.persist(attempt)
            except OSError:
                return False
            self.unsaved.pop(0)
            log.info("resumed queue_id=%s site=%s: its delivery is recorded; delivery "
                     "continues", attempt.queue_id, attempt.env.site)
        return True

    def corrupt(self, queue_id: str, state: str, why: str) -> None:
        log.error("corrupt queue_id=%s state=%s reason=%r action='moved to corrupt/; "
                  "inspect it with sendmail-shim-admin queue show'", queue_id, state, why)
        try:
            spool.move(self.config.layout, queue_id, state, spool.CORRUPT)
        except OSError:
            pass

    def internal_failure(self, state: str, queue_id: str, site_name: str,
                          exc: Exception) -> None:
        """Defer (or, after repeated failures, hold) one message that broke (in a thread)."""
        layout = self.config.layout
        reason = f"internal error: {exc.__class__.__name__}: {printable(str(exc))}"
        try:
            status = spool.read_status(layout, queue_id)
            status.internal_failures += 1
            status.attempts += 1
            status.last_error = reason
            delay = backoff(self.config, status.attempts)
            status.next_attempt = time.time() + delay
            hold = status.internal_failures >= MAX_INTERNAL_FAILURES
            target = spool.HOLD if hold else spool.DEFERRED
            spool.write_status(layout, queue_id, status)
            if state != target:
                spool.move(layout, queue_id, state, target)
        except FileNotFoundError:
            log.info("moved_meanwhile queue_id=%s site=%s", queue_id, printable(site_name))
            return
        except Exception:
            if state == spool.DEFERRED:  # still there: try it again after the backoff
                self.schedule.put(queue_id, time.time() + backoff(self.config, 1))
            log.exception("internal_error queue_id=%s site=%s reason=%r action='could not "
                          "record the failure either; it is retried in the next run: see "
                          "the traceback'", queue_id, printable(site_name), reason)
            return
        if not hold:
            self.schedule.put(queue_id, status.next_attempt)
        if hold:
            action = (f"held after {status.internal_failures} internal failures: inspect it "
                      f"with 'sendmail-shim-admin queue show {queue_id}', then 'queue release "
                      f"{queue_id}' once fixed or 'queue delete {queue_id}'")
        else:
            action = (f"deferred, retried in {int(delay)}s; held after "
                      f"{MAX_INTERNAL_FAILURES} such failures in a row")
        log.error("internal_error queue_id=%s site=%s attempts=%d reason=%r action=%r",
                  queue_id, printable(site_name), status.attempts, reason, action,
                  exc_info=exc)

    def after_attempt(self, state: str, queue_id: str, entry: tuple[Envelope, bytes] | None,
                       results: dict[str, Outcome], trouble: Outcome | None,
                       status: spool.Status | None = None) -> bool:
        """Record one attempt: status, bounces, removal or deferral (runs in a thread).

        True when it queued a bounce, which the caller's loop should deliver soon.
        """
        layout = self.config.layout
        if entry is None:
            try:
                entry = spool.read_entry(layout, state, queue_id)
            except (OSError, ValueError) as exc:
                self.corrupt(queue_id, state, str(exc))
                return False
        env, message = entry
        site, sender = printable(env.site), printable(env.sender)  # one log line each
        if status is None:
            status = spool.read_status(layout, queue_id)
        pending = [r for r in env.recipients if r not in status.done and r not in status.failed]
        if trouble is not None:
            results = dict.fromkeys(pending, trouble)
        now = time.time()
        new_failures: dict[str, Outcome] = {}
        temp: dict[str, Outcome] = {}
        for rcpt in pending:
            out = results.get(rcpt) or Outcome.network("no result for this recipient")
            if out.kind == OK:
                status.done.append(rcpt)
                log.info("delivered queue_id=%s site=%s uid=%d rcpt=<%s> relay=%s status=%d "
                         "reply=%r", queue_id, site, env.uid, printable(rcpt), out.relay,
                         out.code, out.text)
            elif out.kind == PERM:
                new_failures[rcpt] = out
            else:
                temp[rcpt] = out
        if temp and now - env.arrival > self.config.retry.lifetime:
            days = self.config.retry.lifetime / 86400
            for rcpt, out in temp.items():
                new_failures[rcpt] = Outcome(PERM, 0, f"message expired after {days:g} days "
                                             f"in the queue; last error: {out.describe()}",
                                             out.relay)
            temp = {}
        for rcpt, out in new_failures.items():
            status.failed[rcpt] = out.describe()
            log.warning("bounced queue_id=%s site=%s uid=%d sender=<%s> rcpt=<%s> relay=%s "
                        "status=%d reply=%r", queue_id, site, env.uid, sender, printable(rcpt),
                        out.relay, out.code, out.text)
        status.delayed = {r: o.describe() for r, o in temp.items()}
        status.internal_failures = 0  # this attempt ran to its end
        attempt = Attempt(state, queue_id, env, message, status, new_failures, None)
        if temp:
            attempt.deferred = replace(status, attempts=status.attempts + 1)
            attempt.delay = backoff(self.config, attempt.deferred.attempts)
            attempt.first = next(iter(temp.values()))
            attempt.deferred.next_attempt = now + attempt.delay
            attempt.deferred.last_error = attempt.first.describe()
        try:
            self.persist(attempt)
        except OSError as exc:
            self.unsaved.append(attempt)
            log.error("paused queue_id=%s site=%s reason=%r action='cannot record the outcome "
                      "of this attempt (free space on the disk holding %s); delivery stops and "
                      "nothing is sent again until it is written'", queue_id, printable(env.site),
                      str(exc), layout.root)
        return attempt.notice is not None

    def persist(self, attempt: Attempt) -> None:
        """Status (with failures), the bounce, then removal or deferral; resumable after
        OSError.  A message whose recipients were all delivered writes nothing: it is
        removed (a crash first means one more delivery, never a loss)."""
        layout = self.config.layout
        queue_id, env, status = attempt.queue_id, attempt.env, attempt.status
        if attempt.step == 0:
            if attempt.new_failures:
                # Failures are on disk before their bounce is queued: never two bounces.
                spool.write_status(layout, queue_id, status)
            attempt.step = 1
        if attempt.step == 1:
            if attempt.new_failures:
                attempt.notice = bounce.queue_bounce(self.config, env, attempt.message,
                                                     attempt.new_failures)
                if attempt.notice:
                    log.info("bounce_queued queue_id=%s bounce_of=%s to=<%s>", attempt.notice,
                             queue_id, printable(env.sender))
            attempt.step = 2
        if attempt.step == 2:
            if attempt.deferred is None:  # every recipient is done: removed in the background
                self.removals.add(Removal(layout, queue_id, attempt.state, env.site,
                                          len(status.done), len(status.failed)))
            else:
                deferred, first = attempt.deferred, attempt.first
                assert first is not None
                spool.write_status(layout, queue_id, deferred)
                if attempt.state == spool.INCOMING:
                    with contextlib.suppress(FileNotFoundError):  # held meanwhile
                        spool.move(layout, queue_id, spool.INCOMING, spool.DEFERRED)
                self.schedule.put(queue_id, deferred.next_attempt)
                log.warning("deferred queue_id=%s site=%s uid=%d nrcpt=%d attempts=%d "
                            "retry_in=%ds relay=%s reason=%r", queue_id, printable(env.site),
                            env.uid, len(status.delayed), deferred.attempts,
                            int(attempt.delay),
                            first.relay, first.describe())
            attempt.step = 3
