"""A full spool disk (issue 10, defect 6), on a real 2 MB tmpfs mounted over the spool.

Every ENOSPC answer is exit 75 naming the disk, on both roads; the daemon starts
on a full spool and says why it cannot accept; a delivered message needs no
space (it is only removed), so the queue drains on a full disk with each
message delivered exactly once.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Relay, Shim, spool_on_tmpfs, wait_until


@pytest.fixture
def tmpfs_shim(shim_factory: Any, accounts: dict[str, pwd.struct_passwd]
               ) -> Iterator[tuple[Shim, Relay]]:
    with spool_on_tmpfs(shim_factory, "2m") as (shim, make_relay, port):
        yield shim, make_relay(shim.logins, port)


def filler(shim: Shim) -> str:
    return os.path.join(shim.spool, "filler")


def fill(shim: Shim) -> None:
    """Take every free byte of the tmpfs (root's file, outside the queue)."""
    fd = os.open(filler(shim), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def free(shim: Shim) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(filler(shim))


def message(n: int, size: int = 0) -> bytes:
    return (f"To: to{n}@example.net\nSubject: full {n}\n\n".encode()
            + (b"x" * 76 + b"\n") * (size // 77) + b"end\n")


def assert_names_the_disk(shim: Shim, done: subprocess.CompletedProcess[bytes],
                          where: str) -> None:
    text = done.stderr.decode()
    assert done.returncode == 75, text
    assert "no space left on the disk holding" in text and where in text, text


def subjects(relay: Relay) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for _meta, data in relay.messages():
        for line in data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                found[line[9:].decode()] += 1
    return found


def test_filling_the_spool_with_submissions_ends_in_75(tmpfs_shim: tuple[Shim, Relay]) -> None:
    shim, relay = tmpfs_shim
    shim.start()  # the relay is down: everything waits in the queue
    accepted = []
    for n in range(60):
        done = shim.sendmail(["-t", "-i"], message(n, 100_000))
        if done.returncode != 0:
            assert_names_the_disk(shim, done, shim.spool)
            break
        accepted.append(n)
    else:
        raise AssertionError("the 2 MB spool never filled up")
    assert accepted, "nothing fitted at all"
    # A small message cannot fit either, whichever write fails first (SQLite or the spool).
    fill(shim)
    assert_names_the_disk(shim, shim.sendmail(["-t", "-i"], message(99)), shim.spool)
    assert "Traceback" not in shim.daemon_log()
    free(shim)
    relay.start()
    assert shim.sendmail(["-q"], b"").returncode == 0
    relay.wait(len(accepted), timeout=60)
    wait_until(lambda: not shim.queue_files("incoming") and not shim.queue_files("deferred"),
               30, "an empty queue")
    time.sleep(1.5)
    assert subjects(relay) == collections.Counter(f"full {n}" for n in accepted)


def test_relay_back_on_a_full_disk_sends_nothing_twice(tmpfs_shim: tuple[Shim, Relay]) -> None:
    # A delivered message needs no space: its only bookkeeping is its removal (no status
    # write), so the queue drains on a full disk and each message is sent once.  (An
    # outcome the disk does refuse pauses delivery: the unit tests of the runner.)
    shim, relay = tmpfs_shim
    # Deferred mail waits an hour: nothing is attempted until the flushes below.
    shim.edit_config("retry: {initial: 1s, maximum: 2s,", "retry: {initial: 1h, maximum: 2h,")
    shim.start()
    for n in range(3):
        assert shim.sendmail(["-t", "-i"], message(n)).returncode == 0
    wait_until(lambda: len(shim.queue_files("deferred")) == 3, 20, "three deferred messages")
    fill(shim)
    relay.start()
    for _ in range(3):  # the operator flushes, again and again
        assert shim.sendmail(["-q"], b"").returncode == 0
        time.sleep(1)
    relay.wait(3)
    wait_until(lambda: not shim.queue_files("incoming") and not shim.queue_files("deferred"),
               30, "an empty queue")
    free(shim)
    time.sleep(1.5)
    assert subjects(relay) == collections.Counter(f"full {n}" for n in range(3))
    assert "paused queue_id=" not in shim.daemon_log()


def test_drop_road_on_a_full_disk_says_no_space(tmpfs_shim: tuple[Shim, Relay]) -> None:
    shim, _relay = tmpfs_shim
    shim.start()
    shim.stop()  # the daemon is down: the front end writes a drop file
    fill(shim)
    assert_names_the_disk(shim, shim.sendmail(["-t", "-i"], message(1)),
                          os.path.join(shim.spool, "maildrop"))


def test_daemon_starts_on_a_full_spool_and_says_why(tmpfs_shim: tuple[Shim, Relay]) -> None:
    shim, relay = tmpfs_shim
    relay.start()
    shim.start()
    assert shim.sendmail(["-t", "-i"], message(1)).returncode == 0
    relay.wait(1)
    shim.stop()
    fill(shim)
    shim.start()  # must come up: the socket answers
    assert shim.proc is not None and shim.proc.poll() is None
    done = shim.sendmail(["-t", "-i"], message(2))
    assert_names_the_disk(shim, done, shim.spool)
    log = shim.daemon_log()
    assert "cannot accept mail:" in log and "Traceback" not in log
    free(shim)
    wait_until(lambda: "state database open again" in shim.daemon_log(), 20, "the state to open")
    assert shim.sendmail(["-t", "-i"], message(3)).returncode == 0
    relay.wait(2)
    assert subjects(relay) == collections.Counter({"full 1": 1, "full 3": 1})
