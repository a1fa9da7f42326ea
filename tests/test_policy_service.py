"""The policy service with real parts: a private Postfix relay with Cyrus SASL, our service
as its check_policy_service, the capture relay as the sink, and the shim daemon in front.

Shows that a site's relay login, used directly against the relay (bypassing the shim), is
held to per_hour, recipients_per_message and suspension; that the shim relaying through the
same Postfix with the site's login is held the same way and its mail waits in its queue
(deferred, not lost) until the limit allows it; and that with the service down Postfix
answers its default_action (a temporary error, nothing relayed).
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import ADMIN, DAEMON_USER, Relay, Shim, free_port, wait_until, with_site_keys
from postfixrelay import REALM, PostfixRelay

SITE = "site1.test"
SINK_LOGIN = ("sink.relay", "pw-sink-" + "s" * 8)
MESSAGE = (f"From: <noreply@{SITE}>\r\nTo: <a@example.net>\r\nSubject: policy test\r\n\r\n"
           "body\r\n")


@dataclass
class World:
    shim: Shim
    sink: Relay
    postfix: PostfixRelay
    service: subprocess.Popen[bytes]
    policy_port: int
    log: str

    def service_log(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def direct(self, recipients: list[str], login: str = SITE,
               password: str | None = None) -> dict[str, tuple[int, bytes]]:
        """One message straight to Postfix with the site's login (no shim)."""
        password = password or self.shim.sites[SITE].password
        with smtplib.SMTP("127.0.0.1", self.postfix.port, timeout=30) as smtp:
            smtp.login(login, password)
            return smtp.sendmail(f"noreply@{SITE}", recipients, MESSAGE)


def start_service(shim: Shim, log: str, port: int) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(["runuser", "-u", DAEMON_USER, "--", ADMIN, "policy", "serve",
                                 "--config", shim.config], stdout=out, stderr=out,
                                env=shim.env())

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            return False

    wait_until(listening, 15, "the policy service")
    return proc


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # runuser forwards SIGTERM
        proc.wait(15)


@pytest.fixture
def world(shim_factory: Any, workdir: str) -> Iterator[World]:
    make_relay, make_shim = shim_factory
    sink = make_relay({SINK_LOGIN[0]: SINK_LOGIN[1]})
    sink.start()
    postfix_port, policy_port = free_port(), free_port()
    shim = make_shim([postfix_port], extra=(
        f"policy_service: {{listen: 'inet:127.0.0.1:{policy_port}', "
        f"unknown_login: reject, login_realm: {REALM}}}\n"))
    with_site_keys(shim, SITE, "quota: {per_hour: 3, recipients_per_message: 2}")
    postfix = PostfixRelay(workdir, shim.logins, sink.port, SINK_LOGIN,
                           f"inet:127.0.0.1:{policy_port}", port=postfix_port)
    shim.start()  # creates the spool and its state as the daemon's user
    log = os.path.join(workdir, "policy.log")
    service = start_service(shim, log, policy_port)
    world = World(shim, sink, postfix, service, policy_port, log)
    try:
        postfix.start()
        yield world
    finally:
        postfix.stop()
        stop_service(world.service)  # a test may have restarted it


def test_direct_login_is_held_to_per_hour(world: World) -> None:
    for _ in range(3):
        assert world.direct(["a@example.net"]) == {}
    with pytest.raises(smtplib.SMTPDataError) as refused:
        world.direct(["a@example.net"])
    assert refused.value.smtp_code == 450  # DEFER_IF_PERMIT at END-OF-MESSAGE
    text = refused.value.smtp_error.decode()
    assert text.startswith("4.7.1 ")
    assert "site site1.test: 3 messages in the last hour at this relay" in text
    assert "per_hour 3 (counts messages)" in text
    assert len(world.sink.wait(3)) == 3
    time.sleep(1)
    assert len(world.sink.messages()) == 3
    assert "policy_refused site=site1.test rule=per_hour" in world.service_log()


def test_direct_login_is_held_to_recipients_per_message(world: World) -> None:
    refused = world.direct(["a@example.net", "b@example.net", "c@example.net"])
    assert list(refused) == ["c@example.net"]
    code, text = refused["c@example.net"]
    assert code == 554 and text.startswith(b"5.7.1 ")
    assert b"site site1.test: more than recipients_per_message 2" in text
    meta, _ = world.sink.wait(1)[0]
    assert sorted(meta["rcpt_tos"]) == [
        "a@example.net", "b@example.net"]


def test_suspension_stops_the_login_at_the_relay_within_a_second(world: World) -> None:
    assert world.direct(["a@example.net"]) == {}
    done = world.shim.admin("site", "suspend", "--reason", "spam run", SITE)
    assert done.returncode == 0, done.stderr
    time.sleep(1.1)  # the service reopens its state at most a second old
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        world.direct(["a@example.net"])
    code, text = refused.value.recipients["a@example.net"]
    assert code == 450 and b"site site1.test is suspended since" in text
    assert b"(spam run)" in text
    assert len(world.sink.wait(1)) >= 1
    # another site's login is not affected
    site2 = world.shim.sites["site2.test"]
    assert world.direct(["a@example.net"], site2.login, site2.password) == {}


def test_unknown_login_follows_the_configured_action(world: World) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        world.direct(["a@example.net"], world.shim.ADMIN_LOGIN, world.shim.ADMIN_PASSWORD)
    code, text = refused.value.recipients["a@example.net"]
    assert code == 554 and text.startswith(b"5.7.1 ")
    assert b"relay login 'admin.shim@relay.test' belongs to no site" in text


def test_shim_through_the_relay_is_held_and_its_mail_waits(world: World) -> None:
    for _ in range(3):  # the site's login spends its hour at the relay directly
        assert world.direct(["a@example.net"]) == {}
    world.sink.wait(3)
    sent = world.shim.sendmail(["-t", "-i"], MESSAGE.replace("\r\n", "\n").encode())
    assert sent.returncode == 0, sent.stderr  # the shim's own count is 0 of 3
    wait_until(lambda: world.shim.queue_files("deferred") and "450 4.7.1" in
               world.shim.daemon_log(), 20, "the shim's message deferred by the relay")
    assert "per_hour 3" in world.shim.daemon_log()
    assert world.postfix.queued() == 0  # Postfix did not take it either: not lost, waiting
    assert len(world.sink.messages()) == 3
    # the operator raises the limit: the service sees it, the shim's retry gets through
    done = world.shim.admin("quota", "set", "--per-hour", "10", SITE)
    assert done.returncode == 0, done.stderr
    world.sink.wait(4, timeout=30)
    wait_until(lambda: not world.shim.queue_files("deferred"), 20, "the shim's queue drained")


def test_service_down_is_postfix_default_action(world: World) -> None:
    stop_service(world.service)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        world.direct(["a@example.net"])
    code, text = refused.value.recipients["a@example.net"]
    assert code == 451 and text.startswith(b"4.3.5 ")
    assert b"policy service unavailable" in text
    assert world.sink.messages() == []
    world.service = start_service(world.shim, world.log, world.policy_port)
    assert world.direct(["a@example.net"]) == {}
