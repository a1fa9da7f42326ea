"""One site's expensive or churning submissions never delay another site (issue 21).

Finding 1: a header block of one field and 990,000 continuation lines took
68.7 s to parse (``headers[-1] += line``), six copies at once held every
worker thread and another site's hand-off took 96.9 s.  Now the split is
linear and refused past the header limits (552 5.3.4, exit 65), and each
uid runs at most its share of the intake threads (daemon/workers.py).
Finding 8: four processes churning connections on the submit socket raised
another site's hand-off to 9.5 s.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time

from conftest import SENDMAIL, Relay, Shim, wait_until

from sendmail_shim.wire import protocol

HOSTILE = r"""
import subprocess, sys, threading, time
sendmail, config, path, parallel, seconds = sys.argv[1:6]
codes, errors = [], []
deadline = time.monotonic() + float(seconds)
def loop():
    while time.monotonic() < deadline:
        with open(path, "rb") as fh:
            done = subprocess.run([sendmail, "-t", "-i"], stdin=fh, capture_output=True,
                                  env={"SENDMAIL_SHIM_CONFIG": config, "PATH": "/usr/bin:/bin"})
        codes.append(done.returncode)
        errors.append(done.stderr)
threads = [threading.Thread(target=loop) for _ in range(int(parallel))]
print("started", flush=True)
for t in threads: t.start()
for t in threads: t.join()
print(sorted(set(codes)), len(codes), errors[-1][:300] if errors else b"", flush=True)
"""

CHURN = r"""
import socket, sys, time
path, seconds, send = sys.argv[1], float(sys.argv[2]), sys.argv[3].encode()
deadline, n = time.monotonic() + seconds, 0
while time.monotonic() < deadline:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        if send:
            s.send(send)
    except OSError:
        pass
    s.close()
    n += 1
print(n, flush=True)
"""


def _time_plain_handoffs(shim: Shim, count: int = 3) -> list[float]:
    """site2's plain hand-offs (the other site): each one's latency."""
    env = [f"SENDMAIL_SHIM_CONFIG={shim.config}"]
    latencies = []
    for i in range(count):
        start = time.monotonic()
        try:
            done = subprocess.run(["runuser", "-u", "shimsite2", "--", "env", *env, SENDMAIL,
                                   "-t", "-i"],
                                  input=b"To: a@example.net\nSubject: plain %d\n\nx\n" % i,
                                  capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("site2's hand-off waited behind site1's submissions") from None
        latencies.append(time.monotonic() - start)
        assert done.returncode == 0, done.stderr
        time.sleep(0.3)
    return latencies


def test_worst_case_header_blocks_from_one_site_do_not_delay_another(
        system: tuple[Shim, Relay]) -> None:
    shim, _relay = system
    path = os.path.join(shim.workdir, "hostile.eml")
    with open(path, "wb") as fh:  # the repro: one header, 990,000 continuation lines
        fh.write(b"To: a@example.net\nSubject: x\n" + b" \n" * 990_000 + b"\nbody\n")
    os.chmod(path, 0o644)
    hostile = subprocess.Popen(["runuser", "-u", "shimsite1", "--", sys.executable, "-c",
                                HOSTILE, SENDMAIL, shim.config, path, "6", "12"],
                               stdout=subprocess.PIPE)
    try:
        assert hostile.stdout is not None
        assert hostile.stdout.readline().startswith(b"started")
        time.sleep(1.0)
        latencies = _time_plain_handoffs(shim)
        print("site2 hand-offs while site1 sends 6 worst-case header blocks at once:",
              [f"{t:.3f}" for t in latencies])
        assert max(latencies) < 1.5
        out, _ = hostile.communicate(timeout=90)
    finally:
        hostile.kill()
        hostile.wait(10)
    # site1 was told at once, with the limit and its site's name.
    assert out.startswith(b"[65] "), out
    assert b"header_size_limit" in out and b"site1.test" in out
    assert "status=552 enhanced=5.3.4" in shim.daemon_log()


def test_connection_churn_from_one_uid_does_not_delay_another(
        system: tuple[Shim, Relay]) -> None:
    shim, _relay = system
    churners = [subprocess.Popen(["runuser", "-u", "shimsite1", "--", sys.executable, "-c",
                                  CHURN, shim.socket, "12", send], stdout=subprocess.PIPE)
                for send in ("", "", "x", "SENDMAIL-SHIM 1\n")]  # nothing, or a little
    try:
        time.sleep(2.0)
        latencies = _time_plain_handoffs(shim, 4)
        print("site2 hand-offs while site1 churns connections in 4 processes:",
              [f"{t:.3f}" for t in latencies])
        counts = [int(p.communicate(timeout=60)[0] or 0) for p in churners]
        print("site1's connections:", counts)
    finally:
        for p in churners:
            p.kill()
            p.wait(10)
    assert max(latencies) < 1.5


def test_bs_road_refuses_the_worst_case_header_block_at_once(
        system: tuple[Shim, Relay]) -> None:
    # -bs hands each transaction off through the socket: the same limits, the same answer.
    shim, _relay = system
    dialog = (b"EHLO site1\r\nMAIL FROM:<me@site1.test>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n"
              ) + b"Subject: x\r\n" + b" \r\n" * 990_000 + b"\r\nbody\r\n.\r\nQUIT\r\n"
    start = time.monotonic()
    done = shim.sendmail(["-bs"], dialog)
    took = time.monotonic() - start
    print(f"-bs session with 990,000 continuation lines: {took:.2f}s")
    assert b"552 5.3.4" in done.stdout and b"header_size_limit" in done.stdout, done.stdout
    assert took < 20  # 68 s for the parse alone before


def test_drop_road_refuses_worst_case_header_blocks_without_delaying_another(
        system: tuple[Shim, Relay]) -> None:
    # Drop files take the same intake (pickup's own threads): refused at once, by the limit.
    shim, _relay = system
    shim.stop()
    drop = os.path.join(shim.spool, "maildrop")
    uid = pwd.getpwnam("shimsite1").pw_uid
    hostile = b"Subject: x\n" + b" \n" * 990_000 + b"\nbody\n"
    for n in range(6):
        tmp = os.path.join(drop, f"t.hostile{n}")
        with open(tmp, "wb") as fh:
            fh.write(protocol.encode_request([("mode", "submit"), ("rcpt", "a@example.net")],
                                             hostile))
        os.chown(tmp, uid, -1)  # the setgid directory gave it the daemon's group
        os.chmod(tmp, 0o640)
        os.rename(tmp, os.path.join(drop, f"m.hostile{n}"))
    shim.start()
    latencies = _time_plain_handoffs(shim, 2)
    print("site2 hand-offs while pickup takes 6 worst-case drop files:",
          [f"{t:.3f}" for t in latencies])
    assert max(latencies) < 1.5
    wait_until(lambda: shim.daemon_log().count("origin=maildrop status=552 enhanced=5.3.4") == 6,
               15, "six refusals of the drop files by the header limit")
