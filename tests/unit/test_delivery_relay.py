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
    SessionBroken,
    Wire,
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
        assert smtp_data(b"a\nb\nc\nd") == b"a\r\nb\r\nc\r\nd\r\n"
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


class Recorder:
    """An SMTP server in the test's own event loop that records what arrived before it
    answered: each read's complete command lines form one batch, answered together.

    Answers by local part as smtprelay.py does (``busy`` 451, ``nosuch`` 550); a sender
    ``refused@`` gets 550 to MAIL.  ``data_reply`` answers DATA even when no recipient
    was accepted (a relay that breaks RFC 2920); ``final`` is the reply after the body;
    ``malformed``/``hang_up``/``silent`` spoil the reply to that command verb; with
    ``trickle`` seconds the replies of a batch go out one by one, that pause before each.
    """

    def __init__(self, pipelining: bool = True, data_reply: str | None = None,
                 final: str = "250 2.0.0 Ok: queued", malformed: str = "",
                 hang_up: str = "", silent: str = "", trickle: float = 0.0) -> None:
        self.pipelining, self.trickle = pipelining, trickle
        self.data_reply, self.final = data_reply, final
        self.malformed, self.hang_up, self.silent = malformed, hang_up, silent
        self.batches: list[list[str]] = []
        self.messages: list[tuple[list[str], bytes]] = []
        self.port = 0

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 recorder ESMTP\r\n")
        rcpts: list[str]
        pending, in_body, mail, rcpts = b"", False, False, []
        data: list[bytes] = []
        while chunk := await reader.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\r\n")
            out: list[str] = []
            batch: list[str] = []
            for line in lines:
                if in_body:  # inside the message
                    if line != b".":
                        data.append(line[1:] if line.startswith(b".") else line)
                        continue
                    batch.append(".")
                    self.messages.append((rcpts, b"\r\n".join(data)))
                    out.append(self.final)
                    in_body, mail, rcpts, data = False, False, [], []
                    continue
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode()
                batch.append(verb)
                if verb == self.hang_up:
                    writer.close()
                    return
                if verb == self.silent:
                    continue
                if verb == self.malformed:
                    out.append("2x0 what")
                    continue
                if verb == "EHLO":
                    extensions = ["8BITMIME", *(["PIPELINING"] if self.pipelining else [])]
                    out.append("\r\n".join(f"250-{e}" for e in ["recorder", *extensions])
                               + "\r\n250 HELP")
                elif verb == "MAIL":
                    mail = b"<refused@" not in line
                    out.append("250 2.1.0 Ok" if mail else "550 5.7.1 sender refused")
                elif verb == "RCPT":
                    address = line.split(b"<", 1)[1].rstrip(b">").decode()
                    if not mail:
                        out.append("503 5.5.1 Error: need MAIL command")
                    elif address.startswith("busy@"):
                        out.append("451 4.2.1 mailbox busy, try later")
                    elif address.startswith("nosuch@"):
                        out.append("550 5.1.1 User unknown")
                    else:
                        rcpts.append(address)
                        out.append("250 2.1.5 Ok")
                elif verb == "DATA":
                    if self.data_reply is not None:
                        out.append(self.data_reply)
                        in_body = self.data_reply.startswith("354")
                    elif not mail:
                        out.append("503 5.5.1 Error: need MAIL command")
                    elif not rcpts:
                        out.append("554 5.5.1 Error: no valid recipients")
                    else:
                        out.append("354 End data with <CR><LF>.<CR><LF>")
                        in_body = True
                elif verb == "RSET":
                    mail, rcpts = False, []
                    out.append("250 2.0.0 Ok")
                elif verb == "QUIT":
                    out.append("221 2.0.0 Bye")
                else:
                    out.append("502 5.5.2 Error: command not recognized")
            if batch:
                self.batches.append(batch)
            if out and self.trickle:
                for reply in out:
                    await asyncio.sleep(self.trickle)
                    writer.write(f"{reply}\r\n".encode())
                    await writer.drain()
            elif out:
                writer.write("".join(f"{reply}\r\n" for reply in out).encode())
                await writer.drain()
        writer.close()

    def deliver(self, *messages: tuple[str, list[str]], timeout: float = 5,
                wire: Wire | None = None) -> list[dict[str, Outcome] | Exception]:
        """Each (sender, recipients) sent in turn over one session; outcomes or exception."""
        async def go() -> list[dict[str, Outcome] | Exception]:
            server = await self.start()
            relay = Relay("127.0.0.1", self.port, tls="none", timeout=timeout)
            session = await open_session((relay,), None, "shim.test", "site1.test")
            session.wire = wire
            out: list[dict[str, Outcome] | Exception] = []
            try:
                for sender, rcpts in messages:
                    env = Envelope(queue_id="0" * 16, site="site1.test", uid=1000,
                                   sender=sender, recipients=rcpts, arrival=0.0)
                    try:
                        out.append(await session.send(env, BODY, rcpts))
                    except SessionBroken as exc:
                        out.append(exc)
            finally:
                await session.close()
                server.close()
            return out

        return asyncio.run(go())


BODY = b"Subject: pipelined\n\n.a line that starts with a dot\nbody\n"


def codes(results: dict[str, Outcome] | Exception) -> dict[str, tuple[str, int]]:
    assert isinstance(results, dict), results
    return {r: (o.kind, o.code) for r, o in results.items()}


class TestPipelining:
    """RFC 2920 when the relay's EHLO offers PIPELINING; one command at a time when not."""

    def test_mail_rcpts_and_data_arrive_together(self) -> None:
        server = Recorder()
        (results,) = server.deliver((SENDER, ["a@example.net", "b@example.net"]))
        assert codes(results) == {"a@example.net": (OK, 250), "b@example.net": (OK, 250)}
        assert server.batches[1:] == [["MAIL", "RCPT", "RCPT", "DATA"], ["."], ["QUIT"]]
        assert server.messages == [(["a@example.net", "b@example.net"],
                                    b"Subject: pipelined\r\n\r\n.a line that starts with a "
                                    b"dot\r\nbody")]

    @pytest.mark.parametrize("trickle", [0.0, 0.02])
    def test_a_refused_recipient_keeps_its_own_reply(self, trickle: float) -> None:
        server = Recorder(trickle=trickle)
        (results,) = server.deliver(
            (SENDER, ["busy@example.net", "ok@example.net", "nosuch@example.net"]))
        assert codes(results) == {"busy@example.net": (TEMP, 451), "ok@example.net": (OK, 250),
                                  "nosuch@example.net": (PERM, 550)}
        assert [rcpts for rcpts, _ in server.messages] == [["ok@example.net"]]

    def test_every_recipient_refused_keeps_the_rcpt_replies_then_rset(self) -> None:
        server = Recorder()
        first, second = server.deliver((SENDER, ["busy@example.net", "nosuch@example.net"]),
                                       (SENDER, ["ok@example.net"]))
        assert codes(first) == {"busy@example.net": (TEMP, 451),
                                "nosuch@example.net": (PERM, 550)}  # not DATA's 554
        assert codes(second) == {"ok@example.net": (OK, 250)}  # the session goes on
        assert server.batches[1:] == [["MAIL", "RCPT", "RCPT", "DATA"], ["RSET"],
                                      ["MAIL", "RCPT", "DATA"], ["."], ["QUIT"]]
        assert [rcpts for rcpts, _ in server.messages] == [["ok@example.net"]]

    def test_a_refused_mail_is_every_recipients_reply(self) -> None:
        server = Recorder()
        first, second = server.deliver(("refused@site1.test", ["a@example.net", "b@x.net"]),
                                       (SENDER, ["a@example.net"]))
        assert codes(first) == {"a@example.net": (PERM, 550), "b@x.net": (PERM, 550)}
        assert isinstance(first, dict) and "sender refused" in first["b@x.net"].text
        assert codes(second) == {"a@example.net": (OK, 250)}
        assert server.batches[2] == ["RSET"]

    def test_a_354_without_recipients_sends_an_empty_message_and_nothing_else(self) -> None:
        server = Recorder(data_reply="354 go ahead")
        (results,) = server.deliver((SENDER, ["nosuch@example.net"]))
        assert codes(results) == {"nosuch@example.net": (PERM, 550)}
        assert server.batches[1:] == [["MAIL", "RCPT", "DATA"], ["."], ["RSET"], ["QUIT"]]
        assert server.messages == [([], b"")]

    def test_a_refused_data_is_the_accepted_recipients_reply(self) -> None:
        server = Recorder(data_reply="451 4.3.0 try later")
        (results,) = server.deliver((SENDER, ["a@example.net", "nosuch@example.net"]))
        assert codes(results) == {"a@example.net": (TEMP, 451),
                                  "nosuch@example.net": (PERM, 550)}
        assert server.messages == []

    def test_a_refused_message_is_the_accepted_recipients_reply(self) -> None:
        server = Recorder(final="554 5.7.1 spam")
        (results,) = server.deliver((SENDER, ["a@example.net"]))
        assert codes(results) == {"a@example.net": (PERM, 554)}

    @pytest.mark.parametrize("spoil", ["malformed", "hang_up"])
    def test_a_broken_reply_stream_is_a_broken_session(self, spoil: str) -> None:
        server = Recorder(**{spoil: "RCPT"})  # type: ignore[arg-type]
        (results,) = server.deliver((SENDER, ["a@example.net", "b@example.net"]))
        assert isinstance(results, SessionBroken) and server.messages == []

    def test_a_relay_that_stops_answering_is_a_broken_session(self) -> None:
        server = Recorder(silent="DATA")
        (results,) = server.deliver((SENDER, ["a@example.net"]), timeout=0.3)
        assert isinstance(results, SessionBroken) and server.messages == []

    def test_the_timeout_is_for_each_reply_not_the_whole_batch(self) -> None:
        server = Recorder(trickle=0.15)  # 4 replies, 0.6 s in all, none later than 0.4 s
        (results,) = server.deliver((SENDER, ["a@example.net", "b@example.net"]), timeout=0.4)
        assert codes(results) == {"a@example.net": (OK, 250), "b@example.net": (OK, 250)}

    @pytest.mark.parametrize("pipelining", [True, False])
    def test_the_wire_hook_changes_the_bytes_once_per_attempt(self, pipelining: bool) -> None:
        """The session's wire (the DKIM signer) gets smtp_data's bytes once per message,
        whatever the number of recipients, and the relay receives what it returns,
        dot-stuffed."""
        calls: list[tuple[str, bytes, str]] = []

        async def wire(env: Envelope, data: bytes, relay: Relay) -> bytes:
            calls.append((env.queue_id, data, relay.label))
            return b"X-Signed: .yes\r\n" + data

        server = Recorder(pipelining=pipelining)
        (results,) = server.deliver((SENDER, ["a@example.net", "b@example.net"]), wire=wire)
        assert codes(results) == {"a@example.net": (OK, 250), "b@example.net": (OK, 250)}
        assert calls == [("0" * 16, smtp_data(BODY), f"127.0.0.1:{server.port}")]
        assert server.messages == [(["a@example.net", "b@example.net"],
                                    b"X-Signed: .yes\r\nSubject: pipelined\r\n\r\n.a line "
                                    b"that starts with a dot\r\nbody")]

    def test_without_pipelining_one_command_at_a_time(self) -> None:
        server = Recorder(pipelining=False)
        (results,) = server.deliver((SENDER, ["a@example.net", "nosuch@example.net"]))
        assert codes(results) == {"a@example.net": (OK, 250), "nosuch@example.net": (PERM, 550)}
        assert server.batches[1:] == [["MAIL"], ["RCPT"], ["RCPT"], ["DATA"], ["."], ["QUIT"]]
        assert [rcpts for rcpts, _ in server.messages] == [["a@example.net"]]
