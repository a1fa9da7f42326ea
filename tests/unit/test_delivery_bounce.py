"""delivery.bounce: RFC 3464 notices, their structure, escaping and the cases without one."""

from __future__ import annotations

import random
import re
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from sendmail_shim.config import Config
from sendmail_shim.delivery import bounce
from sendmail_shim.delivery.relay import LINE_LENGTH_LIMIT, smtp_data
from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.headers import header_name, split_header_block
from sendmail_shim.store.outcome import Outcome
from sendmail_shim.wire import paths

from .conftest import HOSTNAME, MESSAGE, SITE1, MakeEnvelope

NOW = 1_800_000_000.0
RELAY = "relay.example.net:587"
TOP_FIELDS = {"from", "to", "subject", "auto-submitted", "date", "message-id", "mime-version",
              "content-type", "content-transfer-encoding"}
DSN_FIELDS = {"Original-Envelope-Id", "Reporting-MTA", "X-Sendmail-Shim-Queue-ID",
              "X-Sendmail-Shim-Site", "Arrival-Date", "Final-Recipient", "Action", "Status",
              "Remote-MTA", "Diagnostic-Code"}


def parse(data: bytes) -> EmailMessage:
    parsed = message_from_bytes(data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def parts(data: bytes) -> tuple[str, str, bytes]:
    """The human text, the delivery-status text and the raw headers part."""
    report = parse(data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    boundary = report.get_boundary()
    assert boundary is not None
    chunks = data.split(f"--{boundary}".encode())
    assert chunks[-1] == b"--\n" and len(chunks) == 5  # preamble, three parts, the end
    bodies = [chunk.split(b"\n\n", 1) for chunk in chunks[1:4]]
    types = [re.search(rb"Content-Type: ([\w/-]+)", head).group(1)  # type: ignore[union-attr]
             for head, _ in bodies]
    assert types == [b"text/plain", b"message/delivery-status", b"text/rfc822-headers"]
    return bodies[0][1].decode(), bodies[1][1].decode(), bodies[2][1]


def dsn_blocks(status_text: str) -> list[dict[str, str]]:
    blocks = []
    for block in status_text.strip("\n").split("\n\n"):
        fields = {}
        for line in block.split("\n"):
            name, sep, value = line.partition(": ")
            assert sep and name in DSN_FIELDS, f"not a DSN field line: {line!r}"
            fields[name] = value
        blocks.append(fields)
    return blocks


@pytest.fixture
def original(make_envelope: MakeEnvelope) -> Envelope:
    return make_envelope(sender="webmaster@site1.test",
                         recipients=["gone@example.net", "full@example.org"])


FAILURES = {
    "gone@example.net": Outcome.from_reply(550, "5.1.1 <gone@example.net>: no such user", RELAY),
    "full@example.org": Outcome.network("connection timed out for 5 days"),
}


class TestStructure:
    def test_report_parts_and_envelope(self, config: Config, original: Envelope) -> None:
        envelope, data = bounce.build_bounce(config, original, MESSAGE, FAILURES, NOW)
        assert envelope.sender == "" and envelope.recipients == [original.sender]
        assert envelope.origin == "bounce" and envelope.extra == {
            "bounce_of": original.queue_id}
        assert (envelope.site, envelope.uid) == (original.site, original.uid)
        assert envelope.size == len(data) and envelope.arrival == NOW
        assert spool.QUEUE_ID.fullmatch(envelope.queue_id)
        head = parse(data)
        assert head["To"] == original.sender
        assert head["From"].startswith(f"MAILER-DAEMON@{HOSTNAME}")
        assert head["Auto-Submitted"] == "auto-replied"
        assert envelope.queue_id in head["Message-Id"]
        human, status_text, _headers = parts(data)
        assert f"queue id {original.queue_id}, site {SITE1}" in human
        assert "<gone@example.net>: relay.example.net:587 said: 550 5.1.1" in human
        assert "correct it and send the message again" in human
        per_message, gone, full = dsn_blocks(status_text)
        assert per_message == {
            "Reporting-MTA": f"dns; {HOSTNAME}",
            "X-Sendmail-Shim-Queue-ID": original.queue_id,
            "X-Sendmail-Shim-Site": SITE1,
            "Arrival-Date": per_message["Arrival-Date"],
        }
        assert gone == {
            "Final-Recipient": "rfc822; gone@example.net", "Action": "failed",
            "Status": "5.1.1", "Remote-MTA": "dns; relay.example.net",
            "Diagnostic-Code": "smtp; 550 5.1.1 <gone@example.net>: no such user",
        }
        assert full == {
            "Final-Recipient": "rfc822; full@example.org", "Action": "failed",
            "Status": "5.4.7", "Diagnostic-Code": "x-unix; connection timed out for 5 days",
        }

    def test_original_headers_kept_body_left_out(self, config: Config,
                                                 original: Envelope) -> None:
        message = (b"Received: from a\n\tby b\nSubject: =?utf-8?q?h=C3=A9?=\n"
                   b"X-Raw: \xff\xfe bytes\n\nsecret body\n")
        _env, data = bounce.build_bounce(config, original, message, FAILURES, NOW)
        _human, _status, headers = parts(data)
        fields, _ = split_header_block(message)
        assert headers == b"".join(fields) + b"\n"
        assert b"secret body" not in data

    def test_status_from_the_reply_or_the_class(self, config: Config,
                                                original: Envelope) -> None:
        failures = {
            "a@x.test": Outcome.from_reply(554, "transaction failed", RELAY),
            "b@x.test": Outcome.from_reply(550, "5.7.1 relaying denied", RELAY),
            "c@x.test": Outcome.from_reply(451, "4.3.0 try later", RELAY),  # given up
        }
        _env, data = bounce.build_bounce(config, original, MESSAGE, failures, NOW)
        blocks = dsn_blocks(parts(data)[1])[1:]
        assert [b["Status"] for b in blocks] == ["5.0.0", "5.7.1", "5.4.7"]

    def test_envid_is_xtext(self, config: Config, make_envelope: MakeEnvelope) -> None:
        original = make_envelope(envid="a+b=c d\u00e9\n")
        _env, data = bounce.build_bounce(config, original, MESSAGE, FAILURES, NOW)
        per_message = dsn_blocks(parts(data)[1])[0]
        assert per_message["Original-Envelope-Id"] == "a+2Bb+3Dc+20d+C3+A9+0A"
        assert next(iter(per_message)) == "Original-Envelope-Id"

    def test_utf8_recipient_type(self, config: Config, original: Envelope) -> None:
        failures = {"j\u00fcrgen@b\u00fccher.test": Outcome.from_reply(550, "no", RELAY)}
        _env, data = bounce.build_bounce(config, original, MESSAGE, failures, NOW)
        block = dsn_blocks(parts(data)[1])[1]
        assert block["Final-Recipient"] == "utf-8; j\u00fcrgen@b\u00fccher.test"


class TestEscaping:
    def test_nothing_from_the_queue_file_adds_fields(self, config: Config,
                                                     make_envelope: MakeEnvelope) -> None:
        original = make_envelope(sender="a@b.test\r\nBcc: victim@x.test",
                                 site="evil\nX-Injected: 1")
        failures = {
            "r@x.test\nFinal-Recipient: rfc822; forged@x.test":
                Outcome.from_reply(550, "no\r\nStatus: 2.0.0\r\nX-Relay: 1", "r\n:1"),
            "s@x.test": Outcome.network("bad \x00\x1b[31m \udcff bytes"),
        }
        _env, data = bounce.build_bounce(config, original, MESSAGE, failures, NOW)
        top, _body = split_header_block(data)
        assert {header_name(f) for f in top} == TOP_FIELDS
        assert b"\nBcc:" not in data and b"\nX-Injected" not in data
        blocks = dsn_blocks(parts(data)[1])
        assert blocks[0]["X-Sendmail-Shim-Site"] == "evil X-Injected: 1"
        assert [b["Status"] for b in blocks[1:]] == ["5.0.0", "5.4.7"]
        assert blocks[1]["Diagnostic-Code"] == "smtp; 550 no Status: 2.0.0 X-Relay: 1"
        assert blocks[2]["Diagnostic-Code"] == "x-unix; bad \\x00\\x1b[31m \\xff bytes"

    def test_seeded_garbage_never_breaks_the_structure(self, config: Config,
                                                       make_envelope: MakeEnvelope) -> None:
        rng = random.Random(3464)
        alphabet = "ab@.:;<>\r\n\t\x00\x7f\u00e9\udc80\u2028 +="

        def junk(n: int) -> str:
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))

        for _ in range(40):
            original = make_envelope(sender=junk(30) or "x", site=junk(20),
                                     envid=junk(20) or None)
            failures = {junk(30): rng.choice([Outcome.from_reply(550, junk(60), junk(10)),
                                              Outcome.network(junk(60))])
                        for _ in range(rng.randint(1, 3))}
            _env, data = bounce.build_bounce(config, original, MESSAGE, failures, NOW)
            top, _body = split_header_block(data)
            assert {header_name(f) for f in top} == TOP_FIELDS
            blocks = dsn_blocks(parts(data)[1])  # every line a known field
            assert len(blocks) == 1 + len(failures)


def test_long_header_lines_leave_at_most_998_octets(config: Config,
                                                    original: Envelope) -> None:
    long_header = b"X-Long: " + b"y" * 5000 + b"\n"
    message = b"Subject: s\n" + long_header + b"\nbody\n"
    _env, data = bounce.build_bounce(config, original, message, FAILURES, NOW)
    assert long_header in data  # the copy keeps the header as the site wrote it ...
    wire = smtp_data(data)  # ... and goes out like every message, broken like Postfix
    lines = wire.split(b"\r\n")
    assert max(map(len, lines)) <= LINE_LENGTH_LIMIT
    rejoined = b"".join(line[1:] if line.startswith(b" y") else line for line in lines)
    assert b"y" * 5000 in rejoined


def test_returned_headers_stop_at_postfixs_bounce_size_limit(config: Config,
                                                              original: Envelope) -> None:
    """Issue 21, second fresh attack: drop-file notices carried 87 KB of a site's own
    padding headers past its quota; the copy stops at whole fields within 50,000 bytes."""
    padding = b"".join(b"X-Pad-%03d: " % n + b"p" * 200 + b"\n" for n in range(400))
    message = b"Subject: s\n" + padding + b"\nbody\n"
    _env, data = bounce.build_bounce(config, original, message, FAILURES, NOW)
    assert b"Subject: s\n" in data and b"X-Pad-000: " in data
    assert b"X-Pad-399" not in data and b"the other header fields are not returned" in data
    assert len(data) < bounce.BOUNCE_SIZE_LIMIT + 10_000


class TestQueueBounce:
    def test_queued_into_incoming(self, config: Config, spool_layout: paths.SpoolLayout,
                                  original: Envelope) -> None:
        queue_id = bounce.queue_bounce(config, original, MESSAGE, FAILURES)
        assert queue_id is not None
        assert spool.queue_ids(spool_layout, spool.INCOMING) == [queue_id]
        envelope, data = spool.read_entry(spool_layout, spool.INCOMING, queue_id)
        assert envelope.sender == "" and envelope.extra["bounce_of"] == original.queue_id
        assert parse(data).get_content_type() == "multipart/report"

    @pytest.mark.parametrize("fields", [
        {"sender": ""},  # a bounce is never bounced
        {"notify": "never"},
        {"notify": "NEVER"},
    ])
    def test_no_notice_when_none_is_wanted(self, config: Config,
                                           spool_layout: paths.SpoolLayout,
                                           make_envelope: MakeEnvelope,
                                           fields: dict[str, str]) -> None:
        assert bounce.queue_bounce(config, make_envelope(**fields), MESSAGE, FAILURES) is None
        assert spool.queue_ids(spool_layout, spool.INCOMING) == []

    def test_no_failures_no_notice(self, config: Config, spool_layout: paths.SpoolLayout,
                                   original: Envelope) -> None:
        assert bounce.queue_bounce(config, original, MESSAGE, {}) is None
        assert spool.queue_ids(spool_layout, spool.INCOMING) == []

    def test_notify_failure_still_bounces(self, config: Config,
                                          spool_layout: paths.SpoolLayout,
                                          make_envelope: MakeEnvelope) -> None:
        original = make_envelope(notify="failure,delay")
        assert bounce.queue_bounce(config, original, MESSAGE, FAILURES) is not None


def test_xtext_leaves_safe_characters() -> None:
    assert bounce.xtext("abc-123_!~") == "abc-123_!~"
    assert bounce.xtext("\udcff") == "+FF"  # a raw byte kept by surrogateescape


def test_one_line_folds_and_limits() -> None:
    assert bounce.one_line("a\r\nb\nc") == "a b c"
    assert bounce.one_line("x" * 2000) == "x" * 1000 + "..."
