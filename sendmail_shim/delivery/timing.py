"""How long relay sessions take: debug log lines with ``ms=``, read by the metrics.

Two decorators for ``relay.py``: :func:`timed_connect` around opening a
session (connect, greeting, TLS, AUTH) logs ``relay_connected relay=...
ms=...``; :func:`timed_transaction` around one MAIL..DATA transaction logs
``relay_transaction queue_id=... site=... relay=... nrcpt=... status=...
ms=...`` (status: the reply of the first accepted recipient, else of the first
refused one; 0 when the connection broke).  Both are debug lines: the metrics
handler sees them (``daemon/metrics.py`` lowers the logger's level), an
operator at ``log.level: info`` does not.

Trusts: nothing.  Guarantees: timing never changes a result or an exception,
and no password or message content is logged.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast

from sendmail_shim.config import Relay, RelayLogin
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import OK, Outcome

log = logging.getLogger("sendmail_shim.delivery.relay")


class _OnRelay(Protocol):
    relay: Relay


F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


def _status(results: dict[str, Outcome]) -> int:
    codes = [out.code for out in results.values()]
    ok = [out.code for out in results.values() if out.kind == OK]
    return ok[0] if ok else (codes[0] if codes else 0)


def timed_transaction(send: F) -> F:
    @functools.wraps(send)
    async def timed(session: _OnRelay, envelope: Envelope, message: bytes,
                    recipients: list[str]) -> dict[str, Outcome]:
        started = time.monotonic()
        status = 0
        try:
            results: dict[str, Outcome] = await send(session, envelope, message, recipients)
            status = _status(results)
            return results
        finally:
            log.debug("relay_transaction queue_id=%s site=%s relay=%s nrcpt=%d status=%d "
                      "ms=%.1f", envelope.queue_id, envelope.site, session.relay.label,
                      len(recipients), status, _ms(started))
    return cast(F, timed)


def timed_connect(connect: F) -> F:
    @functools.wraps(connect)
    async def timed(relay: Relay, login: RelayLogin | None, hostname: str,
                    socket_path: str | None = None) -> object:
        started = time.monotonic()
        session = await connect(relay, login, hostname, socket_path)
        log.debug("relay_connected relay=%s login=%s ms=%.1f", relay.label,
                  login.user if login else "-", _ms(started))
        return session
    return cast(F, timed)
