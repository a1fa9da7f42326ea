"""Delivery outcomes at a real SMTP server: per-recipient results, bounces, failover, TLS."""

from __future__ import annotations

import email
import json
import os
import subprocess
import threading
import time
from email.message import Message
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from conftest import Relay, Shim, free_port, wait_until


class PickyHandler:
    """A relay that refuses some recipients: 'nosuch' with 550, 'busy' with 451."""

    def __init__(self) -> None:
        self.received: list[tuple[str | None, str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("nosuch"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if address.startswith("busy"):
            return "451 4.2.1 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = session.auth_data.login.decode() if session.auth_data else None
        with self.lock:
            self.received.append((login, envelope.mail_from, list(envelope.rcpt_tos),
                                  envelope.original_content))
        return "250 2.0.0 Ok: queued"


class PickyRelay:
    def __init__(self, logins: dict[str, str], port: int) -> None:
        self.handler = PickyHandler()

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                          auth_data: Any) -> AuthResult:
            ok = (isinstance(auth_data, LoginPassword)
                  and logins.get(auth_data.login.decode()) == auth_data.password.decode())
            return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

        class _Controller(Controller):
            def factory(self) -> SMTP:
                return SMTP(self.handler, authenticator=authenticator, auth_required=True,
                            auth_require_tls=False, decode_data=False)

        self.controller = _Controller(self.handler, hostname="127.0.0.1", port=port)

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()

    def wait(self, count: int) -> list[tuple[str | None, str, list[str], bytes]]:
        wait_until(lambda: len(self.handler.received) >= count, 20, f"{count} at picky relay")
        return self.handler.received


@pytest.fixture
def picky(shim_factory: Any) -> Any:
    _make_relay, make_shim = shim_factory
    port = free_port()
    shim = make_shim([port])
    relay = PickyRelay(shim.logins, port)
    relay.start()
    shim.start()
    yield shim, relay
    relay.stop()


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data)


class TestPerRecipientResults:
    def test_5xx_recipient_bounces_rest_delivered(self, picky: Any) -> None:
        shim, relay = picky
        done = shim.sendmail(["-i", "good@example.net", "nosuch@example.net"],
                             b"Subject: mixed\n\nbody\n")
        assert done.returncode == 0
        received = relay.wait(2)
        original = [r for r in received if r[1] == "noreply@site1.test"]
        bounces = [r for r in received if r[1] in ("", "<>")]  # aiosmtpd keeps "<>"
        assert len(original) == 1 and original[0][2] == ["good@example.net"]
        assert len(bounces) == 1
        login, _sender, rcpts, data = bounces[0]
        assert login == "site1.test" and rcpts == ["noreply@site1.test"]
        report = parse(data)
        assert report.get_content_type() == "multipart/report"
        assert report.get_param("report-type") == "delivery-status"
        parts = list(report.walk())
        status = next(p for p in parts if p.get_content_type() == "message/delivery-status")
        text = status.as_string()
        assert "Final-Recipient: rfc822; nosuch@example.net" in text
        assert "Action: failed" in text and "Status: 5.1.1" in text
        assert "Diagnostic-Code: smtp; 550 5.1.1" in text
        assert any(p.get_content_type() == "text/rfc822-headers" for p in parts)
        wait_until(lambda: not shim.queue_files("incoming") and not shim.queue_files("deferred"),
                   10, "empty queue")

    def test_null_sender_gets_no_bounce(self, picky: Any) -> None:
        shim, relay = picky
        done = shim.sendmail(["-i", "-f", "<>", "nosuch@example.net"], b"Subject: n\n\nx\n")
        assert done.returncode == 0
        wait_until(lambda: "bounced queue_id" in shim.daemon_log(), 10, "bounce log line")
        time.sleep(1.0)
        assert relay.handler.received == []
        assert "bounce_queued" not in shim.daemon_log()

    def test_4xx_recipient_is_retried_alone(self, picky: Any) -> None:
        shim, relay = picky
        shim.sendmail(["-i", "ok@example.net", "busy@example.net"], b"Subject: r\n\nx\n")
        relay.wait(1)
        wait_until(lambda: shim.queue_files("deferred"), 10, "deferral of busy")
        listing = shim.admin("queue", "list").stdout.decode()
        assert "busy@example.net" in listing and "ok@example.net" not in listing
        assert "451 4.2.1 mailbox busy" in listing
        wait_until(lambda: json.loads(shim.admin("queue", "list", "--json").stdout)["attempts"]
                   >= 2, 15, "second attempt")
        assert len(relay.handler.received) == 1  # ok@ was not sent twice

    def test_lifetime_expiry_bounces(self, shim_factory: Any) -> None:
        _make_relay, make_shim = shim_factory
        shim = make_shim([free_port()])
        shim.edit_config("lifetime: 1h", "lifetime: 1s")
        shim.start()
        shim.sendmail(["-i", "x@example.net"], b"Subject: old\n\nx\n")
        wait_until(lambda: "message expired after" in shim.daemon_log(), 20, "expiry")
        wait_until(lambda: shim.queue_files("deferred") or shim.queue_files("incoming"), 5,
                   "the bounce waiting (no relay is up)")


class TestRelayChoice:
    def test_failover_to_second_relay(self, shim_factory: Any) -> None:
        make_relay, make_shim = shim_factory
        dead, alive = free_port(), free_port()
        shim = make_shim([dead, alive])
        relay = make_relay(shim.logins, alive)
        relay.start()
        shim.start()
        shim.sendmail(["-i", "f@example.net"], b"Subject: f\n\nx\n")
        [(meta, _)] = relay.wait(1)
        assert meta["login"] == "site1.test"

    def test_wrong_password_defers_not_bounces(self, shim_factory: Any) -> None:
        make_relay, make_shim = shim_factory
        port = free_port()
        shim = make_shim([port])
        relay = make_relay({"site1.test": "another-password"}, port)
        relay.start()
        shim.start()
        shim.sendmail(["-i", "a@example.net"], b"Subject: a\n\nx\n")
        wait_until(lambda: shim.queue_files("deferred"), 15, "deferral")
        assert "authentication as site1.test failed: 535" in shim.admin(
            "queue", "list").stdout.decode()
        assert relay.messages() == []

    def test_one_connection_per_batch(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        # A site opens one session per 4 messages waiting (runner.LANE_BATCH): 4 share one.
        relay.stop()
        for n in range(4):
            shim.sendmail(["-i", f"b{n}@example.net"], b"Subject: b\n\nx\n")
        wait_until(lambda: len(shim.queue_files("deferred")) == 4, 15, "4 deferred")
        relay.start()
        shim.run(["-q"], user=None)
        msgs = relay.wait(4)
        assert len({tuple(meta["peer"]) for meta, _ in msgs}) == 1


def make_cert(workdir: str) -> tuple[str, str]:
    cert, key = os.path.join(workdir, "relay.crt"), os.path.join(workdir, "relay.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    os.chmod(key, 0o644)
    os.chmod(cert, 0o644)
    return cert, key


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_tls_with_verified_certificate(shim_factory: Any, workdir: str, mode: str) -> None:
    make_relay, make_shim = shim_factory
    cert, key = make_cert(workdir)
    port = free_port()
    shim = make_shim([port])
    shim.edit_config("    tls: none", f"    tls: {mode}\n    ca_file: {cert}")
    implicit = ("--implicit-tls",) if mode == "implicit" else ()
    relay = make_relay(shim.logins, port, ("--tls-cert", cert, "--tls-key", key, *implicit))
    relay.start()
    shim.start()
    shim.sendmail(["-i", "tls@example.net"], b"Subject: tls\n\nx\n")
    [(meta, _)] = relay.wait(1)
    assert meta["login"] == "site1.test"


def test_unverifiable_certificate_defers(shim_factory: Any, workdir: str) -> None:
    make_relay, make_shim = shim_factory
    cert, key = make_cert(workdir)
    port = free_port()
    shim = make_shim([port])
    shim.edit_config("    tls: none", "    tls: starttls")  # no ca_file: system CAs only
    relay = make_relay(shim.logins, port, ("--tls-cert", cert, "--tls-key", key))
    relay.start()
    shim.start()
    shim.sendmail(["-i", "tls@example.net"], b"Subject: tls\n\nx\n")
    wait_until(lambda: shim.queue_files("deferred"), 15, "deferral")
    assert "CERTIFICATE_VERIFY_FAILED" in shim.admin("queue", "list").stdout.decode()
    assert relay.messages() == []


def test_several_recipients_into_smtp_sink(shim_factory: Any, workdir: str) -> None:
    """Postfix's smtp-sink offers PIPELINING: MAIL, the RCPTs and DATA go in one write
    (relay.py; the unit tests show the batching), and the sink takes every recipient."""
    _make_relay, make_shim = shim_factory
    port = free_port()
    # smtp-sink accepts as nobody: a server the daemon trusts on loopback (loopback.py)
    shim = make_shim([port], extra="loopback_server_users: [nobody]\n")
    login = shim.sites["site1.test"]
    shim.edit_config(f"    relay_login: {{user: {login.login}, password_file: "
                     f"{os.path.join(workdir, 'secrets', login.name)}}}\n", "")  # sink: no AUTH
    dump = os.path.join(workdir, "sink")
    os.makedirs(dump)
    os.chmod(dump, 0o777)  # smtp-sink writes as nobody
    sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", "-d", f"{dump}/%M.",
                             f"127.0.0.1:{port}", "50"])
    try:
        wait_until(lambda: subprocess.run(["ss", "-Hltn", f"sport = :{port}"],
                                          capture_output=True, text=True).stdout.strip(),
                   10, "smtp-sink listening")
        shim.start()
        rcpts = ["a@example.net", "b@example.net", "c@example.org"]
        sent = shim.sendmail(["-i", *rcpts], b"Subject: sink\n\n.a dot line\nbody\n")
        assert sent.returncode == 0, sent.stderr
        def whole() -> bytes | None:  # smtp-sink creates the file, then writes it
            for root, _d, names in os.walk(dump):
                for name in names:
                    with open(os.path.join(root, name), "rb") as fh:
                        data = fh.read()
                    if b"\nbody" in data.replace(b"\r\n", b"\n"):
                        return data
            return None

        dumped = wait_until(whole, 20, "the whole message at smtp-sink")
        assert [line.split(b": ", 1)[1] for line in dumped.split(b"\n")
                if line.startswith(b"X-Rcpt-Args: ")] == [f"<{r}>".encode() for r in rcpts]
        assert b"\n.a dot line\n" in dumped.replace(b"\r\n", b"\n")
        wait_until(lambda: shim.daemon_log().count("delivered queue_id=") == 3
                   and not shim.queue_files("incoming"), 10, "three delivered lines")
    finally:
        sink.terminate()
        sink.wait(10)
