"""The address grammar, long lines, DSN texts, queue ids and partial DNS answers (no daemon).

Issue 10, defects 4, 5, 9 and 11: what the door accepts is what delivery can
send; lines over 998 octets are broken like Postfix; nothing from a queue file
or -V reaches a DSN field unescaped (a broken AAAA: test_delivery_route_families.py).
"""

from __future__ import annotations

import email

import pytest

from sendmail_shim.config import parse_config
from sendmail_shim.delivery.bounce import build_bounce, xtext
from sendmail_shim.delivery.relay import smtp_data
from sendmail_shim.intake.compose import CompositionError, Submission, compose
from sendmail_shim.policy.identity import Caller
from sendmail_shim.store import spool
from sendmail_shim.store.address import AddressError, canonical, smtp_path
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import Outcome

CONFIG = parse_config({"hostname": "host.test", "sites": {
    "site.test": {"uids": [1001], "domains": ["site.test"]}}}, None)
SITE = CONFIG.sites["site.test"]


class TestGrammar:
    @pytest.mark.parametrize(("given", "kept"), [
        ("a@example.net", "a@example.net"),
        ('"john"@example.net', "john@example.net"),            # quoted only when needed
        ('"john doe"@example.net', '"john doe"@example.net'),
        ('"a@b"@example.net', '"a@b"@example.net'),
        ('"a\\"b"@example.net', '"a\\"b"@example.net'),
        ('"a..b"@example.net', '"a..b"@example.net'),
        ("jörg@bücher.example", "jörg@bücher.example"),           # RFC 6531
        ("x@[192.0.2.1]", "x@[192.0.2.1]"),
        ("x@[IPv6:2001:db8::1]", "x@[IPv6:2001:db8::1]"),
        ("o'brien+tag@example.net", "o'brien+tag@example.net"),
    ])
    def test_accepted_in_canonical_form(self, given: str, kept: str) -> None:
        assert canonical(given) == kept
        assert smtp_path(given) == f"<{kept}>"

    @pytest.mark.parametrize("bad", [
        'a"b"@example.net', "a..b@example.net", ".a@example.net", "a b@example.net",
        "\udcff@example.net", "a@exa\udcffmple.net", "a\r\nRCPT TO:<x@y>@example.net",
        "a@-x.example", "a@x..example", "a@", "@example.net", "noat", "a@[999.1.1.1]",
        "x" * 65 + "@example.net", "a@" + "b" * 64 + ".net", "a@" + "b." * 126 + "net",
        '"a\\\x01"@example.net', '"a"b"@example.net', "a<b@example.net",
    ])
    def test_refused(self, bad: str) -> None:
        with pytest.raises(AddressError):
            canonical(bad)

    def test_null_sender_path(self) -> None:
        assert smtp_path("") == "<>"


def build(message: bytes, rcpts: list[str], envid: str | None = None) -> Envelope:
    sub = Submission(sender=None, rcpt_words=rcpts, extract=True, fullname=None, notify=None,
                     ret=None, envid=envid, body_type=None, cwd=None)
    env, _final = compose(sub, message, SITE, Caller(1001, 1001, 1), CONFIG,
                          "0123456789ABCDEF", 1795400000.0)
    return env


class TestDoor:
    @pytest.mark.parametrize("rcpt", ['a"b"@example.net', "\udcff\udcfe@example.net"])
    def test_unsendable_recipient_is_553(self, rcpt: str) -> None:
        with pytest.raises(CompositionError) as info:
            build(b"Subject: s\n\nx\n", [rcpt])
        assert info.value.code == 553 and info.value.enhanced == "5.1.3"
        assert "bad recipient address" in str(info.value)

    def test_invalid_utf8_in_to_header_refused(self) -> None:
        with pytest.raises(CompositionError, match="not valid UTF-8"):
            build(b"To: \xff@example.net\n\nx\n", [])

    def test_quoted_local_part_kept_quoted(self) -> None:
        env = build(b"To: \"john doe\"@example.net, \"plain\"@example.net\n\nx\n", [])
        assert env.recipients == ['"john doe"@example.net', "plain@example.net"]

    def test_invalid_utf8_script_hint_is_escaped(self) -> None:
        env = build(b"To: a@example.net\nX-PHP-Originating-Script: 1001:f\xffo\x01rm.php\n\nx\n",
                    [])
        assert env.script == "f\\xffo\\x01rm.php"
        env.to_json().decode("ascii")  # the envelope line survives

    @pytest.mark.parametrize("envid", ["a\r\nX-Injected: yes", "x" * 101, "sp ace"])
    def test_bad_envid_refused(self, envid: str) -> None:
        with pytest.raises(CompositionError, match="envelope id"):
            build(b"To: a@example.net\n\nx\n", [], envid=envid)


class TestLongLines:
    def test_998_octets_unchanged_longer_broken_like_postfix(self) -> None:
        ok = b"a" * 998
        long = b"H: " + b"b" * 2500
        out = smtp_data(ok + b"\n" + long + b"\nend\n")
        lines = out.split(b"\r\n")
        assert lines[0] == ok
        assert lines[1] == long[:998]
        assert lines[2] == b" " + long[998:1995] and len(lines[2]) == 998
        assert lines[3] == b" " + long[1995:]
        assert lines[4:] == [b"end", b""]
        assert max(len(line) for line in lines) <= 998

    def test_line_ends_normalized(self) -> None:
        # A queue file's lines end with LF (wire/lineends.py); a CR inside one is data
        # (only in files queued before that rule) and never a line end on the wire.
        assert smtp_data(b"a\nb\nc\nd") == b"a\r\nb\r\nc\r\nd\r\n"
        assert smtp_data(b"a\r\nb\rc\nd") == b"a \r\nb c\r\nd\r\n"


class TestDsnTexts:
    def test_envid_xtext_and_relay_text_one_line(self) -> None:
        assert xtext("a+b=c d\r\n") == "a+2Bb+3Dc+20d+0D+0A"
        env = Envelope(queue_id="0123456789ABCDEF", site="site.test", uid=1001,
                       sender="me@site.test", recipients=["x@example.net"], arrival=0.0,
                       envid="id\r\nX-Injected: yes")
        failure = Outcome.from_reply(550, "5.1.1 first line\nFinal-Recipient: rfc822; evil@x",
                                     "relay:25")
        _env, data = build_bounce(CONFIG, env, b"Subject: s\n\nx\n",
                                  {"x@example.net": failure}, 1795400000.0)
        report = email.message_from_bytes(data)
        status = next(p for p in report.walk()
                      if p.get_content_type() == "message/delivery-status")
        text = status.as_string()
        assert "Original-Envelope-Id: id+0D+0AX-Injected:+20yes" in text
        assert "X-Injected: yes" not in text
        assert [line for line in text.splitlines() if line.startswith("Final-Recipient:")] \
            == ["Final-Recipient: rfc822; x@example.net"]
        assert "550 5.1.1 first line Final-Recipient: rfc822; evil@x" in text


def test_queue_id_fullmatch() -> None:
    assert spool.check_queue_id("0123456789ABCDEF") == "0123456789ABCDEF"
    for bad in ("0123456789ABCDEF\n", "0123456789ABCDEF\r", "../23456789ABCDEF"):
        with pytest.raises(spool.QueueIdError):
            spool.check_queue_id(bad)
