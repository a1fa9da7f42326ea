"""The firewall, proven in network namespaces this test creates (ip netns, veth, nft).

near: where the sites, the daemon and its relay run, with our rules applied.
far:  a host with SMTP listeners on 25 and 587 (IPv4 10.201.0.2, IPv6 fd00:201::2).
Only these namespaces and their loopbacks are ever addressed.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ADMIN, IS_ROOT, Shim, free_port, wait_until

from sendmail_shim.admin.firewall import render_iptables, render_nft
from sendmail_shim.config import parse_config

FAR4, FAR6 = "10.201.0.2", "fd00:201::2"
LISTENER = r"""
import socket, threading
def serve(family, addr, port):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(b"220 far ESMTP\r\n"); c.close()
for fam, addr in ((socket.AF_INET, "10.201.0.2"), (socket.AF_INET6, "fd00:201::2")):
    for port in (25, 587, 6379):  # 6379: stands in for the fleet's Redis
        threading.Thread(target=serve, args=(fam, addr, port), daemon=True).start()
threading.Event().wait()
"""


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    if not IS_ROOT:
        pytest.skip("needs root for network namespaces")
    tag = uuid.uuid4().hex[:6]
    near, far = f"shimnear{tag}", f"shimfar{tag}"
    for ns in (near, far):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", f"vn{tag}", "netns", near, "type", "veth", "peer", f"vf{tag}",
       "netns", far)
    for ns, dev, v4, v6 in ((near, f"vn{tag}", "10.201.0.1/24", "fd00:201::1/64"),
                            (far, f"vf{tag}", "10.201.0.2/24", "fd00:201::2/64")):
        sh("ip", "-n", ns, "addr", "add", v4, "dev", dev)
        sh("ip", "-n", ns, "addr", "add", v6, "dev", dev, "nodad")
        sh("ip", "-n", ns, "link", "set", dev, "up")
    listener = subprocess.Popen(["ip", "netns", "exec", far, "/usr/bin/python3", "-c", LISTENER])
    try:
        wait_until(lambda: connect(near, None, FAR4, 25), 10, "far listener")
        yield near, far
    finally:
        listener.kill()
        listener.wait()
        for ns in (near, far):
            sh("ip", "netns", "del", ns)


def connect(ns: str, user: str | None, host: str, port: int) -> bool:
    code = (f"import socket; s = socket.create_connection(({host!r}, {port}), timeout=2); "
            "assert s.recv(100).startswith(b'220')")
    cmd = ["ip", "netns", "exec", ns]
    if user:
        cmd += ["runuser", "-u", user, "--"]
    return subprocess.run([*cmd, "/usr/bin/python3", "-c", code], capture_output=True,
                          timeout=20).returncode == 0


def fw_config(shim: Shim, capture_port: int | None = None) -> None:
    capture = f"  capture: {{listen_port: {capture_port}}}\n" if capture_port else ""
    shim.edit_config("sites:\n", f"firewall:\n  daemon_user: shimd\n{capture}sites:\n")
    shim.edit_config("    docroots: [/var/www/site1.test]\n",
                     f"    docroots: [/var/www/site1.test]\n    allow_submission: [{FAR4}]\n")


def apply(ns: str, shim: Shim) -> None:
    rules = subprocess.run([ADMIN, "firewall", "render", "--config", shim.config],
                           capture_output=True, text=True, check=True).stdout
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True,
                   check=True)


class TestBlocking:
    def test_site_uids_cannot_reach_port_25_the_daemon_can(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        near, _far = netns
        _make_relay, make_shim = shim_factory
        shim = make_shim([free_port()])
        fw_config(shim)
        assert connect(near, "shimsite1", FAR4, 25)  # before: the hole
        apply(near, shim)
        for host in (FAR4, FAR6):
            assert not connect(near, "shimsite1", host, 25), host
            assert not connect(near, "shimsite2", host, 25), host
            assert connect(near, "shimd", host, 25), host
            assert connect(near, None, host, 25), host  # root
        # site1's own provider account on 587 is allowed, site2's is not
        assert connect(near, "shimsite1", FAR4, 587)
        assert not connect(near, "shimsite2", FAR4, 587)
        assert not connect(near, "shimsite1", FAR6, 587)  # only the listed address

    def test_site_uids_cannot_reach_the_redis_state_the_daemon_can(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        """Redis keeps unauthenticated connections up to maxclients: a site that can reach
        it can fill them, and the nodes fail open (each counts the site's quota alone)."""
        near, _far = netns
        _make_relay, make_shim = shim_factory
        shim = make_shim([free_port()])
        fw_config(shim)
        with open(shim.config, "a") as fh:
            fh.write(f"state: {{backend: redis, url: 'redis://{FAR4}:6379/0'}}\n")
        assert connect(near, "shimsite1", FAR4, 6379)  # before: the hole
        apply(near, shim)
        assert not connect(near, "shimsite1", FAR4, 6379)
        assert not connect(near, "shimsite2", FAR4, 6379)
        assert connect(near, "shimd", FAR4, 6379)
        assert connect(near, None, FAR4, 6379)  # root
        assert connect(near, "shimsite1", FAR4, 587)  # other ports: as before

    def test_site_uids_reach_the_relays_only_through_the_daemon(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        """The relays had a hole of their own: any uid could speak SMTP to them on 25, 465
        and 587, bypassing the daemon (and its quotas and logs)."""
        near, _far = netns
        _make_relay, make_shim = shim_factory
        shim = make_shim([free_port()])
        fw_config(shim)
        shim.edit_config("relays:\n", "relays:\n" + "".join(
            f"  - {{host: '{host}', port: {port}}}\n" for host in (FAR4, FAR6)
            for port in (25, 587)))
        assert connect(near, "shimsite2", FAR4, 587)  # before: the hole
        apply(near, shim)
        for host in (FAR4, FAR6):
            for port in (25, 587):
                assert not connect(near, "shimsite2", host, port), (host, port)
                assert connect(near, "shimd", host, port), (host, port)
                assert connect(near, None, host, port), (host, port)
        assert connect(near, "shimsite1", FAR4, 587)  # allow_submission names it
        assert not connect(near, "shimsite1", FAR4, 25)  # on 465/587 only

    def test_site_uids_cannot_reach_the_listeners(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        """metrics.listen, the policy service's inet: listen and the capture port: only
        their users connect (root, the daemon's user, allow_users; redirected connections
        to the capture port)."""
        near, _far = netns
        _make_relay, make_shim = shim_factory
        shim = make_shim([free_port()])
        metrics, policy, capture = free_port(), free_port(), free_port()
        fw_config(shim, capture_port=capture)
        with open(shim.config, "a") as fh:
            fh.write(f"metrics: {{listen: 127.0.0.1:{metrics}}}\n"
                     f"policy_service: {{listen: 'inet:127.0.0.1:{policy}'}}\n")
        code = ("import socket, threading\n"
                "def serve(port):\n"
                "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                "    s.bind(('0.0.0.0', port)); s.listen(16)\n"
                "    while True:\n"
                "        c, _ = s.accept(); c.sendall(b'220 here\\r\\n'); c.close()\n"
                f"for p in ({metrics}, {policy}, {capture}):\n"
                "    threading.Thread(target=serve, args=(p,), daemon=True).start()\n"
                "threading.Event().wait()\n")
        listeners = subprocess.Popen(["ip", "netns", "exec", near, "/usr/bin/python3", "-c",
                                      code])
        try:
            wait_until(lambda: connect(near, None, "127.0.0.1", capture), 10, "listeners")
            assert connect(near, "shimsite1", "127.0.0.1", metrics)  # before: the hole
            apply(near, shim)
            for port in (metrics, policy, capture):
                for host in ("127.0.0.1", "10.201.0.1"):  # any local address
                    assert not connect(near, "shimsite1", host, port), (host, port)
                    assert not connect(near, "shimsite2", host, port), (host, port)
                    assert connect(near, None, host, port), (host, port)
            for port in (metrics, policy):
                assert connect(near, "shimd", "127.0.0.1", port), port
            assert connect(near, "postfix", "127.0.0.1", policy)  # allow_users default
            assert not connect(near, "postfix", "127.0.0.1", metrics)
            # a site's own SMTP to port 25 still reaches the capture port, redirected
            assert connect(near, "shimsite2", FAR4, 25)
        finally:
            listeners.kill()
            listeners.wait()

    def test_rules_are_idempotent(self, netns: tuple[str, str], shim_factory: Any) -> None:
        near, _far = netns
        _make_relay, make_shim = shim_factory
        shim = make_shim([free_port()])
        fw_config(shim)
        apply(near, shim)
        apply(near, shim)
        listing = sh("ip", "netns", "exec", near, "nft", "list", "ruleset").stdout
        assert listing.count("table inet sendmail_shim") == 1


class TestCheck:
    def test_check_reports_missing_in_force_and_tampered(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        near, _far = netns
        _make_relay, make_shim = shim_factory
        shim = make_shim([free_port()])
        fw_config(shim)
        check = ["ip", "netns", "exec", near, ADMIN, "firewall", "check", "--config",
                 shim.config]
        done = subprocess.run(check, capture_output=True, text=True)
        assert done.returncode == 1 and "is not loaded" in done.stdout
        apply(near, shim)
        done = subprocess.run(check, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "in force and complete" in done.stdout
        handle = next(line for line in sh("ip", "netns", "exec", near, "nft", "-a", "list", "chain",
                                      "inet", "sendmail_shim", "smtp_out").stdout.splitlines()
                  if line.strip().startswith("drop")).split("# handle ")[1]
        sh("ip", "netns", "exec", near, "nft", "delete", "rule", "inet", "sendmail_shim",
           "smtp_out", "handle", handle)
        done = subprocess.run(check, capture_output=True, text=True)
        assert done.returncode == 1 and "missing: drop" in done.stdout


def captured_system(netns: tuple[str, str], shim_factory: Any) -> tuple[Shim, Any, int]:
    """A daemon with a capture listener and a relay in ``near``, the rules applied."""
    near, _far = netns
    make_relay, make_shim = shim_factory
    relay_port, capture_port = free_port(), free_port()
    shim = make_shim([relay_port])
    fw_config(shim, capture_port)
    relay = make_relay(shim.logins, relay_port, netns=near)
    relay.start()
    shim.netns = near
    shim.start()
    apply(near, shim)
    return shim, relay, capture_port


def open_listener_wall(near: str) -> None:
    """Flush the rendered ``listeners`` chain: what the capture listener itself refuses
    (the second wall) is then seen from a site uid, as on a host without the rules."""
    done = sh("ip", "netns", "exec", near, "nft", "flush", "chain", "inet", "sendmail_shim",
              "listeners")
    assert done.returncode == 0, done.stderr


# As a site: an SMTP transaction from a dual-stack socket, optionally bound first to a
# chosen local address and port (SO_REUSEADDR, as the TIME_WAIT trick needs).  Prints the
# greeting's code and, if greeted, the code of the end of DATA.
SITE_SMTP = r"""
import smtplib, socket, sys
bind, port, host, dport, n = sys.argv[1:]
port, dport = int(port), int(dport)
def make(host, dport, timeout):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(timeout)
    if bind:
        s.bind((bind, port))
    s.connect((host, dport))
    return s
smtp = smtplib.SMTP(timeout=10)
smtp._get_socket = make
code, _ = smtp.connect(host, dport)
print(code)
if code == 220:
    smtp.ehlo("wp.site1.test")
    smtp.mail("wordpress@site1.test")
    smtp.rcpt(f"buyer{n}@example.net")
    print(smtp.data(f"Subject: trick {n}\r\n\r\nbody\r\n".encode())[0])
    smtp.quit()
"""

# As root: leave a TIME_WAIT row (uid 0, inode 0) on ADDR:<a free port>; print the port.
ROOT_TIME_WAIT = r"""
import socket, sys, time
addr = sys.argv[1]
srv = socket.socket(); srv.bind((addr, 0)); srv.listen(1)
c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); c.bind((addr, 0))
port = c.getsockname()[1]
c.connect(srv.getsockname()); s, _ = srv.accept()
c.close()  # root closes first: its end lingers in TIME_WAIT
assert s.recv(1) == b""
s.close(); srv.close()
hexaddr = socket.inet_aton(addr)[::-1].hex().upper()
for _ in range(100):
    rows = [line.split() for line in open("/proc/net/tcp")][1:]
    if any(r[1] == f"{hexaddr}:{port:04X}" and r[3] == "06" and r[7] == "0" for r in rows):
        print(port)
        break
    time.sleep(0.05)
"""


def site_smtp(near: str, bind: str, port: int, host: str, dport: int, n: int,
              user: str = "shimsite1") -> list[str]:
    done = subprocess.run(["ip", "netns", "exec", near, "runuser", "-u", user, "--",
                           "/usr/bin/python3", "-c", SITE_SMTP, bind, str(port), host,
                           str(dport), str(n)], capture_output=True, text=True, timeout=60)
    return done.stdout.split()


# As a site: open N connections through the redirect and hold them without a word; after
# a few seconds print how many were greeted (220), refused (421) and left waiting.
CAPTURE_FLOOD = r"""
import select, socket, sys, time
host, n = sys.argv[1], int(sys.argv[2])
socks = [socket.create_connection((host, 25), timeout=10) for _ in range(n)]
time.sleep(3)
codes = {"220": 0, "421": 0, "none": 0}
for s in socks:
    ready, _, _ = select.select([s], [], [], 0)
    code = s.recv(3).decode() if ready else "none"
    codes[code if code in codes else "none"] += 1
print(codes["220"], codes["421"], codes["none"], flush=True)
sys.stdin.read()  # hold them until the test lets go
"""


def root_time_wait(near: str, addr: str) -> int:
    done = subprocess.run(["ip", "netns", "exec", near, "/usr/bin/python3", "-c",
                           ROOT_TIME_WAIT, addr], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip(), done.stderr
    return int(done.stdout)


def site_uid() -> int:
    return int(subprocess.run(["id", "-u", "shimsite1"], capture_output=True,
                              text=True).stdout)


class TestCapture:
    def test_captured_smtp_is_delivered_with_attribution(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        near, _far = netns
        shim, relay, _capture_port = captured_system(netns, shim_factory)
        for n, host in enumerate((FAR4, FAR6)):
            code = ("import smtplib; s = smtplib.SMTP(timeout=10); "
                    f"s.connect({host!r}, 25); s.ehlo('wp.site1.test'); "
                    f"s.sendmail('wordpress@site1.test', ['buyer{n}@example.net'], "
                    f"b'Subject: captured {n}\\r\\n\\r\\nbody\\r\\n'); s.quit()")
            done = subprocess.run(["ip", "netns", "exec", near, "runuser", "-u", "shimsite1",
                                   "--", "/usr/bin/python3", "-c", code], capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        msgs = relay.wait(2)
        assert all(meta["login"] == "site1.test" for meta, _ in msgs)
        assert sorted(meta["rcpt_tos"][0] for meta, _ in msgs) == [
            "buyer0@example.net", "buyer1@example.net"]
        log = shim.daemon_log()
        uid = int(subprocess.run(["id", "-u", "shimsite1"], capture_output=True,
                                 text=True).stdout)
        assert f"captured uid={uid}" in log
        assert f"original_dst={FAR4}:25" in log and f"original_dst=[{FAR6}]:25" in log
        assert "origin=capture" in log
        assert "capture_refused" not in log

    def test_direct_connection_to_the_listener_is_refused(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        """Straight to 127.0.0.1 or ::1 on the listener's port, as a real site: not served."""
        near, _far = netns
        shim, relay, capture_port = captured_system(netns, shim_factory)
        assert site_smtp(near, "", 0, "::1", capture_port, 0) == []  # the firewall drops it
        open_listener_wall(near)
        for n, host in enumerate(("::ffff:127.0.0.1", "::1")):
            assert site_smtp(near, "", 0, host, capture_port, n) == ["554"], host
        # the one redirected message arrives alone, under the site's login
        assert site_smtp(near, "", 0, "::ffff:" + FAR4, 25, 9) == ["220", "250"]
        relay.wait(1)
        wait_until(lambda: not shim.queue_files("incoming") and not shim.queue_files("deferred"),
                   20, "an empty queue")
        assert [(meta["login"], meta["rcpt_tos"]) for meta, _ in relay.messages()] == [
            ("site1.test", ["buyer9@example.net"])]
        log = shim.daemon_log()
        assert log.count("capture_refused") == 2
        assert "not redirected: connected to the listener directly" in log
        assert log.count("captured uid=") == 1 and f"captured uid={site_uid()}" in log

    def test_time_wait_port_of_root_is_never_attributed_to_root(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        """A site binds ports root left in TIME_WAIT (rows owned by uid 0, inode 0) and
        connects from them: straight to the listener (refused) and through the redirect
        (its own uid); nothing is ever attributed to uid 0 or relayed as `system`."""
        near, _far = netns
        shim, relay, capture_port = captured_system(netns, shim_factory)
        open_listener_wall(near)  # the listener's own attribution is what is tested here
        direct_port = root_time_wait(near, "127.0.0.1")
        redirected_port = root_time_wait(near, "10.201.0.1")
        assert site_smtp(near, "::ffff:10.201.0.1", redirected_port, "::ffff:" + FAR4, 25,
                         1) == ["220", "250"]  # served: it is the site's own, redirected
        log = shim.daemon_log()
        assert "captured uid=0 " not in log
        assert f"captured uid={site_uid()} peer=10.201.0.1:{redirected_port} " \
            f"original_dst={FAR4}:25" in log
        assert site_smtp(near, "::ffff:127.0.0.1", direct_port, "::ffff:127.0.0.1",
                         capture_port, 0) == ["554"]
        relay.wait(1)
        wait_until(lambda: not shim.queue_files("incoming") and not shim.queue_files("deferred"),
                   20, "an empty queue")
        assert [(meta["login"], meta["rcpt_tos"]) for meta, _ in relay.messages()] == [
            ("site1.test", ["buyer1@example.net"])]
        log = shim.daemon_log()
        assert log.count("capture_refused") == 1

    def test_idle_flood_of_one_uid_does_not_refuse_or_delay_another(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        """Issue 21, finding 6: 300 idle captured connections of site1 (the old global cap
        was 256) never get site2 a 421 or a wait: each uid has its own session share."""
        near, _far = netns
        shim, relay, _capture_port = captured_system(netns, shim_factory)
        flood = subprocess.Popen(["ip", "netns", "exec", near, "runuser", "-u", "shimsite1",
                                  "--", "/usr/bin/python3", "-c", CAPTURE_FLOOD, FAR4, "300"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert flood.stdout is not None
            greeted, refused, waiting = map(int, flood.stdout.readline().split())
            # site1's share: 16 sessions, 16x16 open, the rest 421 at once
            assert (greeted, refused, waiting) == (16, 300 - 256, 256 - 16), shim.daemon_log()
            start = time.monotonic()
            codes = site_smtp(near, "", 0, "::ffff:" + FAR4, 25, 2, user="shimsite2")
            latency = time.monotonic() - start
            print(f"site2's captured SMTP transaction during site1's flood: {latency:.2f}s")
            assert codes == ["220", "250"], shim.daemon_log()[-3000:]
            assert latency < 5.0
        finally:
            flood.kill()
            flood.wait(10)
        [(meta, _)] = relay.wait(1)
        assert meta["login"] == "site2.test"
        log = shim.daemon_log()
        site1 = site_uid()
        assert f"capture_busy uid={site1} " in log and "limit=16 waiting_limit=256" in log
        assert log.count("capture_busy") == 1  # one line per uid and interval, not per 421

    def test_unknown_uid_through_capture_is_refused(
            self, netns: tuple[str, str], shim_factory: Any) -> None:
        near, _far = netns
        _make_relay, make_shim = shim_factory
        relay_port, capture_port = free_port(), free_port()
        shim = make_shim([relay_port])
        fw_config(shim, capture_port)
        shim.netns = near
        shim.start()
        apply(near, shim)
        code = ("import smtplib\ns = smtplib.SMTP(timeout=10)\ns.connect('10.201.0.2', 25)\n"
                "try:\n    s.sendmail('x@y.test', ['z@example.net'], b'Subject: x\\r\\n\\r\\nx')\n"
                "except smtplib.SMTPDataError as e:\n    print(e.smtp_code)\n")
        done = subprocess.run(["ip", "netns", "exec", near, "runuser", "-u", "shimstranger",
                               "--", "/usr/bin/python3", "-c", code], capture_output=True,
                              text=True, timeout=60)
        assert done.stdout.strip() == "550", done.stderr


def test_render_formats() -> None:
    config = parse_config({"relays": [{"host": "127.0.0.1", "port": 2525, "tls": "none"},
                                      {"host": "::1", "port": 2525, "tls": "none"}],
                           "firewall": {"capture": {"listen_port": 10025}},
                           "spool": "/nonexistent"}, None)
    nft = render_nft(config)
    assert "tcp dport { 25, 465, 587 } ct state new jump smtp_out" in nft
    assert "127.0.0.1" not in nft and "::1" not in nft  # no hole to the relays
    assert "redirect to :10025" in nft
    # the relays on this host (port 2525, once) are closed to site uids too (test_standin.py)
    assert ("fib daddr type local tcp dport { 10031, 2525, 10025 } ct state new jump "
            "listeners") in nft
    assert "tcp dport 10025 ct status dnat accept" in nft
    ipt = render_iptables(config, 4)
    assert "-d 127.0.0.1" not in ipt and "REDIRECT --to-ports 10025" in ipt
    assert ("-I OUTPUT -p tcp -m addrtype --dst-type LOCAL -m multiport --dports 10031,2525,10025 "
            "-m conntrack --ctstate NEW -j SENDMAIL_SHIM_LISTEN") in ipt
    assert "-A SENDMAIL_SHIM_LISTEN -p tcp --dport 10025 -m conntrack --ctstate DNAT -j " \
           "RETURN" in ipt
    assert "-d ::1" not in render_iptables(config, 6)
    # capture_guard: a SYN-ACK on the capture port only from root or the daemon's user (0)
    assert "tcp sport 10025 tcp flags & (syn | ack) == syn | ack meta skuid { 0 } accept" in nft
    assert "tcp sport 10025 tcp flags & (syn | ack) == syn | ack drop" in nft
    assert ("-I OUTPUT -p tcp --sport 10025 --tcp-flags SYN,ACK SYN,ACK -j SENDMAIL_SHIM_GUARD"
            in ipt and "-A SENDMAIL_SHIM_GUARD -m owner --uid-owner 0 -j RETURN" in ipt)
    assert "state_out" not in nft and "STATE" not in ipt  # no shared state: no rule
    redis = parse_config({"relays": [{"host": "127.0.0.1", "port": 2525, "tls": "none"}],
                          "state": {"backend": "redis", "url": "redis://[::1]:6380/0"},
                          "spool": "/nonexistent"}, None)
    assert "ip6 daddr { ::1 } tcp dport 6380 ct state new jump state_out" in render_nft(redis)
    ipt6 = render_iptables(redis, 6).splitlines()
    assert ipt6[2:5] == [":SENDMAIL_SHIM - [0:0]", ":SENDMAIL_SHIM_LISTEN - [0:0]",
                         ":SENDMAIL_SHIM_STATE - [0:0]"]
    assert ("-I OUTPUT -p tcp -d ::1 --dport 6380 -m conntrack --ctstate NEW -j "
            "SENDMAIL_SHIM_STATE") in ipt6 and ipt6[-1] == "COMMIT"
    assert "STATE" not in render_iptables(redis, 4)
    assert os.path.basename(ADMIN) == "sendmail-shim-admin"


def test_packaged_default_rules_load_and_block(netns: tuple[str, str]) -> None:
    near, _far = netns
    from conftest import ensure_user

    ensure_user("sendmail-shim")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "packaging", "sendmail-shim.nft")
    subprocess.run(["ip", "netns", "exec", near, "nft", "-f", path], check=True)
    assert not connect(near, "shimsite1", FAR4, 25)
    assert connect(near, "sendmail-shim", FAR4, 25)
