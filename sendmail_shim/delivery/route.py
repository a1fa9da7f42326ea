"""Routing: each recipient domain goes to the local MTA or to the relay, by its real MX.

Trusts: DNS answers from the configured resolver (the system's by default) and
the operator's pins; never "we host the website, so the mail is local".
Guarantees (RFC 5321 5.1, RFC 7505):

* a pin (``routing: {domain: local|remote}``) decides first; ``auto`` asks DNS;
* MX records: the most preferred exchanges decide; the domain is local when one
  of them is a name in ``local_mx`` or this host's name, or resolves to an
  address of this machine (its interfaces, plus ``local_addresses``);
  otherwise remote, even when the site lives here;
* no MX but an A/AAAA record: implicit MX, the domain itself;
* NXDOMAIN, a null MX (``0 .``), or neither MX nor address: permanent failure,
  with a text for the bounce;
* SERVFAIL, a timeout or any other resolver trouble: defer, never misroute;
* an MX host's (or the implicit MX's) addresses are looked up per family, A
  and AAAA independently: like Postfix, what answered is used when the other
  family fails (real nameservers answer A and refuse or time out on AAAA); a
  host defers only when no family answered.  Such partial decisions are not
  cached, so the failing family is asked again next time;
* names are compared lower-case, without a trailing dot, IDN domains as
  punycode; CNAMEs are followed by the resolver;
* decisions are cached for the smallest TTL seen; negative answers for the
  SOA's negative TTL (RFC 2308), at most ``NEGATIVE_TTL_MAX``; deferrals are
  never cached.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from sendmail_shim.config import Config

LOCAL, REMOTE, FAIL, DEFER = "local", "remote", "fail", "defer"
NEGATIVE_TTL_MAX = 900
SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class Route:
    kind: str  # LOCAL, REMOTE, FAIL (permanent) or DEFER (temporary)
    domain: str  # ASCII (punycode), lower case, no trailing dot
    reason: str
    exchanges: tuple[tuple[int, str], ...] = ()
    ttl: int = 0
    pinned: bool = False
    records: tuple[str, ...] = field(default=())


def normalize_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    if domain.startswith("[") and domain.endswith("]"):
        return domain  # an address literal
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def machine_addresses() -> set[str]:
    """This machine's interface addresses (IPv4 by ioctl, IPv6 from /proc)."""
    found: set[str] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR,
                                     struct.pack("256s", name.encode()[:15]))
                found.add(socket.inet_ntoa(packed[20:24]))
            except OSError:
                continue
    try:
        with open("/proc/net/if_inet6") as fh:
            for line in fh:
                raw = line.split()[0]
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except OSError:
        pass
    return found


def resolver_of(config: Config) -> dns.asyncresolver.Resolver:
    """The resolver of ``resolver.*`` (the system's when no nameservers are named)."""
    resolver = dns.asyncresolver.Resolver(configure=not config.resolver_nameservers)
    if config.resolver_nameservers:
        resolver.nameservers = list(config.resolver_nameservers)
    resolver.port = config.resolver_port
    resolver.timeout = config.resolver_timeout
    resolver.lifetime = config.resolver_timeout
    return resolver


class Router:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.resolver = resolver_of(config)
        self.local_names = {normalize_domain(n) for n in (*config.local_mx, config.hostname)}
        self.local_addrs = machine_addresses() | set(config.local_addresses)
        self._cache: dict[str, tuple[float, Route]] = {}

    async def route(self, domain: str) -> Route:
        name = normalize_domain(domain)
        pin = self.config.routing.get(name)
        if pin in (LOCAL, REMOTE):
            return Route(pin, name, f"pinned to {pin} in routing:", pinned=True)
        cached = self._cache.get(name)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        decision = await self._decide(name)
        if decision.kind != DEFER and decision.ttl > 0:
            self._cache[name] = (time.monotonic() + decision.ttl, decision)
        return decision

    async def _query(self, name: str, rdtype: str) -> tuple[list[str], int] | None:
        """(records as text, ttl); None when the name has no such records."""
        try:
            answer = await self.resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return None
        assert answer.rrset is not None
        return [r.to_text() for r in answer.rrset], int(answer.rrset.ttl)

    @staticmethod
    def _negative_ttl(exc: dns.exception.DNSException) -> int:
        responses = []
        if isinstance(exc, dns.resolver.NXDOMAIN):
            responses = list(exc.responses().values())  # type: ignore[no-untyped-call]
        elif isinstance(exc, dns.resolver.NoAnswer):
            response = exc.response()  # type: ignore[no-untyped-call]
            responses = [response] if response is not None else []
        for response in responses:
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    return min(int(rrset.ttl), int(rrset[0].minimum), NEGATIVE_TTL_MAX)
        return 60

    async def _lookup(self, name: str, rdtype: str) -> tuple[list[str], int] | Route | None:
        """Records, None (no such records), or the Route that a failed lookup decides."""
        try:
            return await self._query(name, rdtype)
        except dns.resolver.NXDOMAIN as exc:
            return Route(FAIL, name, f"domain {name} does not exist (NXDOMAIN)",
                         ttl=self._negative_ttl(exc))
        except dns.exception.DNSException as exc:
            return Route(DEFER, name, f"{rdtype} lookup for {name} failed "
                                      f"({exc.__class__.__name__}: {exc}); will retry")

    async def _decide(self, name: str) -> Route:
        if name.startswith("["):
            return Route(REMOTE, name, "address literal: to the relay")
        mx = await self._lookup(name, "MX")
        if isinstance(mx, Route):
            return mx
        if mx is None:
            return await self._implicit_mx(name)
        records, ttl = mx
        parsed = []
        for text in records:
            pref, _, host = text.partition(" ")
            parsed.append((int(pref), normalize_domain(host)))
        parsed.sort()
        if len(parsed) == 1 and parsed[0][1] == "":
            return Route(FAIL, name, f"domain {name} accepts no mail (null MX, RFC 7505)",
                         tuple(parsed), ttl, records=tuple(records))
        best = parsed[0][0]
        preferred = [host for pref, host in parsed if pref == best and host]
        return await self._classify(name, preferred, tuple(parsed), ttl, tuple(records),
                                    f"MX {', '.join(preferred)}")

    async def _addresses(self, host: str) -> tuple[list[str], int, list[Route]]:
        """A and AAAA of ``host``, asked independently: addresses, ttl, failed lookups.

        A family with no records (or NXDOMAIN) answered; a failed one is in the list.
        """
        addresses: list[str] = []
        ttls: list[int] = []
        failed: list[Route] = []
        for rdtype in ("A", "AAAA"):
            found = await self._lookup(host, rdtype)
            if isinstance(found, Route):
                failed.append(found)
            elif found:
                addresses += found[0]
                ttls.append(found[1])
        return addresses, min(ttls, default=0), failed

    async def _implicit_mx(self, name: str) -> Route:
        addresses, ttl, failed = await self._addresses(name)
        if not addresses:
            for route in failed:  # NXDOMAIN is final; otherwise the first trouble defers
                if route.kind == FAIL:
                    return route
            if failed:
                return failed[0]
            return Route(FAIL, name, f"domain {name} has neither MX nor address records",
                         ttl=60)
        partial = [r.reason for r in failed if r.kind == DEFER]
        local = any(a in self.local_addrs for a in addresses) or name in self.local_names
        kind = LOCAL if local else REMOTE
        note = f" (used what answered; {'; '.join(partial)})" if partial else ""
        return Route(kind, name, f"no MX; implicit MX {name} ({', '.join(addresses)}) is "
                                 f"{'this machine' if local else 'elsewhere'}{note}",
                     ((0, name),), 0 if partial else ttl, records=tuple(addresses))

    async def _classify(self, name: str, preferred: list[str],
                        exchanges: tuple[tuple[int, str], ...], ttl: int,
                        records: tuple[str, ...], what: str) -> Route:
        for host in preferred:
            if host in self.local_names:
                return Route(LOCAL, name, f"{what}: {host} is one of local_mx", exchanges, ttl,
                             records=records)
        partial: list[str] = []
        for host in preferred:
            addresses, host_ttl, failed = await self._addresses(host)
            trouble = [r for r in failed if r.kind == DEFER]
            if trouble and not addresses and not any(r.kind == FAIL for r in failed):
                # No address came back and a family failed: it may be us; never misroute.
                return Route(DEFER, name, f"address lookup for MX {host} failed "
                                          f"({trouble[0].reason}); will retry")
            partial += [r.reason for r in trouble]
            if any(a in self.local_addrs for a in addresses):
                return Route(LOCAL, name, f"{what}: {host} has this machine's address",
                             exchanges, 0 if partial else min(ttl, host_ttl),
                             records=records)
        note = f" (used what answered; {'; '.join(partial)})" if partial else ""
        return Route(REMOTE, name, f"{what}: not this machine, so through the relay{note}",
                     exchanges, 0 if partial else ttl, records=records)
