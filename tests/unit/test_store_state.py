"""store.state: events and windows, suspensions, overrides, scripts, submission ids."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from sendmail_shim.store import state as state_mod
from sendmail_shim.store.state import (
    ACCEPTED,
    MINUTE_SPAN,
    REFUSED_QUOTA,
    RELAY_OK,
    RETENTION,
    SUBMISSION_RETENTION,
    State,
    buckets,
)
from sendmail_shim.wire import paths

from .conftest import SITE1, SITE2

NOW = 1_800_000_000.0


class TestOpen:
    def test_directory_is_private_and_database_survives_reopen(self, tmp_path: Path) -> None:
        layout = paths.SpoolLayout(str(tmp_path / "spool"))
        os.makedirs(layout.root)
        first = State(layout)
        assert stat.S_IMODE(os.stat(state_mod.state_dir(layout)).st_mode) & 0o077 == 0
        first.record(SITE1, 1000, ACCEPTED, 2, ts=NOW)
        first.suspend(SITE2, "by hand", "operator")
        first.set_override(SITE1, "per_hour", 9)
        first.close()
        again = State(layout, create=False)
        try:
            assert again.count(ACCEPTED, 60, NOW, site=SITE1) == (1, 2)
            assert again.suspension(SITE2) is not None
            assert again.overrides(SITE1) == {"per_hour": 9}
        finally:
            again.close()

    def test_create_false_does_not_make_a_database(self, tmp_path: Path) -> None:
        layout = paths.SpoolLayout(str(tmp_path))
        os.makedirs(state_mod.state_dir(layout))
        with pytest.raises(FileNotFoundError):
            State(layout, create=False)
        assert os.listdir(state_mod.state_dir(layout)) == []

    def test_wal_mode(self, state: State, spool_layout: paths.SpoolLayout) -> None:
        path = os.path.join(state_mod.state_dir(spool_layout), "state.sqlite")
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()

    def test_closed_state_refuses_work(self, spool_layout: paths.SpoolLayout) -> None:
        opened = State(spool_layout)
        opened.close()
        with pytest.raises(sqlite3.ProgrammingError):
            opened.count(ACCEPTED, 60, NOW, site=SITE1)


HOUR, DAY = 3600, 86400


class TestCounters:
    def test_counts_per_site_and_per_uid_in_the_window(self, state: State) -> None:
        state.record(SITE1, 1000, ACCEPTED, 3, ts=NOW - 10)
        state.record(SITE1, 1001, ACCEPTED, 1, ts=NOW - 20)
        state.record(SITE2, 1000, ACCEPTED, 5, ts=NOW - 30)
        state.record(SITE1, 1000, ACCEPTED, 7, ts=NOW - 4000)  # outside the hour
        state.record(SITE1, 1000, REFUSED_QUOTA, 1, ts=NOW - 5)  # another kind
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE1) == (2, 4)
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE2) == (1, 5)
        assert state.count(ACCEPTED, HOUR, NOW, uid=1000) == (2, 8)
        assert state.count(ACCEPTED, DAY, NOW, site=SITE1) == (3, 11)
        assert state.count(REFUSED_QUOTA, HOUR, NOW, site=SITE1) == (1, 1)
        assert state.count(REFUSED_QUOTA, HOUR, NOW, uid=1000) == (0, 0)  # uids: accepted only
        assert state.count(ACCEPTED, HOUR, NOW, site="nobody.test") == (0, 0)

    def test_an_event_is_one_statement_an_accepted_message_three(self, state: State) -> None:
        seen: list[str] = []
        state._db.set_trace_callback(seen.append)
        state.record(SITE1, 1000, RELAY_OK, ts=NOW)
        assert len(seen) == 1
        state.record(SITE1, 1000, ACCEPTED, script="/x.php", ts=NOW)
        state._db.set_trace_callback(None)
        assert len(seen) == 4

    @pytest.mark.parametrize("window, res, span", [
        (60, 60, 1), (90, 60, 2), (600, 60, 10), (HOUR, 60, 60), (MINUTE_SPAN, 60, 120),
        (MINUTE_SPAN + 1, HOUR, 3), (DAY, HOUR, 24), (30 * DAY, HOUR, 48)])
    def test_a_window_is_the_current_bucket_and_the_previous_ones(
            self, window: float, res: int, span: int) -> None:
        now = NOW + 1234.5
        assert buckets(window, now) == (res, int(now // res) - span + 1)

    def test_window_edges_are_bucket_edges(self, state: State) -> None:
        oldest = (NOW // 60 - 59) * 60  # the first second of the hour window's oldest minute
        state.record(SITE1, 1000, ACCEPTED, ts=oldest)
        state.record(SITE1, 1000, ACCEPTED, ts=oldest - 0.5)
        assert state.count(ACCEPTED, HOUR, NOW + 59.9, site=SITE1) == (1, 1)
        assert state.count(ACCEPTED, HOUR, NOW + 60, site=SITE1) == (0, 0)
        assert state.count(ACCEPTED, HOUR + 60, NOW, site=SITE1) == (2, 2)

    def test_forget_takes_back_one_reservation(self, state: State) -> None:
        keep = state.record(SITE1, 1000, ACCEPTED, script="/a.php", ts=NOW)
        drop = state.record(SITE1, 1000, ACCEPTED, 4, script="/b.php", ts=NOW)
        state.forget(drop)
        assert state.count(ACCEPTED, 60, NOW, site=SITE1) == (1, 1)
        assert state.count(ACCEPTED, DAY, NOW, uid=1000) == (1, 1)
        assert state.top(HOUR, NOW, by_script=True) == [(SITE1, "/a.php", 1, 1)]
        state.forget(keep)
        assert state.top(HOUR, NOW) == []

    def test_prune_keeps_the_retention_of_each_kind_of_row(self, state: State) -> None:
        state.record(SITE1, 1000, ACCEPTED, ts=NOW - RETENTION - 2 * HOUR)
        state.record(SITE1, 1000, ACCEPTED, ts=NOW - RETENTION + 2 * HOUR)
        state.record(SITE1, 1000, ACCEPTED, ts=NOW - 30)
        state.record_domains(SITE1, ["old.test"], NOW - HOUR - 60)
        state.record_domains(SITE1, ["new.test"], NOW - 30)
        state.claim_submission(1000, "old", "0123456789ABCDEF", NOW - SUBMISSION_RETENTION - 1)
        state.claim_submission(1000, "new", "0123456789ABCDE0", NOW - RETENTION - 1)
        state.prune(now=NOW)
        assert state.count(ACCEPTED, RETENTION, NOW, site=SITE1) == (2, 2)
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE1) == (1, 1)
        assert rows(state, "site_counts WHERE res = 60") == 1  # older minutes are gone
        assert rows(state, "domains") == 1
        assert state.submission(1000, "old") is None
        assert state.submission(1000, "new") == ("0123456789ABCDE0", False)

    def test_every_thousandth_record_prunes(self, state: State) -> None:
        for _ in range(999):
            state.record(SITE1, 1000, ACCEPTED, ts=1.0)  # long expired
        assert rows(state, "site_counts") == 2
        state.record(SITE1, 1000, ACCEPTED)  # the 1000th: now
        assert rows(state, "site_counts") == 2  # the expired minute and hour are gone
        assert state.count(ACCEPTED, RETENTION, NOW * 2, site=SITE1) == (0, 0)

    def test_distinct_domains_and_scripts(self, state: State) -> None:
        state.record_domains(SITE1, ["a.test", "b.test"], NOW - 5)
        state.record_domains(SITE1, ["a.test", "c.test"], NOW - 5)
        state.record_domains(SITE1, ["old.test"], NOW - 7200)
        state.record_domains(SITE2, ["z.test"], NOW - 5)
        assert state.distinct_domains(SITE1, NOW, cap=100) == 3
        assert state.distinct_domains(SITE1, NOW, cap=2) == 2
        assert state.distinct_domains(SITE2, NOW, cap=100) == 1
        for _ in range(3):
            state.record(SITE1, 1000, ACCEPTED, script="/x/spam.php", ts=NOW - 5)
        state.record(SITE1, 1000, ACCEPTED, script="/x/form.php", ts=NOW - 5)
        state.record(SITE2, 1001, ACCEPTED, script="/x/spam.php", ts=NOW - 5)
        state.record(SITE1, 1000, RELAY_OK, script="/x/spam.php", ts=NOW - 5)  # not a message
        assert state.count_script(SITE1, "/x/spam.php", NOW - 60, NOW) == 3
        assert state.count_script(SITE1, "/x/spam.php", NOW, NOW) == 0
        assert state.count_script(SITE1, "/x/spam.php", NOW - 3 * HOUR, NOW) == 3  # hours

    def test_top_is_busiest_first(self, state: State) -> None:
        for site, script, times, n in ((SITE1, "/a.php", 2, 1), (SITE2, "/b.php", 4, 2),
                                       (SITE1, None, 1, 4)):
            for _ in range(times):
                state.record(site, 1000, ACCEPTED, n, script=script, ts=NOW - 5)
        state.record(SITE1, 1000, ACCEPTED, ts=NOW - 7200)
        assert state.top(HOUR, NOW) == [(SITE2, "", 4, 8), (SITE1, "", 3, 6)]
        assert state.top(HOUR, NOW, by_script=True) == [
            (SITE2, "/b.php", 4, 8), (SITE1, "/a.php", 2, 2), (SITE1, "", 1, 4)]
        assert state.top(DAY, NOW) == [(SITE1, "", 4, 7), (SITE2, "", 4, 8)]  # ties: by name

    def test_reset_usage_touches_only_that_site(self, state: State) -> None:
        state.record(SITE1, 1000, ACCEPTED, ts=NOW)
        state.record(SITE1, 1000, REFUSED_QUOTA, ts=NOW)
        state.record(SITE2, 1000, ACCEPTED, ts=NOW)
        state.record_domains(SITE1, ["a.test"], NOW)
        assert state.reset_usage(SITE1) == 2
        assert state.count(ACCEPTED, DAY, NOW, site=SITE1) == (0, 0)
        assert state.count(ACCEPTED, DAY, NOW, site=SITE2) == (1, 1)
        assert state.count(ACCEPTED, DAY, NOW, uid=1000) == (1, 1)  # its share of the uid too
        assert state.distinct_domains(SITE1, NOW, cap=10) == 0


def rows(state: State, where: str) -> int:
    return int(state._db.execute(f"SELECT COUNT(*) FROM {where}").fetchone()[0])  # noqa: S608


class TestBoundedWork:
    """The SQL work of one submission does not grow with the events in the window."""

    def statements(self, state: State, site: str, now: float) -> list[str]:
        seen: list[str] = []
        state._db.set_trace_callback(seen.append)
        try:
            with state.transaction():
                state.count(ACCEPTED, HOUR, now, site=site)
                state.count(ACCEPTED, DAY, now, uid=1000)
                state.record(site, 1000, ACCEPTED, 2, script="/x.php", ts=now)
            state.record_domains(site, ["a.test", "b.test"], now)
            state.distinct_domains(site, now, cap=201)
            state.count_script(site, "/x.php", now - 600, now)
            state.count(REFUSED_QUOTA, 600, now, site=site)
        finally:
            state._db.set_trace_callback(None)
        return seen

    def test_same_statements_with_10_and_10000_prior_events(self, state: State) -> None:
        for name, prior in ((SITE1, 10), (SITE2, 10_000)):
            with state.transaction():
                for i in range(prior):
                    ts = NOW - 3000 + 3000 * i / prior
                    state.record(name, 1000, ACCEPTED, 1, script="/x.php", ts=ts)
                    state.record_domains(name, [f"d{i % 50}.test"], ts)
        light = self.statements(state, SITE1, NOW)
        heavy = self.statements(state, SITE2, NOW)
        assert len(light) == len(heavy) <= 12
        # and each reads bounded rows: at most 60 minute and 24 hour buckets per count
        assert rows(state, f"site_counts WHERE site = '{SITE2}'") <= 2 * (3000 // 60 + 2)

    def test_a_full_window_costs_what_an_empty_one_does(self, state: State) -> None:
        """Wall-clock, generous: 10,000 events in the window, a check stays O(1)."""
        import time

        def per_check(site: str) -> float:
            start = time.perf_counter()
            for _ in range(200):
                state.count(ACCEPTED, HOUR, NOW, site=site)
                state.count(ACCEPTED, DAY, NOW, site=site)
            return time.perf_counter() - start

        with state.transaction():
            for i in range(10_000):
                state.record(SITE2, 1000, ACCEPTED, ts=NOW - 3000 + 0.3 * i)
        state.record(SITE1, 1000, ACCEPTED, ts=NOW)
        assert per_check(SITE2) < 5 * per_check(SITE1) + 0.05


class TestMigration:
    def test_events_of_the_previous_version_are_folded_once(self, tmp_path: Path) -> None:
        layout = paths.SpoolLayout(str(tmp_path / "spool"))
        os.makedirs(state_mod.state_dir(layout))
        path = os.path.join(state_mod.state_dir(layout), "state.sqlite")
        now = __import__("time").time()
        with sqlite3.connect(path) as db:
            db.executescript("""
                CREATE TABLE events (ts REAL NOT NULL, site TEXT NOT NULL, uid INTEGER NOT NULL,
                    kind TEXT NOT NULL, script TEXT, n INTEGER NOT NULL DEFAULT 1, detail TEXT);
                CREATE TABLE suspensions (site TEXT PRIMARY KEY, since REAL NOT NULL,
                    reason TEXT NOT NULL, actor TEXT NOT NULL);""")
            db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", [
                (now - 30, SITE1, 1000, "accepted", "/a.php", 2, None),
                (now - 30, SITE1, 1000, "accepted", None, 1, None),
                (now - 5 * 3600, SITE1, 1000, "accepted", "/a.php", 1, None),
                (now - 3 * 86400, SITE1, 1000, "accepted", "/a.php", 1, None),  # expired
                (now - 30, SITE1, 1000, "refused_quota", None, 1, None),
                (now - 30, SITE1, 1000, "rcpt_domain", None, 1, "a.test"),
                (now - 20, SITE1, 1000, "rcpt_domain", None, 1, "b.test"),
                (now - 2 * 3600, SITE1, 1000, "rcpt_domain", None, 1, "old.test"),
                (now - 30, SITE2, 1001, "relay_5xx", None, 1, None)])
            db.execute("INSERT INTO suspensions VALUES (?, ?, 'by hand', 'operator')",
                       (SITE2, now - 60))
        db.close()
        for _ in range(2):  # the second open finds nothing left to fold
            state = State(layout)
            try:
                assert state.count(ACCEPTED, HOUR, now, site=SITE1) == (2, 3)
                assert state.count(ACCEPTED, DAY, now, uid=1000) == (3, 4)
                assert state.count(REFUSED_QUOTA, 600, now, site=SITE1) == (1, 1)
                assert state.count("relay_5xx", HOUR, now, site=SITE2) == (1, 1)
                assert state.distinct_domains(SITE1, now, cap=10) == 2
                assert state.top(DAY, now, by_script=True) == [
                    (SITE1, "/a.php", 2, 3), (SITE1, "", 1, 1)]
                assert state.suspension(SITE2) is not None
                assert rows(state, "sqlite_master WHERE name = 'events'") == 0
            finally:
                state.close()


class TestTransaction:
    def test_an_exception_rolls_the_records_back(self, state: State) -> None:
        with pytest.raises(RuntimeError), state.transaction():
            state.record(SITE1, 1000, ACCEPTED, ts=NOW)
            state.claim_submission(1000, "s1", "0123456789ABCDEF", NOW)
            state.suspend(SITE2, "in the rolled-back transaction", "test")
            state.set_override(SITE1, "per_hour", 3)
            raise RuntimeError("boom")
        assert state.count(ACCEPTED, DAY, NOW, site=SITE1) == (0, 0)
        assert state.submission(1000, "s1") is None
        assert state.suspension(SITE2) is None and state.overrides(SITE1) == {}
        with state.transaction():  # and the next one works
            state.record(SITE1, 1000, ACCEPTED, ts=NOW)
            state.suspend(SITE2, "committed", "test")
            assert state.suspension(SITE2) is None  # not before the commit
        assert state.count(ACCEPTED, DAY, NOW, site=SITE1) == (1, 1)
        assert state.suspension(SITE2) is not None

    def test_check_and_reserve_is_atomic_across_threads(self, state: State) -> None:
        limit, threads, tries = 10, 8, 6
        granted: list[int] = []

        def worker(uid: int) -> None:
            for _ in range(tries):
                with state.transaction():
                    if state.count(ACCEPTED, HOUR, NOW, site=SITE1)[0] < limit:
                        state.record(SITE1, uid, ACCEPTED, ts=NOW)
                        granted.append(uid)

        pool = [threading.Thread(target=worker, args=(1000 + i,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=30)
        assert len(granted) == limit
        assert state.count(ACCEPTED, HOUR, NOW, site=SITE1) == (limit, limit)


class TestScripts:
    def test_first_seen_is_recorded_once(self, state: State) -> None:
        assert state.script_first_seen(SITE1, "/x.php", NOW) == NOW
        assert state.script_first_seen(SITE1, "/x.php", NOW + 500) == NOW
        assert state.script_first_seen(SITE2, "/x.php", NOW + 500) == NOW + 500


class TestSuspensions:
    def test_suspend_resume_round_trip(self, state: State) -> None:
        assert state.suspension(SITE1) is None
        assert state.suspend(SITE1, "rule quota_refusals", "outbreak rule") is True
        assert state.suspend(SITE1, "by hand", "operator") is False  # the first reason stays
        since, reason, actor = state.suspension(SITE1) or (0.0, "", "")
        assert (reason, actor) == ("rule quota_refusals", "outbreak rule") and since > 0
        assert state.suspension(SITE2) is None
        assert state.resume(SITE1) is True
        assert state.resume(SITE1) is False
        assert state.suspension(SITE1) is None

    def test_suspension_is_read_without_sql_and_survives_reopen(
            self, state: State, spool_layout: paths.SpoolLayout) -> None:
        state.suspend(SITE1, "rule new_script", "outbreak rule")
        seen: list[str] = []
        state._db.set_trace_callback(seen.append)
        assert state.suspension(SITE1) is not None and state.suspension(SITE2) is None
        assert state.overrides(SITE1) == {}
        state._db.set_trace_callback(None)
        assert seen == []
        again = State(spool_layout)
        try:
            assert again.suspension(SITE1) == state.suspension(SITE1)
        finally:
            again.close()


class TestOverrides:
    def test_set_replace_unlimited_and_clear(self, state: State) -> None:
        assert state.overrides(SITE1) == {}
        state.set_override(SITE1, "per_hour", 5)
        state.set_override(SITE1, "per_hour", 7)
        state.set_override(SITE1, "per_day", None)
        state.set_override(SITE2, "per_hour", 0)
        assert state.overrides(SITE1) == {"per_hour": 7, "per_day": None}
        state.clear_overrides(SITE1)
        assert state.overrides(SITE1) == {}
        assert state.overrides(SITE2) == {"per_hour": 0}


class TestSubmissions:
    QID = "0123456789ABCDEF"

    def test_claim_commit(self, state: State) -> None:
        assert state.submission(1000, "abc") is None
        state.claim_submission(1000, "abc", self.QID, NOW)
        assert state.submission(1000, "abc") == (self.QID, False)
        assert state.in_flight(1000, "abc")
        assert state.unresolved_submissions() == []  # in flight: not unresolved
        state.end_submission(1000, "abc", committed=True)
        assert state.submission(1000, "abc") == (self.QID, True)
        assert not state.in_flight(1000, "abc")
        assert state.unresolved_submissions() == []

    def test_failed_commit_deletes_the_row(self, state: State) -> None:
        state.claim_submission(1000, "abc", self.QID, NOW)
        state.end_submission(1000, "abc", committed=False)
        assert state.submission(1000, "abc") is None and not state.in_flight(1000, "abc")

    def test_failed_end_never_deletes_a_committed_row(self, state: State) -> None:
        state.claim_submission(1000, "abc", self.QID, NOW)
        state.end_submission(1000, "abc", committed=True)
        state.end_submission(1000, "abc", committed=False)
        assert state.submission(1000, "abc") == (self.QID, True)

    def test_ids_are_per_uid(self, state: State) -> None:
        state.claim_submission(1000, "same", self.QID, NOW)
        state.end_submission(1000, "same", committed=True)
        assert state.submission(1001, "same") is None
        assert not state.in_flight(1001, "same")

    def test_unresolved_are_claims_of_a_dead_writer(self, state: State) -> None:
        state.claim_submission(1000, "dead", self.QID, NOW)
        state.claim_submission(1001, "live", "0123456789ABCDE0", NOW)
        state.drop_in_flight(1000, "dead")  # as after a crash: the row, no writer
        assert state.unresolved_submissions() == [(1000, "dead", self.QID)]

    def test_a_reopened_state_has_nothing_in_flight(self, spool_layout: paths.SpoolLayout,
                                                    state: State) -> None:
        state.claim_submission(1000, "abc", self.QID, NOW)
        again = State(spool_layout)
        try:
            assert again.unresolved_submissions() == [(1000, "abc", self.QID)]
        finally:
            again.close()
