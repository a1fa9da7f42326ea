"""The relay's answer to one policy request: the site of the login, its state, its limits.

Trusts: Postfix's attributes (``sasl_username`` is what the relay's SASL
checked; a client cannot choose it without the password), the configuration
(``sites``: each site's ``relay_login.user``) and the state.
Guarantees:
- a login maps to the one site whose ``relay_login.user`` it is, compared as
  the relay's SASL backend compares it (:func:`login_key`: without case,
  ``user@realm`` too when the realm is ``policy_service.login_realm``, as Cyrus
  SASL reports it, never any other realm; a login with white space is no
  site's), so no spelling of a site's login escapes its limits; an empty
  ``sasl_username`` (unauthenticated client) gets ``policy_service.unauthenticated``,
  a login of no site (or of several) ``policy_service.unknown_login``
  (defer by default: fail closed, a login the relay accepted but this
  service does not know is a misconfiguration or an attack);
- suspension is checked at every stage and answered with
  ``policy_service.suspended``; a rule of our own never bounces the shim's queued
  mail, since defer (the default) keeps it queued at the sender;
- RCPT: the message's distinct recipients so far (tied by ``instance``) against
  ``recipients_per_message`` (REJECT 5.7.1: retrying cannot help);
- END-OF-MESSAGE: ``recipient_count`` against ``recipients_per_message``, then
  messages in the last hour and day (``per_hour``, ``per_day``) and recipients
  in the last hour (``recipients_per_hour``) against the site's limits with its
  ``quota set`` overrides: checked and counted in ONE step (``State.reserve``: an
  SQLite transaction, or one Lua script on the shared Redis), so two
  relays (or two connections) cannot both pass the last free slot; a rate limit
  is DEFER_IF_PERMIT 4.7.1 (the sender keeps the message and retries);
- each message is counted once: at END-OF-MESSAGE only, once per ``instance``
  (a second END-OF-MESSAGE request of the same instance gets the first answer
  and counts nothing);
- every refusal's text names the site, the rule with its numbers and limit, and
  what the site or operator can do; it holds no password and no attribute the
  client did not send itself.

Decisions (docs/cluster.md):
- Counting: the relay counts in its own kind, :data:`RELAY_ACCEPTED` (messages,
  with their recipients as ``n``), compared against the same limits as the
  shim's ``accepted``.  Mail that went through a shim is counted once in each
  counter, never twice in one; the relay's counter sees all of the site's mail,
  shim and direct, so it is the fleet-wide bound while each shim's counter
  bounds its own node (or, with shared state, all nodes).
- Accounts (``accounts:`` quotas per Unix uid) are not enforced here: a relay
  login is a site, not a uid.
- Outbreak rules at the relay: only ``recipient_domains_per_hour`` has data here
  (the recipients of each message; the distinct-domain set is shared with the
  shim and idempotent, so mail through the shim is not counted twice).  When it
  trips, the site is suspended in the state (fleet-wide once the state is
  shared) and the message that tripped it is refused.  ``quota_refusals`` is not
  applied here: a relay deferral is retried by every well-behaved sender (the
  shim's whole queue of the site), so counting them would suspend a site whose
  queue merely waits for its window; ``new_script`` and ``relay_5xx_share`` need
  data the relay does not see (the script, the downstream answers).
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from sendmail_shim.config import Config, Site
from sendmail_shim.policy import outbreak, quota
from sendmail_shim.store.headers import mail_date
from sendmail_shim.store.state import RELAY_ACCEPTED, State
from sendmail_shim.store.state import Limit as StateLimit

log = logging.getLogger(__name__)

HOUR, DAY = 3600.0, 86400.0
MAX_MESSAGES = 50_000  # messages in progress remembered (oldest forgotten first)
MESSAGE_TTL = 3600.0  # a message with no END-OF-MESSAGE within this long is forgotten
MAX_ANSWERS = 10_000  # END-OF-MESSAGE answers remembered (a repeat comes at once)
MAX_RECIPIENTS_KEPT = 2_000  # distinct recipients remembered per message
# ... and over all messages in progress: a site with its relay login can open many
# transactions of up to smtpd_recipient_limit recipients and never send DATA; without
# this bound 50,000 of them would hold gigabytes.  The oldest messages are forgotten
# first (their END-OF-MESSAGE is still held to recipients_per_message by recipient_count).
MAX_RECIPIENTS_TOTAL = 200_000
DUNNO = "DUNNO"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
END_OF_MESSAGE = "END-OF-MESSAGE"


def action(choice: str, text: str) -> str:
    """The Postfix action of a configured choice (dunno, defer, reject, hold).

    The text is made one line (an operator's reason may hold a newline).
    """
    text = _CONTROL.sub(" ", text)
    if choice == "dunno":
        return DUNNO
    if choice == "hold":
        return f"HOLD {text}"
    if choice == "reject":
        return f"REJECT 5.7.1 {text}"
    return f"DEFER_IF_PERMIT 4.7.1 {text}"


_SPACE = re.compile(r"[\s\x00-\x1f\x7f]")


def login_key(login: str, realm: str | None) -> str | None:
    """A SASL login as compared with ``relay_login.user``: None when it cannot be one.

    As the most lenient SASL backend compares it, so no spelling a relay lets in
    escapes the site's limits: case does not matter (Dovecot lowercases user
    names by default, ``auth_username_format = %Lu``; a Cyrus sasldb compares
    user and realm with case, so there other spellings fail AUTH anyway);
    ``user@REALM`` is ``user`` when REALM is ``login_realm`` (compared without
    case, as DNS names are); any other realm is kept, so it matches only
    a relay_login that names it.  White space or a control character anywhere
    (`` site2``) is no login of ours: never trimmed into one, so unknown.
    """
    if not login or _SPACE.search(login):
        return None
    key = login.lower()
    if realm and key.endswith("@" + realm.lower()):
        key = key[:-len(realm) - 1]
    return key or None


def _shown(value: str) -> str:
    """A client-given value quoted in a reply or log: short, one line."""
    return repr(value[:64])


@dataclass
class Message:
    """One message in progress at the relay (its requests share ``instance``)."""

    site: str
    started: float
    recipients: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Limit:
    """One limit of the relay: the quota key, what it counts, its window."""

    key: str
    counts: str  # "messages" or "recipients"
    window: float
    label: str  # "in the last hour"
    option: str  # the quota set option that changes it


RATE_LIMITS = (
    Limit("per_hour", "messages", HOUR, "in the last hour", "--per-hour"),
    Limit("per_day", "messages", DAY, "in the last day", "--per-day"),
    Limit("recipients_per_hour", "recipients", HOUR, "in the last hour",
          "--recipients-per-hour"),
)


class Decider:
    """Answers requests; holds the messages in progress (memory, bounded)."""

    def __init__(self, config: Config, state: State) -> None:
        self.config = config
        self.state = state
        self.settings = config.policy_service
        # Messages between their first request and END-OF-MESSAGE, then only their answer:
        # few objects for the garbage collector to walk, however busy the relay.
        self.messages: OrderedDict[str, Message] = OrderedDict()
        self.answered: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.kept_recipients = 0  # over self.messages (bounded by MAX_RECIPIENTS_TOTAL)
        self.logins: dict[str, Site] = {}
        shared: set[str] = set()
        sites = list(config.sites.values())
        if config.default_site is not None:
            sites.append(config.default_site)
        for site in sites:
            if site.relay_login is None:
                continue
            user = login_key(site.relay_login.user, None)
            if user is None:
                log.error("policy_login_unusable site=%s: its relay_login.user is empty or "
                          "holds white space; it is answered as an unknown login", site.name)
                continue
            if user in self.logins:
                shared.add(user)
            self.logins[user] = site
        for user in sorted(shared):
            del self.logins[user]
            log.error("policy_login_shared login=%s: several sites use this relay login; "
                      "it is answered as an unknown login until each site has its own", user)

    # -- one request -----------------------------------------------------------
    def decide(self, attrs: dict[str, str], now: float | None = None) -> str:
        now = time.time() if now is None else now
        login = attrs.get("sasl_username", "")
        stage = attrs.get("protocol_state", "").upper()
        if not login:
            return self._other("unauthenticated", self.settings.unauthenticated,
                               "this relay's policy requires SMTP AUTH with the site's "
                               "relay login", attrs)
        key = login_key(login, self.settings.login_realm)
        site = None if key is None else self.logins.get(key)
        if site is None:
            return self._other("unknown_login", self.settings.unknown_login,
                               f"relay login {_shown(login)} belongs to no site of this "
                               "relay's policy service; ask the operator", attrs)
        suspended = self.state.suspension(site.name)
        if suspended is not None:
            self._forget(attrs)
            since, reason, _actor = suspended
            text = (f"site {site.name} is suspended since {mail_date(since)} ({reason}); its "
                    "mail is not relayed: the site's owner should ask the operator "
                    f"(sendmail-shim-admin site show {site.name}, then site resume)")
            return self._refuse(site, "suspended", action(self.settings.suspended, text),
                                attrs)
        if stage == "RCPT":
            return self._rcpt(site, attrs, now)
        if stage == END_OF_MESSAGE:
            return self._end_of_message(site, attrs, now)
        return DUNNO

    def _other(self, rule: str, choice: str, text: str, attrs: dict[str, str]) -> str:
        answer = action(choice, text)
        if answer != DUNNO:
            log.warning("policy_refused rule=%s login=%s client=%s stage=%s action=%r", rule,
                        _shown(attrs.get("sasl_username", "")),
                        _shown(attrs.get("client_address", "")),
                        attrs.get("protocol_state", "")[:20], answer.split(" ", 1)[0])
        return answer

    def _refuse(self, site: Site, rule: str, answer: str, attrs: dict[str, str]) -> str:
        log.warning("policy_refused site=%s rule=%s client=%s stage=%s instance=%s "
                    "action=%s", site.name, rule, _shown(attrs.get("client_address", "")),
                    attrs.get("protocol_state", "")[:20], _shown(attrs.get("instance", "")),
                    answer.split(" ", 1)[0])
        return answer

    # -- messages in progress ------------------------------------------------
    def _message(self, site: Site, attrs: dict[str, str], now: float) -> Message:
        instance = attrs.get("instance", "")
        message = self.messages.get(instance)
        if message is None or message.site != site.name:
            message = Message(site.name, now)
            if not instance:  # nothing ties it to other requests: counted on its own
                return message
            self._drop(instance)  # another site's message of that instance
            self.messages[instance] = message
            while self.messages and (len(self.messages) > MAX_MESSAGES or next(
                    iter(self.messages.values())).started < now - MESSAGE_TTL):
                self._drop(next(iter(self.messages)))
        return message

    def _drop(self, instance: str) -> None:
        """Forget a message in progress (and what it kept)."""
        message = self.messages.pop(instance, None)
        if message is not None:
            self.kept_recipients -= len(message.recipients)

    def _forget(self, attrs: dict[str, str]) -> None:
        self._drop(attrs.get("instance", ""))

    def _rcpt(self, site: Site, attrs: dict[str, str], now: float) -> str:
        message = self._message(site, attrs, now)
        recipient = attrs.get("recipient", "").lower()
        if (recipient and len(message.recipients) < MAX_RECIPIENTS_KEPT
                and recipient not in message.recipients):
            message.recipients.add(recipient)
            if self.messages.get(attrs.get("instance", "")) is message:
                self.kept_recipients += 1
                while self.kept_recipients > MAX_RECIPIENTS_TOTAL:  # the oldest go first
                    self._drop(next(iter(self.messages)))
        limits = quota.effective_quota(self.config, self.state, site)
        if (limits.recipients_per_message is not None
                and len(message.recipients) > limits.recipients_per_message):
            if recipient in message.recipients:  # refused: not one of the message's
                message.recipients.discard(recipient)
                if self.messages.get(attrs.get("instance", "")) is message:
                    self.kept_recipients -= 1
            return self._refuse(site, "recipients_per_message", action("reject", (
                f"site {site.name}: more than recipients_per_message "
                f"{limits.recipients_per_message} recipients in one message (counts "
                f"recipients); send it as several messages of at most "
                f"{limits.recipients_per_message}")), attrs)
        return DUNNO

    def _end_of_message(self, site: Site, attrs: dict[str, str], now: float) -> str:
        instance = attrs.get("instance", "")
        done = self.answered.get(instance)
        if done is not None and done[0] == site.name:
            return done[1]  # counted once per message
        message = self._message(site, attrs, now)
        try:
            count = int(attrs.get("recipient_count", "0"))
        except ValueError:
            count = 0
        if count <= 0:  # Postfix always sends it here; without it, what RCPT saw
            count = max(1, len(message.recipients))
        answer = self._count(site, message, count, attrs, now)
        if instance:
            self._drop(instance)
            self.answered[instance] = (site.name, answer)
            if len(self.answered) > MAX_ANSWERS:
                self.answered.popitem(last=False)
        return answer

    def _count(self, site: Site, message: Message, nrcpt: int, attrs: dict[str, str],
               now: float) -> str:
        """Check every limit and reserve the message in one transaction."""
        limits = quota.effective_quota(self.config, self.state, site)
        if limits.recipients_per_message is not None and nrcpt > limits.recipients_per_message:
            return self._refuse(site, "recipients_per_message", action("reject", (
                f"site {site.name}: {nrcpt} recipients in one message exceed "
                f"recipients_per_message {limits.recipients_per_message} (counts recipients); "
                f"send it as several messages")), attrs)
        rates = [(limit, allowed) for limit in RATE_LIMITS
                 if (allowed := getattr(limits, limit.key)) is not None]
        # Check and count in one step (State.reserve: one SQLite transaction, or one Lua
        # script with Redis), so two relays sharing the state cannot both pass the last slot.
        reservation, used = self.state.reserve(
            site.name, -1, RELAY_ACCEPTED, nrcpt, None, now,
            [StateLimit("site", limit.window, allowed, total=limit.counts == "recipients")
             for limit, allowed in rates])
        if reservation is None:
            for (limit, allowed), value in zip(rates, used, strict=True):
                adding = 1 if limit.counts == "messages" else nrcpt
                if value + adding > allowed:
                    return self._refuse(site, limit.key, action("defer", (
                        f"site {site.name}: {value} {limit.counts} {limit.label} at this "
                        f"relay (shim and direct mail) + {adding} would exceed {limit.key} "
                        f"{allowed} (counts {limit.counts}); retry later, or the operator "
                        f"raises it: sendmail-shim-admin quota set {site.name} "
                        f"{limit.option} N")), attrs)
        domains = {r.rpartition("@")[2] for r in message.recipients if "@" in r}
        if attrs.get("recipient"):
            domains.add(attrs["recipient"].lower().rpartition("@")[2])
        reason = None
        if domains and site.outbreak is not None:
            self.state.record_domains(site.name, domains, now)
            reason = outbreak.after_accept(self.state, site, None, now)
        if reason is not None and reservation is not None:
            self.state.forget(reservation)  # refused: the message does not stay counted
        if reason is not None:
            self.state.suspend(site.name, reason, "policy service (outbreak rule)")
            log.warning("suspended site=%s actor=policy_service reason=%r", site.name, reason)
            return self._refuse(site, "outbreak", action(self.settings.suspended, (
                f"site {site.name} is now suspended: {reason}; the operator decides "
                f"(sendmail-shim-admin site show {site.name})")), attrs)
        return DUNNO
