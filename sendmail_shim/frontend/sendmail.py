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

Hot path: this module imports only argv, message and wire (client, protocol, paths,
sysexits); a test proves that asyncio, dnspython, yaml, click, aiosmtplib and aiosmtpd stay
out of a plain ``-t -i`` submission.
"""

from __future__ import annotations

import errno
import os
import sys

from sendmail_shim.frontend.argv import UsageError, parse_argv
from sendmail_shim.frontend.message import MessageTooBig, read_message
from sendmail_shim.wire import sysexits
from sendmail_shim.wire.client import (
    DaemonUnreachable,
    Dropped,
    DropRefused,
    DropVetoed,
    ask_streaming,
    hand_off,
)
from sendmail_shim.wire.lineends import LineEndError
from sendmail_shim.wire.paths import (
    SettingsError,
    SpoolLayout,
    find_config,
    frontend_spool_and_limit,
)
from sendmail_shim.wire.protocol import FLUSH, MAILQ, MODE, encode_request, submission_fields

TYPE_CHECKING = False
if TYPE_CHECKING:
    from sendmail_shim.frontend.argv import Invocation

PROG = "sendmail-shim"


def _fail(status: int, text: str) -> int:
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()
    return status


def _submission_fields(inv: Invocation) -> list[tuple[str, str]]:
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    return submission_fields(
        inv.recipients, sender=inv.sender, extract=inv.extract, site=inv.site,
        fullname=inv.fullname, notify=inv.notify, ret=inv.ret, envid=inv.envid,
        body=inv.body_type, cwd=cwd, ignored=inv.ignored)


def submit_message(inv: Invocation, layout: SpoolLayout, limit: int) -> int:
    """Read the message and hand it off; the exit status of the mail mode."""
    if not inv.recipients and not inv.extract:
        return _fail(
            sysexits.EX_USAGE,
            "fatal: Recipient addresses must be specified on the command line "
            "or via the -t option",
        )
    try:
        message = read_message(sys.stdin.buffer, inv.ignore_dots, limit)
    except MessageTooBig as exc:
        return _fail(
            sysexits.EX_DATAERR,
            f"fatal: message rejected: {exc}; nothing was queued. Send a smaller "
            "message or ask the operator to raise message_size_limit.",
        )
    except LineEndError as exc:
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
    except DropRefused as exc:
        return _drop_refused(layout, exc)
    except DropVetoed as exc:
        return _fail(
            sysexits.EX_DATAERR,
            f"fatal: message rejected: {exc.problem}; nothing was queued (the daemon is not "
            f"answering: {exc.why}). Correct the message and send it again.",
        )
    if isinstance(result, Dropped):
        return sysexits.EX_OK
    if result.code >= 400 or result.status != 0:
        return _fail(result.status or sysexits.EX_SOFTWARE, result.text)
    return sysexits.EX_OK


def _drop_refused(layout: SpoolLayout, refused: DropRefused) -> int:
    """Neither the daemon nor the drop directory took the message: say why, exit 75."""
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


def run(argv: list[str]) -> int:
    if argv[1:] in (["--help"], ["--version"]):
        from sendmail_shim import __version__
        from sendmail_shim.frontend.argv import usage_text

        sys.stdout.write(usage_text() if argv[1] == "--help" else f"{PROG} {__version__}\n")
        return sysexits.EX_OK
    try:
        inv = parse_argv(argv)
    except UsageError as exc:
        return _fail(sysexits.EX_USAGE, f"fatal: usage: {exc}")
    if inv.mode == "newaliases":
        return sysexits.EX_OK  # we keep no alias database: nothing to rebuild
    try:
        spool, limit = frontend_spool_and_limit(find_config())
    except SettingsError as exc:
        return _fail(sysexits.EX_CONFIG, f"fatal: {exc}")
    layout = SpoolLayout(spool)
    if inv.mode == "mail":
        return submit_message(inv, layout, limit)
    if inv.mode == "mailq":
        return _control(layout, MAILQ)
    if inv.mode == "flush":
        return _control(layout, FLUSH)
    if inv.mode == "smtp":
        from sendmail_shim.frontend.bs import serve_stdio  # only -bs pays for aiosmtpd

        status: int = serve_stdio(inv, layout, limit)
        return status
    return _fail(sysexits.EX_SOFTWARE, f"internal error: unknown mode {inv.mode}")


def main() -> None:
    sys.exit(run(sys.argv))


if __name__ == "__main__":
    main()
