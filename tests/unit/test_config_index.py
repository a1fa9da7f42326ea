"""Indexes over a loaded configuration (issue 23, scale): the hand-off must not scan sites.

``Config.sites_of_uid`` answers from a uid -> sites index built once per Config;
these tests pin that it gives what the scan of every site gave (order included),
that it is built once, and that a new Config (a reload) has its own.  The front
end's two settings are found without reading a large file to its end
(``wire.paths.read_frontend_settings``) and with the same first-line-wins rule.
The daemon's reader in a forked child (``config/isolated.py``) gives the same
Config and the same error text as ``load_config``, and a stuck child is killed.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sendmail_shim.config import Config, Site, parse_config
from sendmail_shim.policy.identity import Caller, identify
from sendmail_shim.wire import paths


def scan(config: Config, uid: int) -> list[Site]:
    """What sites_of_uid answered before the index: every site, in order."""
    return [site for site in config.sites.values() if uid in site.uids]


def test_sites_of_uid_matches_the_scan_in_order() -> None:
    rng = random.Random(23)
    sites = {f"s{i}.test": {"uids": rng.sample(range(1000, 1040), rng.randint(1, 3))}
             for i in range(300)}
    config = parse_config({"sites": sites}, None)
    for uid in range(990, 1050):
        assert config.sites_of_uid(uid) == scan(config, uid), uid
    assert config.sites_of_uid(5) == []


def test_a_uid_listed_twice_in_one_site_gives_that_site_once() -> None:
    config = parse_config({"sites": {"a.test": {"uids": [7, 7]}, "b.test": {"uids": [7]}}},
                          None)
    assert [s.name for s in config.sites_of_uid(7)] == ["a.test", "b.test"]


def test_the_index_is_built_once_per_configuration() -> None:
    config = parse_config({"sites": {"a.test": {"uids": [7]}}}, None)
    first = config._sites_by_uid
    config.sites_of_uid(7)
    assert config._sites_by_uid is first
    # the caller's list is its own: changing it does not change the index
    config.sites_of_uid(7).clear()
    assert [s.name for s in config.sites_of_uid(7)] == ["a.test"]


def test_a_reloaded_configuration_has_its_own_index() -> None:
    old = parse_config({"sites": {"a.test": {"uids": [7]}}}, None)
    assert [s.name for s in old.sites_of_uid(7)] == ["a.test"]
    new = parse_config({"sites": {"b.test": {"uids": [7]}, "a.test": {"uids": [8]}}}, None)
    assert [s.name for s in new.sites_of_uid(7)] == ["b.test"]
    assert [s.name for s in new.sites_of_uid(8)] == ["a.test"]
    assert [s.name for s in old.sites_of_uid(7)] == ["a.test"]


def test_identify_uses_the_index_with_many_sites() -> None:
    sites = {f"s{i}.test": {"uids": [100000 + i], "docroots": [f"/srv/s{i}"]}
             for i in range(2000)}
    sites["shared.test"] = {"uids": [101999], "docroots": ["/srv/shared"]}
    config = parse_config({"sites": sites}, None)
    found = identify(config, Caller(uid=101999, gid=1, pid=None, cwd="/srv/shared/x"))
    assert found.site is not None and found.site.name == "shared.test"
    found = identify(config, Caller(uid=101999, gid=1, pid=None))
    assert found.site is not None and found.site.name == "s1999.test"  # first listed
    assert identify(config, Caller(uid=99, gid=1, pid=None)).site is None


def write(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    return str(path)


def sites_text(count: int) -> bytes:
    return b"sites:\n" + b"".join(b"  s%d.test:\n    uids: [%d]\n" % (i, 1000 + i)
                                  for i in range(count))


def test_settings_after_the_first_read_are_found(tmp_path: Path) -> None:
    body = sites_text(5000)
    assert len(body) > 2 * paths.FIRST_READ
    path = write(tmp_path, body + b"spool: /var/spool/late\nmessage_size_limit: 4000\n")
    assert paths.read_frontend_settings(path) == {"spool": "/var/spool/late",
                                                  "message_size_limit": "4000"}


def test_a_line_cut_by_the_first_read_is_read_whole(tmp_path: Path) -> None:
    pad = b"# " + b"x" * (paths.FIRST_READ - 12) + b"\n"
    path = write(tmp_path, pad + b"spool: /var/spool/cut-here-and-on\n")
    assert paths.FIRST_READ - len(pad) < len(b"spool: /var/spool/cut-here-and-on")
    assert paths.read_frontend_settings(path) == {"spool": "/var/spool/cut-here-and-on"}


@pytest.mark.parametrize(("text", "expected"), [
    (b"spool: /a\nspool: /b\n", {"spool": "/a"}),  # the first wins, as before
    (b"xspool: /no\n  spool: /no\n#spool: /no\nspool: /yes\n", {"spool": "/yes"}),
    (b"spool: /cr\rmessage_size_limit: 9\r", {"spool": "/cr", "message_size_limit": "9"}),
    (b"spool: /crlf\r\nmessage_size_limit: 8\r\n",
     {"spool": "/crlf", "message_size_limit": "8"}),
    (b"spool: '/quoted'  \nmessage_size_limit: 7 # bytes", {"spool": "/quoted",
                                                            "message_size_limit": "7"}),
    (b"spool : /spaced\n", {}),
    (b"sites: {}\n", {}),
])
def test_settings_lines(tmp_path: Path, text: bytes, expected: dict[str, str]) -> None:
    assert paths.read_frontend_settings(write(tmp_path, text)) == expected


def test_a_value_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, b"spool: /var/\xff\n")
    with pytest.raises(paths.SettingsError, match="not UTF-8"):
        paths.read_frontend_settings(path)


def test_the_isolated_reader_gives_the_same_config(tmp_path: Path) -> None:
    text = (f"spool: {tmp_path}/spool\nsites:\n" + "".join(
        f"  s{i}.test:\n    uids: [{1000 + i % 7}]\n    domains: [s{i}.test]\n"
        f"    quota: {{per_hour: {i + 1}}}\n" for i in range(200)))
    path = write(tmp_path, text.encode())
    from sendmail_shim.config import load_config, load_config_isolated

    child = load_config_isolated(path)
    assert child == load_config(path)
    assert [s.name for s in child.sites_of_uid(1003)] == [
        s.name for s in load_config(path).sites_of_uid(1003)]


def test_the_isolated_reader_gives_the_same_error(tmp_path: Path) -> None:
    from sendmail_shim.config import ConfigError, load_config, load_config_isolated

    path = write(tmp_path, b"sites:\n  a.test: {uids: [5], quota: {per_hour: lots}}\n")
    with pytest.raises(ConfigError) as in_process:
        load_config(path)
    with pytest.raises(ConfigError) as isolated:
        load_config_isolated(path)
    assert str(isolated.value) == str(in_process.value)
    assert "sites.a.test.quota.per_hour" in str(isolated.value)


def test_a_stuck_reader_is_killed_and_reported(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from sendmail_shim.config import ConfigError, isolated, loader

    monkeypatch.setattr(isolated, "TIMEOUT", 0.5)
    monkeypatch.setattr(loader, "load_config", lambda path: time.sleep(60))
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"took more than 0\.5s and was stopped"):
        isolated.load_config_isolated(write(tmp_path, b"sites: {}\n"))
    assert time.monotonic() - started < 30
