"""Intake: one submission, from either road, to a verdict and a durable queue file.

Trusts: the :class:`~sendmail_shim.identity.Caller` it is given, whose uid the
kernel vouched for (peer credentials or drop-file owner); nothing else.
Guarantees, in this order: identify (uid + hints -> site) -> compose ->
suspended? -> sender policy -> policy checks -> quota (checked and reserved in
one transaction) -> spool commit -> "accepted".  The verdict is "accepted"
only after ``spool.commit`` returned, so the message is on disk; a failed
commit gives its quota reservation back.  Outbreak rules run after a quota
refusal and after an acceptance, and suspend the site when they trip.  Every
outcome is logged in one line with the queue id, site, uid and script.
"""

from __future__ import annotations

import logging
import time

from sendmail_shim import outbreak, outcome, policy, spool, sysexits
from sendmail_shim.compose import CompositionError, Submission, compose, mail_date
from sendmail_shim.config import Config, Site
from sendmail_shim.identity import Caller, identify
from sendmail_shim.operations import suspend_site
from sendmail_shim.quota import check_quota
from sendmail_shim.sender import apply_sender_policy
from sendmail_shim.state import ACCEPTED, RCPT_DOMAIN, REFUSED_QUOTA, State

log = logging.getLogger("sendmail_shim.intake")


def _trip(config: Config, state: State, site: Site, reason: str | None) -> None:
    if reason is not None:
        suspend_site(config, state, site.name, reason, "outbreak rule")


def accept_submission(
    config: Config, state: State, fields: list[tuple[str, str]], message: bytes,
    caller: Caller, origin: str = "socket",
) -> outcome.Verdict:
    """Identify, compose, check and queue one message; the verdict for the caller."""
    sub = Submission.from_fields(fields)
    caller = Caller(caller.uid, caller.gid, caller.pid, sub.cwd, caller.script, sub.site)
    ident = identify(config, caller)
    if ident.site is None:
        log.warning("refused uid=%d pid=%s origin=%s reason=%r",
                    caller.uid, caller.pid, origin, ident.reason)
        return outcome.refused(f"not permitted: {ident.reason}")
    site = ident.site
    queue_id = spool.new_queue_id()
    now = time.time()
    try:
        envelope, final = compose(sub, message, site, caller, config, queue_id, now)
    except CompositionError as exc:
        log.warning("refused site=%s uid=%d origin=%s reason=%r", site.name, caller.uid,
                    origin, str(exc))
        return outcome.Verdict(exc.code, exc.enhanced, sysexits.EX_DATAERR,
                               f"site {site.name}: {exc}; nothing was queued")
    envelope.origin = origin
    facts = (f"queue_id={queue_id} site={site.name} uid={caller.uid} pid={caller.pid} "
             f"script={envelope.script} origin={origin}")
    suspended = state.suspension(site.name)
    if suspended is not None:
        log.warning("refused %s reason=suspended", facts)
        return outcome.refused(
            f"site {site.name} is suspended since {mail_date(suspended[0])} ({suspended[1]}); "
            f"nothing was queued. The operator lifts it with 'sendmail-shim-admin site resume "
            f"{site.name}'")
    rewritten = apply_sender_policy(site, config, envelope, final)
    if isinstance(rewritten, outcome.Verdict):
        log.warning("refused %s sender=<%s> reason=%r", facts, envelope.sender, rewritten.text)
        return rewritten
    final, notes = rewritten
    envelope.size = len(final)
    verdict = policy.evaluate(policy.Request(config, site, envelope))
    if verdict is not None:
        log.warning("refused %s sender=<%s> nrcpt=%d status=%d reason=%r", facts,
                    envelope.sender, len(envelope.recipients), verdict.code, verdict.text)
        return verdict
    nrcpt = len(envelope.recipients)
    with state.transaction():
        verdict = check_quota(config, state, site, caller.uid, nrcpt, now)
        if verdict is not None:
            state.record(site.name, caller.uid, REFUSED_QUOTA, nrcpt, envelope.script, ts=now)
        else:
            reservation = state.record(site.name, caller.uid, ACCEPTED, nrcpt, envelope.script,
                                       ts=now)
    if verdict is not None:
        log.warning("refused %s sender=<%s> nrcpt=%d status=%d reason=quota text=%r", facts,
                    envelope.sender, nrcpt, verdict.code, verdict.text)
        _trip(config, state, site, outbreak.after_quota_refusal(state, site, now))
        return verdict
    try:
        spool.commit(config.layout, envelope, final)
    except OSError as exc:
        state.forget(reservation)
        log.error("tempfail %s reason=%r", facts, f"spool write failed: {exc}")
        return outcome.tempfail(
            f"site {site.name}: the spool could not store the message ({exc.strerror}); "
            "nothing was queued, try again later"
        )
    for domain in sorted({r.rsplit("@", 1)[-1].lower() for r in envelope.recipients}):
        state.record(site.name, caller.uid, RCPT_DOMAIN, 1, envelope.script, domain, ts=now)
    log.info("accepted %s sender=<%s> nrcpt=%d size=%d identity=%r%s", facts, envelope.sender,
             nrcpt, envelope.size, ident.reason, "".join(" " + n for n in notes))
    _trip(config, state, site, outbreak.after_accept(state, site, envelope.script, now))
    return outcome.accepted(f"Ok: queued as {queue_id}")
