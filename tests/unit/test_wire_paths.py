"""wire/paths.py without ``os``: the same joins, lookups and config search as with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sendmail_shim.admin.launcher import package_dir
from sendmail_shim.wire import paths


@pytest.mark.parametrize("directory", ["/var/spool/sendmail-shim", "/var/spool/x/", "/", "",
                                       "relative/dir"])
def test_join_is_os_path_join_for_a_relative_name(directory: str) -> None:
    assert paths.join(directory, "public") == os.path.join(directory, "public")


def test_layout_names_match_os_path_join() -> None:
    layout = paths.SpoolLayout("/srv/spool/")
    assert layout.socket == os.path.join("/srv/spool/", "public", "submit.sock")
    assert layout.lock == os.path.join("/srv/spool/", "status", "daemon.lock")
    assert layout.state_dir("deferred") == "/srv/spool/deferred"


def test_exists(tmp_path: Path) -> None:
    assert paths.exists(str(tmp_path))
    assert not paths.exists(str(tmp_path / "missing"))
    assert not paths.exists("bad\0path")


def test_getenv_follows_os_environ_once_os_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.ENV_CONFIG, "/etc/elsewhere.yaml")
    assert paths.getenv(paths.ENV_CONFIG) == "/etc/elsewhere.yaml"
    assert paths.find_config() == "/etc/elsewhere.yaml"
    monkeypatch.delenv(paths.ENV_CONFIG)
    assert paths.getenv(paths.ENV_CONFIG) is None


def test_without_os_the_environment_at_start_is_read_and_os_stays_unloaded() -> None:
    """As the front end runs (python3 -IS): the variable, undecodable bytes included."""
    code = ("import sys; sys.path.append(sys.argv[1]); from sendmail_shim.wire import paths; "
            "print(repr(paths.find_config()), 'os' in sys.modules)")
    value = b"/tmp/caf\xe9.yaml"  # not UTF-8: surrogateescape, as os.environ decodes it
    env = {os.fsencode(paths.ENV_CONFIG): value, b"PATH": b"/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-IS", "-c", code, package_dir()], env=env,
                          capture_output=True, check=True)
    assert done.stdout.decode().split() == [repr(os.fsdecode(value)), "False"]
