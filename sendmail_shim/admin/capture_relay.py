"""A small SMTP relay on loopback that requires AUTH and stores what it gets in a Maildir.

For the newcomer's demo and for tests: it stands in for the smarthost.
Trusts: nothing from clients; only logins listed in its logins file
(``user:password`` per line, read again for each connection, so a login
added meanwhile, as ``site add``'s ``relay_login_command`` does, works at
once, as with a relay's sasldb) may send.
Guarantees: every accepted message is a file in ``<maildir>/new/`` (written in
``tmp/``, fsynced, renamed), holding the DATA bytes exactly as received after
dot-unstuffing (CRLF line endings); beside it
``<maildir>/envelopes/<name>.json`` records the login, MAIL FROM, RCPT TO and
the client address.  With a certificate it offers STARTTLS (and then requires
it before AUTH), or speaks TLS from the first byte (``implicit_tls``).  It
listens only where it is told (refuses non-loopback addresses unless
``allow_remote``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import ssl
import time
import warnings
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def read_logins(path: str) -> dict[str, str]:
    logins: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if line and not line.startswith("#") and ":" in line:
                user, password = line.split(":", 1)
                logins[user] = password
    return logins


class MaildirHandler:
    def __init__(self, maildir: str) -> None:
        self.maildir = maildir
        for sub in ("tmp", "new", "cur", "envelopes"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        self._count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._count += 1
        name = f"{time.time():.6f}.{os.getpid()}_{self._count}.{socket.gethostname()}"
        login = session.auth_data.login.decode() if session.auth_data else None
        data: bytes = envelope.original_content or envelope.content
        tmp = os.path.join(self.maildir, "tmp", name)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        meta = {
            "login": login,
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "peer": list(session.peer) if isinstance(session.peer, tuple) else session.peer,
            "time": time.time(),
        }
        with open(os.path.join(self.maildir, "envelopes", name + ".json"), "w") as fh:
            json.dump(meta, fh)
        os.rename(tmp, os.path.join(self.maildir, "new", name))
        return f"250 2.0.0 Ok: stored as {name}"


def _authenticator(logins: dict[str, str]) -> Any:
    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = user in logins and logins[user] == password
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)
    return authenticate


async def serve_capture_relay(host: str, port: int, maildir: str, logins_file: str,
                              tls_cert: str | None = None, tls_key: str | None = None,
                              implicit_tls: bool = False, allow_remote: bool = False,
                              ready: asyncio.Event | None = None) -> None:
    """Run until cancelled."""
    if not allow_remote and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address")
    read_logins(logins_file)  # an unreadable file fails now, not at the first client
    handler = MaildirHandler(maildir)
    tls_context = None
    if tls_cert and tls_key:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(tls_cert, tls_key)

    def factory() -> SMTP:
        return SMTP(handler, hostname="capture-relay.localhost",
                    authenticator=_authenticator(read_logins(logins_file)),
                    auth_required=True,
                    auth_require_tls=tls_context is not None and not implicit_tls,
                    tls_context=None if implicit_tls else tls_context, decode_data=False,
                    enable_SMTPUTF8=True)

    # aiosmtpd warns about AUTH without TLS; on loopback that is the point of a stand-in.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    warnings.filterwarnings("ignore", message="Session.login_data is deprecated")
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host=host, port=port,
                                      ssl=tls_context if implicit_tls else None)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()
