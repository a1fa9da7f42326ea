"""Failure notices: RFC 3464 delivery status notifications to the envelope sender.

Trusts: the envelope and the outcomes it is given.
Guarantees: a bounce is a multipart/report (report-type=delivery-status) with a
human part naming the site, the queue id and what to do, a
message/delivery-status part with one block per failed recipient (RFC 3464
fields), and the original headers (whole fields, at most BOUNCE_SIZE_LIMIT
bytes, as Postfix's bounce_size_limit) as text/rfc822-headers; it is sent with the
null sender, so a bounce is never bounced; mail from the null sender or with
``-N never`` gets none (the caller checks ``Envelope.wants_failure_notice``).
Every text put into a header or a delivery-status field is one line: the
envelope id is xtext-encoded (RFC 3461 4, as ENVID), relay replies have their
line breaks folded into spaces, and any control character or invalid UTF-8 is
escaped (``address.printable``), so nothing from a queue file or a relay can
add fields or headers.  The bounce's copy of the headers goes out through the
same line-length rule as every message (relay.smtp_data).
"""

from __future__ import annotations

import time

from sendmail_shim.config import Config
from sendmail_shim.store import spool
from sendmail_shim.store.address import printable
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.headers import mail_date, split_header_block
from sendmail_shim.store.outcome import Outcome

BOUNCE_SIZE_LIMIT = 50_000  # bytes of the original's headers returned (Postfix's bounce_size_limit)


def _returned_headers(message: bytes) -> list[bytes]:
    """The original's header fields, whole fields up to BOUNCE_SIZE_LIMIT bytes: a notice
    is not a way to mail oneself a site's own content past its quota."""
    fields, _body = split_header_block(message)
    kept: list[bytes] = []
    total = 0
    for field in fields:
        total += len(field)
        if total > BOUNCE_SIZE_LIMIT:
            kept.append(b"X-Sendmail-Shim-Note: the other header fields are not returned\n")
            break
        kept.append(field)
    return kept


def _rfc822_type(addr: str) -> str:
    return "utf-8" if not addr.isascii() else "rfc822"


def xtext(text: str) -> str:
    """RFC 3461 xtext: "!" to "~" except "+" and "=" as they are, other octets as +XX."""
    return "".join(chr(b) if 33 <= b <= 126 and b not in (43, 61) else f"+{b:02X}"
                   for b in text.encode("utf-8", "surrogateescape"))


def one_line(text: str, limit: int = 1000) -> str:
    """``text`` for a header or DSN field: line breaks become spaces, the rest escaped."""
    return printable(" ".join(text.splitlines()), limit)


def build_bounce(config: Config, original: Envelope, message: bytes,
                 failures: dict[str, Outcome], now: float) -> tuple[Envelope, bytes]:
    """Envelope and bytes of the notice for ``failures`` of ``original``."""
    queue_id = spool.new_queue_id()
    boundary = f"{queue_id}.{int(now)}/{config.hostname}"
    headers = _returned_headers(message)
    listing = "\n".join(f"<{one_line(rcpt)}>: {one_line(out.describe())}"
                        for rcpt, out in failures.items())
    site = one_line(original.site, 200)
    human = (
        f"This is the mail system at host {config.hostname}.\n\n"
        f"Your message (queue id {original.queue_id}, site {site}) could not be\n"
        f"delivered to one or more recipients. It is attached below.\n\n"
        f"The relay's answer, or our reason, for each recipient:\n\n{listing}\n\n"
        "If an address is mistyped, correct it and send the message again. If you\n"
        "think the relay is wrong, forward this notice to your hosting provider.\n"
    )
    per_message = [
        f"Reporting-MTA: dns; {config.hostname}",
        f"X-Sendmail-Shim-Queue-ID: {original.queue_id}",
        f"X-Sendmail-Shim-Site: {site}",
        f"Arrival-Date: {mail_date(original.arrival)}",
    ]
    if original.envid:
        per_message.insert(0, f"Original-Envelope-Id: {xtext(original.envid)}")
    blocks = ["\n".join(per_message)]
    for rcpt, out in failures.items():
        lines = [
            f"Final-Recipient: {_rfc822_type(rcpt)}; {one_line(rcpt)}",
            "Action: failed",
            f"Status: {out.enhanced_status() if out.code >= 500 else '5.4.7'}",
        ]
        if out.relay:
            lines.append(f"Remote-MTA: dns; {one_line(out.relay.rsplit(':', 1)[0])}")
        if out.code:
            lines.append(f"Diagnostic-Code: smtp; {out.code} {one_line(out.text)}")
        else:
            lines.append(f"Diagnostic-Code: x-unix; {one_line(out.text)}")
        blocks.append("\n".join(lines))
    status_part = "\n\n".join(blocks)
    head = (
        f"From: MAILER-DAEMON@{config.hostname} (Mail Delivery System)\n"
        f"To: {one_line(original.sender)}\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "Auto-Submitted: auto-replied\n"
        f"Date: {mail_date(now)}\n"
        f"Message-Id: <{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}."
        f"{queue_id}@{config.hostname}>\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"\n'
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
        "This is a MIME-encapsulated message.\n\n"
    )
    data = (
        head.encode()
        + f"--{boundary}\nContent-Description: Notification\n"
        f"Content-Type: text/plain; charset=utf-8\n\n{human}\n".encode()
        + f"--{boundary}\nContent-Description: Delivery report\n"
        f"Content-Type: message/delivery-status\n\n{status_part}\n\n".encode()
        + f"--{boundary}\nContent-Description: Undelivered Message Headers\n"
        "Content-Type: text/rfc822-headers\n\n".encode()
        + b"".join(headers)
        + f"\n--{boundary}--\n".encode()
    )
    envelope = Envelope(
        queue_id=queue_id,
        site=original.site,
        uid=original.uid,
        sender="",
        recipients=[original.sender],
        arrival=now,
        origin="bounce",
        size=len(data),
        extra={"bounce_of": original.queue_id},
    )
    return envelope, data


def queue_bounce(config: Config, original: Envelope, message: bytes,
                 failures: dict[str, Outcome]) -> str | None:
    """Queue a notice if the sender wants one; its queue id, or None."""
    if not failures or not original.wants_failure_notice:
        return None
    envelope, data = build_bounce(config, original, message, failures, time.time())
    spool.commit(config.layout, envelope, data)
    return envelope.queue_id
