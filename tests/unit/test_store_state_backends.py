"""The State interface, one behavioural suite run against both backends: SQLite and Redis.

The Redis variant starts a real redis-server on loopback (tests/redisserver.py), so
it is marked ``root`` (the end-to-end layer: a subprocess), though it needs no root;
``pytest -m "not root"`` runs the SQLite variant only.  Each test has its own key
prefix on one server per module.  Then the Redis backend's own promises: two nodes
share quotas, suspensions and relay marks, a race for the last slot lets exactly the
limit through, and a Redis outage fails open to the node's own file and back.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redisserver import RedisServer

from sendmail_shim.config import Config
from sendmail_shim.store import state_redis
from sendmail_shim.store.state import (
    ACCEPTED,
    REFUSED_QUOTA,
    Limit,
    State,
    open_state,
)
from sendmail_shim.wire import paths

from .conftest import SITE1, SITE2, MakeConfig, prepare

NOW = time.time()  # Redis keys expire in real time: counts are made near now
HOUR, DAY = 3600.0, 86400.0
Opener = Callable[[str], State]  # node name -> an open State of that node
_prefixes = itertools.count()

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.root)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_node(backend: str, request: pytest.FixtureRequest, tmp_path: Path,
              make_config: MakeConfig) -> Iterator[Opener]:
    """Open a State for a node (its own spool); redis nodes share one prefix per test."""
    opened: list[State] = []
    extra: dict[str, object] = {}
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        extra = {"state": {"backend": "redis", "url": server.url,
                           "prefix": f"test{next(_prefixes)}:"}}

    def open_one(node: str) -> State:
        root = tmp_path / node
        root.mkdir(exist_ok=True)
        config: Config = make_config(root, node=node, **extra)
        state = open_state(config, prepare(config.layout))
        opened.append(state)
        return state

    yield open_one
    for state in opened:
        state.close()


@pytest.fixture
def state(open_node: Opener) -> State:
    return open_node("web1")


class TestCounters:
    def test_windows_count_events_and_sums(self, state: State) -> None:
        state.record(SITE1, 1000, ACCEPTED, 2, "a.php", ts=NOW - 30)
        state.record(SITE1, 1000, ACCEPTED, 3, "b.php", ts=NOW)
        state.record(SITE1, 1001, REFUSED_QUOTA, 4, ts=NOW)
        state.record(SITE2, 1002, ACCEPTED, 1, ts=NOW - 2 * HOUR - 120)  # beyond the hour
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE1) == (2, 5)
        assert state.count(REFUSED_QUOTA, HOUR, NOW, site=SITE1) == (1, 4)
        assert state.count(ACCEPTED, HOUR, NOW, uid=1000) == (2, 5)
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE2) == (0, 0)
        assert state.count(ACCEPTED, DAY, NOW, site=SITE2) == (1, 1)
        assert state.count(ACCEPTED, 60, NOW + 60, site=SITE1) == (0, 0)

    def test_forget_takes_back_a_record(self, state: State) -> None:
        kept = state.record(SITE1, 1000, ACCEPTED, 2, "a.php", ts=NOW)
        dropped = state.record(SITE1, 1000, ACCEPTED, 5, "a.php", ts=NOW)
        state.forget(dropped)
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE1) == (1, 2)
        assert state.count_script(SITE1, "a.php", NOW - 60, NOW) == 1
        state.forget(kept)
        assert state.top(HOUR, NOW) == []

    def test_top_and_scripts(self, state: State) -> None:
        for _ in range(3):
            state.record(SITE1, 1000, ACCEPTED, 2, "a.php", ts=NOW)
        state.record(SITE2, 1002, ACCEPTED, 1, "b.php", ts=NOW)
        state.record(SITE2, 1002, REFUSED_QUOTA, 9, "b.php", ts=NOW)
        assert state.top(HOUR, NOW) == [(SITE1, "", 3, 6), (SITE2, "", 1, 1)]
        assert state.top(DAY, NOW, by_script=True) == [(SITE1, "a.php", 3, 6),
                                                       (SITE2, "b.php", 1, 1)]
        assert state.count_script(SITE1, "a.php", NOW - 10, NOW) == 3
        first = state.script_first_seen(SITE1, "a.php", NOW)
        assert state.script_first_seen(SITE1, "a.php", NOW + 5) == first == NOW

    def test_reset_usage(self, state: State) -> None:
        state.record(SITE1, 1000, ACCEPTED, 2, "a.php", ts=NOW)
        state.record(SITE1, 1000, REFUSED_QUOTA, 2, ts=NOW)
        state.record(SITE2, 1002, ACCEPTED, 1, ts=NOW)
        state.record_domains(SITE1, ["a.example", "b.example"], NOW)
        assert state.reset_usage(SITE1) == 2
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE1) == (0, 0)
        assert state.distinct_domains(SITE1, NOW, cap=10) == 0
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE2) == (1, 1)

    def test_distinct_domains_in_the_last_hour_capped(self, state: State) -> None:
        state.record_domains(SITE1, ["old.example"], NOW - 2 * HOUR)
        state.record_domains(SITE1, [f"d{i}.example" for i in range(5)], NOW)
        assert state.distinct_domains(SITE1, NOW, cap=100) == 5
        assert state.distinct_domains(SITE1, NOW, cap=3) == 3

    def test_by_node_names_this_node(self, state: State) -> None:
        state.record(SITE1, 1000, ACCEPTED, 2, ts=NOW)
        assert state.by_node(ACCEPTED, HOUR, NOW, SITE1) == {SITE1: {"web1": (1, 2)}}
        assert state.by_node(ACCEPTED, HOUR, NOW) == {SITE1: {"web1": (1, 2)}}


class TestReserve:
    LIMITS = (Limit("site", HOUR, 3), Limit("site", DAY, 5), Limit("site", HOUR, 6, total=True))

    def test_counts_only_within_every_limit(self, state: State) -> None:
        for expected_used in ([0, 0, 0], [1, 1, 2], [2, 2, 4]):
            reservation, used = state.reserve(SITE1, 1000, ACCEPTED, 2, "a.php", NOW,
                                              self.LIMITS)
            assert reservation is not None and used == expected_used
        reservation, used = state.reserve(SITE1, 1000, ACCEPTED, 1, "a.php", NOW, self.LIMITS)
        assert reservation is None and used == [3, 3, 6]
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE1) == (3, 6)

    def test_recipients_limit_and_uid_scope(self, state: State) -> None:
        limits = [Limit("site", HOUR, None), Limit("uid", HOUR, 4, total=True)]
        assert state.reserve(SITE1, 1000, ACCEPTED, 3, None, NOW, limits)[0] is not None
        reservation, used = state.reserve(SITE2, 1000, ACCEPTED, 2, None, NOW, limits)
        assert reservation is None and used == [0, 3]  # the account's share crosses sites
        assert state.reserve(SITE2, 1000, ACCEPTED, 1, None, NOW, limits)[0] is not None

    def test_a_forgotten_reservation_frees_its_slot(self, state: State) -> None:
        limits = [Limit("site", HOUR, 1)]
        first, _ = state.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW, limits)
        assert first is not None
        assert state.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW, limits)[0] is None
        state.forget(first)
        assert state.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW, limits)[0] is not None

    def test_racing_threads_pass_exactly_the_limit(self, open_node: Opener,
                                                   backend: str) -> None:
        nodes = [open_node("web1"), open_node("web2") if backend == "redis" else None]
        states = [s for s in nodes if s is not None]
        limit, tries = 25, 16
        passed: list[int] = []
        start = threading.Barrier(8)

        def race(state: State) -> None:
            start.wait()
            for _ in range(tries):
                if state.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW,
                                 [Limit("site", HOUR, limit)])[0] is not None:
                    passed.append(1)

        threads = [threading.Thread(target=race, args=(states[i % len(states)],))
                   for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(passed) == limit
        assert states[0].count(ACCEPTED, HOUR, NOW, site=SITE1) == (limit, limit)

    def test_rolled_back_transaction_takes_back_its_count(self, state: State) -> None:
        with pytest.raises(RuntimeError), state.transaction():
            state.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW, [Limit("site", HOUR, 5)])
            raise RuntimeError("the commit failed")
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE1) == (0, 0)


class TestMarks:
    def test_suspend_and_resume(self, state: State) -> None:
        assert state.suspend(SITE1, "by hand", "operator") is True
        assert state.suspend(SITE1, "again", "operator") is False
        mark = state.suspension(SITE1)
        assert mark is not None and mark[1:] == ("by hand", "operator")
        assert state.resume(SITE1) is True
        assert state.resume(SITE1) is False
        assert state.suspension(SITE1) is None

    def test_overrides(self, state: State) -> None:
        state.set_override(SITE1, "per_hour", 9)
        state.set_override(SITE1, "per_day", None)
        assert state.overrides(SITE1) == {"per_hour": 9, "per_day": None}
        state.clear_overrides(SITE1)
        assert state.overrides(SITE1) == {}

    def test_relay_marks(self, state: State) -> None:
        assert state.burn_relay("relay1", "blocklisted", "dnsbl watch") is True
        assert state.burn_relay("relay1", "again", "operator") is False
        assert {k: v[1:] for k, v in state.relay_marks().items()} == {
            "relay1": ("blocklisted", "dnsbl watch")}
        assert state.restore_relay("relay1") is True
        assert state.restore_relay("relay1") is False
        assert state.relay_marks() == {}

    def test_marks_survive_a_restart(self, open_node: Opener) -> None:
        first = open_node("web1")
        first.suspend(SITE1, "by hand", "operator")
        first.set_override(SITE1, "per_hour", 2)
        first.burn_relay("relay1", "burned", "operator")
        first.close()
        again = open_node("web1")
        assert again.suspension(SITE1) is not None
        assert again.overrides(SITE1) == {"per_hour": 2}
        assert "relay1" in again.relay_marks()


def _eventually(check: Callable[[], bool], within: float) -> float:
    """Seconds until ``check()`` holds; fails after ``within``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, "not within the time allowed"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.root
class TestShared:
    @pytest.fixture
    def backend(self) -> str:
        return "redis"

    def test_two_nodes_share_counts_and_say_who_sent(self, open_node: Opener) -> None:
        web1, web2 = open_node("web1"), open_node("web2")
        web1.record(SITE1, 1000, ACCEPTED, 2, "a.php", ts=NOW)
        web2.record(SITE1, 1000, ACCEPTED, 1, "a.php", ts=NOW)
        assert web1.count(ACCEPTED, HOUR, NOW, site=SITE1) == (2, 3)
        assert web2.by_node(ACCEPTED, HOUR, NOW, SITE1) == {
            SITE1: {"web1": (1, 2), "web2": (1, 1)}}
        assert web2.top(HOUR, NOW, by_script=True) == [(SITE1, "a.php", 2, 3)]

    def test_domains_and_scripts_are_the_fleets(self, open_node: Opener) -> None:
        web1, web2 = open_node("web1"), open_node("web2")
        web1.record_domains(SITE1, ["a.example", "b.example"], NOW)
        web2.record_domains(SITE1, ["b.example", "c.example"], NOW)
        assert web2.distinct_domains(SITE1, NOW, cap=100) == 3
        time.sleep(0.15)
        assert web1.distinct_domains(SITE1, NOW, cap=100) == 3
        assert web1.script_first_seen(SITE1, "a.php", NOW) == NOW
        assert web2.script_first_seen(SITE1, "a.php", NOW + 9) == NOW

    def test_a_suspension_reaches_the_other_node_within_a_second(
            self, open_node: Opener) -> None:
        web1, web2 = open_node("web1"), open_node("web2")
        web1.suspend(SITE1, "by hand", "operator")
        web1.set_override(SITE2, "per_hour", 1)
        web1.burn_relay("relay1", "burned", "operator")
        _eventually(lambda: web2.suspension(SITE1) is not None, within=1.0)
        _eventually(lambda: web2.overrides(SITE2) == {"per_hour": 1}, within=1.0)
        _eventually(lambda: "relay1" in web2.relay_marks(), within=1.0)
        web2.resume(SITE1)
        _eventually(lambda: web1.suspension(SITE1) is None, within=1.0)

    def test_outage_fails_open_then_shares_again(
            self, open_node: Opener, tmp_path: Path, make_config: MakeConfig,
            caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(state_redis, "RETRY", 0.2)
        caplog.set_level(logging.INFO, logger="sendmail_shim.store.state_redis")
        server = RedisServer(tmp_path / "own-redis")
        server.start()
        try:
            roots = []
            for node in ("web1", "web2"):
                root = tmp_path / node
                root.mkdir()
                roots.append(make_config(root, node=node, state={
                    "backend": "redis", "url": server.url, "prefix": "outage:"}))
            web1, web2 = (open_state(c, prepare(c.layout)) for c in roots)
            try:
                assert isinstance(web1, state_redis.RedisState) and web1.up
                limits = [Limit("site", HOUR, 3)]
                assert web1.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW, limits)[0]
                assert web2.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW, limits)[0]
                web1.suspend(SITE2, "by hand", "operator")
                _eventually(lambda: web2.suspension(SITE2) is not None, within=1.0)
                server.kill()
                caplog.clear()
                # Fail open: each node counts alone against its own share (N x the limit).
                passed = sum(web2.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW, limits)[0]
                             is not None for _ in range(5))
                assert passed == 2 and not web2.up
                assert "FAILING OPEN" in caplog.text and server.url in caplog.text
                assert web2.suspension(SITE2) is not None  # the last seen suspension holds
                web2.resume(SITE2)  # made during the outage: replayed when Redis answers
                web2.suspend(SITE1, "during the outage", "operator")
                server.start()  # empty: --save ''
                _eventually(lambda: web1.up and web2.up, within=5.0)
                assert "answers again" in caplog.text
                _eventually(lambda: web1.suspension(SITE1) is not None, within=1.0)
                _eventually(lambda: web1.suspension(SITE2) is None, within=1.0)
                assert web1.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW, limits)[0]
                assert web2.count(ACCEPTED, HOUR, NOW, site=SITE1) == (1, 1)
            finally:
                web1.close()
                web2.close()
        finally:
            server.stop()

    def test_a_hung_server_costs_one_timeout_then_the_local_file(
            self, tmp_path: Path, make_config: MakeConfig) -> None:
        server = RedisServer(tmp_path / "hung-redis")
        server.start()
        config = make_config(node="web1", state={"backend": "redis", "url": server.url})
        state = open_state(config, prepare(config.layout))
        try:
            assert isinstance(state, state_redis.RedisState) and state.up
            server.freeze()
            started = time.monotonic()
            for _ in range(5):
                assert state.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW,
                                     [Limit("site", HOUR, 10)])[0] is not None
            assert time.monotonic() - started < 2 * state_redis.TIMEOUT + 0.5
            assert not state.up
            server.freeze(False)
        finally:
            state.close()
            server.stop()

    def test_password_file(self, tmp_path: Path, make_config: MakeConfig) -> None:
        server = RedisServer(tmp_path / "locked-redis", password="s3cret-" + "p" * 10)
        server.start()
        secret = tmp_path / "redis-password"
        try:
            for written, up in ((server.password, True), ("wrong", False)):
                secret.write_text(f"{written}\n")
                config = make_config(node="web1", state={
                    "backend": "redis", "url": server.url, "password_file": str(secret)})
                state = open_state(config, prepare(config.layout))
                try:
                    assert isinstance(state, state_redis.RedisState) and state.up is up
                finally:
                    state.close()
                problem = state_redis.check_backend(server.url, "x:", str(secret))
                assert (problem is None) is up
            assert state_redis.insecure(server.url, str(secret)) is None
            assert "state.password_file" in (state_redis.insecure(server.url, None) or "")
            assert "holds a password" in (state_redis.insecure(
                "redis://:pw@127.0.0.1:1/0", str(secret)) or "")
        finally:
            server.stop()

    def test_redis_away_at_start_opens_on_the_local_file(
            self, tmp_path: Path, make_config: MakeConfig) -> None:
        from redisserver import free_port
        config = make_config(node="web1", state={
            "backend": "redis", "url": f"redis://127.0.0.1:{free_port()}/0"})
        state = open_state(config, prepare(config.layout))
        try:
            assert isinstance(state, state_redis.RedisState) and not state.up
            assert state.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW,
                                 [Limit("site", HOUR, 1)])[0] is not None
            assert state.reserve(SITE1, 1000, ACCEPTED, 1, None, NOW,
                                 [Limit("site", HOUR, 1)])[0] is None
            assert state.suspend(SITE1, "x", "operator") is True
        finally:
            state.close()
        assert state_redis.check_backend(config.state_url, config.state_prefix) is not None


def test_sqlite_is_the_default(make_config: MakeConfig,
                               spool_layout: paths.SpoolLayout) -> None:
    config = make_config()
    assert config.state_backend == "sqlite"
    state = open_state(config, spool_layout)
    try:
        assert type(state) is State and not state.shared
    finally:
        state.close()


def test_a_bad_redis_url_fails_open_to_the_local_file(
        make_config: MakeConfig, spool_layout: paths.SpoolLayout,
        caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(state={"backend": "redis", "url": "redis://127.0.0.1:notaport/0"})
    state = open_state(config, spool_layout)
    try:
        assert type(state) is State
        assert "FAILING OPEN" in caplog.text and "state.url" in caplog.text
    finally:
        state.close()
    problem = state_redis.check_backend(config.state_url, config.state_prefix)
    assert problem is not None and "cannot be used" in problem
