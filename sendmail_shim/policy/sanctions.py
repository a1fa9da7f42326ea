"""Sanctions on a site and its queued mail: suspend, resume, hold, release, delete, notify.

Both the message path (an outbreak rule in intake or the queue runner) and the
operator (the control socket, the admin command) act through these functions,
so a site suspended by a rule and one suspended by hand are the same thing.

Trusts: its caller to have decided the action (an outbreak rule or the
operator); ``actor`` names which, in every log line.
Guarantees: queue ids are validated before use; a missing site or message is an
:class:`OperationError` naming it, never a crash; a message delivered or moved
meanwhile is skipped, not an error; suspending a site holds its queued mail and
queues one notice to ``admin.notify`` listing the site's scripts of the last
hour and what to do next; :func:`hold_message` holds one message with its
reason (the content scanner's hold); :func:`notify_admin_limited` sends at most
one notice per site and topic in a period, counted in the state so the limit
survives restarts.
"""

from __future__ import annotations

import logging
import time

from sendmail_shim.config import ADMIN_SITE, Config, Site
from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.headers import mail_date
from sendmail_shim.store.state import State

log = logging.getLogger(__name__)


class OperationError(Exception):
    """The operator asked for something impossible; the text says why."""


def site_named(config: Config, name: str) -> Site:
    site = config.site_named(name)
    if site is None or name == ADMIN_SITE:
        known = ", ".join(sorted(config.sites)) or "none"
        raise OperationError(f"no site {name!r} in {config.path} (sites: {known})")
    return site


def select(config: Config, queue_ids: list[str], site: str | None,
           states: tuple[str, ...]) -> list[tuple[str, str]]:
    """(state, queue id) of the named messages, or of every message of ``site``."""
    layout = config.layout
    found: list[tuple[str, str]] = []
    for queue_id in queue_ids:
        try:
            spool.check_queue_id(queue_id)
        except spool.QueueIdError as exc:
            raise OperationError(str(exc)) from None
        state = spool.find_state(layout, queue_id)
        if state is None or state not in states:
            raise OperationError(f"no message {queue_id} in {', '.join(states)}")
        found.append((state, queue_id))
    if site is not None:
        for state in states:
            for queue_id in spool.queue_ids(layout, state):
                try:
                    if spool.read_envelope(layout, state, queue_id).site == site:
                        found.append((state, queue_id))
                except (OSError, ValueError):
                    continue
    return found


def hold_messages(config: Config, queue_ids: list[str], site: str | None, actor: str) -> int:
    moved = 0
    for state, queue_id in select(config, queue_ids, site, (spool.INCOMING, spool.DEFERRED)):
        try:
            spool.move(config.layout, queue_id, state, spool.HOLD)
        except FileNotFoundError:
            continue  # delivered or moved meanwhile
        moved += 1
        log.warning("held queue_id=%s site=%s actor=%s", queue_id, site or "-", actor)
    return moved


def hold_message(config: Config, queue_id: str, state: str, status: spool.Status,
                 site: str, reason: str, actor: str) -> bool:
    """Hold one message with its reason (kept as the status's last error, which ``queue
    show`` and the listing print): the status first, then the move.  False when the
    message was delivered, held or deleted meanwhile."""
    status.last_error = reason
    spool.write_status(config.layout, queue_id, status)
    try:
        spool.move(config.layout, queue_id, state, spool.HOLD)
    except FileNotFoundError:
        return False
    log.warning("held queue_id=%s site=%s actor=%s reason=%r", queue_id, site, actor, reason)
    return True


def release_messages(config: Config, queue_ids: list[str], site: str | None,
                     actor: str) -> int:
    moved = 0
    for _state, queue_id in select(config, queue_ids, site, (spool.HOLD,)):
        status = spool.read_status(config.layout, queue_id)
        status.next_attempt = 0.0
        spool.write_status(config.layout, queue_id, status)
        spool.move(config.layout, queue_id, spool.HOLD, spool.INCOMING)
        moved += 1
        log.info("released queue_id=%s actor=%s", queue_id, actor)
    return moved


def delete_messages(config: Config, queue_ids: list[str], site: str | None, actor: str) -> int:
    removed = 0
    for state, queue_id in select(config, queue_ids, site, spool.STATES):
        try:
            spool.remove(config.layout, queue_id, state)
        except FileNotFoundError:
            continue
        removed += 1
        log.warning("deleted queue_id=%s state=%s actor=%s", queue_id, state, actor)
    return removed


def notify_admin(config: Config, subject: str, body: str) -> str | None:
    """Queue a notice to ``admin.notify`` through the relay with the admin login."""
    if not config.admin.notify:
        return None
    now = time.time()
    queue_id = spool.new_queue_id()
    sender = config.admin.sender or f"sendmail-shim@{config.hostname}"
    message = (
        f"From: sendmail-shim <{sender}>\nTo: {', '.join(config.admin.notify)}\n"
        f"Subject: [sendmail-shim] {subject}\nDate: {mail_date(now)}\n"
        f"Message-Id: <{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}.{queue_id}"
        f"@{config.hostname}>\nAuto-Submitted: auto-generated\n"
        "Content-Type: text/plain; charset=utf-8\n\n" + body
    ).encode()
    envelope = Envelope(queue_id=queue_id, site=ADMIN_SITE, uid=0, sender=sender,
                        recipients=list(config.admin.notify), arrival=now, origin="notice",
                        size=len(message))
    spool.commit(config.layout, envelope, message)
    log.info("notice_queued queue_id=%s to=%s subject=%r", queue_id,
             ",".join(config.admin.notify), subject)
    return queue_id


NOTICE = "notice_"  # state counter kinds of rate-limited notices: notice_<topic>


def notify_admin_limited(config: Config, state: State, site: str, topic: str, every: float,
                         subject: str, body: str) -> str | None:
    """:func:`notify_admin`, at most once per ``every`` seconds per site and topic.

    The limit is a counter of the state (kind ``notice_<topic>``), so it holds
    across restarts.  None when a notice went out recently (or nobody is
    notified); the caller's log line is then the only report.
    """
    if not config.admin.notify:
        return None
    kind = NOTICE + topic
    now = time.time()
    if every > 0 and state.count(kind, every, now, site=site)[0]:
        return None
    state.record(site, 0, kind, ts=now)
    return notify_admin(config, subject, body)


def suspend_site(config: Config, state: State, name: str, reason: str, actor: str) -> str:
    site = site_named(config, name)
    new = state.suspend(site.name, reason, actor)
    held = hold_messages(config, [], site.name, actor)
    if not new:
        return f"site {site.name} was already suspended; {held} more message(s) held"
    log.warning("suspended site=%s actor=%s held=%d reason=%r", site.name, actor, held, reason)
    now = time.time()
    scripts = [(s, c) for n, s, c, _r in state.top(3600, now, by_script=True) if n == site.name]
    lines = "\n".join(f"  {c:6d}  {s or '(no script header)'}" for s, c in scripts[:10])
    # Counted like the notices of adopt_suspension, so the other nodes of a fleet, which
    # see this suspension in the shared state, do not send theirs within the hour.
    notify_admin_limited(config, state, site.name, "suspended", 0, f"site {site.name} suspended", (
        f"Site {site.name} (uids {', '.join(map(str, site.uids)) or '-'}) was suspended "
        f"by {actor}.\n\nReason: {reason}\n\nNew mail from the site is refused; "
        f"{held} queued message(s) were moved to hold.\n\n"
        f"Scripts that sent in the last hour (messages):\n{lines or '  none recorded'}\n\n"
        "What to do next:\n"
        f"  sendmail-shim-admin queue list --site {site.name}     see the held mail\n"
        f"  sendmail-shim-admin queue delete --site {site.name}   drop it (spam)\n"
        f"  sendmail-shim-admin queue release --site {site.name}  send it after all\n"
        f"  sendmail-shim-admin site resume {site.name}           accept new mail again\n"))
    return f"site {site.name} suspended ({reason}); {held} message(s) held"


ADOPTED_NOTICE_EVERY = 3600.0  # one notice per site in this time for another process's


def adopt_suspension(config: Config, state: State, name: str,
                     mark: tuple[float, str, str]) -> int:
    """A suspension another process wrote to the state (the relay's policy service by its
    outbreak rule, an admin command, another node): held here as one made here, with its
    ``suspended`` line and a notice (rate-limited in the state, so a fleet whose daemons
    all see it sends about one); the number of queued messages held."""
    _since, reason, actor = mark
    site = config.site_named(name)
    if site is None or name == ADMIN_SITE:
        log.warning("suspended site=%s actor=%s reason=%r: a site this configuration does "
                    "not know (seen in the state)", name, actor, reason)
        return 0
    held = hold_messages(config, [], site.name, actor)
    log.warning("suspended site=%s actor=%s held=%d reason=%r (seen in the state: made by "
                "another process)", site.name, actor, held, reason)
    notify_admin_limited(config, state, site.name, "suspended", ADOPTED_NOTICE_EVERY,
                         f"site {site.name} suspended", (
        f"Site {site.name} (uids {', '.join(map(str, site.uids)) or '-'}) was suspended by "
        f"{actor}.\n\nReason: {reason}\n\nNew mail from the site is refused; {held} queued "
        f"message(s) on {config.node} were moved to hold.\n\nWhat to do next:\n"
        f"  sendmail-shim-admin site show {site.name}\n"
        f"  sendmail-shim-admin queue list --site {site.name}\n"
        f"  sendmail-shim-admin site resume {site.name}           accept new mail again\n"))
    return held


def resume_site(config: Config, state: State, name: str, actor: str) -> str:
    site = site_named(config, name)
    if not state.resume(site.name):
        return f"site {site.name} was not suspended"
    log.warning("resumed site=%s actor=%s", site.name, actor)
    held = len(select(config, [], site.name, (spool.HOLD,)))
    return (f"site {site.name} resumed; {held} message(s) still on hold: "
            f"'sendmail-shim-admin queue release --site {site.name}' or 'queue delete'")
