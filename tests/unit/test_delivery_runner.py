"""Unit tests of delivery/runner.py: one queue run at a time against an in-process relay.

The relay is smtprelay.py's (aiosmtpd on 127.0.0.1, a thread of this process, with
AUTH): the recipient's local part picks its answer, ``busy`` 451, ``nosuch`` 550,
anything else 250.  Messages are committed straight into a tmp_path spool (conftest's
configuration: site1.test is this uid; retry initial 10 s, maximum 5 min, lifetime
1 day, no jitter).  The runner's clock is its module's ``time.time``, replaced by a
fake one, so retries are driven one pass at a time and nothing sleeps.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sendmail_shim.config import Config
from sendmail_shim.delivery import keptsessions, lanes, record
from sendmail_shim.delivery import runner as runner_module
from sendmail_shim.delivery.answerbook import AnswerBook
from sendmail_shim.delivery.record import MAX_INTERNAL_FAILURES, backoff
from sendmail_shim.delivery.removal import Removal, Removals
from sendmail_shim.delivery.runner import QueueRunner
from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import OK, Outcome
from sendmail_shim.store.state import State

from .conftest import SITE2
from .smtprelay import RelayHandler, unused_port

SITE, SENDER, UID = "site1.test", "noreply@site1.test", os.getuid()
pytest_plugins = ("unit.smtprelay",)  # the relay_server and relay fixtures
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
T0 = 1_800_000_000.0  # the fake clock's start
INITIAL, LIFETIME = 10.0, 86400.0  # conftest's retry policy


@pytest.fixture
def config(make_config: Callable[..., Config], relay_server: tuple[RelayHandler, int]
           ) -> Config:
    return make_config(relays=[{"host": "127.0.0.1", "port": relay_server[1], "tls": "none",
                                "timeout": 5}])


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [T0]
    fake = SimpleNamespace(time=lambda: now[0])
    for module in (runner_module, record):  # every clock of a run and of its records
        monkeypatch.setattr(module, "time", fake)
    return now


@pytest.fixture
def runner(config: Config, state: State, clock: list[float]) -> QueueRunner:
    return QueueRunner(config, state)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The site of each relay session opened (the real open_session, counted)."""
    sites: list[str] = []
    real = runner_module.open_session

    async def counting(*args: Any, **kwargs: Any) -> Any:
        sites.append(args[3])
        return await real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "open_session", counting)
    return sites


def enqueue(config: Config, *recipients: str, sender: str = SENDER, site: str = SITE,
            arrival: float = T0, notify: str | None = None) -> str:
    message = b"From: noreply@site1.test\nSubject: unit\n\nbody\n"
    env = Envelope(queue_id=spool.new_queue_id(), site=site, uid=UID, sender=sender,
                   recipients=list(recipients), arrival=arrival, notify=notify,
                   size=len(message))
    spool.commit(config.layout, env, message)
    return env.queue_id


def run(runner: QueueRunner, force: bool = False) -> int:
    if force:
        runner.poke(force=True)
    return asyncio.run(runner.run_once())


def queue(config: Config, state: str) -> list[str]:
    return spool.queue_ids(config.layout, state)


def envelopes(config: Config, state: str = spool.INCOMING) -> list[Envelope]:
    return [spool.read_envelope(config.layout, state, q) for q in queue(config, state)]


def status(config: Config, queue_id: str) -> spool.Status:
    return spool.read_status(config.layout, queue_id)


def empty(config: Config) -> bool:
    return not any(queue(config, s) for s in spool.STATES) and \
        not os.listdir(config.layout.status)


class TestDelivered:
    def test_a_message_is_sent_as_its_site_and_removed(
            self, config: Config, runner: QueueRunner, relay: RelayHandler) -> None:
        enqueue(config, "a@example.net", "b@example.net")
        assert run(runner) == 1
        [sent] = relay.received
        assert (sent.login, sent.mail_from, sent.rcpt_tos) == (
            SITE, SENDER, ["a@example.net", "b@example.net"])
        assert b"Subject: unit" in sent.data
        assert empty(config)
        assert run(runner) == 0 and len(relay.received) == 1  # never sent twice

    def test_messages_of_one_site_share_one_connection(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            opened: list[str]) -> None:
        for n in range(3):
            enqueue(config, f"r{n}@example.net")
        assert run(runner) == 3
        assert opened == [SITE] and len(relay.received) == 3 and empty(config)


class TestTemporaryTrouble:
    def test_4xx_defers_with_backoff_and_is_retried_when_due(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            clock: list[float]) -> None:
        queue_id = enqueue(config, "busy@example.net")
        assert run(runner) == 1
        assert queue(config, spool.DEFERRED) == [queue_id]
        first = status(config, queue_id)
        assert (first.attempts, first.next_attempt) == (1, T0 + INITIAL)
        assert "451 4.2.1 mailbox busy" in first.last_error
        assert list(first.delayed) == ["busy@example.net"]
        clock[0] = T0 + INITIAL - 1
        assert run(runner) == 0 and relay.rcpts == ["busy@example.net"]  # not due yet
        clock[0] = T0 + INITIAL + 1
        assert run(runner) == 1 and relay.rcpts == ["busy@example.net"] * 2
        second = status(config, queue_id)
        assert (second.attempts, second.next_attempt) == (2, clock[0] + 2 * INITIAL)

    def test_a_flush_retries_before_its_time(self, config: Config, runner: QueueRunner,
                                             relay: RelayHandler) -> None:
        enqueue(config, "busy@example.net")
        run(runner)
        assert run(runner) == 0
        assert run(runner, force=True) == 1 and len(relay.rcpts) == 2

    def test_only_the_waiting_recipients_are_tried_again(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            clock: list[float]) -> None:
        queue_id = enqueue(config, "ok@example.net", "busy@example.net", "nosuch@example.net")
        run(runner)
        after = status(config, queue_id)
        assert after.done == ["ok@example.net"]
        assert list(after.failed) == ["nosuch@example.net"] and "550 5.1.1" in \
            after.failed["nosuch@example.net"]
        assert list(after.delayed) == ["busy@example.net"]
        [bounce] = envelopes(config)
        assert bounce.extra == {"bounce_of": queue_id}
        clock[0] += INITIAL + 1
        relay.reset()
        run(runner)
        assert relay.rcpts == [SENDER, "busy@example.net"]  # the bounce, and busy@ alone
        assert [t.rcpt_tos for t in relay.received] == [[SENDER]]

    def test_an_unreachable_relay_defers(
            self, make_config: Callable[..., Config], state: State, clock: list[float]) -> None:
        config = make_config(relays=[{"host": "127.0.0.1", "port": unused_port(),
                                      "tls": "none", "timeout": 5}])
        queue_id = enqueue(config, "a@example.net", "b@example.net")
        assert run(QueueRunner(config, state)) == 1
        after = status(config, queue_id)
        assert queue(config, spool.DEFERRED) == [queue_id]
        assert "connect to 127.0.0.1" in after.last_error and len(after.delayed) == 2

    def test_a_refused_login_defers_and_sends_nothing(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            tmp_path: Path) -> None:
        (tmp_path / "secrets" / "site1").write_text("a-wrong-password\n")
        queue_id = enqueue(config, "a@example.net")
        run(runner)
        assert queue(config, spool.DEFERRED) == [queue_id] and relay.rcpts == []
        assert "authentication as site1.test failed: 535" in status(config, queue_id).last_error

    def test_backoff_doubles_up_to_the_maximum_with_bounded_jitter(
            self, config: Config, make_config: Callable[..., Config]) -> None:
        assert [backoff(config, n) for n in (0, 1, 2, 3, 5, 6, 200)] == [
            10.0, 10.0, 20.0, 40.0, 160.0, 300.0, 300.0]
        jittery = make_config(retry={"jitter": 0.2})
        random.seed(11)
        delays = [backoff(jittery, 3) for _ in range(200)]
        assert all(32.0 <= d <= 48.0 for d in delays) and len(set(delays)) > 100


class TestPermanentFailures:
    def test_5xx_bounces_to_the_sender_and_removes_the_original(
            self, config: Config, runner: QueueRunner, relay: RelayHandler) -> None:
        original = enqueue(config, "nosuch@example.net")
        run(runner)
        assert original not in queue(config, spool.INCOMING) + queue(config, spool.DEFERRED)
        [bounce] = envelopes(config)
        assert (bounce.sender, bounce.recipients, bounce.origin, bounce.site) == (
            "", [SENDER], "bounce", SITE)
        assert runner.wake.is_set()  # the runner asks for another pass to send it
        run(runner)
        [sent] = relay.received
        assert (sent.mail_from, sent.rcpt_tos) == ("<>", [SENDER])
        assert b"Final-Recipient: rfc822; nosuch@example.net" in sent.data
        assert b"550 5.1.1" in sent.data and original.encode() in sent.data
        assert empty(config)

    @pytest.mark.parametrize(("sender", "notify"), [("", None), (SENDER, "never")])
    def test_no_bounce_for_the_null_sender_or_notify_never(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            sender: str, notify: str | None, caplog: pytest.LogCaptureFixture) -> None:
        enqueue(config, "nosuch@example.net", sender=sender, notify=notify)
        with caplog.at_level(logging.INFO, "sendmail_shim.delivery"):
            run(runner)
        assert empty(config) and relay.received == []
        assert "bounced queue_id=" in caplog.text and "bounce_queued" not in caplog.text

    def test_the_lifetime_ends_in_a_bounce(
            self, config: Config, runner: QueueRunner, relay: RelayHandler) -> None:
        original = enqueue(config, "busy@example.net", "ok@example.net",
                           arrival=T0 - LIFETIME - 1)
        run(runner)
        assert [t.rcpt_tos for t in relay.received] == [["ok@example.net"]]
        [bounce] = envelopes(config)
        assert bounce.extra == {"bounce_of": original} and queue(config, spool.DEFERRED) == []
        run(runner)
        assert b"message expired after 1 days in the queue" in relay.received[-1].data
        assert b"451 4.2.1 mailbox busy" in relay.received[-1].data
        assert empty(config)

    def test_within_the_lifetime_it_waits(self, config: Config, runner: QueueRunner) -> None:
        queue_id = enqueue(config, "busy@example.net", arrival=T0 - LIFETIME + 60)
        run(runner)
        assert queue(config, spool.DEFERRED) == [queue_id] and envelopes(config) == []


class TestIsolation:
    def test_a_damaged_queue_file_goes_to_corrupt_and_the_rest_is_delivered(
            self, config: Config, runner: QueueRunner, relay: RelayHandler) -> None:
        bad = spool.new_queue_id()
        Path(spool.queue_path(config.layout, spool.INCOMING, bad)).write_bytes(b"garbage\n")
        good = enqueue(config, "a@example.net")
        wrong_size = enqueue(config, "b@example.net")
        path = Path(spool.queue_path(config.layout, spool.INCOMING, wrong_size))
        path.write_bytes(path.read_bytes() + b"appended\n")  # envelope parses, size differs
        run(runner)
        assert sorted(queue(config, spool.CORRUPT)) == sorted([bad, wrong_size])
        assert [t.rcpt_tos for t in relay.received] == [["a@example.net"]]
        assert good not in queue(config, spool.INCOMING)

    def test_a_message_that_breaks_the_runner_is_deferred_then_held(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
        real_route = QueueRunner._route

        async def route(self: QueueRunner, recipients: list[str]) -> Any:
            if "boom@example.net" in recipients:
                raise ValueError("cannot route this")
            return await real_route(self, recipients)

        monkeypatch.setattr(QueueRunner, "_route", route)
        broken = enqueue(config, "boom@example.net")
        enqueue(config, "fine@example.net")
        with caplog.at_level(logging.ERROR, "sendmail_shim.delivery"):
            assert run(runner) == 2
            assert [t.rcpt_tos for t in relay.received] == [["fine@example.net"]]
            for n in range(1, MAX_INTERNAL_FAILURES):
                after = status(config, broken)
                assert queue(config, spool.DEFERRED) == [broken], n
                assert after.internal_failures == n and after.next_attempt > T0
                run(runner, force=True)
        assert queue(config, spool.HOLD) == [broken] and queue(config, spool.DEFERRED) == []
        held = status(config, broken)
        assert held.internal_failures == MAX_INTERNAL_FAILURES
        assert held.last_error == "internal error: ValueError: cannot route this"
        assert f"queue release {broken}" in caplog.text
        assert len(relay.received) == 1

    def test_a_site_gone_from_the_configuration_waits(
            self, config: Config, runner: QueueRunner, relay: RelayHandler) -> None:
        queue_id = enqueue(config, "a@example.net", site="gone.test")
        run(runner)
        assert queue(config, spool.DEFERRED) == [queue_id] and relay.rcpts == []
        assert "site gone.test is no longer in the configuration" in \
            status(config, queue_id).last_error

    def test_a_suspended_site_is_held_and_sends_nothing(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            state: State) -> None:
        queue_id = enqueue(config, "a@example.net")
        state.suspend(SITE, "test", "operator")
        run(runner)
        assert queue(config, spool.HOLD) == [queue_id] and relay.rcpts == []

    def test_a_stopping_runner_starts_nothing(self, config: Config, runner: QueueRunner,
                                              relay: RelayHandler) -> None:
        enqueue(config, "a@example.net")
        runner.stop()
        assert run(runner) == 0 and relay.rcpts == [] and len(queue(config, spool.INCOMING)) == 1


class TestBookkeeping:
    def test_an_outcome_the_disk_refuses_pauses_delivery_and_is_never_resent(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            monkeypatch: pytest.MonkeyPatch) -> None:
        # A delivered message's only bookkeeping is its removal (no status is written).
        real_remove = spool.remove_delivered
        disk_full = [True]

        def remove_delivered(*args: Any, **kwargs: Any) -> None:
            if disk_full[0]:
                raise OSError(errno.EIO, "Input/output error")
            real_remove(*args, **kwargs)

        monkeypatch.setattr(spool, "remove_delivered", remove_delivered)
        first = enqueue(config, "a@example.net")
        run(runner)
        assert runner.paused and len(relay.received) == 1
        enqueue(config, "b@example.net")
        assert run(runner, force=True) == 0 and len(relay.received) == 1  # paused: no resend
        disk_full[0] = False
        run(runner)
        assert not runner.paused
        assert [t.rcpt_tos for t in relay.received] == [["a@example.net"], ["b@example.net"]]
        assert first not in queue(config, spool.INCOMING) and empty(config)


class FakeSessions:
    """``open_session`` replaced: sessions that accept everything after a short pause,
    record the order of deliveries by site, and count the sessions open at once."""

    def __init__(self, on_send: Callable[[int], None] | None = None,
                 pause: float = 0.001) -> None:
        self.pause = pause
        self.usable = True  # what a kept session answers to the RSET check
        self.checked = 0
        self.sent: list[str] = []  # the site of each delivered message, in order
        self.open_now = 0
        self.most_open = 0
        self.opened = 0
        self.on_send = on_send

    async def open(self, relays: Any, login: Any, hostname: str, site: str) -> Any:
        self.opened += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        fake = self

        class Session:
            async def send(self, env: Envelope, message: bytes,
                           recipients: list[str]) -> dict[str, Outcome]:
                await asyncio.sleep(fake.pause)
                fake.sent.append(env.site)
                if fake.on_send is not None:
                    fake.on_send(len(fake.sent))
                return dict.fromkeys(recipients, Outcome(OK, 250, "2.0.0 Ok", "fake"))

            async def usable(self) -> bool:
                fake.checked += 1
                return fake.usable

            async def close(self) -> None:
                fake.open_now -= 1

        return Session()


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> FakeSessions:
    fake = FakeSessions()
    monkeypatch.setattr(runner_module, "open_session", fake.open)
    monkeypatch.setattr(runner_module, "REFILL_EVERY", 0.0)
    return fake


class TestFairness:
    def _backlog_then_another_site(self, config: Config, runner: QueueRunner,
                                   sessions: FakeSessions, backlog: int) -> int:
        for n in range(backlog):
            enqueue(config, f"r{n}@example.net")
        arrived: list[int] = []

        def other_site_arrives(delivered: int) -> None:
            if delivered == 10:
                enqueue(config, "x@example.net", site=SITE2, sender="noreply@site2.test")
                runner.poke()
                arrived.append(delivered)

        sessions.on_send = other_site_arrives
        # A relay's pace: the look for the arrival (a thread hop) takes far less, even on
        # a loaded machine (0.02 s left too little once a delivered message's record
        # stopped hopping to a thread: the lanes ran faster than the look).
        sessions.pause = 0.05
        assert run(runner) == backlog + 1
        assert arrived == [10] and sessions.sent.count(SITE2) == 1 and empty(config)
        return sessions.sent.index(SITE2)

    def test_another_sites_message_does_not_wait_for_a_backlog(
            self, make_config: Callable[..., Config], state: State, clock: list[float],
            sessions: FakeSessions) -> None:
        # Sessions to spare (the backlog's site may hold 4): the other site gets one at once.
        config = make_config(relays=[{"host": "127.0.0.1", "port": 2525, "tls": "none",
                                      "sessions": 4}])
        runner = QueueRunner(config, state)
        position = self._backlog_then_another_site(config, runner, sessions, 80)
        assert position < 10 + 4 + 4

    def test_a_site_holding_every_session_gives_one_way(
            self, config: Config, runner: QueueRunner, sessions: FakeSessions) -> None:
        # The backlog holds all 20 sessions: they end after their message in hand, so the
        # other site waits behind at most two messages per session (the arrival is noticed
        # while the next ones are in hand), not behind the backlog.
        position = self._backlog_then_another_site(config, runner, sessions, 200)
        assert sessions.most_open == lanes.MAX_SESSIONS
        assert position < 10 + 2 * lanes.MAX_SESSIONS + 4

    def test_a_site_gives_its_session_to_a_waiting_site(
            self, config: Config, runner: QueueRunner, sessions: FakeSessions,
            monkeypatch: pytest.MonkeyPatch) -> None:
        # No site to spare: the backlog's sessions give way, the last after its turn.
        monkeypatch.setattr(lanes, "MAX_PARALLEL_SITES", 1)
        monkeypatch.setattr(lanes, "LANE_TURN", 5)
        position = self._backlog_then_another_site(config, runner, sessions, 200)
        assert position < 10 + 2 * lanes.MAX_SESSIONS + 5 + 4


class TestParallelSessions:
    def test_a_long_queue_is_sent_over_the_relays_sessions(
            self, config: Config, runner: QueueRunner, sessions: FakeSessions) -> None:
        for n in range(100):
            enqueue(config, f"r{n}@example.net")
        assert run(runner) == 100
        assert len(sessions.sent) == 100 and empty(config)
        assert sessions.most_open == 20  # the relay's default sessions: 20

    def test_a_short_queue_opens_a_session_per_4_messages(
            self, config: Config, runner: QueueRunner, sessions: FakeSessions) -> None:
        for n in range(9):
            enqueue(config, f"r{n}@example.net")
        assert run(runner) == 9 and sessions.most_open == 3 and empty(config)

    def test_sessions_is_per_relay_and_one_means_one(
            self, make_config: Callable[..., Config], state: State, clock: list[float],
            sessions: FakeSessions) -> None:
        config = make_config(relays=[{"host": "127.0.0.1", "port": 2525, "tls": "none",
                                      "sessions": 1}])
        for n in range(40):
            enqueue(config, f"r{n}@example.net")
        assert run(QueueRunner(config, state)) == 40
        assert sessions.most_open == 1 and sessions.opened == 1 and empty(config)


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


class TestLinger:
    """A lane that ran out of mail while its site's new mail arrives sends it on the
    session it holds: no new run, lane or session check per message."""

    def test_a_sites_burst_of_single_messages_goes_on_over_its_lane(
            self, config: Config, runner: QueueRunner, sessions: FakeSessions,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(runner_module, "REFILL_EVERY", 0.05)
        sessions.pause = 0.02
        runs: list[int] = []
        real_run_once = runner.run_once

        async def counted() -> int:
            runs.append(1)
            return await real_run_once()

        monkeypatch.setattr(runner, "run_once", counted)

        async def scenario() -> None:
            task = asyncio.create_task(runner.run_forever())
            for n in range(12):  # PHP's mail() in a loop: one message at a time
                enqueue(config, f"r{n}@example.net")
                runner.poke()
                await asyncio.sleep(0.015)
            await until(lambda: len(sessions.sent) == 12 and empty(config))
            runner.stop()
            await task

        asyncio.run(scenario())
        # One run over the lane's session (without the linger: 5 runs, 4 RSET checks).
        assert len(runs) <= 2 and sessions.checked <= 1 and sessions.opened <= 2, runs

    def test_a_lane_does_not_wait_while_another_site_waits_for_a_session(
            self, config: Config, runner: QueueRunner, sessions: FakeSessions,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(lanes, "MAX_SESSIONS", 1)
        monkeypatch.setattr(runner_module, "REFILL_EVERY", 0.3)

        async def scenario() -> None:
            task = asyncio.create_task(runner.run_forever())
            enqueue(config, "a@example.net")
            runner.poke()
            await until(lambda: len(sessions.sent) == 1)
            # site1's lane is empty now; mail of both sites arrives: site2 waits for the
            # one session, so site1's lane ends instead of waiting for the look.
            enqueue(config, "b@example.net", site=SITE2, sender="noreply@site2.test")
            enqueue(config, "c@example.net")
            runner.poke()
            await until(lambda: len(sessions.sent) == 3 and empty(config))
            runner.stop()
            await task

        asyncio.run(scenario())
        assert sessions.sent[1] == SITE2 and sessions.most_open == 1


class TestRemoval:
    """Delivered messages are removed in the background, and never taken meanwhile."""

    def test_a_message_being_removed_is_not_taken_again(
            self, config: Config, runner: QueueRunner) -> None:
        delivered = enqueue(config, "a@example.net")
        other = enqueue(config, "b@example.net")
        runner._removals._pending.add(delivered)  # handed in, its unlink not done yet
        due = runner._due(False, frozenset())
        assert due == {SITE: [(spool.INCOMING, other)]}

    def test_a_failed_removal_is_kept_and_retried(
            self, config: Config, spool_layout: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        queue_id = enqueue(config, "a@example.net")
        real = spool.remove_delivered
        broken = [True]

        def remove_delivered(*args: Any) -> None:
            if broken[0]:
                raise OSError(errno.EROFS, "Read-only file system")
            real(*args)

        monkeypatch.setattr(spool, "remove_delivered", remove_delivered)
        removals = Removals()
        removals.add(Removal(config.layout, queue_id, spool.INCOMING, SITE, 1, 0))
        assert removals.wait(5) and removals.failed and queue_id in removals
        assert not removals.retry_failed() and queue_id in removals  # still refused
        broken[0] = False
        assert removals.retry_failed() and queue_id not in removals and empty(config)


class TestKeptSessions:
    """run_forever keeps a site's relay session IDLE_SESSION seconds after its lane."""

    def test_mail_arriving_after_the_lane_ended_reuses_its_session(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            opened: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(keptsessions, "IDLE_SESSION", 0.5)

        async def scenario() -> None:
            task = asyncio.create_task(runner.run_forever())
            for n in range(3):  # one at a time, as PHP's mail() calls arrive
                enqueue(config, f"r{n}@example.net")
                runner.poke()
                await until(lambda n=n: len(relay.received) == n + 1 and empty(config))
                await until(lambda: len(runner._idle) == 1)  # the lane ended, session kept
            assert opened == [SITE]  # one login for the three
            await until(lambda: len(runner._idle) == 0, 3)  # closed after IDLE_SESSION
            enqueue(config, "late@example.net")
            runner.poke()
            await until(lambda: len(relay.received) == 4 and empty(config))
            runner.stop()
            await task
            assert len(runner._idle) == 0 and not runner._idle.closing  # closed at the end

        asyncio.run(scenario())
        assert opened == [SITE, SITE]

    def test_a_kept_session_that_fails_its_check_is_replaced_not_deferred(
            self, config: Config, runner: QueueRunner, sessions: FakeSessions) -> None:
        sessions.usable = False  # the relay ended it meanwhile

        async def scenario() -> None:
            task = asyncio.create_task(runner.run_forever())
            enqueue(config, "a@example.net")
            runner.poke()
            await until(lambda: len(sessions.sent) == 1 and len(runner._idle) == 1)
            enqueue(config, "b@example.net")
            runner.poke()
            await until(lambda: len(sessions.sent) == 2 and empty(config))
            runner.stop()
            await task

        asyncio.run(scenario())
        assert sessions.checked == 1 and sessions.opened == 2 and sessions.open_now == 0
        assert not queue(config, spool.DEFERRED)

    def test_a_reload_closes_kept_sessions_instead_of_reusing_them(
            self, config: Config, runner: QueueRunner, sessions: FakeSessions,
            make_config: Callable[..., Config]) -> None:
        async def scenario() -> None:
            task = asyncio.create_task(runner.run_forever())
            enqueue(config, "a@example.net")
            runner.poke()
            await until(lambda: len(sessions.sent) == 1 and len(runner._idle) == 1)
            runner.reconfigure(make_config(relays=[{"host": "127.0.0.1", "port": 2525,
                                                    "tls": "none"}]))
            await until(lambda: sessions.open_now == 0, 1.0)  # closed now, not in 2 s
            enqueue(runner.config, "b@example.net")
            runner.poke()
            await until(lambda: len(sessions.sent) == 2)
            await until(lambda: sessions.open_now <= 1)
            runner.stop()
            await task

        asyncio.run(scenario())
        assert sessions.opened == 2 and sessions.checked == 0 and sessions.open_now == 0

    def test_kept_sessions_and_lanes_together_stay_within_max_sessions(
            self, config: Config, runner: QueueRunner, sessions: FakeSessions,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(lanes, "MAX_SESSIONS", 2)
        sessions.pause = 0.02

        async def scenario() -> None:
            task = asyncio.create_task(runner.run_forever())
            for n in range(12):  # site1: two lanes, both sessions kept afterwards
                enqueue(config, f"r{n}@example.net")
            runner.poke()
            await until(lambda: len(sessions.sent) == 12 and len(runner._idle) == 2)
            enqueue(config, "x@example.net", site=SITE2, sender="noreply@site2.test")
            runner.poke()  # site2's new session: one of site1's kept ones gives way
            await until(lambda: len(sessions.sent) == 13)
            runner.stop()
            await task

        asyncio.run(scenario())
        assert sessions.most_open == 2 and sessions.open_now == 0

    def test_run_once_alone_keeps_nothing(
            self, config: Config, runner: QueueRunner, sessions: FakeSessions) -> None:
        enqueue(config, "a@example.net")
        assert run(runner) == 1
        assert sessions.open_now == 0 and len(runner._idle) == 0


class TestSchedule:
    def test_a_deferred_message_is_not_read_again_before_its_time(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            clock: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
        queue_id = enqueue(config, "busy@example.net")
        assert run(runner) == 1
        reads: list[str] = []
        listed: list[str] = []
        for name in ("read_status", "read_envelope", "read_entry"):
            real = getattr(spool, name)

            def counting(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                reads.append(args[-1])
                return _real(*args, **kwargs)

            monkeypatch.setattr(spool, name, counting)
        real_ids = spool.queue_ids

        def listing(layout: Any, state: str) -> list[str]:
            listed.append(state)
            return real_ids(layout, state)

        monkeypatch.setattr(spool, "queue_ids", listing)
        for _ in range(5):  # idle runs before its time: no reads, no scan of deferred/
            clock[0] += 1
            assert run(runner) == 0
        assert reads == [] and spool.DEFERRED not in listed
        clock[0] = T0 + INITIAL + 1
        assert run(runner) == 1 and queue_id in reads and len(relay.rcpts) == 2

    def test_the_schedule_is_built_from_the_spool_at_start(
            self, config: Config, state: State, relay: RelayHandler,
            clock: list[float]) -> None:
        queue_id = enqueue(config, "busy@example.net")
        assert run(QueueRunner(config, state)) == 1
        restarted = QueueRunner(config, state)  # a new daemon: the schedule is read once
        assert run(restarted) == 0
        clock[0] = T0 + INITIAL + 1
        assert run(restarted) == 1 and queue(config, spool.DEFERRED) == [queue_id]
        assert len(relay.rcpts) == 2

    def test_a_delivered_message_writes_no_status(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            monkeypatch: pytest.MonkeyPatch) -> None:
        writes: list[str] = []
        monkeypatch.setattr(spool, "write_status", lambda layout, q, s: writes.append(q))
        enqueue(config, "a@example.net")
        assert run(runner) == 1 and len(relay.received) == 1
        assert writes == [] and empty(config)

    def test_a_long_queue_is_taken_in_chunks_and_a_flush_once(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(runner_module, "RUN_CHUNK", 3)
        for _ in range(7):
            enqueue(config, "busy@example.net")
        assert [run(runner) for _ in range(3)] == [3, 3, 1]
        assert runner.wake.is_set() is False and len(queue(config, spool.DEFERRED)) == 7
        # A flush takes every deferred message once, a chunk per run, and then stops.
        runner.poke(force=True)
        counts = []
        while runner.wake.is_set():
            counts.append(asyncio.run(runner.run_once()))
        assert counts == [3, 3, 1] and len(relay.rcpts) == 14

    def test_a_flush_is_read_step_by_step_while_the_sessions_deliver(
            self, config: Config, runner: QueueRunner, relay: RelayHandler,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(runner_module, "FLUSH_STEP", 2)
        for _ in range(7):
            queue_id = enqueue(config, "a@example.net")
            spool.move(config.layout, queue_id, spool.INCOMING, spool.DEFERRED)
            spool.write_status(config.layout, queue_id, spool.Status(next_attempt=T0 + 3600))
        events: list[str] = []
        read, removed = runner._envelope_of, spool.remove_delivered
        monkeypatch.setattr(runner, "_envelope_of",
                            lambda *a: (events.append("read"), read(*a))[1])
        monkeypatch.setattr(spool, "remove_delivered",
                            lambda *a: (events.append("sent"), removed(*a))[1])
        assert run(runner, force=True) == 7  # one run, one session for all of them
        assert len(relay.received) == 7 and empty(config) and not runner.wake.is_set()
        last_read = len(events) - 1 - events[::-1].index("read")
        assert events.index("sent") < last_read  # the first went before the last was read

    def test_a_status_that_cannot_be_read_moves_the_message_to_corrupt(
            self, config: Config, runner: QueueRunner, relay: RelayHandler) -> None:
        odd = enqueue(config, "a@example.net")
        os.mkdir(spool.status_path(config.layout, odd))  # unreadable as a file
        good = enqueue(config, "b@example.net")
        assert run(runner) == 2
        assert queue(config, spool.CORRUPT) == [odd] and good not in queue(config, spool.INCOMING)
        assert [t.rcpt_tos for t in relay.received] == [["b@example.net"]]


class TestAnswerBook:
    """The relay's answers reach the outbreak rules in groups, each lane after its own."""

    def test_answers_handed_in_during_a_write_form_the_next_group(self) -> None:
        groups: list[list[Any]] = []
        written: set[int] = set()
        first_started = threading.Event()

        def write(group: list[Any]) -> None:
            groups.append(group)
            if len(groups) == 1:
                first_started.set()
                time.sleep(0.3)  # a slow transaction: the others hand in meanwhile
            written.update(uid for _site, uid, _kind, _ts in group)

        book = AnswerBook(write)
        seen_on_return: dict[int, bool] = {}

        async def hand_in(uid: int) -> None:
            await book.record([(None, uid, "relay_ok", 0.0)])  # type: ignore[list-item]
            seen_on_return[uid] = uid in written

        async def lanes() -> None:
            first = asyncio.create_task(hand_in(0))
            assert await asyncio.to_thread(first_started.wait, 5)
            await asyncio.wait_for(asyncio.gather(first, *(hand_in(u) for u in range(1, 6))), 5)

        asyncio.run(lanes())
        assert len(groups) == 2 and [a[1] for a in groups[0]] == [0]
        assert sorted(a[1] for a in groups[1]) == [1, 2, 3, 4, 5]
        assert seen_on_return == dict.fromkeys(range(6), True)
        assert book.groups == 2

    def test_a_failed_write_releases_the_waiters(self, caplog: pytest.LogCaptureFixture
                                                 ) -> None:
        def write(group: list[Any]) -> None:
            raise RuntimeError("boom")

        book = AnswerBook(write)
        answers: list[Any] = [(None, 1, "relay_ok", 0.0)]

        async def lanes() -> None:
            await asyncio.wait_for(book.record(answers), 5)
            await asyncio.wait_for(book.record(answers), 5)

        with caplog.at_level(logging.ERROR):
            asyncio.run(lanes())  # each one returns, none waits forever
        assert caplog.text.count("relay answers not written") == 2


def test_one_sites_rule_trouble_does_not_skip_anothers(
        config: Config, runner: QueueRunner, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    site1, site2 = config.site_named(SITE), config.site_named(SITE2)
    assert site1 is not None and site2 is not None
    checked: list[str] = []

    def rule(state: State, site: Any, now: float) -> None:
        checked.append(site.name)
        if site.name == SITE:
            raise RuntimeError("boom")  # e.g. the site left the configuration meanwhile

    monkeypatch.setattr(runner_module.outbreak, "after_relay_results", rule)
    with caplog.at_level(logging.ERROR):
        runner._feed_outbreak_rules([(site1, UID, "relay_5xx", T0), (site2, UID, "relay_ok", T0)])
    assert checked == [SITE, SITE2]
    assert "not checked site=site1.test" in caplog.text
