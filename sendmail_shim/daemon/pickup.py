"""Pickup: ingesting drop files that the front end wrote while the daemon was down.

Trusts: only what the kernel says about each file, read with ``fstat`` from the
descriptor it then reads (type, owner, group, mode, link count); the content
is as hostile as a socket request and goes through the same intake.  Every
site can create entries of any kind and name in ``maildrop/`` and can hard
link into it any file it may read and write.

Which drop file proves its owner (the argument is in wire/client.py): a regular
file with exactly one link, whose group is the drop directory's group (the
daemon's, given by the setgid directory at creation) and whose permission
bits are exactly 0640 (nobody but its owner may write it).  The identity is
then its owner uid.  Anything else (a hard link to another site's 0666 file,
a directory, FIFO, socket, device, symlink, a file with other modes) is
refused before a byte is read.

Guarantees:

* a file is ingested only if it passes the test above, carries an ``m.``
  name (renamed after its fsync) and a complete request (size and END
  trailer agree);
* one bad entry never stops the scan: a file proven bad (its type, owner
  proof or request format) is removed, its head copied into ``corrupt/``
  (``drop.<name>``, daemon-owned: dropspace.set_aside) and logged with its
  owner uid and the reason; a directory is never moved there (its owner
  could keep writing into it through a descriptor): an empty one is removed,
  another is logged once and skipped.  An error that does not
  prove the file bad (EMFILE, ENOMEM, EIO, an exception in the intake) keeps
  the file for the next scan, and only after MAX_FAILURES such scans is it
  set aside: acknowledged mail is never stranded by the daemon's own trouble;
* fairness: each scan takes the owners in turn, one file each, so a site
  that floods the drop area delays nobody else's file by more than one file
  per flooding uid; files are started in that order, PARALLEL at a time, so
  their spool commits share fsyncs (a backlog is not one disk flush per file);
  a scan goes in passes of at most PASS_PER_OWNER files per owner and lists
  the area again after each, so a file written while one site's thousands are
  taken waits for one pass, not the whole scan (issue 21, second fresh attack:
  13 s behind 6,000 files);
* no descriptor leaks (each is closed in ``finally``) and no FIFO blocks the
  scan (non-regular entries are refused from ``lstat`` and never opened; the
  open is O_NONBLOCK|O_NOFOLLOW in case the entry was swapped meanwhile);
* exit 0 means delivered or bounced: a file is unlinked as soon as it is
  queued, or refused for good and its notice to the sender is queued
  (daemon/dropnotice.py; a file over the size limit too, from its request
  header); only what passes by itself waits (:func:`waits`: the spool's disk,
  a twin in flight, the rate quota): a twin or a full disk is tried once more
  at the end of the scan, one file at a time (two drop files of one submission
  may have been in flight together); everything that waits is kept for the
  next scan and bounced once older than ``retry.lifetime``; once one file of an
  owner waits for its quota, its other files are not taken again in that scan
  (only counted toward its share): each try would cost an intake and a log
  line for the same answer (6,000 waiting files cost a CPU core and 20 MB of
  log in 30 s); a site's files waiting for its quota beyond its share
  of the drop area (dropspace.share) are bounced at once.  Every other
  refusal, a 4xx included (``452 4.5.3``), is final at the first scan, so no
  file is tried forever; ``maildrop/`` is fsynced after a scan that removed
  files;
* space: each scan first runs dropspace.sweep (names no front end writes,
  stale and over-share ``t.`` files), so no site keeps more than its share;
* the scan checks its stop event between files, so a stopping daemon waits
  for at most the PARALLEL files in hand (see daemon.main: the worker is
  joined before the state is closed); an intake error while stopping keeps
  the file.

``t.`` files older than dropspace.STALE_TMP (10 minutes) are removed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from sendmail_shim.config import Config
from sendmail_shim.daemon import dropnotice, dropspace
from sendmail_shim.intake.accept import accept_submission
from sendmail_shim.policy.identity import Caller
from sendmail_shim.store.outcome import Verdict
from sendmail_shim.store.state import State
from sendmail_shim.wire import protocol, sysexits
from sendmail_shim.wire.durable import fsync_dir
from sendmail_shim.wire.paths import MODE_DROP_FILE

log = logging.getLogger(__name__)
STALE_TMP = dropspace.STALE_TMP
MAX_FAILURES = 5  # unexplained failures of one drop file before it is set aside
PARALLEL = 8  # drop files ingested at once (their commits share fsyncs)
PASS_PER_OWNER = 32  # one owner's drop files taken per pass before the area is listed again
# Errors that say the daemon is short of something, not that the file is bad.
TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EAGAIN,
                       errno.EINTR, errno.ENOSPC, errno.EDQUOT})
QUOTA_WAIT = "4.7.1"  # the quota's rate limit (policy/quota.py)
WAITING = frozenset({"4.3.0", "4.3.1", "4.7.1"})  # refusals a drop file waits out (see waits())
NOTICE_HEAD = 1 << 16  # of an oversized drop file's message, what a notice's header copy reads
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), f"of type {stat.S_IFMT(mode):o}")


def unproven(st: os.stat_result, drop_gid: int) -> str | None:
    """Why a drop file with these attributes does not prove its owner; None if it does."""
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file but {_kind(st.st_mode)}"
    if st.st_nlink != 1:
        return f"not a plain file with one link (nlink={st.st_nlink})"
    if st.st_gid != drop_gid:
        return (f"group {st.st_gid} is not the drop directory's group {drop_gid}: the file was "
                "not created in maildrop/ (a hard link to a file made elsewhere?)")
    if stat.S_IMODE(st.st_mode) != MODE_DROP_FILE:
        return (f"mode {stat.S_IMODE(st.st_mode):04o} is not {MODE_DROP_FILE:04o}: someone "
                "other than its owner may have written it")
    return None


def _read(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < limit:
        chunk = os.read(fd, min(1 << 20, limit - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _fair_order(maildrop: str, names: list[str], per_owner: int | None = None
                ) -> list[tuple[str, int | None]]:
    """Drop-area names with their owners, one owner uid at a time in turn, each owner's
    names in order, at most ``per_owner`` of each.

    A site that floods ``maildrop/`` with names sorting before everyone else's
    must not push another site's acknowledged file to the end of every scan.
    """
    by_owner: dict[int | None, list[str]] = {}
    for name in sorted(names):
        if name.startswith(("m.", "t.")):
            by_owner.setdefault(_owner(os.path.join(maildrop, name)), []).append(name)
    queues = list(by_owner.items())
    longest = max((len(q) for _uid, q in queues), default=0)
    ordered: list[tuple[str, int | None]] = []
    for turn in range(longest if per_owner is None else min(longest, per_owner)):
        ordered.extend((q[turn], uid) for uid, q in queues if turn < len(q))
    return ordered


class Pickup:
    """Scans ``maildrop/``; keeps, between scans, the entries it could not move aside."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop if stop is not None else threading.Event()
        self._stuck: set[str] = set()
        self._failures: dict[str, int] = {}  # name -> unexplained failures so far
        # uid -> {name: bytes} of its files waiting for its quota, in this scan
        self._waiting: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()

    def _retry_or_quarantine(self, config: Config, name: str, why: str, uid: int | None) -> str:
        """An error that is not the file's proven fault: keep it for a few more scans."""
        with self._lock:  # the scan's workers share the counts
            count = self._failures.get(name, 0) + 1
            self._failures[name] = count
        if count < MAX_FAILURES:
            log.warning("pickup retry drop_file=%s uid=%s failures=%d reason=%r action='kept "
                        "for the next scan; moved to corrupt/ after %d'", name, uid, count, why,
                        MAX_FAILURES)
            return "kept"
        return self._quarantine(config, name, f"{why} ({count} times)", uid)

    def scan(self, config: Config, state: State) -> int:
        """Ingest every finished drop file; the number of entries dealt with.

        In passes: each pass takes at most PASS_PER_OWNER files of each owner (in
        turn, :func:`_fair_order`), then the area is listed again, so a file another
        site writes while one site's thousands are taken waits for one pass, not
        for the whole scan.  The scan ends when every name of its first listing was
        taken (or the stop event is set); new names met on the way are taken too.
        An owner whose file waits for its quota has its other files counted toward
        its share, not ingested again, for the rest of the scan: its quota answers
        the same for each, and each try cost an intake and a log line.
        """
        maildrop = config.layout.maildrop
        drop_gid = os.stat(maildrop).st_gid
        try:
            dropspace.sweep(config)  # stranger names, stale and over-share t. files
        except OSError as exc:
            log.warning("cannot sweep %s: %s", maildrop, exc)
        with self._lock:
            self._waiting.clear()
        listed = os.listdir(maildrop)
        self._stuck.intersection_update(listed)  # forget entries that are gone
        for gone in set(self._failures) - set(listed):
            del self._failures[gone]
        first = {name for name in listed if name.startswith("m.")}
        handled: set[str] = set()
        quota_full: set[int] = set()  # owners whose quota is full for this scan
        outcomes: list[tuple[str, str]] = []  # (name, what became of it)
        now = time.time()
        while not self.stop.is_set():
            batch = _fair_order(maildrop, [n for n in listed if n not in handled],
                                PASS_PER_OWNER)
            if not batch:
                break
            outcomes += self._pass(config, state, batch, drop_gid, now, quota_full)
            handled.update(name for name, _uid in batch)
            if first <= handled:
                break
            listed = os.listdir(maildrop)
        # A temporary refusal may be a twin of a file that was in flight beside it (the
        # same subid on two drop files): one more try each, one at a time, now they are done.
        retry = [name for name, outcome in outcomes if outcome == "busy"]
        outcomes = [item for item in outcomes if item[1] != "busy"]
        for name in retry:
            if self.stop.is_set():
                break
            outcomes.append(self._safely(config, state, name, drop_gid, now))
        count = sum(outcome not in ("kept", "busy", "waiting") for _name, outcome in outcomes)
        removed = sum(outcome == "removed" for _name, outcome in outcomes)
        if removed:
            try:
                fsync_dir(maildrop)
            except OSError as exc:
                log.warning("cannot fsync %s: %s", maildrop, exc)
        return count

    def _pass(self, config: Config, state: State, batch: list[tuple[str, int | None]],
              drop_gid: int, now: float, quota_full: set[int]) -> list[tuple[str, str]]:
        """One pass over ``batch``: PARALLEL files at once, started in the fair order (their
        spool commits share fsyncs, so a backlog is not one disk flush per file); a stop
        waits for the files in hand only."""
        outcomes: list[tuple[str, str]] = []
        owners = dict(batch)
        with ThreadPoolExecutor(PARALLEL, thread_name_prefix="pickup") as pool:
            pending: set[Future[tuple[str, str]]] = set()

            def collect(done: set[Future[tuple[str, str]]]) -> None:
                for future in done:
                    name, outcome = future.result()
                    outcomes.append((name, outcome))
                    uid = owners.get(name)
                    if outcome == "waiting" and uid is not None:
                        quota_full.add(uid)

            for n, (name, uid) in enumerate(batch):
                if self.stop.is_set():
                    log.info("pickup stopping: %d drop file(s) left for the next start",
                             sum(1 for rest, _uid in batch[n:] if rest.startswith("m.")))
                    break
                if name in self._stuck or not name.startswith(("m.", "t.")):
                    continue
                if not name.startswith("m."):
                    self._safely(config, state, name, drop_gid, now)
                    continue
                if len(pending) >= PARALLEL:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    collect(done)
                if uid is not None and uid in quota_full and self._still_waits(config, uid,
                                                                               name):
                    outcomes.append((name, "waiting"))
                    continue
                pending.add(pool.submit(self._safely, config, state, name, drop_gid, now))
            collect(pending)
        return outcomes

    def _still_waits(self, config: Config, uid: int, name: str) -> bool:
        """A file of an owner whose quota is full: counted toward its share without an
        intake (True), or past the share and so to be taken, refused and bounced."""
        try:
            size = os.lstat(os.path.join(config.layout.maildrop, name)).st_size
        except OSError:
            return False  # gone or odd: the intake path says what it is
        return self._may_wait(config, uid, name, size)

    # -- one entry ------------------------------------------------------------------
    def _safely(self, config: Config, state: State, name: str, drop_gid: int,
                now: float) -> tuple[str, str]:
        """(name, 'removed', 'moved', 'kept', 'busy' or 'waiting') for one entry; never
        raises."""
        try:
            if name.startswith("m."):
                return name, self._ingest(config, state, name, drop_gid)
            self._tidy_tmp(config, name, now)
            return name, "kept"
        except Exception as exc:  # one entry must never stop the scan for every site
            uid = _owner(os.path.join(config.layout.maildrop, name))
            log.exception("pickup failed drop_file=%s uid=%s", name, uid)
            return name, self._retry_or_quarantine(config, name, f"unexpected error: {exc!r}",
                                                   uid)

    def _ingest(self, config: Config, state: State, name: str, drop_gid: int) -> str:
        """'removed' (ingested or refused for good), 'moved' (to corrupt/), 'kept',
        'busy' (kept after a temporary refusal: a full spool, a twin in flight) or
        'waiting' (kept: its owner's quota is full)."""
        path = os.path.join(config.layout.maildrop, name)
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            return "removed"
        if not stat.S_ISREG(before.st_mode):  # never open a FIFO, device or directory
            return self._quarantine(config, name, unproven(before, drop_gid) or "", before.st_uid)
        try:
            fd = os.open(path, OPEN_FLAGS)
        except FileNotFoundError:
            return "removed"
        except OSError as exc:
            if exc.errno in TRANSIENT:  # our trouble (descriptors, memory), not the file's
                return self._retry_or_quarantine(config, name, f"cannot open: {exc.strerror}",
                                                 before.st_uid)
            return self._quarantine(config, name, f"cannot open: {exc.strerror}", before.st_uid)
        try:
            st = os.fstat(fd)  # the descriptor we read is what counts, not the name
            problem = unproven(st, drop_gid)
            if problem is not None:
                return self._quarantine(config, name, problem, st.st_uid, fd)
            cap = protocol.MAX_HEADER_BYTES + config.message_size_limit + 64
            try:
                data = _read(fd, cap + 1)
            except OSError as exc:
                return self._retry_or_quarantine(config, name, f"cannot read: {exc.strerror}",
                                                 st.st_uid)
        finally:
            os.close(fd)
        if len(data) > cap:
            return self._too_big(config, name, data, st)
        try:
            fields, message = protocol.decode_request(data)
        except (protocol.ProtocolError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            return self._quarantine(config, name, f"bad request: {exc}", st.st_uid)
        caller = Caller(uid=st.st_uid, gid=st.st_gid, pid=None)
        try:
            verdict = accept_submission(config, state, fields, message, caller,
                                        origin="maildrop")
        except Exception as exc:
            if self.stop.is_set():
                log.warning("pickup interrupted by shutdown drop_file=%s uid=%d: kept for the "
                            "next start (%r)", name, st.st_uid, exc)
                return "kept"
            log.exception("intake failed drop_file=%s uid=%d", name, st.st_uid)
            return self._retry_or_quarantine(config, name, f"intake failed: {exc!r}", st.st_uid)
        if not verdict.accepted:
            age = time.time() - st.st_mtime
            if waits(verdict) and age < config.retry.lifetime:
                if verdict.enhanced != QUOTA_WAIT:
                    return "busy"  # a full spool, a twin in flight: try later
                if self._may_wait(config, st.st_uid, name, len(data)):
                    return "waiting"  # the quota: at a later scan
                verdict = Verdict(verdict.code, verdict.enhanced, verdict.status,
                                  f"{verdict.text}; and the drop files of uid {st.st_uid} "
                                  "waiting for its quota pass its share of the drop area "
                                  f"({dropspace.share(config)} bytes)")
            elif waits(verdict):
                verdict = Verdict(verdict.code, verdict.enhanced, verdict.status,
                                  f"{verdict.text} (still so after {age / 3600:.1f} h: "
                                  f"retry.lifetime {config.retry.lifetime:g} s)")
            # The writer was told "accepted" (exit 0) long ago: a refusal now is final and
            # goes back to the sender as a notice; the file goes once the notice is queued.
            if not self._notify(config, name, fields, message, st, verdict):
                return "kept"
            log.warning("dropped drop_file=%s uid=%d status=%d enhanced=%s reason=%r "
                        "action='a notice went to the sender (see the bounced line)'", name,
                        st.st_uid, verdict.code, verdict.enhanced, verdict.text)
        _unlink(path, name, st.st_uid)
        return "removed"

    def _too_big(self, config: Config, name: str, data: bytes, st: os.stat_result) -> str:
        """A drop file over the size limit: bounced (its request header read) and removed."""
        why = f"larger than message_size_limit ({config.message_size_limit})"
        end = data.find(protocol.HEADER_END, len(protocol.MAGIC) - 1)
        try:
            if not data.startswith(protocol.MAGIC) or not 0 <= end <= protocol.MAX_HEADER_BYTES:
                raise protocol.ProtocolError("no request header")
            fields = protocol.decode_header(data[len(protocol.MAGIC) : end + 1])
        except (protocol.ProtocolError, ValueError):
            return self._quarantine(config, name, why, st.st_uid)
        start = end + len(protocol.HEADER_END)
        verdict = Verdict(552, "5.3.4", sysexits.EX_DATAERR,
                          f"message {why}; nothing was queued")
        if not self._notify(config, name, fields, data[start : start + NOTICE_HEAD], st,
                            verdict):
            return "kept"
        _unlink(path=os.path.join(config.layout.maildrop, name), name=name, uid=st.st_uid)
        return "removed"

    def _may_wait(self, config: Config, uid: int, name: str, size: int) -> bool:
        """Whether waiting file ``name`` of ``size`` keeps ``uid`` within its share."""
        with self._lock:
            files = self._waiting.setdefault(uid, {})
            others = sum(held for other, held in files.items() if other != name)
            if others + size > dropspace.share(config):
                return False
            files[name] = size
            return True

    def _notify(self, config: Config, name: str, fields: list[tuple[str, str]],
                message: bytes, st: os.stat_result, verdict: Verdict) -> bool:
        """Bounce a refused drop file to its sender; False (file kept) when that failed."""
        try:
            dropnotice.notify_refused(config, fields, message, st.st_uid, st.st_gid, verdict,
                                      name)
        except OSError as exc:
            log.error("notice_failed drop_file=%s uid=%d reason=%r action='the drop file is "
                      "kept and bounced at a later scan; free space on the spool disk'",
                      name, st.st_uid, str(exc))
            return False
        return True

    def _tidy_tmp(self, config: Config, name: str, now: float) -> None:
        path = os.path.join(config.layout.maildrop, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            self._quarantine(config, name, f"not a regular file but {_kind(st.st_mode)}",
                             st.st_uid)
        elif now - st.st_mtime > STALE_TMP:
            try:
                os.unlink(path)
                log.info("removed stale drop_file=%s uid=%d", name, st.st_uid)
            except FileNotFoundError:
                pass

    def _quarantine(self, config: Config, name: str, why: str,
                    uid: int | None = None, fd: int | None = None) -> str:
        """Set a refused entry aside (dropspace.set_aside); never raises.  'moved' or 'kept'.

        ``fd``: a descriptor open on it, when the caller has one (its head is kept).
        """
        layout = config.layout
        src = os.path.join(layout.maildrop, name)
        if uid is None:
            uid = _owner(src)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return "moved"
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            # Never into corrupt/: a site holding a descriptor of its directory could
            # go on creating files in it there.  An empty one goes; others stay.
            try:
                os.rmdir(src)
            except OSError as exc:
                self._stuck.add(name)
                log.error("corrupt drop_file=%s uid=%s reason=%r action='cannot remove it "
                          "(%s); skipped from now on: remove %s by hand'", name, uid, why,
                          exc.strerror, src)
                return "kept"
            log.error("corrupt drop_file=%s uid=%s reason=%r action='removed the empty "
                      "directory'", name, uid, why)
            return "moved"
        own = None
        if fd is None and st is not None and stat.S_ISREG(st.st_mode):
            try:  # its head is kept for the operator; never a FIFO (checked just above)
                own = fd = os.open(src, OPEN_FLAGS)
            except OSError:
                fd = None
        try:
            removed = dropspace.set_aside(config, name, fd, -1 if uid is None else uid, why)
        finally:
            if own is not None:
                os.close(own)
        if not removed:
            self._stuck.add(name)
            return "kept"
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            self._twins(config, name, st, why)
        return "moved"

    def _twins(self, config: Config, name: str, st: os.stat_result, why: str) -> None:
        """Set aside the other names of a refused file with several links, now: once this
        name is gone, a twin would have one link and pass for a proven drop file."""
        maildrop = config.layout.maildrop
        for other in os.listdir(maildrop):
            try:
                twin = os.lstat(os.path.join(maildrop, other))
            except OSError:
                continue
            if other != name and (twin.st_dev, twin.st_ino) == (st.st_dev, st.st_ino):
                dropspace.set_aside(config, other, None, twin.st_uid,
                                    f"another name of {name}: {why}")


def _unlink(path: str, name: str, uid: int) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("cannot remove drop_file=%s uid=%d after its verdict: %s; remove it by "
                  "hand or it is ingested again", name, uid, exc)


def waits(verdict: Verdict) -> bool:
    """Whether a drop file refused with ``verdict`` is tried again at the next scan.

    Only trouble that passes by itself waits: the daemon's storage (451 4.3.0, 4.3.1),
    a twin of the same submission in flight (451 4.3.0) and a rate quota (452 4.7.1).
    Any other refusal, a 4xx included (452 4.5.3 too many recipients), is final at
    the first scan: the same file would get the same answer forever.
    """
    return verdict.code // 100 == 4 and verdict.enhanced in WAITING


def _owner(path: str) -> int | None:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return None


def ingest_file(config: Config, state: State, name: str) -> bool:
    """Ingest one ``m.`` file; True when it is gone from the drop directory."""
    drop_gid = os.stat(config.layout.maildrop).st_gid
    return Pickup()._ingest(config, state, name, drop_gid) not in ("kept", "busy", "waiting")


def scan(config: Config, state: State) -> int:
    """Ingest every finished drop file once (a fresh :class:`Pickup`); the number dealt with."""
    return Pickup().scan(config, state)
