"""Per-site and per-account quotas over sliding windows of bucketed counters.

Trusts: the state (daemon-owned) and the configuration; the operator's
``quota set`` overrides live in the state and win over the file.
Guarantees: a submission is checked against messages per hour and per day and
recipients per message and per hour, for its site and for its Unix account
(uid), and the accepted event is reserved inside the same transaction as the
check, so concurrent submissions cannot slip past a limit together.  The
windows are the state's buckets: "the last hour" is the current minute and the
previous 59, "the last day" the current hour and the previous 23; a check reads
at most 84 bucket rows per site or account, however much it sent.
:func:`reserve_quota` checks and counts in one step of the state
(:meth:`State.reserve`): one SQLite transaction, or one Lua script in the
Redis that the nodes of a fleet share, so two nodes cannot both take the last
message of a site's hour.

Exit status: a quota refusal exits 77 (EX_NOPERM), not 75: PHP 8.5's mail()
returns true for 75, and a site over its quota must see false.  In ``-bs``
mode a rate limit is ``452 4.7.1`` (try later) and a message with too many
recipients ``550 5.5.3``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sendmail_shim.config import QUOTA_KEYS, Config, Quota, Site
from sendmail_shim.store.outcome import Verdict
from sendmail_shim.store.state import ACCEPTED, Limit, Reservation, State
from sendmail_shim.wire import sysexits

HOUR, DAY = 3600.0, 86400.0


def effective_quota(config: Config, state: State, site: Site) -> Quota:
    return site.quota.merged(state.overrides(site.name))


@dataclass(frozen=True)
class Usage:
    messages_hour: int
    messages_day: int
    recipients_hour: int

    def as_dict(self) -> dict[str, int]:
        return {"per_hour": self.messages_hour, "per_day": self.messages_day,
                "recipients_per_hour": self.recipients_hour}


def usage(state: State, now: float, site: str | None = None, uid: int | None = None,
          kind: str = ACCEPTED) -> Usage:
    """What counts against the limits: accepted here (``kind`` ACCEPTED), or counted
    at the relays by the policy service (RELAY_ACCEPTED)."""
    hour_count, hour_rcpts = state.count(kind, HOUR, now, site=site, uid=uid)
    day_count, _ = state.count(kind, DAY, now, site=site, uid=uid)
    return Usage(hour_count, day_count, hour_rcpts)


def _over(limits: Quota, used: Usage, nrcpt: int) -> str | None:
    if limits.recipients_per_message is not None and nrcpt > limits.recipients_per_message:
        return f"{nrcpt} recipients exceed recipients_per_message {limits.recipients_per_message}"
    if limits.per_hour is not None and used.messages_hour + 1 > limits.per_hour:
        return f"{used.messages_hour} messages in the last hour reach per_hour {limits.per_hour}"
    if limits.per_day is not None and used.messages_day + 1 > limits.per_day:
        return f"{used.messages_day} messages in the last day reach per_day {limits.per_day}"
    if (limits.recipients_per_hour is not None
            and used.recipients_hour + nrcpt > limits.recipients_per_hour):
        return (f"{used.recipients_hour} + {nrcpt} recipients in the last hour exceed "
                f"recipients_per_hour {limits.recipients_per_hour}")
    return None


def check_quota(config: Config, state: State, site: Site, uid: int, nrcpt: int,
                now: float) -> Verdict | None:
    """A refusal when the message would exceed a limit (call inside a transaction)."""
    problem = _over(effective_quota(config, state, site), usage(state, now, site=site.name),
                    nrcpt)
    who = f"site {site.name}"
    if problem is None and uid in config.accounts:
        problem = _over(config.accounts[uid], usage(state, now, uid=uid), nrcpt)
        who = f"account uid {uid}"
    if problem is None:
        return None
    return _refusal(site, who, problem, nrcpt)


def _limits(scope: str, limits: Quota) -> list[Limit]:
    """The windowed limits of a quota, in the order of :class:`Usage`'s fields."""
    return [Limit(scope, HOUR, limits.per_hour), Limit(scope, DAY, limits.per_day),
            Limit(scope, HOUR, limits.recipients_per_hour, total=True)]


def reserve_quota(config: Config, state: State, site: Site, uid: int, nrcpt: int,
                  script: str | None, now: float) -> tuple[Verdict | None, Reservation | None]:
    """Check the message against every quota and count it, atomically: (refusal, reservation).

    Exactly one of the two is None; a refused message is not counted as accepted.
    """
    site_limits = effective_quota(config, state, site)
    account = config.accounts.get(uid)
    limits = _limits("site", site_limits) + (_limits("uid", account) if account else [])
    reservation = None
    used = [0] * len(limits)
    too_many = (site_limits.recipients_per_message is not None
                and nrcpt > site_limits.recipients_per_message) or (
        account is not None and account.recipients_per_message is not None
        and nrcpt > account.recipients_per_message)
    if not too_many:
        reservation, used = state.reserve(site.name, uid, ACCEPTED, nrcpt, script, now, limits)
        if reservation is not None:
            return None, reservation
    problem = _over(site_limits, Usage(*used[:3]), nrcpt)
    who = f"site {site.name}"
    if problem is None and account is not None:
        problem = _over(account, Usage(*used[3:6]), nrcpt)
        who = f"account uid {uid}"
    return _refusal(site, who, problem or "the quota was reached meanwhile", nrcpt), None


def _refusal(site: Site, who: str, problem: str, nrcpt: int) -> Verdict:
    text = (f"{who} is over its quota: {problem}; nothing was queued. The operator can "
            f"see it with 'sendmail-shim-admin quota show {site.name}'")
    if problem.startswith(f"{nrcpt} recipients exceed"):
        return Verdict(550, "5.5.3", sysexits.EX_NOPERM, text)
    return Verdict(452, "4.7.1", sysexits.EX_NOPERM, text)


def describe(limits: Quota) -> dict[str, int | None]:
    return {key: getattr(limits, key) for key in QUOTA_KEYS}
