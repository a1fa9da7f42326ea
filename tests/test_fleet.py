"""Two web nodes sharing one Redis: two real daemons (own spools and configs), one real
redis-server on loopback started by the test, one capture relay.

Shows: a site's ``per_hour`` holds across both nodes combined; ``site suspend`` on
node A stops the site on node B within a second; Redis killed mid-run leaves mail
accepted (fail-open, logged loudly) and, Redis back, the nodes share again.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Relay, Shim, free_port, wait_until, with_site_keys
from redisserver import RedisServer
from test_policy_service import start_service, stop_service

MESSAGE = b"From: Web <noreply@site1.test>\nTo: someone@example.net\nSubject: fleet\n\nbody\n"
EX_NOPERM = 77


class Fleet:
    def __init__(self, workdir: str, accounts: dict[str, pwd.struct_passwd]) -> None:
        self.redis = RedisServer(os.path.join(workdir, "redis"), password="fleet-" + "r" * 12)
        self.port = free_port()
        self.nodes: list[Shim] = []
        for name in ("node-a", "node-b"):
            home = os.path.join(workdir, name)
            os.makedirs(home, mode=0o755)
            shim = Shim(home, accounts, [self.port])
            secret = os.path.join(home, "secrets", "redis")  # the daemon's, not the sites'
            with open(secret, "w") as fh:
                fh.write(f"{self.redis.password}\n")
            os.chown(secret, 0, accounts["shimd"].pw_gid)
            os.chmod(secret, 0o640)
            with open(shim.config, "a") as fh:
                fh.write(f"node: {name}\nstate: {{backend: redis, url: '{self.redis.url}', "
                         f"prefix: 'fleet:', password_file: {secret}}}\n")
            with_site_keys(shim, "site1.test", "quota: {per_hour: 3}")
            self.nodes.append(shim)
        self.relay = Relay(workdir, self.nodes[0].logins, self.port)

    def start(self) -> None:
        self.redis.start()
        self.relay.start()
        for shim in self.nodes:
            shim.start()

    def stop(self) -> None:
        for thing in (*self.nodes, self.relay, self.redis):
            try:
                thing.stop()
            except Exception as exc:  # cleanup goes on
                print(f"cleanup: {exc}")


@pytest.fixture
def fleet(workdir: str, accounts: dict[str, pwd.struct_passwd]) -> Iterator[Fleet]:
    made = Fleet(workdir, accounts)
    try:
        made.start()
        yield made
    finally:
        made.stop()


def send(shim: Shim) -> Any:
    return shim.sendmail(["-t", "-i"], MESSAGE)


def test_config_check_connects_to_redis(fleet: Fleet) -> None:
    a = fleet.nodes[0]
    checked = a.admin("config", "check")
    assert b"state redis (node node-a)" in checked.stdout
    assert b"does not answer" not in checked.stdout
    assert b"state.password_file" not in checked.stdout  # no warning: it is set
    fleet.redis.stop()
    checked = a.admin("config", "check")
    assert checked.returncode != 0
    assert f"{fleet.redis.url} does not answer".encode() in checked.stdout, checked.stdout


def test_config_check_refuses_a_redis_password_file_sites_can_read(fleet: Fleet) -> None:
    """A site that reads state.password_file can AUTH to Redis and lift its own
    suspension: config check must call a world-readable one a problem."""
    a = fleet.nodes[0]
    secret = os.path.join(a.workdir, "secrets", "redis")
    os.chmod(os.path.dirname(secret), 0o755)  # as /etc/sendmail-shim/ often is
    os.chmod(secret, 0o644)
    stolen = a.run(["cat", secret], user="shimsite1", prog="env")
    assert stolen.stdout.strip() == fleet.redis.password.encode()  # what the mode allows
    checked = a.admin("config", "check")
    assert checked.returncode == 78, checked.stdout
    assert f"state.password_file {secret} is readable by every user".encode() in \
        checked.stdout, checked.stdout
    os.chmod(secret, 0o640)
    assert a.admin("config", "check").returncode == 0


STAND_IN = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(4)
s.settimeout(20)
conn, _ = s.accept()
conn.settimeout(5)
sys.stdout.write(repr(conn.recv(4096)))
"""


def test_a_site_listening_on_the_redis_port_gets_the_password(fleet: Fleet) -> None:
    """Redis on a port of this host above 1023: while it is down any site may listen
    there, and the daemon's reconnect hands it the password (AUTH).  config check says so."""
    a = fleet.nodes[0]
    checked = a.admin("config", "check").stdout.decode()
    assert (f"warning: state.url: Redis on 127.0.0.1:{fleet.redis.port}, a port of this host "
            "that any user may listen on") in checked, checked
    fleet.redis.stop()
    caught = a.run(["-c", STAND_IN, str(fleet.redis.port)], user="shimsite1",
                   prog="/usr/bin/python3")
    assert fleet.redis.password in caught.stdout.decode(), caught  # what the warning is for


def test_per_hour_holds_across_both_nodes(fleet: Fleet) -> None:
    a, b = fleet.nodes
    results = [send(a).returncode, send(b).returncode, send(a).returncode]
    assert results == [0, 0, 0]
    for shim in (a, b, a, b):
        refused = send(shim)
        assert refused.returncode == EX_NOPERM, refused.stderr
        assert b"per_hour 3" in refused.stderr
    fleet.relay.wait(3)
    shown = a.admin("quota", "show", "site1.test")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    assert "    3/3" in text
    assert "node-a 2 (2 rcpt), node-b 1 (1 rcpt)" in text, text
    [row] = [json.loads(line) for line in b.admin("quota", "show", "site1.test",
                                                   "--json").stdout.splitlines()]
    assert row["nodes"]["site1.test"] == {"node-a": {"messages": 2, "recipients": 2},
                                          "node-b": {"messages": 1, "recipients": 1}}
    top = b.admin("top").stdout.decode()
    assert "site1.test" in top and "node-b" in top


def test_suspend_on_one_node_stops_the_other_within_a_second(fleet: Fleet) -> None:
    a, b = fleet.nodes
    assert send(b).returncode == 0
    suspended = a.admin("site", "suspend", "site1.test", "--reason", "fleet test")
    assert suspended.returncode == 0, suspended.stderr
    time.sleep(1.0)
    refused = send(b)
    assert refused.returncode != 0
    assert b"suspended" in refused.stderr
    assert b"suspended: fleet test" in b.admin("site", "list").stdout
    assert a.admin("site", "resume", "site1.test").returncode == 0
    time.sleep(1.0)
    assert send(b).returncode == 0


def test_redis_killed_mid_run_fails_open_then_shares_again(fleet: Fleet) -> None:
    a, b = fleet.nodes
    assert send(a).returncode == 0
    fleet.redis.kill()
    accepted = send(a)
    assert accepted.returncode == 0, accepted.stderr  # fail-open: mail still accepted
    assert send(b).returncode == 0
    wait_until(lambda: "FAILING OPEN" in a.daemon_log(), 10, "the fail-open error in A's log")
    assert fleet.redis.url in a.daemon_log()
    fleet.relay.wait(3)
    fleet.redis.start()
    for shim in (a, b):
        wait_until(lambda shim=shim: "answers again" in shim.daemon_log(), 15,  # type: ignore
                   "the shared state back in the log")
    assert a.admin("site", "suspend", "site1.test", "--reason", "after").returncode == 0
    time.sleep(1.0)
    refused = send(b)
    assert refused.returncode != 0 and b"suspended" in refused.stderr


def ask_policy(port: int, instance: str) -> str:
    """One RCPT request as Postfix sends it; the service's action."""
    request = (f"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=site1.test\n"
               f"instance={instance}\nrecipient=someone@example.net\n\n").encode()
    with socket.create_connection(("127.0.0.1", port), 5) as conn:
        conn.sendall(request)
        reply = b""
        while not reply.endswith(b"\n\n"):
            piece = conn.recv(4096)
            assert piece, reply
            reply += piece
    assert reply.startswith(b"action="), reply
    return reply[len(b"action="):].decode().strip()


def test_suspend_on_a_node_reaches_the_relays_policy_service_within_a_second(
        fleet: Fleet) -> None:
    """The policy service on the relay shares the nodes' Redis: a suspension made on node A
    is answered at the relay within a second, and lifted as fast."""
    a, b = fleet.nodes
    port = free_port()
    with open(b.config, "a") as fh:  # the relay runs the service with the fleet's config
        fh.write(f"policy_service: {{listen: 'inet:127.0.0.1:{port}'}}\n")
    service = start_service(b, os.path.join(os.path.dirname(b.config), "policy.log"), port)
    try:
        assert ask_policy(port, "i1") == "DUNNO"
        assert a.admin("site", "suspend", "site1.test", "--reason", "relay test").returncode == 0
        time.sleep(1.0)
        answer = ask_policy(port, "i2")
        assert answer.startswith("DEFER_IF_PERMIT 4.7.1") and "site1.test" in answer, answer
        assert a.admin("site", "resume", "site1.test").returncode == 0
        time.sleep(1.0)
        assert ask_policy(port, "i3") == "DUNNO"
    finally:
        stop_service(service)
