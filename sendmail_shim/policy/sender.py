"""Sender policy: a site sends only as itself.

Trusts: the site's configured domains and sender; nothing in the message,
except that its lines are LF-ended and hold no CR: the intake applied the
line-ending rule (wire/lineends.py), so the header lines read here are the
ones the relay receives.
Guarantees: an envelope sender outside the site's domains (its ``domains``,
their subdomains, and the domain of its ``sender``) is rewritten to the site's
default sender, refused, or kept, per ``sender_policy.envelope`` (default
rewrite) — so ``root@host``, the web user's login name or a forged third party
never reach the relay as a site's envelope sender.  The null sender ``<>`` is
kept: it impersonates nobody and only means "send no bounce".  A From:
header outside those domains is kept, rewritten to the site's address with the
original moved to Reply-To (DMARC-safe contact forms), or refused, per
``sender_policy.from_header`` (default keep).

Hosted domains are never borrowed: an address belongs to the site that owns
the MOST SPECIFIC hosted domain matching it (``shop.site1.example``, hosted as
site2, is site2's, not site1's though it is a subdomain of site1's domain), and
an address in another hosted site's domain is never kept: with ``keep`` the
envelope sender and the From: are rewritten as with ``rewrite`` (``refuse``
still refuses).  A contact form may put a visitor's outside address in From:,
but never a neighbour's: that is the one spoof the host can always see.
"""

from __future__ import annotations

from email.utils import getaddresses

from sendmail_shim.config import Config, Site
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.headers import header_name, header_value, split_header_block
from sendmail_shim.store.outcome import Verdict
from sendmail_shim.wire import sysexits


def default_sender(site: Site, config: Config) -> str:
    """The site's ``sender``, else ``noreply@`` its first domain (never root@ or a login)."""
    if site.sender:
        return site.sender
    if site.domains:
        return f"noreply@{site.domains[0]}"
    return f"noreply@{config.hostname}"


def _own_domains(site: Site) -> list[str]:
    domains = [d.lower().rstrip(".") for d in site.domains]
    if site.sender and "@" in site.sender:
        domains.append(site.sender.rsplit("@", 1)[1].lower().rstrip("."))
    return domains


_hosted: tuple[Config, dict[str, frozenset[str]]] | None = None


def hosted_domains(config: Config) -> dict[str, frozenset[str]]:
    """Every site's domain -> the sites that own it; built once per configuration."""
    global _hosted
    cached = _hosted
    if cached is not None and cached[0] is config:
        return cached[1]
    index: dict[str, frozenset[str]] = {}
    for site in config.sites.values():
        mine = frozenset((site.name,))  # shared by the site's domains (10,000 sites: 20,000)
        for domain in _own_domains(site):
            have = index.get(domain)
            index[domain] = mine if have is None or have == mine else have | mine
    _hosted = (config, index)
    return index


def hosted_owners(address: str, config: Config) -> frozenset[str]:
    """The sites owning the most specific hosted domain of ``address`` (empty: not hosted)."""
    if "@" not in address:
        return frozenset()
    index = hosted_domains(config)
    labels = address.rsplit("@", 1)[1].lower().rstrip(".").split(".")
    for start in range(len(labels)):  # the longest suffix first
        owners = index.get(".".join(labels[start:]))
        if owners is not None:
            return owners
    return frozenset()


def site_domains(site: Site, config: Config) -> tuple[str, ...]:
    domains = list(site.domains)
    if site.sender:
        domains.append(site.sender.rsplit("@", 1)[1].lower())
    return tuple(domains) or (config.hostname.lower(),)


def belongs(address: str, domains: tuple[str, ...]) -> bool:
    if "@" not in address:
        return False
    domain = address.rsplit("@", 1)[1].lower().rstrip(".")
    return any(domain == d or domain.endswith("." + d) for d in domains)


def is_sites(address: str, site: Site, config: Config,
             domains: tuple[str, ...] | None = None) -> bool:
    """In the site's domains, and not in a more specific domain another site is hosted as."""
    if not belongs(address, site_domains(site, config) if domains is None else domains):
        return False
    owners = hosted_owners(address, config)
    return not owners or site.name in owners


def _neighbours(address: str, site: Site, config: Config) -> bool:
    """In a domain another hosted site owns (most specific match)."""
    owners = hosted_owners(address, config)
    return bool(owners) and site.name not in owners


def _refusal(site: Site, what: str, address: str, domains: tuple[str, ...]) -> Verdict:
    return Verdict(550, "5.7.1", sysexits.EX_NOPERM,
                   f"site {site.name}: {what} <{address}> is not one of the site's domains "
                   f"({', '.join(domains)}); send from an address in them; nothing was queued")


def apply_sender_policy(site: Site, config: Config, envelope: Envelope,
                        message: bytes) -> tuple[bytes, list[tuple[str, str]]] | Verdict:
    """The (possibly rewritten) message and notes for the log, or a refusal.

    A note is a (field, address) pair: the accepted line writes it as ``field=<address>``.

    ``envelope.sender`` is rewritten in place when the policy says so.
    """
    domains = site_domains(site, config)
    notes: list[tuple[str, str]] = []
    if envelope.sender and not is_sites(envelope.sender, site, config, domains):
        if site.envelope_policy == "refuse":
            return _refusal(site, "envelope sender", envelope.sender or "", domains)
        if site.envelope_policy == "rewrite" or _neighbours(envelope.sender, site, config):
            notes.append(("sender_rewritten_from", envelope.sender))
            envelope.sender = default_sender(site, config)
    headers, rest = split_header_block(message)
    froms = [i for i, h in enumerate(headers) if header_name(h) == "from"]
    addresses = [a for i in froms for _n, a in getaddresses([header_value(headers[i])]) if a]
    if all(is_sites(a, site, config, domains) for a in addresses):
        return message, notes
    if site.from_policy == "keep" and not any(_neighbours(a, site, config) for a in addresses):
        return message, notes
    if site.from_policy == "refuse":
        bad = next(a for a in addresses if not is_sites(a, site, config, domains))
        return _refusal(site, "From: address", bad, domains)
    original = "; ".join(header_value(headers[i]) for i in froms)
    names = [n for i in froms for n, _a in getaddresses([header_value(headers[i])]) if n]
    display = (names[0] if names else addresses[0] if addresses else site.name).replace('"', "")
    new_from = f'From: "{display} via {site.name}" <{default_sender(site, config)}>\n'
    kept = [h for i, h in enumerate(headers) if i not in froms]
    if not any(header_name(h) == "reply-to" for h in headers) and addresses:
        kept.append(f"Reply-To: {original}\n".encode("utf-8", "surrogateescape"))
    kept.insert(froms[0] if froms else len(kept), new_from.encode("utf-8", "surrogateescape"))
    notes.append(("from_rewritten", ",".join(addresses)))
    return b"".join(kept) + rest, notes
