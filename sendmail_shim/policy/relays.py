"""Relay pools, cold standby and burned relays: which relays a message may use.

Relays are grouped into named pools (``relays[].pool``, declared in ``pools:``
with a score band or ``hold: true``).  Without ``pools:`` there is one implicit
pool, ``default``, of every relay: the delivery of old configurations does not
change.

Decisions (docs/routing.md, "Relay pools and cold standby"):

* which pool (:func:`choose_pool`): a message whose scanner score lies in a
  hold pool's band is held, even from a pinned site (a pin chooses the IP, it
  never lets spam through); otherwise a site's pin (``sites.NAME.pool``) wins
  over the score band, because the operator named that site's pool on purpose
  (a customer with its own IP, or one kept on the "might be bad" IP), while a
  band is a guess per message.  An unscored message (no scanner, or the
  scanner down) takes the ``scan.unscored_pool`` passed in, else the pin, else
  ``default``.  A score in no band takes ``default``;
* which relays (:func:`active_relays`): failover stays inside the pool.  The
  active set is the pool's unburned non-standby relays plus as many unburned
  standbys (in list order) as the pool has burned non-standby relays.  A
  standby is never contacted while the set holds another relay; an empty set
  defers the pool's mail (it never leaks to another pool) and the operator was
  told when the last relay went;
* burn/restore (:func:`burn`, :func:`restore`): the mark lives in the state
  backend (``State.burn_relay``), so it survives restarts; each is logged with
  the relay, its pool and the standby promoted or sent back, and
  ``admin.notify`` gets a notice.  The daemon learns at once (the control
  socket runs these in the daemon) and flushes that pool's deferred mail.

Trusts: the configuration (the loader checked that relays and sites name
declared pools and that relay names are unique) and the state's marks.
Guarantees: an unknown relay name is an :class:`OperationError` listing the
names; the functions here choose, they never send.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sendmail_shim.config import DEFAULT_POOL, Config, Pool, Relay
from sendmail_shim.policy.sanctions import OperationError, notify_admin
from sendmail_shim.store.headers import mail_date
from sendmail_shim.store.outcome import OK, PERM, Outcome
from sendmail_shim.store.state import State

log = logging.getLogger(__name__)
Marks = dict[str, tuple[float, str, str]]  # burned relay -> (since, reason, actor)
ACTIVE, STANDBY, PROMOTED, BURNED = "active", "standby", "promoted", "burned"


def unscored_pool(config: Config) -> str | None:
    """The pool for mail the scanner did not score (``scan.unscored_pool``), if configured."""
    scan = getattr(config, "scan", None)  # the scanner's section, where it exists
    name = getattr(scan, "unscored_pool", None)
    return name if isinstance(name, str) else None


def pool_named(config: Config, name: str) -> Pool | None:
    """The declared pool ``name``; None for the implicit ``default`` or an unknown one."""
    return next((pool for pool in config.pools if pool.name == name), None)


def pool_names(config: Config) -> list[str]:
    """Every pool: the declared ones, then ``default`` when some relay is in it."""
    names = [pool.name for pool in config.pools]
    if DEFAULT_POOL not in names and (not names or any(
            r.pool == DEFAULT_POOL for r in config.relays)):
        names.append(DEFAULT_POOL)
    return names


def is_hold(config: Config, pool: str) -> bool:
    declared = pool_named(config, pool)
    return declared is not None and declared.hold


def choose_pool(config: Config, site_name: str, score: float | None,
                unscored: str | None) -> tuple[str, str]:
    """(pool, why) of a message of ``site_name`` with scanner ``score`` (None: unscored)."""
    site = config.site_named(site_name)
    pinned = site.pool if site is not None else None
    if score is None:
        if unscored:
            return unscored, "the message has no score: scan.unscored_pool"
        if pinned:
            return pinned, f"site {site_name} is pinned to pool {pinned} (sites.pool)"
        if not config.pools:
            return DEFAULT_POOL, "no pools are configured: every relay is in pool default"
        return DEFAULT_POOL, "the message has no score and its site is not pinned"
    band = next((pool for pool in config.pools if pool.takes(score)), None)
    if band is not None and band.hold:
        return band.name, f"score {score:g} lies in hold pool {band.name}'s band{_band(band)}"
    if pinned:
        return pinned, (f"site {site_name} is pinned to pool {pinned} (sites.pool; the pin wins "
                        f"over the score {score:g})")
    if band is not None:
        return band.name, f"score {score:g} lies in pool {band.name}'s band{_band(band)}"
    if not config.pools:
        return DEFAULT_POOL, "no pools are configured: every relay is in pool default"
    return DEFAULT_POOL, f"score {score:g} lies in no pool's band"


def _band(pool: Pool) -> str:
    low = "-inf" if pool.min_score is None else f"{pool.min_score:g}"
    high = "inf" if pool.max_score is None else f"{pool.max_score:g}"
    return f" [{low}, {high})"


def active_relays(config: Config, marks: Marks, pool: str) -> tuple[Relay, ...]:
    """The relays ``pool``'s mail may use now, in the order they are tried."""
    members = [r for r in config.relays if r.pool == pool]
    primaries = [r for r in members if not r.standby]
    live = [r for r in primaries if r.ident not in marks]
    promoted = [r for r in members if r.standby and r.ident not in marks]
    return tuple(live + promoted[:len(primaries) - len(live)])


def relay_state(config: Config, marks: Marks, relay: Relay) -> str:
    """active | standby | promoted | burned."""
    if relay.ident in marks:
        return BURNED
    if not relay.standby:
        return ACTIVE
    return PROMOTED if relay in active_relays(config, marks, relay.pool) else STANDBY


def relay_named(config: Config, name: str) -> Relay:
    for relay in config.relays:
        if name in (relay.ident, relay.label):
            return relay
    known = ", ".join(r.ident for r in config.relays) or "none"
    raise OperationError(f"no relay {name!r} in {config.path} (relays: {known})")


def _names(relays: list[Relay]) -> str:
    return ", ".join(r.ident for r in relays) or "none"


def _switch(relay: Relay, before: tuple[Relay, ...],
            after: tuple[Relay, ...]) -> tuple[list[Relay], list[Relay]]:
    """(standbys promoted, standbys sent back) by a burn or restore of ``relay``."""
    return ([r for r in after if r not in before and r is not relay],
            [r for r in before if r not in after and r is not relay])


def burn(config: Config, state: State, name: str, reason: str, actor: str) -> str:
    """Take relay ``name`` out now and promote a standby of its pool; the operator's text."""
    relay = relay_named(config, name)
    pool = relay.pool
    before = active_relays(config, state.relay_marks(), pool)
    if not state.burn_relay(relay.ident, reason, actor):
        since, why, by = state.relay_marks()[relay.ident]
        return (f"relay {relay.ident} (pool {pool}) was already burned since "
                f"{mail_date(since)} by {by}: {why}")
    after = active_relays(config, state.relay_marks(), pool)
    promoted, _ = _switch(relay, before, after)
    log.warning("relay_burned relay=%s pool=%s promoted=%s active=%s actor=%s reason=%r",
                relay.ident, pool, _names(promoted), _names(list(after)), actor, reason)
    if after:
        outcome = (f"Pool {pool} now sends through {_names(list(after))}"
                   + (f" (standby {_names(promoted)} promoted)" if promoted else "")
                   + "; its deferred mail is retried there now.")
    else:
        outcome = (f"Pool {pool} has NO active relay left: its mail waits in the queue (it "
                   "never goes through another pool) until you restore a relay or add one "
                   "to the pool.")
    notify_admin(config, f"relay {relay.ident} burned (pool {pool})", (
        f"Relay {relay.ident} ({relay.label}) of pool {pool} was burned by {actor}.\n\n"
        f"Reason: {reason}\n\n{outcome}\n\nWhat to do next:\n"
        "  sendmail-shim-admin relay list              the relays and their state\n"
        f"  sendmail-shim-admin relay restore {relay.ident}   once the IP is delisted\n"))
    return f"relay {relay.ident} (pool {pool}) burned ({reason}). {outcome}"


def restore(config: Config, state: State, name: str, actor: str) -> str:
    """Bring relay ``name`` back; a standby promoted for it returns to standby."""
    relay = relay_named(config, name)
    pool = relay.pool
    before = active_relays(config, state.relay_marks(), pool)
    if not state.restore_relay(relay.ident):
        return f"relay {relay.ident} (pool {pool}) was not burned"
    after = active_relays(config, state.relay_marks(), pool)
    _, demoted = _switch(relay, before, after)
    log.warning("relay_restored relay=%s pool=%s back_to_standby=%s active=%s actor=%s",
                relay.ident, pool, _names(demoted), _names(list(after)), actor)
    outcome = (f"Pool {pool} now sends through {_names(list(after))}"
               + (f"; standby {_names(demoted)} is back to standby" if demoted else "") + ".")
    notify_admin(config, f"relay {relay.ident} restored (pool {pool})", (
        f"Relay {relay.ident} ({relay.label}) of pool {pool} was restored by {actor}.\n\n"
        f"{outcome}\n\nSee 'sendmail-shim-admin relay list'.\n"))
    return f"relay {relay.ident} (pool {pool}) restored. {outcome}"


@dataclass
class Answers:
    """One relay's answers since the daemon started (recipients)."""

    delivered: int = 0
    deferred: int = 0
    refused: int = 0
    last: str = ""  # code and text of the last answer
    when: float = 0.0


class RelayStats:
    """The daemon's memory of each relay's answers: counts and the last answer.

    Kept by the queue runner, read by ``relay list`` (thread safe; lost on restart).
    """

    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self._by_label: dict[str, Answers] = {}

    def note(self, outcomes: list[Outcome]) -> None:
        now = time.time()
        with self._lock:
            for out in outcomes:
                if not out.relay:
                    continue
                answers = self._by_label.setdefault(out.relay, Answers())
                if out.kind == OK:
                    answers.delivered += 1
                elif out.kind == PERM:
                    answers.refused += 1
                else:
                    answers.deferred += 1
                answers.last = f"{out.code} {out.text}" if out.code else out.text
                answers.when = now

    def of(self, relay: Relay) -> Answers:
        with self._lock:
            found = self._by_label.get(relay.label)
            return Answers(**vars(found)) if found else Answers()
