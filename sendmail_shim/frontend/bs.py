"""``sendmail -bs``: an SMTP server on stdin/stdout (Symfony Mailer, Laravel, Drupal).

Trusts: nothing the client says; it runs as the caller's uid, like the plain
front end, and hands each transaction to the daemon, which identifies the
caller by SO_PEERCRED and enforces policy.  The SMTP protocol is aiosmtpd's
(a well-kept server: dot-unstuffing, pipelining, size limit, line length),
fed through a socketpair bridged to stdin/stdout.
Guarantees: 220 greeting at once; HELO and EHLO (EHLO advertises SIZE,
8BITMIME, PIPELINING, ENHANCEDSTATUSCODES, SMTPUTF8); each DATA is answered
with the daemon's verdict (250 only once durable; a refusal keeps its 4xx/5xx
code and enhanced status; a message that breaks the line-ending rule of
wire/lineends.py, a CR or NUL inside its header block, gets ``554 5.6.0`` at
once, before any hand-off); when the daemon is down the message goes to the
drop area like any other submission; many messages per session; nothing on
stderr, ever (Symfony takes stderr output as a failed start).

End of input: a client may write the whole dialogue at once and close stdin.
Every command already written is still answered, in order, and every complete
transaction is queued (aiosmtpd's own EOF handling would cancel the session
mid-DATA; ours lets it read to the end of what was sent).  The exit status is
0 when the input ended between transactions, with or without QUIT, and 75
(EX_TEMPFAIL) when it ended inside one (after MAIL, or in the middle of DATA
or of a line): that transaction was not queued, like Postfix's smtpd, which
aborts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP

from sendmail_shim.wire import client, lineends, protocol, sysexits

if TYPE_CHECKING:
    from sendmail_shim.frontend.sendmail import Invocation
    from sendmail_shim.wire.paths import SpoolLayout


class _StdioSMTP(SMTP):
    """aiosmtpd's server, except that end of input does not cancel the session.

    Its ``eof_received`` cancels the session at once, dropping a DATA reply
    being computed and every pipelined command after it.  Here the reader just
    learns the end; the session answers what is buffered and the handler's
    ``handle_exception`` closes at the end.
    """

    ending = False  # the input ended: nothing more to say

    def eof_received(self) -> bool | None:
        return asyncio.StreamReaderProtocol.eof_received(self)

    async def push(self, status: Any) -> None:
        if not self.ending:
            await super().push(status)


class HandOffHandler:
    """aiosmtpd hooks: each transaction becomes one hand-off to the daemon."""

    def __init__(self, layout: SpoolLayout, cwd: str | None, site: str | None) -> None:
        self.layout = layout
        self.cwd = cwd
        self.site = site
        self.server: _StdioSMTP | None = None
        self.unfinished = False  # the input ended inside a transaction

    async def handle_exception(self, error: Exception) -> str:
        """End of input (stdin closed): close after the replies; anything else is a 500."""
        server = self.server
        if isinstance(error, asyncio.IncompleteReadError) and server is not None:
            in_transaction = server.envelope is not None and server.envelope.mail_from is not None
            self.unfinished = in_transaction or bool(error.partial.strip())
            server.ending = True
            if server.transport is not None:
                # Closing flushes every reply already written; connection_lost then
                # cancels this session, which waits here until it does.
                server.transport.close()
            await asyncio.Event().wait()
        return f"500 5.3.0 Error: ({error.__class__.__name__}) {error}"

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return [responses[0], *extra, *responses[1:]]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content or b""
        try:  # refused here, so the client hears it even when the daemon is down
            message = lineends.normalize(raw)
        except lineends.LineEndError as exc:
            return f"{exc.code} {exc.enhanced} message refused: {exc}; nothing was queued"
        fields = protocol.submission_fields(envelope.rcpt_tos, sender=envelope.mail_from,
                                            cwd=self.cwd or None, site=self.site or None)
        request = protocol.encode_request(fields, message)
        try:
            result = await asyncio.to_thread(client.hand_off, self.layout.socket,
                                             self.layout.maildrop, request)
        except client.DropRefused as refused:
            return f"451 4.3.0 message not queued: the daemon is down and the drop area " \
                   f"{self.layout.maildrop} refused it ({refused.error.strerror}); try again later"
        if isinstance(result, client.Dropped):
            return f"250 2.0.0 Ok: queued in the drop area as {result.name}"
        return f"{result.code} {result.text}"


def _pump_stdin(sock: socket.socket) -> None:
    try:
        while True:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            sock.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _pump_stdout(sock: socket.socket) -> None:
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(1, view):]
    except OSError:
        pass


async def _serve(layout: SpoolLayout, limit: int, hostname: str, cwd: str | None,
                 site: str | None) -> HandOffHandler:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    handler = HandOffHandler(layout, cwd, site)

    def factory() -> SMTP:
        handler.server = _StdioSMTP(handler, hostname=hostname, ident="sendmail-shim",
                                    data_size_limit=limit, enable_SMTPUTF8=True,
                                    decode_data=False, timeout=3600)
        return handler.server

    await loop.connect_accepted_socket(factory, theirs)
    threading.Thread(target=_pump_stdin, args=(ours,), daemon=True).start()
    writer = threading.Thread(target=_pump_stdout, args=(ours,), daemon=True)
    writer.start()
    await asyncio.to_thread(writer.join)
    ours.close()
    return handler


def serve_stdio(inv: Invocation, layout: SpoolLayout, limit: int) -> int:
    """Run one SMTP session on stdin/stdout; 0 unless the input ended inside a transaction."""
    quiet = logging.getLogger("mail.log")  # aiosmtpd's logger: never to stderr here
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    try:
        handler = asyncio.run(_serve(layout, limit, socket.gethostname(), cwd, inv.site))
    except KeyboardInterrupt:
        return sysexits.EX_TEMPFAIL
    return sysexits.EX_TEMPFAIL if handler.unfinished else sysexits.EX_OK
