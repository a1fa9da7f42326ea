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

The command line (:func:`parse_argv`): argv may carry words appended by PHP's
mail() 5th argument (CVE-2016-10033 used ``-X/path`` to write a log into the
web root).  Every flag is in :data:`FLAGS` as accepted, ignored or refused; an
ignored flag never opens, reads or writes anything; an unknown flag or a
refused mode is a usage error (EX_USAGE) with a message naming it.  Parsing
follows Postfix's sendmail: POSIX getopt without permutation (the first word
that is not an option ends the options, as does ``--``); flags may be grouped
(``-ti``); an argument may be attached or separate (``-fX``, ``-f X``); ``-o``
takes the rest of its word (``-oem``, ``-oi``); repeats are allowed and the
last value wins.

Reading the message (:func:`read_message`), as Postfix's sendmail does: the
result follows the line-ending rule of wire/lineends.py (LF line ends, no CR;
a CR or NUL inside the header block raises
:class:`~sendmail_shim.wire.lineends.LineEndError`, exit 65, before anything
is handed off or dropped), ends with a newline when not empty, has no leading
mbox ``From `` line, and is at most ``limit`` bytes, or :class:`MessageTooBig`
is raised.  Without ``-i`` a line holding a lone ``.`` ends the message and
the rest of stdin is read and discarded, so the writer never sees EPIPE.
Leading dots are never removed: Postfix keeps doubled dots too.

Why the flag table, the parser, the reading of stdin and the hand-off are one
module: each module on the hot path costs about 0.1 ms to find, read and run,
and PHP pays it on every mail().  Hot path: a plain ``-t -i`` submission loads
this module and wire's lineends, protocol, paths and client, and the C module ``_socket``:
nothing else (tests/test_hotpath.py holds the allowlist).  Not ``os`` (a
millisecond of ``collections.abc``, ``stat`` and ``posixpath``: the builtin
``posix`` does), not ``__future__`` (annotations naming what only mypy imports
are quoted), not ``errno`` or ``sysexits`` (only a failure needs them: imported
there); ``-bs``, ``-bp``, ``-q``, ``--help``, the drop road and its checks are
imported when used.  docs/performance.md has the profile.
"""

import posix
import sys

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

EX_OK = 0  # wire/sysexits.py's; the rest are imported where a failure needs them
PROG = "sendmail-shim"
CHUNK = 1 << 16

# Flag -> (takes an argument, what we do with it).  "accepted" flags change
# what happens; "ignored" flags are read and dropped without side effects.
FLAGS: dict[str, tuple[bool, str]] = {
    "A": (True, "ignored: Sendmail's -Ac/-Am config choice"),
    "B": (True, "accepted: body type (7BIT, 8BITMIME), recorded"),
    "C": (True, "ignored: alternate configuration file; never opened"),
    "F": (True, "accepted: sender's full name for an added From: header"),
    "G": (False, "ignored: gateway submission"),
    "I": (False, "accepted: same as -bi (newaliases): nothing to do"),
    "L": (True, "ignored: syslog label"),
    "N": (True, "accepted: DSN notify (never, or failure,delay,success); never = no bounce"),
    "O": (True, "ignored: Sendmail option=value (e.g. QueueDirectory); nothing is set"),
    "R": (True, "accepted: DSN return (hdrs, full), recorded"),
    "U": (False, "ignored: initial user submission"),
    "V": (True, "accepted: DSN envelope id, recorded"),
    "X": (True, "ignored: traffic log file; never opened"),
    "b": (True, "accepted: mode, see the modes below"),
    "c": (False, "ignored: hold expensive connections"),
    "d": (True, "ignored: debug"),
    "e": (True, "ignored: error reporting mode"),
    "f": (True, "accepted: envelope sender; <> for the null sender"),
    "h": (True, "ignored: hop count"),
    "i": (False, "accepted: a line with a lone dot does not end the message"),
    "m": (False, "ignored: send to me too"),
    "n": (False, "ignored: no aliasing"),
    "o": (True, "accepted: -oi as -i; every other -o option ignored"),
    "p": (True, "ignored: protocol name"),
    "q": (True, "accepted: run the queue now (-q, -q<interval>, -qR<site>, -qS<site>)"),
    "r": (True, "accepted: same as -f"),
    "t": (False, "accepted: recipients from To/Cc/Bcc (Resent-* when present); Bcc removed"),
    "v": (False, "ignored: verbose"),
    "x": (False, "ignored: trace"),
}
# -q's argument is optional: a bare -q takes none.
OPTIONAL_ARGUMENT = frozenset("q")

MODES: dict[str, str] = {
    "m": "mail",  # the default: read a message from stdin
    "i": "newaliases",  # nothing to do: we keep no alias database
    "p": "mailq",  # list the queue
    "s": "smtp",  # SMTP dialogue on stdin/stdout
}
REFUSED_MODES: dict[str, str] = {
    "d": "-bd (run as a daemon): start the daemon with 'sendmail-shim-admin serve'",
    "D": "-bD (daemon in foreground): start the daemon with 'sendmail-shim-admin serve'",
    "h": "-bh (host status): there is no host status database",
    "H": "-bH (purge host status): there is no host status database",
    "l": "-bl (listen): start the daemon with 'sendmail-shim-admin serve'",
    "v": "-bv (verify addresses) is not supported",
    "a": "-ba (ARPANET mode) is not supported",
    "t": "-bt (address test mode) is not supported",
}


class UsageError(Exception):
    """A command line we do not accept; exit EX_USAGE."""


class Invocation:
    """What the command line asks for."""

    __slots__ = (
        "body_type",
        "envid",
        "extract",
        "fullname",
        "ignore_dots",
        "ignored",
        "mode",
        "notify",
        "recipients",
        "ret",
        "sender",
        "site",
    )

    def __init__(self) -> None:
        self.mode = "mail"
        self.sender: str | None = None
        self.fullname: str | None = None
        self.extract = False
        self.ignore_dots = False
        self.recipients: list[str] = []
        self.notify: str | None = None
        self.ret: str | None = None
        self.envid: str | None = None
        self.body_type: str | None = None
        self.ignored: list[str] = []
        self.site: str | None = None


def usage_text() -> str:
    """``sendmail-shim --help``: generated from the flag table, so it cannot drift."""
    lines = [
        "usage: sendmail-shim [flags] [--] [recipient ...]   (also: mailq, newaliases)",
        "",
        "Reads a message on stdin and queues it for the sendmail-shim daemon, which sends",
        "it through the relay under your site's login.  Exit 0 means durably queued.",
        "",
        "flags (the Postfix/Sendmail command line; '-X arg' takes an argument):",
    ]
    for flag, (takes_arg, what) in FLAGS.items():
        name = f"-{flag} arg" if takes_arg else f"-{flag}"
        lines.append(f"  {name:<8} {what}")
    lines.append("  --site S  accepted: which of your own sites sends (a hint; the uid decides)")
    lines += ["", "modes for -b:"]
    lines += [f"  -b{letter}      {mode}" for letter, mode in MODES.items()]
    lines += [f"  -b{letter}      refused: {why}" for letter, why in REFUSED_MODES.items()]
    lines += ["", "exit status: 0 queued; 64 usage; 65 bad message; 75 try again later;",
              "77 not permitted (site refused); 78 configuration error.",
              "configuration: $SENDMAIL_SHIM_CONFIG, /etc/sendmail-shim/config.yaml, or the",
              "per-user file; see sendmail-shim(8)."]
    return "\n".join(lines) + "\n"


# Flags whose value is kept as given, by the Invocation attribute it sets.
_VALUE_FLAGS = {"f": "sender", "r": "sender", "F": "fullname", "N": "notify", "R": "ret",
                "V": "envid", "B": "body_type"}


def _apply(inv: Invocation, flag: str, value: str | None) -> None:
    if flag in _VALUE_FLAGS:
        setattr(inv, _VALUE_FLAGS[flag], value)
    elif flag == "t":
        inv.extract = True
    elif flag == "i":
        inv.ignore_dots = True
    elif flag == "o":
        if value == "i":
            inv.ignore_dots = True
        else:
            inv.ignored.append("-o" + (value or ""))
    elif flag == "b":
        if not value:
            raise UsageError("-b needs a mode letter (for example -bs or -bp)")
        if value[0] in REFUSED_MODES:
            raise UsageError(REFUSED_MODES[value[0]])
        if value[0] not in MODES:
            raise UsageError(f"-b{value}: unsupported mode")
        inv.mode = MODES[value[0]]
    elif flag == "I":
        inv.mode = "newaliases"
    elif flag == "q":
        inv.mode = "flush"
    else:
        inv.ignored.append("-" + flag + (value or ""))


def parse_argv(argv: list[str]) -> Invocation:
    """Parse ``argv`` (argv[0] included) into an :class:`Invocation`."""
    inv = Invocation()
    prog = argv[0].rsplit("/", 1)[-1] if argv else "sendmail"
    if prog == "mailq":
        inv.mode = "mailq"
    elif prog == "newaliases":
        inv.mode = "newaliases"
    words = argv[1:]
    index = 0
    while index < len(words):
        word = words[index]
        if word == "--":
            index += 1
            break
        if word == "--site" or word.startswith("--site="):
            # Operator's hint (PHP-FPM pool): chooses among the caller's own sites only.
            if word == "--site":
                if index + 1 >= len(words):
                    raise UsageError("option requires an argument -- 'site'")
                index += 1
                inv.site = words[index]
            else:
                inv.site = word.split("=", 1)[1]
            index += 1
            continue
        if len(word) < 2 or word[0] != "-":
            break
        pos = 1
        while pos < len(word):
            flag = word[pos]
            spec = FLAGS.get(flag)
            if spec is None:
                raise UsageError(f"invalid option -- '{flag}'")
            takes_arg, _what = spec
            pos += 1
            if not takes_arg:
                _apply(inv, flag, None)
                continue
            if pos < len(word):
                value: str | None = word[pos:]
            elif flag in OPTIONAL_ARGUMENT:
                value = None
            elif index + 1 < len(words):
                index += 1
                value = words[index]
            else:
                raise UsageError(f"option requires an argument -- '{flag}'")
            _apply(inv, flag, value)
            break
        index += 1
    inv.recipients = words[index:]
    return inv


# -- reading the message --------------------------------------------------------------


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


def _submission_fields(inv: Invocation) -> list[tuple[str, str]]:
    try:
        cwd: str | None = posix.getcwd()
    except OSError:
        cwd = None
    return submission_fields(
        inv.recipients, sender=inv.sender, extract=inv.extract, site=inv.site,
        fullname=inv.fullname, notify=inv.notify, ret=inv.ret, envid=inv.envid,
        body=inv.body_type, cwd=cwd, ignored=inv.ignored)


def submit_message(inv: Invocation, layout: SpoolLayout, limit: int) -> int:
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


def _other_mode(inv: Invocation, layout: SpoolLayout, limit: int) -> int:
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
