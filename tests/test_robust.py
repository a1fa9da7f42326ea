"""Accepted means deliverable; one odd message never blocks the others (issue 10: 4, 5, 9).

Real parts: the daemon as its own user, site users, the capture relay (aiosmtpd,
which refuses lines over 1000 octets), the control socket, an LMTP server.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP
from conftest import DAEMON_USER, Relay, Shim, free_port, wait_until
from dnsserver import DnsServer, Zone, free_udp_tcp_port
from test_delivery import PickyRelay

from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.wire import client, protocol


def inject(shim: Shim, recipients: list[str], sender: str = "noreply@site1.test",
           site: str = "site1.test") -> str:
    """A queue file written straight into incoming/, as an older version could have."""
    queue_id = spool.new_queue_id()
    message = b"Subject: odd\n\nodd\n"
    uid = pwd.getpwnam("shimsite1").pw_uid
    env = Envelope(queue_id=queue_id, site=site, uid=uid, sender=sender,
                   recipients=recipients, arrival=time.time(), size=len(message),
                   script="odd\udcff.php")
    tmp = os.path.join(shim.spool, "tmp", queue_id)
    with open(tmp, "wb") as fh:
        fh.write(spool.QUEUE_MAGIC + env.to_json() + b"\n" + message)
    daemon = pwd.getpwnam(DAEMON_USER)
    os.chown(tmp, daemon.pw_uid, daemon.pw_gid)
    os.chmod(tmp, 0o600)
    os.rename(tmp, os.path.join(shim.spool, "incoming", queue_id))
    return queue_id


class TestDoor:
    def test_invalid_utf8_script_header_is_delivered_escaped(
            self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        done = shim.sendmail(["-t", "-i"], b"To: a@example.net\nX-PHP-Originating-Script: "
                             b"1001:con\xfftact.php\nSubject: s\n\nbody\n")
        assert done.returncode == 0, done.stderr
        [(meta, data)] = relay.wait(1)
        assert meta["rcpt_tos"] == ["a@example.net"]
        assert b"script con_xfftact.php)" in data
        assert 'script="con\\\\xfftact.php"' in shim.daemon_log()  # quoted: a backslash
        assert not os.listdir(os.path.join(shim.spool, "maildrop"))

    @pytest.mark.parametrize("args", [
        ["-i", "a\"b\"@example.net"],
        ["-i", os.fsdecode(b"j\xf6rg@example.net")],       # Latin-1, not UTF-8
        ["-i", "-f", os.fsdecode(b"s\xe9nder@site1.test"), "a@example.net"],
        ["-t", "-i"],
    ])
    def test_unsendable_address_exits_65(self, system: tuple[Shim, Relay],
                                         args: list[str]) -> None:
        shim, _relay = system
        data = b"To: x\"y\"@example.net\n\nx\n" if "-t" in args else b"Subject: s\n\nx\n"
        done = shim.sendmail(args, data)
        assert done.returncode == 65, done
        assert b"bad " in done.stderr and b"address" in done.stderr
        assert shim.queue_files("incoming") == [] and shim.queue_files("deferred") == []

    def test_quoted_and_utf8_addresses_are_delivered_as_accepted(
            self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        done = shim.sendmail(["-i", '"john doe"@example.net', '"plain"@example.net',
                              "jörg@bücher.example"], b"Subject: s\n\nx\n")
        assert done.returncode == 0, done.stderr
        [(meta, _data)] = relay.wait(1)
        assert sorted(meta["rcpt_tos"]) == sorted(['"john doe"@example.net',
                                                   "plain@example.net", "jörg@bücher.example"])
        assert "SMTPUTF8" in meta["mail_options"]


class TestLongLines:
    def test_long_lines_broken_for_relay_and_bounce(self, shim_factory: Any) -> None:
        _make_relay, make_shim = shim_factory
        port = free_port()
        shim = make_shim([port])
        relay = PickyRelay(shim.logins, port)  # aiosmtpd: "500 Line too long" over 1000
        relay.start()
        try:
            shim.start()
            header = b"X-Long: " + b"h" * 2000
            body = b"b" * 5000
            done = shim.sendmail(["-i", "ok@example.net", "nosuch@example.net"],
                                 header + b"\nSubject: long\n\n" + body + b"\n")
            assert done.returncode == 0
            received = relay.wait(2)
            original = next(r for r in received if r[1] == "noreply@site1.test")
            bounce = next(r for r in received if r[1] in ("", "<>"))
            for data in (original[3], bounce[3]):
                assert max(len(line) for line in data.split(b"\r\n")) <= 998
            assert b"\r\n " in original[3]
            assert original[3].replace(b"\r\n ", b"").count(b"b" * 5000) == 1
            assert b"X-Long: " in bounce[3] and b"nosuch@example.net" in bounce[3]
        finally:
            relay.stop()


class TestIsolation:
    def test_unsendable_queue_file_does_not_block_the_site(
            self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        odd = inject(shim, ['a"b"@example.net', "\udcff@example.net"])
        done = shim.sendmail(["-i", "good@example.net"], b"Subject: good\n\nx\n")
        assert done.returncode == 0
        msgs = relay.wait(2)
        good = [m for m in msgs if m[0]["rcpt_tos"] == ["good@example.net"]]
        bounce = [m for m in msgs if m[0]["mail_from"] == "<>"]
        assert len(good) == 1 and len(bounce) == 1
        assert odd.encode() in bounce[0][1] and b"5.1.3" in bounce[0][1]
        wait_until(lambda: not shim.queue_files("incoming") and not shim.queue_files(
            "deferred"), 15, "queue empty")

    def test_listings_survive_odd_entries(self, system: tuple[Shim, Relay]) -> None:
        shim, _relay = system
        odd = inject(shim, ["\udcff@example.net", "ok@example.net"], sender="s\udcfe@x\r\ny",
                     site="gone\udcffsite")
        wait_until(lambda: shim.queue_files("deferred") == [odd], 15, "the odd one deferred")
        mailq = shim.sendmail(["-bp"], b"", user=None)
        assert mailq.returncode == 0, mailq
        assert odd.encode() in mailq.stdout and b"\\xff@example.net" in mailq.stdout
        assert b"gone\\xffsite" in mailq.stdout and b"s\\xfe@x\\x0d\\x0ay" in mailq.stdout
        listing = shim.admin("queue", "list")
        assert listing.returncode == 0, listing.stderr
        assert odd.encode() in listing.stdout and b"no longer in the configuration" in \
            listing.stdout
        assert json.loads(shim.admin("queue", "list", "--json").stdout)["queue_id"] == odd
        shown = shim.admin("queue", "show", odd)
        assert shown.returncode == 0 and b"gone\\xffsite" in shown.stdout
        assert shim.sendmail(["-bp"], b"").returncode == 0  # a site sees its own
        done = shim.sendmail(["-i", "good@example.net"], b"Subject: good\n\nx\n")
        assert done.returncode == 0
        _relay.wait(1)
        # printable() shows the raw byte as \xff; the log quotes that value
        # (docs/observability.md, "Logs").
        assert "deferred queue_id=" + odd + ' site="gone\\\\xffsite"' in shim.daemon_log()

    def test_damaged_status_does_not_stop_queue_runs(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        relay.stop()
        odd = inject(shim, ["x@example.net"])
        os.mkdir(os.path.join(shim.spool, "status", odd + ".json"))  # unreadable as a file
        relay.start()
        done = shim.sendmail(["-i", "good@example.net"], b"Subject: good\n\nx\n")
        assert done.returncode == 0
        [(meta, _)] = relay.wait(1)
        assert meta["rcpt_tos"] == ["good@example.net"]
        wait_until(lambda: shim.queue_files("corrupt") == [odd], 10, "the odd one in corrupt/")


class GarbageLmtp:
    """An LMTP server that answers one recipient with a line that is no SMTP reply."""

    def __init__(self) -> None:
        self.received: list[list[str]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if address.startswith("garbage@"):
            return "garbage"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(list(envelope.rcpt_tos))
        return "250 2.0.0 delivered"


@pytest.fixture
def garbage_lmtp(shim_factory: Any) -> Iterator[tuple[Shim, GarbageLmtp]]:
    _make_relay, make_shim = shim_factory
    dns = DnsServer(Zone({("here.test", "MX"): ["10 mail.shim.test."]}), free_udp_tcp_port())
    dns.start()
    inbox = GarbageLmtp()

    class _Controller(Controller):
        def factory(self) -> SMTP:
            return LMTP(self.handler, decode_data=False)

    port = free_port()
    controller = _Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    shim = make_shim([free_port()], extra=(
        f"local_mx: [mail.shim.test]\nlocal_transport: lmtp://127.0.0.1:{port}\n"
        f"resolver: {{nameservers: [127.0.0.1], port: {dns.port}, timeout: 1}}\n"))
    try:
        yield shim, inbox
    finally:
        controller.stop()
        dns.stop()


def test_exception_in_one_message_defers_then_holds_it(
        garbage_lmtp: tuple[Shim, GarbageLmtp]) -> None:
    shim, inbox = garbage_lmtp
    shim.start()
    assert shim.sendmail(["-i", "garbage@here.test"], b"Subject: a\n\nx\n").returncode == 0
    assert shim.sendmail(["-i", "ok@here.test"], b"Subject: b\n\nx\n").returncode == 0
    wait_until(lambda: inbox.received == [["ok@here.test"]], 20, "the good one delivered")
    wait_until(lambda: shim.queue_files("hold"), 30, "the odd one held")
    log = shim.daemon_log()
    assert "internal_error queue_id=" in log and "ValueError" in log
    assert "queue release" in log
    listing = shim.admin("queue", "list", "--json").stdout
    entry = json.loads(listing.splitlines()[0])
    assert entry["state"] == "hold" and "internal error: ValueError" in entry["last_error"]


class TestControlArguments:
    def request(self, shim: Shim, action: str, args: dict[str, list[str]]) -> bytes:
        fields = protocol.control_fields(action, args)
        sock = os.path.join(shim.spool, "control", "control.sock")
        return client.send_request(sock, protocol.encode_request(fields, b""))

    def test_odd_arguments_get_an_error_reply(self, system: tuple[Shim, Relay]) -> None:
        shim, _relay = system
        for digits in (5000, 4000, 11):
            reply = self.request(shim, "quota-set", {"site": ["site1.test"],
                                                     "per_hour": ["5" * digits]})
            assert reply.startswith(b"550 65 ") and b"per_hour" in reply.replace(b"-", b"_"), \
                reply[:200]
        rng = random.Random(10)
        odd = ["", "-1", "1e9", "\udcff", "\n", "0x10", "9" * 11, "none", "12", "site1.test",
               "0123456789ABCDEF\n", "../x", "\x00"]
        actions = ["quota-set", "quota-show", "quota-reset", "site-show", "site-suspend",
                   "site-resume", "queue-show", "queue-hold", "queue-release", "queue-list",
                   "nonsense"]
        keys = ["site", "per_hour", "per_day", "id", "json", "reason"]
        for _ in range(60):
            action = rng.choice(actions)
            args = {rng.choice(keys): [rng.choice(odd)] for _ in range(rng.randint(0, 3))}
            reply = self.request(shim, action, args)
            code = reply.split(b" ", 1)[0]
            assert code in (b"250", b"550"), (action, args, reply[:200])
        assert self.request(shim, "site-show", {"site": ["site1.test"]}).startswith(b"250")
        assert "Traceback" not in shim.daemon_log()
