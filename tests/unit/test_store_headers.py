"""store.headers: where the header block ends, names, values and dates."""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

import pytest

from sendmail_shim.store.headers import (
    MAX_FIELD_BYTES,
    MAX_FIELDS,
    HeaderLimitError,
    header_name,
    header_value,
    mail_date,
    split_header_block,
)


class TestSplit:
    def test_fields_continuations_and_body(self) -> None:
        message = b"Subject: a\n\tcontinued\nTo: x@y.test\n\nbody\nNot: a header\n"
        fields, rest = split_header_block(message)
        assert fields == [b"Subject: a\n\tcontinued\n", b"To: x@y.test\n"]
        assert rest == b"\nbody\nNot: a header\n"

    @pytest.mark.parametrize("message, count, rest", [
        (b"", 0, b""),
        (b"no header here\nSubject: x\n", 0, b"no header here\nSubject: x\n"),
        (b" leading continuation\nSubject: x\n", 0, b" leading continuation\nSubject: x\n"),
        (b"Subject: x", 1, b""),  # no newline at the end
        (b"Subject: x\nFrom x@y  Mon\n", 1, b"From x@y  Mon\n"),  # an mbox line ends it
        (b"Bad Name: x\n", 0, b"Bad Name: x\n"),  # a space in the name: not ftext
        (b"X-A : spaced colon\n\n", 1, b"\n"),  # WSP before the colon is allowed
        (b"Subject: x\r\nTo: y\r\n\r\nbody", 2, b"\r\nbody"),
    ])
    def test_where_the_block_ends(self, message: bytes, count: int, rest: bytes) -> None:
        fields, remainder = split_header_block(message)
        assert len(fields) == count and remainder == rest
        assert b"".join(fields) + remainder == message

    def test_seeded_split_loses_no_byte(self) -> None:
        rng = random.Random(5322)
        pieces = [b"Subject: x\n", b"\tmore\n", b"\n", b"body\n", b"X: \xff\n", b":\n", b"\r\n"]
        for _ in range(300):
            message = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
            fields, rest = split_header_block(message)
            assert b"".join(fields) + rest == message
            assert all(not f.startswith((b" ", b"\t", b"\n")) for f in fields)


class TestNameValue:
    def test_name_is_lowercase_and_trimmed(self) -> None:
        assert header_name(b"Content-TYPE : text/plain\n") == "content-type"

    def test_value_unfolds_and_keeps_invalid_utf8(self) -> None:
        assert header_value(b"Subject: a\r\n\tb\n c\n") == "a b c"
        value = header_value(b"X-Raw: caf\xc3\xa9 \xff\n")
        assert value == "caf\u00e9 \udcff"
        assert value.encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff"


def test_mail_date_is_rfc5322_with_zone_name() -> None:
    when = 1_800_000_000.0
    text = mail_date(when)
    date_part, _, zone = text.rpartition(" (")
    assert parsedate_to_datetime(date_part).timestamp() == when
    assert zone.endswith(")") and len(zone) > 1


class TestCost:
    """Issue 21: ``headers[-1] += line`` made a field of many continuation lines quadratic."""

    @staticmethod
    def _cost(lines: int) -> float:
        message = b"Subject: x\n" + b" \n" * lines + b"\nbody\n"
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fields, _rest = split_header_block(message)
            best = min(best, time.perf_counter() - start)
            assert len(fields) == 1
        return best

    def test_cost_is_linear_in_the_continuation_lines(self) -> None:
        # Eight times the lines: about eight times the cost (sixty-four when quadratic:
        # 0.016 s and 1.6 s before, 0.2 ms and 1.9 ms now).
        small, large = self._cost(20_000), self._cost(160_000)
        assert large < 20 * small + 0.005, (small, large)

    def test_a_million_continuation_lines_split_at_once(self) -> None:
        assert self._cost(990_000) < 1.0  # 68 s before

    def test_limited_split_stops_at_the_first_field_over_the_limit(self) -> None:
        fields = b"To: a@b.test\n" + b"Subject: x\n" + b" \n" * 4_000_000 + b"\nbody\n"
        with pytest.raises(HeaderLimitError, match="Subject header field is longer than 102400"):
            split_header_block(fields, limited=True)
        exact = b"X: " + b"y" * (MAX_FIELD_BYTES - 4) + b"\n"
        assert split_header_block(exact + b"\nbody", limited=True) == ([exact], b"\nbody")
        with pytest.raises(HeaderLimitError):
            split_header_block(b"X: y" + exact + b"\nbody", limited=True)

    def test_block_and_field_count_limits(self) -> None:
        many = b"".join(b"X-%d: y\n" % i for i in range(MAX_FIELDS))
        assert len(split_header_block(many, limited=True)[0]) == MAX_FIELDS
        with pytest.raises(HeaderLimitError, match="more than 1000 fields"):
            split_header_block(many + b"Y: z\n", limited=True)
        big = b"".join(b"X-%d: %s\n" % (i, b"y" * 1000) for i in range(300))
        with pytest.raises(HeaderLimitError, match="longer than 262144"):
            split_header_block(big, limited=True)
        assert len(split_header_block(big)[0]) == 300  # unlimited: queued mail, bounces

    def test_limited_and_unlimited_agree_within_the_limits(self) -> None:
        rng = random.Random(21)
        pieces = [b"Subject: x\n", b"\tmore\n", b" \n", b"\n", b"body\n", b"X: \xff", b"\r\n"]
        for _ in range(500):
            message = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
            assert split_header_block(message, limited=True) == split_header_block(message)
