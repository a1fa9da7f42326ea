"""Submission to the smarthost relay: TLS, AUTH as the site, per-recipient results.

Trusts: the relay's replies as to what it accepted (a 250 after DATA means the
relay owns the message); the configuration for hosts, TLS and logins.
Guarantees: relays are tried in configured order and the next one is tried when
connecting, TLS, the greeting, EHLO or AUTH fails; each message yields one
:class:`~sendmail_shim.store.outcome.Outcome` per recipient; network trouble is always
temporary.  A password is read from its file when a session opens and is never
logged.  One :class:`RelaySession` carries a batch of messages of one site.
A relay on an address of this host must be served by a trusted user
(loopback.py, checked after the greeting, before AUTH or any mail): another
owner is a relay that failed to connect.

When the relay's EHLO offers PIPELINING (RFC 2920; Postfix and smtp-sink do),
MAIL, every RCPT and DATA go out in one write and their replies are read in
order; the body only after DATA's 354.  A refused recipient keeps its RCPT
reply, a refused MAIL is every recipient's reply; a malformed reply, a
disconnect or a timeout midway closes the session (temporary).  Without
PIPELINING one command waits for its reply before the next.  The pipelined
reads use aiosmtplib's protocol object (``write``, ``read_response``, and its
reply buffer: pipelined replies arrive together); the unit tests prove it
against a server that records what arrived before it answered.

Message lines are the queue file's LF-ended lines, nothing else (see
:func:`smtp_data`): a byte compose and the sender policy read inside a line
never becomes a line break on the wire.

Addresses go on the wire as address.py's canonical paths (``MAIL FROM:<...>``,
written here, not by aiosmtplib's parser), so a quoted local part is sent
quoted, exactly as the door accepted it.  Message data goes through
:func:`smtp_data` (also used by local_delivery.py): lines longer than
:data:`LINE_LENGTH_LIMIT` octets are broken as Postfix's
``smtp_line_length_limit`` does.  An address the client still cannot send (a
queue file from before these checks) fails that message alone: the transaction
is reset (RSET) and the session serves the next message.

The bytes are made once per attempt (``smtp_data``), then passed through the
session's ``wire`` (the queue runner sets delivery/dkim.py's signer: DKIM
signatures for this relay, the last change to the message) and dot-stuffed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosmtplib

from sendmail_shim.config import Relay, RelayLogin
from sendmail_shim.delivery.loopback import prove_server
from sendmail_shim.delivery.timing import timed_connect, timed_transaction
from sendmail_shim.store.address import needs_smtputf8, paths_for
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import OK, Outcome

log = logging.getLogger(__name__)
LINE_LENGTH_LIMIT = 998  # octets without CRLF: Postfix's smtp_line_length_limit (RFC 5321)
_DOT = re.compile(rb"(?m)^\.")  # dot-stuffing (RFC 5321 4.5.2) of CRLF-ended lines
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # never inside a command (aiosmtplib's check)


def smtp_data(message: bytes, limit: int = LINE_LENGTH_LIMIT) -> bytes:
    """The message with CRLF line ends and no line longer than ``limit`` octets.

    A queue file's lines end with LF and hold no CR (the intake's line-ending
    rule, wire/lineends.py), so this adds the CR of each CRLF and creates no
    other line: the relay receives the lines every step before it read.  A
    CR in a file queued before that rule was data inside its line for compose
    and the sender policy: it goes out as a space, never as a line end (nor
    bare: RFC 5321 2.3.8; aiosmtplib would make it a CRLF).  A longer line is
    broken like Postfix's smtp_line_length_limit: after ``limit`` octets comes
    CRLF and a space, which continues a header field and
    minimizes the damage to MIME formatted mail; each continuation line,
    space included, is again at most ``limit`` octets.  No line starts with a
    dot because of this (dot-stuffing is the SMTP client's).
    """
    text = message.replace(b"\r", b" ") if b"\r" in message else message
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if max(map(len, lines), default=0) <= limit:  # the usual case: nothing to break
        return b"\r\n".join(lines) + b"\r\n" if lines else b""
    out: list[bytes] = []
    for line in lines:
        if len(line) <= limit:
            out.append(line)
            continue
        out.append(line[:limit])
        rest = line[limit:]
        while rest:
            out.append(b" " + rest[: limit - 1])
            rest = rest[limit - 1 :]
    return b"".join(line + b"\r\n" for line in out)


@functools.lru_cache(maxsize=1024)
def _paths_for(sender: str, recipients: tuple[str, ...]
               ) -> tuple[str, dict[str, str], dict[str, str]]:
    """address.py's paths_for, remembered: a site's messages mostly repeat their envelope
    (a contact form: one sender, one recipient).  The dicts are shared: read only."""
    return paths_for(sender, list(recipients))


def _data_refused(code: int, text: str, relay: str) -> Outcome:
    """The accepted recipients' outcome when DATA or the message was not taken: a reply
    that does not say refused (not 354, not 250) is temporary, never success."""
    done = Outcome.from_reply(code, text, relay)
    return Outcome.from_reply(451, text, relay) if done.kind == OK else done


class RelaysUnavailable(Exception):
    """No relay took a session; ``outcome`` is the last (temporary) trouble."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.describe())
        self.outcome = outcome


class SessionBroken(Exception):
    """The connection died mid-transaction; the rest of the batch waits."""


def _tls_context(relay: Relay) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=relay.ca_file)
    if not relay.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# What the bytes become on their way to this relay (delivery/dkim.py Signer.wire: the
# DKIM signatures, the last change): (envelope, smtp_data's output, relay) -> bytes.
Wire = Callable[[Envelope, bytes, Relay], Awaitable[bytes]]


@dataclass
class RelaySession:
    client: aiosmtplib.SMTP
    relay: Relay
    wire: Wire | None = None  # None: smtp_data's output as it is (the local MTA)

    async def usable(self) -> bool:
        """Still connected and answering RSET with 250 (a kept session, before reuse:
        Postfix checks a cached session the same way)."""
        if not self.client.is_connected:
            return False
        try:
            reply = await self.client.rset()
        except (aiosmtplib.SMTPException, OSError):
            return False
        return reply.code == 250

    async def close(self) -> None:
        try:
            await self.client.quit()
        except (aiosmtplib.SMTPException, OSError):
            self.client.close()

    @timed_transaction  # relay_transaction ... ms= (debug, for the metrics)
    async def send(self, envelope: Envelope, message: bytes,
                   recipients: list[str]) -> dict[str, Outcome]:
        """One transaction for ``recipients``; an outcome for each of them."""
        label = self.relay.label
        client = self.client
        sender_path, paths, unsendable = _paths_for(envelope.sender, tuple(recipients))
        results: dict[str, Outcome] = {  # queued before the door checked addresses
            r: Outcome.from_reply(553, f"5.1.3 not sent: {why}", label)
            for r, why in unsendable.items()}
        recipients = [r for r in recipients if r in paths]
        if not recipients:
            return results
        needs_utf8 = needs_smtputf8(envelope.sender, *recipients)
        try:
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SessionBroken(f"{label}: EHLO failed: {exc}") from exc
        options = []
        if not message.isascii() and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if needs_utf8:
            if not client.supports_extension("smtputf8"):
                failed = Outcome.from_reply(
                    553, "5.6.7 SMTPUTF8 is required but was not offered by the relay", label)
                return {**results, **dict.fromkeys(recipients, failed)}
            options.append("SMTPUTF8")
        encoding = "utf-8" if needs_utf8 else "ascii"
        mail = b" ".join([b"MAIL FROM:" + sender_path.encode(encoding),
                          *(option.encode("ascii") for option in options)])
        rcpts = [b"RCPT TO:" + paths[rcpt].encode(encoding) for rcpt in recipients]
        data = smtp_data(message)  # once per attempt, then signed (or not) for this relay
        if self.wire is not None:
            data = await self.wire(envelope, data, self.relay)
        if client.supports_extension("pipelining"):
            return await self._send_pipelined(mail, rcpts, recipients, data, results)
        try:
            reply = await self._command(mail)
            if reply.code != 250:
                await self._rset()
                return {**results, **dict.fromkeys(
                    recipients, Outcome.from_reply(reply.code, reply.message, label))}
            accepted = []
            for rcpt, command in zip(recipients, rcpts, strict=True):
                reply = await self._command(command)
                if reply.code in (250, 251):
                    accepted.append(rcpt)
                else:
                    results[rcpt] = Outcome.from_reply(reply.code, reply.message, label)
            if not accepted:
                await self._rset()
                return results
            try:
                reply = await client.data(data)
                done = Outcome.from_reply(reply.code, reply.message, label)
            except aiosmtplib.SMTPResponseException as exc:
                done = _data_refused(exc.code, exc.message, label)
            results.update(dict.fromkeys(accepted, done))
            return results
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise SessionBroken(f"{label}: {exc}") from exc

    async def _send_pipelined(self, mail: bytes, rcpts: list[bytes], recipients: list[str],
                              data: bytes, results: dict[str, Outcome]
                              ) -> dict[str, Outcome]:
        """The transaction with PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one
        write, their replies read in order; the body only after DATA's 354.

        A refused recipient keeps its RCPT reply, all of them refused: DATA's 503/554
        is nobody's outcome.  A refused MAIL is every recipient's outcome (not the
        503s after it).  A malformed reply line, a disconnect or a timeout midway leaves
        the reply stream unknown: the connection is closed (SessionBroken, temporary).
        """
        label = self.relay.label
        commands = [mail, *rcpts, b"DATA"]
        if any(_CONTROL.search(command) for command in commands):
            raise ValueError("an SMTP command contains a control character")
        replies = await self._exchange(b"".join(c + b"\r\n" for c in commands), len(commands))
        mail_reply, data_reply = replies[0], replies[-1]
        if mail_reply.code != 250:
            await self._abandon(data_reply)
            return {**results, **dict.fromkeys(
                recipients, Outcome.from_reply(mail_reply.code, mail_reply.message, label))}
        accepted = []
        for rcpt, reply in zip(recipients, replies[1:-1], strict=True):
            if reply.code in (250, 251):
                accepted.append(rcpt)
            else:
                results[rcpt] = Outcome.from_reply(reply.code, reply.message, label)
        if not accepted:
            await self._abandon(data_reply)
            return results
        if data_reply.code != 354:
            done = _data_refused(data_reply.code, data_reply.message, label)
            await self._abandon(data_reply)
        else:
            body = _DOT.sub(b"..", data) + b".\r\n"
            (reply,) = await self._exchange(body, 1)
            done = (Outcome.from_reply(reply.code, reply.message, label) if reply.code == 250
                    else _data_refused(reply.code, reply.message, label))
        results.update(dict.fromkeys(accepted, done))
        return results

    async def _exchange(self, data: bytes, count: int) -> list[aiosmtplib.SMTPResponse]:
        """Write ``data`` (``count`` commands, or a body) at once, then read ``count``
        replies in order, each within the relay's timeout.

        aiosmtplib's protocol parses one reply per :meth:`read_response` and keeps the
        rest of what arrived in its buffer: replies already there are taken from it
        before waiting (pipelined replies tend to arrive together).  Nothing awaits
        between one reply and the next read, so no reply arrives unawaited.
        """
        client = self.client
        protocol = client.protocol
        label = self.relay.label
        replies: list[aiosmtplib.SMTPResponse] = []
        loop = asyncio.get_running_loop()
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("not connected")
            protocol._response_pending = True  # a reply may come before it is awaited
            protocol.write(data)
            # Each reply within the relay's timeout: one deadline, moved on after each reply
            # (cheaper than read_response's own wait_for per reply).
            async with asyncio.timeout(client.timeout) as deadline:
                while len(replies) < count:
                    reply = protocol._read_response_from_buffer()
                    if reply is None:
                        reply = await protocol.read_response(timeout=None)
                    replies.append(reply)
                    if client.timeout is not None:
                        deadline.reschedule(loop.time() + client.timeout)
        except TimeoutError as exc:
            client.close()
            raise SessionBroken(f"{label}: no reply within {client.timeout}s") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()  # the replies and commands are out of step now
            raise SessionBroken(f"{label}: {exc}") from exc
        if any(reply.code == 421 for reply in replies):
            client.close()  # the relay closes the session (as aiosmtplib does after a 421)
        return replies

    async def _abandon(self, data_reply: aiosmtplib.SMTPResponse) -> None:
        """End a pipelined transaction that sends no message: an empty one if the relay
        said 354 to DATA regardless (nothing is delivered: no recipient was accepted,
        or MAIL was refused), then RSET.  Trouble here is the next transaction's."""
        try:
            if data_reply.code == 354:
                await self._exchange(b".\r\n", 1)
            if self.client.is_connected:
                await self._exchange(b"RSET\r\n", 1)
        except SessionBroken:
            pass

    async def _command(self, *args: bytes) -> aiosmtplib.SMTPResponse:
        """One command; a malformed reply is a reply too (code -1: temporary)."""
        try:
            return await self.client.execute_command(*args)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            raise
        except aiosmtplib.SMTPResponseException as exc:
            return aiosmtplib.SMTPResponse(exc.code, exc.message)

    async def _rset(self) -> None:
        try:
            await self.client.rset()
        except aiosmtplib.SMTPResponseException:
            pass


@timed_connect  # relay_connected ... ms= (debug, for the metrics)
async def _connect(relay: Relay, login: RelayLogin | None, hostname: str,
                   socket_path: str | None = None) -> RelaySession:
    client = aiosmtplib.SMTP(
        hostname=None if socket_path else relay.host,
        port=None if socket_path else relay.port,
        socket_path=socket_path,
        local_hostname=hostname,
        timeout=relay.timeout,
        use_tls=relay.tls == "implicit",
        start_tls=relay.tls == "starttls",
        tls_context=_tls_context(relay) if relay.tls != "none" else None,
    )
    await client.connect()  # the greeting (and, with starttls, EHLO and STARTTLS)
    try:
        # Before AUTH or any mail: a server on a local address must be a trusted user's.
        transport = client.transport
        await prove_server(transport.get_extra_info("socket") if transport else None,
                           relay.label if socket_path is None else socket_path)
        if login is not None:
            await client.login(login.user, login.read_password())
    except BaseException:
        client.close()
        raise
    return RelaySession(client, relay)


async def connect_plain(relay: Relay, hostname: str,
                        socket_path: str | None = None) -> RelaySession:
    """An SMTP session without TLS or AUTH: the local MTA (local_delivery.py)."""
    try:
        return await _connect(relay, None, hostname, socket_path)
    except aiosmtplib.SMTPException as exc:
        raise ConnectionError(str(exc)) from exc


async def open_session(relays: tuple[Relay, ...], login: RelayLogin | None,
                       hostname: str, site: str) -> RelaySession:
    """A logged-in session on the first relay that works, in configured order."""
    last = Outcome.network("no relays are configured (relays: in the configuration)")
    for relay in relays:
        try:
            return await _connect(relay, login, hostname)
        except aiosmtplib.SMTPAuthenticationError as exc:
            # Postfix's smtp_sasl_auth_soft_bounce: a login problem is the
            # operator's to fix, so the mail waits instead of bouncing.
            last = Outcome.network(
                f"authentication as {login.user if login else '?'} failed: "
                f"{exc.code} {exc.message}", relay.label)
        except aiosmtplib.SMTPResponseException as exc:
            last = Outcome.network(f"{exc.code} {exc.message}", relay.label)
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            last = Outcome.network(f"connect to {relay.label} failed: {exc}", relay.label)
        log.warning("relay_unavailable site=%s relay=%s reason=%r", site, relay.label,
                    last.describe())
    raise RelaysUnavailable(last)
