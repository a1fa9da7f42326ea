"""Unit tests of daemon/pickup.py: the drop area's identity rule, quarantine, retries, fairness.

No root, no subprocess: the spool lives in tmp_path and every drop file belongs to
the user running the tests; the maildrop directory's group is that user's group
(the files created in it get it too, as the setgid directory gives them the
daemon's group in production).  The intake is the real one (accept_submission with
conftest's configuration, where site1.test is the current uid) unless a test replaces it to
provoke a failure.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sendmail_shim.config import Config
from sendmail_shim.daemon import dropspace, pickup
from sendmail_shim.intake.accept import accept_submission
from sendmail_shim.policy.identity import Caller
from sendmail_shim.store import outcome, spool
from sendmail_shim.store.state import State
from sendmail_shim.wire import protocol
from sendmail_shim.wire.paths import SpoolLayout

UID, GID = os.getuid(), os.getgid()
LIMIT = 4096  # message_size_limit: small, so an oversize file stays cheap


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    """conftest's configuration (site1.test is this uid) with a small size limit."""
    return make_config(message_size_limit=LIMIT)


@pytest.fixture(autouse=True)
def drop_group(spool_layout: SpoolLayout) -> None:
    assert os.stat(spool_layout.maildrop).st_gid == GID


def request(rcpt: str = "someone@example.net", subid: str | None = None,
            body: bytes = b"Subject: drop\n\nbody\n") -> bytes:
    fields = [("mode", "submit"), ("rcpt", rcpt)]
    if subid is not None:
        fields.append(("subid", subid))
    return protocol.encode_request(fields, body)


def drop(config: Config, name: str, data: bytes | None = None, mode: int = 0o640) -> str:
    """A drop file as the front end leaves it (0640 after fchmod, one link)."""
    path = os.path.join(config.layout.maildrop, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, mode)
        os.write(fd, request() if data is None else data)
    finally:
        os.close(fd)
    return path


def queued(config: Config, state_name: str = spool.INCOMING) -> list[str]:
    return spool.queue_ids(config.layout, state_name)


def corrupt(config: Config) -> list[str]:
    return sorted(os.listdir(config.layout.state_dir(spool.CORRUPT)))


def maildrop(config: Config) -> list[str]:
    return sorted(os.listdir(config.layout.maildrop))


class TestIdentityRule:
    @staticmethod
    def st(mode: int = stat.S_IFREG | 0o640, nlink: int = 1, gid: int = 120) -> os.stat_result:
        # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime)
        return os.stat_result((mode, 1, 1, nlink, 1000, gid, 10, 0, 0, 0))

    def test_only_a_plain_0640_file_of_the_drop_group_with_one_link_proves(self) -> None:
        assert pickup.unproven(self.st(), 120) is None
        assert "nlink=2" in (pickup.unproven(self.st(nlink=2), 120) or "")
        assert "group 1000" in (pickup.unproven(self.st(gid=1000), 120) or "")
        for mode in (0o644, 0o660, 0o600, 0o2640, 0o4640, 0o1640):
            assert "mode" in (pickup.unproven(self.st(mode=stat.S_IFREG | mode), 120) or "")

    @pytest.mark.parametrize(("kind", "word"), [
        (stat.S_IFDIR, "a directory"), (stat.S_IFLNK, "a symlink"), (stat.S_IFIFO, "a FIFO"),
        (stat.S_IFSOCK, "a socket"), (stat.S_IFCHR, "a character device"),
        (stat.S_IFBLK, "a block device")])
    def test_other_kinds_are_named(self, kind: int, word: str) -> None:
        assert pickup.unproven(self.st(mode=kind | 0o640), 120) == f"not a regular file but {word}"


class TestIngest:
    def test_a_good_file_is_queued_as_its_owner_and_removed(
            self, config: Config, state: State) -> None:
        drop(config, "m.1.aa")
        assert pickup.scan(config, state) == 1
        assert maildrop(config) == [] and corrupt(config) == []
        [queue_id] = queued(config)
        env, message = spool.read_entry(config.layout, spool.INCOMING, queue_id)
        assert (env.uid, env.site, env.origin) == (UID, "site1.test", "maildrop")
        assert env.recipients == ["someone@example.net"] and b"body" in message

    def test_ingest_file_takes_one_file(self, config: Config, state: State) -> None:
        drop(config, "m.1.aa")
        assert pickup.ingest_file(config, state, "m.1.aa") is True
        assert pickup.ingest_file(config, state, "m.1.aa") is True  # gone meanwhile: fine
        assert len(queued(config)) == 1

    def test_a_final_refusal_removes_the_file(
            self, make_config: Callable[..., Config], state: State,
            caplog: pytest.LogCaptureFixture) -> None:
        config = make_config(sites={"site1.test": {"uids": [UID + 1]}})  # no site: 550
        drop(config, "m.1.aa")
        with caplog.at_level(logging.WARNING, "sendmail_shim.daemon.pickup"):
            assert pickup.scan(config, state) == 1
        assert maildrop(config) == [] and queued(config) == [] and corrupt(config) == []
        assert f"dropped drop_file=m.1.aa uid={UID}" in caplog.text

    def test_only_m_files_are_ingested(self, config: Config, state: State) -> None:
        drop(config, "t.1.aa")  # still being written
        drop(config, "x.other")  # a name no front end writes: removed (dropspace)
        assert pickup.scan(config, state) == 0
        assert maildrop(config) == ["t.1.aa"] and queued(config) == []

    def test_stale_tmp_files_go_fresh_ones_stay(self, config: Config, state: State) -> None:
        old = drop(config, "t.old")
        drop(config, "t.new")
        past = os.stat(old).st_mtime - pickup.STALE_TMP - 60
        os.utime(old, (past, past))
        pickup.scan(config, state)
        assert maildrop(config) == ["t.new"]


HOSTILE = {  # name: (content and mode, or None for a special entry; the logged reason)
    "m.symlink": (None, "not a regular file but a symlink"),
    "m.fifo": (None, "not a regular file but a FIFO"),
    "m.0644": ((request(), 0o644), "mode 0644 is not 0640"),
    "m.garbage": ((b"GET / HTTP/1.0\r\n\r\n", 0o640), "bad request: does not start"),
    "m.truncated": ((request()[:-4], 0o640), "truncated or oversized"),
    "m.badsize": ((b"SMSHIM1\nmode submit\nsize abc\n\nx\nEND\n", 0o640), "bad size"),
    "m.huge": ((b"SMSHIM1\n" + b"x" * (protocol.MAX_HEADER_BYTES + LIMIT + 1000), 0o640),
               f"larger than message_size_limit ({LIMIT})"),
}
NOTHING_TO_KEEP = ("m.symlink", "m.fifo")  # removed; a copy of their bytes would mean nothing


class TestHostileEntries:
    def scan_bounded(self, config: Config, state: State, scanner: pickup.Pickup | None = None
                     ) -> int:
        """One scan in a thread: a FIFO that blocked it would fail the test, not hang it."""
        result: list[int] = []
        worker = threading.Thread(
            target=lambda: result.append((scanner or pickup.Pickup()).scan(config, state)))
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "the scan blocked"
        return result[0]

    @pytest.mark.parametrize("name", sorted(HOSTILE))
    def test_each_goes_to_corrupt_with_its_reason(
            self, config: Config, state: State, caplog: pytest.LogCaptureFixture,
            tmp_path: Path, name: str) -> None:
        path = os.path.join(config.layout.maildrop, name)
        target = tmp_path / "elsewhere"
        target.write_bytes(request())
        content, reason = HOSTILE[name]
        if content is not None:
            drop(config, name, *content)
        elif name == "m.symlink":
            os.symlink(target, path)
        else:
            os.mkfifo(path, 0o640)
        drop(config, "m.zz.good")
        with caplog.at_level(logging.ERROR, "sendmail_shim.daemon.pickup"):
            assert self.scan_bounded(config, state) == 2
        assert corrupt(config) == ([] if name in NOTHING_TO_KEEP else [f"drop.{name}"])
        assert maildrop(config) == [] and len(queued(config)) == 1  # the good one went on
        for kept in corrupt(config):  # the head only, and the daemon's own file
            st = os.stat(os.path.join(config.layout.state_dir("corrupt"), kept))
            assert st.st_size <= dropspace.CORRUPT_KEEP and st.st_mode & 0o777 == 0o600
        assert f"corrupt drop_file={name} uid={UID}" in caplog.text and reason in caplog.text
        assert target.read_bytes() == request()  # a symlink's target is never touched

    def test_a_hard_link_has_two_links_and_both_names_are_refused(
            self, config: Config, state: State, tmp_path: Path) -> None:
        path = drop(config, "m.lent")
        os.link(path, tmp_path / "other-name")
        assert self.scan_bounded(config, state) == 1
        assert corrupt(config) == ["drop.m.lent"] and queued(config) == []
        assert (tmp_path / "other-name").read_bytes() == request()

    @pytest.mark.skipif(os.geteuid() != 0, reason="chgrp to a foreign group needs root")
    def test_a_file_of_another_group_is_refused(self, config: Config, state: State) -> None:
        path = drop(config, "m.foreign")
        os.chown(path, UID, GID + 4242)
        assert self.scan_bounded(config, state) == 1
        assert corrupt(config) == ["drop.m.foreign"] and queued(config) == []

    def test_directories_are_never_moved_to_corrupt(
            self, config: Config, state: State, caplog: pytest.LogCaptureFixture) -> None:
        empty = os.path.join(config.layout.maildrop, "m.empty")
        full = os.path.join(config.layout.maildrop, "m.full")
        os.mkdir(empty)
        os.mkdir(full)
        Path(full, "inside").write_bytes(b"x")
        drop(config, "m.zz.good")
        scanner = pickup.Pickup()
        with caplog.at_level(logging.ERROR, "sendmail_shim.daemon.pickup"):
            self.scan_bounded(config, state, scanner)
            self.scan_bounded(config, state, scanner)
        assert corrupt(config) == [] and maildrop(config) == ["m.full"]
        assert len(queued(config)) == 1
        assert "removed the empty directory" in caplog.text
        assert caplog.text.count("corrupt drop_file=m.full") == 1  # logged once, then skipped
        assert "remove " + full + " by hand" in caplog.text

    def test_a_name_taken_in_corrupt_gets_a_suffix(self, config: Config, state: State) -> None:
        Path(config.layout.state_dir(spool.CORRUPT), "drop.m.bad").write_bytes(b"earlier")
        drop(config, "m.bad", b"garbage")
        pickup.scan(config, state)
        names = corrupt(config)
        assert len(names) == 2 and "drop.m.bad" in names
        assert Path(config.layout.state_dir(spool.CORRUPT), "drop.m.bad").read_bytes() == \
            b"earlier"

    def test_no_descriptor_leaks(self, config: Config, state: State) -> None:
        for n in range(3):
            drop(config, f"m.bad{n}", b"garbage")
            drop(config, f"m.good{n}")
        os.mkfifo(os.path.join(config.layout.maildrop, "m.fifo"))
        before = len(os.listdir("/proc/self/fd"))
        pickup.scan(config, state)
        assert len(os.listdir("/proc/self/fd")) == before


class TestTransientTrouble:
    def test_an_intake_error_keeps_the_file_up_to_max_failures(
            self, config: Config, state: State, monkeypatch: pytest.MonkeyPatch,
            caplog: pytest.LogCaptureFixture) -> None:
        def broken(*args: Any, **kwargs: Any) -> outcome.Verdict:
            raise RuntimeError("intake is broken")

        monkeypatch.setattr(pickup, "accept_submission", broken)
        drop(config, "m.1.aa")
        scanner = pickup.Pickup()
        with caplog.at_level(logging.WARNING, "sendmail_shim.daemon.pickup"):
            for n in range(1, pickup.MAX_FAILURES):
                assert scanner.scan(config, state) == 0
                assert maildrop(config) == ["m.1.aa"], f"set aside after {n} failures"
            assert scanner.scan(config, state) == 1
        assert maildrop(config) == [] and corrupt(config) == ["drop.m.1.aa"]
        assert f"failures={pickup.MAX_FAILURES - 1}" in caplog.text
        assert f"({pickup.MAX_FAILURES} times)" in caplog.text

    def test_success_after_failures_ingests_and_forgets_the_count(
            self, config: Config, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[str] = []

        def flaky(*args: Any, **kwargs: Any) -> outcome.Verdict:
            calls.append("x")
            if len(calls) < pickup.MAX_FAILURES:
                raise OSError(errno.EIO, "I/O error")
            return accept_submission(*args, **kwargs)

        monkeypatch.setattr(pickup, "accept_submission", flaky)
        drop(config, "m.1.aa")
        scanner = pickup.Pickup()
        for _ in range(pickup.MAX_FAILURES):
            scanner.scan(config, state)
        assert maildrop(config) == [] and corrupt(config) == [] and len(queued(config)) == 1

    def test_a_transient_open_error_is_retried_another_is_final(
            self, config: Config, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open = os.open
        failing = {"m.emfile": errno.EMFILE, "m.eacces": errno.EACCES}

        def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            code = failing.get(os.path.basename(str(path)))
            if code is not None and flags == pickup.OPEN_FLAGS:
                raise OSError(code, os.strerror(code))
            return real_open(path, flags, *args, **kwargs)

        drop(config, "m.emfile")
        drop(config, "m.eacces")
        monkeypatch.setattr(os, "open", fake_open)
        scanner = pickup.Pickup()
        scanner.scan(config, state)
        # One the daemon may not read is removed, nothing of it kept (dropspace.set_aside).
        assert maildrop(config) == ["m.emfile"] and corrupt(config) == []
        del failing["m.emfile"]  # descriptors are back
        scanner.scan(config, state)
        monkeypatch.undo()
        assert maildrop(config) == [] and len(queued(config)) == 1

    def test_a_temporary_refusal_keeps_the_file_without_counting(
            self, config: Config, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
        # Each scan tries a temporarily refused file twice (the second try after the
        # parallel ones are done, for twins with one subid): two answers per scan.
        answers = [outcome.tempfail("spool full")] * (2 * (pickup.MAX_FAILURES + 1))

        def full(*args: Any, **kwargs: Any) -> outcome.Verdict:
            return answers.pop() if answers else accept_submission(*args, **kwargs)

        monkeypatch.setattr(pickup, "accept_submission", full)
        drop(config, "m.1.aa")
        scanner = pickup.Pickup()
        for _ in range(pickup.MAX_FAILURES + 1):
            assert scanner.scan(config, state) == 0
        assert maildrop(config) == ["m.1.aa"] and corrupt(config) == []
        assert scanner.scan(config, state) == 1
        assert len(queued(config)) == 1

    def test_files_waiting_for_the_quota_stay_within_the_share(
            self, config: Config, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
        over = outcome.Verdict(452, "4.7.1", 77, "site site1.test is over its quota")
        monkeypatch.setattr(pickup, "accept_submission", lambda *_a, **_k: over)
        part = dropspace.share(config) * 2 // 5  # two fit in the share, three do not
        for name in ("m.1", "m.2", "m.3"):
            drop(config, name, request(body=b"Subject: q\n\n" + b"x" * part))
        scanner = pickup.Pickup()
        for _ in range(3):  # every scan tries each twice: a file is counted once
            scanner.scan(config, state)
            assert len(maildrop(config)) == 2
        [notice] = queued(config)  # the third was bounced, with the reason
        _envelope, data = spool.read_entry(config.layout, spool.INCOMING, notice)
        assert b"over its quota" in data and b"share of the drop area" in data

    def test_an_owner_over_its_quota_costs_one_intake_per_scan(
            self, config: Config, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
        """Issue 21, second fresh attack: 6,000 drop files of a site over its quota were
        each ingested again at every scan (a CPU core, 20 MB of log in 30 s)."""
        over = outcome.Verdict(452, "4.7.1", 77, "site site1.test is over its quota")
        calls: list[int] = []
        monkeypatch.setattr(pickup, "accept_submission",
                            lambda *_a, **_k: calls.append(1) or over)
        monkeypatch.setattr(pickup, "PARALLEL", 1)  # the first answer comes before the rest
        for n in range(200):
            drop(config, f"m.{n:04d}")
        scanner = pickup.Pickup()
        for _ in range(3):
            calls.clear()
            assert scanner.scan(config, state) == 0
            assert len(calls) == 1, len(calls)  # the first file; the rest only counted
            assert len(maildrop(config)) == 200

    def test_a_file_written_during_a_long_scan_waits_one_pass(
            self, config: Config, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
        """Issue 21, second fresh attack: a site's drop file written while another site's
        6,000 were taken waited 13 s, for the whole scan."""
        owners: dict[str, int] = {}
        monkeypatch.setattr(pickup, "_owner",
                            lambda path: owners.get(os.path.basename(path), 1001))
        taken: list[str] = []
        real = pickup.Pickup._safely

        def safely(self: pickup.Pickup, config: Config, state: State, name: str,
                   drop_gid: int, now: float) -> tuple[str, str]:
            taken.append(name)
            if len(taken) == 2:  # another site writes its file while the flood is taken
                drop(config, "m.zzzz-late")
                owners["m.zzzz-late"] = 1002
            return real(self, config, state, name, drop_gid, now)

        monkeypatch.setattr(pickup.Pickup, "_safely", safely)
        monkeypatch.setattr(pickup, "PARALLEL", 1)
        for n in range(4 * pickup.PASS_PER_OWNER):
            drop(config, f"m.{n:04d}")
        monkeypatch.setattr(pickup, "accept_submission", lambda *_a, **_k: outcome.accepted("Ok"))
        pickup.Pickup().scan(config, state)
        assert taken.index("m.zzzz-late") <= pickup.PASS_PER_OWNER + 1, taken
        assert maildrop(config) == []

    def test_a_stopping_scan_takes_nothing_more(self, config: Config, state: State) -> None:
        drop(config, "m.1.aa")
        stop = threading.Event()
        stop.set()
        assert pickup.Pickup(stop).scan(config, state) == 0
        assert maildrop(config) == ["m.1.aa"]

    def test_an_intake_error_while_stopping_keeps_the_file_uncounted(
            self, config: Config, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
        stop = threading.Event()

        def interrupted(*args: Any, **kwargs: Any) -> outcome.Verdict:
            stop.set()
            raise RuntimeError("state closed")

        monkeypatch.setattr(pickup, "accept_submission", interrupted)
        drop(config, "m.1.aa")
        scanner = pickup.Pickup(stop)
        for _ in range(pickup.MAX_FAILURES + 1):
            stop.clear()
            scanner.scan(config, state)
        assert maildrop(config) == ["m.1.aa"] and corrupt(config) == []


class TestFairness:
    def test_owners_are_taken_in_turn(self, config: Config,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
        names = [f"m.{n:04d}" for n in range(30)] + ["m.zzzz", "m.zzzz2", "t.0000", "x.9"]
        for name in names:
            drop(config, name)
        owners = {"m.zzzz": 1002, "m.zzzz2": 1002}
        monkeypatch.setattr(pickup, "_owner",
                            lambda path: owners.get(os.path.basename(path), 1001))
        listed = os.listdir(config.layout.maildrop)
        order = [name for name, _uid in pickup._fair_order(config.layout.maildrop, listed)]
        assert order[:4] == ["m.0000", "m.zzzz", "m.0001", "m.zzzz2"]
        assert "x.9" not in order and len(order) == 33
        one_pass = pickup._fair_order(config.layout.maildrop, listed, per_owner=3)
        assert [name for name, _uid in one_pass] == ["m.0000", "m.zzzz", "m.0001", "m.zzzz2",
                                                     "m.0002"]
        assert dict(one_pass)["m.zzzz"] == 1002

    def test_a_flood_does_not_stop_the_scan_from_reaching_everyone(
            self, config: Config, state: State) -> None:
        for n in range(20):
            drop(config, f"m.{n:04d}", b"garbage")
        drop(config, "m.zzzz")
        assert pickup.scan(config, state) == 21
        assert len(queued(config)) == 1 and len(corrupt(config)) == 20


class TestSubmissionIds:
    SUBID = "0123456789abcdef0123456789abcdef"

    def test_the_same_submission_twice_is_queued_once(
            self, config: Config, state: State, caplog: pytest.LogCaptureFixture) -> None:
        drop(config, "m.1.aa", request(subid=self.SUBID))
        drop(config, "m.1.bb", request(subid=self.SUBID))
        with caplog.at_level(logging.INFO):
            assert pickup.scan(config, state) == 2
        assert maildrop(config) == [] and len(queued(config)) == 1
        assert f"duplicate queue_id={queued(config)[0]}" in caplog.text

    def test_a_drop_file_of_a_submission_the_socket_took_is_not_queued_again(
            self, config: Config, state: State) -> None:
        fields, message = protocol.decode_request(request(subid=self.SUBID))
        verdict = accept_submission(config, state, fields, message, Caller(UID, GID, 1234))
        assert verdict.accepted
        drop(config, "m.1.aa", request(subid=self.SUBID))
        pickup.scan(config, state)
        assert maildrop(config) == [] and len(queued(config)) == 1

    def test_another_uid_with_the_same_subid_is_queued(
            self, config: Config, state: State) -> None:
        # The same id from another uid is another submission (ids are per uid).
        state.claim_submission(UID + 1, self.SUBID, spool.new_queue_id(), 0.0)
        state.end_submission(UID + 1, self.SUBID, committed=True)
        drop(config, "m.1.aa", request(subid=self.SUBID))
        pickup.scan(config, state)
        assert len(queued(config)) == 1


class TestParallelScan:
    @pytest.fixture
    def config(self, make_config: Callable[..., Config]) -> Config:
        """site1.test without its small quota: a backlog larger than the pool."""
        return make_config(sites={"site1.test": {"quota": {"per_hour": 1000, "per_day": 1000,
                                                           "recipients_per_hour": 1000}}})

    def test_a_backlog_larger_than_the_pool_is_ingested_in_one_scan(
            self, config: Config, state: State) -> None:
        for n in range(3 * pickup.PARALLEL + 1):
            drop(config, f"m.{n:03d}.aa", request(body=f"Subject: {n}\n\nbody\n".encode()))
        assert pickup.scan(config, state) == 3 * pickup.PARALLEL + 1
        assert maildrop(config) == [] and len(queued(config)) == 3 * pickup.PARALLEL + 1

    def test_files_start_in_the_fair_order(self, config: Config, state: State,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        started: list[str] = []
        real = pickup.Pickup._ingest

        def ingest(self: pickup.Pickup, config: Config, state: State, name: str,
                   drop_gid: int) -> str:
            started.append(name)
            return real(self, config, state, name, drop_gid)

        monkeypatch.setattr(pickup.Pickup, "_ingest", ingest)
        names = [f"m.{n:03d}.aa" for n in range(2 * pickup.PARALLEL)]
        for name in names:
            drop(config, name)
        pickup.scan(config, state)
        assert started == names  # one owner here: its oldest first, in order


class TestSpaceGuard:
    """dropspace: no site keeps more than its share of the spool's disk in maildrop/."""

    def test_unfinished_files_past_the_share_go_newest_first(self, config: Config) -> None:
        share = dropspace.share(config)
        names = ["t.1", "t.2", "t.3"]
        for n, name in enumerate(names):
            drop(config, name, b"x" * (share // 2))
            os.utime(os.path.join(config.layout.maildrop, name), (1e9 + n, 1e9 + n))
        drop(config, "zz.park")
        freed = dropspace.sweep(config, now=1e9 + 10)
        assert maildrop(config) == ["t.1", "t.2"]  # within the share: the two oldest
        assert freed >= share // 2

    def test_refused_files_in_corrupt_are_capped(self, config: Config, state: State,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(dropspace, "CORRUPT_FILES", 3)
        for n in range(5):
            drop(config, f"m.bad{n}", b"garbage" * 100_000)
        pickup.scan(config, state)
        assert len(corrupt(config)) == 3 and maildrop(config) == []

    def test_a_full_disk_is_relieved_and_the_submission_taken(
            self, config: Config, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
        drop(config, "zz.park")
        answers = [outcome.tempfail("disk full", dropspace.FULL),
                   outcome.accepted("Ok: queued as X")]
        monkeypatch.setattr(dropspace, "accept_submission", lambda *_a, **_k: answers.pop(0))
        verdict = dropspace.accept_relieved(config, state, [], b"", Caller(UID, GID, 1))
        assert verdict.accepted and maildrop(config) == []


class TestNotices:
    """A refused drop file is bounced to its sender (daemon/dropnotice.py)."""

    @pytest.mark.parametrize(("sender", "notified"), [
        ("writer@site1.test", "writer@site1.test"),
        ("writer@mail.site1.test", "writer@mail.site1.test"),
        ("victim@elsewhere.example", "noreply@site1.test"),  # never backscatter outside
        ("a..b@site1.test", "noreply@site1.test"),  # refused by the grammar
    ])
    def test_the_notice_goes_to_the_sender_within_the_site(
            self, config: Config, state: State, sender: str, notified: str) -> None:
        fields = [("mode", "submit"), ("sender", sender), ("rcpt", 'a"b"@example.net')]
        drop(config, "m.1.aa", protocol.encode_request(fields, b"Subject: s\n\nbody\n"))
        assert pickup.scan(config, state) == 1
        [notice] = queued(config)
        envelope, data = spool.read_entry(config.layout, spool.INCOMING, notice)
        assert envelope.sender == "" and envelope.recipients == [notified]
        assert b"Status: 5.1.3" in data and b" address: address <" in data
        assert maildrop(config) == []
