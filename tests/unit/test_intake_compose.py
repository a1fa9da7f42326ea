"""Composing the queued message: recipients, removed and added headers, like Postfix."""

from __future__ import annotations

import pytest

from sendmail_shim.config import parse_config
from sendmail_shim.intake.compose import CompositionError, Submission, compose
from sendmail_shim.policy.identity import Caller

CONFIG = parse_config({"hostname": "host.test", "sites": {
    "site.test": {"uids": [1001], "domains": ["site.test"]}}}, None)
SITE = CONFIG.sites["site.test"]
CALLER = Caller(uid=1001, gid=1001, pid=42)


def build(message: bytes, rcpts: list[str] | None = None, extract: bool = True,
          sender: str | None = None, fullname: str | None = None) -> tuple[list[str], str, bytes]:
    sub = Submission(sender=sender, rcpt_words=rcpts or [], extract=extract, fullname=fullname,
                     notify=None, ret=None, envid=None, body_type=None, cwd=None)
    env, final = compose(sub, message, SITE, CALLER, CONFIG, "0123456789ABCDEF", 1795400000.0)
    return env.recipients, env.sender, final


class TestRecipients:
    def test_to_cc_bcc_and_bcc_removed(self) -> None:
        rcpts, _, final = build(b"To: A <a@x.test>, b@x.test\nCc: c@x.test\n"
                                b"Bcc: hidden@x.test\nSubject: s\n\nbody\n")
        assert rcpts == ["a@x.test", "b@x.test", "c@x.test", "hidden@x.test"]
        assert b"Bcc" not in final and b"hidden" not in final

    def test_resent_headers_win(self) -> None:
        rcpts, _, final = build(b"To: old@x.test\nResent-To: new@x.test\n"
                                b"Resent-Bcc: rb@x.test\n\nbody\n")
        assert rcpts == ["new@x.test", "rb@x.test"]
        assert b"Resent-Message-Id:" in final and b"Resent-Date:" in final

    def test_command_line_recipients_are_added_to_t(self) -> None:
        rcpts, _, _ = build(b"To: a@x.test\n\nx\n", ["cmd@x.test"])
        assert rcpts == ["cmd@x.test", "a@x.test"]

    def test_argument_address_lists_and_dedupe(self) -> None:
        rcpts, _, _ = build(b"Subject: s\n\nx\n", ["Name <a@x.test>, b@x.test", "A@x.test"],
                            extract=False)
        assert rcpts == ["a@x.test", "b@x.test"]

    def test_folded_header_and_group_syntax(self) -> None:
        rcpts, _, _ = build(b"To: a@x.test,\n\tb@x.test\nCc: undisclosed-recipients:;\n\nx\n")
        assert rcpts == ["a@x.test", "b@x.test"]

    def test_unqualified_recipient_gets_hostname(self) -> None:
        rcpts, _, _ = build(b"\nx\n", ["root"], extract=False)
        assert rcpts == ["root@host.test"]

    def test_no_recipients(self) -> None:
        with pytest.raises(CompositionError, match="No recipient addresses found"):
            build(b"Subject: s\n\nx\n")

    def test_control_characters_refused(self) -> None:
        with pytest.raises(CompositionError, match="bad recipient"):
            build(b"\nx\n", ["a\x01b@x.test"], extract=False)


class TestSender:
    def test_default_is_noreply_of_site(self) -> None:
        assert build(b"To: a@x.test\n\nx\n")[1] == "noreply@site.test"

    @pytest.mark.parametrize("raw", ["<>", "", "  "])
    def test_null_sender(self, raw: str) -> None:
        assert build(b"To: a@x.test\n\nx\n", sender=raw)[1] == ""

    def test_angle_and_unqualified(self) -> None:
        assert build(b"To: a@x.test\n\nx\n", sender="<me@site.test>")[1] == "me@site.test"
        assert build(b"To: a@x.test\n\nx\n", sender="cron")[1] == "cron@site.test"


class TestHeaders:
    def test_added_at_end_of_header_block_in_postfix_order(self) -> None:
        _, _, final = build(b"To: a@x.test\nSubject: s\n\nbody\n", fullname="Cron Daemon",
                            sender="cron@site.test")
        lines = final.split(b"\n")
        assert lines[0].startswith(b"Received: by host.test (sendmail-shim, from userid 1001,"
                                   b" site site.test)")
        assert lines[1].startswith(b"\tid 0123456789ABCDEF; ")
        assert lines[2:4] == [b"To: a@x.test", b"Subject: s"]
        assert lines[4].startswith(b"Message-Id: <") and lines[4].endswith(
            b".0123456789ABCDEF@host.test>")
        assert lines[5].startswith(b"Date: ")
        assert lines[6] == b"From: cron@site.test (Cron Daemon)"
        assert lines[7:] == [b"", b"body", b""]

    def test_existing_headers_kept_and_return_path_removed(self) -> None:
        msg = (b"Return-Path: <evil@x.test>\nFrom: me@site.test\nDate: Mon, 1 Jan 2024 "
               b"00:00:00 +0000\nMessage-ID: <own@id>\nTo: a@x.test\n\nbody\n")
        _, _, final = build(msg)
        assert b"Return-Path" not in final
        assert final.count(b"Date:") == 1  # the caller's; none added
        assert b"Message-ID: <own@id>" in final and b"Message-Id:" not in final

    def test_script_hint_in_received(self) -> None:
        _, _, final = build(b"To: a@x.test\nX-PHP-Originating-Script: 1001:form(1).php\n\nx\n")
        assert b"script form_1_.php)" in final.split(b"\n", 1)[0]

    def test_body_without_blank_line_stays_body(self) -> None:
        _, _, final = build(b"To: a@x.test\nthis is body text\n")
        head, _, body = final.partition(b"\n\n")
        assert body == b"this is body text\n" and b"From: noreply@site.test" in head

    def test_body_bytes_untouched(self) -> None:
        body = b"\n..dots\n\xff\xfe raw 8-bit\r\nCR kept\n"
        _, _, final = build(b"To: a@x.test" + body)
        assert final.endswith(body)


@pytest.mark.parametrize("word", ["a\nb@example.net", "a\rb@example.net", "a\x00b@example.net",
                                  "Name <a@example.net>\n, b@example.net"])
def test_control_characters_in_an_argument_address_are_refused(word: str) -> None:
    """Found by the front-end fuzz test: the parser joined a\\nb@x into ab@x."""
    with pytest.raises(CompositionError, match="control characters") as caught:
        build(b"Subject: s\n\nx\n", rcpts=[word], extract=False)
    assert caught.value.code == 553
    sub = Submission.from_fields([("sender", "a\nb@site.test"), ("rcpt", "c@example.net")])
    with pytest.raises(CompositionError, match="bad sender address"):
        compose(sub, b"\n", SITE, CALLER, CONFIG, "0123456789ABCDEF", 1795400000.0)
