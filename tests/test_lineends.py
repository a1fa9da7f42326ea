"""Bare CR on every road, as a real site uid against a real daemon and relay (issue 21, #2).

site1's sender policy refuses foreign envelope senders and From headers.  A
lone CR inside the header block hid a ``From: CEO <ceo@site2.example>`` and a
``Bcc:`` inside the Subject: compose and the sender policy split on LF, the
relay client split on CR too, and the relay received both lines under site1's
login.  The rule (wire/lineends.py) refuses it on every road, with 65 or
``554 5.6.0``; a CR that ends a line (CRLF, CR CR LF) or sits in the body is
normalised, and the relay receives exactly the lines the policy read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import test_firewall
from conftest import Relay, Shim, free_port, started, wait_until, with_site_keys
from test_firewall import FAR4, apply, fw_config

from sendmail_shim.wire import protocol

POLICY = "sender_policy: {envelope: refuse, from_header: refuse}"
SMUGGLED = (b"Resent-To: x@ext.example\nSubject: invoice\rFrom: CEO <ceo@site2.example>\r"
            b"Bcc: hidden@ext.example\n\nbody\n")
SUBJECT_ONLY = b"To: x@ext.example\nSubject: invoice\rFrom: CEO <ceo@site2.example>\n\nbody\n"
# What a PHP script on a bad day writes: CRLF headers, CR CR LF, an old-Mac body line.
HONEST = (b"To: friend@ext.example\r\nFrom: Web <web@site1.test>\r\nSubject: honest\r\r\n"
          b"\r\nline 1\rline 2\r\r\nline 3\r\n")


def sync(shim: Shim, relay: Relay, already: int = 0) -> list[tuple[dict[str, Any], bytes]]:
    """Send one plain message and wait for it: everything queued before it has gone too."""
    done = shim.sendmail(["-i", "sync@ext.example"], b"Subject: sync\n\nsync\n")
    assert done.returncode == 0, done.stderr
    relay.wait(already + 1)
    wait_until(lambda: not shim.queue_files("incoming") and not shim.queue_files("deferred"),
               20, "an empty queue")
    return relay.messages()


def no_smuggling(data: bytes) -> None:
    """Only CRLF line ends, and no line the policy would have refused."""
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"ceo@site2.example" not in head and b"hidden@" not in head


def as_site(code: str, user: str = "shimsite1") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60)


def raw_request(message: bytes) -> bytes:
    return protocol.encode_request(protocol.submission_fields([], extract=True), message)


class TestSocketRoad:
    def test_front_end_refuses_65_and_the_honest_message_arrives_line_for_line(
            self, shim_factory: Any) -> None:
        shim, relay = started(shim_factory, "site1.test", POLICY)
        for message in (SMUGGLED, SUBJECT_ONLY, SMUGGLED.replace(b"\n", b"\r\n")):
            done = shim.sendmail(["-t", "-i"], message)
            assert done.returncode == 65, (message, done.returncode, done.stderr)
            assert b"line 2 of the header block holds a carriage return" in done.stderr
        done = shim.sendmail(["-t", "-i"], HONEST)
        assert done.returncode == 0, done.stderr
        msgs = sync(shim, relay, 1)
        assert [meta["rcpt_tos"] for meta, _ in msgs] == [["friend@ext.example"],
                                                         ["sync@ext.example"]]
        meta, data = msgs[0]
        assert meta["login"] == "site1.test"
        no_smuggling(data)
        assert b"\r\nSubject: honest\r\n" in data
        assert data.endswith(b"\r\n\r\nline 1\r\nline 2\r\nline 3\r\n")

    def test_the_daemon_refuses_a_raw_request_that_skips_the_front_end(
            self, shim_factory: Any) -> None:
        shim, relay = started(shim_factory, "site1.test", POLICY)
        for message in (SMUGGLED, SUBJECT_ONLY):
            code = ("from sendmail_shim.wire import client\n"
                    f"r = client.ask({shim.socket!r}, {raw_request(message)!r})\n"
                    "print(r.code, r.status, r.text)")
            done = as_site(code)
            want = "554 65 5.6.0 site site1.test: line 2 of the header block holds a carriage"
            assert done.stdout.startswith(want), (done.stdout, done.stderr)
        msgs = sync(shim, relay)
        assert [meta["rcpt_tos"] for meta, _ in msgs] == [["sync@ext.example"]]
        log = shim.daemon_log()
        assert log.count("origin=socket status=554 enhanced=5.6.0") == 2


class TestDropRoad:
    def test_front_end_refuses_before_writing_and_pickup_refuses_a_hand_made_file(
            self, shim_factory: Any) -> None:
        shim, relay = started(shim_factory, "site1.test", POLICY)
        shim.stop()
        maildrop = os.path.join(shim.spool, "maildrop")
        done = shim.sendmail(["-t", "-i"], SMUGGLED)
        assert done.returncode == 65 and b"header block" in done.stderr
        assert not [n for n in os.listdir(maildrop) if n.startswith("m.")]
        # A site can write a drop file by hand, in the front end's format.
        code = ("from sendmail_shim.wire import client\n"
                f"print(client.write_drop_file({maildrop!r}, {raw_request(SMUGGLED)!r}))")
        made = as_site(code)
        assert made.returncode == 0, made.stderr
        assert [n for n in os.listdir(maildrop) if n.startswith("m.")]
        shim.start()
        wait_until(lambda: "origin=maildrop status=554 enhanced=5.6.0" in shim.daemon_log(),
                   20, "pickup's refusal")
        msgs = sync(shim, relay)
        # Nothing of the smuggled message left; the writer got exit 0 from its own hand-made
        # file, so it is told by a notice (daemon/dropnotice.py) to the site's own sender.
        assert sorted(meta["rcpt_tos"] for meta, _ in msgs) == [["noreply@site1.test"],
                                                                 ["sync@ext.example"]]
        notice = next(data for meta, data in msgs if meta["rcpt_tos"] == ["noreply@site1.test"])
        assert b"Undelivered Mail Returned to Sender" in notice and b"5.6.0" in notice


class TestBs:
    def test_refused_at_end_of_data_and_the_session_goes_on(self, shim_factory: Any) -> None:
        from test_bs import Dialogue

        shim, relay = started(shim_factory, "site1.test", POLICY)
        dialogue = Dialogue(shim)
        assert dialogue.reply()[0] == 220
        assert dialogue.cmd("EHLO app.site1.test")[0] == 250
        crlf = SMUGGLED.replace(b"\n", b"\r\n")
        code, lines = dialogue.send("web@site1.test", ["x@ext.example"], crlf)
        assert code == 554 and lines[0].startswith("554 5.6.0 message refused: line 2"), lines
        code, lines = dialogue.send("web@site1.test", ["friend@ext.example"],
                                    HONEST)
        assert code == 250, lines
        assert dialogue.close()[0] == 0
        msgs = sync(shim, relay, 1)
        assert [meta["rcpt_tos"] for meta, _ in msgs] == [["friend@ext.example"],
                                                         ["sync@ext.example"]]
        no_smuggling(msgs[0][1])
        assert msgs[0][1].endswith(b"\r\n\r\nline 1\r\nline 2\r\nline 3\r\n")


# As the site, through the firewall's redirect: port 25 of a far host, captured.
SITE_SMTP = r"""
import smtplib, sys
smtp = smtplib.SMTP(sys.argv[1], 25, timeout=20)
smtp.ehlo("wp.site1.test")
for data in (sys.argv[2], sys.argv[3]):
    smtp.mail("wordpress@site1.test")
    smtp.rcpt("buyer@ext.example")
    code, reply = smtp.data(data.encode("latin-1"))  # bytes: smtplib changes no line end
    print(code, reply.decode())
smtp.quit()
"""


netns = test_firewall.netns  # the fixture: two network namespaces, a far SMTP host


class TestCapture:
    def test_captured_smtp_gets_554_and_the_honest_message_arrives_line_for_line(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        near, _far = netns
        make_relay, make_shim = shim_factory
        relay_port, capture_port = free_port(), free_port()
        shim = make_shim([relay_port])
        fw_config(shim, capture_port)  # as test_firewall's captured_system, with the policy
        with_site_keys(shim, "site1.test", POLICY)
        relay = make_relay(shim.logins, relay_port, netns=near)
        relay.start()
        shim.netns = near
        shim.start()
        apply(near, shim)
        smuggled = SMUGGLED.replace(b"\n", b"\r\n").decode("latin-1")
        done = subprocess.run(["ip", "netns", "exec", near, "runuser", "-u", "shimsite1", "--",
                               sys.executable, "-c", SITE_SMTP, FAR4, smuggled,
                               HONEST.decode("latin-1")],
                              capture_output=True, text=True, timeout=60)
        replies = done.stdout.splitlines()
        assert len(replies) == 2, (done.stdout, done.stderr)
        assert replies[0].startswith("554 5.6.0 site site1.test: line 2 of the header block")
        assert replies[1].startswith("250 "), replies
        [(meta, data)] = relay.wait(1)
        wait_until(lambda: not shim.queue_files("incoming") and not shim.queue_files("deferred"),
                   20, "an empty queue")
        assert len(relay.messages()) == 1
        assert meta["login"] == "site1.test" and meta["rcpt_tos"] == ["buyer@ext.example"]
        no_smuggling(data)
        assert data.endswith(b"\r\n\r\nline 1\r\nline 2\r\nline 3\r\n")
        assert "origin=capture status=554 enhanced=5.6.0" in shim.daemon_log()
