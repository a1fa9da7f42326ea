"""Content scoring with a real spamd (issue 14, part 1), end to end.

The test starts its own spamd on 127.0.0.1:<free port> (``-L``: local tests
only, no network lookups; ``-u nobody``; its own pid file and log file; the
rules Debian's spamassassin package ships) and never touches the system's
spamd service.  The daemon scores with Debian's ``spamc`` after the durable
commit: the GTUBE string (1000 points) is held, the operator is told and
``queue show`` prints the score; a plain message is delivered with a low
score; with spamd down mail waits (``on_failure: defer``) or goes on unscored
(``deliver``), and is scored once spamd is back; ``queue release`` sends a
held message; the ``spam_score`` rule suspends a site.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Relay, Shim, free_port, started, wait_until

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SPAM = b"Subject: cheap offer\n\nBuy now.\n\n" + GTUBE + b"\n"
PLAIN = (b"Subject: your order 1234\n\nHello Anna,\n\nthank you for your order; it ships "
         b"tomorrow. Reply to this message if anything is missing.\n\nThe shop\n")
SPAMD = "/usr/sbin/spamd"
RULES = ("/usr/share/spamassassin", "/var/lib/spamassassin")


def gtube_rule_present() -> bool:
    """Debian's packaged rules (or sa-update's) define GTUBE."""
    for root in RULES:
        for path in glob.glob(os.path.join(root, "**", "*.cf"), recursive=True):
            with open(path, "rb") as fh:
                if b"body GTUBE" in fh.read():
                    return True
    return False


class Spamd:
    """A spamd of the test's own, in the foreground, on a loopback port."""

    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.dir = os.path.join(workdir, f"spamd-{self.port}")
        os.makedirs(self.dir, exist_ok=True)
        self.log = os.path.join(self.dir, "spamd.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert os.path.exists(SPAMD), "spamd missing: install Debian's spamassassin"
        assert gtube_rule_present(), f"no GTUBE rule under {RULES}: spamassassin's rules"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SPAMD, "-L", "-u", "nobody", "-i", "127.0.0.1", "-p", str(self.port),
                 "-A", "127.0.0.1", "--nouser-config", "-m", "2", "--min-spare=1",
                 "--max-spare=1", "--pidfile", os.path.join(self.dir, "spamd.pid"),
                 "--syslog=stderr"], stdout=log, stderr=log)
        wait_until(self.answers, 60, f"spamd on port {self.port}")

    def answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.read_log()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        ping = subprocess.run(["spamc", "-d", "127.0.0.1", "-p", str(self.port), "-K"],
                              capture_output=True, timeout=30)
        return ping.returncode == 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
            self.proc = None

    def read_log(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as fh:
            return fh.read()


@pytest.fixture
def spamd(workdir: str, accounts: Any) -> Iterator[Spamd]:
    server = Spamd(workdir)
    server.start()
    yield server
    server.stop()


def scan_config(port: int, *lines: str) -> str:
    return "\n".join(["scan:", "  enabled: true", f"  port: {port}", "  timeout: 10s",
                      *(f"  {line}" for line in lines)]) + "\n"


def send(shim: Shim, body: bytes, user: str = "shimsite1") -> None:
    done = shim.sendmail(["-i", "someone@example.net"], body, user=user)
    assert done.returncode == 0, done.stderr


def logged(shim: Shim, text: str) -> bool:
    return text in shim.daemon_log()


def scanned_lines(shim: Shim) -> list[str]:
    return [line for line in shim.daemon_log().splitlines() if " scanned queue_id=" in line
            or line.startswith("scanned queue_id=")]


def site_mail(relay: Relay, login: str = "site1.test") -> list[bytes]:
    return [data for meta, data in relay.messages() if meta["login"] == login]


def test_gtube_is_held_plain_is_delivered_and_release_sends(
        shim_factory: Any, spamd: Spamd) -> None:
    shim, relay = started(shim_factory, extra=scan_config(spamd.port))
    send(shim, SPAM)
    wait_until(lambda: shim.queue_files("hold"), 30, "the GTUBE message held")
    (held,) = shim.queue_files("hold")
    send(shim, PLAIN)
    wait_until(lambda: site_mail(relay), 30, "the plain message at the relay")
    (delivered,) = site_mail(relay)
    assert b"your order 1234" in delivered
    lines = scanned_lines(shim)
    hold_line = next(line for line in lines if f"queue_id={held}" in line)
    assert "action=hold" in hold_line and "score=100" in hold_line  # 1000 and more
    plain_line = next(line for line in lines if f"queue_id={held}" not in line)
    assert "action=deliver" in plain_line
    plain_score = float(plain_line.split("score=")[1].split()[0])
    assert plain_score < 5.0
    # queue show names the score and why it waits
    shown = shim.admin("queue", "show", held).stdout.decode()
    assert "content:    score 100" in shown and "above scan.max_score 5" in shown
    listed = shim.admin("queue", "list").stdout.decode()
    assert f"{held}!" in listed and "[score 100" in listed
    # admin.notify is told, naming the site, the message and the next steps
    notices = wait_until(lambda: site_mail(relay, Shim.ADMIN_LOGIN), 20, "the notice")
    assert f"message {held} held".encode() in notices[0]
    assert b"site site1.test" in notices[0] and f"queue release {held}".encode() in notices[0]
    assert not any(GTUBE in data for data in site_mail(relay))
    # release: delivered, not held again for the same score (and not scanned again)
    assert shim.admin("queue", "release", held).returncode == 0
    wait_until(lambda: len(site_mail(relay)) == 2, 30, "the released message delivered")
    assert any(GTUBE in data for data in site_mail(relay))
    assert not shim.queue_files("hold")
    assert len([line for line in scanned_lines(shim) if f"queue_id={held}" in line]) == 1


def test_scanner_down_defers_then_back_delivers_scored(
        shim_factory: Any, workdir: str, accounts: Any) -> None:
    spamd = Spamd(workdir)  # not started yet: the scanner is down
    shim, relay = started(shim_factory, extra=scan_config(spamd.port))
    try:
        send(shim, PLAIN)
        send(shim, PLAIN, user="shimsite2")
        wait_until(lambda: len(shim.queue_files("deferred")) == 2, 30, "both deferred")
        assert not relay.messages()
        listed = shim.admin("queue", "list").stdout.decode()
        assert "content scanner unavailable" in listed
        wait_until(lambda: shim.daemon_log().count("attempts=2") >= 2, 30, "a retry each")
        assert shim.daemon_log().count("scan_unavailable") == 1  # once per outage
        spamd.start()
        wait_until(lambda: len(relay.messages()) == 2, 60, "both delivered once spamd is back")
        assert logged(shim, "scan_available")
        assert len(scanned_lines(shim)) == 2
        assert all("action=deliver" in line for line in scanned_lines(shim))
    finally:
        spamd.stop()


def test_scanner_down_with_deliver_sends_unscored(shim_factory: Any) -> None:
    """Unscored mail takes scan.unscored_pool: here default, not the band of low scores."""
    from test_pools import pooled

    shim, relays = pooled(
        shim_factory, [("good1", "good", False), ("plain1", "default", False)],
        extra="pools:\n  - {name: good, max_score: 5}\nrouting:\n  example.net: remote\n"
              + scan_config(free_port(), "on_failure: deliver", "unscored_pool: default"))
    shim.start()
    send(shim, SPAM)
    wait_until(lambda: site_mail(relays["plain1"]), 30, "delivered unscored")
    assert not relays["good1"].messages()
    assert logged(shim, "scan_failed") and logged(shim, "action=deliver_unscored pool=default")
    assert not scanned_lines(shim)


def test_the_score_picks_the_pool(shim_factory: Any, spamd: Spamd) -> None:
    """A plain message scores low and goes to the good pool; GTUBE is held, sent nowhere."""
    from test_pools import pooled

    shim, relays = pooled(
        shim_factory, [("good1", "good", False), ("fair1", "fair", False),
                       ("other1", "default", False)],
        extra="pools:\n  - {name: good, max_score: 5}\n  - {name: fair, min_score: 5}\n"
              "routing:\n  example.net: remote\n" + scan_config(spamd.port))
    shim.start()
    send(shim, PLAIN)
    wait_until(lambda: site_mail(relays["good1"]), 30, "the plain message at the good pool")
    send(shim, SPAM)
    wait_until(lambda: shim.queue_files("hold"), 30, "the GTUBE message held")
    (held,) = shim.queue_files("hold")
    assert not site_mail(relays["fair1"]) and not site_mail(relays["other1"])
    shown = shim.admin("queue", "show", held).stdout.decode()
    assert "score 100" in shown
    explained = shim.admin("route", "explain", "--site", "site1.test", "--score", "1",
                           "a@example.net").stdout.decode()
    assert "pool good" in explained and "good1" in explained


def test_spam_score_rule_suspends_the_site(shim_factory: Any, spamd: Spamd) -> None:
    shim, relay = started(shim_factory, "site1.test",
                          "outbreak: {spam_score: {mean: 5, min_messages: 2, window: 1h}}",
                          extra=scan_config(spamd.port))
    send(shim, SPAM)
    send(shim, SPAM)
    wait_until(lambda: logged(shim, 'suspended site=site1.test actor="outbreak rule"'), 40,
               "the spam_score rule")
    assert "rule spam_score: mean content score 20.0 over 2 scanned" in shim.daemon_log()
    refused = shim.sendmail(["-i", "someone@example.net"], PLAIN, user="shimsite1")
    assert refused.returncode == 77 and b"suspended" in refused.stderr
    send(shim, PLAIN, user="shimsite2")  # another site keeps sending, scored
    wait_until(lambda: site_mail(relay, "site2.test"), 30, "site2's mail")
    assert len(shim.queue_files("hold")) == 2 and not site_mail(relay)


def test_before_ack_refuses_above_the_maximum(shim_factory: Any, spamd: Spamd) -> None:
    """scan.mode before_ack: the caller waits for spamd; GTUBE exits 77 / 550 5.7.1."""
    from test_bs import Dialogue

    shim, relay = started(shim_factory, extra=scan_config(spamd.port, "mode: before_ack"))
    refused = shim.sendmail(["-i", "someone@example.net"], SPAM, user="shimsite1")
    assert refused.returncode == 77, refused.stderr
    assert b"scored 100" in refused.stderr and b"nothing was queued" in refused.stderr
    d = Dialogue(shim)
    d.reply()
    d.cmd("HELO [127.0.0.1]")
    code, reply = d.send("app@site1.test", ["a@example.net"], SPAM.replace(b"\n", b"\r\n"))
    assert code == 550 and "5.7.1" in reply[-1]
    assert d.close()[0] == 0
    assert not shim.queue_files("incoming") and not shim.queue_files("hold")
    send(shim, PLAIN)
    wait_until(lambda: site_mail(relay), 30, "the plain message delivered")
    lines = scanned_lines(shim)
    assert sum("action=refuse" in line for line in lines) == 2
    assert sum("action=deliver" in line for line in lines) == 1  # scored once, not again


def test_gtube_padded_past_max_size_is_scored_on_its_first_part_and_held(
        shim_factory: Any, spamd: Spamd) -> None:
    """Issue 21, finding 8: padded past scan.max_size, GTUBE used to go out unscored."""
    shim, relay = started(shim_factory, extra=scan_config(spamd.port, "max_size: 20000"))
    padded = SPAM + b"".join(b"padding line %04d to push the message past max_size\n" % n
                             for n in range(1000))
    assert len(padded) > 2 * 20000
    send(shim, padded)
    wait_until(lambda: shim.queue_files("hold"), 30, "the padded GTUBE message held")
    (held,) = shim.queue_files("hold")
    (line,) = scanned_lines(shim)
    assert f"queue_id={held}" in line and "action=hold" in line and "score=100" in line
    scanned = int(line.split("scanned_bytes=")[1].split()[0])
    size = int(line.split(" size=")[1].split()[0])  # with the headers intake added
    assert 19000 < scanned <= 20000 and size > len(padded)
    listed = shim.admin("queue", "list").stdout.decode()
    assert "of its first part (larger than scan.max_size)" in listed
    send(shim, PLAIN)  # small mail is scored whole and delivered as before
    wait_until(lambda: site_mail(relay), 30, "the plain message delivered")
    assert not any(GTUBE in data for data in site_mail(relay))


def test_a_site_listing_shows_no_score_and_no_limit(shim_factory: Any, spamd: Spamd) -> None:
    """Issue 21, finding 8: `sendmail -bp` showed a site its score and scan.max_score, which
    let it tune its spam; the operator's listings still show both."""
    shim, _relay = started(shim_factory, extra=scan_config(spamd.port))
    send(shim, SPAM)
    wait_until(lambda: shim.queue_files("hold"), 30, "the GTUBE message held")
    (held,) = shim.queue_files("hold")
    site = shim.sendmail(["-bp"], b"", user="shimsite1")
    assert site.returncode == 0, site.stderr
    mine = site.stdout.decode()
    assert f"{held}!" in mine and "(held for the operator)" in mine
    assert "score" not in mine and "max_score" not in mine and "1000" not in mine
    for operator in (shim.sendmail(["-bp"], b"", user=None).stdout.decode(),  # root
                     shim.admin("queue", "list").stdout.decode()):
        assert f"{held}!" in operator and "[score 100" in operator
        assert "above scan.max_score 5" in operator
