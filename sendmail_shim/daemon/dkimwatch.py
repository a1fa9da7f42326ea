"""The DKIM DNS watch: pending keys become active only once DNS serves them.

A background task of the daemon (``daemon/main.py``).  Every
``dkim.pending_interval`` it reads the key store (``store/dkimkeys.py``; a
domain's state file is read again only when its mtime moved, so the admin
command's changes are seen without a reload) and asks DNS (the resolver of
``resolver.*``, ``daemon/dkimdns.py``'s :func:`lookup`) about:

- every **pending** key, at each pass.  When DNS serves exactly that key it
  becomes **active**, and the active key of the same algorithm becomes
  **retiring** at that moment: the signer never uses a key receivers cannot
  find.  An Ed25519 key waits until its domain has an active RSA key (it never
  signs alone).  Until then the key's ``note`` says why it waits (no record, or
  another key at the name), shown by ``sendmail-shim-admin dkim show``.
- every **active** and **retiring** key, once per ``dkim.recheck_interval``
  (counted from the last look, or from its last change of state if later).
  DNS serving another key or none at an active selector is a *mismatch*: the
  ``dns`` field says so, ``KeyStore.signing`` stops using the key (a retiring
  key DNS still serves stands in, else the domain's mail goes unsigned: never
  deferred), a ``dkim_dns_mismatch`` warning, a notice to ``admin.notify`` (once
  per mismatch) and the metric.  When DNS serves the key again it signs again
  (``dkim_dns_restored``).
- A timeout, SERVFAIL or any other trouble changes nothing: the last state
  known to be good keeps signing.

Retiring keys older than ``dkim.overlap`` (counted from when they stopped
signing) are **revoked**: the private key is deleted and the record to publish
is the empty ``p=``.  With ``dkim.rotate_every``, an active key that old gets a
new pending key beside it (``dkimdns.new_key``).  With DNS UPDATE configured
(``dkim.update_*``) new and revoked records under the zone are published, and
pending ones DNS does not serve yet are published again at each pass.  The
notices of one pass are one message per kind (new keys to publish, revocations
to publish, mismatches): with thousands of domains rotating on the same day
the operator gets one mail, not thousands.

Each pass ends with a ``dkim_keys`` debug line (totals, never a domain), from
which the metrics set their gauges: keys pending and the oldest one's age, active
keys DNS contradicts, domains with keys but none signing, the oldest active key's
age.

Trusts: the key store (the daemon's own directory) and DNS answers only as far as
``dkimdns.classify``.  Guarantees: every state change goes through
``KeyStore.change`` under the store's lock and is applied to the records as they
are then (an admin change in between is kept; a result for a selector whose key
was replaced meanwhile is dropped); a failing pass is logged and tried again
next interval; the watch stops between two lookups when asked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from sendmail_shim.config import Config
from sendmail_shim.daemon import dkimdns
from sendmail_shim.delivery.route import resolver_of
from sendmail_shim.policy.periodic import Periodic
from sendmail_shim.policy.sanctions import notify_admin
from sendmail_shim.store.dkimkeys import (
    ACTIVE,
    ALGORITHMS,
    DNS_MISMATCH,
    DNS_MISSING,
    DNS_OK,
    ED25519,
    PENDING,
    RETIRING,
    REVOKED,
    RSA,
    KeyRecord,
    KeyStore,
    KeyStoreError,
)

log = logging.getLogger(__name__)
PARALLEL = 8  # lookups in flight at once
UPDATE_BATCH = 50  # records per DNS UPDATE message
BAD = (DNS_MISMATCH, DNS_MISSING)


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


@dataclass
class Change:
    """Something a pass did that the operator hears of."""

    kind: str  # activated, mismatch, restored, revoked
    rec: KeyRecord
    detail: str = ""


def _waiting_note(config: Config, rec: KeyRecord, status: str, now: float) -> str:
    name = dkimdns.txt_name(config, rec)
    what = "serves another key" if status == DNS_MISMATCH else "has no key"
    cname = (f", and check that the customer's {rec.name} is a CNAME to {name}"
             if name != rec.name else "")
    return (f"waits: DNS {what} at {rec.name} (looked {_day(now)}); publish {name} TXT "
            f"\"{rec.txt()}\"{cname}")


def decide(config: Config, records: list[KeyRecord], seen: dict[str, tuple[str, str]],
           now: float) -> tuple[list[KeyRecord], list[Change]]:
    """The domain's records after a pass: ``seen`` maps selector -> (public, DNS status).

    Pure: the caller writes the result (under the store's lock) and acts on the changes.
    """
    out: list[KeyRecord] = []
    changes: list[Change] = []
    for rec in records:
        got = seen.get(rec.selector)
        if got is None or got[0] != rec.public or rec.state == REVOKED:
            out.append(rec)
            continue
        status = got[1]
        new = replace(rec, dns=status, dns_checked=now)
        if rec.state == PENDING:
            new = replace(new, note="" if status == DNS_OK
                          else _waiting_note(config, rec, status, now))
        elif rec.state == ACTIVE and status in BAD and rec.dns not in BAD:
            what = "serves another key" if status == DNS_MISMATCH else "has no key"
            new = replace(new, note=f"DNS {what} at {rec.name} since {_day(now)}: this key "
                                    "does not sign until DNS serves it again")
            changes.append(Change("mismatch", new, what))
        elif rec.state == ACTIVE and status == DNS_OK and rec.dns in BAD:
            new = replace(new, note=f"DNS serves it again since {_day(now)}")
            changes.append(Change("restored", new))
        out.append(new)
    for algorithm in ALGORITHMS:
        ready = sorted((r for r in out if r.algorithm == algorithm and r.state == PENDING
                        and r.dns == DNS_OK and r.selector in seen),
                       key=lambda r: r.created)
        if not ready:
            continue
        chosen = ready[-1]
        if algorithm == ED25519 and not any(r.state == ACTIVE and r.algorithm == RSA
                                            for r in out):
            out = [replace(r, note="waits: DNS serves it, but Ed25519 never signs alone: it "
                                   "becomes active with the domain's first active RSA key")
                   if r is chosen else r for r in out]
            continue
        retired = [r.selector for r in out if r.algorithm == algorithm and r.state == ACTIVE]
        until = _day(now + config.dkim.overlap)
        out = [replace(r, state=ACTIVE, changed=now, note=f"signs since {_day(now)}: DNS "
                                                          "serves it")
               if r is chosen else
               replace(r, state=RETIRING, changed=now,
                       note=f"replaced by {chosen.selector} on {_day(now)}; stays published "
                            f"until {until} (dkim.overlap), then revoked")
               if r.selector in retired else r for r in out]
        changes.append(Change("activated", chosen, ",".join(retired)))
    final = []
    for rec in out:
        if rec.state == RETIRING and now - rec.changed >= config.dkim.overlap:
            rec = replace(rec, state=REVOKED, changed=now,
                          note=f"revoked on {_day(now)} after dkim.overlap; publish the empty "
                               "p= (or remove the record once nothing signed with it is in "
                               "flight)")
            changes.append(Change("revoked", rec))
        final.append(rec)
    return final, changes


def due(config: Config, rec: KeyRecord, now: float) -> bool:
    """Whether ``rec`` is looked up in this pass."""
    if rec.state == PENDING:
        return True
    if rec.state in (ACTIVE, RETIRING):  # a key that just changed state is as fresh
        return now - max(rec.dns_checked, rec.changed) >= config.dkim.recheck_interval
    return False


@dataclass
class Totals:
    """What the ``dkim_keys`` line reports (no domain names: 10,000 sites)."""

    domains: int = 0
    active: int = 0
    pending: int = 0
    mismatched: int = 0
    unsigned: int = 0  # domains with keys of which none signs now
    errors: int = 0  # domains whose state file cannot be read
    oldest_active: float = 0.0  # created, 0 when none
    oldest_pending: float = 0.0

    def add(self, store_records: list[KeyRecord]) -> None:
        self.domains += 1
        active = [r for r in store_records if r.state == ACTIVE]
        pending = [r for r in store_records if r.state == PENDING]
        self.active += len(active)
        self.pending += len(pending)
        self.mismatched += sum(1 for r in active if r.dns in BAD)
        signing = [r for r in active if r.dns not in BAD] or [
            r for r in store_records if r.state == RETIRING and r.dns == DNS_OK and active]
        if not signing:
            self.unsigned += 1
        for r in active:
            self.oldest_active = min(self.oldest_active or r.created, r.created)
        for r in pending:
            self.oldest_pending = min(self.oldest_pending or r.created, r.created)


@dataclass
class Pass:
    """One pass's results, for the notices."""

    changes: list[Change] = field(default_factory=list)
    new_keys: list[KeyRecord] = field(default_factory=list)
    republish: list[KeyRecord] = field(default_factory=list)


class KeyWatch(Periodic):
    """The daemon's DKIM DNS watch (see the module docstring)."""

    def __init__(self, config: Callable[[], Config]) -> None:
        super().__init__()
        self._config = config
        self._cache: dict[str, tuple[int, list[KeyRecord]]] = {}

    async def round(self) -> float:
        config = self._config()
        try:
            await self.check(config, time.time())
        except Exception:
            log.exception("dkim_watch_failed: the pass is skipped and tried again after "
                          "dkim.pending_interval")
        return config.dkim.pending_interval

    def _read(self, store: KeyStore, report: bool = True
              ) -> tuple[dict[str, list[KeyRecord]], int]:
        """Every domain's records (re-read only when its state file's mtime moved)."""
        found: dict[str, list[KeyRecord]] = {}
        errors = 0
        for domain in store.domains():
            try:
                mtime = os.stat(os.path.join(store.root, domain, "keys.json")).st_mtime_ns
                cached = self._cache.get(domain)
                if cached is None or cached[0] != mtime:
                    cached = (mtime, store.records(domain))
                    self._cache[domain] = cached
                found[domain] = cached[1]
            except (OSError, KeyStoreError) as exc:
                errors += 1
                if not report:
                    continue
                log.warning("dkim_keys_unreadable domain=%s reason=%r action=%r", domain,
                            str(exc), "sendmail-shim-admin config check names the problem")
        return found, errors

    async def check(self, config: Config, now: float) -> Totals:
        """One pass over every domain of the key store."""
        store = KeyStore(config.dkim_keys)
        domains, _errors = await asyncio.to_thread(self._read, store)
        resolver = resolver_of(config)
        gate = asyncio.Semaphore(PARALLEL)

        async def ask(rec: KeyRecord) -> tuple[KeyRecord, str | None]:
            async with gate:
                return rec, await dkimdns.lookup(resolver, rec)

        wanted = [rec for records in domains.values() for rec in records
                  if due(config, rec, now)]
        answers: dict[str, dict[str, tuple[str, str]]] = {}
        for rec, status in await asyncio.gather(*(ask(r) for r in wanted)):
            if status is None:
                log.debug("dkim_dns_unknown domain=%s selector=%s", rec.domain, rec.selector)
                continue
            answers.setdefault(rec.domain, {})[rec.selector] = (rec.public, status)
        if self._stopping:
            return Totals()
        await asyncio.to_thread(self._apply, config, store, domains, answers, now)
        fresh, errors = await asyncio.to_thread(self._read, store, False)
        totals = Totals(errors=errors)
        for records in fresh.values():
            totals.add(records)
        log.debug("dkim_keys domains=%d active=%d pending=%d mismatched=%d unsigned=%d "
                  "errors=%d oldest_active=%d oldest_pending=%d", totals.domains,
                  totals.active, totals.pending, totals.mismatched, totals.unsigned,
                  totals.errors, totals.oldest_active, totals.oldest_pending)
        return totals

    def _apply(self, config: Config, store: KeyStore, domains: dict[str, list[KeyRecord]],
               answers: dict[str, dict[str, tuple[str, str]]], now: float) -> Pass:
        """Write each domain's transitions, rotate what is due, publish and notify."""
        done = Pass()
        for domain, records in domains.items():
            seen = answers.get(domain, {})
            revoke_due = any(r.state == RETIRING and now - r.changed >= config.dkim.overlap
                             for r in records)
            if seen or revoke_due:
                try:
                    records = self._commit(config, store, domain, seen, now, done)
                except (OSError, KeyStoreError) as exc:
                    log.warning("dkim_keys_unwritable domain=%s reason=%r action=%r", domain,
                                str(exc), "check the key directory's owner and free space")
                    continue
            if config.dkim.rotate_every:
                self._rotate_due(config, store, domain, records, now, done)
        self._publish(config, done)
        self._notify(config, done)
        return done

    def _commit(self, config: Config, store: KeyStore, domain: str,
                seen: dict[str, tuple[str, str]], now: float, done: Pass) -> list[KeyRecord]:
        """Apply one domain's results under the store's lock; its records after."""
        changes: list[Change] = []

        def step(current: list[KeyRecord]) -> list[KeyRecord]:
            new, found = decide(config, current, seen, now)
            changes[:] = found
            return new

        final = store.change(domain, step)
        self._cache.pop(domain, None)
        for rec in final:
            if rec.state == PENDING and rec.dns in BAD and rec.selector in seen:
                done.republish.append(rec)
        for change in changes:
            rec = change.rec
            if change.kind == "activated":
                log.info("dkim_key_active domain=%s selector=%s algorithm=%s retiring=%s",
                         domain, rec.selector, rec.algorithm, change.detail or "none")
            elif change.kind == "mismatch":
                stand_in = [r.selector for r in store.signing(domain)
                            if r.algorithm == rec.algorithm]
                change.detail += (f"; retiring key {stand_in[0]} signs meanwhile" if stand_in
                                  else f"; the domain's mail goes without a {rec.algorithm} "
                                       "signature meanwhile")
                log.warning("dkim_dns_mismatch domain=%s selector=%s algorithm=%s dns=%s "
                            "signing=%s action=%r", domain, rec.selector, rec.algorithm,
                            rec.dns, ",".join(stand_in) or "none",
                            f"publish {dkimdns.txt_name(config, rec)} TXT as 'sendmail-shim-"
                            f"admin dkim show {domain}' prints it, or rotate the key")
            elif change.kind == "restored":
                log.info("dkim_dns_restored domain=%s selector=%s", domain, rec.selector)
            elif change.kind == "revoked":
                try:
                    os.unlink(store.private_key_path(domain, rec.selector))
                except FileNotFoundError:
                    pass
                log.info("dkim_key_revoked domain=%s selector=%s", domain, rec.selector)
            done.changes.append(change)
        return final

    def _rotate_due(self, config: Config, store: KeyStore, domain: str,
                    records: list[KeyRecord], now: float, done: Pass) -> None:
        every = config.dkim.rotate_every
        assert every is not None
        for algorithm in ALGORITHMS:
            active = [r for r in records if r.algorithm == algorithm and r.state == ACTIVE]
            if not active or any(r.algorithm == algorithm and r.state == PENDING
                                 for r in records):
                continue
            if now - max(r.created for r in active) < every:
                continue
            try:
                rec = dkimdns.new_key(config, store, domain, algorithm, now,
                                      note="made by dkim.rotate_every; waits until DNS serves "
                                           "its record")
            except (OSError, KeyStoreError) as exc:
                log.warning("dkim_rotate_failed domain=%s algorithm=%s reason=%r", domain,
                            algorithm, str(exc))
                continue
            self._cache.pop(domain, None)
            log.info("dkim_key_made domain=%s selector=%s algorithm=%s by=rotate_every",
                     domain, rec.selector, algorithm)
            done.new_keys.append(rec)

    def _publish(self, config: Config, done: Pass) -> None:
        """DNS UPDATE of new, revoked and still-unserved pending records (when configured)."""
        if config.dkim.publish_zone is None:
            return
        recs = done.new_keys + done.republish + [c.rec for c in done.changes
                                                 if c.kind == "revoked"]
        records = [rr for rec in recs for rr in dkimdns.records_to_publish(config, rec)]
        for at in range(0, len(records), UPDATE_BATCH):
            try:
                names = dkimdns.publish(config, records[at:at + UPDATE_BATCH])
            except dkimdns.UpdateError as exc:
                log.warning("dkim_update_failed reason=%r", str(exc))
                continue
            for name in names:
                log.info("dkim_published name=%s", name)

    def _notify(self, config: Config, done: Pass) -> None:
        zone = config.dkim.publish_zone
        sections = []
        if done.new_keys:
            lines = []
            for rec in done.new_keys:
                for name, rdtype, value in dkimdns.records_to_publish(config, rec):
                    if rdtype == "CNAME":
                        continue  # the customer's CNAME is published once, already there
                    how = " (published by DNS UPDATE)" if dkimdns.under(name, zone) else ""
                    lines.append(f"  {dkimdns.zone_text(name, rdtype, value)}{how}")
            sections.append(("new DKIM keys wait for DNS", (
                f"dkim.rotate_every made {len(done.new_keys)} new key(s). Each starts signing "
                "only once DNS serves its record; until then the current key signs.\n\n"
                "Publish:\n" + "\n".join(lines))))
        mismatches = [c for c in done.changes if c.kind == "mismatch"]
        if mismatches:
            sections.append((f"DKIM: DNS contradicts {len(mismatches)} active key(s)", (
                "DNS no longer serves these active keys; they do not sign until it does:\n"
                + "\n".join(f"  {c.rec.name}: DNS {c.detail}" for c in mismatches)
                + "\n\nWhat to do next: publish the record 'sendmail-shim-admin dkim show "
                "DOMAIN' prints, or make a new key: sendmail-shim-admin dkim rotate "
                "DOMAIN")))
        revoked = [c.rec for c in done.changes if c.kind == "revoked"
                   and not dkimdns.under(dkimdns.txt_name(config, c.rec), zone)]
        if revoked:
            sections.append((f"DKIM: {len(revoked)} retired key(s) revoked", (
                "These keys passed dkim.overlap and were revoked (private key deleted). "
                "Publish the empty key:\n" + "\n".join(
                    f"  {dkimdns.zone_text(dkimdns.txt_name(config, r), 'TXT', r.txt())}"
                    for r in revoked))))
        for subject, body in sections:
            try:
                notify_admin(config, subject, body + "\n")
            except OSError as exc:
                log.error("dkim_notice_failed subject=%r reason=%r", subject, str(exc))
