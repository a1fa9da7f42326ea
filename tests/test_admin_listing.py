"""`sendmail-shim-admin`'s read-only commands: the same bytes without click as through it.

The entry point (``sendmail_shim.admin.main``) takes a plain ``queue list`` and its
read-only friends straight to the daemon's control socket; the other road is click's
(``sendmail_shim.admin.cli.main``).  Same queue, both roads: stdout, stderr and the exit
status are compared byte for byte.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time

import pytest
from conftest import ADMIN, BIN, DAEMON_USER, Relay, Shim

from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope

CLICK_ROAD = [os.path.join(BIN, "python"), "-c",
              "from sendmail_shim.admin.cli import main; main()"]
MESSAGE = b"Subject: held\n\n" + b"a line of the message body\n" * 20


def fill_hold(shim: Shim, count: int) -> list[str]:
    """``count`` messages in hold/ (the runner leaves them be), three days old, so the
    age column reads the same for an hour; statuses of every kind, one odd entry."""
    daemon = pwd.getpwnam(DAEMON_USER)
    uid = pwd.getpwnam("shimsite1").pw_uid
    arrival = time.time() - 3 * 86400
    ids = []
    for n in range(count):
        queue_id = f"{int(arrival * 1000) + n:011X}{n:05X}"
        odd = n == 1
        env = Envelope(queue_id=queue_id, site="gone\udcffsite" if odd else "site1.test",
                       uid=uid, sender="s\udcfe@x\r\ny" if odd else "noreply@site1.test",
                       recipients=[f"r{n}@example.net", "done@example.net"],
                       arrival=arrival, size=len(MESSAGE))
        status = spool.Status(attempts=n % 3, last_error=f"451 try later ({n})" if n % 2 else "",
                              done=["done@example.net"] if n % 4 == 0 else [],
                              score=2.5 if n % 5 == 0 else None,
                              scanned=spool.SCANNED_OK if n % 5 == 0 else None)
        paths = {os.path.join(shim.spool, "hold", queue_id):
                 spool.QUEUE_MAGIC + env.to_json() + b"\n" + MESSAGE,
                 os.path.join(shim.spool, "status", queue_id + ".json"):
                 json.dumps(status.__dict__).encode()}
        for path, data in paths.items():
            with open(path, "wb") as fh:
                fh.write(data)
            os.chown(path, daemon.pw_uid, daemon.pw_gid)
            os.chmod(path, 0o600)
        ids.append(queue_id)
    return ids


def both_roads(shim: Shim, *args: str) -> tuple[subprocess.CompletedProcess[bytes], ...]:
    return tuple(subprocess.run([*road, *args], capture_output=True, env=shim.env(),
                                timeout=60) for road in ([ADMIN], CLICK_ROAD))


def same(shim: Shim, *args: str) -> subprocess.CompletedProcess[bytes]:
    fast, slow = both_roads(shim, *args)
    assert (fast.returncode, fast.stderr, fast.stdout) == (
        slow.returncode, slow.stderr, slow.stdout), args
    return fast


def without_age(stdout: bytes) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    for line in lines:
        line.pop("age", None)
    return lines


def test_read_only_commands_print_the_same_bytes_on_both_roads(
        system: tuple[Shim, Relay]) -> None:
    shim, _relay = system
    ids = fill_hold(shim, 30)
    listing = same(shim, "queue", "list")
    assert listing.returncode == 0
    assert listing.stdout.count(b"!") >= 30 and b"-- " in listing.stdout.splitlines()[-1]
    assert b"gone\\xffsite" in listing.stdout and b"[score 2.5]" in listing.stdout
    assert b"451 try later (3)" in listing.stdout
    for args in (("queue", "list", "--site", "site1.test"), ("queue", "list", "--site=x.test"),
                 ("queue", "show", ids[3]), ("site", "list"), ("site", "show", "site1.test"),
                 ("quota", "show"), ("quota", "show", "site2.test"), ("relay", "list"),
                 ("top",), ("queue", "list", "--config", shim.config)):
        assert same(shim, *args).returncode == 0, args
    # The daemon's refusals: its text on stderr, its status.
    missing = same(shim, "queue", "show", "0123456789ABCDEF")
    assert missing.returncode != 0 and b"sendmail-shim-admin: " in missing.stderr
    assert same(shim, "site", "show", "nosuch.test").returncode != 0
    # JSON carries the age in tenths of a second: the rest must be the same.
    for args in (("queue", "list", "--json"), ("site", "list", "--json"),
                 ("quota", "show", "--json"), ("relay", "list", "--json")):
        fast, slow = both_roads(shim, *args)
        assert fast.returncode == slow.returncode == 0 and fast.stderr == slow.stderr == b""
        assert without_age(fast.stdout) == without_age(slow.stdout), args
    # Mistakes and help are click's own on both (the fast road hands them over): exit 2.
    for args in (("queue", "list", "--help"), ("queue", "list", "--nosuch"),
                 ("queue", "show"), ("queue", "list", "--json=1"), ("queue", "list", "x")):
        assert same(shim, *args).returncode == (0 if "--help" in args else 2), args


def test_no_daemon_both_roads_read_the_spool(system: tuple[Shim, Relay]) -> None:
    shim, _relay = system
    fill_hold(shim, 5)
    shim.stop()
    try:
        listing = same(shim, "queue", "list")
        assert listing.returncode == 0 and listing.stdout.count(b"!") >= 5
        same(shim, "queue", "show", "0123456789ABCDEF")
    finally:
        shim.start()


@pytest.mark.parametrize("road", ["fast", "click"])
def test_a_reader_that_stops_early_ends_the_listing_quietly(
        system: tuple[Shim, Relay], road: str) -> None:
    """``queue list | head``: status 1 and not a word on stderr (click's rule for a broken
    pipe), never the daemon-down road, which would read the spool itself."""
    shim, _relay = system
    fill_hold(shim, 1500)  # far more than a pipe holds
    cmd = [ADMIN] if road == "fast" else CLICK_ROAD
    proc = subprocess.Popen([*cmd, "queue", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=shim.env())
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(200).startswith(b"-Queue ID")
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(60) == 1
    assert stderr == b""
