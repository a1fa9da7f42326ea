"""Who is at the other end (policy/peers.py), SASL login comparison (relaypolicy/decide.py),
and the state following another process's suspensions (store/state.py)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sendmail_shim.policy import peers
from sendmail_shim.relaypolicy.decide import login_key
from sendmail_shim.store.state import State
from sendmail_shim.wire import paths


@contextlib.contextmanager
def _loopback_pair() -> Iterator[tuple[peers.Endpoint, peers.Endpoint]]:
    """An accepted loopback connection of this process: (our end, the client's end)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        client = socket.create_connection(srv.getsockname())
        accepted, _ = srv.accept()
        with client, accepted:
            yield peers.endpoint(*accepted.getsockname()), peers.endpoint(*accepted.getpeername())


def test_loopback_owner_is_this_process_uid_by_the_exact_connection() -> None:
    with _loopback_pair() as (local, peer):
        assert peers.loopback_owner(local, peer) == os.geteuid()
        # the same through /proc/net/tcp (the fallback)
        rows = [r for r in peers.tcp_rows(port=peer[1]) if r.local == peer]
        assert [r.uid for r in rows] == [os.geteuid()]
        # another four-tuple is nobody's
        assert peers.loopback_owner(local, (peer[0], 1)) is None


def test_gate_allows_listed_uids_and_networks_only() -> None:
    with _loopback_pair() as (local, peer):
        me = os.geteuid()
        assert peers.PeerGate(frozenset({me})).judge(local, peer).allowed
        refused = peers.PeerGate(frozenset({me + 1})).judge(local, peer)
        assert not refused.allowed and refused.who == f"uid:{me}"
    remote = peers.endpoint("192.0.2.25", 40000)
    here = peers.endpoint("192.0.2.1", 10031)
    gate = peers.PeerGate(frozenset(), peers.networks(["192.0.2.25/32"]))
    assert gate.judge(here, remote).allowed
    assert not gate.judge(here, peers.endpoint("192.0.2.26", 40000)).allowed


def test_log_limit_lets_one_line_per_key_and_counts_the_rest() -> None:
    limit = peers.LogLimit(60.0)
    assert limit.allow("a") == 0
    assert [limit.allow("a") for _ in range(5)] == [None] * 5
    assert limit.allow("b") == 0
    limit.every = 0.0
    assert limit.allow("a") == 5


@pytest.mark.parametrize(("login", "key"), [
    ("site2", "site2"), ("Site2", "site2"), ("SITE2", "site2"),
    ("site2@RELAY.EXAMPLE", "site2"), ("site2@relay.example", "site2"),
    ("site2@other.example", "site2@other.example"),
    (" site2", None), ("site2 ", None), ("si te2", None), ("site2\t", None), ("", None),
    ("@relay.example", None),
])
def test_login_key_compares_as_the_sasl_backend(login: str, key: str | None) -> None:
    assert login_key(login, "relay.example") == key


def test_follow_sees_another_processes_suspension_once(tmp_path: Path) -> None:
    layout = paths.SpoolLayout(str(tmp_path / "spool"))
    os.makedirs(layout.root)
    daemon, service = State(layout), State(layout)
    try:
        assert not daemon.follow()  # nothing changed
        service.suspend("site3.test", "outbreak", "policy service (outbreak rule)")
        service.set_override("site3.test", "per_hour", 5)
        assert daemon.suspension("site3.test") is None  # what it read before
        assert daemon.follow()
        assert daemon.suspension("site3.test") is not None
        assert daemon.overrides("site3.test") == {"per_hour": 5}
        assert [s for s, _mark in daemon.suspended_elsewhere()] == ["site3.test"]
        assert daemon.suspended_elsewhere() == []
        daemon.suspend("site4.test", "by hand", "operator")  # its own: not "elsewhere"
        service.follow()
        assert [s for s, _m in service.suspended_elsewhere()] == ["site4.test"]
        service.resume("site3.test")
        assert daemon.follow() and daemon.suspension("site3.test") is None
    finally:
        daemon.close()
        service.close()


def test_who_holds_names_the_listening_sockets_owner_and_site() -> None:
    import pwd

    with socket.socket() as srv, socket.socket(socket.AF_INET6) as wild:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        me = os.geteuid()
        user = pwd.getpwuid(me).pw_name
        assert [r.uid for r in peers.port_holders("127.0.0.1", port)] == [me]
        assert peers.port_holders("::1", port) == []  # another address, not the wildcard
        assert peers.who_holds("127.0.0.1", port, lambda uid: ["s1"]) == \
            f"uid {me} ({user}, site s1)"
        wild.bind(("::", 0))
        wild.listen(1)
        other = wild.getsockname()[1]
        assert peers.who_holds("::1", other, lambda uid: []) == f"uid {me} ({user}, no site)"
        assert peers.who_holds("127.0.0.1", other, lambda uid: []).startswith(f"uid {me}")
    assert peers.who_holds("127.0.0.1", port, lambda uid: []).startswith("unknown")
