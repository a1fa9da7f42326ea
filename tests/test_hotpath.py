"""The sendmail hot path imports only what it needs: PHP waits for us on every mail()."""

from __future__ import annotations

import subprocess

import pytest
from conftest import ADMIN, Relay, Shim

# What a plain "-t -i" submission must never import (ARCHITECTURE.md, issue 2),
# plus the stdlib modules we avoid on purpose because each costs milliseconds.
BANNED = {"asyncio", "dns", "yaml", "click", "aiosmtplib", "aiosmtpd", "platformdirs",
          "filelock", "email", "json", "logging", "socket", "dataclasses", "typing", "re",
          "enum", "subprocess", "tempfile", "prometheus_client"}


def imported_modules(stderr: bytes) -> set[str]:
    """Every module imported, by full dotted name (-X importtime's report)."""
    names = set()
    for line in stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


@pytest.mark.parametrize("daemon_up", [True, False], ids=["socket", "drop-file"])
def test_plain_submission_imports_nothing_heavy(system: tuple[Shim, Relay],
                                                daemon_up: bool) -> None:
    shim, relay = system
    if not daemon_up:
        shim.stop()
    done = shim.sendmail(["-t", "-i"], b"To: a@example.net\nSubject: s\n\nx\n",
                         env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0
    modules = imported_modules(done.stderr)
    assert "sendmail_shim.frontend.sendmail" in modules  # the measurement itself works
    assert {name.split(".")[0] for name in modules} & BANNED == set()
    # The runtime side of the import contract: only the front end's and wire/'s own code.
    ours = {name for name in modules if name.startswith("sendmail_shim.")}
    assert ours == {name for name in ours
                    if name.split(".")[1] in ("frontend", "wire")}, sorted(ours)
    if not daemon_up:
        shim.start()
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
