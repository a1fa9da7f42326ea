"""One submission, two roads: the socket copy and the drop-file copy are queued once.

The front end sends a random ``subid`` on the socket and, when that road fails
(reply lost, timeout), the same bytes in a drop file.  Here the roads are
driven by hand with a fixed subid, as the site's own user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import Relay, Shim, wait_until

from sendmail_shim.wire import protocol

CLIENT = r"""
import sys
from sendmail_shim.wire import client
road, where = sys.argv[1], sys.argv[2]
data = sys.stdin.buffer.read()
if road == "socket":
    sys.stdout.write(client.send_request(where, data).decode())
else:
    sys.stdout.write(client.write_drop_file(where, data))
"""


def request(subid: str, subject: str) -> bytes:
    fields = [("mode", "submit"), ("subid", subid), ("rcpt", "to@example.net")]
    return protocol.encode_request(fields, f"Subject: {subject}\n\nbody\n".encode())


def hand(shim: Shim, road: str, data: bytes, user: str = "shimsite1") -> str:
    where = shim.socket if road == "socket" else os.path.join(shim.spool, "maildrop")
    done = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", CLIENT, road,
                           where], input=data, capture_output=True, timeout=60, check=True)
    return done.stdout.decode()


def drop_dir_empty(shim: Shim) -> bool:
    return not [n for n in os.listdir(os.path.join(shim.spool, "maildrop"))
                if n.startswith(("m.", "t."))]


def settle(shim: Shim, relay: Relay, count: int) -> None:
    """Wait for ``count`` messages and for the queue to be empty; then a few more scans."""
    relay.wait(count)
    wait_until(lambda: not shim.queue_files("incoming") and not shim.queue_files("deferred")
               and drop_dir_empty(shim), 20, "an empty queue and drop area")
    time.sleep(1.5)  # three scan intervals: a duplicate would be queued and sent by now


def test_drop_copy_of_an_ingested_drop_file_is_removed_not_queued(
        system: tuple[Shim, Relay]) -> None:
    """Issue 10, 4/3: a drop file left behind after its commit is not queued again."""
    shim, relay = system
    data = request("a" * 32, "left behind")
    hand(shim, "drop", data)
    settle(shim, relay, 1)
    # The same file again, as if the unlink after the commit had failed.
    hand(shim, "drop", data)
    assert shim.sendmail(["-q"], b"").returncode == 0
    wait_until(lambda: "duplicate queue_id=" in shim.daemon_log(), 15, "the duplicate line")
    settle(shim, relay, 1)
    assert len(relay.messages()) == 1
    assert "origin=maildrop" in shim.daemon_log().split("duplicate queue_id=")[1].split("\n")[0]


def test_socket_copy_then_drop_copy_is_delivered_once(system: tuple[Shim, Relay]) -> None:
    """The front end's fallback after a lost reply or a timeout must not deliver twice."""
    shim, relay = system
    data = request("b" * 32, "two roads")
    first = hand(shim, "socket", data)
    assert first.startswith("250 0 ") and "queued as" in first
    queue_id = first.rsplit(" ", 1)[1].strip()
    again = hand(shim, "socket", data)  # a second copy on the socket: the same answer
    assert again.startswith("250 0 ") and f"already queued as {queue_id}" in again
    hand(shim, "drop", data)
    assert shim.sendmail(["-q"], b"").returncode == 0
    wait_until(lambda: shim.daemon_log().count(f"duplicate queue_id={queue_id}") == 2, 15,
               "two duplicate lines")
    settle(shim, relay, 1)
    assert len(relay.messages()) == 1


def test_subid_is_per_uid(system: tuple[Shim, Relay]) -> None:
    """Another site that uses the same subid is not mistaken for a duplicate."""
    shim, relay = system
    hand(shim, "socket", request("c" * 32, "one"))
    reply = hand(shim, "socket", request("c" * 32, "two"), user="shimsite2")
    assert reply.startswith("250 0 ") and "already" not in reply
    settle(shim, relay, 2)
    assert len(relay.messages()) == 2


def test_front_end_sends_a_fresh_subid_each_time(system: tuple[Shim, Relay]) -> None:
    shim, relay = system
    for n in range(2):
        done = shim.sendmail(["-t", "-i"], f"To: a@example.net\nSubject: {n}\n\nx\n".encode())
        assert done.returncode == 0
    settle(shim, relay, 2)
    subids = [line.split(" subid=")[1].split()[0] for line in shim.daemon_log().splitlines()
              if "accepted queue_id=" in line and " subid=" in line]
    assert len(subids) == 2 and len(set(subids)) == 2 and all(len(s) == 32 for s in subids)
