"""Intake: one submission, from either road, to a verdict and a durable queue file.

Trusts: the :class:`~sendmail_shim.identity.Caller` it is given, whose uid the
kernel vouched for (peer credentials or drop-file owner); nothing else.
Guarantees: the verdict is "accepted" only after ``spool.commit`` returned,
so the message is on disk; every outcome is logged in one line with the queue
id, site, uid and script.
"""

from __future__ import annotations

import logging
import time

from sendmail_shim import outcome, policy, spool, sysexits
from sendmail_shim.compose import CompositionError, Submission, compose
from sendmail_shim.config import Config
from sendmail_shim.identity import Caller, identify

log = logging.getLogger("sendmail_shim.intake")


def accept_submission(
    config: Config, fields: list[tuple[str, str]], message: bytes, caller: Caller,
    origin: str = "socket",
) -> outcome.Verdict:
    """Identify, compose, check and queue one message; the verdict for the caller."""
    ident = identify(config, caller)
    if ident.site is None:
        log.warning("refused uid=%d pid=%s origin=%s reason=%r",
                    caller.uid, caller.pid, origin, ident.reason)
        return outcome.refused(f"not permitted: {ident.reason}")
    site = ident.site
    sub = Submission.from_fields(fields)
    caller = Caller(caller.uid, caller.gid, caller.pid, sub.cwd, caller.script)
    queue_id = spool.new_queue_id()
    try:
        envelope, final = compose(sub, message, site, caller, config, queue_id, time.time())
    except CompositionError as exc:
        log.warning("refused site=%s uid=%d origin=%s reason=%r", site.name, caller.uid,
                    origin, str(exc))
        return outcome.Verdict(554, "5.1.3", sysexits.EX_DATAERR,
                               f"site {site.name}: {exc}; nothing was queued")
    envelope.origin = origin
    verdict = policy.evaluate(policy.Request(config, site, envelope))
    if verdict is not None:
        log.warning("refused queue_id=%s site=%s uid=%d script=%s sender=<%s> nrcpt=%d "
                    "status=%d reason=%r", queue_id, site.name, caller.uid, envelope.script,
                    envelope.sender, len(envelope.recipients), verdict.code, verdict.text)
        return verdict
    try:
        spool.commit(config.layout, envelope, final)
    except OSError as exc:
        log.error("tempfail queue_id=%s site=%s uid=%d reason=%r", queue_id, site.name,
                  caller.uid, f"spool write failed: {exc}")
        return outcome.tempfail(
            f"site {site.name}: the spool could not store the message ({exc.strerror}); "
            "nothing was queued, try again later"
        )
    log.info("accepted queue_id=%s site=%s uid=%d pid=%s script=%s origin=%s sender=<%s> "
             "nrcpt=%d size=%d identity=%r", queue_id, site.name, caller.uid, caller.pid,
             envelope.script, origin, envelope.sender, len(envelope.recipients),
             envelope.size, ident.reason)
    return outcome.accepted(f"Ok: queued as {queue_id}")
