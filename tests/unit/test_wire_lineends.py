"""The line-ending rule (wire/lineends.py) and its call sites: intake, -bs, the relay client.

Issue 21, finding 2: compose and the sender policy split header lines on LF
only while the relay client turned a lone CR into CRLF, so ``Subject:
invoice\\rFrom: CEO <ceo@site2.example>`` passed the From policy as a Subject
and reached the relay as a From line.  The invariant tested here: whatever a
site writes, the lines every step reads are the lines the relay receives.
"""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendmail_shim.config import Config
from sendmail_shim.delivery.relay import LINE_LENGTH_LIMIT, smtp_data
from sendmail_shim.frontend.bs import HandOffHandler
from sendmail_shim.intake.accept import accept_submission
from sendmail_shim.policy.identity import Caller
from sendmail_shim.store import spool
from sendmail_shim.store.headers import split_header_block
from sendmail_shim.store.state import State
from sendmail_shim.wire import protocol, sysexits
from sendmail_shim.wire.lineends import LineEndError, normalize

from .conftest import SITE1, MakeConfig, prepare

# The reproduction: a Subject that hides a From and a Bcc behind lone CRs.
SMUGGLED = (b"Resent-To: x@ext.example\nSubject: invoice\rFrom: CEO <ceo@site2.example>\r"
            b"Bcc: hidden@ext.example\n\nbody\n")
SUBJECT_ONLY = b"To: x@ext.example\nSubject: invoice\rFrom: CEO <ceo@site2.example>\n\nbody\n"


class TestRule:
    @pytest.mark.parametrize(("raw", "want"), [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\nB: 2\n\nbody\n"),  # CRLF (PHP, -bs)
        (b"A: 1\r\r\nB: 2\r\r\n\r\r\nx\r\r\n", b"A: 1\nB: 2\n\nx\n"),  # CR CR LF
        (b"A: 1\n\nx\r\r\r\r\r\ny\n", b"A: 1\n\nx\ny\n"),  # a longer run is one line end
        (b"A: 1\n\nlast\r", b"A: 1\n\nlast\n"),  # a CR at the very end ends the line
        (b"A: 1\r", b"A: 1\n"),  # ... also the header block's last
        (b"A: 1\n\nx\ry\rz\n", b"A: 1\n\nx\ny\nz\n"),  # a lone CR in the body: a line end
        (b"A: 1\n\r\nbody\rmore\n", b"A: 1\n\nbody\nmore\n"),  # CRLF blank line, CR after
        (b"A: 1\n\nbin\x00ary\n", b"A: 1\n\nbin\x00ary\n"),  # NUL in the body: data
        (b"\nx\ry\n", b"\nx\ny\n"),  # no header block at all
        (b"A: 1\nB: 2\n\nbody\n", b"A: 1\nB: 2\n\nbody\n"),  # LF: unchanged
    ])
    def test_line_ends(self, raw: bytes, want: bytes) -> None:
        assert normalize(raw) == want

    @pytest.mark.parametrize(("raw", "line", "what"), [
        (SMUGGLED, 2, "carriage return"),
        (SUBJECT_ONLY, 2, "carriage return"),
        (b"Subject: a\rb\r\n\r\nbody\n", 1, "carriage return"),
        (b"From: x\n \r continuation\n\n", 2, "carriage return"),
        (b"From: a@b.example\x00@site1.test\n\nbody\n", 1, "NUL"),
        (b"A: 1\nno blank line, so still the header block\rX: y\n", 2, "carriage return"),
    ])
    def test_a_cr_or_nul_in_the_header_block_is_refused(self, raw: bytes, line: int,
                                                        what: str) -> None:
        with pytest.raises(LineEndError) as caught:
            normalize(raw)
        assert caught.value.line == line and what in str(caught.value)
        assert (caught.value.code, caught.value.enhanced) == (554, "5.6.0")

    def test_worst_case_is_linear(self) -> None:
        # 10 MB of CRs in the body, or of short CR CR CR CR LF lines: well under a second
        # on an idle machine; the bound is generous for a loaded one.
        for body in (b"\r" * 10_000_000, b"x\r\r\r\r\n" * 1_700_000):
            started = time.monotonic()
            out = normalize(b"A: 1\n\n" + body)
            assert b"\r" not in out
            assert time.monotonic() - started < 5


MESSAGE_BYTES = st.lists(st.sampled_from([b"A: 1", b"From: a@b", b" c", b"x", b".", b"",
                                          b"\r", b"\n", b"\r\n", b"\x00", b":"]),
                         max_size=30).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(MESSAGE_BYTES)
def test_the_relay_receives_the_lines_every_step_read(raw: bytes) -> None:
    """For any bytes: refused, or no CR left, idempotent, and smtp_data adds no line."""
    try:
        out = normalize(raw)
    except LineEndError:
        return
    assert b"\r" not in out
    assert normalize(out) == out
    wire = smtp_data(out)
    lines = out.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    assert wire.split(b"\r\n")[:-1] == lines
    headers, _rest = split_header_block(out)  # what compose and the sender policy read
    header_lines = b"".join(headers).split(b"\n")[:-1]
    assert wire.split(b"\r\n")[:len(header_lines)] == header_lines


class TestRelayClient:
    def test_a_cr_left_in_a_queue_file_never_becomes_a_line_end(self) -> None:
        # Files queued before the rule: compose and the sender policy read the CR as data
        # inside its line, so the relay gets one line (aiosmtplib made it two).
        queued = b"Subject: invoice\rFrom: CEO <ceo@site2.example>\nX: y\r\n\nb\rc\n"
        assert smtp_data(queued) == (b"Subject: invoice From: CEO <ceo@site2.example>\r\n"
                                     b"X: y \r\n\r\nb c\r\n")

    def test_long_lines_after_normalizing_are_counted_as_sent(self) -> None:
        body = b"x" * (LINE_LENGTH_LIMIT - 1) + b"\r\r\n"  # 999 octets before the rule
        assert smtp_data(normalize(b"A: 1\n\n" + body)) == \
            b"A: 1\r\n\r\n" + b"x" * (LINE_LENGTH_LIMIT - 1) + b"\r\n"


def _refuse_froms(make_config: MakeConfig) -> Config:
    config = make_config(sites={SITE1: {"sender_policy": {"envelope": "refuse",
                                                          "from_header": "refuse"}}})
    prepare(config.layout)
    return config


def _submit(config: Config, state: State, message: bytes, origin: str) -> tuple[int, str, int]:
    fields = protocol.submission_fields([], extract=True)
    verdict = accept_submission(config, state, fields, message,
                                Caller(os.getuid(), os.getgid(), 1), origin)
    return verdict.code, verdict.enhanced, verdict.status


class TestIntake:
    """The daemon enforces the rule whatever the front end did (socket, drop file, capture)."""

    @pytest.mark.parametrize("origin", ["socket", "maildrop", "capture"])
    @pytest.mark.parametrize("message", [SMUGGLED, SUBJECT_ONLY,
                                         SMUGGLED.replace(b"\n", b"\r\n")])
    def test_the_smuggled_from_is_refused_on_every_road(
            self, make_config: MakeConfig, message: bytes, origin: str,
            caplog: pytest.LogCaptureFixture) -> None:
        config = _refuse_froms(make_config)
        state = State(config.layout)
        try:
            assert _submit(config, state, message, origin) == (554, "5.6.0",
                                                               sysexits.EX_DATAERR)
        finally:
            state.close()
        assert spool.queue_ids(config.layout, spool.INCOMING) == []
        assert f"origin={origin} status=554 enhanced=5.6.0" in caplog.text

    def test_a_cr_in_the_body_is_queued_as_the_line_end_it_is(
            self, make_config: MakeConfig) -> None:
        config = _refuse_froms(make_config)
        state = State(config.layout)
        try:
            message = b"To: x@ext.example\r\nSubject: hi\r\r\n\r\nline 1\rline 2\r\r\n"
            assert _submit(config, state, message, "socket")[0] == 250
        finally:
            state.close()
        [queue_id] = spool.queue_ids(config.layout, spool.INCOMING)
        _envelope, queued = spool.read_entry(config.layout, spool.INCOMING, queue_id)
        assert b"\r" not in queued
        assert b"\nSubject: hi\n" in queued and queued.endswith(b"\n\nline 1\nline 2\n")


class TestBs:
    def test_refused_at_the_end_of_data_before_any_hand_off(self) -> None:
        # The layout points nowhere: a hand-off would fail with 451, not answer 554.
        nowhere = SimpleNamespace(socket="/nonexistent/submit.sock",
                                  maildrop="/nonexistent/maildrop")
        handler = HandOffHandler(nowhere, None, None)  # type: ignore[arg-type]
        envelope = SimpleNamespace(original_content=SMUGGLED.replace(b"\n", b"\r\n"),
                                   rcpt_tos=["x@ext.example"], mail_from="a@site1.test")
        reply = asyncio.run(handler.handle_DATA(None, None, envelope))
        assert reply.startswith("554 5.6.0 message refused: line 2 of the header block")
        assert "\r" not in reply and "\n" not in reply
