"""Pickup: ingesting drop files that the front end wrote while the daemon was down.

Trusts: only what the kernel says about each file (owner uid and gid); the
content is as hostile as a socket request and goes through the same intake.
Guarantees: a file is ingested only if it is a regular file, not a symlink
(O_NOFOLLOW), has exactly one link, carries an ``m.`` name (renamed after its
fsync) and a complete request (size and END trailer agree); it is unlinked only
after the intake committed it or refused it for good.  Damaged files move to
``corrupt/`` for the operator; ``t.`` files older than a day are removed.
"""

from __future__ import annotations

import logging
import os
import stat
import time

from sendmail_shim import handoff
from sendmail_shim.config import Config
from sendmail_shim.identity import Caller
from sendmail_shim.intake import accept_submission
from sendmail_shim.state import State

log = logging.getLogger("sendmail_shim.pickup")
STALE_TMP = 86400.0


def _quarantine(config: Config, name: str, why: str) -> None:
    layout = config.layout
    src = os.path.join(layout.maildrop, name)
    dst = os.path.join(layout.state_dir("corrupt"), "drop." + name)
    log.error("corrupt drop_file=%s reason=%r moved_to=%s", name, why, dst)
    try:
        os.rename(src, dst)
    except OSError:
        os.unlink(src)


def ingest_file(config: Config, state: State, name: str) -> bool:
    """Ingest one ``m.`` file; True when it is gone from the drop directory."""
    path = os.path.join(config.layout.maildrop, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError as exc:
        _quarantine(config, name, f"cannot open: {exc.strerror}")
        return True
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            _quarantine(config, name, f"not a plain file with one link (nlink={st.st_nlink})")
            return True
        cap = handoff.MAX_HEADER_BYTES + config.message_size_limit + 64
        data = fh.read(cap + 1)
    if len(data) > cap:
        _quarantine(config, name, f"larger than message_size_limit ({config.message_size_limit})")
        return True
    try:
        fields, message = handoff.decode_request(data)
    except handoff.ProtocolError as exc:
        _quarantine(config, name, str(exc))
        return True
    caller = Caller(uid=st.st_uid, gid=st.st_gid, pid=None)
    verdict = accept_submission(config, state, fields, message, caller, origin="maildrop")
    if verdict.code // 100 == 4:
        return False  # temporary trouble (spool full): keep the file, try again later
    if not verdict.accepted:
        # The writer was told "accepted" (exit 0) long ago; a refusal now is final.
        log.warning("dropped drop_file=%s uid=%d reason=%r", name, st.st_uid, verdict.text)
    os.unlink(path)
    return True


def scan(config: Config, state: State) -> int:
    """Ingest every finished drop file; the number ingested."""
    maildrop = config.layout.maildrop
    count = 0
    now = time.time()
    for name in sorted(os.listdir(maildrop)):
        if name.startswith("m."):
            count += ingest_file(config, state, name)
        elif name.startswith("t."):
            path = os.path.join(maildrop, name)
            try:
                if now - os.lstat(path).st_mtime > STALE_TMP:
                    os.unlink(path)
                    log.info("removed stale drop_file=%s", name)
            except FileNotFoundError:
                pass
    return count
