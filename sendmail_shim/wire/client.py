"""The front end's side of the hand-off, once: "request, then reply" and "socket, else drop file".

Trusts: the daemon's reply only as far as the codec can parse it (anything else
is no verdict); nothing about the drop directory but what the kernel enforces.
Guarantees:

* :func:`ask` sends one request and returns the parsed reply, or raises
  :class:`DaemonUnreachable` when no complete, intelligible reply came (no
  daemon, a full listen queue for CONNECT_TRIES tries, REPLY_TIMEOUT, a reply
  lost or cut short).  A send cut short by the daemon (it answered early, e.g.
  ``552`` on the size field, and closed) is not "no reply": the reply it wrote
  is read and is the verdict, so a refusal never sends the message down the
  drop road.  Used for submissions and for flush, mailq and the
  operator's control requests.  :func:`ask_streaming` does the same but hands
  the body on as it arrives (listings: memory does not grow with the queue).
* :func:`hand_off` is the road every submission takes: the daemon's verdict,
  or, when there is none (unreachable, or ``421`` :data:`~protocol.BUSY`), a drop
  file holding the same request.  At least once: a request the daemon may have
  committed before its reply was lost is dropped too; its ``subid`` (the same
  bytes on both roads) makes the daemon queue it once.  Exit 0 only after one
  of the two is durable: :class:`DropRefused` when the drop file could not be
  written either, :class:`DropVetoed` when the caller's check (the front end's
  frontend/precheck.py) says the daemon would refuse it anyway.
* :func:`write_drop_file` leaves a drop file complete (fsynced, renamed from
  ``t.`` to ``m.``) or not at all under an ``m.`` name, mode exactly 0640.

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

Stdlib only, and lazily so: ``_socket`` (``socket`` costs an enum import) and
``time`` are imported when first needed, the drop road's ``os`` and
``durable`` only on that road; this runs on every PHP mail() call.  No
``from __future__ import annotations`` either (it imports ``__future__``):
annotations naming what only mypy imports are quoted.
"""

from sendmail_shim.wire import protocol

TYPE_CHECKING = False  # typing and collections cost milliseconds; mypy reads this name
if TYPE_CHECKING:
    from collections.abc import Callable

# The daemon answers after an fsync; only a stuck daemon or disk takes this long.  Falling
# back to a drop file after it is safe: the subid makes the daemon queue one copy.
REPLY_TIMEOUT = 300.0
CONNECT_TRIES = 300  # 10 ms apart: three seconds of a full listen queue, then the drop file


class DaemonUnreachable(Exception):
    """No verdict came from the daemon; the message may be dropped instead."""

    def __init__(self, text: str, errno: int = 0) -> None:
        super().__init__(text)
        self.errno = errno


class DropRefused(Exception):
    """Neither road took the message: no verdict (``why``) and the drop file failed (``error``)."""

    def __init__(self, why: str, error: OSError) -> None:
        super().__init__(f"{why}; drop file: {error}")
        self.why = why
        self.error = error


class DropVetoed(Exception):
    """No verdict (``why``), and the request would be refused anyway (``problem``): no drop."""

    def __init__(self, why: str, problem: str) -> None:
        super().__init__(f"{problem} (the daemon did not answer: {why})")
        self.why = why
        self.problem = problem


class Reply:
    """What the daemon answered: SMTP code, exit status, text, and the body after the line."""

    __slots__ = ("body", "code", "status", "text")

    def __init__(self, code: int, status: int, text: str, body: str = "") -> None:
        self.code = code
        self.status = status
        self.text = text
        self.body = body

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.status}, {self.text!r})"


class Dropped:
    """The message went into the drop area as ``name`` because of ``why``."""

    __slots__ = ("name", "why")

    def __init__(self, name: str, why: str) -> None:
        self.name = name
        self.why = why

    def __repr__(self) -> str:
        return f"Dropped({self.name!r}, {self.why!r})"


def _exchange(socket_path: str, request: bytes, timeout: float,
              piece: "Callable[[bytes], None]") -> None:
    """Send ``request``, then hand every piece of the reply to ``piece`` until the end.

    Raises :class:`DaemonUnreachable` when the exchange fails.
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
            try:
                sock.sendall(request)
                sock.shutdown(_socket.SHUT_WR)
            except OSError:
                # The daemon may have answered early and closed (a 552 on the size field
                # before the body): its reply is still there to read.  Only when none
                # came is this "no verdict" (the recv below fails or finds nothing).
                pass
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                piece(chunk)
        except OSError as exc:
            raise DaemonUnreachable(f"hand-off to {socket_path} failed: {exc}") from exc
    finally:
        sock.close()


def send_request(socket_path: str, request: bytes, timeout: float = REPLY_TIMEOUT) -> bytes:
    """Send ``request`` to the daemon and return its reply (everything it wrote).

    Raises :class:`DaemonUnreachable` when no complete reply arrives.
    """
    chunks: list[bytes] = []
    _exchange(socket_path, request, timeout, chunks.append)
    reply = b"".join(chunks)
    if not reply.endswith(b"\n"):
        raise DaemonUnreachable(f"the daemon at {socket_path} closed without a verdict")
    return reply


def ask(socket_path: str, request: bytes, timeout: float = REPLY_TIMEOUT) -> Reply:
    """Send ``request``, return the parsed reply; :class:`DaemonUnreachable` if there is none."""
    data = send_request(socket_path, request, timeout)
    try:
        return Reply(*protocol.decode_reply(data))
    except protocol.ProtocolError as exc:
        raise DaemonUnreachable(str(exc)) from None


def ask_streaming(socket_path: str, request: bytes, out: "Callable[[bytes], object]",
                  timeout: float = REPLY_TIMEOUT) -> Reply:
    """Like :func:`ask`, but the body goes to ``out`` piece by piece as it arrives.

    For listings: neither side holds the whole text.  The returned reply has
    an empty body; :class:`DaemonUnreachable` when not even the reply line came.
    """
    head = bytearray()
    line: list[Reply] = []

    def piece(chunk: bytes) -> None:
        if line:
            out(chunk)
            return
        head.extend(chunk)
        end = head.find(b"\n")
        if end < 0:
            return
        try:
            line.append(Reply(*protocol.parse_reply(bytes(head[:end]))))
        except protocol.ProtocolError as exc:
            raise DaemonUnreachable(str(exc)) from None
        if len(head) > end + 1:
            out(bytes(head[end + 1 :]))

    _exchange(socket_path, request, timeout, piece)
    if not line:
        raise DaemonUnreachable(f"the daemon at {socket_path} closed without a verdict")
    return line[0]


def hand_off(socket_path: str, maildrop: str, request: bytes,
             vet: "Callable[[], str | None] | None" = None) -> "Reply | Dropped":
    """The daemon's verdict on ``request``, else a drop file (see the module docstring).

    A ``421`` (:data:`protocol.BUSY`) is never returned: the request is dropped.
    Raises :class:`DropRefused` when there was no verdict and the drop file failed,
    :class:`DropVetoed` when ``vet`` (called only before a drop file) gave a reason.
    """
    try:
        reply = ask(socket_path, request)
    except DaemonUnreachable as exc:
        why = str(exc)
    else:
        if reply.code != protocol.BUSY:
            return reply
        why = reply.text  # this uid has too many connections open
    problem = vet() if vet is not None else None
    if problem is not None:
        raise DropVetoed(why, problem)
    try:
        return Dropped(write_drop_file(maildrop, request), why)
    except OSError as exc:
        raise DropRefused(why, exc) from exc


def _fsync_drop_dir(path: str) -> None:
    import os

    from sendmail_shim.wire.durable import fsync_dir

    try:
        fsync_dir(path)
    except PermissionError:
        # Site users may not read the drop directory (that would let them list
        # names), so they cannot fsync it either: flush the filesystems instead.
        # This is the rare road (the daemon is down); durability wins over speed.
        os.sync()


def write_drop_file(maildrop: str, request: bytes) -> str:
    """Write ``request`` durably into the drop directory; return the final file name."""
    import os  # the drop road only: the socket road never loads it

    from sendmail_shim.wire.durable import write_synced
    from sendmail_shim.wire.paths import MODE_DROP_FILE

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
