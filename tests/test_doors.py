"""The loopback services a hacked site must not use (issue 21, finding 7), as real site uids.

The metrics endpoint and the relay's policy service run on a web node, next to the
sites: a site uid that can connect lists every site, login and volume (metrics), or
spends another site's quota and suspends it with forged requests (policy service).
Here a real daemon (its own user) and a real ``policy serve`` (the daemon's user)
are asked by site uids (runuser) and by the users they serve: root, the daemon's
user and an allowed user.  Also: logins compared as the relay's SASL backend
compares them, unknown_login failing closed, one suspension state for the policy
service, the daemon and ``site list``, and a flood of 1,100 idle connections.
The firewall's side (rules that drop a site uid's connection to each listener and
to the relays) is in tests/test_firewall.py.
"""

from __future__ import annotations

import os
import pwd
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import ADMIN, DAEMON_USER, Shim, free_port, started, wait_until, with_site_keys
from test_policy_service import start_service, stop_service
from test_policy_service import world as policy_world  # noqa: F401 (a fixture)

from sendmail_shim.relaypolicy import codec

REALM = "relay.example"
SCRAPE = r"""
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics", timeout=10) as r:
        body = r.read().decode()
        print(r.status, "site2.test" in body)
except urllib.error.HTTPError as e:
    print(e.code, False)
"""
# Sends each request (one per argv JSON list) on one connection; prints each answer, or
# CLOSED when the service closed the connection without one.
ASK = r"""
import json, socket, sys
port, requests = int(sys.argv[1]), json.loads(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=10)
for attrs in requests:
    try:
        s.sendall("".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        data = b""
    print(data.decode().strip() or "CLOSED", flush=True)
    if not data:
        break
"""


def as_user(user: str | None, code: str, *args: str) -> str:
    cmd = [sys.executable, "-c", code, *args]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- metrics ------------------------------------------------------------------------------

def metered(shim_factory: Any, settings: str = "") -> tuple[Shim, int]:
    port = free_port()
    shim, _relay = started(shim_factory, extra=(
        f"metrics: {{listen: 127.0.0.1:{port}{settings}}}\n"))
    wait_until(lambda: "metrics_listening" in shim.daemon_log(), 15, "the metrics listener")
    sent = shim.sendmail(["-t", "-i"], b"To: a@example.net\nSubject: m\n\nhello\n",
                         user="shimsite2")
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: as_user(None, SCRAPE % port).split() == ["200", "True"], 15,
               "site2 in the scrape")
    return shim, port


def test_metrics_answer_root_and_the_daemon_not_a_site_uid(shim_factory: Any) -> None:
    shim, port = metered(shim_factory)
    code = SCRAPE % port
    assert as_user(DAEMON_USER, code).split() == ["200", "True"]
    for _ in range(5):  # site1 must not list site2 (nor anything): 403, logged once
        assert as_user("shimsite1", code).split() == ["403", "False"]
    log = shim.daemon_log()
    assert f"metrics_refused peer=uid:{pwd.getpwnam('shimsite1').pw_uid} " in log, log[-2000:]
    assert log.count("metrics_refused") == 1  # at most one line per client a minute


def test_metrics_allow_users(shim_factory: Any) -> None:
    _shim, port = metered(shim_factory, ", allow_users: [shimstranger]")
    code = SCRAPE % port
    assert as_user("shimstranger", code).split() == ["200", "True"]
    assert as_user("shimsite1", code).split() == ["403", "False"]


# -- the policy service --------------------------------------------------------------------

@dataclass
class Service:
    shim: Shim
    port: int
    log: str
    proc: subprocess.Popen[bytes]
    relay: Any

    def ask(self, requests: list[dict[str, str]], user: str | None = None) -> list[str]:
        import json

        return as_user(user, ASK, str(self.port), json.dumps(requests)).split("\n")[:-1]

    def service_log(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as fh:
            return fh.read()


def request(login: str, stage: str = "END-OF-MESSAGE", instance: str = "",
            recipient: str = "a@example.net", count: str = "1") -> dict[str, str]:
    return {"request": codec.REQUEST_TYPE, "protocol_state": stage, "sasl_username": login,
            "instance": instance or os.urandom(6).hex(), "recipient": recipient,
            "recipient_count": count, "client_address": "192.0.2.9"}


def service(shim_factory: Any, workdir: str, settings: str = "",
            *site_lines: tuple[str, str]) -> Service:
    make_relay, make_shim = shim_factory
    relay_port, port = free_port(), free_port()
    shim = make_shim([relay_port], extra=(
        f"policy_service: {{listen: 'inet:127.0.0.1:{port}', login_realm: {REALM}"
        f"{', ' + settings if settings else ''}}}\n"))
    for site, line in site_lines:
        with_site_keys(shim, site, line)
    relay = make_relay(shim.logins, relay_port)
    relay.start()
    shim.start()  # creates the spool and its state as the daemon's user
    log = os.path.join(workdir, "policy.log")
    return Service(shim, port, log, start_service(shim, log, port), relay)


@pytest.fixture
def policy(shim_factory: Any, workdir: str) -> Iterator[Service]:
    svc = service(shim_factory, workdir, "", ("site2.test", "quota: {per_hour: 2}"))
    yield svc
    stop_service(svc.proc)


def test_policy_service_closes_on_a_site_uid_and_its_forgeries_count_nothing(
        policy: Service) -> None:
    forged = policy.ask([request("site2.test") for _ in range(5)], user="shimsite1")
    assert forged == ["CLOSED"]  # unanswered: not Postfix
    # Postfix's users are answered, and site2's hour is untouched by the forgeries
    assert policy.ask([request("site2.test")], user="postfix") == ["action=DUNNO"]
    assert policy.ask([request("site2.test")], user=DAEMON_USER) == ["action=DUNNO"]
    third = policy.ask([request("site2.test")])  # root
    assert third[0].startswith("action=DEFER_IF_PERMIT 4.7.1 site site2.test: 2 messages")
    log = policy.service_log()
    uid = pwd.getpwnam("shimsite1").pw_uid
    assert log.count(f"policy_refused_client peer=uid:{uid} ") == 1, log[-2000:]


def test_login_variants_are_the_sites_and_unknown_fails_closed(policy: Service) -> None:
    assert policy.ask([request("site2.test")]) == ["action=DUNNO"]
    assert policy.ask([request(f"Site2.Test@{REALM.upper()}")]) == ["action=DUNNO"]
    for variant in ("Site2.test", "SITE2.TEST", f"site2.test@{REALM.upper()}"):
        answer = policy.ask([request(variant)])[0]
        assert answer.startswith("action=DEFER_IF_PERMIT 4.7.1 site site2.test: 2 messages"), \
            (variant, answer)
    for unknown in (" site2.test", "site2.test ", "site2.test@other.example", "nobody"):
        answer = policy.ask([request(unknown)])[0]
        assert answer.startswith("action=DEFER_IF_PERMIT 4.7.1 relay login"), (unknown, answer)
        assert "belongs to no site" in answer


def test_a_suspension_by_the_service_is_the_daemons_and_site_lists(
        shim_factory: Any, workdir: str) -> None:
    svc = service(shim_factory, workdir, "",
                  ("site1.test", "outbreak: {recipient_domains_per_hour: 3}"))
    try:
        svc.relay.stop()  # site1's message waits in the queue: the suspension must hold it
        queued = svc.shim.sendmail(["-t", "-i"], b"To: a@example.net\nSubject: q\n\nwait\n")
        assert queued.returncode == 0, queued.stderr
        wait_until(lambda: svc.shim.queue_files("deferred"), 20, "site1's message deferred")
        instance = "tripping"
        rcpts = [request("site1.test", "RCPT", instance, f"a@d{i}.example") for i in range(5)]
        answers = svc.ask([*rcpts, request("site1.test", instance=instance,
                                           recipient="a@d4.example", count="5")])
        assert answers[-1].startswith("action=DEFER_IF_PERMIT 4.7.1 site site1.test is now "
                                      "suspended"), answers
        shim = svc.shim
        wait_until(lambda: "suspended site=site1.test actor=\"policy service (outbreak rule)\"" in
                   shim.daemon_log(), 10, "the daemon's suspended line")
        assert "held=1 " in shim.daemon_log()
        assert len(shim.queue_files("hold")) == 1 and not shim.queue_files("deferred")
        listing = shim.admin("site", "list")
        assert listing.returncode == 0, listing.stderr
        line = next(x for x in listing.stdout.decode().splitlines() if "site1.test" in x)
        assert "suspended" in line and "active" not in line, listing.stdout
        sent = shim.sendmail(["-t", "-i"], b"To: a@example.net\nSubject: m\n\nhello\n")
        assert sent.returncode == 77, (sent.returncode, sent.stderr)  # refused, as by hand
        assert b"is suspended" in sent.stderr
        assert "notice_queued" in shim.daemon_log()
        other = shim.sendmail(["-t", "-i"], b"To: a@example.net\nSubject: m\n\nhello\n",
                              user="shimsite2")
        assert other.returncode == 0, other.stderr
    finally:
        stop_service(svc.proc)


def test_1100_idle_connections_neither_exhaust_nor_block_and_are_closed(
        shim_factory: Any, workdir: str) -> None:
    svc = service(shim_factory, workdir, "idle_timeout: 2s, max_connections: 650")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    held: list[socket.socket] = []
    waiter: subprocess.Popen[str] | None = None
    try:
        for _ in range(1100):  # root is allowed: over its share (500) closed at once
            try:
                held.append(socket.create_connection(("127.0.0.1", svc.port), 10))
            except OSError:
                break
        assert len(held) == 1100
        started_at = time.monotonic()
        answer = svc.ask([request("site2.test")], user=DAEMON_USER)
        assert answer == ["action=DUNNO"], svc.service_log()[-3000:]
        latency = time.monotonic() - started_at
        assert latency < 5
        waiter = subprocess.Popen(  # 200 more from another allowed uid: 51 wait for a slot
            ["runuser", "-u", "postfix", "--", sys.executable, "-c",
             "import socket, time\nss = [socket.create_connection(('127.0.0.1', "
             f"{svc.port}), 10) for _ in range(200)]\nfor s in ss: s.settimeout(30)\n"
             "print(sum(1 for s in ss if s.recv(1) == b''))"],
            stdout=subprocess.PIPE, text=True)
        # all idle ones are closed after idle_timeout (those beyond the share at once)
        deadline = time.monotonic() + 20
        open_ones = 0
        for s in held:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                if s.recv(1) != b"":
                    open_ones += 1
            except TimeoutError:
                open_ones += 1
            except OSError:
                pass
        assert open_ones == 0
        out, _ = waiter.communicate(timeout=60)
        assert out.split() == ["200"], out  # the ones waiting for a slot too
    finally:
        for s in held:
            s.close()
        if waiter is not None:
            waiter.kill()
        stop_service(svc.proc)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    log = svc.service_log()
    assert "EMFILE" not in log and "Too many open files" not in log
    assert len(log.splitlines()) < 40 and len(log) < 20_000, log[-3000:]
    print(f"1,100 idle connections: a query answered in {latency:.2f}s (runuser included); "
          f"service log {len(log.splitlines())} lines, {len(log)} bytes")


def test_unix_socket_with_the_postfix_group_serves_postfix_not_a_site(
        shim_factory: Any, workdir: str) -> None:
    """``check_policy_service unix:...``: mode 0660 and group ``socket_group``."""
    import grp
    import stat

    make_relay, make_shim = shim_factory
    relay_port = free_port()
    path = os.path.join(workdir, "policy.sock")
    shim = make_shim([relay_port], extra=(
        f"policy_service: {{listen: 'unix:{path}', socket_group: postfix}}\n"))
    relay = make_relay(shim.logins, relay_port)
    relay.start()
    shim.start()
    log = os.path.join(workdir, "policy.log")
    os.chmod(workdir, 0o755)
    with open(log, "ab") as out:  # as root: it may give the socket to postfix's group
        proc = subprocess.Popen([ADMIN, "policy", "serve", "--config", shim.config],
                                stdout=out, stderr=out, env=shim.env())
    try:
        wait_until(lambda: os.path.exists(path), 15, "the policy socket")
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == grp.getgrnam("postfix").gr_gid
        code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
                f"    s.connect({path!r})\nexcept OSError as e:\n    print('refused', e.errno)"
                "\n    sys.exit()\ns.sendall(b'request=smtpd_access_policy\\n"
                "protocol_state=RCPT\\nsasl_username=site2.test\\n\\n')\n"
                "print(s.recv(100).decode().strip())\n")
        assert as_user("postfix", code).strip() == "action=DUNNO"
        assert as_user("shimsite1", code).strip() == "refused 13"  # EACCES
    finally:
        proc.terminate()
        proc.wait(15)


def test_cyrus_logins_in_other_spellings_are_held_to_the_sites_limits(
        policy_world: Any) -> None:  # noqa: F811 (the fixture imported above)
    """Through the real Postfix and Cyrus sasldb of tests/test_policy_service.py (per_hour
    3): whatever spelling the SASL backend lets in is counted against site1.test.  (Seen
    here: the sasldb compares user and realm with case: SITE1.TEST, Site1.Test and
    site1.test@RELAY.TEST fail AUTH; site1.test@relay.test is the same account, and the
    service counts both spellings as site1's.)"""
    import smtplib

    world = policy_world
    realm = world_realm()
    accepted, refused, no_auth = [], [], []
    for login in ("SITE1.TEST", "Site1.Test", f"site1.test@{realm}",
                  f"site1.test@{realm.upper()}", "site1.test", f"site1.test@{realm}",
                  "site1.test"):
        try:
            world.direct(["a@example.net"], login=login)
            accepted.append(login)
        except smtplib.SMTPAuthenticationError:
            no_auth.append(login)  # the SASL backend itself refused that spelling
        except (smtplib.SMTPDataError, smtplib.SMTPRecipientsRefused):
            refused.append(login)
    print("accepted", accepted, "refused", refused, "no_auth", no_auth)
    assert len(accepted) == 3 and refused, (accepted, refused, no_auth)
    assert f"site1.test@{realm}" in accepted


def world_realm() -> str:
    from postfixrelay import REALM as POSTFIX_REALM

    return POSTFIX_REALM
