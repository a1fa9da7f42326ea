"""A site stands in for a relay or the local MTA on a loopback port while it is down.

Hostile-site tests of issue 21 (stand-in servers): a site uid listening on a relay's or
local_transport's port of this host gets no login and no mail (delivery/loopback.py
proves the server's owner before AUTH); config check warns; the firewall keeps site
uids off those ports (admin/firewall.py).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import free_port, started, wait_until
from test_firewall import apply, connect, fw_config, netns  # noqa: F401  (fixture)

from sendmail_shim.admin.firewall import render_iptables, render_nft
from sendmail_shim.config import parse_config

# As a site: an SMTP server on PORT (v4 and v6) that offers AUTH, says yes to everything
# and writes every line it hears to OUT.
FAKE = r"""
import socket, sys, threading
port, out = int(sys.argv[1]), sys.argv[2]
log = open(out, "a")
def session(c):
    c.settimeout(10); f = c.makefile("rb"); w = lambda x: c.sendall(x.encode() + b"\r\n")
    w("220 stand-in ESMTP"); data = False
    for raw in f:
        line = raw.decode(errors="replace").rstrip("\r\n")
        log.write(("DATA| " if data else "CMD| ") + line + "\n"); log.flush()
        if data:
            if line == ".": data = False; w("250 2.0.0 ok")
            continue
        u = line.upper()
        if u.startswith(("EHLO", "LHLO")):
            c.sendall(b"250-x\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n")
        elif u.startswith("AUTH"): w("235 2.7.0 ok")
        elif u.startswith("DATA"): data = True; w("354 go")
        elif u.startswith("QUIT"): w("221 bye"); break
        else: w("250 ok")
    c.close()
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port)); s.listen(50)
print("bound", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=session, args=(c,), daemon=True).start()
"""

SECRET = b"site2's confidential body"


def site_uid(user: str = "shimsite1") -> int:
    return int(subprocess.run(["id", "-u", user], capture_output=True, text=True).stdout)


@pytest.fixture
def squatter(workdir: str) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def squat(port: int, name: str = "stand-in") -> tuple[str, subprocess.Popen[str]]:
        out = os.path.join(workdir, f"{name}-{port}.txt")
        open(out, "w").close()
        os.chown(out, site_uid(), -1)
        who = pwd.getpwnam("shimsite1")  # the process itself, not runuser: kill() ends it
        proc = subprocess.Popen(["/usr/bin/python3", "-c", FAKE, str(port), out],
                                stdout=subprocess.PIPE, text=True, user=who.pw_uid,
                                group=who.pw_gid, extra_groups=[])
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "bound"
        return out, proc

    yield squat
    for proc in procs:
        proc.kill()
        proc.wait()


def heard(out: str) -> str:
    with open(out) as fh:
        return fh.read()


def nothing_but_ehlo(out: str) -> None:
    text = heard(out)
    for line in text.splitlines():
        assert line.startswith("CMD| EHLO"), f"the stand-in heard more than EHLO:\n{text}"
    assert "pw-two" not in text and "confidential" not in text


def test_site_on_the_relays_port_gets_no_login_and_no_mail_and_the_mail_waits(
        shim_factory: Any, squatter: Any) -> None:
    shim, relay = started(shim_factory)
    relay.stop()  # the relay restarts (an upgrade, a crash)
    out, proc = squatter(relay.port)
    done = shim.sendmail(["-t", "-i"], b"To: bob@example.org\nSubject: private\n\n" + SECRET
                         + b"\n", user="shimsite2")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: "loopback_server_untrusted" in shim.daemon_log(), 20,
               "the daemon refusing the stand-in")
    log = shim.daemon_log()
    line = next(ln for ln in log.splitlines() if "loopback_server_untrusted" in ln)
    assert f"owner={site_uid()}" in line and "site1.test" in line and "suspend" in line
    wait_until(lambda: shim.queue_files("deferred"), 20, "the message deferred")
    nothing_but_ehlo(out)
    assert "removed" not in shim.daemon_log() and "bounce" not in shim.daemon_log()
    # The site goes away, the relay comes back: the mail goes out, once.
    proc.kill()
    proc.wait()
    wait_until(lambda: not connect_ok(relay.port), 10, "the stand-in gone")
    relay.start()
    (_meta, body), = relay.wait(1, 30)
    assert SECRET in body
    nothing_but_ehlo(out)


def connect_ok(port: int) -> bool:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_site_on_the_first_relays_port_fails_over_to_the_second_at_once(
        shim_factory: Any, squatter: Any) -> None:
    make_relay, make_shim = shim_factory
    first, second = free_port(), free_port()
    shim = make_shim([first, second])
    relay = make_relay(shim.logins, second)
    relay.start()
    out, _proc = squatter(first)  # the first relay is down, a site holds its port
    shim.start()
    done = shim.sendmail(["-t", "-i"], b"To: bob@example.org\nSubject: private\n\n" + SECRET
                         + b"\n", user="shimsite2")
    assert done.returncode == 0, done.stderr
    (_meta, body), = relay.wait(1, 15)
    assert SECRET in body
    assert "loopback_server_untrusted" in shim.daemon_log()
    nothing_but_ehlo(out)


def test_site_on_the_local_transport_port_gets_no_mail(
        shim_factory: Any, squatter: Any) -> None:
    make_relay, make_shim = shim_factory
    relay_port, local_port = free_port(), free_port()
    shim = make_shim([relay_port], extra=f"local_transport: lmtp://127.0.0.1:{local_port}\n"
                                         "routing: {site2.test: local}\n")
    relay = make_relay(shim.logins, relay_port)
    relay.start()
    out, _proc = squatter(local_port)
    shim.start()
    done = shim.sendmail(["-t", "-i"], b"To: info@site2.test\nSubject: private\n\n" + SECRET
                         + b"\n", user="shimsite2")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: "loopback_server_untrusted" in shim.daemon_log(), 20,
               "the daemon refusing the stand-in")
    wait_until(lambda: shim.queue_files("deferred"), 20, "the message deferred")
    assert not heard(out).strip(), heard(out)  # not even LHLO
    assert not relay.messages()


def test_config_check_warns_of_a_relay_and_local_transport_on_an_unprivileged_port(
        shim_factory: Any) -> None:
    _make_relay, make_shim = shim_factory
    port, local = free_port(), free_port()
    shim = make_shim([port], extra=f"local_transport: smtp://127.0.0.1:{local}\n")
    text = shim.admin("config", "check", "--config", shim.config).stdout.decode()
    relay_line = next(ln for ln in text.splitlines() if f"relay 127.0.0.1:{port}" in ln)
    assert relay_line.startswith("warning:") and "checks the owner" in relay_line
    assert f"local_transport smtp:127.0.0.1:{local}" in text
    shim.edit_config("sites:\n", "loopback_server_users: [postfix, shimsite1]\nsites:\n")
    text = shim.admin("config", "check", "--config", shim.config).stdout.decode()
    assert f"loopback_server_users names uid {site_uid()}, a uid of site(s) site1.test" in text


def test_firewall_keeps_site_uids_off_loopback_relay_and_local_transport_ports(
        netns: tuple[str, str], shim_factory: Any) -> None:  # noqa: F811
    near, _far = netns
    _make_relay, make_shim = shim_factory
    relay_port, local_port = free_port(), free_port()
    shim = make_shim([relay_port], extra=f"local_transport: smtp://127.0.0.1:{local_port}\n")
    fw_config(shim)
    apply(near, shim)
    greeter = ("import socket, sys, threading\n"
               "def serve(p):\n"
               "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
               "    s.bind(('127.0.0.1', p)); s.listen(16)\n"
               "    while True:\n"
               "        c, _ = s.accept(); c.sendall(b'220 local MTA\\r\\n'); c.close()\n"
               "for p in sys.argv[1:]:\n"
               "    threading.Thread(target=serve, args=(int(p),), daemon=True).start()\n"
               "threading.Event().wait()\n")
    srv = subprocess.Popen(["ip", "netns", "exec", near, "/usr/bin/python3", "-c", greeter,
                            str(relay_port), str(local_port)])
    try:
        wait_until(lambda: connect(near, None, "127.0.0.1", relay_port), 10, "the servers")
        for port in (relay_port, local_port):
            assert connect(near, "shimd", "127.0.0.1", port)  # the daemon's user
            assert not connect(near, "shimsite1", "127.0.0.1", port)
            assert not connect(near, "shimsite2", "127.0.0.1", port)
    finally:
        srv.kill()
        srv.wait()


def test_rendered_rules_name_loopback_relay_and_local_transport_ports() -> None:
    config = parse_config({"relays": [{"host": "127.0.0.1", "port": 2526, "tls": "none"},
                                      {"host": "::1", "port": 2527, "tls": "none"},
                                      {"host": "127.0.0.1", "port": 587, "tls": "none"}],
                           "local_transport": "lmtp://127.0.0.1:10026",
                           "spool": "/nonexistent"}, None)
    nft = render_nft(config)
    assert "2526, 2527, 10026 } ct state new jump listeners" in nft
    assert "# relay on this host" in nft and "# local_transport (lmtp)" in nft
    for family in (4, 6):
        rules = render_iptables(config, family)
        assert "2526,2527,10026 -m conntrack" in rules
