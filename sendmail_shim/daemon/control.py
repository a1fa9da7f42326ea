"""The control requests: what the operator asks of sites, quotas and the queue.

Trusts: its caller to be the operator (the daemon's control socket admits root,
the daemon's user and the admin group; the admin command runs these directly
only while it holds the daemon's lock, i.e. when no daemon runs).
Guarantees: one implementation of each action, whoever asks (the sanctions
themselves are ``policy.sanctions``, shared with the outbreak rules); queue ids and
every other argument are validated before use (a missing site, a limit that is
not a number from 0 to :data:`MAX_LIMIT`: an :class:`OperationError` naming
the argument, never a crash); every action is logged with the site and the actor; the
text returned is what the operator sees, naming what to do next; ``queue-list``
returns it piece by piece (streamed, never whole in memory).

Actions (``perform``): site-list, site-show, site-suspend, site-resume,
quota-show, quota-set, quota-reset, top, queue-list, queue-show, queue-hold,
queue-release, queue-delete, relay-list, relay-burn, relay-restore, relay-check
(``delivery.reputation``: asks the DNS blocklists now and reports; it sends no
notice and burns nothing).

``relay-list`` shows each relay's state from the state backend and, given the
running daemon's :class:`~sendmail_shim.policy.relays.RelayStats`, its last
answer and counts since the daemon started; without them (no daemon runs) it
says so.  ``queue-show`` names the pool the message takes and why.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from sendmail_shim.config import QUOTA_KEYS, Config
from sendmail_shim.daemon import listing
from sendmail_shim.delivery import reputation
from sendmail_shim.policy import quota, relays
from sendmail_shim.policy.sanctions import (
    OperationError,
    delete_messages,
    hold_messages,
    release_messages,
    resume_site,
    select,
    site_named,
    suspend_site,
)
from sendmail_shim.store import spool
from sendmail_shim.store.address import printable
from sendmail_shim.store.headers import mail_date
from sendmail_shim.store.state import ACCEPTED, RELAY_ACCEPTED, State
from sendmail_shim.wire.protocol import ControlArgs

log = logging.getLogger(__name__)
Args = ControlArgs  # decoded by wire.protocol.decode_control
MAX_LIMIT = 10**9  # a quota limit larger than this is a typo, not a limit


def _first(args: Args, key: str) -> str | None:
    values = args.get(key)
    return values[0] if values else None


def _required(args: Args, key: str) -> str:
    value = _first(args, key)
    if value is None:
        raise OperationError(f"missing argument {key}")
    return value


def _limit(key: str, value: str) -> int | None:
    """A quota limit argument: a number from 0 to MAX_LIMIT, or none/empty (unlimited)."""
    if value in ("", "none"):
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 10 or int(value) > MAX_LIMIT:
        raise OperationError(f"--{key.replace('_', '-')}: {value[:20]!r}"
                             f"{'...' if len(value) > 20 else ''} is not a number from 0 to "
                             f"{MAX_LIMIT} or 'none'")
    return int(value)


def _quota_rows(config: Config, state: State, names: list[str],
                now: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in names:
        site = site_named(config, name)
        limits = quota.describe(quota.effective_quota(config, state, site))
        used = quota.usage(state, now, site=name).as_dict()
        at_relays = quota.usage(state, now, site=name, kind=RELAY_ACCEPTED).as_dict()
        suspended = state.suspension(name)
        rows.append({"site": name, "limits": limits, "usage": used,
                     "overridden": sorted(state.overrides(name)),
                     "suspended": suspended[1] if suspended else None})
        if any(at_relays.values()):  # the relays' policy service counts in this state too
            rows[-1]["usage_at_relays"] = at_relays
        if state.shared:
            rows[-1]["nodes"] = _by_node(state, now, name)
    return rows


def _by_node(state: State, now: float, site: str | None = None
             ) -> dict[str, dict[str, dict[str, int]]]:
    """site -> node -> messages and recipients accepted in the last hour (shared state)."""
    return {name: {node: {"messages": events, "recipients": total}
                   for node, (events, total) in sorted(nodes.items())}
            for name, nodes in state.by_node(ACCEPTED, quota.HOUR, now, site).items()}


def _nodes_text(nodes: dict[str, dict[str, int]]) -> str:
    """'web1 3 (5 rcpt), web2 1 (1 rcpt)': who sent what in the last hour."""
    return ", ".join(f"{node} {use['messages']} ({use['recipients']} rcpt)"
                     for node, use in nodes.items()) or "-"


def _fmt_limit(value: object, overridden: bool = False) -> str:
    return ("-" if value is None else str(value)) + ("*" if overridden else "")


def quota_show(config: Config, state: State, args: Args) -> str:
    names = args.get("site") or sorted(config.sites)
    rows = _quota_rows(config, state, names, time.time())
    if args.get("json"):
        return "".join(json.dumps(row) + "\n" for row in rows)
    out = [f"{'SITE':<24} {'HOUR':>11} {'DAY':>11} {'RCPT/HOUR':>13} {'RCPT/MSG':>8}  STATE"]
    starred = False
    for row in rows:
        lim, use, over = row["limits"], row["usage"], row["overridden"]
        starred = starred or bool(over)

        def limit(key: str, width: int, lim: dict[str, Any] = lim,
                  over: list[str] = over) -> str:
            return f"{_fmt_limit(lim[key], key in over):<{width}}"

        out.append(
            f"{row['site']!s:<24} {use['per_hour']:>5}/{limit('per_hour', 5)} "
            f"{use['per_day']:>5}/{limit('per_day', 5)} "
            f"{use['recipients_per_hour']:>6}/{limit('recipients_per_hour', 6)} "
            f"{limit('recipients_per_message', 0):>8}  "
            f"{'suspended: ' + str(row['suspended']) if row['suspended'] else 'active'}")
        if "nodes" in row:
            by_node = _nodes_text(row["nodes"].get(row["site"], {}))
            out.append(f"{'':<24} last hour by node: {by_node}")
        if "usage_at_relays" in row:
            relayed = row["usage_at_relays"]
            out.append(f"{'':<24} at the relays (policy service; shim and direct mail): "
                       f"{relayed['per_hour']} in the last hour, {relayed['per_day']} in the "
                       f"last day, {relayed['recipients_per_hour']} recipients in the last hour")
    if starred:
        out.append("* set by 'quota set' (kept in the state); 'quota set SITE --clear' goes "
                   "back to the configuration file")
    return "\n".join(out) + "\n"


def quota_set(config: Config, state: State, args: Args, actor: str) -> str:
    site = site_named(config, _required(args, "site"))
    wanted = [(key, _limit(key, value)) for key in QUOTA_KEYS for value in args.get(key, [])]
    if args.get("clear"):
        state.clear_overrides(site.name)
    for key, limit in wanted:
        state.set_override(site.name, key, limit)
    limits = quota.describe(quota.effective_quota(config, state, site))
    log.warning("quota_set site=%s actor=%s limits=%s", site.name, actor, limits)
    return f"site {site.name}: " + ", ".join(f"{k}={_fmt_limit(v)}" for k, v in limits.items()) \
        + "\n"


def quota_reset(config: Config, state: State, args: Args, actor: str) -> str:
    site = site_named(config, _required(args, "site"))
    removed = state.reset_usage(site.name)
    log.warning("quota_reset site=%s actor=%s events=%d", site.name, actor, removed)
    return f"site {site.name}: usage reset ({removed} events forgotten)\n"


def site_list(config: Config, state: State, args: Args) -> str:
    rows: list[dict[str, Any]] = []
    nodes = _by_node(state, time.time()) if state.shared else None
    for site in config.sites.values():
        suspended = state.suspension(site.name)
        rows.append({"site": site.name, "uids": list(site.uids), "domains": list(site.domains),
                     "login": site.relay_login.user if site.relay_login else None,
                     "suspended": suspended[1] if suspended else None})
        if nodes is not None:
            rows[-1]["nodes"] = nodes.get(site.name, {})
    if args.get("json"):
        return "".join(json.dumps(r) + "\n" for r in rows)
    out = [f"{'SITE':<24} {'UIDS':<12} {'LOGIN':<20} STATE"
           + ("  (LAST HOUR BY NODE)" if nodes is not None else "")]
    for r in rows:
        uids = ",".join(map(str, r["uids"]))
        state_text = f"suspended: {r['suspended']}" if r["suspended"] else "active"
        out.append(f"{r['site']!s:<24} {uids:<12} {r['login'] or '-'!s:<20} {state_text}"
                   + (f"  ({_nodes_text(r['nodes'])})" if "nodes" in r else ""))
    return "\n".join(out) + "\n"


def site_show(config: Config, state: State, args: Args) -> str:
    site = site_named(config, _required(args, "site"))
    suspended = state.suspension(site.name)
    queued = {s: len(select(config, [], site.name, (s,))) for s in spool.STATES}
    lines = [
        f"site:       {site.name}",
        f"uids:       {', '.join(map(str, site.uids)) or '-'}",
        f"domains:    {', '.join(site.domains) or '-'}",
        f"docroots:   {', '.join(site.docroots) or '-'}",
        f"sender:     {site.sender or '-'}",
        f"relay login: {site.relay_login.user if site.relay_login else '-'}",
        f"policy:     envelope {site.envelope_policy}, From: {site.from_policy}",
        "state:      " + (f"suspended since {mail_date(suspended[0])} by {suspended[2]}: "
                          f"{suspended[1]}" if suspended else "active"),
        "queue:      " + ", ".join(f"{k} {v}" for k, v in queued.items()),
    ]
    return "\n".join(lines) + "\n" + quota_show(config, state, {"site": [site.name]})


def top(config: Config, state: State, args: Args) -> str:
    now = time.time()
    out = []
    for label, window in (("last hour", quota.HOUR), ("last day", quota.DAY)):
        out.append(f"-- {label}: messages, recipients, site, script")
        for site, script, count, rcpts in state.top(window, now, by_script=True)[:20]:
            out.append(f"{count:8d} {rcpts:8d}  {site:<24} {script or '-'}")
    if state.shared:
        out.append("-- last hour by node: messages, recipients, site, node")
        rows = [(use["messages"], use["recipients"], site, node)
                for site, nodes in _by_node(state, now).items() for node, use in nodes.items()]
        for count, rcpts, site, node in sorted(rows, key=lambda r: (-r[0], r[2], r[3]))[:40]:
            out.append(f"{count:8d} {rcpts:8d}  {site:<24} {node}")
    return "\n".join(out) + "\n"


def queue_list(config: Config, state: State, args: Args) -> Iterator[str]:
    """The queue (``--site``: one site's), made entry by entry as it is sent or printed."""
    site = _first(args, "site")
    entries = (e for e in spool.entries(config.layout)
               if site is None or e.envelope.site == site)
    if not args.get("json"):
        return listing.queue_text(entries)
    now = time.time()
    return (json.dumps({
        "queue_id": e.envelope.queue_id, "state": e.state, "site": e.envelope.site,
        "uid": e.envelope.uid, "size": e.envelope.size,
        "age": round(now - e.envelope.arrival, 1), "sender": e.envelope.sender,
        "recipients": e.envelope.recipients, "done": e.status.done,
        "failed": e.status.failed, "attempts": e.status.attempts,
        "last_error": e.status.last_error, "script": e.envelope.script,
        "score": e.status.score, "scanned": e.status.scanned,
    }) + "\n" for e in entries)


def queue_show(config: Config, state: State, args: Args) -> str:
    [(where, queue_id)] = select(config, [_required(args, "id")], None, spool.STATES)
    try:
        envelope, message = spool.read_entry(config.layout, where, queue_id)
    except (OSError, ValueError) as exc:
        raise OperationError(f"message {queue_id} ({where}) cannot be read: {exc}") from None
    status = spool.read_status(config.layout, queue_id)
    head = message.split(b"\n\n", 1)[0].decode("utf-8", "replace")
    pool, why = relays.choose_pool(config, envelope.site, status.score,
                                   relays.unscored_pool(config))
    through = "held for the operator (hold-only pool)" if relays.is_hold(config, pool) else \
        ", ".join(r.ident for r in relays.active_relays(config, state.relay_marks(), pool)) \
        or "no active relay: it waits"
    return (f"queue id:   {queue_id} ({where})\nsite:       {printable(envelope.site)} (uid "
            f"{envelope.uid}, script {printable(envelope.script or '-')})\n"
            f"pool:       {pool} ({why}); relays: {through}\n"
            f"sender:     <{printable(envelope.sender)}>\n"
            f"recipients: {printable(', '.join(envelope.recipients), 2000)}\n"
            f"delivered:  {printable(', '.join(status.done), 2000) or '-'}\n"
            f"attempts:   {status.attempts}\n"
            f"last error: {printable(status.last_error) or '-'}\n"
            f"content:    {listing.score_text(status) or 'not scanned'}\n\n{head}\n")


def _answered(answers: relays.Answers) -> str:
    if not answers.when:
        return "-"
    return f"{answers.last[:60]} ({mail_date(answers.when)})"


def relay_list(config: Config, state: State, args: Args,
               stats: relays.RelayStats | None) -> str:
    """Each relay: name, pool, standby, state, last answer and counts."""
    marks = state.relay_marks()
    rows: list[dict[str, Any]] = []
    for relay in config.relays:
        mark = marks.get(relay.ident)
        answers = stats.of(relay) if stats is not None else None
        rows.append({
            "relay": relay.ident, "address": relay.label, "pool": relay.pool,
            "standby": relay.standby, "state": relays.relay_state(config, marks, relay),
            "burned": None if mark is None else {"since": mark[0], "reason": mark[1],
                                                 "by": mark[2]},
            "last_answer": None if answers is None or not answers.when else
            {"text": answers.last, "when": answers.when},
            "delivered": None if answers is None else answers.delivered,
            "deferred": None if answers is None else answers.deferred,
            "refused": None if answers is None else answers.refused})
    if args.get("json"):
        return "".join(json.dumps(row) + "\n" for row in rows)
    out = []
    if stats is None:
        out.append("no daemon is running: the states come from the state database; last "
                   "answers and counts are kept by the running daemon only")
    else:
        out.append(f"answers counted since the daemon started ({mail_date(stats.started)})")
    out.append(f"{'RELAY':<22} {'POOL':<12} {'STANDBY':<7} {'DELIV':>6} {'DEFER':>6} "
               f"{'REFUS':>6}  STATE / LAST ANSWER")
    for relay, row in zip(config.relays, rows, strict=True):
        mark = marks.get(relay.ident)
        state_text = row["state"] if mark is None else \
            f"burned since {mail_date(mark[0])} by {mark[2]} for {mark[1]}"
        counts = ("-", "-", "-") if stats is None else (
            row["delivered"], row["deferred"], row["refused"])
        out.append(f"{relay.ident:<22} {relay.pool:<12} {'yes' if relay.standby else 'no':<7} "
                   f"{counts[0]:>6} {counts[1]:>6} {counts[2]:>6}  {state_text}")
        if stats is not None:
            out.append(f"{'':<22} {relay.label}, last answer: {_answered(stats.of(relay))}")
    if not config.relays:
        out.append("no relays configured (relays: in the configuration)")
    return "\n".join(out) + "\n"


def relay_check(config: Config, state: State, args: Args) -> str:
    """``relay check [NAME]``: what each zone says of each relay's public_ip, now."""
    return reputation.check_text(config, state, _first(args, "relay"))


def perform(config: Config, state: State, action: str, args: Args,
            actor: str, stats: relays.RelayStats | None = None) -> str | Iterator[str]:
    """Run one action; the operator's text.  Raises OperationError.

    ``stats``: the running daemon's relay answers (``relay-list``); None when the
    admin command acts without a daemon.

    ``queue-list`` returns its text as pieces made while they are read (a
    listing of the whole queue is never held in memory): the caller sends or
    prints each piece.
    """
    for key, values in args.items():
        for value in values:
            if not value.isprintable() or len(value) > 4096:
                raise OperationError(f"argument {key}: {value[:40]!r} is not printable text "
                                     "(or longer than 4096 characters)")
    site = _first(args, "site")
    ids = args.get("id", [])
    if action in ("queue-hold", "queue-release", "queue-delete") and not ids and not site:
        raise OperationError("name queue ids or --site SITE")
    if action == "queue-hold":
        return f"{hold_messages(config, ids, site, actor)} message(s) held\n"
    if action == "queue-release":
        return f"{release_messages(config, ids, site, actor)} message(s) released\n"
    if action == "queue-delete":
        return f"{delete_messages(config, ids, site, actor)} message(s) deleted\n"
    if action == "site-suspend":
        reason = (args.get("reason") or ["suspended by the operator"])[0]
        return suspend_site(config, state, _required(args, "site"), reason, actor) + "\n"
    if action == "site-resume":
        return resume_site(config, state, _required(args, "site"), actor) + "\n"
    if action == "relay-burn":
        reason = (args.get("reason") or ["burned by the operator"])[0]
        return relays.burn(config, state, _required(args, "relay"), reason, actor) + "\n"
    if action == "relay-restore":
        return relays.restore(config, state, _required(args, "relay"), actor) + "\n"
    if action == "relay-list":
        return relay_list(config, state, args, stats)
    readers: dict[str, Callable[[Config, State, Args], str | Iterator[str]]] = {
        "site-list": site_list, "site-show": site_show, "quota-show": quota_show,
        "top": top, "queue-list": queue_list, "queue-show": queue_show,
        "relay-check": relay_check}
    if action in readers:
        return readers[action](config, state, args)
    if action == "quota-set":
        return quota_set(config, state, args, actor)
    if action == "quota-reset":
        return quota_reset(config, state, args, actor)
    raise OperationError(f"unknown action {action!r}")
