"""``sendmail -bs``: an SMTP server on stdin/stdout (Symfony Mailer, Laravel, Drupal).

Trusts: nothing the client says; it runs as the caller's uid, like the plain
front end, and hands each transaction to the daemon, which identifies the
caller by SO_PEERCRED and enforces policy.  The SMTP protocol is aiosmtpd's
(a well-kept server: dot-unstuffing, pipelining, size limit, line length),
fed through a socketpair bridged to stdin/stdout.
Guarantees: 220 greeting at once; HELO and EHLO (EHLO advertises SIZE,
8BITMIME, PIPELINING, ENHANCEDSTATUSCODES, SMTPUTF8); each DATA is answered
with the daemon's verdict (250 only once durable; a refusal keeps its 4xx/5xx
code and enhanced status); when the daemon is down the message goes to the
drop area like any other submission; many messages per session; nothing on
stderr, ever (Symfony takes stderr output as a failed start).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP

from sendmail_shim import handoff, sysexits

if TYPE_CHECKING:
    from sendmail_shim.argv import Invocation
    from sendmail_shim.paths import SpoolLayout


class HandOffHandler:
    """aiosmtpd hooks: each transaction becomes one hand-off to the daemon."""

    def __init__(self, layout: SpoolLayout, cwd: str | None, site: str | None) -> None:
        self.layout = layout
        self.cwd = cwd
        self.site = site

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return [responses[0], *extra, *responses[1:]]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content or b""
        message = raw.replace(b"\r\n", b"\n")
        fields: list[tuple[str, str]] = [("mode", "submit"), ("sender", envelope.mail_from)]
        if self.cwd:
            fields.append(("cwd", self.cwd))
        if self.site:
            fields.append(("site", self.site))
        fields.extend(("rcpt", rcpt) for rcpt in envelope.rcpt_tos)
        request = handoff.encode_request(fields, message)
        try:
            reply = await asyncio.to_thread(handoff.send_request, self.layout.socket, request)
            code, _status, text = handoff.parse_reply(reply.split(b"\n", 1)[0])
        except handoff.DaemonUnreachable:
            try:
                name = await asyncio.to_thread(handoff.write_drop_file, self.layout.maildrop,
                                               request)
            except OSError as exc:
                return f"451 4.3.0 message not queued: the daemon is down and the drop area " \
                       f"refused it ({exc.strerror}); try again later"
            return f"250 2.0.0 Ok: queued in the drop area as {name}"
        return f"{code} {text}"


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
                 site: str | None) -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    handler = HandOffHandler(layout, cwd, site)

    def factory() -> SMTP:
        return SMTP(handler, hostname=hostname, ident="sendmail-shim", data_size_limit=limit,
                    enable_SMTPUTF8=True, decode_data=False, timeout=3600)

    await loop.connect_accepted_socket(factory, theirs)
    threading.Thread(target=_pump_stdin, args=(ours,), daemon=True).start()
    writer = threading.Thread(target=_pump_stdout, args=(ours,), daemon=True)
    writer.start()
    await asyncio.to_thread(writer.join)
    ours.close()


def serve_stdio(inv: Invocation, layout: SpoolLayout, limit: int) -> int:
    """Run one SMTP session on stdin/stdout; exit 0 when the client is done."""
    quiet = logging.getLogger("mail.log")  # aiosmtpd's logger: never to stderr here
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    try:
        asyncio.run(_serve(layout, limit, socket.gethostname(), cwd, inv.site))
    except KeyboardInterrupt:
        return sysexits.EX_TEMPFAIL
    return sysexits.EX_OK
