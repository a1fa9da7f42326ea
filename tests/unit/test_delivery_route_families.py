"""Routing when one address family's answer is broken (issue 10, defect 11).

A SERVFAIL, REFUSED or unanswered AAAA query must not defer a route when the A
answer is there; when neither family answers, the route defers.  A real DNS
server on 127.0.0.1 (tests/dnsserver.py) gives the broken answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from dnsserver import DnsServer, Zone, free_udp_tcp_port

from sendmail_shim.config import parse_config
from sendmail_shim.delivery.route import DEFER, LOCAL, REMOTE, Router

RECORDS = {
    ("v4only.test", "MX"): ["10 mx.v4only.test."],
    ("mx.v4only.test", "A"): ["192.0.2.25"],
    ("mx.v4only.test", "AAAA"): ["2001:db8::25"],
    ("v4here.test", "MX"): ["10 mx.v4here.test."],
    ("mx.v4here.test", "A"): ["127.0.0.1"],
    ("mx.v4here.test", "AAAA"): ["2001:db8::26"],
    ("implicit4.test", "A"): ["192.0.2.10"],
    ("implicit4.test", "AAAA"): ["2001:db8::10"],
    ("dead.test", "MX"): ["10 mx.dead.test."],
    ("mx.dead.test", "A"): ["192.0.2.30"],
}


@pytest.fixture
def broken_aaaa() -> Iterator[DnsServer]:
    server = DnsServer(Zone(RECORDS), free_udp_tcp_port())
    server.start()
    yield server
    server.stop()


def router(server: DnsServer) -> Router:
    return Router(parse_config({
        "hostname": "shim.test", "local_transport": "lmtp://127.0.0.1:24",
        "resolver": {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 0.3}}, None))


class TestBrokenAaaa:
    @pytest.mark.parametrize("mode", ["servfail", "refused", "timeout"])
    def test_a_answer_is_used(self, broken_aaaa: DnsServer, mode: str) -> None:
        zone = broken_aaaa.zone
        for name in ("mx.v4only.test", "mx.v4here.test", "implicit4.test"):
            zone.failures[(name, "AAAA")] = mode
        r = router(broken_aaaa)
        remote = asyncio.run(r.route("v4only.test"))
        assert remote.kind == REMOTE and "used what answered" in remote.reason, remote
        assert asyncio.run(r.route("v4here.test")).kind == LOCAL
        implicit = asyncio.run(r.route("implicit4.test"))
        assert implicit.kind == REMOTE and "192.0.2.10" in implicit.reason, implicit
        # Not cached: the failed family is asked again next time.
        asyncio.run(r.route("v4only.test"))
        assert zone.queries["v4only.test. MX"] == 2

    def test_no_family_answered_defers(self, broken_aaaa: DnsServer) -> None:
        broken_aaaa.zone.failures[("mx.dead.test", "A")] = "servfail"
        broken_aaaa.zone.failures[("mx.dead.test", "AAAA")] = "refused"
        route = asyncio.run(router(broken_aaaa).route("dead.test"))
        assert route.kind == DEFER and "mx.dead.test" in route.reason
