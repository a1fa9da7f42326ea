"""Composing the queued message: envelope from argv and headers, and the headers we add.

Trusts: nothing in the message or the request fields; the site and uid come
from ``identity``.
Guarantees, following Postfix's sendmail/cleanup:

* ``-t``: recipients from To, Cc and Bcc, or from Resent-To/-Cc/-Bcc when any
  Resent- header is present; added to the command-line recipients (Postfix >= 2.1);
* Bcc and Resent-Bcc are removed from the data; Return-Path is removed;
* missing Message-Id, Date and From are appended at the end of the header
  block (Resent- forms when the message is resent), as Postfix does;
* a Received line names the host, the uid, the site and the script hint
  (``from userid N`` as Postfix writes it), prepended;
* duplicate recipients are removed; unqualified addresses get ``@hostname``
  (recipients) or the site's domain (sender);
* an address argument or header value with a control character (other than a
  tab) is refused before parsing (the parser would join ``a\\nb`` into ``ab``);
* every envelope address is checked by address.py, the grammar the SMTP client
  sends with (RFC 5321/6531, length limits, valid UTF-8 only) and kept in its
  canonical form: what the door accepts, delivery can send.  Anything else is a
  :class:`CompositionError` naming the address (EX_DATAERR 65, ``553 5.1.3``);
* header-derived text (the script hint, ``-F``) is never fatal: invalid UTF-8
  and controls are escaped (``\\xff``) before they reach the Received line, the
  envelope, the state database or a log line;
* bounded work: the header block is split in linear time and refused past
  store/headers.py's limits (a field over 102400 bytes, Postfix's
  ``header_size_limit``; a block over 256 KiB; over 1000 fields) with
  ``552 5.3.4``, exit 65, before anything else reads it; a recipient argument
  longer than a header field may be is refused the same way; addresses are
  counted as they are parsed (the command line's first, then the header's), and
  the count stops at policy.limits.MAX_RECIPIENTS + 1: ``452 4.5.3``, exit 65,
  duplicates included, as Postfix's smtpd_recipient_limit counts RCPT
  commands.  What compose does is linear in the message's size and the
  request's, and no address list is parsed past the recipient limit;
* ``-V`` (envelope id) must be printable ASCII, at most 100 characters
  (RFC 3461 ENVID), else a CompositionError;
* the default envelope sender is the site's ``sender``, else ``noreply@`` its
  first domain, never ``root@`` or the web user's login name.

The message body bytes are never changed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import getaddresses

from sendmail_shim.config import Config, Site
from sendmail_shim.policy.identity import Caller
from sendmail_shim.policy.limits import MAX_RECIPIENTS
from sendmail_shim.policy.sender import default_sender
from sendmail_shim.store.address import AddressError, canonical, printable
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.headers import (
    MAX_FIELD_BYTES,
    HeaderLimitError,
    header_name,
    header_value,
    mail_date,
    split_header_block,
)
from sendmail_shim.wire import protocol

MAX_ENVID = protocol.MAX_ENVID  # RFC 3461 4.4


class CompositionError(Exception):
    """The submission cannot become a message; the text says why.

    ``code`` and ``enhanced`` are the SMTP reply (``-bs``); the exit status is 65.
    """

    def __init__(self, text: str, code: int = 554, enhanced: str = "5.1.3") -> None:
        super().__init__(text)
        self.code = code
        self.enhanced = enhanced


@dataclass
class Submission:
    """Parsed request fields."""

    sender: str | None
    rcpt_words: list[str]
    extract: bool
    fullname: str | None
    notify: str | None
    ret: str | None
    envid: str | None
    body_type: str | None
    cwd: str | None
    site: str | None = None

    @classmethod
    def from_fields(cls, fields: list[tuple[str, str]]) -> Submission:
        """The submission a request's fields describe (names: wire.protocol)."""
        single, rcpts = protocol.split_fields(fields)
        return cls(
            sender=single.get(protocol.SENDER),
            rcpt_words=rcpts,
            extract=single.get(protocol.EXTRACT) == "1",
            fullname=single.get(protocol.FULLNAME),
            notify=single.get(protocol.NOTIFY),
            ret=single.get(protocol.RET),
            envid=single.get(protocol.ENVID),
            body_type=single.get(protocol.BODY),
            cwd=single.get(protocol.CWD),
            site=single.get(protocol.SITE),
        )


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _addresses(text: str, what: str) -> list[str]:
    """The addresses of an argument or (unfolded) header value.

    A control character (other than a tab) is refused before parsing: the
    parser would silently join ``a\\nb@x`` into ``ab@x``, an address nobody wrote.
    """
    if _CONTROL.search(text):
        raise CompositionError(f"bad {what} address {printable(text, 80)!r}: control "
                               "characters are not allowed", 553, "5.1.3")
    return [addr for _name, addr in getaddresses([text]) if addr]


class _Recipients:
    """Addresses as they are parsed, refused as soon as there are too many."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, text: str) -> None:
        if len(text) > MAX_FIELD_BYTES:
            raise CompositionError(f"a recipient argument is longer than {MAX_FIELD_BYTES} "
                                   "bytes", 552, "5.3.4")
        self.found.extend(_addresses(text, "recipient"))
        if len(self.found) > MAX_RECIPIENTS:
            raise CompositionError(f"more than {MAX_RECIPIENTS} recipient addresses in one "
                                   f"message; at most {MAX_RECIPIENTS} are accepted: split "
                                   "the mailing", 452, "4.5.3")


def check_address(addr: str, what: str) -> str:
    """The canonical form of ``addr`` (address.py), or a CompositionError naming it."""
    try:
        return canonical(addr)
    except AddressError as exc:
        raise CompositionError(f"bad {what} address: {exc}", 553, "5.1.3") from None


def check_envid(envid: str | None) -> str | None:
    """``-V``: printable ASCII without spaces, at most MAX_ENVID characters."""
    if envid is None:
        return None
    if protocol.bad_envid(envid):  # the front end checks the same before the drop road
        raise CompositionError(f"bad envelope id (-V) {printable(envid, 40)!r}: use at most "
                               f"{MAX_ENVID} printable ASCII characters without spaces",
                               554, "5.5.4")
    return envid


def _qualify(addr: str, domain: str) -> str:
    return addr if "@" in addr else f"{addr}@{domain}"


def envelope_sender(raw: str | None, site: Site, config: Config) -> str:
    if raw is None:
        return default_sender(site, config)
    stripped = raw.strip()
    if stripped in ("", "<>"):
        return ""
    found = _addresses(stripped, "sender")
    if not found:
        raise CompositionError(f"cannot read the sender address <{printable(raw, 80)}>")
    domain = site.domains[0] if site.domains else config.hostname
    return check_address(_qualify(found[0], domain), "sender")


def _comment_safe(text: str) -> str:
    return re.sub(r"[()\\\x00-\x1f\x7f]", "_", printable(text, 200))


def script_hint(headers: list[bytes]) -> str | None:
    """The script name from PHP's X-PHP-Originating-Script ("<uid>:<script>")."""
    for field in headers:
        if header_name(field) == "x-php-originating-script":
            value = header_value(field)
            return printable(value.split(":", 1)[1] if ":" in value else value, 200)
    return None


def compose(
    sub: Submission,
    message: bytes,
    site: Site,
    caller: Caller,
    config: Config,
    queue_id: str,
    now: float,
) -> tuple[Envelope, bytes]:
    """The envelope and the final message bytes (see the module docstring)."""
    recipients = _Recipients()
    for word in sub.rcpt_words:  # the request's, before the message is read
        recipients.add(word)
    try:
        headers, rest = split_header_block(message, limited=True)
    except HeaderLimitError as exc:
        raise CompositionError(f"{exc}; shorten the header", 552, "5.3.4") from None
    names = [header_name(h) for h in headers]
    resent = any(n.startswith("resent-") for n in names)
    sender = envelope_sender(sub.sender, site, config)

    if sub.extract:
        wanted = ("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc")
        for field, name in zip(headers, names, strict=True):
            if name in wanted:
                recipients.add(header_value(field))
    seen: set[str] = set()
    unique: list[str] = []
    for addr in recipients.found:
        addr = check_address(_qualify(addr, config.hostname), "recipient")
        if addr.lower() not in seen:
            seen.add(addr.lower())
            unique.append(addr)
    if not unique:
        raise CompositionError(
            "No recipient addresses found in message header"
            if sub.extract
            else "no recipient addresses given"
        )

    script = script_hint(headers)
    kept = [h for h, n in zip(headers, names, strict=True)
            if n not in ("bcc", "resent-bcc", "return-path")]
    prefix = "Resent-" if resent else ""
    present = set(names)
    if f"{prefix}message-id".lower() not in present:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        kept.append(f"{prefix}Message-Id: <{stamp}.{queue_id}@{config.hostname}>\n".encode())
    if f"{prefix}date".lower() not in present:
        kept.append(f"{prefix}Date: {mail_date(now)}\n".encode())
    if f"{prefix}from".lower() not in present:
        from_addr = sender or default_sender(site, config)
        fullname = f" ({_comment_safe(sub.fullname)})" if sub.fullname and sender else ""
        kept.append(f"{prefix}From: {from_addr}{fullname}\n".encode("utf-8", "surrogateescape"))
    origin = f"from userid {caller.uid}, site {_comment_safe(site.name)}"
    if script:
        origin += f", script {_comment_safe(script)}"
    received = (
        f"Received: by {config.hostname} (sendmail-shim, {origin})\n"
        f"\tid {queue_id}; {mail_date(now)}\n"
    ).encode("utf-8", "surrogateescape")
    if rest and not rest.startswith(b"\n"):
        rest = b"\n" + rest  # the body started without a blank line: keep them apart
    final = received + b"".join(kept) + rest

    envelope = Envelope(
        queue_id=queue_id,
        site=site.name,
        uid=caller.uid,
        gid=caller.gid,
        pid=caller.pid,
        sender=sender,
        recipients=unique,
        arrival=now,
        script=script,
        cwd=caller.cwd,
        notify=sub.notify,
        ret=sub.ret,
        envid=check_envid(sub.envid),
        body_type=sub.body_type,
        size=len(final),
    )
    return envelope, final
