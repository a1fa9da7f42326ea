"""DKIM keys and DNS: selector names, the records to publish, the lookup, DNS UPDATE.

Shared by the daemon's DNS watch (``daemon/dkimwatch.py``) and the operator's
``dkim`` commands (``admin/dkimkeys.py``), so both name, publish and judge a
key the same way.

Decisions (docs/dkim.md, "Keys, DNS and rotation"):

- Selectors.  Without ``dkim.delegate_zone`` each new key gets a selector of
  its day: ``shimYYYYMMDD`` (RSA) and ``shimYYYYMMDDe`` (Ed25519), ``-2``,
  ``-3``... when that day already has one; a selector is never reused.  With
  ``delegate_zone`` every domain has two fixed selectors per algorithm,
  ``shim1``/``shim2`` (RSA) and ``shim1e``/``shim2e`` (Ed25519), which the
  customer CNAMEs once: ``shim1._domainkey.<domain> CNAME
  shim1.<domain>.<delegate_zone>``.  Rotation alternates between the two: the
  new key takes the selector that is free (never used, or revoked), so a
  rotation waits until the previous one's retiring key is revoked.
- The record: ``v=DKIM1; k=<rsa|ed25519>; p=<base64>`` (empty ``p=`` once
  revoked), TXT at ``<selector>._domainkey.<domain>``, or at the CNAME's target
  under ``delegate_zone``.  Published by DNS UPDATE with TTL ``UPDATE_TTL``.
- What DNS says of a key (:func:`lookup`): the TXT at the name receivers ask
  (``<selector>._domainkey.<domain>``, CNAMEs followed by the resolver of
  ``resolver.*``) holds exactly that key (``ok``: ``p=`` equal once spaces are
  removed, ``k=`` the key's algorithm, ``v=DKIM1`` if present), another key
  (``mismatch``), no DKIM key or an empty ``p=`` (``missing``); a timeout,
  SERVFAIL or any other trouble is None: nothing is concluded.
- DNS UPDATE (RFC 2136, TSIG, dnspython, over TCP): only names under
  ``dkim.publish_zone`` (``update_zone``, else ``delegate_zone``); a name
  outside it is left to the operator.  The TSIG key file is BIND's ``key``
  block (as ``tsig-keygen`` prints it) or one line ``ALGORITHM:NAME:SECRET``.

Trusts: the key store, the configuration; DNS answers only as far as the rules
above.  Guarantees: :func:`lookup` never raises for DNS trouble; :func:`publish`
raises :class:`UpdateError` (naming the server, zone and what to do) and never
prints the TSIG secret.
"""

from __future__ import annotations

import re
import time

import dns.asyncresolver
import dns.exception
import dns.name
import dns.query
import dns.rcode
import dns.resolver
import dns.rrset
import dns.tsig
import dns.update

from sendmail_shim.config import Config
from sendmail_shim.store.dkimkeys import (
    ACTIVE,
    DNS_MISMATCH,
    DNS_MISSING,
    DNS_OK,
    ED25519,
    PENDING,
    RETIRING,
    RSA,
    KeyRecord,
    KeyStore,
    KeyStoreError,
)

PREFIX = "shim"
UPDATE_TTL = 3600  # seconds: the TTL of records published by DNS UPDATE
UPDATE_TIMEOUT = 10.0
_SUFFIX = {RSA: "", ED25519: "e"}


class UpdateError(Exception):
    """A DNS UPDATE failed; the text names the server, the zone and what to do."""


# -- selectors and names -------------------------------------------------------------------

def fixed_selectors(algorithm: str) -> tuple[str, str]:
    """The two selectors of a delegated domain for ``algorithm``."""
    return f"{PREFIX}1{_SUFFIX[algorithm]}", f"{PREFIX}2{_SUFFIX[algorithm]}"


def next_selector(config: Config, domain: str, records: list[KeyRecord], algorithm: str,
                  now: float) -> tuple[str, bool]:
    """(selector, reuse) for a new key of ``algorithm``: see the module docstring.

    ``KeyStoreError`` when a delegated domain has no free selector (both in use).
    """
    used = {r.selector: r for r in records}
    if config.dkim.delegate_zone:
        busy = []
        for selector in fixed_selectors(algorithm):
            rec = used.get(selector)
            if rec is None or rec.state not in (PENDING, ACTIVE, RETIRING):
                return selector, rec is not None
            busy.append(rec)
        retiring = [r for r in busy if r.state == RETIRING]
        until = retiring[0].changed + config.dkim.overlap if retiring else 0.0
        when = (f"; {retiring[0].selector} is revoked on "
                f"{time.strftime('%Y-%m-%d', time.gmtime(until))}"
                f" (dkim.overlap), or now with sendmail-shim-admin dkim revoke {domain} "
                f"{retiring[0].selector}" if retiring else "")
        raise KeyStoreError(f"{domain}: both delegated {algorithm} selectors are in use ("
                            + ", ".join(f"{r.selector} {r.state}" for r in busy)
                            + f"): a new key must wait{when}")
    base = f"{PREFIX}{time.strftime('%Y%m%d', time.gmtime(now))}{_SUFFIX[algorithm]}"
    selector, n = base, 1
    while selector in used:
        n += 1
        selector = f"{base}-{n}"
    return selector, False


def delegated_target(config: Config, rec: KeyRecord) -> str | None:
    """The CNAME target of a delegated selector (None without ``delegate_zone``)."""
    zone = config.dkim.delegate_zone
    if not zone or rec.selector not in (*fixed_selectors(RSA), *fixed_selectors(ED25519)):
        return None
    return f"{rec.selector}.{rec.domain}.{zone.lower().rstrip('.')}"


def txt_name(config: Config, rec: KeyRecord) -> str:
    """Where the key's TXT record lives (the CNAME target when delegated)."""
    return delegated_target(config, rec) or rec.name


def records_to_publish(config: Config, rec: KeyRecord) -> list[tuple[str, str, str]]:
    """(name, type, value) the operator publishes for ``rec`` now: the TXT record, and
    for a delegated selector the customer's one-time CNAME."""
    target = delegated_target(config, rec)
    out = [(target or rec.name, "TXT", rec.txt())]
    if target:
        out.append((rec.name, "CNAME", target + "."))
    return out


def zone_text(name: str, rdtype: str, value: str) -> str:
    """One record in zone-file form; a TXT value is split into strings of at most 255
    octets (RFC 7208 3.3 / RFC 6376 3.6.2.2 join them back)."""
    if rdtype == "TXT":
        value = " ".join(f'"{value[i:i + 255]}"' for i in range(0, max(len(value), 1), 255))
    return f"{name}. IN {rdtype} {value}"


def under(name: str, zone: str | None) -> bool:
    return bool(zone) and (name == zone or name.endswith("." + str(zone)))


# -- what DNS says -------------------------------------------------------------------------

def _tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def classify(texts: list[str], rec: KeyRecord) -> str:
    """DNS_OK, DNS_MISMATCH or DNS_MISSING for the TXT strings served at ``rec.name``."""
    keys = []
    for text in texts:
        tags = _tags(text)
        if tags.get("v", "DKIM1") != "DKIM1" or "p" not in tags:
            continue
        public = re.sub(r"\s+", "", tags["p"])
        if public:
            keys.append((tags.get("k", RSA).lower(), public))
    if not keys:
        return DNS_MISSING
    return DNS_OK if (rec.algorithm, rec.public) in keys else DNS_MISMATCH


async def lookup(resolver: dns.asyncresolver.Resolver, rec: KeyRecord) -> str | None:
    """What DNS serves for ``rec`` (see the module docstring); None: no conclusion."""
    try:
        answer = await resolver.resolve(rec.name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return DNS_MISSING
    except (dns.exception.DNSException, OSError):
        return None
    if answer.rrset is None:
        return DNS_MISSING
    texts = [b"".join(r.strings).decode("ascii", "replace") for r in answer.rrset]
    return classify(texts, rec)


# -- DNS UPDATE ----------------------------------------------------------------------------

_BIND_KEY = re.compile(r'key\s+"?([^"\s{]+)"?\s*\{(.*?)\}\s*;', re.S)


def read_tsig(path: str) -> dns.tsig.Key:
    """The TSIG key of ``path`` (BIND ``key`` block or ``ALGORITHM:NAME:SECRET``).

    ``UpdateError`` naming the file when it cannot be read or holds no key (never
    its content).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise UpdateError(f"dkim.update_key_file {path} cannot be read ({exc.strerror}): "
                          "make it readable by the daemon's user (0640 root:<daemon "
                          "group>)") from exc
    try:
        match = _BIND_KEY.search(text)
        if match:
            body = match.group(2)
            algorithm = re.search(r"algorithm\s+\"?([\w.-]+)\"?\s*;", body)
            secret = re.search(r'secret\s+"([^"]+)"\s*;', body)
            if algorithm and secret:
                return dns.tsig.Key(match.group(1), secret.group(1), algorithm.group(1))
        line = text.strip().splitlines()[0] if text.strip() else ""
        parts = line.split(":")
        if len(parts) == 3:
            return dns.tsig.Key(parts[1], parts[2], parts[0])
    except (ValueError, dns.exception.DNSException):
        pass
    raise UpdateError(f"dkim.update_key_file {path} holds no TSIG key: write BIND's key "
                      'block (tsig-keygen NAME) or one line hmac-sha256:NAME:SECRET')


def publish(config: Config, records: list[tuple[str, str, str]]) -> list[str]:
    """Replace each (name, TXT, value) under ``dkim.publish_zone`` by UPDATE, in one
    message; the names it published.  Records outside the zone (and CNAMEs) are left
    out.  ``UpdateError`` when the server refuses or does not answer."""
    zone = config.dkim.publish_zone
    wanted = [(n, t, v) for n, t, v in records if t == "TXT" and under(n, zone)]
    if zone is None or not wanted:
        return []
    assert config.dkim.update_server is not None and config.dkim.update_key_file is not None
    key = read_tsig(config.dkim.update_key_file)
    message = dns.update.UpdateMessage(zone + ".", keyring=key)
    for name, rdtype, value in wanted:
        rrset = dns.rrset.from_text(name + ".", UPDATE_TTL, "IN", rdtype,
                                    zone_text(name, rdtype, value).split(f" {rdtype} ", 1)[1])
        message.replace(rrset.name, rrset)
    where = f"{config.dkim.update_server} port {config.dkim.update_port}"
    try:
        response = dns.query.tcp(message, config.dkim.update_server,
                                 timeout=UPDATE_TIMEOUT, port=config.dkim.update_port)
    except (dns.exception.DNSException, OSError) as exc:
        raise UpdateError(f"DNS UPDATE of zone {zone} at {where} failed ({exc.__class__.__name__}"
                          f": {exc}); check dkim.update_server and that the server allows "
                          "this TSIG key to update the zone") from exc
    rcode = response.rcode()
    if rcode != dns.rcode.NOERROR:
        raise UpdateError(f"DNS UPDATE of zone {zone} at {where} answered "
                          f"{dns.rcode.to_text(rcode)}: allow the TSIG key "
                          f"{key.name.to_text(omit_final_dot=True)} to update {zone} "
                          "(BIND update-policy, Knot acl action: update)")
    return [name for name, _t, _v in wanted]


def new_key(config: Config, store: KeyStore, domain: str, algorithm: str,
            now: float | None = None, note: str = "") -> KeyRecord:
    """Make a pending key of ``algorithm`` for ``domain`` under its next selector."""
    stamp = time.time() if now is None else now
    selector, reuse = next_selector(config, domain, store.records(domain), algorithm, stamp)
    return store.generate(domain, selector, algorithm, rsa_bits=config.dkim.rsa_bits,
                          now=stamp, note=note or "waits until DNS serves its record",
                          reuse=reuse)
