"""An SMTP relay with AUTH in this process (aiosmtpd on 127.0.0.1), for the unit layer.

Answers by the recipient's local part: ``busy`` 451, ``nosuch`` 550, anything
else 250; remembers every RCPT and every accepted transaction.  The logins are
conftest's: ``site1.test`` with ``site1-password``.  A test module gets the
fixtures ``relay_server`` (module scope: handler and port) and ``relay`` (the
handler, reset for each test) with ``pytest_plugins = ("unit.smtprelay",)``.
PYTEST_DONT_REWRITE: no asserts here, and it is imported before it is registered.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

LOGINS = {"site1.test": "site1-password"}


@dataclass
class Transaction:
    login: str | None
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class RelayHandler:
    """Answers by local part; remembers every RCPT and every accepted transaction."""

    received: list[Transaction] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        with self.lock:
            self.rcpts.append(address)
        if address.startswith("busy@"):
            return "451 4.2.1 mailbox busy, try later"
        if address.startswith("nosuch@"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = session.auth_data.login.decode() if session.auth_data else None
        with self.lock:
            self.received.append(Transaction(login, envelope.mail_from,
                                             list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: queued"

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.rcpts.clear()


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                  auth_data: Any) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword)
          and LOGINS.get(auth_data.login.decode()) == auth_data.password.decode())
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return SMTP(self.handler, authenticator=authenticator, auth_required=True,
                    auth_require_tls=False, decode_data=False)


@contextmanager
def running_relay() -> Iterator[tuple[RelayHandler, int]]:
    """A started relay and its port; stopped on exit."""
    handler = RelayHandler()
    port = unused_port()
    controller = _Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def relay_server() -> Iterator[tuple[RelayHandler, int]]:
    """A relay for the test module (import this fixture with ``relay``)."""
    with running_relay() as server:
        yield server


@pytest.fixture
def relay(relay_server: tuple[RelayHandler, int]) -> RelayHandler:
    """The module's relay, with nothing received yet."""
    relay_server[0].reset()
    return relay_server[0]
