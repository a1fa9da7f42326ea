"""Reading the message from the caller's stdin, as Postfix's sendmail does.

Trusts: nothing; stdin is the site's bytes.
Guarantees: the result follows the line-ending rule of wire/lineends.py (LF
line ends, no CR; a CR or NUL inside the header block raises
:class:`~sendmail_shim.wire.lineends.LineEndError`, exit 65, before anything
is handed off or dropped), ends with a newline when not empty, has no leading mbox
``From `` line, and is at most ``limit`` bytes, or :class:`MessageTooBig`
is raised.  Without ``-i`` a line holding a lone ``.`` ends the message and
the rest of stdin is read and discarded, so the writer never sees EPIPE.
Leading dots are never removed: Postfix keeps doubled dots too.

Stdlib-free: this runs on every PHP mail() call.
"""

from __future__ import annotations

from sendmail_shim.wire.lineends import normalize

TYPE_CHECKING = False  # typing costs milliseconds to import; mypy reads this name
if TYPE_CHECKING:
    from typing import BinaryIO

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


def _drain(stream: BinaryIO) -> None:
    while stream.read(CHUNK):
        pass


def read_message(stream: BinaryIO, ignore_dots: bool, limit: int) -> bytes:
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
