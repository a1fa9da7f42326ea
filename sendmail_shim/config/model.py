"""The configuration model: dataclasses whose fields declare the YAML schema.

Trusts: nothing; this module only declares.  Each field that comes from the
file is declared with :func:`schema.key`: its YAML key, kind (type and
checks), default and a one-line doc.  ``loader.py`` walks these declarations
(and adds the cross-field rules), ``manpage.py`` prints the man page's key
list from them, and the ``*_KEYS`` tuples below are derived from them.
Guarantees: a :class:`Config` built by the loader is complete and consistent;
the attribute names are the interface the whole daemon uses.
"""

# key() returns a dataclasses.field (the schema declaration), not a shared default value.
# ruff: noqa: RUF009

from __future__ import annotations

import functools
import math
import os
import re
import socket
import urllib.parse
from dataclasses import MISSING, dataclass, fields
from functools import cache, cached_property
from typing import Any

from sendmail_shim.config import schema
from sendmail_shim.config.schema import (
    Checked,
    Choice,
    Deferred,
    Domain,
    Duration,
    Flag,
    Fraction,
    GroupName,
    IPAddress,
    IPNetwork,
    Kind,
    ListenAddress,
    Optional,
    Problem,
    Rate,
    Section,
    Strings,
    Text,
    UserName,
    Whole,
    key,
)
from sendmail_shim.wire import paths

TLS_MODES = ("starttls", "implicit", "none")
SENDER_ACTIONS = ("rewrite", "refuse", "keep")
FROM_ACTIONS = ("keep", "rewrite", "refuse")
LOG_TARGETS = ("stderr", "syslog")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
ROUTES = ("local", "remote", "auto")
SCAN_FAILURE = ("defer", "deliver")
SCAN_MODES = ("after_commit", "before_ack")
STATE_BACKENDS = ("sqlite", "redis")
ADMIN_SITE = "_admin"  # the pseudo-site of the operator's notices

_COUNT = Optional(Whole(1))  # a rule's threshold; null disables the rule
_LIMIT = Optional(Whole(0))  # a quota; null is unlimited
_SCORE = Optional(Fraction(lambda x: math.isfinite(x), "a number", "a number"))
DEFAULT_POOL = "default"  # the pool of relays that name none, and of all mail without pools

# The documentation of the small inline mappings (dotted key names: log.target).
GROUP_DOCS = {
    "log": "where the daemon logs, how much and in which form",
    "metrics": "Prometheus metrics of the daemon (off unless listen or textfile is set)",
    "resolver": "the DNS resolver of MX lookups",
    "sender_policy": "what happens to senders outside the site's domains",
    "quota_refusals": "quota refusals within the window trip the rule; without count: off",
    "relay_5xx_share": "that share of the relay's answers were 5xx; without share: off",
    "new_script": "a script first seen within the window sent that many messages; "
                  "without count: off",
    "capture": "redirect site uids' port 25 to the daemon",
    "spam_score": "the site's mean content score (scan:, each score counted from 0 up to 20) "
                  "over the window reached this, once enough messages were scanned; "
                  "without mean: off",
    "state": "where quota windows, suspensions, overrides and outbreak counters live: "
             "this node's SQLite file, or a Redis or Valkey server the nodes share",
}


@dataclass(frozen=True, slots=True)  # one per site: 10,000 sites, no __dict__ each
class RelayLogin:
    """The AUTH login a site (or the operator) uses at the relays."""

    user: str = key(kind=Text(), required=True, doc="the relay's user name")
    password_file: str = key(kind=Text(), required=True,
                             doc="file with the password on its first line; readable by the "
                                 "daemon, not by sites")

    def read_password(self) -> str:
        """The password, read now so that rotating the file needs no restart."""
        with open(self.password_file, encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n")


@dataclass(frozen=True)
class Relay:
    """One smarthost, tried in the order of ``relays`` within its pool."""

    host: str = key(kind=Text(), required=True, doc="name or address")
    port: int = key(kind=Whole(1, 65535),
                    doc="the relay's port; default 587 for starttls, 465 for implicit, 25 for "
                        "none")
    tls: str = key("starttls", kind=Choice(TLS_MODES),
                   doc="how the connection is encrypted; none only to loopback unless "
                       "allow_plaintext")
    verify: bool = key(True, kind=Flag(), doc="check the relay's certificate")
    ca_file: str | None = key(None, kind=Optional(Text()),
                              doc="the certificates to trust instead of the system's")
    timeout: float = key(30.0, kind=Duration(), doc="per command")
    allow_plaintext: bool = key(False, kind=Flag(),
                                doc="permit tls: none to a host that is not loopback")
    sessions: int = key(20, kind=Whole(1, 20),
                        doc="parallel sessions one site may hold to this relay while its "
                            "queue drains (one per 4 messages waiting; as Postfix's 20 per "
                            "destination); lower it if the relay limits connections per login")
    name: str | None = key(None, kind=Optional(Text()),
                           doc="the name relay burn, relay restore and relay list use",
                           default_text="HOST:PORT")
    pool: str = key(DEFAULT_POOL, kind=Text(),
                    doc="the pool this relay serves (declared in pools:, or default)")
    standby: bool = key(False, kind=Flag(),
                        doc="a cold standby: never contacted while its pool has an active "
                            "relay; promoted one for one when a relay of its pool is burned")
    public_ip: str | None = key(None, kind=Optional(IPAddress()),
                                doc="the address receivers see this relay's mail come from "
                                    "(IPv4 or IPv6): the reputation watch looks it up in "
                                    "reputation.zones", default_text="not watched")
    dkim_sign: bool = key(True, kind=Flag(),
                          doc="sign mail sent through this relay with the site's DKIM key "
                              "(false for a relay that signs itself or refuses a second "
                              "DKIM-Signature, as Amazon SES does)")

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ident(self) -> str:
        """The relay's name for the operator and the state: ``name``, else HOST:PORT."""
        return self.name or self.label


@dataclass(frozen=True)
class Pool:
    """A named group of relays: a score band, or hold-only (policy/relays.py)."""

    name: str = key(kind=Text(), required=True, doc="the pool's name; relays name it in pool:")
    min_score: float | None = key(None, kind=_SCORE, doc="the lowest score the band takes",
                                  default_text="no lower bound")
    max_score: float | None = key(None, kind=_SCORE,
                                  doc="the band takes scores below this one",
                                  default_text="no upper bound")
    hold: bool = key(False, kind=Flag(),
                     doc="messages routed here are held for the operator, never sent")
    dkim_sign: bool = key(True, kind=Flag(),
                          doc="sign mail sent through this pool's relays (a relay signs only "
                              "when its pool and its own dkim_sign both say so)")

    def takes(self, score: float) -> bool:
        """True when ``score`` lies in [min_score, max_score)."""
        return ((self.min_score is None or score >= self.min_score)
                and (self.max_score is None or score < self.max_score))


_ZONE_NAME = re.compile(r"^(?=.{1,200}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)+"
                        r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_ZONE_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _secret_file(doc: str) -> Any:
    """A key naming a file that holds a secret (an absolute path; none by default)."""
    return key(None, kind=Optional(schema.absolute_path(), falsy=True), doc=doc,
               default_text="none")


@dataclass(frozen=True)
class Zone:
    """One DNS blocklist the relays' public_ip is looked up in (the reputation watch)."""

    zone: str = key(kind=Checked(lambda t: bool(_ZONE_NAME.match(t.lower().rstrip("."))),
                                 "expected a DNS zone like bl.spamcop.net, got {text!r}",
                                 "a DNS zone name"),
                    required=True, doc="the zone, such as bl.spamcop.net or zen.dq.spamhaus.net")
    access_key: str | None = key(
        None, kind=Optional(Checked(lambda t: bool(_ZONE_WORD.match(t)),
                                    "expected letters and digits, got {text!r}", "an access key")),
        name="key", doc="an access key placed before the zone, as Spamhaus DQS wants: "
                        "<reversed ip>.<key>.zen.dq.spamhaus.net; every site reads this "
                        "configuration file, so prefer key_file", default_text="none")
    key_file: str | None = _secret_file("file with the access key on its first line, instead "
                                        "of key (readable by the daemon, not by sites; read "
                                        "at each look)")
    label: str | None = key(None, kind=Optional(Checked(
        lambda t: bool(_ZONE_WORD.match(t)), "expected letters, digits, '.', '-' or '_', got "
        "{text!r}", "a short name")), doc="the zone's name in logs, notices and metrics",
        default_text="the zone")

    @property
    def name(self) -> str:
        """What logs, notices and metrics call this zone (never the access key)."""
        return self.label or self.zone.lower().rstrip(".")

    @property
    def query_suffix(self) -> str:
        """The name queried under the reversed address (with the key when there is one).

        ``key_file`` is read now (rotating it needs no reload); an unreadable one is an
        OSError, a line that is no key a ValueError (neither names the key).
        """
        zone = self.zone.lower().rstrip(".")
        access_key = self.access_key
        if self.key_file is not None:
            access_key = read_secret(self.key_file)
            if not _ZONE_WORD.match(access_key):
                raise ValueError(f"{self.key_file}: its first line is not an access key "
                                 "(letters and digits)")
        return f"{access_key}.{zone}" if access_key else zone


def read_secret(path: str) -> str:
    """The first line of a secret file (a key, a URL with a key); OSError when unreadable."""
    with open(path, encoding="utf-8") as fh:
        return fh.readline().strip()


def _secure_url(text: str) -> bool:
    """https://, or http:// to a loopback host (a URL that carries a key)."""
    if text.startswith("https://"):
        return True
    host = urllib.parse.urlsplit(text).hostname if text.startswith("http://") else None
    return host is not None and schema.is_loopback(host)


@dataclass(frozen=True)
class Reputation:
    """The reputation watch: the relays' public_ip looked up in DNS blocklists."""

    zones: tuple[Zone, ...] = key(
        (), kind=Section(Zone, "REPUTATION ZONES", many=True,
                         error="expected a list of zones, each {zone: NAME}"),
        doc="the blocklists to look in; without any the watch is off",
        default_text="none")
    interval: float = key(3600.0, kind=Duration(floor=1.0),
                          doc="how often the daemon looks (and once at start); public zones "
                              "limit how often one may ask")
    snds_url: str | None = key(
        None, kind=Optional(Checked(_secure_url, "expected an https:// URL (http:// only to "
                                                 "loopback), got {text!r}", "an https:// URL"),
                            falsy=True),
        doc="Microsoft SNDS automated access: the ipStatus URL with your key "
            "(https://sendersupport.olc.protection.outlook.com/snds/ipStatus.aspx?key=...); "
            "its blocked IPv4 ranges are a second signal, zone snds", default_text="none")
    snds_url_file: str | None = _secret_file("file with the SNDS ipStatus URL (and its key) on "
                                             "its first line, instead of snds_url, which every "
                                             "site can read here")
    auto_burn: bool = key(False, kind=Flag(),
                          doc="true: a new listing also burns the relay (a standby takes "
                              "over); it is never restored by itself: relay restore")

    @property
    def snds(self) -> bool:
        """Whether SNDS is watched (snds_url or snds_url_file)."""
        return bool(self.snds_url or self.snds_url_file)

    def read_snds_url(self) -> str:
        """The SNDS URL, ``snds_url_file`` read now; OSError or ValueError (never the URL)."""
        if self.snds_url_file is None:
            return self.snds_url or ""
        url = read_secret(self.snds_url_file)
        if not _secure_url(url):
            raise ValueError(f"{self.snds_url_file}: its first line is not an https:// URL "
                             "(http:// only to loopback)")
        return url


@dataclass(frozen=True, slots=True)  # one per site: 10,000 sites, no __dict__ each
class Quota:
    """Limits; None means unlimited, 0 means nothing at all."""

    per_hour: int | None = key(None, kind=_LIMIT, doc="messages in an hour",
                               default_text="unlimited")
    per_day: int | None = key(None, kind=_LIMIT, doc="messages in a day",
                              default_text="unlimited")
    recipients_per_message: int | None = key(None, kind=_LIMIT,
                                             doc="recipients of one message",
                                             default_text="unlimited")
    recipients_per_hour: int | None = key(None, kind=_LIMIT, doc="recipients in an hour",
                                          default_text="unlimited")

    def merged(self, overrides: dict[str, int | None]) -> Quota:
        values = {k: getattr(self, k) for k in QUOTA_KEYS}
        values.update({k: v for k, v in overrides.items() if k in QUOTA_KEYS})
        return Quota(**values)


@dataclass(frozen=True, slots=True)  # one per site: 10,000 sites, no __dict__ each
class OutbreakRules:
    """What trips an automatic suspension; None disables a rule."""

    quota_refusals: int | None = key(20, kind=_COUNT, name="quota_refusals.count",
                                     doc="how many quota refusals")
    quota_refusals_window: float = key(600.0, kind=Duration(), name="quota_refusals.window",
                                       doc="within this window")
    recipient_domains_per_hour: int | None = key(
        200, kind=_COUNT, doc="more distinct recipient domains in an hour than this; null: off")
    relay_5xx_share: float | None = key(
        0.5, kind=Optional(Fraction(lambda x: 0 < x <= 1, "0 < share <= 1",
                                    "a number above 0, at most 1")),
        name="relay_5xx_share.share", doc="the share of 5xx answers")
    relay_5xx_min_results: int = key(20, kind=Whole(1), name="relay_5xx_share.min_results",
                                     doc="once there are this many answers")
    relay_5xx_window: float = key(3600.0, kind=Duration(), name="relay_5xx_share.window",
                                  doc="within this window")
    new_script_count: int | None = key(50, kind=_COUNT, name="new_script.count",
                                       doc="how many messages")
    new_script_window: float = key(3600.0, kind=Duration(), name="new_script.window",
                                   doc="within this window")
    spam_score_mean: float | None = key(
        5.0, kind=Optional(Fraction(lambda x: 0 < x <= 20, "0 < mean <= 20",
                                    "a number above 0, at most 20")),
        name="spam_score.mean", doc="the mean score")
    spam_score_min_messages: int = key(10, kind=Whole(1), name="spam_score.min_messages",
                                       doc="once this many messages were scanned")
    spam_score_window: float = key(3600.0, kind=Duration(), name="spam_score.window",
                                   doc="within this window")


@dataclass(frozen=True, slots=True)  # one per site: 10,000 sites, no __dict__ each
class Site:
    """A site: the uids whose mail is its own, its domains, login and limits."""

    name: str
    uids: tuple[int, ...] = key(
        (), kind=Strings(schema.Uid(), text=False,
                         required="expected a non-empty list of uids or user names"),
        required=True, doc="the Unix users (numbers or names) whose mail is this site's; "
                           "required; a uid may belong to several sites")
    docroots: tuple[str, ...] = key(
        (), kind=Strings(normalise=os.path.normpath),
        doc="when a uid owns several sites, the caller's working directory picks the one "
            "whose docroot contains it")
    domains: tuple[str, ...] = key(
        (), kind=Strings(Domain(), normalise=lambda d: d.lower().rstrip(".")),
        doc="the site's mail domains: its envelope senders must be in them or their "
            "subdomains")
    sender: str | None = key(None, kind=Optional(schema.address()),
                             doc="default envelope sender and From",
                             default_text="noreply@ the first domain")
    relay_login: RelayLogin | None = key(None, kind=Optional(Section(RelayLogin, "RELAY LOGIN")),
                                         doc="the site's own login at the relays")
    quota: Quota = key(Quota(), kind=Section(Quota, "QUOTA"),
                       doc="the site's limits", default_text="default_quota")
    envelope_policy: str = key("rewrite", kind=Choice(SENDER_ACTIONS),
                               name="sender_policy.envelope",
                               doc="for an envelope sender outside the site's domains")
    from_policy: str = key("keep", kind=Choice(FROM_ACTIONS), name="sender_policy.from_header",
                           doc="for a From outside the site's domains")
    outbreak: OutbreakRules | None = key(OutbreakRules(),
                                         kind=Section(OutbreakRules, "OUTBREAK", disable=True),
                                         doc="rules for this site over the top-level outbreak "
                                             "rules, or false for none",
                                         default_text="the top-level outbreak")
    dkim_selectors: tuple[str, ...] = key((), kind=Strings(),
                                          doc="selectors that dns check looks up")
    allow_submission: tuple[str, ...] = key(
        (), kind=Strings(), doc="hosts this site's uids may reach on 465 and 587 through the "
                                "firewall")
    pool: str | None = key(None, kind=Optional(Text()),
                           doc="pin the site's mail to this pool, whatever its score",
                           default_text="by score")


@dataclass(frozen=True)
class LocalTransport:
    """Where mail for local domains goes: SMTP or LMTP, TCP on loopback or a Unix socket."""

    protocol: str  # smtp | lmtp
    host: str = "127.0.0.1"
    port: int = 25
    socket_path: str | None = None

    @property
    def label(self) -> str:
        where = self.socket_path or f"{self.host}:{self.port}"
        return f"{self.protocol}:{where}"


_TRANSPORT = re.compile(r"^(smtp|lmtp)://(\[[0-9a-fA-F:]+\]|[^:/\[\]]+):(\d+)/?$")


class Transport(Kind):
    what = "smtp://HOST:PORT, lmtp://HOST:PORT (loopback only) or lmtp:unix:/PATH"

    def read(self, value: Any, where: str, owner: str) -> LocalTransport:
        text = Text().read(value, where, owner)
        if text.startswith(("lmtp:unix:", "smtp:unix:")):
            protocol, _, path = text.split(":", 2)
            if not os.path.isabs(path):
                raise Problem(where, f"expected an absolute socket path, got {path!r}")
            return LocalTransport(protocol, socket_path=path)
        match = _TRANSPORT.match(text)
        if not match:
            raise Problem(where, "expected smtp://HOST:PORT, lmtp://HOST:PORT or "
                                 f"lmtp:unix:/PATH, got {text!r}")
        host = match.group(2).strip("[]")
        if not schema.is_loopback(host):
            raise Problem(where, f"{host} is not a loopback address: local delivery stays on "
                                 "this machine")
        return LocalTransport(match.group(1), host, int(match.group(3)))


@dataclass(frozen=True)
class Firewall:
    """Who may open SMTP connections out, and where captured port-25 traffic goes."""

    daemon_user: str | None = key(None, kind=Optional(UserName(), falsy=True),
                                  doc="the daemon's Unix user, always exempt",
                                  default_text="the spool's owner")
    exempt_users: tuple[str, ...] = key(
        (), kind=Strings(UserName()),
        doc="users that may deliver out themselves, such as postfix")
    capture_port: int | None = key(None, kind=Optional(Whole(1), falsy=True),
                                   name="capture.listen_port",
                                   doc="the daemon's capture port (on 127.0.0.1 and ::1); take "
                                       "one below 1024, which no site can bind",
                                   default_text="no capture")
    log_rate: str = key("10/minute", kind=Rate(), doc="how often refused connections are logged")


@dataclass(frozen=True)
class Dkim:
    """Per-site DKIM signing: where keys live, how they rotate, how DNS is told."""

    keys: str | None = key(None, kind=Optional(schema.absolute_path(), falsy=True),
                           doc="the directory of the private keys and their states (the "
                               "daemon's own, mode 0700)", default_text="SPOOL/dkim")
    ed25519: bool = key(False, kind=Flag(),
                        doc="also make an Ed25519 key for each domain and add its signature "
                            "(RFC 8463) beside the RSA one, never alone")
    rsa_bits: int = key(2048, kind=Whole(2048, 4096), doc="the size of new RSA keys")
    delegate_zone: str | None = key(
        None, kind=Optional(Domain(), falsy=True),
        doc="a zone the operator controls: each site domain CNAMEs two fixed selectors "
            "to names under it once, and rotation needs nothing more from the customer",
        default_text="none: each new selector is published in the site's own zone")
    rotate_every: float | None = key(None, kind=Optional(Duration(floor=86400.0), falsy=True),
                                     doc="make a new pending key when the active one is this "
                                         "old (180d is common)", default_text="never")
    overlap: float = key(7 * 86400.0, kind=Duration(),
                         doc="how long a replaced key stays published (retiring) before it "
                             "is revoked")
    recheck_interval: float = key(3600.0, kind=Duration(floor=10.0),
                                  doc="how often active keys are checked against DNS")
    pending_interval: float = key(300.0, kind=Duration(floor=1.0),
                                  doc="how often pending keys are looked up in DNS")
    host_domain: str | None = key(None, kind=Optional(Domain(), falsy=True),
                                  doc="the host's own domain: bounces and operator notices are "
                                      "signed with its key", default_text="none")
    update_server: str | None = key(
        None, kind=Optional(IPAddress(), falsy=True),
        doc="publish key records by DNS UPDATE (RFC 2136, signed with TSIG) at this primary "
            "server's address (BIND, Knot, PowerDNS); only names under update_zone",
        default_text="none: the operator publishes the records")
    update_port: int = key(53, kind=Whole(1, 65535), doc="the UPDATE server's port")
    update_zone: str | None = key(None, kind=Optional(Domain(), falsy=True),
                                  doc="the zone UPDATE writes into",
                                  default_text="delegate_zone")
    update_key_file: str | None = _secret_file(
        "the TSIG key of the UPDATEs: BIND's key block (tsig-keygen) or one line "
        "ALGORITHM:NAME:SECRET; readable only by root and the daemon's user (0640 "
        "root:<daemon group>, or 0600 the daemon's)")

    @property
    def publish_zone(self) -> str | None:
        """The zone UPDATE writes into when UPDATE is configured (update_zone, else
        delegate_zone), else None."""
        if not self.update_server or not self.update_key_file:
            return None
        zone = self.update_zone or self.delegate_zone
        return zone.lower().rstrip(".") if zone else None


@dataclass(frozen=True)
class Admin:
    """The operator: who is notified, with which relay login, who may use the control socket."""

    notify: tuple[str, ...] = key((), kind=Strings(), doc="addresses told about suspensions")
    sender: str | None = key(None, kind=Optional(Text(), falsy=True),
                             doc="the envelope sender of those notices")
    relay_login: RelayLogin | None = key(
        None, kind=Optional(Section(RelayLogin, "RELAY LOGIN"), falsy=True),
        doc="the login the notices use")
    group: str | None = key(None, kind=Optional(GroupName()),
                            doc="a group that may use the control socket besides root and the "
                                "daemon's user")


@dataclass(frozen=True)
class RetryPolicy:
    """Postfix's minimal_backoff_time, maximal_backoff_time, maximal_queue_lifetime."""

    initial: float = key(300.0, kind=Duration(),
                         doc="the first wait after a temporary failure; it doubles")
    maximum: float = key(4000.0, kind=Duration(), doc="the longest wait")
    lifetime: float = key(5 * 86400.0, kind=Duration(),
                          doc="after this long in the queue the remaining recipients are "
                              "bounced")
    jitter: float = key(0.2, kind=Fraction(lambda x: 0 <= x < 1, "a fraction between 0 and 1",
                                           "a fraction from 0 up to 1"),
                        doc="each wait varies by up to this share")


POLICY_CHOICES = ("dunno", "defer", "reject")
SUSPENDED_CHOICES = ("defer", "hold", "reject")


class PolicyListen(Kind):
    what = "unix:/PATH or inet:HOST:PORT (an IP address; [::1]:PORT for IPv6)"

    def read(self, value: Any, where: str, owner: str) -> str:
        text = Text().read(value, where, owner)
        if text.startswith("unix:"):
            if not os.path.isabs(text[5:]):
                raise Problem(where, f"expected an absolute socket path, got {text[5:]!r}")
            return text
        if text.startswith("inet:"):
            ListenAddress().read(text[5:], where, owner)
            return text
        raise Problem(where, f"expected {self.what}, got {text!r}")


@dataclass(frozen=True)
class PolicyService:
    """The relay's policy service (sendmail-shim-admin policy serve)."""

    listen: str = key("inet:127.0.0.1:10031", kind=PolicyListen(),
                      doc="where Postfix's check_policy_service connects; a Unix socket is "
                          "made mode 0660 (add postfix to the service's group)")
    unknown_login: str = key("defer", kind=Choice(POLICY_CHOICES),
                             doc="for a SASL login that is no site's relay_login (or several "
                                 "sites'): defer (fail closed: the sender keeps the mail "
                                 "until the operator adds the login), reject, or dunno "
                                 "(leave it to Postfix's other rules)")
    login_realm: str | None = key(
        None, kind=Optional(Text(), falsy=True),
        doc="the SASL realm the relay appends (Cyrus reports user@realm, the realm being "
            "smtpd_sasl_local_domain): sasl_username user@this realm (the realm compared "
            "without case) is relay_login user; logins are compared without case",
        default_text="none: sasl_username must be relay_login.user, without case")
    unauthenticated: str = key("dunno", kind=Choice(POLICY_CHOICES),
                               doc="for a client without SASL login (empty sasl_username)")
    suspended: str = key("defer", kind=Choice(SUSPENDED_CHOICES),
                         doc="for a suspended site's mail: defer keeps it queued at the "
                             "sender, hold accepts it into the relay's hold queue, reject "
                             "bounces it")
    idle_timeout: float = key(330.0, kind=Duration(floor=1.0),
                              doc="close a connection idle this long (Postfix closes its own "
                                  "after smtpd_policy_service_max_idle, 300s)")
    max_connections: int = key(1000, kind=Whole(1),
                               doc="connections served at once; more are accepted and wait "
                                   "for a free slot (and are closed after idle_timeout)")
    connections_per_peer: int = key(
        500, kind=Whole(1),
        doc="connections of one client (a local uid, or a remote address) open at once; "
            "beyond that it is closed at once, so one client cannot take every slot; keep "
            "it above the relay's smtpd process limit (all its smtpd run as postfix)")
    allow_users: tuple[str, ...] = key(
        ("root", "postfix"), kind=Strings(),
        doc="local users whose TCP connections are answered (the service's own user "
            "always; a name that does not exist is skipped): a site uid's are closed "
            "unanswered, and firewall render drops them")
    allow_networks: tuple[str, ...] = key(
        (), kind=Strings(IPNetwork()),
        doc="remote client addresses answered over TCP: the relay host(s), such as "
            "192.0.2.25/32", default_text="none: local users only")
    socket_group: str | None = key(
        None, kind=Optional(GroupName(), falsy=True),
        doc="the group of a unix: socket (mode 0660): postfix's group, so that only "
            "Postfix and the service's user connect", default_text="the service's group")


@dataclass(frozen=True)
class Scan:
    """Content scoring with SpamAssassin's spamd, after the durable commit (delivery/scan.py)."""

    enabled: bool = key(False, kind=Flag(),
                        doc="score each message with spamd before its first delivery attempt")
    host: str = key("127.0.0.1", kind=Text(), doc="spamd's address (spamc -d)")
    port: int = key(783, kind=Whole(1, 65535), doc="spamd's port (spamc -p)")
    socket: str | None = key(None, kind=Optional(schema.absolute_path(), falsy=True),
                             doc="spamd's Unix socket instead of host and port (spamc -U)",
                             default_text="none")
    spamc: str = key("/usr/bin/spamc", kind=schema.absolute_path(),
                     doc="the spamc program (Debian package spamc)")
    timeout: float = key(30.0, kind=Duration(floor=1.0),
                         doc="how long one scan may take (spamc -t); longer is a failure")
    max_score: float = key(5.0, kind=Fraction(lambda x: True, "a number", "a number"),
                           doc="a message scoring above this is held for the operator and "
                               "admin.notify is told")
    max_size: int = key(512000, kind=Whole(1, 256 * 1024 * 1024),
                        doc="a larger message is scored on its first max_size bytes "
                            "(headers and the start of the body)")
    on_failure: str = key("defer", kind=Choice(SCAN_FAILURE),
                          doc="when spamd is down or slow: defer (retried with the queue's "
                              "backoff) or deliver unscored to unscored_pool")
    unscored_pool: str | None = key(None, kind=Optional(Text(), falsy=True),
                                    doc="the relay pool of mail delivered unscored",
                                    default_text="the default relays")
    mode: str = key("after_commit", kind=Choice(SCAN_MODES),
                    doc="after_commit: the runner scores queued mail, the hand-off never "
                        "waits; before_ack: a caller on the socket waits for spamd and a "
                        "message above max_score is refused (exit 77, 550 5.7.1), which adds "
                        "spamd's time to every mail() (see docs/policy.md, Content scoring)")
    notify_every: float = key(3600.0, kind=Duration(),
                              doc="at most one admin.notify notice per site in this time for "
                                  "held mail; the others are logged")


@dataclass(frozen=True)
class Config:
    """The whole configuration (``path``: the file it came from, None for defaults)."""

    path: str | None
    spool: str = key(paths.DEFAULT_SPOOL, kind=schema.absolute_path(),
                     doc="the spool; write it as one plain top-level line: the sendmail front "
                         "end reads it without YAML, from the first 64 KiB of the file (keep it "
                         "at the top: with thousands of sites further down, a line not found "
                         "there makes every hand-off read the whole file)")
    message_size_limit: int = key(paths.DEFAULT_MESSAGE_SIZE_LIMIT, kind=Whole(1),
                                  doc="the largest message in bytes; one plain top-level line "
                                      "like spool")
    spool_site_share: float = key(
        0.25, kind=Fraction(lambda x: 0 < x <= 1, "0 < share <= 1", "a number above 0, at most 1"),
        doc="when the spool's file system runs low (under a tenth of it, or four messages of "
            "message_size_limit, free), a site whose queued mail would pass this share of it "
            "gets 451 4.3.1 while the other sites' mail is still accepted")
    hostname: str = key(kind=Text(), factory=socket.gethostname,
                        doc="this host's name for Message-Id, Received and bounces",
                        default_text="the machine's name")
    node: str = key(kind=Text(), factory=socket.gethostname,
                    doc="this node's name in shared state: quota show, site show and top say "
                        "which node sent what", default_text="the machine's name")
    state_backend: str = key("sqlite", kind=Choice(STATE_BACKENDS), name="state.backend",
                             doc="sqlite (embedded, one node) or redis (shared by the nodes; "
                                 "Redis 6 or later, or Valkey)")
    state_url: str = key("redis://127.0.0.1:6379/0", kind=schema.Checked(
        lambda text: text.startswith(("redis://", "rediss://", "unix://")),
        "expected a redis://, rediss:// or unix:// URL, got {text!r}", "a Redis URL"),
        name="state.url",
        doc="the Redis server of state.backend redis, with its database number")
    state_password_file: str | None = key(
        None, kind=Optional(schema.absolute_path(), falsy=True), name="state.password_file",
        doc="file with the Redis password (requirepass) on its first line; readable by the "
            "daemon, not by sites: sites read this configuration file, so never put the "
            "password in state.url", default_text="none")
    state_prefix: str = key("sendmail-shim:", kind=Text(), name="state.prefix",
                            doc="prefix of every Redis key, so fleets can share one server")
    log_target: str = key("stderr", kind=Choice(LOG_TARGETS), name="log.target",
                          doc="stderr, or syslog (the mail facility)")
    log_level: str = key("info", kind=Choice(LOG_LEVELS), name="log.level",
                         doc="the least important messages logged")
    log_format: str = key("text", kind=Choice(LOG_FORMATS), name="log.format",
                          doc="text (event key=value ...), or json: one object per line with "
                              "the same fields, for Loki or ELK")
    metrics_listen: str | None = key(
        None, kind=Optional(ListenAddress(), falsy=True), name="metrics.listen",
        doc="serve /metrics over HTTP at HOST:PORT, such as 127.0.0.1:9465 (keep it on "
            "loopback or behind a firewall: it names sites)", default_text="none")
    metrics_textfile: str | None = key(
        None, kind=Optional(schema.absolute_path(), falsy=True), name="metrics.textfile",
        doc="also write the metrics to this file (ending .prom) for node_exporter's textfile "
            "collector", default_text="none")
    metrics_interval: float = key(15.0, kind=Duration(floor=1.0), name="metrics.interval",
                                  doc="how often the textfile is rewritten")
    metrics_top_sites: int = key(
        10, kind=Whole(0), name="metrics.top_sites",
        doc="per-site series for this many busiest sites; the rest are summed as "
            "site=\"other\"")
    metrics_allow_users: tuple[str, ...] = key(
        ("root", "prometheus"), kind=Strings(), name="metrics.allow_users",
        doc="local users whose connections metrics.listen answers (the daemon's user "
            "always; a name that does not exist is skipped); any other uid gets 403 and "
            "firewall render drops its connection")
    metrics_allow_networks: tuple[str, ...] = key(
        (), kind=Strings(IPNetwork()), name="metrics.allow_networks",
        doc="remote addresses that may scrape, such as 192.0.2.10/32 (a non-loopback "
            "metrics.listen)", default_text="none")
    metrics_per_site: bool = key(False, kind=Flag(), name="metrics.per_site",
                                 doc="true: a series for every site (mind the cardinality "
                                     "with thousands of sites)")
    relays: tuple[Relay, ...] = key(
        (), kind=Section(Relay, "RELAYS", many=True, error="expected a list of relays"),
        doc="the relays, tried in order within their pool")
    pools: tuple[Pool, ...] = key(
        (), kind=Section(Pool, "POOLS", many=True, error="expected a list of pools"),
        doc="the relay pools and their score bands", default_text="one pool, default, of "
                                                                  "every relay")
    retry: RetryPolicy = key(RetryPolicy(), kind=Section(RetryPolicy, "RETRY"),
                             doc="when temporary failures are tried again")
    queue_scan_interval: float = key(5.0, kind=Duration(floor=0.2),
                                     doc="how often the daemon looks at the queue and the drop "
                                         "area (at least 0.2s)")
    connections_per_uid: int = key(
        16, kind=Whole(1), doc="hand-off connections of one uid handled at once; up to 16 times "
                               "as many wait, beyond that the front end writes a drop file; "
                               "the same share of captured SMTP sessions (421 beyond); "
                               "one site's connections never delay another site's")
    sites: dict[str, Site] = key(
        kind=Deferred("a mapping of site name to site, see SITES"), factory=dict,
        doc="the sites; the names default and _admin are reserved", default_text="none")
    sites_dir: str | None = key(
        None, kind=Optional(schema.absolute_path(), falsy=True),
        doc="a directory of more sites, one file NAME.yaml per site holding site NAME's keys, "
            "read after sites: (hidden files and other suffixes are ignored; see "
            "docs/configuration.md); sendmail-shim-admin site add writes there",
        default_text="sites.d beside the configuration file")
    relay_login_command: str | None = key(
        None, kind=Optional(schema.absolute_path(), falsy=True),
        doc="a program that creates a site's login at the relay: site add runs PROGRAM add "
            "LOGIN with the password on stdin, site remove runs PROGRAM remove LOGIN (as "
            "root; exit 0 is success; site add of an unchanged site runs it again, so it "
            "must take an existing login)", default_text="none: site add prints the saslpasswd2 "
                                                     "command and the Dovecot passwd-file line")
    default_site: Site | None = key(
        None, kind=Deferred("refuse, or a site mapping without uids, see SITES"),
        doc="refuse (a uid in no site gets exit status 77), or the site of unknown uids",
        default_text="refuse")
    default_quota: Quota = key(Quota(), kind=Section(Quota, "QUOTA"),
                               doc="the quota of sites that do not set a key of their own")
    default_outbreak: OutbreakRules | None = key(
        OutbreakRules(), kind=Section(OutbreakRules, "OUTBREAK", disable=True), name="outbreak",
        doc="the outbreak rules of sites that do not set their own, or false for none")
    accounts: dict[int, Quota] = key(
        kind=Deferred("a mapping of user name or uid to {quota: ...}, see QUOTA"),
        factory=dict, doc="limits across all the sites of one Unix account",
        default_text="none")
    admin: Admin = key(Admin(), kind=Section(Admin, "ADMIN"), doc="the operator")
    local_mx: tuple[str, ...] = key((), kind=Strings(normalise=lambda n: n.lower().rstrip(".")),
                                    doc="MX names that mean this machine")
    local_addresses: tuple[str, ...] = key((), kind=Strings(IPAddress()),
                                           doc="addresses of this machine besides its "
                                               "interfaces' own")
    local_transport: LocalTransport | None = key(
        None, kind=Optional(Transport()),
        doc="where local mail goes; setting it turns on routing by MX", default_text="none")
    loopback_server_users: tuple[str, ...] = key(
        ("postfix", "dovecot"), kind=Strings(),
        doc="users besides root and the daemon's own whose server the daemon trusts on an "
            "address of this host (a relay or local_transport on 127.0.0.1 or ::1): before "
            "AUTH or any mail it asks the kernel who accepted the connection, and a server of "
            "any other uid (a site listening on the port while the real server is down) gets "
            "nothing: the relay counts as down and the mail waits; a name that does not exist "
            "is skipped")
    routing: dict[str, str] = key(
        kind=Deferred("a mapping of domain to local, remote or auto"), factory=dict,
        doc="pins that decide before DNS", default_text="none")
    resolver_nameservers: tuple[str, ...] = key((), kind=Strings(), name="resolver.nameservers",
                                                doc="name servers to ask",
                                                default_text="the system's")
    resolver_port: int = key(53, kind=Whole(1), name="resolver.port", doc="their port")
    resolver_timeout: float = key(3.0, kind=Duration(), name="resolver.timeout",
                                  doc="how long a lookup may take")
    firewall: Firewall = key(Firewall(), kind=Section(Firewall, "FIREWALL"),
                             doc="who may send out on port 25, 465 and 587")
    reputation: Reputation = key(Reputation(), kind=Section(Reputation, "REPUTATION"),
                                 doc="the DNS blocklists the relays' public_ip is watched in "
                                     "(the resolver is resolver.*)")
    scan: Scan = key(Scan(), kind=Section(Scan, "SCAN"),
                     doc="content scoring with spamd (off by default)")
    policy_service: PolicyService = key(
        PolicyService(), kind=Section(PolicyService, "POLICY SERVICE"),
        doc="the relay's Postfix policy service (sendmail-shim-admin policy serve)")
    dkim: Dkim = key(Dkim(), kind=Section(Dkim, "DKIM"),
                     doc="per-site DKIM signing, key rotation and DNS")

    @functools.cached_property
    def layout(self) -> paths.SpoolLayout:
        """The spool's directory names, built once per configuration (every message
        asked for it several times: nine path joins each)."""
        return paths.SpoolLayout(self.spool)

    @property
    def dkim_keys(self) -> str:
        """The DKIM key directory: ``dkim.keys``, else ``<spool>/dkim``."""
        return self.dkim.keys or os.path.join(self.spool, "dkim")

    @cached_property
    def _sites_by_uid(self) -> dict[int, tuple[Site, ...]]:
        """uid -> its sites in the configuration's order; built once per loaded
        configuration (a reload builds a new Config), so a hand-off costs the same with
        10 sites or 10,000 (bench/scale).  The sites mapping is never changed after
        loading; a changed configuration is a new Config."""
        index: dict[int, list[Site]] = {}
        for site in self.sites.values():
            for uid in dict.fromkeys(site.uids):  # a uid listed twice in one site: once
                index.setdefault(uid, []).append(site)
        return {uid: tuple(sites) for uid, sites in index.items()}

    def sites_of_uid(self, uid: int) -> list[Site]:
        """The sites whose uids hold ``uid``, in the configuration's order."""
        return list(self._sites_by_uid.get(uid, ()))

    def site_named(self, name: str) -> Site | None:
        """The site a queued message belongs to (``default`` for unknown uids)."""
        if name in self.sites:
            return self.sites[name]
        if name == "default" and self.default_site is not None:
            return self.default_site
        if name == ADMIN_SITE:
            return Site(name=ADMIN_SITE, sender=self.admin.sender,
                        relay_login=self.admin.relay_login, outbreak=None)
        return None


@cache  # the loader asks once per site and section: 10,000 sites, 80,000 times
def keys_of(cls: type) -> tuple[tuple[str, schema.Key], ...]:
    """``cls``'s declared keys in order, as (field name, key with its YAML name filled in)."""
    found = []
    for f in fields(cls):
        declared = f.metadata.get("key")
        if isinstance(declared, schema.Key):
            name = declared.name or f.name
            found.append((f.name, schema.Key(name, declared.kind, declared.doc,
                                             declared.required, declared.default_text)))
    return tuple(found)


def default_of(cls: type, field_name: str) -> Any:
    """A field's default, or MISSING."""
    for f in fields(cls):
        if f.name == field_name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
    return MISSING


@cache
def top_names(cls: type) -> tuple[str, ...]:
    """The keys a mapping read as ``cls`` may hold (first part of dotted names), in order."""
    return tuple(dict.fromkeys(k.name.split(".")[0] for _, k in keys_of(cls)))


# The schema's keys, section by section (derived: other modules and tests use them).
TOP_KEYS = top_names(Config)
RELAY_KEYS = top_names(Relay)
SITE_KEYS = top_names(Site)
QUOTA_KEYS = top_names(Quota)
OUTBREAK_KEYS = top_names(OutbreakRules)
LOG_KEYS = tuple(k.name.split(".")[1] for _, k in keys_of(Config) if k.name.startswith("log."))
RETRY_KEYS = top_names(RetryPolicy)
ADMIN_KEYS = top_names(Admin)
FIREWALL_KEYS = top_names(Firewall)
RESOLVER_KEYS = tuple(k.name.split(".")[1] for _, k in keys_of(Config)
                      if k.name.startswith("resolver."))
LOGIN_KEYS = top_names(RelayLogin)
POOL_KEYS = top_names(Pool)
REPUTATION_KEYS = top_names(Reputation)
ZONE_KEYS = top_names(Zone)
SCAN_KEYS = top_names(Scan)
POLICY_SERVICE_KEYS = top_names(PolicyService)
DKIM_KEYS = top_names(Dkim)
