"""Submission to the smarthost relay: TLS, AUTH as the site, per-recipient results.

Trusts: the relay's replies as to what it accepted (a 250 after DATA means the
relay owns the message); the configuration for hosts, TLS and logins.
Guarantees: relays are tried in configured order and the next one is tried when
connecting, TLS, the greeting, EHLO or AUTH fails; each message yields one
:class:`~sendmail_shim.outcome.Outcome` per recipient; network trouble is always
temporary.  A password is read from its file when a session opens and is never
logged.  One :class:`RelaySession` carries a batch of messages of one site.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

import aiosmtplib

from sendmail_shim.config import Relay, RelayLogin
from sendmail_shim.envelope import Envelope
from sendmail_shim.outcome import OK, Outcome

log = logging.getLogger("sendmail_shim.relay")


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


@dataclass
class RelaySession:
    client: aiosmtplib.SMTP
    relay: Relay

    async def close(self) -> None:
        try:
            await self.client.quit()
        except (aiosmtplib.SMTPException, OSError):
            self.client.close()

    async def send(self, envelope: Envelope, message: bytes,
                   recipients: list[str]) -> dict[str, Outcome]:
        """One transaction for ``recipients``; an outcome for each of them."""
        label = self.relay.label
        client = self.client
        needs_utf8 = not (envelope.sender.isascii() and all(r.isascii() for r in recipients))
        options = []
        if any(b > 127 for b in message) and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if needs_utf8:
            if not client.supports_extension("smtputf8"):
                failed = Outcome.from_reply(
                    553, "5.6.7 SMTPUTF8 is required but was not offered by the relay", label)
                return dict.fromkeys(recipients, failed)
            options.append("SMTPUTF8")
        encoding = "utf-8" if needs_utf8 else "ascii"
        results: dict[str, Outcome] = {}
        try:
            try:
                await client.mail(envelope.sender, options=options, encoding=encoding)
            except aiosmtplib.SMTPResponseException as exc:
                await self._rset()
                return dict.fromkeys(recipients, Outcome.from_reply(exc.code, exc.message, label))
            accepted = []
            for rcpt in recipients:
                try:
                    await client.rcpt(rcpt, encoding=encoding)
                    accepted.append(rcpt)
                except aiosmtplib.SMTPResponseException as exc:
                    results[rcpt] = Outcome.from_reply(exc.code, exc.message, label)
            if not accepted:
                await self._rset()
                return results
            try:
                reply = await client.data(message)
                done = Outcome.from_reply(reply.code, reply.message, label)
            except aiosmtplib.SMTPResponseException as exc:
                done = Outcome.from_reply(exc.code, exc.message, label)
                if done.kind == OK:  # defensive: an exception is never success
                    done = Outcome.from_reply(451, exc.message, label)
            results.update(dict.fromkeys(accepted, done))
            return results
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise SessionBroken(f"{label}: {exc}") from exc

    async def _rset(self) -> None:
        try:
            await self.client.rset()
        except aiosmtplib.SMTPResponseException:
            pass


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
    await client.connect()
    try:
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
