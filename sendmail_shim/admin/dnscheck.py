"""``dns check SITE``: is the site's DNS ready for mail sent through our relay?

Trusts: the configured resolver's answers.
Guarantees: for each of the site's domains it reports MX (and where we route
it), SPF (does the record authorise every address of every configured relay?),
DKIM (the daemon's own signing: which selector signs d=<domain> and whether DNS
serves it now, each pending key and why it waits; and the selectors of a relay
that signs itself, ``dkim_selectors``), DMARC (record and policy) and ALIGN
(would DMARC pass for mail From the domain: through SPF -- the envelope sender's
domain, ``sender`` or ``noreply@`` the first domain, relaxed-aligned with it and
authorising every relay address -- through DKIM, or not at all), each as ``ok``,
``FAIL``, ``missing``, ``pending`` or ``not checked``, with the record to
publish when something is wrong.  Relaxed alignment is approximated without the
public suffix list (same domain, or one a subdomain of the other).  SPF is
evaluated for ip4, ip6, a, mx, include, redirect and all (RFC 7208), at most 10
DNS-querying terms; exists and ptr are reported as not evaluated.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.exception
import dns.resolver

from sendmail_shim.config import Config, Site
from sendmail_shim.daemon import dkimdns
from sendmail_shim.delivery.route import Router
from sendmail_shim.store.dkimkeys import DNS_OK, PENDING, KeyStore, KeyStoreError

MAX_LOOKUPS = 10


@dataclass
class Finding:
    check: str  # MX, SPF, DKIM, DMARC
    status: str  # ok, FAIL, missing, not checked
    text: str

    @property
    def problem(self) -> bool:
        return self.status in ("FAIL", "missing")


def _relaxed(one: str, other: str) -> bool:
    """Relaxed DMARC alignment, approximated without the public suffix list: the same
    domain, or one a subdomain of the other."""
    one, other = one.lower().rstrip("."), other.lower().rstrip(".")
    return one == other or one.endswith("." + other) or other.endswith("." + one)


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
        findings += await self.dkim(site, domain)
        for selector in site.dkim_selectors:  # selectors a relay that signs itself uses
            name = f"{selector}._domainkey.{domain}"
            keys = [t for t in await self._txt(name) if "p=" in t and "p=;" not in t]
            if keys:
                findings.append(Finding("DKIM", "ok", f"{name} has a key (the relay's)"))
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
        findings.append(await self.alignment(site, domain, relays, findings))
        return findings

    async def dkim(self, site: Site, domain: str) -> list[Finding]:
        """The daemon's own signing for ``domain``: which selector signs, whether DNS serves
        it now, and each pending key with why it waits (the DNS watch's note)."""
        store = KeyStore(self.config.dkim_keys)
        try:
            records = store.records(domain)
            signing = store.signing(domain)
        except KeyStoreError as exc:
            return [Finding("DKIM", "FAIL", f"{exc}; mail goes unsigned")]
        except PermissionError:
            return [Finding("DKIM", "not checked", "the key store is the daemon's: run as "
                                                   "root or the daemon's user")]
        if not records:
            return [Finding("DKIM", "missing", "no key: mail goes unsigned; make one with "
                                               f"sendmail-shim-admin dkim make {site.name}")]
        out = []
        for rec in signing:
            served = await dkimdns.lookup(self.resolver, rec)
            status = {DNS_OK: "ok", None: "not checked"}.get(served, "FAIL")
            said = {DNS_OK: "DNS serves it", None: "the lookup failed now"}.get(
                served, f"DNS {served} now: publish "
                        f"{dkimdns.txt_name(self.config, rec)} TXT \"{rec.txt()}\"")
            out.append(Finding("DKIM", status, f"{rec.selector} ({rec.algorithm}, "
                                               f"{rec.state}) signs d={domain}; {said}"))
        if not signing:
            out.append(Finding("DKIM", "FAIL", "no key signs now: mail goes unsigned (see "
                                               f"sendmail-shim-admin dkim show {domain})"))
        for rec in records:
            if rec.state == PENDING:
                out.append(Finding("DKIM", "pending", f"{rec.selector} ({rec.algorithm}) "
                                   f"{rec.note or 'waits until DNS serves its record'}"))
        return out

    async def alignment(self, site: Site, domain: str, relays: list[str],
                        findings: list[Finding]) -> Finding:
        """Would DMARC pass for mail From ``domain``: through SPF (the envelope sender's
        domain aligned with it, relaxed, and its SPF authorising every relay address),
        through DKIM (a key signs d=<domain> and DNS serves it), or not at all."""
        envelope = (site.sender or f"noreply@{site.domains[0]}").rpartition("@")[2].lower()
        aligned = _relaxed(envelope, domain)
        spf_ok = bool(relays) and aligned and all(
            [await self.spf(envelope, ip, [0]) == "pass" for ip in relays])
        dkim_ok = any(f.check == "DKIM" and f.status == "ok" and "signs d=" in f.text
                      for f in findings)
        ways = [w for w, ok in (("SPF", spf_ok), ("DKIM", dkim_ok)) if ok]
        if ways:
            return Finding("ALIGN", "ok", f"DMARC passes for From @{domain} through "
                                          f"{' and '.join(ways)}")
        spf_why = (f"envelope sender domain {envelope} is not aligned with {domain}"
                   if not aligned else f"SPF of {envelope} does not authorise every relay "
                                       "address")
        return Finding("ALIGN", "FAIL", f"DMARC fails for From @{domain}: {spf_why}, and no "
                                        "DKIM key DNS serves signs it; publish what the SPF "
                                        "and DKIM lines say")

    async def check_site(self, site: Site) -> list[tuple[str, list[Finding]]]:
        out = []
        for domain in site.domains:
            try:
                out.append((domain, await self.check_domain(site, domain)))
            except dns.exception.DNSException as exc:
                out.append((domain, [Finding("DNS", "FAIL", f"lookup failed: {exc}")]))
        return out
