"""Loading and checking the YAML configuration (daemon and admin; never the front end).

Trusts: the file's owner (root or the operator); still, every key is checked
against a schema, unknown keys are errors (a typo must not silently disable a
limit), and each error names the file, the key path and what is wrong.
Guarantees: a :class:`Config` is complete and consistent; the two keys the
front end reads without YAML (``paths.read_frontend_settings``) read the same
here, or loading fails.

Schema: man/sendmail-shim.yaml.5 documents every key (a test checks that it
names every key of the tuples below), README.md shows a full example.  The
sections: top level (TOP_KEYS), relays (RELAY_KEYS), sites (SITE_KEYS) with
quota (QUOTA_KEYS), sender_policy and outbreak (OUTBREAK_KEYS), log, retry,
admin, firewall and resolver.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import socket
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from sendmail_shim.wire import paths
from sendmail_shim.wire.paths import ConfigError

TLS_MODES = ("starttls", "implicit", "none")
# The schema's keys, section by section (man/sendmail-shim.yaml.5 is tested against them).
RELAY_KEYS = ("host", "port", "tls", "verify", "ca_file", "timeout", "allow_plaintext")
SITE_KEYS = ("uids", "docroots", "domains", "sender", "relay_login", "quota", "sender_policy",
             "outbreak", "dkim_selectors", "allow_submission")
LOG_KEYS = ("target", "level")
RETRY_KEYS = ("initial", "maximum", "lifetime", "jitter")
ADMIN_KEYS = ("notify", "sender", "relay_login", "group")
FIREWALL_KEYS = ("daemon_user", "exempt_users", "capture", "log_rate")
RESOLVER_KEYS = ("nameservers", "port", "timeout")
LOG_TARGETS = ("stderr", "syslog")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class RelayLogin:
    user: str
    password_file: str

    def read_password(self) -> str:
        """The password, read now so that rotating the file needs no restart."""
        with open(self.password_file, encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n")


@dataclass(frozen=True)
class Relay:
    host: str
    port: int
    tls: str = "starttls"
    verify: bool = True
    ca_file: str | None = None
    timeout: float = 30.0
    allow_plaintext: bool = False

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


QUOTA_KEYS = ("per_hour", "per_day", "recipients_per_message", "recipients_per_hour")


@dataclass(frozen=True)
class Quota:
    """Limits; None means unlimited, 0 means nothing at all."""

    per_hour: int | None = None
    per_day: int | None = None
    recipients_per_message: int | None = None
    recipients_per_hour: int | None = None

    def merged(self, overrides: dict[str, int | None]) -> Quota:
        values = {k: getattr(self, k) for k in QUOTA_KEYS}
        values.update({k: v for k, v in overrides.items() if k in QUOTA_KEYS})
        return Quota(**values)


@dataclass(frozen=True)
class OutbreakRules:
    """What trips an automatic suspension; None disables a rule."""

    quota_refusals: int | None = 20  # refusals for quota ...
    quota_refusals_window: float = 600.0  # ... within this window
    recipient_domains_per_hour: int | None = 200  # distinct recipient domains in one hour
    relay_5xx_share: float | None = 0.5  # share of 5xx relay answers ...
    relay_5xx_min_results: int = 20  # ... once there are this many answers ...
    relay_5xx_window: float = 3600.0  # ... within this window
    new_script_count: int | None = 50  # messages from a script first seen ...
    new_script_window: float = 3600.0  # ... within this window


SENDER_ACTIONS = ("rewrite", "refuse", "keep")
FROM_ACTIONS = ("keep", "rewrite", "refuse")


@dataclass(frozen=True)
class Site:
    name: str
    uids: tuple[int, ...] = ()
    docroots: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    sender: str | None = None
    relay_login: RelayLogin | None = None
    quota: Quota = Quota()
    envelope_policy: str = "rewrite"  # sender outside the site's domains: rewrite|refuse|keep
    from_policy: str = "keep"  # From: outside the site's domains: keep|rewrite|refuse
    outbreak: OutbreakRules | None = OutbreakRules()
    dkim_selectors: tuple[str, ...] = ()  # for 'dns check': the selectors the relay signs with
    allow_submission: tuple[str, ...] = ()  # hosts this site's uids may reach on 465/587


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


@dataclass(frozen=True)
class Firewall:
    """Who may open SMTP connections out, and where captured port-25 traffic goes."""

    daemon_user: str | None = None  # the daemon's Unix user (always exempt)
    exempt_users: tuple[str, ...] = ()  # MTA users that deliver themselves (postfix, exim)
    capture_port: int | None = None  # redirect site uids' port 25 here (None: just drop)
    log_rate: str = "10/minute"


@dataclass(frozen=True)
class Admin:
    """The operator: who is notified, with which relay login, who may use the control socket."""

    notify: tuple[str, ...] = ()
    sender: str | None = None
    relay_login: RelayLogin | None = None
    group: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    # Postfix's minimal_backoff_time, maximal_backoff_time, maximal_queue_lifetime.
    initial: float = 300.0
    maximum: float = 4000.0
    lifetime: float = 5 * 86400.0
    jitter: float = 0.2


@dataclass(frozen=True)
class Config:
    path: str | None
    spool: str = paths.DEFAULT_SPOOL
    message_size_limit: int = paths.DEFAULT_MESSAGE_SIZE_LIMIT
    hostname: str = field(default_factory=socket.gethostname)
    log_target: str = "stderr"
    log_level: str = "info"
    relays: tuple[Relay, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    queue_scan_interval: float = 5.0
    connections_per_uid: int = 16  # open hand-off connections one uid may hold at once
    sites: dict[str, Site] = field(default_factory=dict)
    default_site: Site | None = None
    accounts: dict[int, Quota] = field(default_factory=dict)  # uid -> account-wide quota
    admin: Admin = Admin()
    local_mx: tuple[str, ...] = ()
    local_addresses: tuple[str, ...] = ()
    local_transport: LocalTransport | None = None
    routing: dict[str, str] = field(default_factory=dict)  # domain -> local|remote|auto
    resolver_nameservers: tuple[str, ...] = ()
    resolver_port: int = 53
    resolver_timeout: float = 3.0
    firewall: Firewall = Firewall()

    @property
    def layout(self) -> paths.SpoolLayout:
        return paths.SpoolLayout(self.spool)

    def sites_of_uid(self, uid: int) -> list[Site]:
        return [site for site in self.sites.values() if uid in site.uids]

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


ADMIN_SITE = "_admin"  # the pseudo-site of the operator's notices


class _Reader:
    """Walks the YAML tree, remembering the key path for error messages."""

    def __init__(self, path: str | None) -> None:
        self.path = path or "<built-in defaults>"

    def fail(self, where: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {what}")

    def mapping(self, value: Any, where: str, known: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str) or key not in known:
                raise self.fail(
                    where, f"unknown key {key!r} (known keys: {', '.join(known)})"
                )
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"expected a non-empty string, got {value!r}")
        return value

    def integer(self, value: Any, where: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(where, f"expected a whole number >= {minimum}, got {value!r}")
        return value

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {value!r}")
        return value

    def duration(self, value: Any, where: str) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return float(value)
        match = _DURATION.match(str(value)) if isinstance(value, str) else None
        if not match:
            raise self.fail(where, f"expected a duration like 30s, 5m, 2h or 5d, got {value!r}")
        return float(match.group(1)) * _UNITS[match.group(2)]

    def choice(self, value: Any, where: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(where, f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def strings(self, value: Any, where: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {value!r}")
        return tuple(self.string(item, f"{where}[{i}]") for i, item in enumerate(value))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _relay(r: _Reader, raw: Any, where: str) -> Relay:
    data = r.mapping(raw, where, RELAY_KEYS)
    if "host" not in data:
        raise r.fail(where, "missing key 'host'")
    tls = r.choice(data.get("tls", "starttls"), f"{where}.tls", TLS_MODES)
    default_port = {"starttls": 587, "implicit": 465, "none": 25}[tls]
    port = r.integer(data.get("port", default_port), f"{where}.port", 1)
    if port > 65535:
        raise r.fail(f"{where}.port", f"expected a port 1-65535, got {port}")
    host = r.string(data["host"], f"{where}.host")
    allow_plaintext = r.boolean(data.get("allow_plaintext", False), f"{where}.allow_plaintext")
    if tls == "none" and not allow_plaintext and not _is_loopback(host):
        raise r.fail(
            f"{where}.tls",
            f"'none' sends site passwords in clear text to {host}; use starttls or "
            "implicit, or set allow_plaintext: true if this network is trusted",
        )
    ca_file = data.get("ca_file")
    return Relay(
        host=host,
        port=port,
        tls=tls,
        verify=r.boolean(data.get("verify", True), f"{where}.verify"),
        ca_file=r.string(ca_file, f"{where}.ca_file") if ca_file is not None else None,
        timeout=r.duration(data.get("timeout", 30), f"{where}.timeout"),
        allow_plaintext=allow_plaintext,
    )


def _uid(r: _Reader, value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value:
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise r.fail(where, f"no such user {value!r} on this system") from None
    raise r.fail(where, f"expected a uid number or a user name, got {value!r}")


def _quota(r: _Reader, raw: Any, where: str, base: Quota = Quota()) -> Quota:
    data = r.mapping(raw, where, QUOTA_KEYS)
    values: dict[str, int | None] = {}
    for key, value in data.items():
        values[key] = None if value is None else r.integer(value, f"{where}.{key}")
    return base.merged(values)


def _login(r: _Reader, raw: Any, where: str) -> RelayLogin:
    ldata = r.mapping(raw, where, ("user", "password_file"))
    for key in ("user", "password_file"):
        if key not in ldata:
            raise r.fail(where, f"missing key {key!r}")
    return RelayLogin(user=r.string(ldata["user"], f"{where}.user"),
                      password_file=r.string(ldata["password_file"], f"{where}.password_file"))


OUTBREAK_KEYS = ("quota_refusals", "recipient_domains_per_hour", "relay_5xx_share", "new_script")


def _outbreak(r: _Reader, raw: Any, where: str,
              base: OutbreakRules | None) -> OutbreakRules | None:
    if raw is False:
        return None
    data = r.mapping(raw, where, OUTBREAK_KEYS)
    rules = base or OutbreakRules()
    values: dict[str, Any] = {}
    if "quota_refusals" in data:
        item = r.mapping(data["quota_refusals"], f"{where}.quota_refusals", ("count", "window"))
        values["quota_refusals"] = (r.integer(item["count"], f"{where}.quota_refusals.count", 1)
                                    if item.get("count") is not None else None)
        values["quota_refusals_window"] = r.duration(
            item.get("window", rules.quota_refusals_window), f"{where}.quota_refusals.window")
    if "recipient_domains_per_hour" in data:
        value = data["recipient_domains_per_hour"]
        values["recipient_domains_per_hour"] = None if value is None else r.integer(
            value, f"{where}.recipient_domains_per_hour", 1)
    if "relay_5xx_share" in data:
        item = r.mapping(data["relay_5xx_share"], f"{where}.relay_5xx_share",
                         ("share", "min_results", "window"))
        share = item.get("share")
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not 0 < share <= 1):
            raise r.fail(f"{where}.relay_5xx_share.share",
                         f"expected 0 < share <= 1, got {share!r}")
        values["relay_5xx_share"] = None if share is None else float(share)
        values["relay_5xx_min_results"] = r.integer(
            item.get("min_results", rules.relay_5xx_min_results),
            f"{where}.relay_5xx_share.min_results", 1)
        values["relay_5xx_window"] = r.duration(item.get("window", rules.relay_5xx_window),
                                                f"{where}.relay_5xx_share.window")
    if "new_script" in data:
        item = r.mapping(data["new_script"], f"{where}.new_script", ("count", "window"))
        values["new_script_count"] = (r.integer(item["count"], f"{where}.new_script.count", 1)
                                      if item.get("count") is not None else None)
        values["new_script_window"] = r.duration(item.get("window", rules.new_script_window),
                                                 f"{where}.new_script.window")
    return replace(rules, **values)


@dataclass(frozen=True)
class _SiteDefaults:
    quota: Quota = Quota()
    outbreak: OutbreakRules | None = OutbreakRules()


def _site(r: _Reader, name: str, raw: Any, where: str, with_uids: bool = True,
          defaults: _SiteDefaults = _SiteDefaults()) -> Site:
    known = SITE_KEYS if with_uids else tuple(k for k in SITE_KEYS if k != "uids")
    data = r.mapping(raw, where, known)
    uids: tuple[int, ...] = ()
    if with_uids:
        raw_uids = data.get("uids")
        if not isinstance(raw_uids, list) or not raw_uids:
            raise r.fail(f"{where}.uids", "expected a non-empty list of uids or user names")
        uids = tuple(_uid(r, u, f"{where}.uids[{i}]") for i, u in enumerate(raw_uids))
    raw_domains = r.strings(data.get("domains"), f"{where}.domains")
    domains = tuple(d.lower().rstrip(".") for d in raw_domains)
    for i, domain in enumerate(domains):
        try:
            ascii_form = domain.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_form = ""
        if not _DOMAIN.match(ascii_form):
            raise r.fail(f"{where}.domains[{i}]", f"not a domain name: {domain!r}")
    sender = data.get("sender")
    if sender is not None:
        sender = r.string(sender, f"{where}.sender")
        if "@" not in sender:
            raise r.fail(f"{where}.sender",
                         f"expected an address like noreply@{name}, got {sender!r}")
    login = None
    if data.get("relay_login") is not None:
        login = _login(r, data["relay_login"], f"{where}.relay_login")
    policy = r.mapping(data.get("sender_policy"), f"{where}.sender_policy",
                       ("envelope", "from_header"))
    docroots = tuple(
        os.path.normpath(d) for d in r.strings(data.get("docroots"), f"{where}.docroots")
    )
    return Site(
        name=name, uids=uids, docroots=docroots, domains=domains, sender=sender,
        relay_login=login,
        quota=_quota(r, data.get("quota"), f"{where}.quota", defaults.quota),
        envelope_policy=r.choice(policy.get("envelope", "rewrite"),
                                 f"{where}.sender_policy.envelope", SENDER_ACTIONS),
        from_policy=r.choice(policy.get("from_header", "keep"),
                             f"{where}.sender_policy.from_header", FROM_ACTIONS),
        outbreak=_outbreak(r, data.get("outbreak"), f"{where}.outbreak", defaults.outbreak)
        if "outbreak" in data else defaults.outbreak,
        dkim_selectors=r.strings(data.get("dkim_selectors"), f"{where}.dkim_selectors"),
        allow_submission=r.strings(data.get("allow_submission"), f"{where}.allow_submission"),
    )


TOP_KEYS = ("spool", "message_size_limit", "hostname", "log", "relays", "retry",
            "queue_scan_interval", "connections_per_uid", "sites", "default_site",
            "default_quota", "outbreak", "accounts", "admin", "local_mx", "local_addresses",
            "local_transport", "routing",
            "resolver", "firewall")


def parse_config(raw: Any, path: str | None) -> Config:
    """Build a :class:`Config` from the YAML tree ``raw`` read from ``path``."""
    r = _Reader(path)
    data = r.mapping(raw, "top level", TOP_KEYS)
    kwargs: dict[str, Any] = {"path": path}
    if "spool" in data:
        spool = r.string(data["spool"], "spool")
        if not os.path.isabs(spool):
            raise r.fail("spool", f"expected an absolute path, got {spool!r}")
        kwargs["spool"] = spool
    if "message_size_limit" in data:
        kwargs["message_size_limit"] = r.integer(
            data["message_size_limit"], "message_size_limit", 1)
    if "hostname" in data:
        kwargs["hostname"] = r.string(data["hostname"], "hostname")
    log = r.mapping(data.get("log"), "log", LOG_KEYS)
    kwargs["log_target"] = r.choice(log.get("target", "stderr"), "log.target", LOG_TARGETS)
    kwargs["log_level"] = r.choice(log.get("level", "info"), "log.level",
                                   ("debug", "info", "warning", "error"))
    raw_relays = data.get("relays") or []
    if not isinstance(raw_relays, list):
        raise r.fail("relays", "expected a list of relays")
    kwargs["relays"] = tuple(_relay(r, item, f"relays[{i}]") for i, item in enumerate(raw_relays))
    retry = r.mapping(data.get("retry"), "retry", RETRY_KEYS)
    retry_defaults = RetryPolicy()
    jitter = retry.get("jitter", retry_defaults.jitter)
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
        raise r.fail("retry.jitter", f"expected a fraction between 0 and 1, got {jitter!r}")
    kwargs["retry"] = RetryPolicy(
        initial=r.duration(retry.get("initial", retry_defaults.initial), "retry.initial"),
        maximum=r.duration(retry.get("maximum", retry_defaults.maximum), "retry.maximum"),
        lifetime=r.duration(retry.get("lifetime", retry_defaults.lifetime), "retry.lifetime"),
        jitter=float(jitter),
    )
    if "queue_scan_interval" in data:
        kwargs["queue_scan_interval"] = max(
            0.2, r.duration(data["queue_scan_interval"], "queue_scan_interval")
        )
    if "connections_per_uid" in data:
        kwargs["connections_per_uid"] = r.integer(data["connections_per_uid"],
                                                  "connections_per_uid", 1)
    defaults = _SiteDefaults(
        quota=_quota(r, data.get("default_quota"), "default_quota"),
        outbreak=_outbreak(r, data.get("outbreak"), "outbreak", OutbreakRules())
        if "outbreak" in data else OutbreakRules(),
    )
    sites_raw = data.get("sites") or {}
    if not isinstance(sites_raw, dict):
        raise r.fail("sites", "expected a mapping of site name to site")
    for name in sites_raw:
        if str(name) in ("default", ADMIN_SITE):
            raise r.fail(f"sites.{name}", "this name is reserved; choose another")
    kwargs["sites"] = {
        str(name): _site(r, str(name), body, f"sites.{name}", defaults=defaults)
        for name, body in sites_raw.items()
    }
    default = data.get("default_site", "refuse")
    if default != "refuse":
        kwargs["default_site"] = _site(r, "default", default, "default_site", with_uids=False,
                                       defaults=defaults)
    accounts_raw = r.mapping(data.get("accounts"), "accounts",
                             tuple(str(k) for k in (data.get("accounts") or {})))
    kwargs["accounts"] = {}
    for key, body in accounts_raw.items():
        item = r.mapping(body, f"accounts.{key}", ("quota",))
        uid = _uid(r, int(key) if str(key).isdigit() else key, f"accounts.{key}")
        kwargs["accounts"][uid] = _quota(r, item.get("quota"), f"accounts.{key}.quota")
    admin = r.mapping(data.get("admin"), "admin", ADMIN_KEYS)
    group = admin.get("group")
    if group is not None:
        group = r.string(group, "admin.group")
        try:
            grp.getgrnam(group)
        except KeyError:
            raise r.fail("admin.group", f"no such group {group!r} on this system") from None
    kwargs["admin"] = Admin(
        notify=r.strings(admin.get("notify"), "admin.notify"),
        sender=r.string(admin["sender"], "admin.sender") if admin.get("sender") else None,
        relay_login=_login(r, admin["relay_login"], "admin.relay_login")
        if admin.get("relay_login") else None,
        group=group,
    )
    _routing(r, data, kwargs)
    kwargs["firewall"] = _firewall(r, data.get("firewall"))
    config = Config(**kwargs)
    if path is not None:  # a tree built in memory has no file for the front end to read
        _check_frontend_agrees(config, path)
    return config


_TRANSPORT = re.compile(r"^(smtp|lmtp)://(\[[0-9a-fA-F:]+\]|[^:/\[\]]+):(\d+)/?$")


def _local_transport(r: _Reader, raw: Any) -> LocalTransport:
    text = r.string(raw, "local_transport")
    if text.startswith(("lmtp:unix:", "smtp:unix:")):
        protocol, _, path = text.split(":", 2)
        if not os.path.isabs(path):
            raise r.fail("local_transport", f"expected an absolute socket path, got {path!r}")
        return LocalTransport(protocol, socket_path=path)
    match = _TRANSPORT.match(text)
    if not match:
        raise r.fail("local_transport", "expected smtp://HOST:PORT, lmtp://HOST:PORT or "
                                        f"lmtp:unix:/PATH, got {text!r}")
    host = match.group(2).strip("[]")
    if not _is_loopback(host):
        raise r.fail("local_transport", f"{host} is not a loopback address: local delivery "
                                        "stays on this machine")
    return LocalTransport(match.group(1), host, int(match.group(3)))


def _firewall(r: _Reader, raw: Any) -> Firewall:
    data = r.mapping(raw, "firewall", FIREWALL_KEYS)
    users = r.strings(data.get("exempt_users"), "firewall.exempt_users")
    daemon_user = data.get("daemon_user")
    for i, user in enumerate((*users, *([daemon_user] if daemon_user else []))):
        _uid(r, user, f"firewall.exempt_users[{i}]" if i < len(users) else "firewall.daemon_user")
    capture = r.mapping(data.get("capture"), "firewall.capture", ("listen_port",))
    port = capture.get("listen_port")
    rate = str(data.get("log_rate", "10/minute"))
    if not re.match(r"^\d+/(second|minute|hour|day)$", rate):
        raise r.fail("firewall.log_rate", f"expected like 10/minute, got {rate!r}")
    return Firewall(
        daemon_user=r.string(daemon_user, "firewall.daemon_user") if daemon_user else None,
        exempt_users=users,
        capture_port=r.integer(port, "firewall.capture.listen_port", 1) if port else None,
        log_rate=rate,
    )


def _routing(r: _Reader, data: dict[str, Any], kwargs: dict[str, Any]) -> None:
    kwargs["local_mx"] = tuple(n.lower().rstrip(".") for n in r.strings(data.get("local_mx"),
                                                                         "local_mx"))
    addresses = r.strings(data.get("local_addresses"), "local_addresses")
    for i, address in enumerate(addresses):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise r.fail(f"local_addresses[{i}]", f"not an IP address: {address!r}") from None
    kwargs["local_addresses"] = addresses
    if data.get("local_transport") is not None:
        kwargs["local_transport"] = _local_transport(r, data["local_transport"])
    pins = r.mapping(data.get("routing"), "routing",
                     tuple(str(k) for k in (data.get("routing") or {})))
    routing = {}
    for domain, choice in pins.items():
        routing[domain.lower().rstrip(".").encode("idna").decode("ascii")] = r.choice(
            choice, f"routing.{domain}", ("local", "remote", "auto"))
    if "local" in routing.values() and "local_transport" not in kwargs:
        raise r.fail("routing", "a domain is pinned to local but local_transport is not set")
    kwargs["routing"] = routing
    resolver = r.mapping(data.get("resolver"), "resolver", RESOLVER_KEYS)
    kwargs["resolver_nameservers"] = r.strings(resolver.get("nameservers"),
                                               "resolver.nameservers")
    kwargs["resolver_port"] = r.integer(resolver.get("port", 53), "resolver.port", 1)
    kwargs["resolver_timeout"] = r.duration(resolver.get("timeout", 3), "resolver.timeout")


def _check_frontend_agrees(config: Config, path: str | None) -> None:
    """The front end reads spool and message_size_limit without YAML: same values?"""
    try:
        spool, limit = paths.frontend_spool_and_limit(path)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the sendmail front end reads this line without YAML)") from exc
    if spool != config.spool or limit != config.message_size_limit:
        raise ConfigError(
            f"{config.path}: spool/message_size_limit: write each as one plain top-level "
            "line ('spool: /path', 'message_size_limit: 10240000'): the sendmail front end "
            f"reads them without a YAML parser and saw spool={spool!r}, "
            f"message_size_limit={limit}"
        )


def load_config(explicit: str | None = None) -> Config:
    """Find (``paths.find_config``), read and check the configuration."""
    path = paths.find_config(explicit)
    if path is None:
        return parse_config({}, None)
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(raw, path)
