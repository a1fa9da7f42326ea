"""The hand-off codec: the only place the wire format is encoded or decoded.

Trusts: nothing it decodes.  Every decoder here raises :class:`ProtocolError`
(naming what is wrong) on input that does not follow the format; nothing here
reads a socket or a file (the daemon reads, ``client.py`` sends).
Guarantees: what :func:`encode_request` writes, :func:`decode_request` and the
daemon's part-by-part reading (:func:`check_greeting`, :func:`decode_header`,
:func:`body_size`, :func:`check_trailer`) give back exactly, for any field
value (escaped) and any message bytes; a reply line made by
:func:`format_reply` is parsed back by :func:`parse_reply`.

One byte format serves both roads a message can take (``client.py``): the
daemon's Unix socket ``<spool>/public/submit.sock`` and, when the daemon is
unreachable, a drop file in ``<spool>/maildrop/`` (its whole content).

Wire format::

    SMSHIM1\\n
    <key> <value>\\n          repeated; value escaped: % CR LF NUL as %25 %0D %0A %00
    \\n
    <exactly `size` bytes of message>
    END\\n

Keys (the constants below; the front ends write them, intake and the daemon
read them): ``mode`` (submit, flush, mailq, control), ``subid`` (32 random hex
digits, the same on both roads: the daemon queues one submission once),
``size``, ``sender`` (absent: not given; empty: the null sender), ``rcpt``
(repeated, one argv word each; a word may be an address list), ``extract``,
``fullname``, ``notify``, ``ret``, ``envid``, ``body``, ``cwd``, ``site``,
``ignored`` (flags dropped, for the log); control requests: ``action`` and
``arg`` (repeated, ``name=value``).  Everything here is a hint from the caller
except what the kernel says; the daemon validates all.

Reply: one line ``<smtp-code> <exit-status> <text>\\n``, then for mailq and
control requests the text the caller prints (UTF-8; what UTF-8 cannot carry is
backslash-escaped).  ``421`` (:data:`BUSY`) means the daemon refused the
connection before reading it (too many open connections from this uid, or no
request within seconds): the front end writes a drop file instead.

Why the field names live here but ``Submission`` (the typed view intake
composes from) stays in ``intake/compose.py``: this module is on the front
end's hot path, which must not import ``dataclasses`` or ``typing``; so the
codec owns the names, the escaping and the single/repeated split
(:func:`split_fields`), and intake only maps names to attributes.

Stdlib only, and only the builtin ``posix`` at that (``os`` costs a millisecond to
import): this runs on every PHP mail() call.
"""

import posix

MAGIC = b"SMSHIM1\n"
HEADER_END = b"\n\n"
TRAILER = b"END\n"
MAX_HEADER_BYTES = 1 << 20  # a million bytes of envelope is plenty: 10,000 recipients
# Fields of one request header: the daemon takes at most 1,000 recipients, so 4,096 fields
# are room for them and every other field.  The daemon decodes a socket request's header
# on its event loop, before any per-uid share applies: a bounded count keeps a hostile
# header of a million short lines (262,000 fields cost 10 ms each) from stalling it.
MAX_FIELDS = 4096
BUSY = 421  # reply code: too many connections from this uid; nothing was read

# Field names.
MODE = "mode"
SUBID = "subid"
SIZE = "size"
SENDER = "sender"
RCPT = "rcpt"
EXTRACT = "extract"
FULLNAME = "fullname"
NOTIFY = "notify"
RET = "ret"
ENVID = "envid"
BODY = "body"
CWD = "cwd"
SITE = "site"
IGNORED = "ignored"
ACTION = "action"
ARG = "arg"

# Values of ``mode``.
SUBMIT = "submit"
FLUSH = "flush"
MAILQ = "mailq"
CONTROL = "control"

SUBID_CHARS = frozenset("0123456789abcdef")

Fields = list[tuple[str, str]]
ControlArgs = dict[str, list[str]]


class ProtocolError(Exception):
    """Bytes that do not follow the wire format; the text says what is wrong."""


# -- fields ---------------------------------------------------------------------------
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


MAX_ENVID = 100  # RFC 3461 4.4


def bad_envid(envid: str) -> bool:
    """Whether ``envid`` (-V) is not an ENVID: printable ASCII, no spaces, at most MAX_ENVID."""
    return len(envid) > MAX_ENVID or not all(0x21 <= ord(c) <= 0x7E for c in envid)


def new_subid() -> str:
    """A fresh submission id: 32 random lower-case hex digits."""
    return posix.urandom(16).hex()


def submission_fields(
    rcpts: list[str],
    *,
    sender: str | None = None,
    extract: bool = False,
    site: str | None = None,
    fullname: str | None = None,
    notify: str | None = None,
    ret: str | None = None,
    envid: str | None = None,
    body: str | None = None,
    cwd: str | None = None,
    ignored: list[str] | None = None,
) -> Fields:
    """The fields of a submission, with a new ``subid``; None (or false) leaves a key out.

    One id for both roads: the daemon queues a submission once even when the
    socket copy was committed and the drop-file copy follows (reply lost, timeout).
    """
    fields: Fields = [(MODE, SUBMIT), (SUBID, new_subid())]
    if sender is not None:
        fields.append((SENDER, sender))
    if extract:
        fields.append((EXTRACT, "1"))
    for name, value in ((SITE, site), (FULLNAME, fullname), (NOTIFY, notify), (RET, ret),
                        (ENVID, envid), (BODY, body), (CWD, cwd)):
        if value is not None:
            fields.append((name, value))
    if ignored:
        fields.append((IGNORED, " ".join(ignored)))
    fields.extend((RCPT, word) for word in rcpts)
    return fields


def split_fields(fields: Fields) -> tuple[dict[str, str], list[str]]:
    """``(single-valued fields, rcpt words in order)``; a repeated single key: the last wins."""
    single: dict[str, str] = {}
    rcpts: list[str] = []
    for key, value in fields:
        if key == RCPT:
            rcpts.append(value)
        else:
            single[key] = value
    return single, rcpts


def field(fields: Fields, key: str, default: str | None = None) -> str | None:
    """The first value of ``key``, else ``default``."""
    return next((v for k, v in fields if k == key), default)


def request_mode(fields: Fields) -> str:
    """The request's ``mode``; a request without one is a submission."""
    mode = field(fields, MODE)
    return SUBMIT if mode is None else mode


def submission_id(fields: Fields) -> str | None:
    """The request's ``subid`` when it is 16 to 64 lower-case hex digits, else None."""
    value = field(fields, SUBID)
    if value is None or not 16 <= len(value) <= 64 or not set(value) <= SUBID_CHARS:
        return None
    return value


def control_fields(action: str, args: ControlArgs) -> Fields:
    """Request fields of an operator action, for the control socket."""
    fields: Fields = [(MODE, CONTROL), (ACTION, action)]
    for key, values in args.items():
        fields.extend((ARG, f"{key}={value}") for value in values)
    return fields


def decode_control(fields: Fields) -> tuple[str, ControlArgs]:
    """``(action, args)`` of a control request; an ``arg`` without ``=`` is ignored."""
    action = ""
    args: ControlArgs = {}
    for key, value in fields:
        if key == ACTION:
            action = value
        elif key == ARG and "=" in value:
            name, _, item = value.partition("=")
            args.setdefault(name, []).append(item)
    return action, args


# -- requests ---------------------------------------------------------------------------
def encode_request(fields: Fields, message: bytes) -> bytes:
    """The request bytes: ``fields`` (without size) and the message."""
    parts = [MAGIC]
    for key, value in fields:
        parts.append(key.encode("ascii") + b" " + _escape(value) + b"\n")
    parts.append(SIZE.encode("ascii") + b" " + str(len(message)).encode("ascii") + HEADER_END)
    parts.append(message)
    parts.append(TRAILER)
    return b"".join(parts)


def check_greeting(line: bytes) -> None:
    """The first line of a request must be :data:`MAGIC`."""
    if line != MAGIC:
        raise ProtocolError("bad greeting")


def decode_header(header: bytes) -> Fields:
    """Fields of a request header (everything between MAGIC and the blank line)."""
    if len(header) > MAX_HEADER_BYTES + len(HEADER_END):
        raise ProtocolError(f"header longer than {MAX_HEADER_BYTES} bytes")
    if header.count(b"\n") > MAX_FIELDS + 1:  # counted in C before any line is decoded
        raise ProtocolError(f"more than {MAX_FIELDS} header fields")
    fields: Fields = []
    for line in header.split(b"\n"):
        if not line:
            continue
        key, sep, value = line.partition(b" ")
        if not sep or not key.isalpha():
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        fields.append((key.decode("ascii"), _unescape(value)))
    return fields


def body_size(fields: Fields) -> int:
    """The message size the header announces."""
    value = field(fields, SIZE)
    if value is None:
        raise ProtocolError("no size field")
    if not value.isdigit():
        raise ProtocolError(f"bad size {value!r}")
    return int(value)


def check_trailer(tail: bytes, size: int) -> bytes:
    """The message from ``tail`` (the ``size`` message bytes and the trailer)."""
    if len(tail) != size + len(TRAILER) or not tail.endswith(TRAILER):
        raise ProtocolError("missing END trailer")
    return tail[:size]


def decode_request(data: bytes) -> tuple[Fields, bytes]:
    """Fields and message of a whole request, as read from a drop file."""
    if not data.startswith(MAGIC):
        raise ProtocolError("does not start with SMSHIM1")
    end = data.find(HEADER_END, len(MAGIC) - 1)
    if end < 0 or end > MAX_HEADER_BYTES:
        raise ProtocolError("header has no end")
    fields = decode_header(data[len(MAGIC) : end + 1])
    size = body_size(fields)
    try:
        message = check_trailer(data[end + len(HEADER_END) :], size)
    except ProtocolError:
        raise ProtocolError("truncated or oversized: size and END trailer do not agree") from None
    return fields, message


# -- replies ----------------------------------------------------------------------------
def encode_body(body: str) -> bytes:
    """A reply body (or a piece of one) as it goes on the wire: UTF-8 with escapes."""
    return body.encode("utf-8", "backslashreplace")


def format_reply(code: int, status: int, text: str, body: str = "") -> bytes:
    """A reply line, then ``body`` (mailq, control) as UTF-8 with escapes.

    A long body may instead follow the line in pieces (:func:`encode_body`):
    the reader takes everything up to the end of the stream.
    """
    line = f"{code} {status} {text}".replace("\n", " ").encode("utf-8", "replace") + b"\n"
    return line + encode_body(body) if body else line


def parse_reply(line: bytes) -> tuple[int, int, str]:
    """``(smtp code, exit status, text)`` of a daemon reply line."""
    parts = line.rstrip(b"\r\n").decode("utf-8", "replace").split(" ", 2)
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ProtocolError(f"unintelligible reply {line[:80]!r}")
    return int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""


def decode_reply(data: bytes) -> tuple[int, int, str, str]:
    """``(code, status, text, body)`` of everything the daemon wrote."""
    first, _, rest = data.partition(b"\n")
    code, status, text = parse_reply(first)
    return code, status, text, rest.decode("utf-8", "replace")
