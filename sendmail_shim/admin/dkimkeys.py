"""``sendmail-shim-admin dkim``: make, show, rotate and revoke the sites' DKIM keys.

One key set per domain (a site's configured ``domains``; ``dkim.host_domain``
for the operator's notices, site ``_admin``).  A new key is always *pending*:
only the daemon's DNS watch (``daemon/dkimwatch.py``) makes it active, once DNS
serves exactly its public key, so nothing here can make mail fail
verification.  :func:`make_site_keys` is the plain function ``site add``
calls.  Selector names, record names and DNS UPDATE are ``daemon/dkimdns.py``'s.

Trusts: the operator who runs it (root, or the daemon's user: the key directory
is the daemon's, mode 0700).  Guarantees: every change goes through the key
store's lock (``KeyStore.change``), so it never loses the daemon's concurrent
writes; run as root, every file it writes is owned by the daemon's user (the
spool's owner); each failure names the domain or file and what to do.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from sendmail_shim.config import Config, Site
from sendmail_shim.config.model import ADMIN_SITE
from sendmail_shim.daemon import dkimdns
from sendmail_shim.store.dkimkeys import (
    ACTIVE,
    ALGORITHMS,
    DNS_UNCHECKED,
    ED25519,
    MODE_DIR,
    PENDING,
    REVOKED,
    RSA,
    KeyRecord,
    KeyStore,
    KeyStoreError,
    public_value,
)

UPDATE_FAILED = "DNS UPDATE failed"
PENDING_PATIENCE = 2 * 86400.0  # a pending key waiting longer is a config check problem


class DkimError(Exception):
    """The operator asked for something that cannot be done; the text says why."""


def daemon_owner(config: Config) -> tuple[int, int] | None:
    """uid:gid of the daemon's user (the spool's owner) when we run as root."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(config.spool)
    except OSError:
        return None
    return st.st_uid, st.st_gid


def store_of(config: Config) -> KeyStore:
    """The key store to write, as the daemon's user when we run as root.  Refused before
    the spool exists: root would make the key directory its own, which the daemon could
    not read."""
    if os.geteuid() == 0 and not os.path.isdir(config.spool):
        raise DkimError(f"no spool at {config.spool}: create it first (sendmail-shim-admin "
                        "spool init --user <the daemon's user>), so the keys are the "
                        "daemon's")
    return KeyStore(config.dkim_keys, owner=daemon_owner(config))


def site_of_domain(config: Config) -> dict[str, str]:
    """domain -> the site that configures it (``_admin`` for dkim.host_domain)."""
    owners = {d: s.name for s in config.sites.values() for d in s.domains}
    if config.dkim.host_domain:
        owners.setdefault(config.dkim.host_domain.lower().rstrip("."), ADMIN_SITE)
    return owners


def domains_of(config: Config, name: str) -> list[str]:
    """The domains a command names: a site's (``_admin``: dkim.host_domain), or one domain
    that a site configures or the key store holds."""
    if name in config.sites:
        domains = list(config.sites[name].domains)
        if not domains:
            raise DkimError(f"site {name} has no domains: set sites.{name}.domains in "
                            f"{config.path}")
        return domains
    if name == ADMIN_SITE:
        if not config.dkim.host_domain:
            raise DkimError("dkim.host_domain is not set: the operator's notices have no "
                            "domain to sign with")
        return [config.dkim.host_domain.lower().rstrip(".")]
    domain = name.lower().rstrip(".")
    if domain in site_of_domain(config) or domain in KeyStore(config.dkim_keys).domains():
        return [domain]
    raise DkimError(f"{name!r} is neither a site nor a domain of a site in {config.path} "
                    f"(sites: {', '.join(sorted(config.sites)) or 'none'})")


def algorithms(config: Config) -> tuple[str, ...]:
    return ALGORITHMS if config.dkim.ed25519 else (RSA,)


def make_site_keys(config: Config, site: Site | str) -> list[KeyRecord]:
    """Make the missing keys of each of a site's domains: an RSA key (and an Ed25519 one
    with ``dkim.ed25519``) where the domain has none that is not revoked.  The new keys
    are pending; the daemon activates each once DNS serves it (and with DNS UPDATE
    configured, publishes it at its next pass).  Returns the keys made ([] when every
    domain has its keys)."""
    name = site.name if isinstance(site, Site) else site
    store = store_of(config)
    made = []
    now = time.time()
    for domain in domains_of(config, name):
        records = store.records(domain)
        for algorithm in algorithms(config):
            if any(r.algorithm == algorithm and r.state != REVOKED for r in records):
                continue
            made.append(dkimdns.new_key(config, store, domain, algorithm, now))
    return made


def rotate(config: Config, names: list[str]) -> list[KeyRecord]:
    """A new pending key beside each active one of the named sites or domains (a domain
    without keys gets its first).  ``DkimError`` when a key of that algorithm is already
    pending: it must reach DNS first (or be revoked)."""
    store = store_of(config)
    made = []
    now = time.time()
    wanted = [d for name in names for d in domains_of(config, name)]
    for domain in dict.fromkeys(wanted):
        records = store.records(domain)
        for algorithm in algorithms(config):
            pending = [r for r in records if r.algorithm == algorithm and r.state == PENDING]
            if pending:
                raise DkimError(f"{domain}: {algorithm} key {pending[0].selector} is already "
                                f"pending (made {_when(pending[0].created)}): publish its "
                                f"record (sendmail-shim-admin dkim show {domain}), or revoke "
                                "it first")
            try:
                made.append(dkimdns.new_key(config, store, domain, algorithm, now,
                                            note="rotation: waits until DNS serves its "
                                                 "record; the active key signs meanwhile"))
            except KeyStoreError as exc:
                raise DkimError(str(exc)) from None
    return made


def revoke(config: Config, domain: str, selector: str) -> KeyRecord:
    """Revoke one key now (a compromised key, or a retiring one not worth the overlap)."""
    store = store_of(config)
    domain = domain.lower().rstrip(".")
    rec = store.record(domain, selector)
    if rec is None:
        raise DkimError(f"{domain} has no DKIM selector {selector}: see sendmail-shim-admin "
                        f"dkim show {domain}")
    if rec.state == REVOKED:
        raise DkimError(f"{domain} selector {selector} is already revoked")
    return store.set_state(domain, selector, REVOKED,
                           note=f"revoked by the operator on {_when(time.time())}")


def publish(config: Config, recs: list[KeyRecord]) -> str:
    """DNS UPDATE of ``recs``' records under dkim.publish_zone; a line saying what."""
    if config.dkim.publish_zone is None:
        return ""
    records = [rr for rec in recs for rr in dkimdns.records_to_publish(config, rec)]
    try:
        names = dkimdns.publish(config, records)
    except dkimdns.UpdateError as exc:
        return (f"{UPDATE_FAILED}: {exc}; the daemon publishes pending keys again at each "
                "pass (dkim.pending_interval)")
    return f"published by DNS UPDATE in {config.dkim.publish_zone}: " + (
        ", ".join(names) or "nothing (no record under the zone)")


# -- showing -------------------------------------------------------------------------------

def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds >= 86400:
        return f"{seconds / 86400:.0f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 60:.0f}m"


def key_view(config: Config, rec: KeyRecord, signing: set[str], site: str,
             now: float) -> dict[str, Any]:
    """One key as ``dkim show --json`` prints it."""
    return {"site": site, "domain": rec.domain, "selector": rec.selector,
            "algorithm": rec.algorithm, "state": rec.state, "signs": rec.selector in signing,
            "created": rec.created, "age_seconds": round(now - rec.created),
            "changed": rec.changed, "dns": rec.dns, "dns_checked": rec.dns_checked,
            "note": rec.note,
            "publish": [{"name": n, "type": t, "value": v}
                        for n, t, v in dkimdns.records_to_publish(config, rec)]}


def show(config: Config, name: str | None, as_json: bool, pending_only: bool) -> str:
    """Each domain's selectors: state, age, DNS, whether it signs, the records to publish."""
    store = KeyStore(config.dkim_keys)
    owners = site_of_domain(config)
    domains = domains_of(config, name) if name else sorted(set(store.domains()) | set(owners))
    now = time.time()
    out = []
    for domain in domains:
        site = owners.get(domain, "-")
        try:
            records = store.records(domain)
            signing = {r.selector for r in store.signing(domain)}
        except KeyStoreError as exc:
            out.append(json.dumps({"site": site, "domain": domain, "error": str(exc)})
                       if as_json else f"{domain} (site {site}): ERROR {exc}")
            continue
        if pending_only:
            records = [r for r in records if r.state == PENDING]
            if not records:
                continue
        if as_json:
            out += [json.dumps(key_view(config, r, signing, site, now)) for r in records]
            continue
        signs = ", ".join(sorted(signing)) or "nothing: mail goes unsigned"
        out.append(f"{domain} (site {site}): signs with {signs}")
        if not records:
            out.append("  no keys: sendmail-shim-admin dkim make "
                       + (site if site != "-" else domain))
        for r in records:
            dns = "not looked up yet" if r.dns == DNS_UNCHECKED else \
                f"{r.dns} ({_when(r.dns_checked)})"
            out.append(f"  {r.selector:<16} {r.algorithm:<8} {r.state:<9} age "
                       f"{_age(now - r.created):<5} dns {dns}"
                       + ("  SIGNS" if r.selector in signing else ""))
            if r.note:
                out.append(f"    note: {r.note}")
            for n, t, v in dkimdns.records_to_publish(config, r):
                label = "customer's CNAME (once)" if t == "CNAME" else "publish"
                out.append(f"    {label}: {dkimdns.zone_text(n, t, v)}")
    return "\n".join(out) + ("\n" if out else "")


def delegation(config: Config, name: str) -> str:
    """The CNAMEs each of the named domains publishes once (dkim.delegate_zone)."""
    zone = config.dkim.delegate_zone
    if not zone:
        raise DkimError("dkim.delegate_zone is not set: without it each new selector is "
                        "published in the customer's own zone (dkim show prints it)")
    lines = []
    for domain in domains_of(config, name):
        for algorithm in algorithms(config):
            for selector in dkimdns.fixed_selectors(algorithm):
                rec = KeyRecord(domain, selector, algorithm, PENDING, "", 0.0, 0.0)
                target = dkimdns.delegated_target(config, rec)
                lines.append(dkimdns.zone_text(rec.name, "CNAME", f"{target}."))
    return "\n".join(lines) + "\n"


# -- config check --------------------------------------------------------------------------

def problems(config: Config, now: float | None = None) -> list[str]:
    """Each problem of the key store, named for ``config check``."""
    return review(config, now)[0]


def review(config: Config, now: float | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the key store for ``config check``: a domain whose only
    keys are pending and younger than PENDING_PATIENCE is a warning (waiting for DNS is
    the normal first step), every other key trouble is a problem."""
    stamp = time.time() if now is None else now
    root = config.dkim_keys
    found: list[str] = []
    owners = site_of_domain(config)
    warnings: list[str] = []
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [f"dkim: key directory {root}: {exc.strerror}; run config check as root"], []
    if st.st_mode & 0o077:
        found.append(f"dkim: key directory {root} has mode {st.st_mode & 0o777:04o}: other "
                     f"users may read or plant keys; chmod {MODE_DIR:04o} {root}")
    daemon = daemon_owner(config)
    if daemon is not None and st.st_uid != daemon[0]:
        found.append(f"dkim: key directory {root} is owned by uid {st.st_uid}, not the "
                     f"daemon's user (uid {daemon[0]}, the spool's owner): the daemon cannot "
                     f"sign; chown -R {daemon[0]}:{daemon[1]} {root}")
    store = KeyStore(root)
    for domain in store.domains():
        site = owners.get(domain)
        where = f"dkim: {domain} (site {site})" if site else f"dkim: {domain} (no site)"
        found += _domain_problems(config, store, domain, where, stamp, warnings)
    return found, warnings


def _domain_problems(config: Config, store: KeyStore, domain: str, where: str,
                     now: float, warnings: list[str]) -> list[str]:
    found = []
    path = os.path.join(store.root, domain)
    try:
        st = os.stat(path)
        if st.st_mode & 0o077:
            found.append(f"{where}: directory {path} has mode {st.st_mode & 0o777:04o}; chmod "
                         f"0700 {path}")
        records = store.records(domain)
    except (OSError, KeyStoreError) as exc:
        return [f"{where}: {exc}"]
    for rec in records:
        if rec.state == REVOKED:
            continue
        if rec.state == PENDING and now - rec.created > PENDING_PATIENCE:
            found.append(f"{where}: selector {rec.selector} has waited {_age(now - rec.created)} "
                         f"for DNS ({rec.note or 'not looked up yet: is the daemon running?'})")
        key_path = store.private_key_path(domain, rec.selector)
        try:
            kst = os.stat(key_path)
            if kst.st_mode & 0o077:
                found.append(f"{where}: key {key_path} has mode {kst.st_mode & 0o777:04o}: "
                             f"chmod 0600 {key_path}, and rotate it (it may have been read)")
            algorithm, public = public_value(store.private_key(domain, rec.selector))
        except (OSError, KeyStoreError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            found.append(f"{where}: selector {rec.selector} ({rec.state}): key file "
                         f"{key_path} is missing or unreadable ({why}); its mail goes "
                         f"unsigned: sendmail-shim-admin dkim rotate {domain}")
            continue
        except (ValueError, TypeError) as exc:
            found.append(f"{where}: selector {rec.selector} ({rec.state}): key file "
                         f"{key_path} is malformed ({exc}); sendmail-shim-admin dkim rotate "
                         f"{domain}")
            continue
        if (algorithm, public) != (rec.algorithm, rec.public):
            found.append(f"{where}: selector {rec.selector}: key file {key_path} does not hold "
                         f"the key its record publishes; sendmail-shim-admin dkim rotate "
                         f"{domain}")
    if records and not any(r.state == ACTIVE for r in records):
        text = (f"{where}: no active key: its mail goes unsigned until DNS serves a "
                "pending key (sendmail-shim-admin dkim show " + domain + ")")
        young = [r for r in records if r.state == PENDING
                 and now - r.created <= PENDING_PATIENCE]
        (warnings if young else found).append(text)
    elif any(r.state == ACTIVE and r.algorithm == ED25519 for r in records) and not any(
            r.state == ACTIVE and r.algorithm == RSA for r in records):
        found.append(f"{where}: an Ed25519 key is active without an RSA key; Ed25519 never "
                     "signs alone: sendmail-shim-admin dkim rotate " + domain)
    return found
