"""Unit tests of delivery/relay.py: line lengths, relay order, AUTH, per-recipient outcomes.

Against smtprelay.py's relay (aiosmtpd with AUTH on 127.0.0.1, in this process); a
"dead" relay is a free port nobody listens on.  No root, no subprocess.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sendmail_shim.config import Relay, RelayLogin
from sendmail_shim.delivery.relay import (
    LINE_LENGTH_LIMIT,
    RelaysUnavailable,
    open_session,
    smtp_data,
)
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import OK, PERM, TEMP, Outcome

from .smtprelay import LOGINS, RelayHandler, unused_port

pytest_plugins = ("unit.smtprelay",)  # the relay_server and relay fixtures
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
SENDER = "noreply@site1.test"


def login(tmp_path: Path, password: str = LOGINS["site1.test"]) -> RelayLogin:
    path = tmp_path / "password"
    path.write_text(password + "\n")
    return RelayLogin("site1.test", str(path))


def relays(*ports: int) -> tuple[Relay, ...]:
    return tuple(Relay("127.0.0.1", port, tls="none", timeout=5) for port in ports)


def send(ports: tuple[int, ...], who: RelayLogin, recipients: list[str],
         sender: str = SENDER) -> dict[str, Outcome]:
    async def go() -> dict[str, Outcome]:
        session = await open_session(relays(*ports), who, "shim.test", "site1.test")
        try:
            env = Envelope(queue_id="0" * 16, site="site1.test", uid=1000, sender=sender,
                           recipients=recipients, arrival=0.0)
            return await session.send(env, b"Subject: relay\n\nbody\n", recipients)
        finally:
            await session.close()

    return asyncio.run(go())


class TestSmtpData:
    def test_line_ends_become_crlf(self) -> None:
        assert smtp_data(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd\r\n"
        assert smtp_data(b"") == b""

    def test_long_lines_are_folded_and_nothing_is_lost(self) -> None:
        line = bytes(range(33, 127)) * 50  # 4700 octets, no spaces
        out = smtp_data(b"Subject: x\n" + line + b"\n")
        lines = out.split(b"\r\n")[:-1]
        assert all(len(x) <= LINE_LENGTH_LIMIT for x in lines)
        assert all(x.startswith(b" ") for x in lines[2:])
        assert b"".join([lines[1], *(x[1:] for x in lines[2:])]) == line

    def test_a_line_of_exactly_the_limit_stays_whole(self) -> None:
        line = b"x" * LINE_LENGTH_LIMIT
        assert smtp_data(line) == line + b"\r\n"


class TestSessions:
    def test_relays_are_tried_in_order_until_one_works(
            self, relay_server: tuple[RelayHandler, int], relay: RelayHandler,
            tmp_path: Path) -> None:
        results = send((unused_port(), relay_server[1]), login(tmp_path), ["a@example.net"])
        assert results["a@example.net"].kind == OK
        assert relay.received[0].login == "site1.test"

    def test_no_relay_answering_is_temporary(self, tmp_path: Path) -> None:
        with pytest.raises(RelaysUnavailable) as caught:
            send((unused_port(), unused_port()), login(tmp_path), ["a@example.net"])
        assert caught.value.outcome.kind == TEMP and "connect to 127.0.0.1" in \
            caught.value.outcome.text

    def test_a_refused_login_is_temporary(self, relay_server: tuple[RelayHandler, int],
                                          relay: RelayHandler, tmp_path: Path) -> None:
        with pytest.raises(RelaysUnavailable) as caught:
            send((relay_server[1],), login(tmp_path, "wrong"), ["a@example.net"])
        outcome = caught.value.outcome
        assert outcome.kind == TEMP and "authentication as site1.test failed: 535" in outcome.text
        assert relay.rcpts == []


class TestOutcomes:
    def test_one_outcome_per_recipient(self, relay_server: tuple[RelayHandler, int],
                                       relay: RelayHandler, tmp_path: Path) -> None:
        results = send((relay_server[1],), login(tmp_path),
                       ["ok@example.net", "busy@example.net", "nosuch@example.net"])
        kinds = {r: (o.kind, o.code) for r, o in results.items()}
        assert kinds == {"ok@example.net": (OK, 250), "busy@example.net": (TEMP, 451),
                         "nosuch@example.net": (PERM, 550)}
        assert results["nosuch@example.net"].relay == f"127.0.0.1:{relay_server[1]}"
        assert [t.rcpt_tos for t in relay.received] == [["ok@example.net"]]

    def test_no_data_when_every_recipient_is_refused(
            self, relay_server: tuple[RelayHandler, int], relay: RelayHandler,
            tmp_path: Path) -> None:
        results = send((relay_server[1],), login(tmp_path), ["busy@example.net"])
        assert results["busy@example.net"].kind == TEMP and relay.received == []

    def test_utf8_addresses_need_smtputf8(self, relay_server: tuple[RelayHandler, int],
                                          relay: RelayHandler, tmp_path: Path) -> None:
        results = send((relay_server[1],), login(tmp_path), ["jörg@example.net"])
        outcome = results["jörg@example.net"]
        assert (outcome.kind, outcome.code) == (PERM, 553) and "SMTPUTF8" in outcome.text
        assert relay.rcpts == []
