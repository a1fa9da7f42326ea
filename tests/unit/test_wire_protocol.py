"""Unit tests of the hand-off codec (wire/protocol.py): no root, no sockets, no files."""

from __future__ import annotations

import random

import pytest

from sendmail_shim.wire import protocol
from sendmail_shim.wire.protocol import ProtocolError

SEED = 20240611
HOSTILE = [b"", b"%", b"%25", b"%0A", b"%%0D0A", b"\r\n", b"\0", b"\n\n", b"END\n",
           b"SMSHIM1\n", b"size 9\n", b"\xff\xfe", b"\xed\xa0\x80", "é€😀".encode()]


def random_value(rng: random.Random) -> str:
    """Arbitrary bytes (surrogate-escaped), biased towards what the codec escapes."""
    parts = [rng.choice(HOSTILE) if rng.random() < 0.5 else rng.randbytes(rng.randint(0, 12))
             for _ in range(rng.randint(0, 6))]
    return b"".join(parts).decode("utf-8", "surrogateescape")


def random_fields(rng: random.Random) -> list[tuple[str, str]]:
    keys = [protocol.SENDER, protocol.RCPT, protocol.CWD, protocol.SITE, protocol.ENVID,
            protocol.FULLNAME, protocol.ARG, "x"]
    return [(rng.choice(keys), random_value(rng)) for _ in range(rng.randint(0, 12))]


def socket_decode(data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """What the daemon's incremental socket read does, step by step, on ``data``."""
    first, _, rest = data.partition(b"\n")
    protocol.check_greeting(first + b"\n")
    end = rest.index(protocol.HEADER_END) + len(protocol.HEADER_END)
    fields = protocol.decode_header(rest[:end])
    size = protocol.body_size(fields)
    tail = rest[end:end + size + len(protocol.TRAILER)]
    return fields, protocol.check_trailer(tail, size)


def test_round_trip_hostile_values_both_decoders() -> None:
    rng = random.Random(SEED)
    for _ in range(500):
        fields = random_fields(rng)
        message = rng.choice([b"", rng.randbytes(rng.randint(0, 300)),
                              b"\n\nEND\n" + rng.randbytes(5) + b"END\n"])
        data = protocol.encode_request(fields, message)
        want = [*fields, (protocol.SIZE, str(len(message)))]
        assert protocol.decode_request(data) == (want, message)
        assert socket_decode(data) == (want, message)
        header = data[len(protocol.MAGIC):data.index(protocol.HEADER_END) + 1]
        assert b"\r" not in header and b"\0" not in header  # escaped on the wire
        assert header.count(b"\n") == len(want)  # one line per field: no value splits one


def test_escape_is_exact() -> None:
    data = protocol.encode_request([("sender", "a%b\r\n\0c")], b"")
    assert b"sender a%25b%0D%0A%00c\n" in data
    # The escape of a literal "%0A" must not decode to a newline.
    assert protocol.decode_request(protocol.encode_request([("x", "%0A")], b""))[0][0] == (
        "x", "%0A")


def test_submission_fields_round_trip_through_split() -> None:
    fields = protocol.submission_fields(
        ["a@x.test", "b@y.test, c@z.test"], sender="", extract=True, site="s1",
        fullname="F N", notify="NEVER", ret="HDRS", envid="e1", body="8BITMIME", cwd="/w",
        ignored=["-oi", "-U"])
    single, rcpts = protocol.split_fields(protocol.decode_request(
        protocol.encode_request(fields, b"m"))[0])
    assert rcpts == ["a@x.test", "b@y.test, c@z.test"]
    assert single == {"mode": "submit", "subid": single["subid"], "sender": "", "extract": "1",
                      "site": "s1", "fullname": "F N", "notify": "NEVER", "ret": "HDRS",
                      "envid": "e1", "body": "8BITMIME", "cwd": "/w", "ignored": "-oi -U",
                      "size": "1"}
    assert protocol.submission_id(fields) == single["subid"]
    assert protocol.request_mode(fields) == protocol.SUBMIT


def test_submission_fields_leave_out_what_was_not_given() -> None:
    fields = protocol.submission_fields([])
    assert [k for k, _ in fields] == [protocol.MODE, protocol.SUBID]
    assert protocol.submission_fields([])[1] != fields[1]  # a new id each time


@pytest.mark.parametrize("value,valid", [
    ("0" * 32, True), ("ab" * 8, True), ("f" * 64, True), ("a" * 15, False),
    ("a" * 65, False), ("A" * 32, False), ("g" * 32, False), ("", False), (None, False)])
def test_submission_id(value: str | None, valid: bool) -> None:
    fields = [] if value is None else [(protocol.SUBID, value)]
    assert protocol.submission_id(fields) == (value if valid else None)


def test_request_mode_defaults_to_submit() -> None:
    assert protocol.request_mode([]) == protocol.SUBMIT
    assert protocol.request_mode([(protocol.MODE, "")]) == ""
    assert protocol.request_mode([(protocol.MODE, protocol.MAILQ)]) == protocol.MAILQ


def test_control_args_round_trip() -> None:
    rng = random.Random(SEED + 1)
    for _ in range(200):
        args = {f"k{i}": [random_value(rng) for _ in range(rng.randint(1, 3))]
                for i in range(rng.randint(0, 4))}
        action = rng.choice(["queue-list", "site-suspend", "quota-set"])
        data = protocol.encode_request(protocol.control_fields(action, args), b"")
        fields, _ = protocol.decode_request(data)
        assert protocol.request_mode(fields) == protocol.CONTROL
        assert protocol.decode_control(fields) == (action, args)


def test_control_decode_ignores_args_without_equals() -> None:
    assert protocol.decode_control([("action", "top"), ("arg", "junk"), ("arg", "a=b=c")]) == (
        "top", {"a": ["b=c"]})


# -- malformed input ---------------------------------------------------------------------
GOOD = protocol.encode_request([("rcpt", "a@b.test")], b"hello\n")


@pytest.mark.parametrize("data,why", [
    (b"", "does not start with SMSHIM1"),
    (b"SMSHIM2\nsize 0\n\nEND\n", "does not start with SMSHIM1"),
    (b"smshim1\nsize 0\n\nEND\n", "does not start with SMSHIM1"),
    (b"SMSHIM1\nsize 0\n", "header has no end"),
    (b"SMSHIM1\n" + b"rcpt " + b"a" * protocol.MAX_HEADER_BYTES + b"\n\nEND\n",
     "header has no end"),
    (b"SMSHIM1\nrcpt a\n\nEND\n", "no size field"),
    (b"SMSHIM1\nsize -1\n\nEND\n", "bad size"),
    (b"SMSHIM1\nsize 1x\n\nEND\n", "bad size"),
    (b"SMSHIM1\nsize 0\nbadline\n\nEND\n", "malformed header line"),
    (b"SMSHIM1\nsize 0\nkey-1 v\n\nEND\n", "malformed header line"),
    (b"SMSHIM1\nsize 0\n\xff v\n\nEND\n", "malformed header line"),
    (GOOD[:-1], "size and END trailer do not agree"),  # missing trailer newline
    (GOOD[:-4], "size and END trailer do not agree"),  # no trailer at all
    (GOOD + b"x", "size and END trailer do not agree"),  # oversized
    (GOOD.replace(b"size 6", b"size 5"), "size and END trailer do not agree"),
    (GOOD.replace(b"size 6", b"size 7"), "size and END trailer do not agree"),
])
def test_decode_request_refuses(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        protocol.decode_request(data)


def test_bad_escape_is_not_a_crash_and_not_invented() -> None:
    # Unknown or truncated escapes are kept literally; invalid UTF-8 survives as surrogates.
    fields = protocol.decode_header(b"sender %zz%0%2\nrcpt \xff%0A\n\n")
    assert fields == [("sender", "%zz%0%2"), ("rcpt", "\udcff\n")]
    assert protocol.encode_request(fields, b"").count(b"%0A") == 1


def test_greeting_header_and_trailer_parts() -> None:
    with pytest.raises(ProtocolError, match="bad greeting"):
        protocol.check_greeting(b"SMSHIM1")
    with pytest.raises(ProtocolError, match="bad greeting"):
        protocol.check_greeting(b"HELO\n")
    protocol.check_greeting(protocol.MAGIC)
    with pytest.raises(ProtocolError, match="header longer"):
        protocol.decode_header(b"x " + b"y" * (protocol.MAX_HEADER_BYTES + 1) + b"\n\n")
    assert protocol.check_trailer(b"abcEND\n", 3) == b"abc"
    for tail, size in ((b"abcEND\r", 3), (b"abEND\n", 3), (b"abcdEND\n", 3), (b"abc", 3)):
        with pytest.raises(ProtocolError, match="missing END trailer"):
            protocol.check_trailer(tail, size)


# -- replies -----------------------------------------------------------------------------
def test_reply_round_trip() -> None:
    rng = random.Random(SEED + 2)
    for _ in range(200):
        code, status = rng.randint(200, 599), rng.randint(0, 78)
        text = random_value(rng)
        body = random_value(rng)
        data = protocol.format_reply(code, status, text, body)
        assert data.count(b"\n") >= 1
        got_code, got_status, got_text, got_body = protocol.decode_reply(data)
        assert (got_code, got_status) == (code, status)
        assert "\n" not in got_text
        expected = text.replace("\n", " ").encode("utf-8", "replace").decode("utf-8", "replace")
        assert got_text == expected.rstrip("\r\n")
        # the body is UTF-8, with escapes for what UTF-8 cannot carry (lone surrogates)
        assert got_body == body.encode("utf-8", "backslashreplace").decode("utf-8")


def test_reply_exact_bytes() -> None:
    assert protocol.format_reply(250, 0, "2.0.0 queued as X") == b"250 0 2.0.0 queued as X\n"
    assert protocol.format_reply(550, 77, "a\nb") == b"550 77 a b\n"
    assert protocol.format_reply(250, 0, "ok", "q1\n") == b"250 0 ok\nq1\n"
    assert protocol.parse_reply(b"421 75 4.7.0 busy\r\n") == (421, 75, "4.7.0 busy")
    assert protocol.parse_reply(b"250 0") == (250, 0, "")


@pytest.mark.parametrize("line", [b"", b"\n", b"250\n", b"OK 0 fine\n", b"250 x text\n",
                                  b"-250 0 t\n", b"\xff\xfe\n"])
def test_unintelligible_reply(line: bytes) -> None:
    with pytest.raises(ProtocolError, match="unintelligible reply"):
        protocol.parse_reply(line)


def test_a_header_of_a_million_short_lines_is_refused_before_its_lines_are_decoded() -> None:
    """Issue 21, second fresh attack: a hand-off header of 262,000 'a b' lines (under
    1 MiB) was decoded line by line on the daemon's event loop (another site's hand-off
    0.9-2.7 s); the count is checked first, in C."""
    most = b"".join(b"rcpt r%d@example.net\n" % n for n in range(protocol.MAX_FIELDS)) + b"\n"
    assert len(protocol.decode_header(most)) == protocol.MAX_FIELDS
    with pytest.raises(ProtocolError, match="more than 4096 header fields"):
        protocol.decode_header(b"a b\n" * 262_000 + b"\n")
