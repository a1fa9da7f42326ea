"""Intake: one submission, from either road, to a verdict and a durable queue file.

Trusts: the :class:`~sendmail_shim.policy.identity.Caller` it is given, whose uid the
kernel vouched for (peer credentials or drop-file owner); nothing else.
Guarantees, in this order: identify (uid + hints -> site) -> suspended? ->
over quota already? -> over its share of a spool running out of space
(policy/spoolshare.py)? -> the line-ending
rule (wire/lineends.py: LF line ends and no CR from here on, for every road;
a CR or NUL inside the header block is refused, 554 5.6.0 / exit 65) -> compose ->
sender policy -> policy checks -> content score (only with
``scan.mode: before_ack``, policy/content.py: above ``scan.max_score``
refused, nothing queued) -> quota (checked and reserved in one transaction)
-> spool commit -> "accepted".  The verdict is "accepted"
only after ``spool.commit`` returned, so the message is on disk; a failed
commit gives its quota reservation back.  Outbreak rules run after a quota
refusal and after an acceptance, and suspend the site when they trip.  A drop
file (``origin="maildrop"``) over its quota is not refused to anyone: its
writer got exit 0 long ago and pickup tries it again at each scan until the
window allows (daemon/pickup.py), so it is neither counted as a quota refusal
nor run through the quota_refusals rule, before compose or after it: a retry
is never a fresh refusal.  Every outcome is logged in one line with the queue
id, site, uid and script.

The cheap refusals come before any work proportional to the message: a
suspended site, and a site (or account) whose quota leaves no room for even
one more message of one recipient (``check_quota``, a read of the bucketed
counters, no transaction), are refused before compose reads a byte of it
(not a copy of a submission id already known: that one is "already queued");
such a quota refusal is counted and runs the outbreak rules as the one after
compose does.  Compose then stops at its own limits (the header block's size
and fields, the recipient count: intake/compose.py).

The state work per message is bounded whatever the site's traffic: the suspension
and the quota overrides are read from memory, the quota and the rules read
bucketed counters (``store.state``).

Submission ids: a request may carry ``subid`` (the front end sends the same
one on the socket and, when that fails, in the drop file).  The id is looked
up and claimed for the caller's uid in the quota transaction, before the
commit; a second submission of a committed id is answered "250 already
queued as <id>" and not queued again (a drop file is then unlinked, logged
``duplicate``); one whose first copy is being committed right now gets 451
(the drop file waits for the next scan).  A failed commit releases the id.
A commit that finds its queue id in use (``spool.QueueIdTaken``: nothing
written) is given back and the intake runs again under a new id, up to
MAX_ID_CLASHES times.
A crash between the commit and its confirmation leaves a claimed row that
the daemon settles at start from the spool (``settle_submissions``), so a
crash never loses mail.  The one documented duplicate: the confirmation
write fails (disk full) and the message is delivered and removed before its
drop-file copy arrives.

Storage trouble (ENOSPC, quota, SQLite "database or disk is full" or
"disk I/O error") never escapes as an exception: it is a 451 / exit 75 that
names the spool's disk, ``4.3.1`` (mail system full) when the disk is full,
else ``4.3.0`` (the daemon then sweeps the drop area and tries once more:
daemon/dropspace.py).  Bookkeeping after the commit (recipient domains,
outbreak rules) cannot turn an accepted message into a failure.

SQLite work per accepted message: two write transactions, the quota one
before the commit and one after it for the submission id's confirmation and
the recipient domains (when that one fails, the claimed row is settled as
above and the domains are not counted), then the outbreak rules' reads.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from collections.abc import Callable

from sendmail_shim.config import Config, Site
from sendmail_shim.intake.compose import CompositionError, Submission, compose
from sendmail_shim.policy import content, outbreak, spoolshare
from sendmail_shim.policy import limits as policy
from sendmail_shim.policy.identity import Caller, identify
from sendmail_shim.policy.quota import check_quota, reserve_quota
from sendmail_shim.policy.sanctions import suspend_site
from sendmail_shim.policy.sender import apply_sender_policy
from sendmail_shim.store import outcome, spool
from sendmail_shim.store.headers import mail_date
from sendmail_shim.store.state import REFUSED_QUOTA, State
from sendmail_shim.wire import lineends, protocol, sysexits
from sendmail_shim.wire.logline import Angled, Fields

log = logging.getLogger(__name__)
MAX_ID_CLASHES = 3  # spool.QueueIdTaken: intakes under a new id before a 451


def storage_trouble(layout_root: str, exc: BaseException) -> str | None:
    """Words for a full or failing disk under the spool; None for other errors."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the disk holding the spool {layout_root} "
                f"({exc.strerror}); the operator must free space there")
    if isinstance(exc, OSError) and exc.errno == errno.EIO:
        return f"the disk holding the spool {layout_root} failed to write ({exc.strerror})"
    if isinstance(exc, sqlite3.Error):
        return (f"the state database in {layout_root}/state could not be written ({exc}): "
                f"no space left on the disk holding the spool {layout_root}, or it is failing; "
                "the operator must free space there")
    return None


def storage_status(exc: BaseException) -> str:
    """RFC 3463 status of a storage failure: 4.3.1 (mail system full) for a full disk."""
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(exc, sqlite3.Error) and "full" in str(exc))
    return "4.3.1" if full else "4.3.0"


def settle_submissions(config: Config, state: State) -> None:
    """At start: confirm claimed submission ids whose message is in the spool, drop the rest.

    No writer is alive then, so a claimed row without a queue file belongs to
    a commit that never happened and must not stop a later copy.
    """
    for uid, subid, queue_id in state.unresolved_submissions():
        committed = spool.find_state(config.layout, queue_id) is not None
        state.end_submission(uid, subid, committed)
        log.info("settled subid=%s uid=%d queue_id=%s committed=%s", subid, uid, queue_id,
                 "yes" if committed else "no")


def _known_submission(config: Config, state: State, uid: int, subid: str
                      ) -> tuple[str, bool] | None:
    """(queue id, in flight) when this submission was queued or is being queued now."""
    row = state.submission(uid, subid)
    if row is None:
        return None
    queue_id, committed = row
    if state.in_flight(uid, subid):
        return queue_id, True
    if committed or spool.find_state(config.layout, queue_id) is not None:
        return queue_id, False
    return None  # a claim whose commit never happened (or could not be confirmed)


def _trip(config: Config, state: State, site: Site, reason: str | None) -> None:
    if reason is not None:
        suspend_site(config, state, site.name, reason, "outbreak rule")


def accept_submission(
    config: Config, state: State, fields: list[tuple[str, str]], message: bytes,
    caller: Caller, origin: str = "socket", clashes: int = 0,
) -> outcome.Verdict:
    """Identify, compose, check and queue one message; the verdict for the caller."""
    started = time.monotonic()  # the accepted line's ms= (the accept->250 metric)
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
    early = Fields(queue_id=queue_id, site=site.name, uid=caller.uid, pid=caller.pid,
                   script=caller.script, origin=origin)  # before compose: no header read
    suspended = state.suspension(site.name)
    if suspended is not None:
        log.warning("refused %s reason=suspended", early)
        return outcome.refused(
            f"site {site.name} is suspended since {mail_date(suspended[0])} ({suspended[1]}); "
            f"nothing was queued. The operator lifts it with 'sendmail-shim-admin site resume "
            f"{site.name}'")
    subid = protocol.submission_id(fields)
    # A copy of a submission already seen (the drop file of a socket hand-off whose
    # reply was lost) is answered "already queued" below, even when its first copy
    # took the last of the quota: only a new submission is refused here.
    over = (check_quota(config, state, site, caller.uid, 1, now)
            if subid is None or state.submission(caller.uid, subid) is None else None)
    if over is not None:
        return _refuse_quota(config, state, site, early, caller.uid, None, over, now, origin)
    crowded = spoolshare.over_share(config, site.name, len(message))
    if crowded is not None:  # the spool's disk runs low and this site holds its share
        log.warning("tempfail %s size=%d reason=%r", early, len(message), crowded.text)
        return crowded
    try:  # the line-ending rule first: every later step reads the lines the relay gets
        envelope, final = compose(sub, lineends.normalize(message), site, caller, config,
                                  queue_id, now)
    except (CompositionError, lineends.LineEndError) as exc:
        log.warning("refused site=%s uid=%d origin=%s status=%d enhanced=%s reason=%r",
                    site.name, caller.uid, origin, exc.code, exc.enhanced, str(exc))
        return outcome.Verdict(exc.code, exc.enhanced, sysexits.EX_DATAERR,
                               f"site {site.name}: {exc}; nothing was queued")
    envelope.origin = origin
    facts = Fields(queue_id=queue_id, site=site.name, uid=caller.uid, pid=caller.pid,
                   script=envelope.script, origin=origin)  # the script is the site's words
    rewritten = apply_sender_policy(site, config, envelope, final)
    if isinstance(rewritten, outcome.Verdict):
        log.warning("refused %s sender=<%s> status=%d enhanced=%s reason=%r", facts,
                    envelope.sender, rewritten.code, rewritten.enhanced, rewritten.text)
        return rewritten
    final, notes = rewritten
    envelope.size = len(final)
    verdict = policy.evaluate(policy.Request(config, site, envelope))
    if verdict is not None:
        log.warning("refused %s sender=<%s> nrcpt=%d status=%d enhanced=%s reason=%r", facts,
                    envelope.sender, len(envelope.recipients), verdict.code, verdict.enhanced,
                    verdict.text)
        return verdict
    score, unscored = content.score_before_ack(config, site.name, final, origin)
    if score is not None and content.decide(config, score) == "hold":
        return _refuse_content(config, state, site, facts, envelope.uid, score, now)
    if unscored not in ("", "after_commit"):
        log.info("scan_deferred %s reason=%r action='scored by the queue runner after the "
                 "commit'", facts, unscored)
    nrcpt = len(envelope.recipients)
    known: tuple[str, bool] | None = None
    claimed = False
    layout = config.layout  # built once: the property makes a new SpoolLayout each time
    root = layout.root
    try:
        with state.transaction():
            if subid is not None:
                known = _known_submission(config, state, caller.uid, subid)
            if known is None:
                verdict, reserved = reserve_quota(config, state, site, caller.uid, nrcpt,
                                                  envelope.script, now)
                if reserved is None:
                    if origin != "maildrop":  # a drop file waits (see the docstring)
                        state.record(site.name, caller.uid, REFUSED_QUOTA, nrcpt,
                                     envelope.script, ts=now)
                else:
                    reservation = reserved
                    if subid is not None:
                        state.claim_submission(caller.uid, subid, queue_id, now)
                        claimed = True
    except BaseException as exc:
        if claimed and subid is not None:
            state.drop_in_flight(caller.uid, subid)  # the transaction was rolled back
        if not isinstance(exc, sqlite3.Error):
            raise
        why = storage_trouble(root, exc)
        log.error("tempfail %s reason=%r", facts, why)
        return outcome.tempfail(f"site {site.name}: {why}; nothing was queued, try again later",
                                storage_status(exc))
    if known is not None:
        first, in_flight = known
        facts = facts.replaced(queue_id=first)
        if in_flight:
            log.info("in_flight %s subid=%s action='retry later'", facts, subid)
            return outcome.tempfail(f"site {site.name}: this submission is being queued right "
                                    f"now as {first}; try again shortly")
        log.info("duplicate %s subid=%s action='already queued; not queued again'", facts, subid)
        return outcome.accepted(f"Ok: already queued as {first}")
    if verdict is not None:
        log.warning("refused %s sender=<%s> nrcpt=%d status=%d enhanced=%s reason=quota "
                    "text=%r", facts, envelope.sender, nrcpt, verdict.code, verdict.enhanced,
                    verdict.text)
        if origin != "maildrop":  # a drop file waits for its window (see the docstring)
            _after(facts, lambda: _trip(config, state, site,
                                        outbreak.after_quota_refusal(state, site, now)))
        return verdict
    try:
        if score is not None:  # before_ack scored it: the runner does not score it again
            spool.write_status(layout, queue_id,
                               spool.Status(score=score, scanned=spool.SCANNED_OK))
        spool.commit(layout, envelope, final)
    except OSError as exc:
        if score is not None:
            _after(facts, lambda: spool.forget_status(layout, queue_id))
        _after(facts, lambda: state.forget(reservation))
        if subid is not None:
            _after(facts, lambda: state.end_submission(caller.uid, subid, committed=False))
        if isinstance(exc, spool.QueueIdTaken) and clashes < MAX_ID_CLASHES:
            # Nothing was written: the whole intake again, under a new id (the id is in
            # the Received and Message-Id lines), so no message is ever replaced.
            log.warning("queue_id_clash %s action='taken again under a new queue id'", facts)
            return accept_submission(config, state, fields, message, caller, origin,
                                     clashes + 1)
        why = storage_trouble(root, exc) or f"the spool {root} could not store the message " \
                                              f"({exc.strerror or exc})"
        log.error("tempfail %s reason=%r", facts, f"spool write failed: {why}")
        return outcome.tempfail(f"site {site.name}: {why}; nothing was queued, try again later",
                                storage_status(exc))
    # The message is on disk: from here on nothing may turn it into a failure.
    spoolshare.note_queued(config, site.name, envelope.size)
    domains = sorted({r.rsplit("@", 1)[-1].lower() for r in envelope.recipients})

    def confirm() -> None:
        """The id's confirmation and the recipient domains: one SQLite write, not two."""
        with state.transaction():
            if subid is not None:
                state.end_submission(caller.uid, subid, committed=True)
            state.record_domains(site.name, domains, now)

    _after(facts, confirm)
    more = Fields(*([("subid", subid)] if subid else []), *((k, Angled(v)) for k, v in notes))
    log.info("accepted %s sender=<%s> nrcpt=%d size=%d identity=%r %s ms=%.1f", facts,
             envelope.sender, nrcpt, envelope.size, ident.reason, more,
             (time.monotonic() - started) * 1000)
    _after(facts, lambda: _trip(config, state, site,
                                outbreak.after_accept(state, site, envelope.script, now)))
    if score is not None:
        log.info("scanned queue_id=%s site=%s score=%.1f max_score=%g action=deliver",
                 queue_id, site.name, score, config.scan.max_score)
        _after(facts, lambda: _count_score(config, state, site, envelope.uid, score, now))
    return outcome.accepted(f"Ok: queued as {queue_id}")


def _refuse_quota(config: Config, state: State, site: Site, facts: Fields, uid: int,
                  script: str | None, verdict: outcome.Verdict, now: float,
                  origin: str) -> outcome.Verdict:
    """Over quota before compose: counted and logged as the later refusal, rules run
    (not for a drop file, which waits for its window: see the module docstring)."""
    log.warning("refused %s nrcpt=1 status=%d enhanced=%s reason=quota text=%r", facts,
                verdict.code, verdict.enhanced, verdict.text)
    if origin == "maildrop":
        return verdict
    _after(facts, lambda: state.record(site.name, uid, REFUSED_QUOTA, 1, script, ts=now))
    _after(facts, lambda: _trip(config, state, site,
                                outbreak.after_quota_refusal(state, site, now)))
    return verdict


def _count_score(config: Config, state: State, site: Site, uid: int, score: float,
                 now: float) -> None:
    """A before_ack score counts toward the spam_score rule as the runner's do."""
    state.record(site.name, uid, outbreak.SCANNED, n=outbreak.score_weight(score), ts=now)
    _trip(config, state, site, outbreak.after_scan(state, site, now))


def _refuse_content(config: Config, state: State, site: Site, facts: Fields, uid: int,
                    score: float, now: float) -> outcome.Verdict:
    """scan.mode before_ack: a message above scan.max_score is refused, nothing queued."""
    limit = config.scan.max_score
    log.warning("scanned %s score=%.1f max_score=%g action=refuse", facts, score, limit)
    _after(facts, lambda: _count_score(config, state, site, uid, score, now))
    return outcome.refused(
        f"site {site.name}: the message scored {score:.1f} with SpamAssassin, above the "
        f"limit {limit:g}; nothing was queued. Change the message, or ask the operator "
        "(scan.max_score)")


def _after(facts: Fields, step: Callable[[], object]) -> None:
    """Run bookkeeping whose failure (a full disk) must not change the verdict."""
    try:
        step()
    except (sqlite3.Error, OSError) as exc:
        log.warning("bookkeeping_failed %s reason=%r action='the verdict stands; free space "
                    "on the spool disk'", facts, str(exc))
