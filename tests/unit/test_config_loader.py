"""config.loader: every error path and text, inheritance, and a full example read back."""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml

from sendmail_shim import config
from sendmail_shim.config import ConfigError, load_config, loader, parse_config
from sendmail_shim.wire.paths import SettingsError

SITE = {"uids": [5]}

# (YAML tree, the whole error text after "<file>: ")
ERRORS: list[tuple[Any, str]] = [
    ([], "top level: expected a mapping, got list"),
    ({"relay": []}, "top level: unknown key 'relay' (known keys: " + ", ".join(config.TOP_KEYS)
     + ")"),
    ({"spool": {"x": 1}}, "spool: expected a non-empty string, got {'x': 1}"),
    ({"spool": "rel/path"}, "spool: expected an absolute path, got 'rel/path'"),
    ({"message_size_limit": 0}, "message_size_limit: expected a whole number >= 1, got 0"),
    ({"message_size_limit": True}, "message_size_limit: expected a whole number >= 1, got True"),
    ({"hostname": ""}, "hostname: expected a non-empty string, got ''"),
    ({"log": {"target": "file"}}, "log.target: expected one of stderr, syslog, got 'file'"),
    ({"log": {"level": None}}, "log.level: expected one of debug, info, warning, error, got None"),
    ({"log": {"colour": 1}}, "log: unknown key 'colour' (known keys: target, level, format)"),
    ({"log": "loud"}, "log: expected a mapping, got str"),
    ({"relays": {"host": "x"}}, "relays: expected a list of relays"),
    ({"relays": [{"port": 25}]}, "relays[0]: missing key 'host'"),
    ({"relays": [{"host": "h.test", "port": 0}]}, "relays[0].port: expected a whole number >= 1, "
                                                  "got 0"),
    ({"relays": [{"host": "h.test", "port": 65536}]}, "relays[0].port: expected a port 1-65535, "
                                                      "got 65536"),
    ({"relays": [{"host": "h.test", "tls": "ssl"}]}, "relays[0].tls: expected one of starttls, "
                                                     "implicit, none, got 'ssl'"),
    ({"relays": [{"host": "h.test", "verify": "yes"}]}, "relays[0].verify: expected true or "
                                                        "false, got 'yes'"),
    ({"relays": [{"host": "h.test", "ca_file": ""}]}, "relays[0].ca_file: expected a non-empty "
                                                      "string, got ''"),
    ({"relays": [{"host": "127.0.0.1"}, {"host": "h.test", "tls": "none"}]},
     "relays[1].tls: 'none' sends site passwords in clear text to h.test; use starttls or "
     "implicit, or set allow_plaintext: true if this network is trusted"),
    ({"retry": {"initial": "soon"}}, "retry.initial: expected a duration like 30s, 5m, 2h or 5d, "
                                     "got 'soon'"),
    ({"retry": {"lifetime": -1}}, "retry.lifetime: expected a duration like 30s, 5m, 2h or 5d, "
                                  "got -1"),
    ({"retry": {"jitter": 1}}, "retry.jitter: expected a fraction between 0 and 1, got 1"),
    ({"retry": {"jitter": False}}, "retry.jitter: expected a fraction between 0 and 1, got False"),
    ({"connections_per_uid": 0}, "connections_per_uid: expected a whole number >= 1, got 0"),
    ({"sites": ["a"]}, "sites: expected a mapping of site name to site"),
    ({"sites": {"default": SITE}}, "sites.default: this name is reserved; choose another"),
    ({"sites": {"a.test": None}}, "sites.a.test.uids: expected a non-empty list of uids or user "
                                  "names"),
    ({"sites": {"a.test": {"uids": 5}}}, "sites.a.test.uids: expected a non-empty list of uids "
                                         "or user names"),
    ({"sites": {"a.test": {"uids": [-1]}}}, "sites.a.test.uids[0]: expected a uid number or a "
                                            "user name, got -1"),
    ({"sites": {"a.test": {"uids": [5, "no-such-user-here"]}}},
     "sites.a.test.uids[1]: no such user 'no-such-user-here' on this system"),
    ({"sites": {"a.test": {**SITE, "domains": ["ok.test", "bad domain"]}}},
     "sites.a.test.domains[1]: not a domain name: 'bad domain'"),
    ({"sites": {"a.test": {**SITE, "domains": "a.test"}}},
     "sites.a.test.domains: expected a list, got 'a.test'"),
    ({"sites": {"a.test": {**SITE, "docroots": [7]}}},
     "sites.a.test.docroots[0]: expected a non-empty string, got 7"),
    ({"sites": {"a.test": {**SITE, "sender": "nobody"}}},
     "sites.a.test.sender: expected an address like noreply@a.test, got 'nobody'"),
    ({"sites": {"a.test": {**SITE, "relay_login": {"user": "u"}}}},
     "sites.a.test.relay_login: missing key 'password_file'"),
    ({"sites": {"a.test": {**SITE, "relay_login": {"user": "u", "password_file": "/p", "x": 1}}}},
     "sites.a.test.relay_login: unknown key 'x' (known keys: user, password_file)"),
    ({"sites": {"a.test": {**SITE, "quota": {"per_hour": -1}}}},
     "sites.a.test.quota.per_hour: expected a whole number >= 0, got -1"),
    ({"sites": {"a.test": {**SITE, "quota": {"per_week": 1}}}},
     "sites.a.test.quota: unknown key 'per_week' (known keys: per_hour, per_day, "
     "recipients_per_message, recipients_per_hour)"),
    ({"sites": {"a.test": {**SITE, "sender_policy": {"envelope": "maybe"}}}},
     "sites.a.test.sender_policy.envelope: expected one of rewrite, refuse, keep, got 'maybe'"),
    ({"sites": {"a.test": {**SITE, "sender_policy": {"from": "keep"}}}},
     "sites.a.test.sender_policy: unknown key 'from' (known keys: envelope, from_header)"),
    ({"sites": {"a.test": {**SITE, "outbreak": {"new_script": {"count": 0}}}}},
     "sites.a.test.outbreak.new_script.count: expected a whole number >= 1, got 0"),
    ({"default_site": {"uids": [5]}}, "default_site: unknown key 'uids' (known keys: docroots, "
                                      "domains, sender, relay_login, quota, sender_policy, "
                                      "outbreak, dkim_selectors, allow_submission, pool)"),
    ({"outbreak": {"relay_5xx_share": {"share": 2}}},
     "outbreak.relay_5xx_share.share: expected 0 < share <= 1, got 2"),
    ({"outbreak": {"relay_5xx_share": {"share": 0}}},
     "outbreak.relay_5xx_share.share: expected 0 < share <= 1, got 0"),
    ({"outbreak": {"quota_refusals": {"window": "later"}}},
     "outbreak.quota_refusals.window: expected a duration like 30s, 5m, 2h or 5d, got 'later'"),
    ({"outbreak": {"recipient_domains_per_hour": 0}},
     "outbreak.recipient_domains_per_hour: expected a whole number >= 1, got 0"),
    ({"default_quota": {"per_day": "many"}},
     "default_quota.per_day: expected a whole number >= 0, got 'many'"),
    ({"accounts": {"no-such-user-x": {"quota": {"per_hour": 1}}}},
     "accounts.no-such-user-x: no such user 'no-such-user-x' on this system"),
    ({"accounts": {"root": {"limits": 1}}}, "accounts.root: unknown key 'limits' (known keys: "
                                            "quota)"),
    ({"accounts": {"0": {"quota": {"per_hour": -2}}}},
     "accounts.0.quota.per_hour: expected a whole number >= 0, got -2"),
    ({"admin": {"group": "no-such-group-here"}},
     "admin.group: no such group 'no-such-group-here' on this system"),
    ({"admin": {"notify": "ops@x.test"}}, "admin.notify: expected a list, got 'ops@x.test'"),
    ({"admin": {"relay_login": {"password_file": "/p"}}}, "admin.relay_login: missing key 'user'"),
    ({"local_addresses": ["10.0.0.1", "ten"]}, "local_addresses[1]: not an IP address: 'ten'"),
    ({"local_transport": "lmtp:unix:run/l"},
     "local_transport: expected an absolute socket path, got 'run/l'"),
    ({"local_transport": "smtp://10.0.0.1:25"},
     "local_transport: 10.0.0.1 is not a loopback address: local delivery stays on this machine"),
    ({"local_transport": "smtp://localhost"},
     "local_transport: expected smtp://HOST:PORT, lmtp://HOST:PORT or lmtp:unix:/PATH, got "
     "'smtp://localhost'"),
    ({"routing": {"a.test": "near"}}, "routing.a.test: expected one of local, remote, auto, got "
                                      "'near'"),
    ({"routing": {"a.test": "local"}},
     "routing: a domain is pinned to local but local_transport is not set"),
    ({"resolver": {"port": 0}}, "resolver.port: expected a whole number >= 1, got 0"),
    ({"resolver": {"timeout": "x"}}, "resolver.timeout: expected a duration like 30s, 5m, 2h or "
                                     "5d, got 'x'"),
    ({"firewall": {"exempt_users": ["no-such-user-fw"]}},
     "firewall.exempt_users[0]: no such user 'no-such-user-fw' on this system"),
    ({"firewall": {"daemon_user": 1.5}},
     "firewall.daemon_user: expected a uid number or a user name, got 1.5"),
    ({"firewall": {"daemon_user": 0}}, None),  # falsy: none, like before
    ({"firewall": {"capture": {"listen_port": -5}}},
     "firewall.capture.listen_port: expected a whole number >= 1, got -5"),
    ({"firewall": {"capture": {"port": 1}}},
     "firewall.capture: unknown key 'port' (known keys: listen_port)"),
    ({"firewall": {"log_rate": "10/week"}}, "firewall.log_rate: expected like 10/minute, got "
                                            "'10/week'"),
]


@pytest.mark.parametrize(("raw", "text"), ERRORS)
def test_error_texts_and_paths(raw: Any, text: str | None) -> None:
    if text is None:
        parse_config(raw, None)
        return
    with pytest.raises(ConfigError) as info:
        parse_config(raw, None)
    assert str(info.value) == f"<built-in defaults>: {text}"


def test_missing_keys_are_reported_before_wrong_ones() -> None:
    with pytest.raises(ConfigError, match=r"admin.relay_login: missing key 'password_file'"):
        parse_config({"admin": {"relay_login": {"user": 7}}}, None)


def test_sites_inherit_default_quota_and_outbreak() -> None:
    c = parse_config({
        "default_quota": {"per_hour": 10, "per_day": 100},
        "outbreak": {"new_script": {"count": 5}, "recipient_domains_per_hour": None},
        "sites": {
            "plain.test": SITE,
            "own.test": {**SITE, "quota": {"per_hour": 2, "per_day": None},
                         "outbreak": {"quota_refusals": {"count": 3, "window": "1m"}}},
            "calm.test": {**SITE, "outbreak": False},
        },
        "default_site": {"quota": {"recipients_per_message": 4}},
    }, None)
    plain, own, calm = (c.sites[n] for n in ("plain.test", "own.test", "calm.test"))
    assert plain.quota == config.Quota(10, 100, None, None)
    assert own.quota == config.Quota(2, None, None, None)
    assert c.default_site is not None and c.default_site.name == "default"
    assert c.default_site.quota == config.Quota(10, 100, 4, None)
    assert plain.outbreak == c.default_outbreak == config.OutbreakRules(
        new_script_count=5, recipient_domains_per_hour=None)
    assert own.outbreak == config.OutbreakRules(
        quota_refusals=3, quota_refusals_window=60.0, new_script_count=5,
        recipient_domains_per_hour=None)
    assert calm.outbreak is None


def test_outbreak_off_at_top_level_still_lets_a_site_set_rules() -> None:
    c = parse_config({"outbreak": False, "sites": {
        "a.test": SITE, "b.test": {**SITE, "outbreak": {"relay_5xx_share": {"share": 1}}},
        "c.test": {**SITE, "outbreak": None}}}, None)
    assert c.default_outbreak is None and c.sites["a.test"].outbreak is None
    assert c.sites["b.test"].outbreak == config.OutbreakRules(relay_5xx_share=1.0)
    assert c.sites["c.test"].outbreak == config.OutbreakRules()


def test_a_rule_given_without_its_threshold_is_off() -> None:
    rules = parse_config({"outbreak": {"quota_refusals": {"window": "5m"},
                                       "relay_5xx_share": {"min_results": 3},
                                       "new_script": None}}, None).default_outbreak
    assert rules == config.OutbreakRules(quota_refusals=None, quota_refusals_window=300.0,
                                         relay_5xx_share=None, relay_5xx_min_results=3,
                                         new_script_count=None)


@pytest.mark.parametrize(("relay", "port"), [
    ({"host": "r.test"}, 587), ({"host": "r.test", "tls": "implicit"}, 465),
    ({"host": "::1", "tls": "none"}, 25), ({"host": "r.test", "tls": "none",
                                          "allow_plaintext": True}, 25),
    ({"host": "r.test", "port": 2525}, 2525),
])
def test_relay_port_follows_tls(relay: dict[str, Any], port: int) -> None:
    assert parse_config({"relays": [relay]}, None).relays[0].port == port


def test_odd_values_read_as_before() -> None:
    c = parse_config({"queue_scan_interval": 0, "relays": None, "sites": None,
                      "default_site": None, "admin": {"sender": "", "relay_login": {}},
                      "firewall": {"daemon_user": "", "capture": {"listen_port": 0},
                                   "log_rate": "3/second"}}, None)
    assert c.queue_scan_interval == 0.2 and c.relays == () and c.sites == {}
    assert c.default_site is not None and c.default_site.quota == config.Quota()
    assert c.admin.sender is None and c.admin.relay_login is None
    assert c.firewall == config.Firewall(log_rate="3/second")


FULL = """\
spool: {spool}
message_size_limit: 5000000
hostname: mx.example.test
log: {{target: syslog, level: debug}}
relays:
  - {{host: relay1.example.net, port: 2587, tls: starttls, verify: false, ca_file: /ca.pem,
     timeout: 1m}}
  - {{host: 127.0.0.1, tls: none}}
retry: {{initial: 1m, maximum: 2h, lifetime: 3d, jitter: 0.1}}
queue_scan_interval: 2s
connections_per_uid: 4
default_quota: {{per_day: 1000}}
outbreak: {{recipient_domains_per_hour: 50}}
sites:
  Example.com:
    uids: [root, 1234]
    docroots: [/var/www/example/./public/]
    domains: [Example.COM., bücher.test]
    sender: noreply@example.com
    relay_login: {{user: example.com, password_file: /etc/s/example.com}}
    quota: {{per_hour: 100}}
    sender_policy: {{envelope: refuse, from_header: rewrite}}
    dkim_selectors: [s1]
    allow_submission: [smtp.example.net]
default_site: {{domains: [host.example.test], outbreak: false}}
accounts:
  root: {{quota: {{per_hour: 7}}}}
admin:
  notify: [ops@example.test]
  sender: shim@example.test
  relay_login: {{user: ops, password_file: /etc/s/ops}}
  group: root
local_mx: [MX1.Example.Test.]
local_addresses: [192.0.2.1, "2001:db8::1"]
local_transport: lmtp:unix:/run/dovecot/lmtp
routing: {{Example.COM.: local, other.test: remote}}
resolver: {{nameservers: [192.0.2.53], port: 5353, timeout: 2s}}
firewall:
  daemon_user: root
  exempt_users: [root]
  capture: {{listen_port: 10025}}
  log_rate: 5/minute
"""


def test_full_example_round_trip(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "config.yaml")
    with open(path, "w") as fh:
        fh.write(FULL.format(spool=os.path.join(tmp_path, "spool")))
    c = load_config(path)
    assert (c.path, c.spool, c.message_size_limit, c.hostname) == (
        path, os.path.join(tmp_path, "spool"), 5_000_000, "mx.example.test")
    assert (c.log_target, c.log_level) == ("syslog", "debug")
    assert c.relays == (
        config.Relay("relay1.example.net", 2587, "starttls", False, "/ca.pem", 60.0, False),
        config.Relay("127.0.0.1", 25, "none"))
    assert c.retry == config.RetryPolicy(60.0, 7200.0, 259200.0, 0.1)
    assert (c.queue_scan_interval, c.connections_per_uid) == (2.0, 4)
    outbreak = config.OutbreakRules(recipient_domains_per_hour=50)
    assert c.sites == {"Example.com": config.Site(
        name="Example.com", uids=(0, 1234), docroots=("/var/www/example/public",),
        domains=("example.com", "bücher.test"), sender="noreply@example.com",
        relay_login=config.RelayLogin("example.com", "/etc/s/example.com"),
        quota=config.Quota(per_hour=100, per_day=1000), envelope_policy="refuse",
        from_policy="rewrite", outbreak=outbreak, dkim_selectors=("s1",),
        allow_submission=("smtp.example.net",))}
    assert c.default_site == config.Site(name="default", domains=("host.example.test",),
                                         quota=config.Quota(per_day=1000), outbreak=None)
    assert c.accounts == {0: config.Quota(per_hour=7)}
    assert c.admin == config.Admin(("ops@example.test",), "shim@example.test",
                                   config.RelayLogin("ops", "/etc/s/ops"), "root")
    assert (c.local_mx, c.local_addresses) == (("mx1.example.test",),
                                               ("192.0.2.1", "2001:db8::1"))
    assert c.local_transport == config.LocalTransport("lmtp", socket_path="/run/dovecot/lmtp")
    assert c.routing == {"example.com": "local", "other.test": "remote"}
    assert (c.resolver_nameservers, c.resolver_port, c.resolver_timeout) == (
        ("192.0.2.53",), 5353, 2.0)
    assert c.firewall == config.Firewall("root", ("root",), 10025, "5/minute")
    assert [s.name for s in c.sites_of_uid(1234)] == ["Example.com"]


@pytest.mark.parametrize(("text", "wanted"), [
    ("spool: >-\n  /var/spool/elsewhere\n", "write each as one plain top-level line"),
    ("message_size_limit: 0x10\n", "message_size_limit: expected a whole number of bytes, got "
                                   "'0x10' (the sendmail front end reads this line without "
                                   "YAML)"),
    ("sites: [\n", "not valid YAML"),
])
def test_load_errors_name_the_file(tmp_path: os.PathLike[str], text: str, wanted: str) -> None:
    path = os.path.join(tmp_path, "config.yaml")
    with open(path, "w") as fh:
        fh.write(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(path) and wanted in str(info.value)
    assert isinstance(info.value, SettingsError)  # one except clause catches both


def test_unreadable_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "absent.yaml")
    with pytest.raises(ConfigError, match=f"cannot read configuration file {path}: "):
        load_config(path)


def test_no_file_means_built_in_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.paths, "find_config", lambda explicit: None)
    assert load_config().path is None


def test_account_uids_may_be_written_as_numbers() -> None:
    """YAML reads ``1001:`` as a number; the man page allows uids under accounts."""
    c = parse_config(yaml.safe_load("accounts:\n  1001: {quota: {per_hour: 3}}\n"), None)
    assert c.accounts == {1001: config.Quota(per_hour=3)}


@pytest.mark.parametrize("domain", ["a..b", "x" * 70 + ".test", "-\u00e9" * 40])
def test_a_routing_domain_idna_cannot_encode_is_a_config_error(domain: str) -> None:
    with pytest.raises(ConfigError, match=r"routing\..*not a valid domain name"):
        parse_config({"local_transport": "lmtp://127.0.0.1:24",
                      "routing": {domain: "local"}}, "/etc/x.yaml")


def test_scan_unscored_pool_must_name_a_pool(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("scan: {enabled: true, on_failure: deliver, unscored_pool: grey}\n")
    with pytest.raises(ConfigError, match=r"scan.unscored_pool: no pool 'grey'"):
        load_config(str(path))
    path.write_text("pools: [{name: grey}]\nrelays: [{host: 127.0.0.1, pool: grey}]\n"
                    "scan: {enabled: true, on_failure: deliver, unscored_pool: grey}\n")
    assert load_config(str(path)).scan.unscored_pool == "grey"
