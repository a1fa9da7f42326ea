"""``dns check SITE``: is the site's DNS ready for mail sent through our relay?

Trusts: the configured resolver's answers.
Guarantees: for each of the site's domains it reports MX (and where we route
it), SPF (does the record authorise every address of every configured relay?),
DKIM (is a key published for each configured selector?) and DMARC (record and
policy), each as ``ok``, ``FAIL``, ``missing`` or ``not checked``, with the
record to publish when something is wrong.  SPF is evaluated for ip4, ip6, a,
mx, include, redirect and all (RFC 7208), at most 10 DNS-querying terms;
exists and ptr are reported as not evaluated.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.exception
import dns.resolver

from sendmail_shim.config import Config, Site
from sendmail_shim.delivery.route import Router

MAX_LOOKUPS = 10


@dataclass
class Finding:
    check: str  # MX, SPF, DKIM, DMARC
    status: str  # ok, FAIL, missing, not checked
    text: str

    @property
    def problem(self) -> bool:
        return self.status in ("FAIL", "missing")


def _spf_terms(addresses: list[str]) -> str:
    return " ".join(f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in addresses)


class DnsChecker:
    def __init__(self, config: Config, router: Router) -> None:
        self.config = config
        self.router = router
        self.resolver = router.resolver

    async def _txt(self, name: str) -> list[str]:
        try:
            answer = await self.resolver.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    async def _addresses(self, name: str) -> list[str]:
        try:
            return [str(ipaddress.ip_address(name))]
        except ValueError:
            pass
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                found += [r.to_text() for r in await self.resolver.resolve(name, rdtype,
                                                                           search=False)]
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
        return found

    async def relay_addresses(self) -> list[str]:
        addresses: list[str] = []
        for relay in self.config.relays:
            addresses += await self._addresses(relay.host)
        return sorted(set(addresses))

    # -- SPF (RFC 7208, the common mechanisms) ------------------------------------
    async def spf(self, domain: str, ip: str, budget: list[int]) -> str:
        records = [t for t in await self._txt(domain) if t.lower().startswith("v=spf1")]
        if not records:
            return "none"
        if len(records) > 1:
            return "permerror"
        address = ipaddress.ip_address(ip)
        redirect = None
        for term in records[0].split()[1:]:
            qualifier = term[0] if term[0] in "+-~?" else "+"
            mechanism = term.lstrip("+-~?")
            name, _, value = mechanism.partition(":")
            name = name.lower()
            if "=" in name:
                key, _, target = mechanism.partition("=")
                if key.lower() == "redirect":
                    redirect = target
                continue
            matched = False
            if name in ("ip4", "ip6"):
                try:
                    matched = address in ipaddress.ip_network(value, strict=False)
                except ValueError:
                    return "permerror"
            elif name.split("/")[0] in ("a", "mx"):
                budget[0] += 1
                if budget[0] > MAX_LOOKUPS:
                    return "permerror"
                target = value.split("/")[0] or domain
                hosts = [target]
                if name.startswith("mx"):
                    route = await self.router.route(target)
                    hosts = [h for _p, h in route.exchanges]
                for host in hosts:
                    if ip in await self._addresses(host):
                        matched = True
            elif name == "include":
                budget[0] += 1
                if budget[0] > MAX_LOOKUPS:
                    return "permerror"
                matched = await self.spf(value, ip, budget) == "pass"
            elif name == "all":
                matched = True
            if matched:
                return {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}[qualifier]
        if redirect:
            budget[0] += 1
            return await self.spf(redirect, ip, budget)
        return "neutral"

    async def check_domain(self, site: Site, domain: str) -> list[Finding]:
        findings = []
        route = await self.router.route(domain)
        mx = ", ".join(f"{p} {h or '.'}" for p, h in route.exchanges) or "none"
        findings.append(Finding("MX", "FAIL" if route.kind == "fail" else "ok",
                                f"{mx}: {route.kind} ({route.reason})"))
        relays = await self.relay_addresses()
        results = {ip: await self.spf(domain, ip, [0]) for ip in relays}
        literal = _spf_terms(relays)
        if not relays:
            findings.append(Finding("SPF", "not checked", "no relay addresses configured"))
        elif all(r == "none" for r in results.values()):
            findings.append(Finding("SPF", "missing", f"no SPF record; publish {domain} TXT "
                                    f"\"v=spf1 {literal} -all\" (plus your other senders)"))
        elif all(r == "pass" for r in results.values()):
            findings.append(Finding("SPF", "ok", "authorises the relay's addresses " +
                                    ", ".join(relays)))
        else:
            bad = [ip for ip, r in results.items() if r != "pass"]
            listed = ", ".join(f"{ip} ({results[ip]})" for ip in bad)
            findings.append(Finding("SPF", "FAIL", f"does not authorise {listed}; add "
                                    f"{_spf_terms(bad)} to the record of {domain}"))
        if not site.dkim_selectors:
            findings.append(Finding("DKIM", "not checked",
                                    f"set dkim_selectors for site {site.name} to the "
                                    "selector(s) your relay signs with"))
        for selector in site.dkim_selectors:
            name = f"{selector}._domainkey.{domain}"
            keys = [t for t in await self._txt(name) if "p=" in t and "p=;" not in t]
            if keys:
                findings.append(Finding("DKIM", "ok", f"{name} has a key"))
            else:
                findings.append(Finding("DKIM", "missing", f"publish the relay's public key: "
                                        f"{name} TXT \"v=DKIM1; k=rsa; p=<key>\""))
        dmarc = [t for t in await self._txt(f"_dmarc.{domain}") if t.startswith("v=DMARC1")]
        if dmarc:
            tags = dict(p.strip().partition("=")[::2] for p in dmarc[0].split(";") if "=" in p)
            findings.append(Finding("DMARC", "ok", f"_dmarc.{domain}: p={tags.get('p', '?')}"))
        else:
            findings.append(Finding("DMARC", "missing", f"publish _dmarc.{domain} TXT "
                                    f"\"v=DMARC1; p=none; rua=mailto:postmaster@{domain}\""))
        return findings

    async def check_site(self, site: Site) -> list[tuple[str, list[Finding]]]:
        out = []
        for domain in site.domains:
            try:
                out.append((domain, await self.check_domain(site, domain)))
            except dns.exception.DNSException as exc:
                out.append((domain, [Finding("DNS", "FAIL", f"lookup failed: {exc}")]))
        return out
