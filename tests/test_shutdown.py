"""Stopping the daemon in the middle of a pickup backlog (issue 10, defect 10).

SIGTERM used to cancel the pickup task while its worker thread went on, and
then close the SQLite connection under that thread: segmentation faults, and a
drop file both queued and left in ``maildrop/`` (delivered twice).  Here the
daemon is stopped at seeded random moments while it ingests a backlog and
delivers it to a live relay, then restarted: it must exit 0 every time, and
every message must arrive exactly once.
"""

from __future__ import annotations

import collections
import os
import pwd
import random
import re
import signal
import time

from conftest import Relay, Shim, wait_until

from sendmail_shim.wire import protocol

BATCH = 200  # drop files written while the daemon is down, before each round
ROUNDS = 6
BACKLOG = BATCH * ROUNDS


def write_backlog(shim: Shim, user: str, numbers: range) -> None:
    """Drop files of ``user`` as its front end writes them (0640, daemon's group)."""
    drop = os.path.join(shim.spool, "maildrop")
    uid = pwd.getpwnam(user).pw_uid
    for n in numbers:
        request = protocol.encode_request(
            [("mode", "submit"), ("rcpt", f"backlog{n % 7}@example.net")],
            f"Subject: backlog {n}\nX-Backlog: {n}\n\nmessage {n}\n".encode())
        tmp = os.path.join(drop, f"t.{n:05d}")
        with open(tmp, "wb") as fh:
            fh.write(request)
        os.chown(tmp, uid, -1)  # the setgid directory gave it the daemon's group
        os.chmod(tmp, 0o640)
        os.rename(tmp, os.path.join(drop, f"m.{n:05d}"))
    os.sync()


def stop_with_sigterm(shim: Shim) -> int:
    assert shim.proc is not None
    # To the daemon itself: runuser, signalled, would report its own death by SIGTERM.
    shim.signal_daemon(signal.SIGTERM)
    status = shim.proc.wait(90)  # runuser returns the daemon's exit status
    shim.proc = None
    return status


def test_sigterm_during_pickup_backlog_loses_and_doubles_nothing(
        system: tuple[Shim, Relay]) -> None:
    shim, relay = system
    shim.stop()
    drop = os.path.join(shim.spool, "maildrop")
    rng = random.Random(20240610)
    rounds_in_pickup = 0
    for round_ in range(ROUNDS):
        write_backlog(shim, "shimsite1", range(round_ * BATCH, (round_ + 1) * BATCH))
        shim.start()  # returns once the socket exists; pickup has just begun
        time.sleep(rng.uniform(0.0, 0.4))
        left = sum(name.startswith("m.") for name in os.listdir(drop))
        status = stop_with_sigterm(shim)
        log = shim.daemon_log()
        assert status == 0, log[-3000:]
        assert "Traceback" not in log and "Segmentation fault" not in log, log[-3000:]
        rounds_in_pickup += left > 0
    assert rounds_in_pickup >= 2  # the signal did come during pickup, more than once
    shim.start()
    relay.wait(BACKLOG, timeout=120)
    wait_until(lambda: not os.listdir(drop) and not shim.queue_files("incoming")
               and not shim.queue_files("deferred"), 60, "the queue to drain")
    time.sleep(1.5)  # a duplicate would be on its way by now
    seen = collections.Counter(
        int(m.group(1)) for _, data in relay.messages()
        for m in [re.search(rb"X-Backlog: (\d+)", data)] if m)
    assert sorted(seen) == list(range(BACKLOG))
    assert [n for n, times in seen.items() if times > 1] == []
    assert shim.queue_files("corrupt") == []
    assert "Traceback" not in shim.daemon_log()
