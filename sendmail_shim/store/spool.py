"""The durable queue: commit protocol, states as directories, validated queue ids.

Trusts: nothing under the spool that it did not write itself; every queue id
is checked against :data:`QUEUE_ID` before it becomes part of a path.
Guarantees (ARCHITECTURE.md, "Spool commit protocol"): :func:`commit` writes
``tmp/<id>`` (0600, O_EXCL|O_NOFOLLOW), fsyncs it, links it into
``incoming/`` (then unlinks the ``tmp/`` name) and fsyncs that directory
before returning (concurrent commits share one such fsync, begun after each
one's link: ``durable.GroupSync``);
only then does the daemon answer "accepted".  A commit never replaces a
message: the id must be absent from every state directory, and the file
enters ``incoming/`` by ``link()`` (which fails on an existing name), not by
``rename()``; a clash raises :class:`QueueIdTaken` and the caller retries with
a new id.  Ids issued by one process are strictly increasing
(:func:`new_queue_id`), so within the daemon a clash needs another process or
a clock stepped back.  A crash leaves either nothing or a whole file; files
left in ``tmp/`` are removed by :func:`clean_tmp` at start.  A queue file is
immutable once committed; what changes (attempts, recipients done, last error,
next attempt) lives in ``status/<id>.json``, replaced atomically.

Queue file format: ``SMSHIMQ1\\n``, one JSON line (the :class:`Envelope`), then
the message bytes (LF line endings).  A message moves between states by rename.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from sendmail_shim.store.envelope import Envelope
from sendmail_shim.wire import paths
from sendmail_shim.wire.durable import GroupSync, fsync_dir, write_synced

QUEUE_MAGIC = b"SMSHIMQ1\n"
QUEUE_ID = re.compile(r"[0-9A-F]{16}")  # always fullmatch: "$" would allow a newline
INCOMING, DEFERRED, HOLD, CORRUPT = "incoming", "deferred", "hold", "corrupt"
STATES = (INCOMING, DEFERRED, HOLD, CORRUPT)
# What scanning found (Status.scanned): scored; spamd down or slow and the message went on
# unscored (scan.on_failure: deliver); larger than scan.max_size, so not scanned (before
# issue 21: still read from old status files); larger than scan.max_size and scored on its
# first scan.max_size bytes.
SCANNED_OK, SCANNED_UNAVAILABLE, SCANNED_SKIPPED = "ok", "unavailable", "skipped"
SCANNED_PARTIAL = "partial"
SCAN_RESULTS = (SCANNED_OK, SCANNED_UNAVAILABLE, SCANNED_SKIPPED, SCANNED_PARTIAL)
TMP_MAX_AGE = 3600.0  # a tmp file older than this belongs to no live writer


class QueueIdError(ValueError):
    pass


class QueueIdTaken(FileExistsError):
    """:func:`commit` found the queue id in use: nothing was written; take a new id."""


_last_id = 0
_last_id_lock = threading.Lock()


def new_queue_id() -> str:
    """16 hex digits: milliseconds since the epoch (sortable) and 20 random bits.

    Strictly increasing within a process: two ids of the same millisecond never
    share the random part (the next one is one more), so the daemon, which issues
    every id of intake, bounces and notices, cannot hand out one id twice.
    """
    global _last_id
    millis = int(time.time() * 1000) & ((1 << 44) - 1)
    rand = int.from_bytes(os.urandom(3), "big") & 0xFFFFF
    with _last_id_lock:
        value = max((millis << 20) | rand, _last_id + 1) & ((1 << 64) - 1)
        _last_id = value
    return f"{value:016X}"


def check_queue_id(queue_id: str) -> str:
    if not isinstance(queue_id, str) or not QUEUE_ID.fullmatch(queue_id):
        raise QueueIdError(f"not a queue id: {queue_id[:40]!r}")
    return queue_id


@dataclass
class Status:
    """Mutable delivery state of one message."""

    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    done: list[str] = field(default_factory=list)  # delivered recipients
    failed: dict[str, str] = field(default_factory=dict)  # recipient -> permanent reason
    delayed: dict[str, str] = field(default_factory=dict)  # recipient -> temporary reason
    internal_failures: int = 0  # attempts in a row that ended in an exception (delivery.py)
    score: float | None = None  # spamd's content score (delivery/scan.py); None: unscored
    scanned: str | None = None  # None: not scanned yet; else one of SCAN_RESULTS

    def valid(self) -> bool:
        return (isinstance(self.attempts, int) and isinstance(self.next_attempt, (int, float))
                and isinstance(self.last_error, str) and isinstance(self.done, list)
                and all(isinstance(r, str) for r in self.done)
                and isinstance(self.failed, dict) and isinstance(self.delayed, dict)
                and isinstance(self.internal_failures, int)
                and (self.score is None or (isinstance(self.score, (int, float))
                                            and not isinstance(self.score, bool)))
                and (self.scanned is None or self.scanned in SCAN_RESULTS))


@dataclass
class QueueEntry:
    state: str
    envelope: Envelope
    status: Status


def prepare_spool(layout: paths.SpoolLayout) -> None:
    """Create the spool directories with their modes (idempotent; the daemon's own)."""
    if not os.path.isdir(layout.root):
        os.makedirs(layout.root, mode=paths.MODE_SPOOL_ROOT)
        os.chmod(layout.root, paths.MODE_SPOOL_ROOT)  # under umask 077 sites could not pass
    for directory, mode in (
        (layout.public, paths.MODE_PUBLIC_DIR),
        (layout.maildrop, paths.MODE_MAILDROP_DIR),
        (layout.tmp, paths.MODE_PRIVATE_DIR),
        (layout.status, paths.MODE_PRIVATE_DIR),
        *((layout.state_dir(s), paths.MODE_PRIVATE_DIR) for s in STATES),
    ):
        os.makedirs(directory, mode=mode, exist_ok=True)
        os.chmod(directory, mode)  # makedirs obeys the umask; the modes are the contract


def queue_path(layout: paths.SpoolLayout, state: str, queue_id: str) -> str:
    if state not in STATES:
        raise ValueError(f"unknown queue state {state!r}")
    return os.path.join(layout.state_dir(state), check_queue_id(queue_id))


_group_syncs: dict[str, GroupSync] = {}
_group_syncs_lock = threading.Lock()


def _group_sync(directory: str) -> GroupSync:
    with _group_syncs_lock:
        group = _group_syncs.get(directory)
        if group is None:
            group = _group_syncs[directory] = GroupSync(directory)
        return group


def commit(layout: paths.SpoolLayout, envelope: Envelope, message: bytes) -> None:
    """Write the message durably into ``incoming/`` (see the module docstring).

    Concurrent commits share the fsync of ``incoming/`` (group commit): each
    returns only after an fsync that began after its own link succeeded.
    Raises :class:`QueueIdTaken` (nothing written) when a message with this id
    exists in any state, or its ``tmp/`` name is in use.
    """
    queue_id = check_queue_id(envelope.queue_id)
    if find_state(layout, queue_id) is not None:
        raise QueueIdTaken(f"queue id {queue_id} is in use")
    tmp = os.path.join(layout.tmp, queue_id)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, paths.MODE_QUEUE_FILE)
    except FileExistsError:
        raise QueueIdTaken(f"queue id {queue_id} is being written") from None
    incoming = layout.state_dir(INCOMING)
    try:
        write_synced(fd, tmp, QUEUE_MAGIC + envelope.to_json() + b"\n" + message)
        # link(), not rename(): an existing incoming/<id> is never replaced.  Another
        # state's copy was checked above; ids move between states by rename only.
        os.link(tmp, os.path.join(incoming, queue_id))
    except FileExistsError:
        raise QueueIdTaken(f"queue id {queue_id} is in use") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _group_sync(incoming).sync()


def read_entry(layout: paths.SpoolLayout, state: str, queue_id: str) -> tuple[Envelope, bytes]:
    """Envelope and message; ``ValueError`` when the file is damaged."""
    path = queue_path(layout, state, queue_id)
    data = _read_small(path, os.O_NOFOLLOW)  # raw reads: no file object per message
    if not data.startswith(QUEUE_MAGIC):
        raise ValueError(f"{path}: not a queue file")
    newline = data.find(b"\n", len(QUEUE_MAGIC))
    if newline < 0:
        raise ValueError(f"{path}: no envelope line")
    envelope = Envelope.from_json(data[len(QUEUE_MAGIC) : newline])
    message = data[newline + 1 :]
    if envelope.queue_id != queue_id or len(message) != envelope.size:
        raise ValueError(f"{path}: envelope does not match the file (id or size)")
    return envelope, message


def read_envelope(layout: paths.SpoolLayout, state: str, queue_id: str) -> Envelope:
    """Only the envelope line; cheap for listings."""
    path = queue_path(layout, state, queue_id)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        if fh.readline() != QUEUE_MAGIC:
            raise ValueError(f"{path}: not a queue file")
        return Envelope.from_json(fh.readline())


def status_path(layout: paths.SpoolLayout, queue_id: str) -> str:
    return os.path.join(layout.status, check_queue_id(queue_id) + ".json")


def _read_small(path: str, flags: int = 0) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        pieces = []
        while piece := os.read(fd, 1 << 16):
            pieces.append(piece)
    finally:
        os.close(fd)
    return b"".join(pieces)


_DECODE = json.JSONDecoder().decode  # json.loads without its per-call checks


def _parse_status(raw: bytes) -> Status:
    """A status file's bytes as a :class:`Status`; a damaged one is reset, saying so."""
    try:
        data = _DECODE(raw.decode())
        status = Status(**data)
        if not status.valid():
            raise ValueError("wrong types")
        return status
    except (ValueError, TypeError):
        return Status(last_error="status file was damaged and has been reset")


def read_status(layout: paths.SpoolLayout, queue_id: str) -> Status:
    try:
        raw = _read_small(status_path(layout, queue_id))
    except FileNotFoundError:
        return Status()
    return _parse_status(raw)


def write_status(layout: paths.SpoolLayout, queue_id: str, status: Status) -> None:
    """Replace the status atomically (tmp, fsync, rename)."""
    final = status_path(layout, queue_id)
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                 paths.MODE_QUEUE_FILE)
    write_synced(fd, tmp, json.dumps(asdict(status)).encode())
    os.rename(tmp, final)


def move(layout: paths.SpoolLayout, queue_id: str, src: str, dst: str) -> None:
    os.rename(queue_path(layout, src, queue_id), queue_path(layout, dst, queue_id))
    fsync_dir(layout.state_dir(dst))


def remove(layout: paths.SpoolLayout, queue_id: str, state: str) -> None:
    """Forget a message: the queue file first, then its status."""
    os.unlink(queue_path(layout, state, queue_id))
    fsync_dir(layout.state_dir(state))
    _forget_status(layout, queue_id)


def remove_delivered(layout: paths.SpoolLayout, queue_id: str, state: str) -> None:
    """Forget a message whose recipients all have their outcome: no fsync at all.

    The runner's success path.  A crash before the directory reaches the disk
    can bring the queue file back, and then it is delivered once more
    (at-least-once, as after any crash between the relay's "250" and the
    removal); it can never lose a message.  The operator's delete uses
    :func:`remove`, which is durable.
    """
    os.unlink(queue_path(layout, state, queue_id))
    _forget_status(layout, queue_id)


def forget_status(layout: paths.SpoolLayout, queue_id: str) -> None:
    """Unlink a status written for a message whose commit then failed (before_ack scan)."""
    _forget_status(layout, queue_id)


def _forget_status(layout: paths.SpoolLayout, queue_id: str) -> None:
    """Unlink a removed message's status file, if it had one (after the queue file)."""
    try:
        os.unlink(status_path(layout, queue_id))
    except FileNotFoundError:
        pass


def queue_ids(layout: paths.SpoolLayout, state: str) -> list[str]:
    """Valid queue ids in a state directory, oldest first; other names are ignored."""
    try:
        names = os.listdir(layout.state_dir(state))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if QUEUE_ID.fullmatch(n))


def find_state(layout: paths.SpoolLayout, queue_id: str) -> str | None:
    for state in STATES:
        if os.path.exists(queue_path(layout, state, queue_id)):
            return state
    return None


def clean_tmp(layout: paths.SpoolLayout, max_age: float = 0.0) -> list[str]:
    """Remove interrupted writes from ``tmp/`` (all of them at start: no writer is alive)."""
    removed = []
    now = time.time()
    for name in os.listdir(layout.tmp):
        path = os.path.join(layout.tmp, name)
        try:
            if now - os.lstat(path).st_mtime >= max_age:
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:
            continue
    return removed


ENVELOPE_READ = 4096  # the first read of a queue file for a listing; most envelopes fit
_LIST_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _read_at(dir_fd: int, name: str, first: int, enough: Callable[[bytes], bool]) -> bytes:
    """Read ``name`` (relative to ``dir_fd``, no symlink) until ``enough`` or its end."""
    fd = os.open(name, _LIST_FLAGS, dir_fd=dir_fd)
    try:
        data = os.read(fd, first)
        while len(data) >= first and not enough(data):
            more = os.read(fd, 1 << 16)
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    return data


def _never(data: bytes) -> bool:
    return False


def _envelope_line(data: bytes) -> bool:
    return data.find(b"\n", len(QUEUE_MAGIC)) >= 0


LIST_CACHE_MAX = 5_000  # entries kept between listings (about 2 KB each); none above
# spool root -> {queue id: (inode, envelope, status bytes, status)} of the last whole
# listing.  A queue file never changes once committed: while the directory names the
# same file (inode), its envelope is the one read before.  A status is read every time,
# and parsed again only when its bytes differ.
_Kept = tuple[int, Envelope, bytes | None, Status]
_listed_kept: dict[str, dict[str, _Kept]] = {}


def _read_envelope_at(dir_fd: int, queue_id: str) -> Envelope:
    """The envelope line of ``queue_id`` (one read for most), relative to ``dir_fd``."""
    head = _read_at(dir_fd, queue_id, ENVELOPE_READ, _envelope_line)
    if not head.startswith(QUEUE_MAGIC):
        raise ValueError(f"{queue_id}: not a queue file")
    end = head.find(b"\n", len(QUEUE_MAGIC))
    if end < 0:
        raise ValueError(f"{queue_id}: no envelope line")
    return Envelope.from_json(head[len(QUEUE_MAGIC) : end])


def _listed_files(dir_fd: int, room: int) -> tuple[list[str], dict[str, int] | None]:
    """The queue ids of a state directory's regular files, oldest first, and their inodes
    while there are at most ``room`` of them (else None: a large queue keeps nothing).

    One ``getdents`` walk: the kernel gives each name's inode and type with it.
    """
    ids: list[str] = []
    inodes: dict[str, int] | None = {}
    with os.scandir(dir_fd) as names:
        for name in names:
            queue_id = name.name
            if QUEUE_ID.fullmatch(queue_id) and name.is_file(follow_symlinks=False):
                ids.append(queue_id)
                if inodes is not None:
                    inodes[queue_id] = name.inode()
                    if len(inodes) > room:
                        inodes = None
    ids.sort()
    return ids, inodes


def _listed_status(status_fd: int, queue_id: str, was: _Kept | None
                   ) -> tuple[bytes | None, Status]:
    """The status file's bytes (None: there is none) and what they say."""
    try:
        raw = _read_at(status_fd, queue_id + ".json", 1 << 16, _never)
    except FileNotFoundError:
        return None, Status()
    if was is not None and was[2] == raw:
        return raw, was[3]
    return raw, _parse_status(raw)


def entries(layout: paths.SpoolLayout, states: tuple[str, ...] = STATES) -> Iterator[QueueEntry]:
    """Every readable message in ``states``, for listings; damaged ones are skipped.

    A generator: one entry at a time, reading only each queue file's envelope
    line and its status, so a listing's memory does not grow with the queue.
    Both files are opened relative to their directory's descriptor: no path is
    built or walked per entry.  What a whole listing read is kept for the next
    while the queue holds at most :data:`LIST_CACHE_MAX` messages (a listing of a
    larger queue keeps nothing): an envelope, which never changes, is used again
    while the directory names the same regular file (the inode and type
    ``getdents`` gives with each name, no call per file); a status is read every
    time and parsed again when its bytes changed.  The entries of a listing are
    for reading only (a kept status is shared by the next listing).
    """
    known = _listed_kept.get(layout.root, {})
    kept: dict[str, _Kept] | None = {}
    status_fd = os.open(layout.status, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for state in states:
            try:
                dir_fd = os.open(layout.state_dir(state),
                                 os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                ids, inodes = _listed_files(
                    dir_fd, LIST_CACHE_MAX - len(kept) if kept is not None else -1)
                if inodes is None and kept is not None:  # too many to keep
                    kept, known = None, {}
                    _listed_kept.pop(layout.root, None)
                for queue_id in ids:
                    inode = inodes[queue_id] if inodes is not None else 0
                    was = known.get(queue_id)
                    if was is not None and was[0] != inode:
                        was = None
                    try:
                        envelope = (was[1] if was is not None
                                    else _read_envelope_at(dir_fd, queue_id))
                        raw, status = _listed_status(status_fd, queue_id, was)
                    except (OSError, ValueError):
                        continue
                    if kept is not None:
                        kept[queue_id] = (inode, envelope, raw, status)
                    yield QueueEntry(state, envelope, status)
            finally:
                os.close(dir_fd)
    finally:
        os.close(status_fd)
    if kept is not None:  # a whole listing: what it read is what the next one may use
        _listed_kept[layout.root] = kept
