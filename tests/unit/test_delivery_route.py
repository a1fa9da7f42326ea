"""Unit tests of delivery/route.py against a real DNS server on loopback (tests/dnsserver.py).

The server runs in this process (threads, 127.0.0.1, a free high port); no root, no
subprocess.  Timeouts are provoked with names the server never answers and a
resolver timeout of a fraction of a second; the cache's clock is the module's
``time.monotonic``, replaced by a fake one where a test needs time to pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from dnsserver import DnsServer, Zone, free_udp_tcp_port

from sendmail_shim.config import Config
from sendmail_shim.delivery import route as route_module
from sendmail_shim.delivery.route import (
    DEFER,
    FAIL,
    LOCAL,
    REMOTE,
    Route,
    Router,
    normalize_domain,
)

TIMEOUT = 0.2  # seconds the resolver waits for a dead server
# Addresses the tests call "elsewhere".  They are documentation addresses, but a test
# machine may own one (one of ours has 192.0.2.2 on eth0): the router forgets them.
FOREIGN = {"192.0.2.1", "192.0.2.2", "192.0.2.10", "192.0.2.20", "2001:db8::10"}
RECORDS = {
    # MX order: the most preferred exchange decides, although a less preferred one is us.
    ("ordered.test", "MX"): ["20 here.ordered.test.", "10 far.ordered.test."],
    ("here.ordered.test", "A"): ["127.0.0.1"],
    ("far.ordered.test", "A"): ["192.0.2.1"],
    # Equal preference: any of the best exchanges being this machine makes it local.
    ("tie.test", "MX"): ["10 far.tie.test.", "10 here.tie.test."],
    ("far.tie.test", "A"): ["192.0.2.2"],
    ("here.tie.test", "AAAA"): ["::1"],
    # local_mx and the host name, matched without case or trailing dot.
    ("named.test", "MX"): ["10 MAIL.Shim.Test."],
    ("self.test", "MX"): ["10 shim.test."],
    ("xn--bcher-kva.test", "MX"): ["10 mail.shim.test."],  # bücher.test
    # No MX: the domain's own addresses (implicit MX).
    ("implicit.test", "A"): ["192.0.2.10"],
    ("implicit6.test", "AAAA"): ["2001:db8::10"],
    ("implicit-here.test", "A"): ["127.0.0.1"],
    ("extra-address.test", "A"): ["198.51.100.7"],  # in local_addresses
    # Permanent failures.
    ("nullmx.test", "MX"): ["0 ."],
    ("noaddr.test", "TXT"): ['"nothing for mail"'],
    ("dangling.test", "MX"): ["10 gone.dangling.test."],  # the exchange does not exist
    # One family of an exchange or implicit MX fails (see failures below).
    ("partial.test", "MX"): ["10 mx.partial.test."],
    ("mx.partial.test", "A"): ["127.0.0.1"],
    ("half.test", "A"): ["192.0.2.20"],
    ("deadmx.test", "MX"): ["10 mx.deadmx.test."],
    ("mx.deadmx.test", "TXT"): ['"exists"'],
    ("pinned.test", "MX"): ["10 mail.shim.test."],
}
FAILURES = {
    ("mx.partial.test", "AAAA"): "timeout",
    ("half.test", "AAAA"): "refused",
    ("mx.deadmx.test", "A"): "servfail",
    ("mx.deadmx.test", "AAAA"): "timeout",
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    zone = Zone(RECORDS, ttl=300)
    zone.failures = dict(FAILURES)
    server = DnsServer(zone, free_udp_tcp_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def router(make_config: Callable[..., Config], dns_server: DnsServer) -> Router:
    dns_server.zone.queries.clear()
    router = Router(make_config(
        hostname="shim.test", local_mx=["mail.shim.test"], local_addresses=["198.51.100.7"],
        local_transport="lmtp://127.0.0.1:24", routing={"pinned.test": "remote"},
        resolver={"nameservers": ["127.0.0.1"], "port": dns_server.port,
                  "timeout": TIMEOUT}))
    router.local_addrs -= FOREIGN
    return router


def decide(router: Router, domain: str) -> Route:
    return asyncio.run(router.route(domain))


def asked(server: DnsServer, name: str, rdtype: str) -> int:
    return server.zone.queries[f"{name}. {rdtype}"]


class TestMx:
    def test_the_most_preferred_exchange_decides(self, router: Router) -> None:
        decision = decide(router, "ordered.test")
        assert decision.kind == REMOTE
        assert decision.exchanges == ((10, "far.ordered.test"), (20, "here.ordered.test"))
        assert "MX far.ordered.test: not this machine" in decision.reason
        assert decision.ttl == 300

    def test_among_equal_preferences_one_of_ours_makes_it_local(self, router: Router) -> None:
        decision = decide(router, "tie.test")
        assert decision.kind == LOCAL and "here.tie.test has this machine's address" in \
            decision.reason

    @pytest.mark.parametrize("domain", ["named.test", "NAMED.TEST.", "self.test", "bücher.test"])
    def test_local_mx_and_our_host_name_match_without_dns_for_the_exchange(
            self, router: Router, dns_server: DnsServer, domain: str) -> None:
        decision = decide(router, domain)
        assert decision.kind == LOCAL and "is one of local_mx" in decision.reason
        assert not any(q.endswith((" A", " AAAA")) for q in dns_server.zone.queries)

    def test_an_exchange_that_does_not_exist_is_not_us(self, router: Router) -> None:
        assert decide(router, "dangling.test").kind == REMOTE


class TestImplicitMx:
    @pytest.mark.parametrize(("domain", "kind", "records"), [
        ("implicit.test", REMOTE, ("192.0.2.10",)),
        ("implicit6.test", REMOTE, ("2001:db8::10",)),
        ("implicit-here.test", LOCAL, ("127.0.0.1",)),
        ("extra-address.test", LOCAL, ("198.51.100.7",)),  # local_addresses
    ])
    def test_no_mx_falls_back_to_the_domains_addresses(
            self, router: Router, domain: str, kind: str, records: tuple[str, ...]) -> None:
        decision = decide(router, domain)
        assert (decision.kind, decision.records) == (kind, records)
        assert decision.exchanges == ((0, domain),) and "no MX; implicit MX" in decision.reason


class TestFailures:
    def test_null_mx_fails_for_good(self, router: Router) -> None:
        decision = decide(router, "nullmx.test")
        assert decision.kind == FAIL and "accepts no mail (null MX, RFC 7505)" in decision.reason

    def test_nxdomain_fails_with_the_soa_negative_ttl(self, router: Router) -> None:
        decision = decide(router, "nosuch.test")
        assert decision.kind == FAIL and "does not exist (NXDOMAIN)" in decision.reason
        assert decision.ttl == 30  # min(SOA ttl, SOA minimum) of tests/dnsserver.py

    def test_neither_mx_nor_address_fails(self, router: Router) -> None:
        decision = decide(router, "noaddr.test")
        assert decision.kind == FAIL and "neither MX nor address" in decision.reason

    @pytest.mark.parametrize("domain", ["x.servfail.test", "x.blackhole.test"])
    def test_servfail_and_timeouts_defer(self, router: Router, domain: str) -> None:
        decision = decide(router, domain)
        assert decision.kind == DEFER and "will retry" in decision.reason
        assert f"MX lookup for {domain} failed" in decision.reason

    def test_an_exchange_whose_every_family_fails_defers(self, router: Router) -> None:
        decision = decide(router, "deadmx.test")
        assert decision.kind == DEFER
        assert "address lookup for MX mx.deadmx.test failed" in decision.reason


class TestPartialAnswers:
    def test_an_exchange_whose_aaaa_times_out_is_decided_by_its_a(
            self, router: Router, dns_server: DnsServer) -> None:
        decision = decide(router, "partial.test")
        assert decision.kind == LOCAL and decision.ttl == 0  # partial: not cached
        decide(router, "partial.test")
        assert asked(dns_server, "partial.test", "MX") == 2

    def test_an_implicit_mx_whose_aaaa_is_refused_uses_its_a(self, router: Router) -> None:
        decision = decide(router, "half.test")
        assert decision.kind == REMOTE and decision.records == ("192.0.2.20",)
        assert "used what answered" in decision.reason and decision.ttl == 0


class TestPinsAndLiterals:
    def test_a_pin_decides_without_dns(self, router: Router, dns_server: DnsServer) -> None:
        decision = decide(router, "Pinned.Test.")
        assert (decision.kind, decision.pinned) == (REMOTE, True)
        assert not dns_server.zone.queries

    def test_an_address_literal_goes_to_the_relay(self, router: Router,
                                                  dns_server: DnsServer) -> None:
        assert decide(router, "[192.0.2.1]").kind == REMOTE
        assert not dns_server.zone.queries

    def test_names_are_normalized(self) -> None:
        assert normalize_domain(" Bücher.Test. ") == "xn--bcher-kva.test"
        assert normalize_domain("[IPv6:::1]") == "[ipv6:::1]"


class TestCache:
    @pytest.fixture
    def clock(self, monkeypatch: pytest.MonkeyPatch) -> list[float]:
        now = [1000.0]
        fake = SimpleNamespace(monotonic=lambda: now[0])
        monkeypatch.setattr(route_module, "time", fake)
        return now

    def test_answers_are_kept_for_their_ttl(self, router: Router, dns_server: DnsServer,
                                            clock: list[float]) -> None:
        for domain in ("named.test", "nosuch.test"):
            decide(router, domain)
        clock[0] += 29
        for domain in ("named.test", "nosuch.test"):
            decide(router, domain)
        assert asked(dns_server, "named.test", "MX") == 1
        assert asked(dns_server, "nosuch.test", "MX") == 1
        clock[0] += 2  # past the negative TTL (30 s), within the positive one (300 s)
        for domain in ("named.test", "nosuch.test"):
            decide(router, domain)
        assert asked(dns_server, "named.test", "MX") == 1
        assert asked(dns_server, "nosuch.test", "MX") == 2
        clock[0] += 300
        decide(router, "named.test")
        assert asked(dns_server, "named.test", "MX") == 2

    def test_deferrals_are_never_cached(self, router: Router, dns_server: DnsServer,
                                        clock: list[float]) -> None:
        for _ in range(2):
            assert decide(router, "x.servfail.test").kind == DEFER
        assert asked(dns_server, "x.servfail.test", "MX") == 2

    def test_a_recovered_server_is_asked_again(
            self, router: Router, dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(dns_server.zone.failures, ("named.test", "MX"), "servfail")
        assert decide(router, "named.test").kind == DEFER
        monkeypatch.delitem(dns_server.zone.failures, ("named.test", "MX"))
        assert decide(router, "named.test").kind == LOCAL


def test_machine_addresses_include_loopback() -> None:
    found: Any = route_module.machine_addresses()
    assert "127.0.0.1" in found
