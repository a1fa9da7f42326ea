"""Hand-off from the front end to the daemon: wire format, socket client, drop file.

One byte format serves both roads a message can take:

* the daemon's Unix socket ``<spool>/public/submit.sock``; the daemon learns the
  caller's uid/gid/pid from the kernel (SO_PEERCRED) and answers one line
  only after the message is durable in its spool;
* when the daemon is unreachable, a drop file in ``<spool>/maildrop/``,
  whose owner (set by the kernel) is the identity, ingested by ``pickup.py``.

Wire format (request, and the whole content of a drop file)::

    SMSHIM1\\n
    <key> <value>\\n          repeated; value escaped: % CR LF NUL as %25 %0D %0A %00
    \\n
    <exactly `size` bytes of message>
    END\\n

Keys: ``mode`` (submit, flush, mailq), ``subid`` (32 random hex digits, the
same on both roads: the daemon queues one submission once), ``size``, ``sender`` (absent: not given;
empty: the null sender), ``rcpt`` (repeated, one argv word each; a word may be
an address list), ``extract``, ``fullname``, ``notify``, ``ret``, ``envid``,
``body``, ``cwd``, ``ignored`` (flags dropped, for the log).  Everything here is
a hint from the caller except what the kernel says; the daemon validates all.

Reply: one line ``<smtp-code> <exit-status> <text>\\n``.  ``421`` (:data:`BUSY`)
means the daemon refused the connection before reading it (too many open
connections from this uid, or no request within seconds): the front end
writes a drop file instead.

Why the drop area is safe between site users (see paths.MODE_MAILDROP_DIR):
the directory is setgid to the daemon's group, sticky, and writable but not
readable by others.  A site user creates a file with O_EXCL|O_NOFOLLOW under a
random name, so the kernel makes that user its owner and (setgid) the daemon's
group its group, and :func:`write_drop_file` sets its mode to exactly 0640.  A
user cannot create a file owned by another user, cannot open another user's
drop file (0640, group = daemon's group), cannot rename or unlink it (sticky),
and cannot list names (no read bit).  The file is written under a ``t.``
name, fsynced, then renamed to ``m.``: pickup reads only ``m.`` files and also
requires the ``END`` trailer, so a killed writer leaves nothing deliverable.

Why a drop file's owner is its sender, although everyone may write into the
directory: a site can put there a hard link to any file of another site that
it may read and write (fs.protected_hardlinks allows exactly those; shared
hosting is full of 0666 cache files), write a request into it, and remove the
original name from a world-writable directory so that the link count is 1
again.  The owner of such a file is the victim.  So pickup (``pickup.unproven``)
takes the owner as identity only for a file that could not have been lent: a
regular file with one link, whose group is the drop directory's group and
whose mode is exactly 0640.  Only the owner (or root) can chmod or chgrp a
file, a site user can chgrp only to groups it belongs to (site users must not
be members of the daemon's group), and with no write bit for group and others
nobody but the owner could have written the content (with POSIX ACLs the group
bits are the mask, so 0640 also caps every named ACL entry at read).  A file
that carries the daemon's group was created in ``maildrop/`` by its owner, and
the front end never lets such a file be writable by others (created 0640 minus
the umask, then fchmod 0640), so no one can hold a write descriptor to it
from an earlier, laxer mode.  The lent 0666 cache file has the victim's group
and write bits for others: it is moved to ``corrupt/``, logged with its owner.
A site that links in a file of its own only speaks as itself.

Per-uid drop directories would prove the same, but the daemon runs as its own
user and cannot create directories owned by site users; root would have to
keep one per uid in step with the configuration.  One directory and the
group/mode test give the same guarantee.  fs.protected_hardlinks=1 (Debian's
default) is defence in depth only: it stops links to files a site cannot read
and write, which the test above refuses anyway; ``sendmail-shim-admin config
check`` warns when it is off.  A link to another site's drop file would have
two links and be refused too (and its name is 64 random bits in a directory
nobody but the daemon may list).

Stdlib-free apart from ``os`` and ``_socket`` (``socket`` imports enum):
this runs on every PHP mail() call.
"""

from __future__ import annotations

import os

from sendmail_shim.wire.durable import fsync_dir, write_synced
from sendmail_shim.wire.paths import MODE_DROP_FILE

MAGIC = b"SMSHIM1\n"
TRAILER = b"END\n"
MAX_HEADER_BYTES = 1 << 20  # a million bytes of envelope is plenty: 10,000 recipients
# The daemon answers after an fsync; only a stuck daemon or disk takes this long.  Falling
# back to a drop file after it is safe: the subid makes the daemon queue one copy.
REPLY_TIMEOUT = 300.0
CONNECT_TRIES = 300  # 10 ms apart: three seconds of a full listen queue, then the drop file
BUSY = 421  # reply code: too many connections from this uid; nothing was read


class DaemonUnreachable(Exception):
    """No verdict came from the daemon; the message may be dropped instead."""

    def __init__(self, text: str, errno: int = 0) -> None:
        super().__init__(text)
        self.errno = errno


class ProtocolError(Exception):
    """A request that does not follow the wire format."""


def _escape(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if b"%" in raw or b"\n" in raw or b"\r" in raw or b"\0" in raw:
        raw = (
            raw.replace(b"%", b"%25")
            .replace(b"\r", b"%0D")
            .replace(b"\n", b"%0A")
            .replace(b"\0", b"%00")
        )
    return raw


def _unescape(raw: bytes) -> str:
    if b"%" in raw:
        raw = (
            raw.replace(b"%0D", b"\r")
            .replace(b"%0A", b"\n")
            .replace(b"%00", b"\0")
            .replace(b"%25", b"%")
        )
    return raw.decode("utf-8", "surrogateescape")


def encode_request(fields: list[tuple[str, str]], message: bytes) -> bytes:
    """The request bytes: ``fields`` (without size) and the message."""
    parts = [MAGIC]
    for key, value in fields:
        parts.append(key.encode("ascii") + b" " + _escape(value) + b"\n")
    parts.append(b"size " + str(len(message)).encode("ascii") + b"\n\n")
    parts.append(message)
    parts.append(TRAILER)
    return b"".join(parts)


def decode_header(header: bytes) -> list[tuple[str, str]]:
    """Fields of a request header (everything between MAGIC and the blank line)."""
    fields: list[tuple[str, str]] = []
    for line in header.split(b"\n"):
        if not line:
            continue
        key, sep, value = line.partition(b" ")
        if not sep or not key.isalpha():
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        fields.append((key.decode("ascii"), _unescape(value)))
    return fields


def decode_request(data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Fields and message of a whole request, as read from a drop file."""
    if not data.startswith(MAGIC):
        raise ProtocolError("does not start with SMSHIM1")
    end = data.find(b"\n\n", len(MAGIC) - 1)
    if end < 0 or end > MAX_HEADER_BYTES:
        raise ProtocolError("header has no end")
    fields = decode_header(data[len(MAGIC) : end + 1])
    size = request_size(fields)
    body_start = end + 2
    if len(data) != body_start + size + len(TRAILER) or not data.endswith(TRAILER):
        raise ProtocolError("truncated or oversized: size and END trailer do not agree")
    return fields, data[body_start : body_start + size]


def request_size(fields: list[tuple[str, str]]) -> int:
    for key, value in fields:
        if key == "size":
            if not value.isdigit():
                raise ProtocolError(f"bad size {value!r}")
            return int(value)
    raise ProtocolError("no size field")


def parse_reply(line: bytes) -> tuple[int, int, str]:
    """``(smtp code, exit status, text)`` of a daemon reply line."""
    parts = line.rstrip(b"\r\n").decode("utf-8", "replace").split(" ", 2)
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise DaemonUnreachable(f"unintelligible reply {line[:80]!r}")
    return int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""


def format_reply(code: int, status: int, text: str) -> bytes:
    return f"{code} {status} {text}".replace("\n", " ").encode("utf-8", "replace") + b"\n"


def send_request(socket_path: str, request: bytes, timeout: float = REPLY_TIMEOUT) -> bytes:
    """Send ``request`` to the daemon and return its reply (everything it wrote).

    Raises :class:`DaemonUnreachable` when no complete reply arrives.
    """
    import _socket  # the C module: ``socket`` costs an enum import on the hot path

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        for attempt in range(CONNECT_TRIES):
            try:
                sock.connect(socket_path)
                break
            except BlockingIOError as exc:
                # The listen queue is full for a moment (EAGAIN): wait a little, not forever.
                if attempt + 1 == CONNECT_TRIES:
                    raise DaemonUnreachable(f"cannot connect to {socket_path}: its listen "
                                            "queue stayed full", exc.errno or 0) from exc
                import time

                time.sleep(0.01)
            except OSError as exc:
                raise DaemonUnreachable(f"cannot connect to {socket_path}: {exc.strerror}",
                                        exc.errno or 0) from exc
        try:
            sock.sendall(request)
            sock.shutdown(_socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError as exc:
            raise DaemonUnreachable(f"hand-off to {socket_path} failed: {exc}") from exc
    finally:
        sock.close()
    reply = b"".join(chunks)
    if not reply.endswith(b"\n"):
        raise DaemonUnreachable(f"the daemon at {socket_path} closed without a verdict")
    return reply


def _fsync_drop_dir(path: str) -> None:
    try:
        fsync_dir(path)
    except PermissionError:
        # Site users may not read the drop directory (that would let them list
        # names), so they cannot fsync it either: flush the filesystems instead.
        # This is the rare road (the daemon is down); durability wins over speed.
        os.sync()


def write_drop_file(maildrop: str, request: bytes) -> str:
    """Write ``request`` durably into the drop directory; return the final file name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _attempt in range(10):
        token = os.urandom(8).hex()
        tmp = os.path.join(maildrop, f"t.{token}")
        try:
            fd = os.open(tmp, flags, MODE_DROP_FILE)
        except FileExistsError:
            continue
        break
    else:
        raise OSError(f"cannot create a unique file in {maildrop}")
    os.fchmod(fd, MODE_DROP_FILE)  # a umask of 077 must not hide the file from the daemon
    write_synced(fd, tmp, request)
    final = f"m.{os.getpid()}.{token}"
    os.rename(tmp, os.path.join(maildrop, final))
    _fsync_drop_dir(maildrop)
    return final
