"""config.model / config.schema / config.manpage: the schema is declared once and used alike."""

from __future__ import annotations

import dataclasses
import os

import pytest

from sendmail_shim import config
from sendmail_shim.config import manpage, model, schema

MAN = os.path.join(os.path.dirname(__file__), "..", "..", "man", "sendmail-shim.yaml.5")
CLASSES = (model.Config, model.Relay, model.Pool, model.RetryPolicy, model.Site, model.Quota,
           model.OutbreakRules, model.RelayLogin, model.Admin, model.Firewall,
           model.Reputation, model.Zone, model.Scan, model.PolicyService, model.Dkim)
UNDECLARED = {"Config.path", "Site.name"}  # set by the loader, not read from a key


def test_key_tuples_are_derived_in_schema_order() -> None:
    assert config.TOP_KEYS == (
        "spool", "message_size_limit", "spool_site_share", "hostname", "node", "state", "log",
        "metrics", "relays",
        "pools", "retry", "queue_scan_interval", "connections_per_uid", "sites", "sites_dir",
        "relay_login_command", "default_site",
        "default_quota", "outbreak", "accounts", "admin", "local_mx", "local_addresses",
        "local_transport", "loopback_server_users", "routing", "resolver", "firewall",
        "reputation", "scan", "policy_service", "dkim")
    assert config.RELAY_KEYS == ("host", "port", "tls", "verify", "ca_file", "timeout",
                                 "allow_plaintext", "sessions", "name", "pool", "standby",
                                 "public_ip", "dkim_sign")
    assert config.SITE_KEYS == ("uids", "docroots", "domains", "sender", "relay_login",
                                "quota", "sender_policy", "outbreak", "dkim_selectors",
                                "allow_submission", "pool")
    assert config.QUOTA_KEYS == ("per_hour", "per_day", "recipients_per_message",
                                 "recipients_per_hour")
    assert config.OUTBREAK_KEYS == ("quota_refusals", "recipient_domains_per_hour",
                                    "relay_5xx_share", "new_script", "spam_score")
    assert config.LOG_KEYS == ("target", "level", "format")
    assert config.RETRY_KEYS == ("initial", "maximum", "lifetime", "jitter")
    assert config.ADMIN_KEYS == ("notify", "sender", "relay_login", "group")
    assert config.FIREWALL_KEYS == ("daemon_user", "exempt_users", "capture", "log_rate")
    assert config.RESOLVER_KEYS == ("nameservers", "port", "timeout")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_declares_a_documented_key(cls: type) -> None:
    declared = dict(model.keys_of(cls))
    for f in dataclasses.fields(cls):
        if f"{cls.__name__}.{f.name}" in UNDECLARED:
            assert f.name not in declared
            continue
        key = declared[f.name]
        assert key.doc and key.doc == key.doc.strip() and "\n" not in key.doc, f.name
        group = key.name.rpartition(".")[0]
        assert not group or group in model.GROUP_DOCS, key.name
        kind = key.kind.inner if isinstance(key.kind, schema.Optional) else key.kind
        if isinstance(kind, schema.Section):  # its keys are listed in a section of the page
            assert (kind.title, kind.cls) in manpage.SECTIONS, key.name


def test_defaults_of_an_empty_file() -> None:
    c = config.parse_config({}, None)
    assert (c.spool, c.message_size_limit) == ("/var/spool/sendmail-shim", 10_240_000)
    assert (c.log_target, c.log_level, c.relays, c.sites, c.default_site) == (
        "stderr", "info", (), {}, None)
    assert c.retry == config.RetryPolicy(300.0, 4000.0, 432000.0, 0.2)
    assert (c.queue_scan_interval, c.connections_per_uid) == (5.0, 16)
    assert c.default_quota == config.Quota(None, None, None, None)
    assert c.default_outbreak == config.OutbreakRules(20, 600.0, 200, 0.5, 20, 3600.0, 50,
                                                      3600.0)
    assert c.admin == config.Admin() and c.firewall == config.Firewall()
    assert (c.resolver_nameservers, c.resolver_port, c.resolver_timeout) == ((), 53, 3.0)
    assert (c.local_transport, c.routing, c.accounts) == (None, {}, {})
    assert c.hostname  # the machine's name


def test_admin_pseudo_site_uses_the_admin_login() -> None:
    c = config.parse_config({"admin": {"sender": "ops@x.test",
                                       "relay_login": {"user": "u", "password_file": "/p"}}},
                            None)
    site = c.site_named(config.ADMIN_SITE)
    assert site is not None and site.sender == "ops@x.test" and site.outbreak is None
    assert site.relay_login == config.RelayLogin("u", "/p")
    assert c.site_named("default") is None and c.site_named("nope") is None


@pytest.mark.parametrize(("kind", "value", "shown"), [
    (schema.Duration(), 300.0, "5m"), (schema.Duration(), 4000.0, "4000s"),
    (schema.Duration(), 432000.0, "5d"), (schema.Duration(), 0.5, "0.5s"),
    (schema.Duration(), 3600.0, "1h"), (schema.Duration(), 1209600.0, "2w"),
    (schema.Flag(), True, "true"), (schema.Whole(1), 16, "16"), (schema.Plain(), 0.2, "0.2"),
    (schema.Strings(), ("a", "b"), "a, b"),
])
def test_defaults_are_shown_as_written(kind: schema.Kind, value: object, shown: str) -> None:
    assert kind.show(value) == shown


def test_read_password_takes_the_first_line(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "pw")
    with open(path, "w") as fh:
        fh.write("s3cret\r\nsecond line\n")
    assert config.RelayLogin("u", path).read_password() == "s3cret"


def test_man_page_key_list_is_the_schema() -> None:
    with open(MAN, encoding="utf-8") as fh:
        page = fh.read()
    assert manpage.generated() in page, "run: python3 -m sendmail_shim.config.manpage " \
                                        "--write man/sendmail-shim.yaml.5"
    assert manpage.replaced(page) == page


def test_man_page_names_each_key_by_its_path() -> None:
    text = manpage.generated().replace("\\-", "-")
    for _, cls in manpage.SECTIONS:
        for _, key in model.keys_of(cls):
            assert f".B {key.name}\n" in text, key.name
    assert all(len(line.encode()) <= 80 for line in text.splitlines()[1:-1])


def test_manpage_write_replaces_only_the_generated_part(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "page.5")
    with open(path, "w") as fh:
        fh.write(f".TH X 5\nbefore\n{manpage.BEGIN}\nstale\n{manpage.END}\nafter\n")
    assert manpage.main(["--write", path]) == 0
    with open(path) as fh:
        assert fh.read() == f".TH X 5\nbefore\n{manpage.generated()}after\n"
    assert manpage.main(["--bogus"]) == 64
