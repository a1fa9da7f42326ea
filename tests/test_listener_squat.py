"""Issue 21, F2 and F3: a site listens on a port of the daemon's own listeners.

A hacked site binds the metrics port, the policy service's port or the capture
port while the daemon restarts.  The daemon must start and deliver anyway,
name the squatter in its log, and no other site's redirected SMTP may ever
reach the squatter (network namespaces, nft applied as rendered).  Real site
uids (runuser), a real daemon, its relay.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ADMIN, DAEMON_USER, free_port, wait_until
from test_firewall import FAR4, FAR6, captured_system, netns  # noqa: F401  (fixture)

# As a site: an SMTP server on PORT (dual-stack on every address, or only [::1] with
# "v6") that says yes to everything and writes every line it hears to OUT.
SQUATTER = r"""
import socket, sys, threading
port, out, where = int(sys.argv[1]), sys.argv[2], sys.argv[3]
log = open(out, "a")
def session(c):
    c.settimeout(5); f = c.makefile("rb"); c.sendall(b"220 squatter ESMTP\r\n")
    for raw in f:
        line = raw.decode(errors="replace").rstrip("\r\n"); log.write(line + "\n"); log.flush()
        if line.upper().startswith("DATA"): c.sendall(b"354 go\r\n")
        elif line.upper().startswith("QUIT"): c.sendall(b"221 bye\r\n"); break
        else: c.sendall(b"250 ok\r\n")
    c.close()
s = socket.socket(socket.AF_INET6)
if where == "v6":
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); s.bind(("::1", port))
else:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", port))
s.listen(50)
print("bound", flush=True)
while True:
    c, _ = s.accept(); log.write("CONNECTED\n"); log.flush()
    threading.Thread(target=session, args=(c,), daemon=True).start()
"""


def squat(out: str, port: int, where: str = "all", ns: str | None = None
          ) -> subprocess.Popen[str]:
    """shimsite1 listening on ``port``; its transcript in ``out``."""
    open(out, "w").close()
    os.chown(out, pwd.getpwnam("shimsite1").pw_uid, -1)
    cmd = ["runuser", "-u", "shimsite1", "--", "/usr/bin/python3", "-c", SQUATTER, str(port),
           out, where]
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd] if ns else cmd,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "bound"
    return proc


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def unsquat(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)  # runuser forwards it
    proc.wait(10)


@pytest.fixture
def squatters() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            unsquat(proc)


def site2_smtp(ns: str, host: str, n: int) -> subprocess.CompletedProcess[str]:
    """shimsite2's own SMTP engine sending to ``host``:25 (redirected to the capture port)."""
    code = ("import smtplib; s = smtplib.SMTP(timeout=5); "
            f"s.connect({host!r}, 25); s.ehlo('shop.site2.test'); "
            f"s.sendmail('orders@site2.test', ['customer{n}@example.net'], "
            f"b'Subject: order {n}\\r\\n\\r\\nsecret order {n}\\r\\n'); s.quit()")
    return subprocess.run(["ip", "netns", "exec", ns, "runuser", "-u", "shimsite2", "--",
                           "/usr/bin/python3", "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_site_holding_the_metrics_port_does_not_stop_the_daemon(
        shim_factory: Any, workdir: str, squatters: list[subprocess.Popen[str]]) -> None:
    make_relay, make_shim = shim_factory
    relay_port, metrics_port = free_port(), free_port()
    shim = make_shim([relay_port], extra=f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}\n")
    relay = make_relay(shim.logins, relay_port)
    relay.start()
    squatters.append(squat(os.path.join(workdir, "m.txt"), metrics_port))
    shim.start()  # a restart while the site holds the port
    done = shim.sendmail(["-t", "-i"], b"To: bob@example.org\nSubject: s2\n\nx\n",
                         user="shimsite2")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: len(relay.messages()) == 1, 30, "site2's message at the relay")
    assert shim.proc is not None and shim.proc.poll() is None
    log = shim.daemon_log()
    line = next(ln for ln in log.splitlines() if "metrics_unavailable" in ln)
    uid = pwd.getpwnam("shimsite1").pw_uid
    assert f"uid {uid} (shimsite1, site site1.test)" in line, line
    assert "metrics_listening" not in log  # never claims a port it does not hold
    unsquat(squatters.pop())  # the site lets go: the listener comes up by itself
    wait_until(lambda: "metrics_listening" in shim.daemon_log(), 20, "the metrics listener")


def test_site_holding_a_capture_address_never_gets_other_sites_smtp(
        netns: tuple[str, str], shim_factory: Any, workdir: str,  # noqa: F811
        squatters: list[subprocess.Popen[str]]) -> None:
    near, _far = netns
    shim, relay, capture_port = captured_system(netns, shim_factory)
    shim.stop()
    # The daemon is down; site1 listens on the capture port, every address.
    out_all = os.path.join(workdir, "all.txt")
    squatters.append(squat(out_all, capture_port, "all", ns=near))
    for n, host in enumerate((FAR4, FAR6)):
        assert site2_smtp(near, host, n).returncode != 0  # its engine keeps the mail
    unsquat(squatters.pop())
    assert read(out_all) == ""  # not even a connection completed
    # Site1 holds only [::1]:port; the daemon starts, takes 127.0.0.1 and names site1.
    out6 = os.path.join(workdir, "v6.txt")
    squatters.append(squat(out6, capture_port, "v6", ns=near))
    before = len(shim.daemon_log())
    shim.start()
    log = wait_until(lambda: "capture_squatted" in shim.daemon_log()[before:]
                     and shim.daemon_log()[before:], 15, "the capture_squatted error")
    line = next(ln for ln in log.splitlines() if "capture_squatted" in ln)
    uid = pwd.getpwnam("shimsite1").pw_uid
    assert f"[::1]:{capture_port}" in line and f"uid {uid} (shimsite1, site site1.test)" in line
    assert f"capture_listening address=127.0.0.1:{capture_port}" in log
    assert f"capture_listening address=[::1]:{capture_port}" not in log
    assert site2_smtp(near, FAR4, 2).returncode == 0
    assert site2_smtp(near, FAR6, 3).returncode != 0
    wait_until(lambda: len(relay.messages()) == 1, 30, "site2's IPv4 message at the relay")
    unsquat(squatters.pop())
    assert read(out6) == ""
    # The site lets go: the daemon takes [::1] within its retry, and IPv6 capture works.
    wait_until(lambda: f"capture_listening address=[::1]:{capture_port}"
               in shim.daemon_log()[before:], 20, "the daemon on [::1]")
    assert site2_smtp(near, FAR6, 4).returncode == 0
    wait_until(lambda: len(relay.messages()) == 2, 30, "site2's IPv6 message at the relay")


def test_policy_service_waits_for_its_port_and_names_the_holder(
        shim_factory: Any, workdir: str, squatters: list[subprocess.Popen[str]]) -> None:
    _make_relay, make_shim = shim_factory
    port = free_port()
    shim = make_shim([free_port()])
    squatters.append(squat(os.path.join(workdir, "p.txt"), port))
    log = os.path.join(workdir, "policy.log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(["runuser", "-u", DAEMON_USER, "--", ADMIN, "policy", "serve",
                                 "--config", shim.config, "--listen", f"inet:127.0.0.1:{port}"],
                                stdout=out, stderr=out, env=shim.env())
    try:
        wait_until(lambda: "policy_service_unavailable" in read(log), 15, "the error")
        assert proc.poll() is None  # it waits for its port instead of exiting 71
        uid = pwd.getpwnam("shimsite1").pw_uid
        assert f"uid {uid} (shimsite1, site site1.test)" in read(log)
        unsquat(squatters.pop())
        wait_until(lambda: "policy_service_listening" in read(log), 20, "listening")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def test_config_check_warns_of_listeners_a_site_can_take_or_holds(
        shim_factory: Any, workdir: str, squatters: list[subprocess.Popen[str]]) -> None:
    _make_relay, make_shim = shim_factory
    metrics_port, capture_port, policy_port = free_port(), free_port(), free_port()
    shim = make_shim([free_port()], extra=f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}\n"
                     f"policy_service: {{listen: 'inet:127.0.0.1:{policy_port}'}}\n")
    shim.edit_config("sites:\n", f"firewall:\n  capture: {{listen_port: {capture_port}}}\n"
                     "sites:\n")
    squatters.append(squat(os.path.join(workdir, "c.txt"), metrics_port))
    text = shim.admin("config", "check", "--config", shim.config).stdout.decode()
    warnings = [ln for ln in text.splitlines() if ln.startswith("warning:")]
    uid = pwd.getpwnam("shimsite1").pw_uid
    assert any(f"metrics.listen: 127.0.0.1:{metrics_port} is a port any user may listen on"
               in w for w in warnings), text
    assert any(f"firewall.capture.listen_port: 127.0.0.1:{capture_port} is a port any user"
               in w for w in warnings), text
    assert any(f"metrics.listen: 127.0.0.1:{metrics_port} is held now by uid {uid} "
               "(shimsite1, site site1.test)" in w for w in warnings), text
    assert not any("policy_service" in w for w in warnings), text  # not served on this host
    assert not any("held now" in w and "capture" in w for w in warnings), text
    # The policy service's port, once something listens there (the relay host): a site.
    squatters.append(squat(os.path.join(workdir, "p.txt"), policy_port))
    text = shim.admin("config", "check", "--config", shim.config).stdout.decode()
    assert f"policy_service.listen: 127.0.0.1:{policy_port} is a port any user" in text, text
    assert f"policy_service.listen: 127.0.0.1:{policy_port} is held now by uid {uid}" in text
