"""config/fragments.py and the loader's sites.d rules: which files, their order, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sendmail_shim.config import ConfigError, fragments, load_config

MAIN = """spool: {spool}
relays:
  - {{host: 127.0.0.1, port: 2525, tls: none}}
sites:
  main.test:
    uids: [5001]
    domains: [main.test]
    docroots: [/home/a/main]
"""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(MAIN.format(spool=tmp_path / "spool"))
    (tmp_path / "sites.d").mkdir()
    return path


def put(conf: Path, name: str, text: str) -> Path:
    path = conf.parent / "sites.d" / name
    path.write_text(text)
    return path


def test_fragments_join_the_main_sites_in_name_order(conf: Path) -> None:
    put(conf, "b.test.yaml", "uids: [5003]\ndomains: [b.test]\n")
    put(conf, "a.test.yaml", "uids: [5002]\ndomains: [a.test]\nquota: {per_hour: 7}\n")
    config = load_config(str(conf))
    assert list(config.sites) == ["main.test", "a.test", "b.test"]
    assert config.sites["a.test"].quota.per_hour == 7
    assert config.sites["b.test"].uids == (5003,)


def test_editor_backup_and_hidden_files_are_not_read(conf: Path) -> None:
    for name in (".a.test.yaml.swp", "a.test.yaml~", "a.test.yaml.bak", "a.test.yaml.dpkg-old",
                 ".b.test.yaml.tmp-1-ab", "c.test.yml", "README", ".yaml"):
        put(conf, name, "{{{ not yaml")
    config = load_config(str(conf))
    assert list(config.sites) == ["main.test"]
    assert fragments.ignored(str(conf.parent / "sites.d")) == ["c.test.yml"]


def test_missing_directory_is_no_sites(conf: Path) -> None:
    os.rmdir(conf.parent / "sites.d")
    assert list(load_config(str(conf)).sites) == ["main.test"]


def test_sites_dir_key_moves_the_directory(conf: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "x.test.yaml").write_text("uids: [5009]\ndomains: [x.test]\n")
    put(conf, "ignored.test.yaml", "uids: [5010]\n")
    conf.write_text(conf.read_text() + f"sites_dir: {other}\n")
    assert list(load_config(str(conf)).sites) == ["main.test", "x.test"]


def test_yaml_error_names_file_and_line(conf: Path) -> None:
    path = put(conf, "bad.test.yaml", "uids: [5002]\ndomains: [bad.test\nquota: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf))
    text = str(caught.value)
    assert text.startswith(f"{path}: line 3, column ")
    assert "not valid YAML" in text


def test_schema_error_names_file_and_line_of_the_key(conf: Path) -> None:
    path = put(conf, "bad.test.yaml", "uids: [5002]\n\n\ndomains: [-no-]\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 4: domains\[0\]: not a domain"):
        load_config(str(conf))
    put(conf, "bad.test.yaml", "uids: [5002]\nquota_x: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 2: unknown key 'quota_x'"):
        load_config(str(conf))
    put(conf, "bad.test.yaml", "domains: [bad.test]\n")
    with pytest.raises(ConfigError, match=rf"^{path}: .*uids"):
        load_config(str(conf))


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n"])
def test_a_fragment_is_a_mapping(conf: Path, text: str) -> None:
    path = put(conf, "odd.test.yaml", text)
    with pytest.raises(ConfigError, match=rf"^{path}: line 1: expected the site's keys"):
        load_config(str(conf))


def test_file_names_that_cannot_be_site_names_are_errors(conf: Path) -> None:
    path = put(conf, "two words.yaml", "uids: [5002]\n")
    with pytest.raises(ConfigError, match=r"cannot be a site name \(.*\); rename the file"):
        load_config(str(conf))
    os.unlink(path)
    put(conf, "default.yaml", "uids: [5002]\n")
    with pytest.raises(ConfigError, match=r"default\.yaml: the site name default is reserved"):
        load_config(str(conf))


def test_a_site_defined_twice_names_both_files(conf: Path) -> None:
    path = put(conf, "main.test.yaml", "uids: [5002]\ndomains: [other.test]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf))
    assert str(caught.value) == (f"site main.test is defined twice: in {conf} (sites.main.test) "
                                 f"and in {path}; remove one")


def test_a_domain_claimed_twice_names_both_files(conf: Path) -> None:
    a = put(conf, "a.test.yaml", "uids: [5002]\ndomains: [shared.test]\n")
    b = put(conf, "b.test.yaml", "uids: [5003]\ndomains: [Shared.Test.]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf))
    assert f"site a.test ({a})" in str(caught.value)
    assert f"site b.test ({b})" in str(caught.value)
    os.unlink(b)
    put(conf, "b.test.yaml", "uids: [5003]\ndomains: [main.test]\n")
    with pytest.raises(ConfigError, match=rf"domain main.test is claimed by site main.test "
                                          rf"\({conf} \(sites.main.test\)\)"):
        load_config(str(conf))


def test_one_uid_may_own_several_sites_but_not_one_docroot_twice(conf: Path) -> None:
    put(conf, "a.test.yaml", "uids: [5001]\ndomains: [a.test]\ndocroots: [/home/a/other]\n")
    assert len(load_config(str(conf)).sites) == 2
    path = put(conf, "b.test.yaml", "uids: [5001]\ndomains: [b.test]\ndocroots: [/home/a/main/]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf))
    assert "uid 5001 has docroot /home/a/main in site main.test" in str(caught.value)
    assert str(path) in str(caught.value)


def test_swap_reads_another_file_or_leaves_a_site_out(conf: Path, tmp_path: Path) -> None:
    put(conf, "a.test.yaml", "uids: [5002]\ndomains: [a.test]\n")
    candidate = tmp_path / "sites.d" / ".a.test.tmp-1"
    candidate.write_text("uids: [5004]\ndomains: [a.test]\n")
    assert load_config(str(conf), {"a.test": str(candidate)}).sites["a.test"].uids == (5004,)
    assert "a.test" not in load_config(str(conf), {"a.test": None}).sites
    assert "n.test" in load_config(str(conf), {"a.test": None, "n.test": str(candidate)}).sites
