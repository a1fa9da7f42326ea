"""Idle-connection flood: one site's open connections never delay another site.

Issue 10, defect 7: 3,000 idle connections from one uid made another site's
sendmail wait 300 s and fall back to a drop file, and the socket copy was
committed later as well.  Now each uid has its own connection slots
(``connections_per_uid``, default 16), a client that sends nothing is dropped
after a few seconds, and the front end's copies carry one submission id.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import SENDMAIL, Relay, Shim, wait_until

FLOOD = r"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = []
deadline = time.monotonic() + 20
while len(socks) < int(sys.argv[2]) and time.monotonic() < deadline:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(sys.argv[1])
    except BlockingIOError:  # the listen queue is full: the daemon is behind
        s.close()
        time.sleep(0.01)
        continue
    socks.append(s)
print(len(socks), flush=True)
sys.stdin.read()  # hold them until the test lets go
"""
CONNECTIONS = 3000


def test_idle_flood_from_one_uid_does_not_delay_another(system: tuple[Shim, Relay]) -> None:
    shim, relay = system
    flood = subprocess.Popen(["runuser", "-u", "shimsite1", "--", sys.executable, "-c", FLOOD,
                              shim.socket, str(CONNECTIONS)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert flood.stdout is not None
        opened = int(flood.stdout.readline())
        assert opened == CONNECTIONS, shim.daemon_log()[-3000:]
        env = [f"SENDMAIL_SHIM_CONFIG={shim.config}"]
        start = time.monotonic()
        try:
            done = subprocess.run(["runuser", "-u", "shimsite2", "--", "env", *env, SENDMAIL,
                                   "-t", "-i"], input=b"To: a@example.net\nSubject: other\n\nx\n",
                                  capture_output=True, timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError("site2's hand-off waited behind site1's connections") from None
        latency = time.monotonic() - start
        print(f"site2 hand-off during a flood of {opened} idle connections: {latency:.3f}s")
        assert done.returncode == 0, done.stderr
        assert latency < 2.0
        # The flooding site's own mail still goes out: over its share, by the drop area.
        mine = shim.sendmail(["-t", "-i"], b"To: b@example.net\nSubject: mine\n\nx\n")
        assert mine.returncode == 0, mine.stderr
    finally:
        flood.kill()
        flood.wait(10)
    log = shim.daemon_log()
    [site2] = [line for line in log.splitlines() if "accepted queue_id=" in line
               and "site=site2.test" in line]
    assert "origin=socket" in site2  # not the drop-file road
    assert "busy uid=" in log and "limit=16" in log
    got = relay.wait(2)
    wait_until(lambda: not shim.queue_files("incoming") and not os.listdir(
        os.path.join(shim.spool, "maildrop")), 20, "an empty queue and drop area")
    time.sleep(1.5)
    assert sorted(m[0]["rcpt_tos"][0] for m in relay.messages()) == ["a@example.net",
                                                                      "b@example.net"]
    assert len(got) == 2


def test_silent_client_is_dropped_within_seconds(system: tuple[Shim, Relay]) -> None:
    shim, _relay = system
    code = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            " t = time.monotonic(); r = s.recv(200); print(round(time.monotonic() - t, 1), r)")
    done = subprocess.run(["runuser", "-u", "shimsite1", "--", sys.executable, "-c", code,
                           shim.socket], capture_output=True, timeout=40, check=True)
    waited, reply = done.stdout.decode().split(" ", 1)
    assert float(waited) < 15 and "421 75" in reply
