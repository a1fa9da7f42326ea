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
from typing import Any

from conftest import SENDMAIL, Relay, Shim, free_port, wait_until

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


SUBMIT_MANY = r"""
import subprocess, sys
for n in range(int(sys.argv[2])):
    subprocess.run([sys.argv[1], "-t", "-i"], check=True,
                   input=f"To: r{n}@example.net\nSubject: {n}\n\nx\n".encode())
"""
FLUSH_LOOP = r"""
import subprocess, sys, time
codes = []
for _ in range(int(sys.argv[2])):
    codes.append(subprocess.run([sys.argv[1], "-q"], capture_output=True).returncode)
    time.sleep(0.05)
print(sorted(set(codes)))
"""


def attempts(shim: Shim, site: str) -> int:
    return sum(1 for line in shim.daemon_log().splitlines()
               if "deferred queue_id=" in line and f" site={site} " in line)


def test_a_site_flush_loop_retries_only_its_own_mail_once(shim_factory: Any) -> None:
    """Issue 21, finding 8: a site's `sendmail -q` every 0.05 s made the relay retry another
    site's deferred mail thousands of times.  Now a site's flush retries only its own mail,
    at most once per FLUSH_INTERVAL; root's flush still retries everything."""
    _make_relay, make_shim = shim_factory
    shim = make_shim([free_port()])  # no relay listens: everything is deferred
    shim.edit_config("retry: {initial: 1s, maximum: 2s, lifetime: 1h, jitter: 0}",
                     "retry: {initial: 1h, maximum: 2h, lifetime: 1d, jitter: 0}")
    shim.start()
    env = [f"SENDMAIL_SHIM_CONFIG={shim.config}"]
    subprocess.run(["runuser", "-u", "shimsite2", "--", "env", *env, sys.executable, "-c",
                    SUBMIT_MANY, SENDMAIL, "30"], check=True, timeout=120)
    assert shim.sendmail(["-t", "-i"], b"To: own@example.net\n\nx\n").returncode == 0
    wait_until(lambda: attempts(shim, "site2.test") == 30 and attempts(shim, "site1.test") == 1,
               30, "every message tried once")
    done = subprocess.run(["runuser", "-u", "shimsite1", "--", "env", *env, sys.executable,
                           "-c", FLUSH_LOOP, SENDMAIL, "60"], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "[0]", done.stderr  # every flush answered: exit 0
    wait_until(lambda: attempts(shim, "site1.test") >= 2, 15, "site1's flush")
    time.sleep(2)  # a flush of the whole queue would have retried site2's mail by now
    print(f"after 60 flushes of site1: site2's mail tried {attempts(shim, 'site2.test')} "
          f"times (30 before), site1's {attempts(shim, 'site1.test')} (1 before)")
    assert attempts(shim, "site2.test") == 30  # none caused by site1's flushes
    assert attempts(shim, "site1.test") == 2  # one flush ran, 59 were ignored
    uid = int(subprocess.run(["id", "-u", "shimsite1"], capture_output=True, text=True).stdout)
    log = shim.daemon_log()
    assert log.count(f"flush requested uid={uid} ") == 1 and "scope=own" in log
    assert log.count(f"flush_ignored uid={uid} ") == 1  # one line for the interval
    assert shim.run(["-q"], user=None).returncode == 0  # root: the whole queue
    wait_until(lambda: attempts(shim, "site2.test") == 60, 20, "root's flush of site2's mail")
