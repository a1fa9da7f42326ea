"""delivery.scan: spamc's output, the decision, hold/defer/deliver, the spam_score rule.

No spamc runs here (the unit layer starts no process): :meth:`Scanner.scan`
is replaced by a stand-in that returns a score or raises ScanError.  The real
spamd is in tests/test_scan.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any

import pytest

from sendmail_shim.config import ADMIN_SITE, Config, ConfigError
from sendmail_shim.daemon import events, listing
from sendmail_shim.delivery import scan
from sendmail_shim.delivery.scan import Scanner
from sendmail_shim.policy import content, outbreak
from sendmail_shim.policy.content import ScanError, parse_spamc
from sendmail_shim.policy.sanctions import release_messages
from sendmail_shim.store import spool
from sendmail_shim.store.state import State
from sendmail_shim.wire import paths

from .conftest import MESSAGE, MY_UID, SITE1, SITE2, SPARE_UID, MakeConfig, QueueMessage

SCAN = {"enabled": True, "max_score": 5}
NOW = 1_800_000_000.0


class TestParseSpamc:
    @pytest.mark.parametrize(("rc", "out", "score"), [
        (0, b"3.3/5.0\n", 3.3), (1, b"1003.3/5.0\n", 1003.3), (0, b"-1.9/5.0\n", -1.9),
        (0, b"0.0/5.0\n", 0.0), (0, b"7/10", 7.0)])
    def test_scores(self, rc: int, out: bytes, score: float) -> None:
        assert parse_spamc(rc, out) == score

    @pytest.mark.parametrize(("rc", "out", "why"), [
        (69, b"0/0\n", "exited 69 (unavailable)"),  # spamd not listening, with -x
        (75, b"", "exited 75 (temporary failure)"),
        (-9, b"", "exited -9 (signal)"),
        (0, b"0/0\n", "fallback"),  # spamc's safe fallback must never pass as a score of 0
        (0, b"", "not score/threshold"),
        (0, b"3.3/5.0\nX-Spam: yes\n", "not score/threshold"),
        (1, b"spam\n", "not score/threshold")])
    def test_failures_are_errors_never_a_score(self, rc: int, out: bytes, why: str) -> None:
        with pytest.raises(ScanError, match=why.replace("(", r"\(").replace(")", r"\)")):
            parse_spamc(rc, out)


class TestConfig:
    def test_off_by_default(self, config: Config) -> None:
        assert config.scan.enabled is False
        assert config.scan.on_failure == "defer" and config.scan.max_score == 5.0

    def test_command(self, make_config: MakeConfig) -> None:
        config = make_config(scan={"enabled": True, "port": 7830, "timeout": "10s",
                                   "max_size": 1000})
        assert content.command(config) == ["/usr/bin/spamc", "-d", "127.0.0.1", "-p", "7830",
                                        "-c", "-x", "-t", "10", "-s", "1000"]
        config = make_config(scan={"socket": "/run/spamd.sock"})
        assert content.command(config)[1:3] == ["-U", "/run/spamd.sock"]

    @pytest.mark.parametrize("bad", [{"on_failure": "drop"}, {"socket": "relative"},
                                     {"max_score": "high"}, {"port": 0}])
    def test_bad_values_are_refused(self, make_config: MakeConfig, bad: dict[str, Any]) -> None:
        with pytest.raises(ConfigError, match="scan"):
            make_config(scan=bad)

    def test_decide(self, make_config: MakeConfig) -> None:
        config = make_config(scan=SCAN)
        assert content.decide(config, 5.0) == "deliver"  # at the maximum: still delivered
        assert content.decide(config, 5.1) == "hold"
        assert content.decide(config, -3) == "deliver"


class FakeScanner(Scanner):
    """Scores from a list (a ScanError item fails that scan); counts the scans."""

    def __init__(self, config: Config, state: State, results: list[float | ScanError]) -> None:
        super().__init__(config, state)
        self.results = results
        self.calls = 0
        self.seen: list[bytes] = []

    async def scan(self, message: bytes) -> float:
        self.calls += 1
        self.seen.append(message)
        result = self.results.pop(0)
        if isinstance(result, ScanError):
            raise result
        return result


def check(scanner: Scanner, config: Config, queue_id: str,
          state: str = spool.INCOMING) -> tuple[scan.Verdict, spool.Status]:
    env, message = spool.read_entry(config.layout, state, queue_id)
    status = spool.read_status(config.layout, queue_id)
    site = config.site_named(env.site)
    assert site is not None
    verdict = asyncio.run(scanner.check(site, state, queue_id, env, message, status))
    return verdict, status


def notices(layout: paths.SpoolLayout) -> list[bytes]:
    found = []
    for queue_id in spool.queue_ids(layout, spool.INCOMING):
        env, message = spool.read_entry(layout, spool.INCOMING, queue_id)
        if env.site == ADMIN_SITE:
            found.append(message)
    return found


class TestCheck:
    @pytest.fixture
    def config(self, make_config: MakeConfig) -> Config:
        return make_config(scan=SCAN)

    def test_low_score_goes_on_with_the_score_in_the_status(
            self, config: Config, state: State, queue_message: QueueMessage,
            caplog: pytest.LogCaptureFixture) -> None:
        env = queue_message()
        caplog.set_level(logging.INFO)
        verdict, status = check(FakeScanner(config, state, [1.5]), config, env.queue_id)
        assert verdict == scan.DELIVER
        assert (status.score, status.scanned) == (1.5, spool.SCANNED_OK)
        assert spool.queue_ids(config.layout, spool.INCOMING) == [env.queue_id]
        line = next(r for r in caplog.records if r.getMessage().startswith("scanned "))
        event = events.event_of(line)
        assert event.name == "scanned"
        assert event.fields == {"queue_id": env.queue_id, "site": SITE1, "score": "1.5",
                                "max_score": "5", "action": "deliver"}

    def test_high_score_is_held_with_its_reason_and_the_operator_told_once(
            self, config: Config, state: State, queue_message: QueueMessage) -> None:
        first, second = queue_message(), queue_message(state=spool.DEFERRED)
        scanner = FakeScanner(config, state, [1003.3, 9.0])
        assert check(scanner, config, first.queue_id)[0] == scan.HELD
        assert check(scanner, config, second.queue_id, spool.DEFERRED)[0] == scan.HELD
        layout = config.layout
        assert spool.queue_ids(layout, spool.HOLD) == [first.queue_id, second.queue_id]
        status = spool.read_status(layout, first.queue_id)  # durable: read back from disk
        assert status.score == 1003.3 and status.scanned == spool.SCANNED_OK
        assert "content score 1003.3 is above scan.max_score 5" in status.last_error
        (notice,) = notices(layout)  # the second hold within notify_every: logged only
        assert f"message {first.queue_id} held (spam score 1003.3)".encode() in notice
        assert f"queue release {first.queue_id}".encode() in notice
        assert SITE1.encode() in notice

    def test_a_failing_state_database_never_lets_a_held_message_go(
            self, config: Config, state: State, queue_message: QueueMessage,
            monkeypatch: pytest.MonkeyPatch) -> None:
        env = queue_message()

        def full(*args: Any, **kwargs: Any) -> Any:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(state, "record", full)
        monkeypatch.setattr(state, "count", full)
        verdict, _ = check(FakeScanner(config, state, [30.0]), config, env.queue_id)
        assert verdict == scan.HELD
        assert spool.queue_ids(config.layout, spool.HOLD) == [env.queue_id]

    def test_released_message_is_not_scanned_again(
            self, config: Config, state: State, queue_message: QueueMessage) -> None:
        env = queue_message()
        scanner = FakeScanner(config, state, [50.0])
        check(scanner, config, env.queue_id)
        assert release_messages(config, [env.queue_id], None, "test") == 1
        verdict, status = check(scanner, config, env.queue_id)
        assert verdict == scan.DELIVER and scanner.calls == 1 and status.score == 50.0

    def test_scanner_down_defers_and_is_logged_once_per_outage(
            self, config: Config, state: State, queue_message: QueueMessage,
            caplog: pytest.LogCaptureFixture) -> None:
        envs = [queue_message() for _ in range(3)]
        down = ScanError("spamc exited 69 (unavailable)")
        scanner = FakeScanner(config, state, [down, 2.0])
        caplog.set_level(logging.INFO)
        for env in envs[:2]:
            verdict, status = check(scanner, config, env.queue_id)
            assert not verdict.deliver and verdict.trouble is not None
            assert "content scanner unavailable" in verdict.trouble.describe()
            assert status.scanned is None  # scanned again at the next attempt
        assert scanner.calls == 1  # the second failed at once: no probe due yet
        scanner._next_probe.clear()  # the probe interval has passed
        assert check(scanner, config, envs[2].queue_id)[0] == scan.DELIVER
        names = [events.event_of(r).name for r in caplog.records]
        assert names.count("scan_unavailable") == 1 and names.count("scan_available") == 1

    def test_one_sites_failed_scan_does_not_fail_another_sites_mail(
            self, config: Config, state: State, queue_message: QueueMessage) -> None:
        """A site whose messages make spamc time out (content that keeps spamd's network
        tests waiting) must not put every site's mail into the outage: deferred, or
        with on_failure deliver sent unscored."""
        hostile, other = queue_message(), queue_message(site=SITE2, uid=SPARE_UID)
        slow = ScanError("spamc took longer than 30s")
        scanner = FakeScanner(config, state, [slow, 1.0])
        assert not check(scanner, config, hostile.queue_id)[0].deliver
        verdict, status = check(scanner, config, other.queue_id)
        assert verdict == scan.DELIVER and status.score == 1.0 and scanner.calls == 2
        assert scanner.down_since is None  # spamd answered: no outage

    def test_scanner_down_with_deliver_goes_on_unscored(
            self, make_config: MakeConfig, state: State, queue_message: QueueMessage) -> None:
        config = make_config(scan={**SCAN, "on_failure": "deliver", "unscored_pool": "grey"},
                             pools=[{"name": "grey"}])
        env = queue_message()
        verdict, status = check(FakeScanner(config, state, [ScanError("x")]), config,
                                env.queue_id)
        assert verdict == scan.DELIVER
        assert (status.score, status.scanned) == (None, spool.SCANNED_UNAVAILABLE)
        assert listing.score_text(status) == "unscored: scanner unavailable"

    def test_bounces_are_not_scanned_large_messages_on_their_first_part(
            self, make_config: MakeConfig, state: State, queue_message: QueueMessage) -> None:
        """Issue 21: a message padded past scan.max_size used to go out unscored."""
        config = make_config(scan={**SCAN, "max_size": len(MESSAGE) + 3})
        scanner = FakeScanner(config, state, [1000.0])
        bounce = queue_message(origin="bounce")
        assert check(scanner, config, bounce.queue_id)[0] == scan.DELIVER
        assert scanner.calls == 0
        big = queue_message(MESSAGE + b"padding\n" * 10)
        verdict, status = check(scanner, config, big.queue_id)
        assert verdict == scan.HELD and status.scanned == spool.SCANNED_PARTIAL
        assert status.score == 1000.0 and scanner.seen[0].endswith(b"body\n")
        assert len(scanner.seen[0]) <= len(MESSAGE) + 3  # cut at the last line end

    @pytest.mark.parametrize(("message", "size", "part"), [
        (b"a\nbb\n", 5, b"a\nbb\n"), (b"a\nbb\nc\n", 5, b"a\nbb\n"),
        (b"a\nbbbbbb\n", 5, b"a\n"), (b"aaaaaaa\n", 5, b"aaaaa")])
    def test_the_scanned_part(self, message: bytes, size: int, part: bytes) -> None:
        assert content.scanned_part(message, size) == part

    def test_spam_score_rule_suspends_the_site(
            self, make_config: MakeConfig, state: State, queue_message: QueueMessage) -> None:
        config = make_config(scan=SCAN, sites={SITE1: {"outbreak": {
            "spam_score": {"mean": 4, "min_messages": 3, "window": "1h"}}}})
        envs = [queue_message() for _ in range(4)]
        scanner = FakeScanner(config, state, [1000.0, 1.0, 1.0, 0.5])
        for env in envs[:3]:
            check(scanner, config, env.queue_id)
        # (20 + 1 + 1) / 3 = 7.3 >= 4 after the third: suspended, the fourth held with it
        suspension = state.suspension(SITE1)
        assert suspension is not None and "rule spam_score" in suspension[1]
        assert envs[3].queue_id in spool.queue_ids(config.layout, spool.HOLD)


class TestSpamScoreRule:
    @pytest.fixture
    def config(self, make_config: MakeConfig) -> Config:
        rule = {"spam_score": {"mean": 5, "min_messages": 4, "window": "10m"}}
        return make_config(sites={SITE1: {"outbreak": rule}, SITE2: {"outbreak": rule}})

    def record(self, state: State, site: str, score: float, ts: float = NOW - 5) -> None:
        state.record(site, MY_UID, outbreak.SCANNED, n=outbreak.score_weight(score), ts=ts)

    def test_mean_over_the_window_once_enough_messages(self, config: Config,
                                                       state: State) -> None:
        site = config.sites[SITE1]
        for _ in range(3):
            self.record(state, SITE1, 8.0)
        assert outbreak.after_scan(state, site, NOW) is None  # 3 < min_messages
        self.record(state, SITE1, 0.0, ts=NOW - 700)  # outside the window
        assert outbreak.after_scan(state, site, NOW) is None
        self.record(state, SITE1, 0.5)
        assert outbreak.after_scan(state, site, NOW) == (
            "rule spam_score: mean content score 6.1 over 4 scanned messages within "
            "10 minutes (limit 5)")

    def test_scores_are_clipped_and_other_sites_do_not_count(self, config: Config,
                                                             state: State) -> None:
        assert outbreak.score_weight(1000.0) == 200 and outbreak.score_weight(-4.0) == 0
        for _ in range(10):
            self.record(state, SITE2, 1000.0)
        self.record(state, SITE1, 1000.0)  # counts as 20
        for _ in range(4):
            self.record(state, SITE1, 0.0)
        assert outbreak.after_scan(state, config.sites[SITE1], NOW) is None  # 20 / 5 = 4

    def test_off_without_mean(self, make_config: MakeConfig, state: State) -> None:
        config = make_config(outbreak={"spam_score": {"window": "5m"}})
        rules = config.sites[SITE2].outbreak
        assert rules is not None and rules.spam_score_mean is None
        for _ in range(20):
            self.record(state, SITE2, 1000.0)
        assert outbreak.after_scan(state, config.sites[SITE2], NOW) is None


def test_listing_shows_the_score(config: Config, queue_message: QueueMessage) -> None:
    env = queue_message()
    spool.write_status(config.layout, env.queue_id, spool.Status(score=3.25, scanned="ok"))
    text = "".join(listing.queue_text(spool.entries(config.layout)))
    assert "[score 3.2]" in text or "[score 3.3]" in text
    assert listing.score_text(spool.Status()) == ""


def test_status_with_a_bad_score_is_reset(config: Config, queue_message: QueueMessage) -> None:
    env = queue_message()
    with open(spool.status_path(config.layout, env.queue_id), "w") as fh:
        fh.write('{"score": "high", "scanned": "ok"}')
    status = spool.read_status(config.layout, env.queue_id)
    assert status.score is None and "damaged" in status.last_error


class TestBeforeAck:
    """scan.mode before_ack: intake scores the message and refuses above the maximum."""

    @pytest.fixture
    def config(self, make_config: MakeConfig) -> Config:
        return make_config(scan={**SCAN, "mode": "before_ack"})

    def test_only_in_before_ack_mode_and_for_a_waiting_caller(
            self, make_config: MakeConfig, config: Config,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(content, "scan_blocking", lambda config, message: 7.5)
        after = make_config(scan=SCAN)
        assert content.score_before_ack(after, SITE1, MESSAGE, "socket") == (None,
                                                                              "after_commit")
        assert content.score_before_ack(config, SITE1, MESSAGE, "maildrop")[0] is None
        assert content.score_before_ack(config, SITE1, MESSAGE, "socket") == (7.5, "")

    def test_a_failing_or_busy_scanner_leaves_it_to_the_runner(
            self, config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
        def down(config: Config, message: bytes) -> float:
            raise ScanError("spamc exited 69 (unavailable)")

        monkeypatch.setattr(content, "scan_blocking", down)
        assert content.score_before_ack(config, SITE1, MESSAGE, "socket") == (
            None, "spamc exited 69 (unavailable)")
        monkeypatch.setattr(content, "_sites", {SITE1})  # a scan of site1 runs already
        monkeypatch.setattr(content, "scan_blocking", lambda config, message: 1.0)
        assert content.score_before_ack(config, SITE1, MESSAGE, "socket") == (None, "busy")
        assert content.score_before_ack(config, SITE2, MESSAGE, "socket") == (1.0, "")

    def test_refused_above_the_maximum_scored_below(
            self, config: Config, state: State, spool_layout: paths.SpoolLayout,
            monkeypatch: pytest.MonkeyPatch) -> None:
        from sendmail_shim.intake.accept import accept_submission
        from sendmail_shim.policy.identity import Caller
        from sendmail_shim.wire import protocol

        fields = [(protocol.MODE, protocol.SUBMIT), (protocol.RCPT, "someone@example.net")]
        caller = Caller(uid=MY_UID, gid=0, pid=None)
        monkeypatch.setattr(content, "scan_blocking", lambda config, message: 1000.0)
        verdict = accept_submission(config, state, fields, MESSAGE, caller, "socket")
        assert (verdict.code, verdict.enhanced, verdict.status) == (550, "5.7.1", 77)
        assert "scored 1000.0 with SpamAssassin" in verdict.text
        assert not spool.queue_ids(spool_layout, spool.INCOMING)
        monkeypatch.setattr(content, "scan_blocking", lambda config, message: 0.5)
        verdict = accept_submission(config, state, fields, MESSAGE, caller, "socket")
        assert verdict.code == 250
        (queue_id,) = spool.queue_ids(spool_layout, spool.INCOMING)
        status = spool.read_status(spool_layout, queue_id)
        assert (status.score, status.scanned) == (0.5, spool.SCANNED_OK)
        # both count toward spam_score: 1000 as 20.0, 0.5 as 0.5 (in tenths)
        assert state.count(outbreak.SCANNED, 3600, time.time(), site=SITE1) == (2, 205)
