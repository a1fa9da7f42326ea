"""The sendmail hot path imports only what it needs: PHP waits for us on every mail()."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ADMIN, SENDMAIL, Relay, Shim

from sendmail_shim.admin.launcher import launcher_text

# What a plain "-t -i" submission must never import (ARCHITECTURE.md, issue 2),
# plus the stdlib modules we avoid on purpose because each costs milliseconds.
BANNED = {"asyncio", "dns", "yaml", "click", "aiosmtplib", "aiosmtpd", "platformdirs",
          "filelock", "email", "json", "logging", "socket", "dataclasses", "typing", "re",
          "enum", "subprocess", "tempfile", "prometheus_client"}

# Issue 24: everything a plain submission (-t -i, or -i with recipients) may load beyond
# what the interpreter loads for `python3 -IS -c pass`, by full name.  A module more is a
# failure: each costs about 0.1 ms on PHP's hot path, `os` a millisecond
# (sendmail_shim/frontend/sendmail.py's docstring; docs/performance.md has the profile).
HOT_PATH = {
    "_socket",  # the C module; `socket` would cost an enum import
    "sendmail_shim", "sendmail_shim.frontend", "sendmail_shim.frontend.sendmail",
    "sendmail_shim.wire", "sendmail_shim.wire.client", "sendmail_shim.wire.lineends",
    "sendmail_shim.wire.paths", "sendmail_shim.wire.protocol",
}
# The drop road (daemon down) may add the drop file's writer and the front end's checks.
DROP_ROAD = HOT_PATH | {
    "os", "stat", "_stat", "posixpath", "genericpath", "_collections_abc",
    "sendmail_shim.wire.durable", "sendmail_shim.frontend.precheck",
}


def imported_modules(stderr: bytes) -> set[str]:
    """Every module imported, by full dotted name (-X importtime's report)."""
    names = set()
    for line in stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


def front_end_imports(shim: Shim, args: list[str], data: bytes) -> set[str]:
    """What the front end loads, run as a site user by the launcher installs get
    (admin/launcher.py's text: python3 -IS, this install's site-packages), beyond
    what the bare interpreter loads."""
    floor = subprocess.run([sys.executable, "-IS", "-X", "importtime", "-c", "pass"],
                           capture_output=True, check=True)
    done = shim.sendmail(["-IS", "-X", "importtime", "-c", launcher_text(), *args], data,
                         prog=sys.executable)
    assert done.returncode == 0, done.stderr
    modules = imported_modules(done.stderr)
    assert "sendmail_shim.frontend.sendmail" in modules  # the measurement itself works
    assert "encodings" in imported_modules(floor.stderr)
    return modules - imported_modules(floor.stderr)


@pytest.mark.parametrize("args", [["-t", "-i"], ["-i", "a@example.net"]],
                         ids=["-t -i", "-i rcpt"])
@pytest.mark.parametrize("daemon_up", [True, False], ids=["socket", "drop-file"])
def test_plain_submission_imports_only_the_allowlist(system: tuple[Shim, Relay],
                                                     daemon_up: bool, args: list[str]) -> None:
    shim, relay = system
    if not daemon_up:
        shim.stop()
    try:
        extra = front_end_imports(shim, args, b"To: a@example.net\nSubject: s\n\nx\n")
    finally:
        if not daemon_up:
            shim.start()
    allowed = HOT_PATH if daemon_up else DROP_ROAD
    assert extra - allowed == set(), sorted(extra - allowed)
    assert {name.split(".")[0] for name in extra} & BANNED == set()
    if daemon_up:
        assert {"os", "__future__", "errno", "sendmail_shim.wire.sysexits"} & extra == set()
    relay.wait(1)


def test_plain_submission_through_the_venv_launcher(system: tuple[Shim, Relay]) -> None:
    """The installed sendmail-shim, as PHP runs it: PYTHON* variables change nothing when
    it is the lean launcher (-I), and it finds its own site-packages (-S)."""
    shim, relay = system
    done = shim.sendmail(["-t", "-i"], b"To: a@example.net\nSubject: s\n\nx\n",
                         env={"PYTHONPROFILEIMPORTTIME": "1", "PYTHONPATH": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    with open(SENDMAIL, "rb") as fh:
        lean = fh.readline().rstrip().endswith(b" -IS")
    if lean:  # tests/run writes it (sendmail-shim-admin launcher)
        assert done.stderr == b""
    relay.wait(1)


def test_queue_list_against_the_daemon_loads_no_click_yaml_state_or_asyncio(
        system: tuple[Shim, Relay]) -> None:
    """`queue list` (mailq for the operator) while the daemon runs: the entry point and wire/."""
    shim, _relay = system
    for args in (["queue", "list"], ["queue", "list", "--json"], ["top"]):
        done = subprocess.run([ADMIN, *args], capture_output=True, timeout=60,
                              env={**shim.env(), "PYTHONPROFILEIMPORTTIME": "1"})
        assert done.returncode == 0, done.stderr
        modules = imported_modules(done.stderr)
        assert "sendmail_shim.admin" in modules  # the measurement itself works
        heavy = {"click", "yaml", "asyncio", "filelock", "sqlite3", "aiosmtplib", "dns",
                 "prometheus_client", "typing"}
        assert {name.split(".")[0] for name in modules} & heavy == set(), args
        ours = {name for name in modules if name.startswith("sendmail_shim.")}
        assert ours <= {"sendmail_shim", "sendmail_shim.admin"} | {
            name for name in ours if name.split(".")[1] == "wire"}, sorted(ours)
    listing = shim.admin("queue", "list")
    assert b"Mail queue is empty" in listing.stdout or b"Queue ID" in listing.stdout
    # Anything else goes through click, and so does `queue list` with the daemon down,
    # which loads the configuration and reads the spool.
    helped = subprocess.run([ADMIN, "queue", "list", "--help"], capture_output=True, timeout=60,
                            env={**shim.env(), "PYTHONPROFILEIMPORTTIME": "1"})
    assert helped.returncode == 0 and "click" in imported_modules(helped.stderr)
    shim.stop()
    try:
        direct = shim.admin("queue", "list")
        assert direct.returncode == 0, direct.stderr
    finally:
        shim.start()
