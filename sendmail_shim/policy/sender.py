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
    if envelope.sender and not belongs(envelope.sender, domains):
        if site.envelope_policy == "refuse":
            return _refusal(site, "envelope sender", envelope.sender or "", domains)
        if site.envelope_policy == "rewrite":
            notes.append(("sender_rewritten_from", envelope.sender))
            envelope.sender = default_sender(site, config)
    if site.from_policy == "keep":
        return message, notes
    headers, rest = split_header_block(message)
    froms = [i for i, h in enumerate(headers) if header_name(h) == "from"]
    addresses = [a for i in froms for _n, a in getaddresses([header_value(headers[i])]) if a]
    if all(belongs(a, domains) for a in addresses):
        return message, notes
    if site.from_policy == "refuse":
        bad = next(a for a in addresses if not belongs(a, domains))
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
