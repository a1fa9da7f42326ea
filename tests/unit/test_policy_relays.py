"""policy.relays: pool choice, active sets with standby, burn and restore on a real State."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sendmail_shim.config import Config, ConfigError
from sendmail_shim.delivery import runner as runner_module
from sendmail_shim.delivery.runner import QueueRunner
from sendmail_shim.policy import relays
from sendmail_shim.policy.sanctions import OperationError
from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import Outcome
from sendmail_shim.store.state import State
from sendmail_shim.wire import paths

from .conftest import ADMIN_NOTIFY, MY_UID, SITE1, SITE2, MakeConfig, prepare
from .smtprelay import RelayHandler, unused_port

ACTOR = "operator root"
pytest_plugins = ("unit.smtprelay",)  # the relay_server and relay fixtures


def entry(name: str, port: int, pool: str = "default", standby: bool = False) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "tls": "none", "name": name, "pool": pool,
            "standby": standby}


POOLS = [{"name": "good", "max_score": 0},
         {"name": "maybe", "min_score": 0, "max_score": 2},
         {"name": "bad", "min_score": 2, "max_score": 5},
         {"name": "spam", "min_score": 5, "hold": True}]
RELAYS = [entry("g1", 2001, "good"), entry("g2", 2002, "good"),
          entry("g-standby1", 2003, "good", True), entry("g-standby2", 2004, "good", True),
          entry("m1", 2005, "maybe"), entry("b1", 2006, "bad"),
          entry("d1", 2007)]


@pytest.fixture
def pooled(make_config: MakeConfig) -> Config:
    return make_config(relays=RELAYS, pools=POOLS,
                       sites={SITE2: {"pool": "bad"}})


def names(found: tuple[Any, ...]) -> list[str]:
    return [r.ident for r in found]


class TestChoosePool:
    def test_without_pools_everything_is_default(self, config: Config) -> None:
        for score in (None, -3.0, 0.0, 99.0):
            pool, why = relays.choose_pool(config, SITE1, score, None)
            assert pool == "default" and "no pools" in why

    @pytest.mark.parametrize(("score", "pool"), [
        (-1.5, "good"), (0.0, "maybe"), (1.99, "maybe"), (2.0, "bad"), (4.9, "bad"),
        (5.0, "spam"), (500.0, "spam")])
    def test_score_band_is_min_inclusive_max_exclusive(self, pooled: Config, score: float,
                                                       pool: str) -> None:
        chosen, why = relays.choose_pool(pooled, SITE1, score, None)
        assert chosen == pool
        assert f"{score:g}" in why

    def test_score_in_no_band_takes_default(self, make_config: MakeConfig) -> None:
        config = make_config(relays=RELAYS[:5], pools=POOLS[:2])
        assert relays.choose_pool(config, SITE1, 3.0, None)[0] == "default"

    def test_pin_wins_over_the_band_but_not_over_a_hold_band(self, pooled: Config) -> None:
        pool, why = relays.choose_pool(pooled, SITE2, -5.0, None)
        assert pool == "bad" and "pinned" in why
        pool, why = relays.choose_pool(pooled, SITE2, 7.0, None)
        assert pool == "spam" and "hold" in why

    def test_unscored_takes_the_unscored_pool_then_the_pin_then_default(
            self, pooled: Config) -> None:
        assert relays.choose_pool(pooled, SITE2, None, "maybe")[0] == "maybe"
        assert relays.choose_pool(pooled, SITE2, None, None)[0] == "bad"
        assert relays.choose_pool(pooled, SITE1, None, None)[0] == "default"
        assert relays.choose_pool(pooled, SITE1, None, "spam")[0] == "spam"

    def test_unscored_pool_comes_from_the_scanner_section(self, pooled: Config) -> None:
        assert relays.unscored_pool(pooled) is None  # no scan: section in this branch

    def test_hold(self, pooled: Config) -> None:
        assert relays.is_hold(pooled, "spam")
        assert not relays.is_hold(pooled, "good") and not relays.is_hold(pooled, "default")


class TestActiveRelays:
    def test_without_pools_every_relay_in_order(self, make_config: MakeConfig) -> None:
        config = make_config(relays=[entry("a", 1), entry("b", 2)])
        assert names(relays.active_relays(config, {}, "default")) == ["a", "b"]

    def test_standby_is_out_while_the_pool_has_its_relays(self, pooled: Config) -> None:
        assert names(relays.active_relays(pooled, {}, "good")) == ["g1", "g2"]
        assert names(relays.active_relays(pooled, {}, "maybe")) == ["m1"]
        assert relays.active_relays(pooled, {}, "spam") == ()

    def test_burn_promotes_one_for_one_in_list_order(self, pooled: Config) -> None:
        mark = (1.0, "listed", ACTOR)
        assert names(relays.active_relays(pooled, {"g1": mark}, "good")) == [
            "g2", "g-standby1"]
        assert names(relays.active_relays(pooled, {"g1": mark, "g2": mark}, "good")) == [
            "g-standby1", "g-standby2"]
        burned_standby = {"g1": mark, "g-standby1": mark}
        assert names(relays.active_relays(pooled, burned_standby, "good")) == [
            "g2", "g-standby2"]

    def test_all_burned_is_empty_and_never_another_pool(self, pooled: Config) -> None:
        mark = (1.0, "listed", ACTOR)
        assert relays.active_relays(pooled, {"m1": mark}, "maybe") == ()
        every = dict.fromkeys(["g1", "g2", "g-standby1", "g-standby2"], mark)
        assert relays.active_relays(pooled, every, "good") == ()

    def test_relay_state(self, pooled: Config) -> None:
        marks = {"g1": (1.0, "listed", ACTOR)}
        states = {r.ident: relays.relay_state(pooled, marks, r) for r in pooled.relays}
        assert states["g1"] == "burned" and states["g2"] == "active"
        assert states["g-standby1"] == "promoted" and states["g-standby2"] == "standby"


class TestConfig:
    def test_relay_name_defaults_to_host_port(self, config: Config) -> None:
        assert config.relays[0].ident == "127.0.0.1:2525"
        assert config.relays[0].pool == "default" and not config.relays[0].standby

    @pytest.mark.parametrize(("overrides", "text"), [
        ({"relays": [entry("a", 1, "nowhere")]}, "relays[0].pool: no pool 'nowhere'"),
        ({"relays": [entry("a", 1), entry("a", 2)]}, "relays[1]: a second relay named a"),
        ({"pools": [{"name": "p"}, {"name": "p"}]}, "pools[1].name: pool p is declared twice"),
        ({"pools": [{"name": "p", "min_score": 2, "max_score": 1}]}, "min_score must lie"),
        ({"sites": {SITE1: {"pool": "nowhere"}}}, f"sites.{SITE1}.pool: no pool 'nowhere'"),
        ({"pools": [{"name": "p", "max_score": "high"}]}, "pools[0].max_score: expected"),
    ])
    def test_pool_errors_name_the_key(self, make_config: MakeConfig,
                                      overrides: dict[str, Any], text: str) -> None:
        with pytest.raises(ConfigError) as caught:
            make_config(**overrides)
        assert text in str(caught.value)


@pytest.fixture
def pooled_state(pooled: Config) -> Any:
    prepare(pooled.layout)
    state = State(pooled.layout)
    yield state
    state.close()


def notices(layout: paths.SpoolLayout) -> list[bytes]:
    out = []
    for queue_id in spool.queue_ids(layout, spool.INCOMING):
        envelope, message = spool.read_entry(layout, spool.INCOMING, queue_id)
        assert envelope.recipients == [ADMIN_NOTIFY]
        out.append(message)
    return out


class TestBurnRestore:
    def test_burn_promotes_logs_and_notifies(self, pooled: Config, pooled_state: State,
                                             caplog: pytest.LogCaptureFixture) -> None:
        text = relays.burn(pooled, pooled_state, "g1", "listed on zen", ACTOR)
        assert "g1" in text and "pool good" in text and "g-standby1" in text
        assert set(pooled_state.relay_marks()) == {"g1"}
        since, reason, actor = pooled_state.relay_marks()["g1"]
        assert reason == "listed on zen" and actor == ACTOR and since > 0
        logged = [r.getMessage() for r in caplog.records if "relay_burned" in r.getMessage()]
        assert logged and "relay=g1 pool=good promoted=g-standby1" in logged[0]
        [notice] = notices(pooled.layout)
        assert b"relay g1 burned (pool good)" in notice and b"relay restore g1" in notice
        again = relays.burn(pooled, pooled_state, "g1", "again", ACTOR)
        assert "already burned" in again and "listed on zen" in again
        assert len(notices(pooled.layout)) == 1

    def test_last_relay_burned_says_the_pool_waits(self, pooled: Config,
                                                   pooled_state: State) -> None:
        text = relays.burn(pooled, pooled_state, "m1", "listed", ACTOR)
        assert "NO active relay" in text and "waits in the queue" in text

    def test_restore_sends_the_standby_back(self, pooled: Config, pooled_state: State,
                                            caplog: pytest.LogCaptureFixture) -> None:
        relays.burn(pooled, pooled_state, "g1", "listed", ACTOR)
        text = relays.restore(pooled, pooled_state, "g1", ACTOR)
        assert "restored" in text and "g-standby1 is back to standby" in text
        assert pooled_state.relay_marks() == {}
        assert any("relay_restored relay=g1 pool=good back_to_standby=g-standby1" in
                   r.getMessage() for r in caplog.records)
        assert "was not burned" in relays.restore(pooled, pooled_state, "g1", ACTOR)
        assert len(notices(pooled.layout)) == 2

    def test_unknown_relay_lists_the_names(self, pooled: Config, pooled_state: State) -> None:
        with pytest.raises(OperationError) as caught:
            relays.burn(pooled, pooled_state, "nope", "x", ACTOR)
        assert "'nope'" in str(caught.value) and "g1, g2, g-standby1" in str(caught.value)
        with pytest.raises(OperationError):
            relays.restore(pooled, pooled_state, "nope", ACTOR)

    def test_marks_survive_reopening_the_state(self, pooled: Config,
                                               pooled_state: State) -> None:
        relays.burn(pooled, pooled_state, "127.0.0.1:2002", "by address", ACTOR)
        again = State(pooled.layout)
        try:
            assert set(again.relay_marks()) == {"g2"}
            assert again.restore_relay("g2") and not again.restore_relay("g2")
        finally:
            again.close()


def test_stats_count_answers_per_relay(pooled: Config) -> None:
    stats = relays.RelayStats()
    g1, g2 = pooled.relays[0], pooled.relays[1]
    stats.note([Outcome.from_reply(250, "ok", g1.label), Outcome.from_reply(550, "no", g1.label),
                Outcome.from_reply(451, "later", g1.label), Outcome.network("down", g2.label),
                Outcome.network("no relay")])
    one = stats.of(g1)
    assert (one.delivered, one.refused, one.deferred) == (1, 1, 1)
    assert one.last == "451 later" and one.when > 0
    assert stats.of(g2).last == "down" and stats.of(g2).deferred == 1
    assert stats.of(pooled.relays[4]).when == 0


class TestRunnerUsesPools:
    """The queue runner against smtprelay's in-process relay: pools, standby, pool flush."""

    pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

    @staticmethod
    def enqueue(config: Config, rcpt: str, score: float | None) -> str:
        message = b"From: noreply@site1.test\nSubject: pools\n\nbody\n"
        env = Envelope(queue_id=spool.new_queue_id(), site=SITE1, uid=MY_UID,
                       sender=f"noreply@{SITE1}", recipients=[rcpt], arrival=time.time(),
                       size=len(message))
        spool.commit(config.layout, env, message)
        spool.write_status(config.layout, env.queue_id, spool.Status(score=score))
        return env.queue_id

    def test_one_session_per_pool_through_its_own_relays(
            self, make_config: MakeConfig, relay_server: tuple[RelayHandler, int],
            relay: RelayHandler, monkeypatch: pytest.MonkeyPatch) -> None:
        port = relay_server[1]
        config = make_config(relays=[entry("x", port, "a"), entry("y", port, "b")],
                             pools=[{"name": "a", "max_score": 0}, {"name": "b"}])
        prepare(config.layout)
        state = State(config.layout)
        opened: list[list[str]] = []
        real = runner_module.open_session

        async def counting(*args: Any, **kwargs: Any) -> Any:
            opened.append([r.ident for r in args[0]])
            return await real(*args, **kwargs)

        monkeypatch.setattr(runner_module, "open_session", counting)
        try:
            for n, score in enumerate((-1.0, 1.0, -2.0)):
                self.enqueue(config, f"r{n}@example.net", score)
            assert asyncio.run(QueueRunner(config, state).run_once()) == 3
        finally:
            state.close()
        assert sorted(opened) == [["x"], ["y"]] and len(relay.received) == 3

    def test_burn_flush_retries_only_that_pool_on_the_standby(
            self, make_config: MakeConfig, relay_server: tuple[RelayHandler, int],
            relay: RelayHandler) -> None:
        live, dead = relay_server[1], unused_port()
        config = make_config(relays=[entry("a1", dead, "a"), entry("a-spare", live, "a", True),
                                     entry("b1", dead + 1 if dead < 65535 else dead - 1, "b")],
                             pools=[{"name": "a", "max_score": 0}, {"name": "b"}])
        prepare(config.layout)
        state = State(config.layout)
        try:
            runner = QueueRunner(config, state)
            in_a = self.enqueue(config, "a@example.net", -1.0)
            in_b = self.enqueue(config, "b@example.net", 1.0)
            asyncio.run(runner.run_once())
            assert sorted(spool.queue_ids(config.layout, spool.DEFERRED)) == sorted([in_a, in_b])
            assert relay.received == []  # the standby waits while a1 is the active relay
            relays.burn(config, state, "a1", "listed", ACTOR)
            runner.poke(force=True, pool="a")
            asyncio.run(runner.run_once())
            assert [t.rcpt_tos for t in relay.received] == [["a@example.net"]]
            # (the burn's notice to the operator waits too: pool default has no relay here)
            assert in_b in spool.queue_ids(config.layout, spool.DEFERRED)
            assert in_a not in spool.queue_ids(config.layout, spool.DEFERRED)
            notice = next(q for q in spool.queue_ids(config.layout, spool.DEFERRED) if q != in_b)
            assert "pool default has no relays" in spool.read_status(config.layout,
                                                                     notice).last_error
            assert spool.read_status(config.layout, in_b).attempts == 1  # not flushed
            answers = runner.relay_stats.of(config.relays[1])
            assert answers.delivered == 1 and answers.last.startswith("250")
        finally:
            state.close()
