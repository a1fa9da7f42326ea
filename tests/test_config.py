"""Configuration: errors name the file, the key and what is wrong; exit 78."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import ADMIN, SENDMAIL

from sendmail_shim.config import Config, ConfigError, load_config, parse_config
from sendmail_shim.policy.identity import Caller, identify


def write(tmp_path: os.PathLike[str], text: str) -> str:
    path = os.path.join(tmp_path, "config.yaml")
    with open(path, "w") as fh:
        fh.write(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("relay: []\n", "top level: unknown key 'relay'"),
    ("relays:\n  - {host: relay.example.net, tls: none}\n",
     "relays[0].tls: 'none' sends site passwords in clear text"),
    ("relays:\n  - {host: 127.0.0.1, port: 99999}\n", "relays[0].port"),
    ("sites:\n  a.test: {uids: [no-such-user-here]}\n",
     "sites.a.test.uids[0]: no such user 'no-such-user-here'"),
    ("sites:\n  a.test: {uids: []}\n", "sites.a.test.uids: expected a non-empty list"),
    ("sites:\n  a.test: {uids: [5], sender: nobody}\n", "sites.a.test.sender"),
    ("retry: {initial: soon}\n", "retry.initial: expected a duration"),
    ("spool: relative/path\n", "spool: expected an absolute path"),
    ("spool: {x: 1}\n", "spool"),
    ("message_size_limit: 10k\n", "message_size_limit"),
    ("sites: [\n", "not valid YAML"),
    ("sites:\n  a.test: {uids: [5], quota: {per_hour: -1}}\n", "sites.a.test.quota.per_hour"),
    ("sites:\n  a.test: {uids: [5], quota: {per_week: 1}}\n", "unknown key 'per_week'"),
    ("sites:\n  a.test: {uids: [5], sender_policy: {envelope: maybe}}\n",
     "sites.a.test.sender_policy.envelope: expected one of rewrite, refuse, keep"),
    ("outbreak: {relay_5xx_share: {share: 2}}\n", "outbreak.relay_5xx_share.share"),
    ("sites:\n  _admin: {uids: [5]}\n", "sites._admin: this name is reserved"),
    ("admin: {group: no-such-group-here}\n", "admin.group: no such group"),
    ("accounts:\n  no-such-user-x: {quota: {per_hour: 1}}\n", "no such user"),
])
def test_errors_name_file_and_key(tmp_path: os.PathLike[str], text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert path in str(info.value) and message in str(info.value)


def test_frontend_and_yaml_must_agree(tmp_path: os.PathLike[str]) -> None:
    path = write(tmp_path, "spool: >-\n  /var/spool/elsewhere\n")
    with pytest.raises(ConfigError, match="one plain top-level line"):
        load_config(path)


def test_quoted_spool_is_read_alike(tmp_path: os.PathLike[str]) -> None:
    path = write(tmp_path, "spool: '/var/spool/x'  \nmessage_size_limit: 2000 # bytes\n")
    config = load_config(path)
    assert (config.spool, config.message_size_limit) == ("/var/spool/x", 2000)


def test_admin_exits_78(tmp_path: os.PathLike[str]) -> None:
    path = write(tmp_path, "bogus: 1\n")
    done = subprocess.run([ADMIN, "config", "check", "--config", path], capture_output=True)
    assert done.returncode == 78 and b"unknown key 'bogus'" in done.stderr


def test_front_end_exits_78_on_bad_limit(tmp_path: os.PathLike[str]) -> None:
    path = write(tmp_path, "message_size_limit: lots\n")
    done = subprocess.run([SENDMAIL, "-t"], input=b"To: a@b.test\n\nx\n", capture_output=True,
                          env={"SENDMAIL_SHIM_CONFIG": path})
    assert done.returncode == 78 and path.encode() in done.stderr


def test_front_end_without_daemon_or_drop_dir_is_75(tmp_path: os.PathLike[str]) -> None:
    path = write(tmp_path, f"spool: {tmp_path}/nothing-here\n")
    done = subprocess.run([SENDMAIL, "-t"], input=b"To: a@b.test\n\nx\n", capture_output=True,
                          env={"SENDMAIL_SHIM_CONFIG": path})
    assert done.returncode == 75
    assert b"Nothing was accepted" in done.stderr and b"sendmail-shim-admin serve" in done.stderr


class TestIdentity:
    """The uid decides; hints choose only among that uid's sites."""

    config: Config = parse_config({"sites": {
        "one.test": {"uids": [2001], "docroots": ["/var/www/one"]},
        "two.test": {"uids": [2001], "docroots": ["/var/www/two", "/var/www/two/sub"]},
        "other.test": {"uids": [2002], "docroots": ["/var/www/other"]},
    }}, None)

    def pick(self, uid: int, cwd: str | None) -> str | None:
        site = identify(self.config, Caller(uid, uid, 1, cwd)).site
        return site.name if site else None

    def test_docroot_picks_among_own_sites(self) -> None:
        assert self.pick(2001, "/var/www/two/sub/dir") == "two.test"
        assert self.pick(2001, "/var/www/one") == "one.test"

    def test_hint_cannot_reach_another_uids_site(self) -> None:
        assert self.pick(2001, "/var/www/other") == "one.test"  # first of its own

    def test_prefix_is_path_aware(self) -> None:
        assert self.pick(2001, "/var/www/twofold") == "one.test"

    def test_unknown_uid_refused_or_default(self) -> None:
        assert self.pick(3000, None) is None
        config = parse_config({"default_site": {"domains": ["host.test"]}}, None)
        site = identify(config, Caller(3000, 3000, 1)).site
        assert site is not None and site.name == "default"
