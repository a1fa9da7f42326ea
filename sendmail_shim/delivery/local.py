"""Local delivery: mail for domains whose MX is this machine, to the local MTA.

Trusts: the local MTA's replies; the configured ``local_transport`` (loopback
TCP or a Unix socket, checked by config.py).
Guarantees: no site's relay login is ever sent here; a server on a local
address gets nothing (not even LHLO) unless loopback.py proves its owner
trusted; SMTP goes through the same client as the relay (relay.py); LMTP
(RFC 2033) is spoken here, reading one reply per accepted recipient after the
data, so each recipient gets its own outcome.  Sessions are reused for a
batch, like relay sessions.  LMTP uses the same address paths (address.py) and
the same data preparation (relay.smtp_data: CRLF, long lines broken like
Postfix) as the relay client.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from sendmail_shim.config import LocalTransport, Relay
from sendmail_shim.delivery.loopback import prove_server
from sendmail_shim.delivery.relay import RelaySession, RelaysUnavailable, connect_plain, smtp_data
from sendmail_shim.store.address import needs_smtputf8, paths_for
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import Outcome

TIMEOUT = 60.0


class Session(Protocol):
    async def send(self, envelope: Envelope, message: bytes,
                   recipients: list[str]) -> dict[str, Outcome]: ...

    async def close(self) -> None: ...

    async def usable(self) -> bool:
        """Still connected and answering (RSET): a kept session is checked before reuse."""
        ...


class LmtpError(Exception):
    pass


class LmtpSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 label: str) -> None:
        self.reader = reader
        self.writer = writer
        self.label = label
        self.extensions: set[str] = set()

    @classmethod
    async def open(cls, transport: LocalTransport, hostname: str) -> LmtpSession:
        if transport.socket_path:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(transport.socket_path), TIMEOUT)
        else:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(transport.host, transport.port), TIMEOUT)
        session = cls(reader, writer, transport.label)
        try:
            code, text = await session._reply()
            # After the greeting (the server has accepted), before LHLO and any mail.
            await prove_server(writer.get_extra_info("socket"), transport.label)
        except BaseException:
            writer.close()
            raise
        if code != 220:
            writer.close()
            raise LmtpError(f"greeting {code} {text}")
        code, text = await session._command(f"LHLO {hostname}")
        if code != 250:
            writer.close()
            raise LmtpError(f"LHLO: {code} {text}")
        session.extensions = {line.split()[0].upper() for line in text.split("\n")[1:] if line}
        return session

    async def _reply(self) -> tuple[int, str]:
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
            if not raw:
                raise ConnectionError("connection closed")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    async def _command(self, line: str) -> tuple[int, str]:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self.writer.drain()
        return await self._reply()

    async def send(self, envelope: Envelope, message: bytes,
                   recipients: list[str]) -> dict[str, Outcome]:
        sender_path, paths, unsendable = paths_for(envelope.sender, recipients)
        results: dict[str, Outcome] = {  # queued before the door checked addresses
            r: Outcome.from_reply(553, f"5.1.3 not sent: {why}", self.label)
            for r, why in unsendable.items()}
        recipients = [r for r in recipients if r in paths]
        if not recipients:
            return results
        body = " BODY=8BITMIME" if any(b > 127 for b in message) and \
            "8BITMIME" in self.extensions else ""
        if needs_smtputf8(envelope.sender, *recipients) and "SMTPUTF8" in self.extensions:
            body += " SMTPUTF8"
        code, text = await self._command(f"MAIL FROM:{sender_path}{body}")
        if code != 250:
            await self._command("RSET")
            return {**results, **dict.fromkeys(recipients,
                                               Outcome.from_reply(code, text, self.label))}
        accepted = []
        for rcpt in recipients:
            code, text = await self._command(f"RCPT TO:{paths[rcpt]}")
            if code in (250, 251):
                accepted.append(rcpt)
            else:
                results[rcpt] = Outcome.from_reply(code, text, self.label)
        if not accepted:
            await self._command("RSET")
            return results
        code, text = await self._command("DATA")
        if code != 354:
            return {**results, **dict.fromkeys(accepted, Outcome.from_reply(code, text,
                                                                            self.label))}
        lines = smtp_data(message).split(b"\r\n")
        lines.pop()  # smtp_data ends every line with CRLF
        data = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                        for line in lines)
        self.writer.write(data + b".\r\n")
        await self.writer.drain()
        for rcpt in accepted:  # RFC 2033: one reply per accepted recipient
            code, text = await self._reply()
            results[rcpt] = Outcome.from_reply(code, text, self.label)
        return results

    async def usable(self) -> bool:
        try:
            code, _text = await self._command("RSET")
        except (OSError, ConnectionError, TimeoutError, ValueError):
            return False
        return code == 250

    async def close(self) -> None:
        try:
            await self._command("QUIT")
        except (OSError, ConnectionError, TimeoutError, ValueError):
            pass
        self.writer.close()


async def open_local_session(transport: LocalTransport, hostname: str) -> Session:
    """A session to the local MTA; RelaysUnavailable (temporary) when it does not answer."""
    try:
        if transport.protocol == "lmtp":
            return await LmtpSession.open(transport, hostname)
        relay = Relay(host=transport.host, port=transport.port, tls="none",
                      allow_plaintext=True)
        session: RelaySession = await connect_plain(relay, hostname, transport.socket_path)
        return session
    except (OSError, ConnectionError, TimeoutError, LmtpError, ValueError) as exc:
        raise RelaysUnavailable(Outcome.network(
            f"local delivery to {transport.label} failed: {exc}", transport.label)) from exc
