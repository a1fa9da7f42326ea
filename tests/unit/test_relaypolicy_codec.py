"""relaypolicy.codec: Postfix policy requests and replies, and hostile input."""

from __future__ import annotations

import pytest

from sendmail_shim.relaypolicy import codec

RCPT = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "client_address": "127.0.0.1", "sasl_username": "site1.test", "instance": "a.b.c.1",
        "recipient": "x@example.net", "recipient_count": "0", "ccert_subject": ""}


def test_round_trip() -> None:
    assert codec.parse_request(codec.encode_request(RCPT)) == RCPT


def test_value_may_hold_equals_and_utf8() -> None:
    attrs = dict(RCPT, recipient="ü=x@exämple.net")
    assert codec.parse_request(codec.encode_request(attrs))["recipient"] == "ü=x@exämple.net"


def test_reply() -> None:
    assert codec.encode_reply("DUNNO") == b"action=DUNNO\n\n"
    assert codec.parse_reply(codec.encode_reply("REJECT 5.7.1 no")) == "REJECT 5.7.1 no"
    with pytest.raises(ValueError, match="one-line"):
        codec.encode_reply("DUNNO\n\naction=OK")


@pytest.mark.parametrize(("block", "problem"), [
    (b"request=smtpd_access_policy\nnoequals\n\n", "line 2: no '='"),
    (b"\nrequest=smtpd_access_policy\n\n", "line 1: no '='"),
    (b"request=smtpd_access_policy\nsasl_username=a\x00b\n\n", "control character"),
    (b"request=smtpd_access_policy\nsasl_username=a\rb\n\n", "control character"),
    (b"request=smtpd_access_policy\nsasl_username=\xff\xfe\n\n", "line 2: not UTF-8"),
    (b"request=smtpd_access_policy\nsasl username=a\n\n", "name is not"),
    (b"request=smtpd_access_policy\n=a\n\n", "name is not"),
    (b"request=smtpd_access_policy\nsasl_username=a\nsasl_username=b\n\n", "given twice"),
    (b"request=other\n\n", "request is not smtpd_access_policy"),
    (b"sasl_username=a\n\n", "request is not smtpd_access_policy"),
    (b"request=smtpd_access_policy\n", "not ended by an empty line"),
    (b"request=smtpd_access_policy\nx=" + b"a" * codec.MAX_LINE + b"\n\n", "more than 4096"),
    (b"request=smtpd_access_policy\n" + b"".join(b"a%d=1\n" % i for i in range(100)) + b"\n",
     "101 attribute lines"),
])
def test_malformed(block: bytes, problem: str) -> None:
    with pytest.raises(codec.Malformed, match=problem) as caught:
        codec.parse_request(block)
    assert b"a\x00b" not in str(caught.value).encode()  # names the problem, not the value


def test_malformed_text_holds_no_value() -> None:
    secret = "hunter2-certificate-subject"
    with pytest.raises(codec.Malformed) as caught:
        codec.parse_request(f"request=smtpd_access_policy\nccert_subject={secret}\x01\n\n"
                            .encode())
    assert secret not in str(caught.value)
