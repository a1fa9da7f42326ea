"""The drop area's space guard: one site never holds more than a share of the spool's disk.

``maildrop/`` is writable by every site (mode 3733, wire/client.py), and it
lies on the spool's file system, beside ``incoming/`` and the state database:
a site that parks large files there could stop every other site's mail.
What the daemon can do about files it does not own, it does here, as Postfix's
pickup does (it removes what it cannot use):

* a name the front end never writes (neither ``t.`` nor ``m.``) is removed at
  the next scan, logged with its owner uid and size;
* a ``t.`` file (a front end writes its whole message at once, then renames it)
  is removed once older than STALE_TMP, and at once when its owner's ``t.``
  files together pass the uid's share (:func:`share`, newest removed first);
* a refused ``m.`` file is not kept in ``corrupt/`` as the site's own bytes: its
  first CORRUPT_KEEP bytes are copied into a daemon-owned file there (to
  inspect) and the drop file is removed (:func:`set_aside`); ``corrupt/`` keeps
  at most CORRUPT_FILES such copies, the oldest trimmed first;
* a drop file waiting for its site's quota counts toward the share too: past
  it, pickup bounces it (daemon/pickup.py) instead of keeping it;
* when the intake finds the disk full (``451 4.3.1``), :func:`accept_relieved`
  sweeps the drop area and tries the submission once more, so other sites get
  their exit 0 while one site keeps filling ``maildrop/`` with files it closes.

Trusts: nothing in ``maildrop/`` but what ``lstat`` says (owner, size, type).
What it cannot do: free the blocks of a file that its writer still holds open
(unlinking it frees nothing until the descriptor closes, and the daemon may
not truncate a site's file).  That is bounded only by the kernel: put the
spool on its own file system (``sendmail-shim-admin config check`` says whether
it is) and give the site uids a disk quota there (usrquota), as for any
world-writable directory.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time

from sendmail_shim.config import Config
from sendmail_shim.intake.accept import accept_submission
from sendmail_shim.policy.identity import Caller
from sendmail_shim.store.outcome import Verdict
from sendmail_shim.store.state import State
from sendmail_shim.wire import protocol
from sendmail_shim.wire.durable import write_synced

log = logging.getLogger(__name__)
STALE_TMP = 600.0  # a t. file this old belongs to no live front end (it writes at once)
CORRUPT_KEEP = 1 << 16  # bytes of a refused drop file copied into corrupt/ for the operator
CORRUPT_FILES = 200  # copies of refused drop files kept in corrupt/ (oldest trimmed)
CORRUPT_PREFIX = "drop."
FULL = "4.3.1"  # RFC 3463 "mail system full": the intake's verdict on a full spool disk
_sweeping = threading.Lock()


def share(config: Config) -> int:
    """Bytes one uid may keep in ``maildrop/`` (t. files, waiting m. files): two messages."""
    return 2 * (config.message_size_limit + protocol.MAX_HEADER_BYTES)


def _size(st: os.stat_result) -> int:
    return max(st.st_size, st.st_blocks * 512)


def _remove(path: str, name: str, st: os.stat_result, why: str) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.error("cannot remove drop_file=%s uid=%d size=%d reason=%r: %s; remove it by hand",
                  name, st.st_uid, st.st_size, why, exc.strerror)
        return 0
    log.warning("removed drop_file=%s uid=%d size=%d reason=%r", name, st.st_uid, st.st_size,
                why)
    return _size(st)


def sweep(config: Config, now: float | None = None) -> int:
    """Remove what no front end wrote and what passes a uid's share; the bytes freed."""
    maildrop = config.layout.maildrop
    now = time.time() if now is None else now
    freed = 0
    temps: dict[int, list[tuple[float, str, os.stat_result]]] = {}
    with _sweeping:
        for name in os.listdir(maildrop):
            path = os.path.join(maildrop, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue  # pickup deals with directories (never moved, removed when empty)
            if not name.startswith(("m.", "t.")):
                freed += _remove(path, name, st, "not a name the front end writes")
            elif name.startswith("t."):
                if now - st.st_mtime > STALE_TMP:
                    freed += _remove(path, name, st, f"unfinished for over {STALE_TMP:g}s")
                else:
                    temps.setdefault(st.st_uid, []).append((st.st_mtime, name, st))
        limit = share(config)
        for files in temps.values():
            held = sum(_size(st) for _mtime, _name, st in files)
            for _mtime, name, st in sorted(files, key=lambda f: f[:2], reverse=True):
                if held <= limit:
                    break
                held -= _size(st)
                freed += _remove(os.path.join(maildrop, name), name, st,
                                 f"the uid's unfinished drop files pass its share of {limit} "
                                 "bytes")
    return freed


def set_aside(config: Config, name: str, fd: int | None, uid: int, why: str) -> bool:
    """Keep the first CORRUPT_KEEP bytes of a refused drop file in ``corrupt/``, remove it.

    ``fd`` is a descriptor open on the file, if any (else nothing is copied).
    Never raises: the drop file goes even when the copy fails.  False when it
    could not be removed (logged: the operator removes it).
    """
    corrupt = config.layout.state_dir("corrupt")
    src = os.path.join(config.layout.maildrop, name)
    dst = os.path.join(corrupt, CORRUPT_PREFIX + name[:100])
    if os.path.lexists(dst):
        dst += "." + os.urandom(4).hex()
    kept = "nothing kept"
    if fd is not None:
        try:
            head = os.pread(fd, CORRUPT_KEEP, 0)
            out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
            write_synced(out, dst, head)
            kept = f"its first {len(head)} bytes copied to {dst}"
        except OSError as exc:
            kept = f"nothing kept ({exc.strerror})"
    try:
        os.unlink(src)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("corrupt drop_file=%s uid=%d reason=%r action='cannot remove it (%s): "
                  "skipped from now on; remove %s by hand'", name, uid, why, exc.strerror, src)
        return False
    log.error("corrupt drop_file=%s uid=%d reason=%r action='removed, %s; inspect it; "
              "nothing was delivered'", name, uid, why, kept)
    try:
        trim_corrupt(config)
    except OSError as exc:
        log.warning("cannot trim %s: %s", config.layout.state_dir("corrupt"), exc)
    return True


def trim_corrupt(config: Config) -> None:
    """Keep at most CORRUPT_FILES drop-file copies in ``corrupt/``, the newest."""
    corrupt = config.layout.state_dir("corrupt")
    found: list[tuple[float, str]] = []
    for name in os.listdir(corrupt):
        if name.startswith(CORRUPT_PREFIX):
            try:
                found.append((os.lstat(os.path.join(corrupt, name)).st_mtime, name))
            except FileNotFoundError:
                continue
    for _mtime, name in sorted(found)[: max(0, len(found) - CORRUPT_FILES)]:
        try:
            os.unlink(os.path.join(corrupt, name))
        except OSError:
            continue
        log.info("trimmed corrupt/%s: more than %d refused drop files kept", name,
                 CORRUPT_FILES)


def disk_full(verdict: Verdict) -> bool:
    return verdict.code // 100 == 4 and verdict.enhanced == FULL


def accept_relieved(config: Config, state: State, fields: list[tuple[str, str]],
                    message: bytes, caller: Caller, origin: str = "socket") -> Verdict:
    """The intake's verdict; on a full disk, the drop area is swept and it is tried once more."""
    verdict = accept_submission(config, state, fields, message, caller, origin)
    if not disk_full(verdict):
        return verdict
    try:
        freed = sweep(config)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EACCES):
            log.warning("cannot sweep %s: %s", config.layout.maildrop, exc)
        return verdict
    if freed == 0:
        return verdict
    log.warning("spool_full uid=%d origin=%s freed=%d action='swept maildrop/, trying the "
                "submission again'", caller.uid, origin, freed)
    return accept_submission(config, state, fields, message, caller, origin)
