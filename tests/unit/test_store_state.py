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
    RCPT_DOMAIN,
    REFUSED_QUOTA,
    RETENTION,
    SUBMISSION_RETENTION,
    State,
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
            assert again.count(ACCEPTED, NOW - 1, site=SITE1) == (1, 2)
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
            opened.count(ACCEPTED, 0, site=SITE1)


class TestEvents:
    def test_counts_per_site_and_per_uid_in_the_window(self, state: State) -> None:
        state.record(SITE1, 1000, ACCEPTED, 3, ts=NOW - 10)
        state.record(SITE1, 1001, ACCEPTED, 1, ts=NOW - 20)
        state.record(SITE2, 1000, ACCEPTED, 5, ts=NOW - 30)
        state.record(SITE1, 1000, ACCEPTED, 7, ts=NOW - 4000)  # outside the hour
        state.record(SITE1, 1000, REFUSED_QUOTA, 1, ts=NOW - 5)  # another kind
        assert state.count(ACCEPTED, NOW - 3600, site=SITE1) == (2, 4)
        assert state.count(ACCEPTED, NOW - 3600, site=SITE2) == (1, 5)
        assert state.count(ACCEPTED, NOW - 3600, uid=1000) == (2, 8)
        assert state.count(ACCEPTED, NOW - 86400, site=SITE1) == (3, 11)
        assert state.count(REFUSED_QUOTA, NOW - 3600, site=SITE1) == (1, 1)
        assert state.count(ACCEPTED, NOW - 3600, site="nobody.test") == (0, 0)

    def test_window_start_is_exclusive(self, state: State) -> None:
        state.record(SITE1, 1000, ACCEPTED, ts=NOW - 3600)
        assert state.count(ACCEPTED, NOW - 3600, site=SITE1) == (0, 0)
        assert state.count(ACCEPTED, NOW - 3600.5, site=SITE1) == (1, 1)

    def test_forget_takes_back_one_reservation(self, state: State) -> None:
        keep = state.record(SITE1, 1000, ACCEPTED, ts=NOW)
        drop = state.record(SITE1, 1000, ACCEPTED, 4, ts=NOW)
        assert keep != drop
        state.forget(drop)
        assert state.count(ACCEPTED, NOW - 1, site=SITE1) == (1, 1)

    def test_prune_keeps_two_days_of_events_and_a_week_of_submissions(
            self, state: State) -> None:
        state.record(SITE1, 1000, ACCEPTED, ts=NOW - RETENTION - 1)
        state.record(SITE1, 1000, ACCEPTED, ts=NOW - RETENTION + 60)
        state.claim_submission(1000, "old", "0123456789ABCDEF", NOW - SUBMISSION_RETENTION - 1)
        state.claim_submission(1000, "new", "0123456789ABCDE0", NOW - RETENTION - 1)
        state.prune(now=NOW)
        assert state.count(ACCEPTED, 0, site=SITE1) == (1, 1)
        assert state.submission(1000, "old") is None
        assert state.submission(1000, "new") == ("0123456789ABCDE0", False)

    def test_every_thousandth_insert_prunes(self, state: State) -> None:
        for _ in range(999):
            state.record(SITE1, 1000, ACCEPTED, ts=1.0)  # long expired
        assert state.count(ACCEPTED, 0, site=SITE1)[0] == 999
        state.record(SITE1, 1000, ACCEPTED)  # the 1000th: now
        assert state.count(ACCEPTED, 0, site=SITE1)[0] == 1

    def test_distinct_details_and_scripts(self, state: State) -> None:
        for domain in ("a.test", "b.test", "a.test", "c.test"):
            state.record(SITE1, 1000, RCPT_DOMAIN, detail=domain, ts=NOW - 5)
        state.record(SITE1, 1000, RCPT_DOMAIN, detail="old.test", ts=NOW - 7200)
        state.record(SITE2, 1001, RCPT_DOMAIN, detail="z.test", ts=NOW - 5)
        assert state.distinct_details(SITE1, RCPT_DOMAIN, NOW - 3600) == 3
        assert state.distinct_details(SITE2, RCPT_DOMAIN, NOW - 3600) == 1
        for _ in range(3):
            state.record(SITE1, 1000, ACCEPTED, script="/x/spam.php", ts=NOW - 5)
        state.record(SITE1, 1000, ACCEPTED, script="/x/form.php", ts=NOW - 5)
        state.record(SITE2, 1001, ACCEPTED, script="/x/spam.php", ts=NOW - 5)
        assert state.count_script(SITE1, "/x/spam.php", NOW - 60) == 3
        assert state.count_script(SITE1, "/x/spam.php", NOW) == 0

    def test_top_is_busiest_first(self, state: State) -> None:
        for site, script, times, n in ((SITE1, "/a.php", 2, 1), (SITE2, "/b.php", 4, 2),
                                       (SITE1, None, 1, 4)):
            for _ in range(times):
                state.record(site, 1000, ACCEPTED, n, script=script, ts=NOW - 5)
        state.record(SITE1, 1000, ACCEPTED, ts=NOW - 7200)
        assert state.top(NOW - 3600) == [(SITE2, "", 4, 8), (SITE1, "", 3, 6)]
        assert state.top(NOW - 3600, by_script=True) == [
            (SITE2, "/b.php", 4, 8), (SITE1, "/a.php", 2, 2), (SITE1, "", 1, 4)]

    def test_reset_usage_touches_only_that_site(self, state: State) -> None:
        state.record(SITE1, 1000, ACCEPTED, ts=NOW)
        state.record(SITE1, 1000, REFUSED_QUOTA, ts=NOW)
        state.record(SITE2, 1001, ACCEPTED, ts=NOW)
        assert state.reset_usage(SITE1) == 2
        assert state.count(ACCEPTED, 0, site=SITE1) == (0, 0)
        assert state.count(ACCEPTED, 0, site=SITE2) == (1, 1)


class TestTransaction:
    def test_an_exception_rolls_the_records_back(self, state: State) -> None:
        with pytest.raises(RuntimeError), state.transaction():
            state.record(SITE1, 1000, ACCEPTED, ts=NOW)
            state.claim_submission(1000, "s1", "0123456789ABCDEF", NOW)
            raise RuntimeError("boom")
        assert state.count(ACCEPTED, 0, site=SITE1) == (0, 0)
        assert state.submission(1000, "s1") is None
        with state.transaction():  # and the next one works
            state.record(SITE1, 1000, ACCEPTED, ts=NOW)
        assert state.count(ACCEPTED, 0, site=SITE1) == (1, 1)

    def test_check_and_reserve_is_atomic_across_threads(self, state: State) -> None:
        limit, threads, tries = 10, 8, 6
        granted: list[int] = []

        def worker(uid: int) -> None:
            for _ in range(tries):
                with state.transaction():
                    if state.count(ACCEPTED, NOW - 3600, site=SITE1)[0] < limit:
                        state.record(SITE1, uid, ACCEPTED, ts=NOW)
                        granted.append(uid)

        pool = [threading.Thread(target=worker, args=(1000 + i,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=30)
        assert len(granted) == limit
        assert state.count(ACCEPTED, NOW - 3600, site=SITE1) == (limit, limit)


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
