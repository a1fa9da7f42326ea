"""store.spool: the commit protocol, queue ids, status files, moves and the tmp sweep."""

from __future__ import annotations

import json
import os
import random
import stat
import threading
import time
from pathlib import Path

import pytest

from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.wire import paths

from .conftest import MESSAGE, MakeEnvelope, QueueMessage


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def listing(layout: paths.SpoolLayout, state: str) -> list[str]:
    return sorted(os.listdir(layout.state_dir(state)))


class TestPrepare:
    @staticmethod
    def prepared(root: Path, umask: int) -> paths.SpoolLayout:
        layout = paths.SpoolLayout(str(root / "spool"))
        old = os.umask(umask)
        try:
            spool.prepare_spool(layout)
        finally:
            os.umask(old)
        return layout

    def test_modes_are_the_contract_whatever_the_umask(self, tmp_path: Path) -> None:
        layout = self.prepared(tmp_path, 0o077)
        assert mode(layout.public) == paths.MODE_PUBLIC_DIR
        assert mode(layout.maildrop) == paths.MODE_MAILDROP_DIR == 0o3733
        for directory in (layout.tmp, layout.status, *map(layout.state_dir, spool.STATES)):
            assert mode(directory) == paths.MODE_PRIVATE_DIR

    def test_root_mode_with_the_usual_umask(self, tmp_path: Path) -> None:
        assert mode(self.prepared(tmp_path, 0o022).root) == paths.MODE_SPOOL_ROOT

    def test_root_mode_whatever_the_umask(self, tmp_path: Path) -> None:
        assert mode(self.prepared(tmp_path, 0o077).root) == paths.MODE_SPOOL_ROOT

    def test_idempotent_and_repairs_modes(self, spool_layout: paths.SpoolLayout) -> None:
        os.chmod(spool_layout.maildrop, 0o777)
        os.chmod(spool_layout.state_dir(spool.HOLD), 0o755)
        spool.prepare_spool(spool_layout)
        assert mode(spool_layout.maildrop) == paths.MODE_MAILDROP_DIR
        assert mode(spool_layout.state_dir(spool.HOLD)) == paths.MODE_PRIVATE_DIR


class TestQueueIds:
    def test_new_ids_are_valid_and_sort_by_time(self, monkeypatch: pytest.MonkeyPatch) -> None:
        clock = iter([1_700_000_000.000, 1_700_000_000.001, 1_700_000_000.002, 1_700_000_999.0])
        monkeypatch.setattr(spool.time, "time", lambda: next(clock))
        ids = [spool.new_queue_id() for _ in range(4)]
        assert all(spool.QUEUE_ID.fullmatch(i) for i in ids)
        assert ids == sorted(ids) and len(set(ids)) == 4

    def test_ids_of_one_millisecond_differ(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(spool.time, "time", lambda: 1_700_000_000.0)
        ids = {spool.new_queue_id() for _ in range(200)}
        assert len(ids) > 190  # 20 random bits: a collision among 200 is very unlikely
        assert all(spool.check_queue_id(i) == i for i in ids)

    @pytest.mark.parametrize("bad", [
        "", "0123456789abcdef", "0123456789ABCDE", "0123456789ABCDEF0",
        "0123456789ABCDEF\n", "../../etc/passwd", "0123456789ABCDE/", " 0123456789ABCDE",
        "0123456789ABCDEG",
    ])
    def test_check_refuses_anything_but_16_upper_hex(self, bad: str) -> None:
        with pytest.raises(spool.QueueIdError, match="not a queue id"):
            spool.check_queue_id(bad)

    def test_queue_path_refuses_bad_ids_and_states(self, spool_layout: paths.SpoolLayout) -> None:
        with pytest.raises(spool.QueueIdError):
            spool.queue_path(spool_layout, spool.INCOMING, "../status/x")
        with pytest.raises(ValueError, match="unknown queue state"):
            spool.queue_path(spool_layout, "tmp", "0123456789ABCDEF")
        with pytest.raises(spool.QueueIdError):
            spool.status_path(spool_layout, "0123456789ABCDEF/../../x")


class TestCommit:
    def test_commit_writes_whole_file_into_incoming(
            self, spool_layout: paths.SpoolLayout, make_envelope: MakeEnvelope) -> None:
        envelope = make_envelope()
        spool.commit(spool_layout, envelope, MESSAGE)
        path = spool.queue_path(spool_layout, spool.INCOMING, envelope.queue_id)
        assert mode(path) == paths.MODE_QUEUE_FILE == 0o600
        assert os.listdir(spool_layout.tmp) == []
        with open(path, "rb") as fh:
            data = fh.read()
        magic, line, rest = data.split(b"\n", 2)
        assert magic + b"\n" == spool.QUEUE_MAGIC
        assert Envelope.from_json(line) == envelope and rest == MESSAGE
        assert spool.read_entry(spool_layout, spool.INCOMING, envelope.queue_id) == (
            envelope, MESSAGE)
        assert spool.read_envelope(spool_layout, spool.INCOMING, envelope.queue_id) == envelope
        assert spool.find_state(spool_layout, envelope.queue_id) == spool.INCOMING

    def test_round_trip_of_random_messages(
            self, spool_layout: paths.SpoolLayout, make_envelope: MakeEnvelope) -> None:
        rng = random.Random(11)
        for _ in range(20):
            message = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 3000)))
            envelope = make_envelope(message, sender=rng.choice(["", "a@b.test", "\udcff@x"]))
            spool.commit(spool_layout, envelope, message)
            assert spool.read_entry(spool_layout, spool.INCOMING, envelope.queue_id) == (
                envelope, message)

    def test_failed_write_leaves_nothing(
            self, spool_layout: paths.SpoolLayout, make_envelope: MakeEnvelope,
            monkeypatch: pytest.MonkeyPatch) -> None:
        def no_disk(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", no_disk)
        envelope = make_envelope()
        with pytest.raises(OSError, match="No space"):
            spool.commit(spool_layout, envelope, MESSAGE)
        monkeypatch.undo()
        assert os.listdir(spool_layout.tmp) == []
        assert listing(spool_layout, spool.INCOMING) == []
        assert spool.find_state(spool_layout, envelope.queue_id) is None

    def test_invalid_queue_id_writes_nothing(
            self, spool_layout: paths.SpoolLayout, make_envelope: MakeEnvelope) -> None:
        with pytest.raises(spool.QueueIdError):
            spool.commit(spool_layout, make_envelope(queue_id="../incoming/x"), MESSAGE)
        assert os.listdir(spool_layout.tmp) == []
        assert listing(spool_layout, spool.INCOMING) == []

    def test_planted_tmp_name_is_neither_reused_nor_followed(
            self, spool_layout: paths.SpoolLayout, make_envelope: MakeEnvelope,
            tmp_path: Path) -> None:
        envelope = make_envelope()
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        os.symlink(victim, os.path.join(spool_layout.tmp, envelope.queue_id))
        with pytest.raises(FileExistsError):
            spool.commit(spool_layout, envelope, MESSAGE)
        assert victim.read_bytes() == b"precious"
        assert listing(spool_layout, spool.INCOMING) == []

    def test_a_queue_file_that_is_a_symlink_is_not_read(
            self, spool_layout: paths.SpoolLayout, queue_message: QueueMessage,
            tmp_path: Path) -> None:
        envelope = queue_message()
        path = spool.queue_path(spool_layout, spool.INCOMING, envelope.queue_id)
        real = tmp_path / "real"
        os.rename(path, real)
        os.symlink(real, path)
        with pytest.raises(OSError):
            spool.read_entry(spool_layout, spool.INCOMING, envelope.queue_id)
        with pytest.raises(OSError):
            spool.read_envelope(spool_layout, spool.INCOMING, envelope.queue_id)


class TestDamagedFiles:
    QID = "0123456789ABCDEF"

    def plant(self, layout: paths.SpoolLayout, data: bytes) -> None:
        with open(spool.queue_path(layout, spool.DEFERRED, self.QID), "wb") as fh:
            fh.write(data)

    @pytest.mark.parametrize("data, why", [
        (b"", "not a queue file"),
        (b"SMSHIMQ0\n{}\nx", "not a queue file"),
        (b"SMSHIMQ1\n{\"queue_id\": 1", "no envelope line"),
        (b"SMSHIMQ1\nnot json\nbody", "Expecting value"),
        (b"SMSHIMQ1\n[1, 2]\nbody", "not a JSON object"),
        (b"SMSHIMQ1\n{\"queue_id\": \"0123456789ABCDEF\"}\nbody", "envelope fields"),
    ])
    def test_damage_is_a_value_error(self, spool_layout: paths.SpoolLayout, data: bytes,
                                     why: str) -> None:
        self.plant(spool_layout, data)
        with pytest.raises(ValueError, match=why):
            spool.read_entry(spool_layout, spool.DEFERRED, self.QID)

    def test_id_or_size_mismatch_is_a_value_error(
            self, spool_layout: paths.SpoolLayout, make_envelope: MakeEnvelope) -> None:
        for envelope in (make_envelope(queue_id="FEDCBA9876543210"),
                         make_envelope(size=len(MESSAGE) + 1)):
            self.plant(spool_layout, spool.QUEUE_MAGIC + envelope.to_json() + b"\n" + MESSAGE)
            with pytest.raises(ValueError, match="does not match"):
                spool.read_entry(spool_layout, spool.DEFERRED, self.QID)

    def test_truncated_message_is_a_value_error(
            self, spool_layout: paths.SpoolLayout, make_envelope: MakeEnvelope) -> None:
        envelope = make_envelope(queue_id=self.QID)
        self.plant(spool_layout, spool.QUEUE_MAGIC + envelope.to_json() + b"\n" + MESSAGE[:-3])
        with pytest.raises(ValueError, match="does not match"):
            spool.read_entry(spool_layout, spool.DEFERRED, self.QID)

    def test_entries_skip_damaged_files(
            self, spool_layout: paths.SpoolLayout, queue_message: QueueMessage) -> None:
        good = queue_message(state=spool.DEFERRED)
        self.plant(spool_layout, b"garbage")
        found = list(spool.entries(spool_layout))
        assert [(e.state, e.envelope.queue_id) for e in found] == [(spool.DEFERRED,
                                                                     good.queue_id)]


class TestStatus:
    def test_missing_status_is_fresh(self, spool_layout: paths.SpoolLayout) -> None:
        assert spool.read_status(spool_layout, "0123456789ABCDEF") == spool.Status()

    def test_round_trip_and_atomic_replace(self, spool_layout: paths.SpoolLayout) -> None:
        qid = "0123456789ABCDEF"
        status = spool.Status(attempts=3, next_attempt=1_700_000_300.5, last_error="451 later",
                              done=["a@x.test"], failed={"b@x.test": "550 no"},
                              delayed={"c@x.test": "451 busy"}, internal_failures=1)
        spool.write_status(spool_layout, qid, status)
        assert spool.read_status(spool_layout, qid) == status
        status.attempts = 4
        spool.write_status(spool_layout, qid, status)
        assert spool.read_status(spool_layout, qid).attempts == 4
        assert os.listdir(spool_layout.status) == [qid + ".json"]
        assert mode(spool.status_path(spool_layout, qid)) == paths.MODE_QUEUE_FILE

    @pytest.mark.parametrize("raw", [
        b"{not json", b"[]", b'{"attempts": "3"}', b'{"bogus": 1}', b'{"done": [1]}',
        b'{"failed": []}', b"\xff\xfe",
    ])
    def test_damaged_status_is_reset_not_fatal(self, spool_layout: paths.SpoolLayout,
                                              raw: bytes) -> None:
        qid = "0123456789ABCDEF"
        with open(spool.status_path(spool_layout, qid), "wb") as fh:
            fh.write(raw)
        status = spool.read_status(spool_layout, qid)
        assert status.attempts == 0 and status.done == []
        assert "damaged" in status.last_error

    def test_failed_status_write_keeps_the_old_one(
            self, spool_layout: paths.SpoolLayout, monkeypatch: pytest.MonkeyPatch) -> None:
        qid = "0123456789ABCDEF"
        spool.write_status(spool_layout, qid, spool.Status(attempts=1))

        def no_disk(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", no_disk)
        with pytest.raises(OSError):
            spool.write_status(spool_layout, qid, spool.Status(attempts=2))
        monkeypatch.undo()
        assert spool.read_status(spool_layout, qid).attempts == 1
        assert os.listdir(spool_layout.status) == [qid + ".json"]


class TestMoves:
    def test_move_through_every_state(self, spool_layout: paths.SpoolLayout,
                                      queue_message: QueueMessage) -> None:
        envelope = queue_message()
        qid = envelope.queue_id
        here = spool.INCOMING
        for there in (spool.DEFERRED, spool.HOLD, spool.INCOMING, spool.CORRUPT):
            spool.move(spool_layout, qid, here, there)
            assert spool.find_state(spool_layout, qid) == there
            assert spool.queue_ids(spool_layout, here) == []
            assert spool.read_entry(spool_layout, there, qid) == (envelope, MESSAGE)
            here = there

    def test_move_of_a_missing_message_fails_cleanly(
            self, spool_layout: paths.SpoolLayout) -> None:
        with pytest.raises(FileNotFoundError):
            spool.move(spool_layout, "0123456789ABCDEF", spool.INCOMING, spool.HOLD)
        with pytest.raises(spool.QueueIdError):
            spool.move(spool_layout, "../x", spool.INCOMING, spool.HOLD)

    def test_remove_forgets_file_and_status(self, spool_layout: paths.SpoolLayout,
                                            queue_message: QueueMessage) -> None:
        kept, gone, bare = queue_message(), queue_message(), queue_message()
        for envelope in (kept, gone):
            spool.write_status(spool_layout, envelope.queue_id, spool.Status(attempts=1))
        spool.remove(spool_layout, gone.queue_id, spool.INCOMING)
        spool.remove(spool_layout, bare.queue_id, spool.INCOMING)  # no status: fine
        assert spool.queue_ids(spool_layout, spool.INCOMING) == [kept.queue_id]
        assert os.listdir(spool_layout.status) == [kept.queue_id + ".json"]
        with pytest.raises(FileNotFoundError):
            spool.remove(spool_layout, gone.queue_id, spool.INCOMING)

    def test_queue_ids_sorted_and_strangers_ignored(
            self, spool_layout: paths.SpoolLayout, make_envelope: MakeEnvelope) -> None:
        rng = random.Random(5)
        envelopes = [make_envelope() for _ in range(6)]
        rng.shuffle(envelopes)
        for envelope in envelopes:
            spool.commit(spool_layout, envelope, MESSAGE)
        incoming = spool_layout.state_dir(spool.INCOMING)
        for stranger in ("README", "0123456789abcdef", "0123456789ABCDEF.tmp", ".hidden"):
            Path(incoming, stranger).write_text("x")
        assert spool.queue_ids(spool_layout, spool.INCOMING) == sorted(
            e.queue_id for e in envelopes)
        assert len(list(spool.entries(spool_layout, (spool.INCOMING,)))) == 6

    def test_queue_ids_of_a_missing_directory(self, tmp_path: Path) -> None:
        assert spool.queue_ids(paths.SpoolLayout(str(tmp_path / "none")), spool.HOLD) == []

    def test_entries_carry_state_and_status(
            self, spool_layout: paths.SpoolLayout, queue_message: QueueMessage) -> None:
        held = queue_message(state=spool.HOLD)
        spool.write_status(spool_layout, held.queue_id, spool.Status(attempts=2))
        (entry,) = spool.entries(spool_layout)
        assert entry.state == spool.HOLD and entry.envelope == held
        assert entry.status.attempts == 2

    def test_entries_read_a_large_status_and_envelope_whole(
            self, spool_layout: paths.SpoolLayout, queue_message: QueueMessage) -> None:
        many = [f"r{i}@example.org" for i in range(5000)]  # envelope line > 64 KiB
        env = queue_message(recipients=many)
        failed = {r: "550 5.1.1 no such user " + "x" * 20 for r in many}  # status > 64 KiB
        spool.write_status(spool_layout, env.queue_id, spool.Status(failed=failed))
        (entry,) = spool.entries(spool_layout)
        assert entry.envelope.recipients == many and entry.status.failed == failed

    def test_entries_skip_a_symlinked_queue_file(
            self, spool_layout: paths.SpoolLayout, queue_message: QueueMessage,
            tmp_path: Path) -> None:
        real = queue_message()
        target = tmp_path / "elsewhere"
        target.write_bytes(Path(spool.queue_path(spool_layout, spool.INCOMING,
                                                 real.queue_id)).read_bytes())
        os.symlink(target, os.path.join(spool_layout.state_dir(spool.DEFERRED),
                                        "0123456789ABCDEF"))
        assert [e.envelope.queue_id for e in spool.entries(spool_layout)] == [real.queue_id]


class TestCleanTmp:
    def test_at_start_every_interrupted_write_goes(self, spool_layout: paths.SpoolLayout) -> None:
        for name in ("0123456789ABCDEF", "half-written", "FEDCBA9876543210"):
            Path(spool_layout.tmp, name).write_bytes(b"SMSHIMQ1\n{")
        assert sorted(spool.clean_tmp(spool_layout)) == [
            "0123456789ABCDEF", "FEDCBA9876543210", "half-written"]
        assert os.listdir(spool_layout.tmp) == []

    def test_with_max_age_live_writers_are_spared(self, spool_layout: paths.SpoolLayout) -> None:
        now = time.time()
        old, fresh = Path(spool_layout.tmp, "old"), Path(spool_layout.tmp, "fresh")
        for path, age in ((old, spool.TMP_MAX_AGE + 60), (fresh, 5)):
            path.write_bytes(b"x")
            os.utime(path, (now - age, now - age))
        assert spool.clean_tmp(spool_layout, spool.TMP_MAX_AGE) == ["old"]
        assert os.listdir(spool_layout.tmp) == ["fresh"]

    def test_committed_messages_are_untouched(self, spool_layout: paths.SpoolLayout,
                                              queue_message: QueueMessage) -> None:
        envelope = queue_message()
        assert spool.clean_tmp(spool_layout) == []
        assert spool.read_entry(spool_layout, spool.INCOMING, envelope.queue_id)[0] == envelope


def test_status_file_is_plain_json(spool_layout: paths.SpoolLayout) -> None:
    """The admin command and the runner share the format: the dataclass's fields, as JSON."""
    qid = "0123456789ABCDEF"
    spool.write_status(spool_layout, qid, spool.Status(done=["a@x.test"]))
    with open(spool.status_path(spool_layout, qid), encoding="utf-8") as fh:
        data = json.load(fh)
    assert set(data) == {"attempts", "next_attempt", "last_error", "done", "failed", "delayed",
                         "internal_failures", "score", "scanned"}


class TestListingReads:
    def test_a_long_envelope_is_read_to_its_newline(
            self, spool_layout: paths.SpoolLayout, queue_message: QueueMessage) -> None:
        many = [f"rcpt{i:04d}@example.net" for i in range(600)]  # far beyond the first read
        queued = queue_message(recipients=many)
        (entry,) = spool.entries(spool_layout)
        assert entry.envelope == queued and len(entry.envelope.recipients) == 600

    def test_entries_is_lazy(self, spool_layout: paths.SpoolLayout,
                             queue_message: QueueMessage) -> None:
        first, second = queue_message(), queue_message()
        found = spool.entries(spool_layout)
        assert next(found).envelope == first
        os.unlink(spool.queue_path(spool_layout, spool.INCOMING, second.queue_id))
        assert list(found) == []  # read when reached, not before

    def test_concurrent_commits_are_all_whole(
            self, spool_layout: paths.SpoolLayout, make_envelope: MakeEnvelope) -> None:
        envelopes = [make_envelope() for _ in range(24)]
        threads = [threading.Thread(target=spool.commit, args=(spool_layout, e, MESSAGE))
                   for e in envelopes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for envelope in envelopes:
            assert spool.read_entry(spool_layout, spool.INCOMING, envelope.queue_id) == (
                envelope, MESSAGE)


class TestListingKeepsEnvelopes:
    """A whole listing keeps the envelopes it read; the next reads only what changed."""

    @staticmethod
    def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
        read: list[str] = []
        real = spool._read_envelope_at

        def counting(dir_fd: int, queue_id: str) -> Envelope:
            read.append(queue_id)
            return real(dir_fd, queue_id)

        monkeypatch.setattr(spool, "_read_envelope_at", counting)
        return read

    def test_the_second_listing_reads_only_statuses(
            self, spool_layout: paths.SpoolLayout, queue_message: QueueMessage,
            monkeypatch: pytest.MonkeyPatch) -> None:
        read = self.reads(monkeypatch)
        first, second = queue_message(), queue_message(state=spool.DEFERRED)
        assert [e.envelope for e in spool.entries(spool_layout)] == [first, second]
        assert sorted(read) == sorted([first.queue_id, second.queue_id])
        read.clear()
        spool.write_status(spool_layout, second.queue_id, spool.Status(last_error="451 later"))
        again = list(spool.entries(spool_layout))
        assert read == [] and [e.envelope for e in again] == [first, second]
        assert again[1].status.last_error == "451 later"  # a status is read every time
        parsed: list[bytes] = []
        real_parse = spool._parse_status
        monkeypatch.setattr(spool, "_parse_status",
                            lambda raw: parsed.append(raw) or real_parse(raw))
        third = list(spool.entries(spool_layout))
        assert third[1].status is again[1].status and parsed == []  # the same bytes
        spool.write_status(spool_layout, second.queue_id, spool.Status(last_error="452 full"))
        assert list(spool.entries(spool_layout))[1].status.last_error == "452 full"
        assert len(parsed) == 1

    def test_what_changed_is_read_and_what_went_is_forgotten(
            self, spool_layout: paths.SpoolLayout, queue_message: QueueMessage,
            make_envelope: MakeEnvelope, monkeypatch: pytest.MonkeyPatch) -> None:
        read = self.reads(monkeypatch)
        gone, moved, stays = queue_message(), queue_message(), queue_message()
        list(spool.entries(spool_layout))
        read.clear()
        spool.remove(spool_layout, gone.queue_id, spool.INCOMING)
        spool.move(spool_layout, moved.queue_id, spool.INCOMING, spool.HOLD)  # same inode
        new = queue_message()
        # Another file under a kept name (never done by the spool): another inode, read anew.
        other = make_envelope(queue_id=stays.queue_id, sender="other@site1.test")
        path = spool.queue_path(spool_layout, spool.INCOMING, stays.queue_id)
        with open(path + ".new", "wb") as fh:
            fh.write(spool.QUEUE_MAGIC + other.to_json() + b"\n" + MESSAGE)
        os.rename(path + ".new", path)
        found = [(e.state, e.envelope) for e in spool.entries(spool_layout)]
        assert found == [(spool.INCOMING, other), (spool.INCOMING, new), (spool.HOLD, moved)]
        assert sorted(read) == sorted([stays.queue_id, new.queue_id])
        assert set(spool._listed_kept[spool_layout.root]) == {
            stays.queue_id, new.queue_id, moved.queue_id}

    def test_a_listing_cut_short_or_too_large_keeps_nothing_new(
            self, spool_layout: paths.SpoolLayout, queue_message: QueueMessage,
            monkeypatch: pytest.MonkeyPatch) -> None:
        read = self.reads(monkeypatch)
        first, _second, _third = queue_message(), queue_message(), queue_message()
        listing = spool.entries(spool_layout)
        assert next(listing).envelope == first
        listing.close()
        assert spool_layout.root not in spool._listed_kept
        list(spool.entries(spool_layout))
        assert len(spool._listed_kept[spool_layout.root]) == 3
        monkeypatch.setattr(spool, "LIST_CACHE_MAX", 2)  # more queued than may be kept
        read.clear()
        assert len(list(spool.entries(spool_layout))) == 3
        assert len(read) == 3 and spool_layout.root not in spool._listed_kept

    def test_a_symlink_under_a_kept_name_is_not_listed(
            self, spool_layout: paths.SpoolLayout, queue_message: QueueMessage,
            tmp_path: Path) -> None:
        real = queue_message()
        list(spool.entries(spool_layout))
        path = spool.queue_path(spool_layout, spool.INCOMING, real.queue_id)
        target = tmp_path / "elsewhere"
        target.write_bytes(Path(path).read_bytes())
        os.unlink(path)
        os.symlink(target, path)
        assert list(spool.entries(spool_layout)) == []
