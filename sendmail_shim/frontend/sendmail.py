"""The ``sendmail`` front end: /usr/sbin/sendmail, PHP's sendmail_path, mailq, newaliases.

Trusts: nothing it is given.  It runs as the calling site's uid, so it is only
a friendly interface: identity, policy and limits are enforced by the daemon,
which learns the uid from the kernel.  (Postfix says the same of its sendmail:
access control is enforced in postdrop; this merely produces a friendlier
interface.)
Guarantees: exit 0 only once the message is durable, either in the daemon's
spool (the daemon said so) or in a drop file the daemon will ingest (before a
drop file, frontend/precheck.py refuses with 65 what the daemon would refuse
whatever its policy: bad addresses, no recipient, a bad -V); nothing on
stdout in mail mode and nothing on stderr on success; a sysexits code and one
line on stderr naming what to do otherwise.

Reading the message (:func:`read_message`), as Postfix's sendmail does: the
result follows the line-ending rule of wire/lineends.py (LF line ends, no CR;
a CR or NUL inside the header block raises
:class:`~sendmail_shim.wire.lineends.LineEndError`, exit 65, before anything
is handed off or dropped), ends with a newline when not empty, has no leading
mbox ``From `` line, and is at most ``limit`` bytes, or :class:`MessageTooBig`
is raised.  Without ``-i`` a line holding a lone ``.`` ends the message and
the rest of stdin is read and discarded, so the writer never sees EPIPE.
Leading dots are never removed: Postfix keeps doubled dots too.

Hot path: a plain ``-t -i`` submission loads this module, argv and
wire's lineends, protocol, paths and client, and the C module ``_socket``:
nothing else (tests/test_hotpath.py holds the allowlist).  Not ``os`` (a
millisecond of ``collections.abc``, ``stat`` and ``posixpath``: the builtin
``posix`` does), not ``__future__`` (annotations naming what only mypy imports
are quoted), not ``errno`` or ``sysexits`` (only a failure needs them: imported
there); ``-bs``, ``-bp``, ``-q``, ``--help``, the drop road and its checks are
imported when used.  docs/performance.md has the profile.
"""

import posix
import sys

from sendmail_shim.frontend.argv import UsageError, parse_argv
from sendmail_shim.wire.client import Dropped, DropRefused, DropVetoed, hand_off
from sendmail_shim.wire.lineends import LineEndError, normalize
from sendmail_shim.wire.paths import (
    SettingsError,
    SpoolLayout,
    find_config,
    frontend_spool_and_limit,
)
from sendmail_shim.wire.protocol import encode_request, submission_fields

TYPE_CHECKING = False  # typing costs milliseconds to import; mypy reads this name
if TYPE_CHECKING:
    from typing import BinaryIO

    from sendmail_shim.frontend.argv import Invocation

EX_OK = 0  # wire/sysexits.py's; the rest are imported where a failure needs them
PROG = "sendmail-shim"
CHUNK = 1 << 16


class MessageTooBig(Exception):
    """The message exceeds the size limit; exit EX_DATAERR."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"message is larger than the limit of {limit} bytes")
        self.limit = limit


def _lone_dot_end(data: bytes | bytearray, start: int) -> int:
    """Offset where a lone-dot line starts at or after ``start``, or -1."""
    if start == 0 and data.startswith((b".\n", b".\r\n")):
        return 0
    found = -1
    for marker in (b"\n.\n", b"\n.\r\n"):
        at = data.find(marker, start)
        if at >= 0 and (found < 0 or at + 1 < found):
            found = at + 1
    return found


def _drain(stream: "BinaryIO") -> None:
    while stream.read(CHUNK):
        pass


def read_message(stream: "BinaryIO", ignore_dots: bool, limit: int) -> bytes:
    """Read one message from ``stream`` (see the module docstring)."""
    buf = bytearray()
    # CRLF input is up to twice the size of what we keep; beyond that it cannot fit.
    raw_cap = 2 * limit + 2
    scan_from = 0
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            break
        buf += chunk
        if not ignore_dots:
            end = _lone_dot_end(buf, scan_from)
            if end >= 0:
                del buf[end:]
                _drain(stream)
                break
            # Next time look again only where a marker could span the chunk seam.
            scan_from = max(0, len(buf) - 3)
        if len(buf) > raw_cap:
            raise MessageTooBig(limit)
    data = normalize(bytes(buf))
    if data.startswith(b"From "):
        newline = data.find(b"\n")
        data = b"" if newline < 0 else data[newline + 1 :]
    if data and not data.endswith(b"\n"):
        data += b"\n"
    if len(data) > limit:
        raise MessageTooBig(limit)
    return data


def _fail(status: int, text: str) -> int:
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()
    return status


def _submission_fields(inv: "Invocation") -> list[tuple[str, str]]:
    try:
        cwd: str | None = posix.getcwd()
    except OSError:
        cwd = None
    return submission_fields(
        inv.recipients, sender=inv.sender, extract=inv.extract, site=inv.site,
        fullname=inv.fullname, notify=inv.notify, ret=inv.ret, envid=inv.envid,
        body=inv.body_type, cwd=cwd, ignored=inv.ignored)


def submit_message(inv: "Invocation", layout: SpoolLayout, limit: int) -> int:
    """Read the message and hand it off; the exit status of the mail mode."""
    if not inv.recipients and not inv.extract:
        from sendmail_shim.wire import sysexits

        return _fail(
            sysexits.EX_USAGE,
            "fatal: Recipient addresses must be specified on the command line "
            "or via the -t option",
        )
    try:
        message = read_message(sys.stdin.buffer, inv.ignore_dots, limit)
    except (MessageTooBig, LineEndError) as exc:
        from sendmail_shim.wire import sysexits

        if isinstance(exc, MessageTooBig):
            return _fail(
                sysexits.EX_DATAERR,
                f"fatal: message rejected: {exc}; nothing was queued. Send a smaller "
                "message or ask the operator to raise message_size_limit.",
            )
        return _fail(sysexits.EX_DATAERR,
                     f"fatal: message rejected: {exc}; nothing was queued. Fix how the "
                     "script builds its headers (a CR from a form field in a header?).")
    request = encode_request(_submission_fields(inv), message)

    def vet() -> str | None:
        """Before a drop file: what the daemon would refuse whatever its policy."""
        from sendmail_shim.frontend.precheck import problem  # the drop road only

        return problem(inv, message)

    try:
        result = hand_off(layout.socket, layout.maildrop, request, vet)
    except (DropRefused, DropVetoed) as exc:
        from sendmail_shim.wire import sysexits

        if isinstance(exc, DropRefused):
            return _drop_refused(layout, exc)
        return _fail(
            sysexits.EX_DATAERR,
            f"fatal: message rejected: {exc.problem}; nothing was queued (the daemon is not "
            f"answering: {exc.why}). Correct the message and send it again.",
        )
    if isinstance(result, Dropped):
        return EX_OK
    if result.code >= 400 or result.status != 0:
        from sendmail_shim.wire import sysexits

        return _fail(result.status or sysexits.EX_SOFTWARE, result.text)
    return EX_OK


def _drop_refused(layout: SpoolLayout, refused: DropRefused) -> int:
    """Neither the daemon nor the drop directory took the message: say why, exit 75."""
    import errno

    from sendmail_shim.wire import sysexits

    why, exc = refused.why, refused.error
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _fail(
            sysexits.EX_TEMPFAIL,
            f"fatal: message not queued: no space left on the disk holding "
            f"{layout.maildrop} ({exc.strerror}); the daemon did not take it either "
            f"({why}). Nothing was accepted; try again later, and ask the operator "
            "to free space on the spool's disk.",
        )
    return _fail(
        sysexits.EX_TEMPFAIL,
        f"fatal: message not queued: the daemon is unreachable ({why}) and the "
        f"drop directory {layout.maildrop} refused the message ({exc}). "
        "Nothing was accepted; try again, and ask the operator to start "
        "sendmail-shim (sendmail-shim-admin serve).",
    )


def _control(layout: SpoolLayout, mode: str) -> int:
    """mailq and flush: ask the daemon, print what it says as it comes (a listing is long)."""
    from sendmail_shim.wire import sysexits
    from sendmail_shim.wire.client import DaemonUnreachable, ask_streaming
    from sendmail_shim.wire.protocol import MODE

    try:
        reply = ask_streaming(layout.socket, encode_request([(MODE, mode)], b""),
                              sys.stdout.buffer.write)
    except DaemonUnreachable as why:
        return _fail(
            sysexits.EX_TEMPFAIL,
            f"the daemon is not answering ({why}); start it with "
            "'sendmail-shim-admin serve', or as root run 'sendmail-shim-admin queue list'",
        )
    sys.stdout.flush()
    if reply.code >= 400:
        return _fail(reply.status or sysexits.EX_SOFTWARE, reply.text)
    return sysexits.EX_OK


def _other_mode(inv: "Invocation", layout: SpoolLayout, limit: int) -> int:
    """Every mode but mail: mailq, flush (-q) and -bs; none is on mail()'s path."""
    from sendmail_shim.wire import sysexits
    from sendmail_shim.wire.protocol import FLUSH, MAILQ

    if inv.mode == "mailq":
        return _control(layout, MAILQ)
    if inv.mode == "flush":
        return _control(layout, FLUSH)
    if inv.mode == "smtp":
        from sendmail_shim.frontend.bs import serve_stdio  # only -bs pays for aiosmtpd

        status: int = serve_stdio(inv, layout, limit)
        return status
    return _fail(sysexits.EX_SOFTWARE, f"internal error: unknown mode {inv.mode}")


def run(argv: list[str]) -> int:
    if argv[1:] in (["--help"], ["--version"]):
        from sendmail_shim import __version__
        from sendmail_shim.frontend.argv import usage_text

        sys.stdout.write(usage_text() if argv[1] == "--help" else f"{PROG} {__version__}\n")
        return EX_OK
    try:
        inv = parse_argv(argv)
    except UsageError as exc:
        from sendmail_shim.wire import sysexits

        return _fail(sysexits.EX_USAGE, f"fatal: usage: {exc}")
    if inv.mode == "newaliases":
        return EX_OK  # we keep no alias database: nothing to rebuild
    try:
        spool, limit = frontend_spool_and_limit(find_config())
    except SettingsError as exc:
        from sendmail_shim.wire import sysexits

        return _fail(sysexits.EX_CONFIG, f"fatal: {exc}")
    layout = SpoolLayout(spool)
    if inv.mode == "mail":
        return submit_message(inv, layout, limit)
    return _other_mode(inv, layout, limit)


def main() -> None:
    sys.exit(run(sys.argv))


if __name__ == "__main__":
    main()
