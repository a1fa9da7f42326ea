"""Drop-file notices: a drop file the daemon will not queue is bounced to its sender.

A drop file was acknowledged with exit 0 long before the daemon judged it, so
a refusal at pickup cannot reach the site's script.  Like Postfix's pickup
(whose cleanup bounces what it cannot queue), the daemon then sends a delivery
status notification to the message's sender naming the reason, through the
one bounce composer (``delivery.bounce``), and only after that notice is in
the spool is the drop file removed.

Trusts: the uid and gid of the drop file (pickup proved them) and nothing in
the request: every field may be what made the intake refuse it.
Guarantees: the notice goes to the envelope sender the site gave when that
address is valid and in one of the site's domains, else to the site's default
sender (``policy.sender``): a refused drop file never turns into a notice to
an address outside the site (backscatter past the sender policy); the null
sender and ``-N never`` get none (as every bounce); an invalid ``-V`` is
left out of the notice.  The notice lists the recipients the request names
(at most MAX_LISTED; the rest are counted), or says that none could be read.
Raises OSError when the notice could not be written (the caller keeps the
drop file for the next scan); returns None when no notice is due (no site for
the uid, null sender, ``-N never``).
"""

from __future__ import annotations

import logging
import time
from email.utils import getaddresses

from sendmail_shim.config import Config
from sendmail_shim.delivery import bounce
from sendmail_shim.intake.compose import CompositionError, Submission, check_envid, envelope_sender
from sendmail_shim.policy.identity import Caller, identify
from sendmail_shim.policy.sender import default_sender, is_sites
from sendmail_shim.store import spool
from sendmail_shim.store.address import printable
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.headers import header_name, header_value, split_header_block
from sendmail_shim.store.outcome import PERM, Outcome, Verdict

log = logging.getLogger(__name__)
MAX_LISTED = 50  # recipients named one by one in a notice; the others are counted
NO_RECIPIENT = "(no recipient address could be read)"


def _recipients(sub: Submission, message: bytes) -> list[str]:
    words = list(sub.rcpt_words)
    if sub.extract:
        headers, _rest = split_header_block(message)
        for field in headers:
            if header_name(field) in ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc"):
                words.extend(addr for _name, addr in getaddresses([header_value(field)]) if addr)
    return [printable(word, 300) for word in words]


def _permanent(verdict: Verdict) -> Outcome:
    """The refusal as a permanent outcome: a 4xx that waits no longer becomes its 5xx."""
    enhanced = "5" + verdict.enhanced[1:] if verdict.enhanced[:1] == "4" else verdict.enhanced
    code = verdict.code if verdict.code >= 500 else 554
    return Outcome(PERM, code, f"{enhanced} {verdict.text}")


def notify_refused(config: Config, fields: list[tuple[str, str]], message: bytes, uid: int,
                   gid: int, verdict: Verdict, drop_file: str) -> str | None:
    """Queue a notice for a refused drop file; its queue id, or None when none is due."""
    sub = Submission.from_fields(fields)
    ident = identify(config, Caller(uid, gid, None, sub.cwd, None, sub.site))
    if ident.site is None:
        log.warning("no_notice drop_file=%s uid=%d reason=%r action='the uid belongs to no "
                    "site: nobody to tell'", drop_file, uid, ident.reason)
        return None
    site = ident.site
    try:
        sender = envelope_sender(sub.sender, site, config)
    except CompositionError:
        sender = default_sender(site, config)  # the address given was what was refused
    if sender and not is_sites(sender, site, config):
        sender = default_sender(site, config)  # no backscatter to an address it chose
    try:
        envid = check_envid(sub.envid)
    except CompositionError:
        envid = None
    listed = _recipients(sub, message) or [NO_RECIPIENT]
    failure = _permanent(verdict)
    failures = dict.fromkeys(listed[:MAX_LISTED], failure)
    if len(listed) > MAX_LISTED:
        failures[f"({len(listed) - MAX_LISTED} more recipients)"] = failure
    original = Envelope(queue_id=spool.new_queue_id(), site=site.name, uid=uid, gid=gid,
                        sender=sender, recipients=listed[:MAX_LISTED], arrival=time.time(),
                        origin="maildrop", notify=sub.notify, ret=sub.ret, envid=envid,
                        size=len(message), extra={"drop_file": drop_file})
    notice = bounce.queue_bounce(config, original, message, failures)
    if notice is None:
        log.warning("no_notice drop_file=%s uid=%d site=%s sender=<%s> reason='null sender or "
                    "-N never'", drop_file, uid, site.name, sender)
        return None
    log.warning("bounced drop_file=%s queue_id=%s uid=%d site=%s sender=<%s> notice=%s "
                "status=%s reason=%r", drop_file, original.queue_id, uid, site.name, sender,
                notice, failure.enhanced_status(), verdict.text)
    return notice
