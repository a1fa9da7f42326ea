"""Routing by the real MX, against a real DNS server on loopback (tests/dnsserver.py).

The field case: a site hosted here whose mailboxes live elsewhere must go to the
relay, never to a local mailbox that does not exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP
from conftest import free_port, wait_until
from dnsserver import DnsServer, Zone, free_udp_tcp_port

from sendmail_shim.config import parse_config
from sendmail_shim.delivery.route import DEFER, FAIL, LOCAL, REMOTE, Router

RECORDS = {
    ("site1.test", "MX"): ["10 mx1.outlook.example."],          # the field case
    ("mx1.outlook.example", "A"): ["192.0.2.25"],
    ("here.test", "MX"): ["10 mail.shim.test."],                 # MX named in local_mx
    ("byaddr.test", "MX"): ["10 mx.byaddr.test."],               # MX resolves to us
    ("mx.byaddr.test", "A"): ["127.0.0.1"],
    ("cname-mx.test", "MX"): ["10 alias.cname-mx.test."],        # MX target is a CNAME
    ("alias.cname-mx.test", "CNAME"): ["real.cname-mx.test."],
    ("real.cname-mx.test", "A"): ["127.0.0.1"],
    ("implicit.test", "A"): ["192.0.2.10"],                      # no MX: implicit MX
    ("implicit-here.test", "A"): ["127.0.0.1"],
    ("nullmx.test", "MX"): ["0 ."],                              # RFC 7505
    ("noaddr.test", "TXT"): ["\"nothing for mail\""],
    ("prefs.test", "MX"): ["20 mail.shim.test.", "10 mx.elsewhere.example."],
    ("mx.elsewhere.example", "A"): ["192.0.2.30"],
    ("xn--bcher-kva.test", "MX"): ["10 mail.shim.test."],        # bücher.test
    ("pinned.test", "MX"): ["10 mail.shim.test."],
    ("flaky.test", "MX"): ["10 mail.shim.test."],
    ("site1.test", "TXT"): ["\"v=spf1 ip4:127.0.0.0/8 -all\""],
    ("_dmarc.site1.test", "TXT"): ["\"v=DMARC1; p=quarantine\""],
    ("s1._domainkey.site1.test", "TXT"): ["\"v=DKIM1; k=rsa; p=MIIBIjANBg\""],
    ("site2.test", "TXT"): ["\"v=spf1 ip4:192.0.2.0/24 -all\""],
    ("site2.test", "MX"): ["10 mail.shim.test."],
}


class FlakyZone(Zone):
    """SERVFAIL for the names in ``broken`` until they are removed."""

    def __init__(self) -> None:
        super().__init__(RECORDS, ttl=300)
        self.broken = {"flaky.test."}

    def answer(self, wire: bytes) -> bytes | None:
        import dns.message
        import dns.rcode

        query = dns.message.from_wire(wire)
        if query.question[0].name.to_text().lower() in self.broken:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        return super().answer(wire)


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer(FlakyZone(), free_udp_tcp_port())
    server.start()
    yield server
    server.stop()


def router(server: DnsServer, **extra: Any) -> Router:
    raw = {"hostname": "shim.test", "local_mx": ["mail.shim.test"],
           "local_transport": "lmtp://127.0.0.1:24",
           "resolver": {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 1},
           "routing": {"pinned.test": "remote"}, **extra}
    return Router(parse_config(raw, None))


def decide(r: Router, domain: str) -> Any:
    return asyncio.run(r.route(domain))


class TestDecision:
    @pytest.mark.parametrize(("domain", "kind", "why"), [
        ("site1.test", REMOTE, "mx1.outlook.example"),
        ("here.test", LOCAL, "one of local_mx"),
        ("byaddr.test", LOCAL, "this machine's address"),
        ("cname-mx.test", LOCAL, "this machine's address"),
        ("implicit.test", REMOTE, "implicit MX"),
        ("implicit-here.test", LOCAL, "this machine"),
        ("nullmx.test", FAIL, "null MX, RFC 7505"),
        ("nosuch.test", FAIL, "NXDOMAIN"),
        ("noaddr.test", FAIL, "neither MX nor address"),
        ("prefs.test", REMOTE, "mx.elsewhere.example"),
        ("bücher.test", LOCAL, "local_mx"),
        ("HERE.TEST.", LOCAL, "local_mx"),
        ("pinned.test", REMOTE, "pinned"),
        ("x.servfail.test", DEFER, "will retry"),
        ("x.blackhole.test", DEFER, "will retry"),
    ])
    def test_route(self, dns_server: DnsServer, domain: str, kind: str, why: str) -> None:
        decision = decide(router(dns_server), domain)
        assert (decision.kind, why in decision.reason) == (kind, True), decision

    def test_positive_and_negative_answers_are_cached(self, dns_server: DnsServer) -> None:
        r = router(dns_server)

        async def twice() -> None:
            for _ in range(2):
                await r.route("here.test")
                await r.route("nosuch.test")

        asyncio.run(twice())
        assert dns_server.zone.queries["here.test. MX"] == 1
        assert dns_server.zone.queries["nosuch.test. MX"] == 1

    def test_deferral_is_not_cached(self, dns_server: DnsServer) -> None:
        r = router(dns_server)
        assert decide(r, "flaky.test").kind == DEFER
        dns_server.zone.broken.clear()  # type: ignore[attr-defined]
        assert decide(r, "flaky.test").kind == LOCAL


class LmtpInbox:
    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes, Any]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content, session.auth_data))
        return "250 2.0.0 delivered"


class LocalMta:
    def __init__(self, protocol: str, port: int) -> None:
        self.inbox = LmtpInbox()
        server_class = LMTP if protocol == "lmtp" else SMTP

        class _Controller(Controller):
            def factory(self) -> SMTP:
                return server_class(self.handler, decode_data=False)

        self.controller = _Controller(self.inbox, hostname="127.0.0.1", port=port)


@pytest.fixture(params=["lmtp", "smtp"])
def routed(request: Any, shim_factory: Any, dns_server: DnsServer) -> Iterator[Any]:
    make_relay, make_shim = shim_factory
    port, local_port = free_port(), free_port()
    mta = LocalMta(request.param, local_port)
    mta.controller.start()
    shim = make_shim([port], extra=(
        f"local_mx: [mail.shim.test]\nlocal_transport: {request.param}://127.0.0.1:"
        f"{local_port}\nresolver: {{nameservers: [127.0.0.1], port: {dns_server.port}, "
        "timeout: 1}\nrouting: {pinned.test: remote}\n"))
    relay = make_relay(shim.logins, port)
    relay.start()
    shim.start()
    yield shim, relay, mta, dns_server
    mta.controller.stop()


def test_hosted_here_mailbox_elsewhere_goes_to_relay(routed: Any) -> None:
    shim, relay, mta, _dns = routed
    done = shim.sendmail(["-i", "-f", "noreply@site1.test", "contact@site1.test",
                          "info@here.test", "x@pinned.test"],
                         b"Subject: order\n\nbody\n")
    assert done.returncode == 0
    msgs = relay.wait(1)
    wait_until(lambda: mta.inbox.received, 15, "local delivery")
    [(meta, _)] = msgs
    assert meta["login"] == "site1.test"
    assert sorted(meta["rcpt_tos"]) == ["contact@site1.test", "x@pinned.test"]
    [(sender, rcpts, data, auth)] = mta.inbox.received
    assert (sender, rcpts, auth) == ("noreply@site1.test", ["info@here.test"], None)
    assert b"Subject: order" in data


def test_per_recipient_results_from_local_mta(routed: Any) -> None:
    shim, relay, mta, _dns = routed
    shim.sendmail(["-i", "ok@here.test", "nobody@here.test"], b"Subject: two\n\nx\n")
    wait_until(lambda: mta.inbox.received, 15, "local delivery")
    bounce = relay.wait(1)  # the bounce for nobody@ goes out through the relay
    assert b"nobody@here.test" in bounce[0][1] and b"550 5.1.1" in bounce[0][1]
    assert mta.inbox.received[0][1] == ["ok@here.test"]


def test_null_mx_and_nxdomain_bounce(routed: Any) -> None:
    shim, relay, _mta, _dns = routed
    shim.sendmail(["-i", "a@nullmx.test", "b@nosuch.test"], b"Subject: nx\n\nx\n")
    [(meta, data)] = relay.wait(1)
    assert meta["mail_from"] == "<>" and meta["rcpt_tos"] == ["noreply@site1.test"]
    assert b"accepts no mail (null MX, RFC 7505)" in data
    assert b"domain nosuch.test does not exist" in data


def test_dns_failure_defers_then_delivers(routed: Any) -> None:
    shim, _relay, mta, dns = routed
    shim.sendmail(["-i", "later@flaky.test"], b"Subject: flaky\n\nx\n")
    wait_until(lambda: shim.queue_files("deferred"), 15, "deferral")
    assert "MX lookup for flaky.test failed" in shim.admin("queue", "list").stdout.decode()
    assert mta.inbox.received == []
    dns.zone.broken.clear()
    shim.run(["-q"], user=None)
    wait_until(lambda: mta.inbox.received, 15, "delivery after DNS recovers")


def test_route_explain(routed: Any) -> None:
    shim, _relay, _mta, _dns = routed
    out = shim.admin("route", "explain", "Contact@Site1.Test").stdout.decode()
    assert "remote" in out and "10 mx1.outlook.example" in out and "ttl 300" in out
    out = shim.admin("route", "explain", "a@here.test").stdout.decode()
    assert "local" in out and "one of local_mx" in out
    out = shim.admin("route", "explain", "a@pinned.test").stdout.decode()
    assert "pinned" in out
    bad = shim.admin("route", "explain", "a@nullmx.test")
    assert bad.returncode == 0 and b"null MX" in bad.stdout


def test_dns_check(routed: Any) -> None:
    shim, _relay, _mta, _dns = routed
    shim.edit_config("    domains: [site1.test]\n",
                     "    domains: [site1.test]\n    dkim_selectors: [s1]\n")
    out = shim.admin("dns", "check", "site1.test")
    text = out.stdout.decode()
    assert "MX" in text and "mx1.outlook.example" in text
    assert "SPF    ok" in text and "127.0.0.1" in text
    assert "DKIM   ok" in text and "s1._domainkey.site1.test" in text
    assert "DMARC  ok" in text and "p=quarantine" in text
    out = shim.admin("dns", "check", "site2.test")
    text = out.stdout.decode()
    assert out.returncode == 1
    assert "SPF    FAIL" in text and "ip4:127.0.0.1" in text  # what to publish
    assert "DMARC  missing" in text and "_dmarc.site2.test" in text
    assert "DKIM   missing" in text and "dkim make site2.test" in text
    assert "ALIGN  FAIL" in text
